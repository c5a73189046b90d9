#!/usr/bin/env bash
# benchmarks/xzfill.sh — issue 18: the station's one decompression of an .xz image into its
# cache file, with the single-threaded stream decoder (PROVISION_XZ_THREADS=1) and with the
# blocks decoded in parallel (ParallelXZFill), on an image like benchmarks/batch.sh's
# --cards 32 run: 512 MiB with 144 MiB of /usr tar data in 4 MiB runs, `xz -T0 -3` (12 MiB
# blocks), and its bmap. Measures the fill alone (benchmarks/cache-fill-bench: ImageCacheStore's
# call, no cards): wall time, user+system CPU and peak RSS from /usr/bin/time -v, best of
# --runs (the two alternate). The image is kept in .build/batch-bench/ (--fresh-image rebuilds it); the cache file
# goes to /var/tmp and is removed after each run.
#
#   benchmarks/xzfill.sh [--runs 3] [--fresh-image]
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3; FRESH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift ;;
    --fresh-image) FRESH=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "--runs wants a positive number, not '$RUNS'" >&2; exit 64; }
source benchmarks/lib/image.sh   # (the repository root is the working directory)
say() { printf '>>> %s\n' "$*" >&2; }

say "release build of the harness"
swift build -c release --product cache-fill-bench >/dev/null 2>&1
BENCH=$(swift build -c release --show-bin-path)/cache-fill-bench

# The image, as benchmarks/batch.sh --image-mib 512 --mapped-mib 144 builds it.
IMG_MB=512; CHUNKS=36   # runs of CHUNK_MB (lib/image.sh)
IMGDIR=.build/batch-bench/xzfill-${IMG_MB}m-$((CHUNKS * CHUNK_MB))m
IMG=$IMGDIR/batch.img
[ $FRESH = 0 ] || rm -rf "$IMGDIR"
if [ ! -e "$IMGDIR/complete" ]; then
  say "building a $IMG_MB MiB image with $((CHUNKS * CHUNK_MB)) MiB mapped in $IMGDIR (kept for the next run)"
  rm -rf "$IMGDIR"; mkdir -p "$IMGDIR"
  sparse_image "$IMG" "$IMG_MB" "$CHUNKS"
  xz -T0 -3 -k -c "$IMG" > "$IMG.xz"
  xz -d -c "$IMG.xz" | cmp - "$IMG"
  mv "$IMG" "$IMGDIR/reference.img"   # the check below compares the cache with it
  touch "$IMGDIR/complete"
fi
say "image: $(du -h --apparent-size "$IMG.xz" | cut -f1), $(xz --robot -l "$IMG.xz" | awk -F'\t' '$1=="file"{print $3}') blocks"

CACHE=$(mktemp /var/tmp/provision-xzfill.XXXXXX)
trap 'rm -f "$CACHE" "$CACHE.time"' EXIT
run() {  # $1: PROVISION_XZ_THREADS or "" → "seconds threads user sys rss_kib"
  rm -f "$CACHE"
  if [ -n "$1" ]; then export PROVISION_XZ_THREADS=$1; else unset PROVISION_XZ_THREADS; fi
  out=$(/usr/bin/time -v -o "$CACHE.time" "$BENCH" "$IMG.xz" "$IMG.bmap" "$CACHE")
  unset PROVISION_XZ_THREADS
  cmp "$CACHE" "$IMGDIR/reference.img" || { echo "the cache differs from the image" >&2; exit 1; }
  secs=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$out"); threads=$(sed -n 's/.*threads=\([0-9]*\).*/\1/p' <<<"$out")
  user=$(sed -n 's/.*User time (seconds): //p' "$CACHE.time"); sys=$(sed -n 's/.*System time (seconds): //p' "$CACHE.time")
  rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$CACHE.time")
  echo "$secs $threads $user $sys $rss"
}
# The two ways alternate, so that load from elsewhere on the machine falls on both alike.
declare -A BEST
for ((r = 0; r < RUNS; r++)); do
  for mode in 1 parallel; do
    line=$(run "$([ $mode = 1 ] && echo 1)")
    say "PROVISION_XZ_THREADS=$([ $mode = 1 ] && echo 1 || echo unset): $line"
    best=${BEST[$mode]:-}
    if [ -z "$best" ] || awk -v a="${line%% *}" -v b="${best%% *}" 'BEGIN{exit !(a < b)}'; then BEST[$mode]=$line; fi
  done
done
echo "| decoder | threads | fill time (s), best of $RUNS | user CPU (s) | system CPU (s) | peak RSS (MiB) |"
echo "|---|---|---|---|---|---|"
for mode in 1 parallel; do
  read -r secs threads user sys rss <<<"${BEST[$mode]}"
  echo "| $([ $mode = 1 ] && echo "serial (PROVISION_XZ_THREADS=1)" || echo "block-parallel (default)") | $threads | $secs | $user | $sys | $((rss / 1024)) |"
done
