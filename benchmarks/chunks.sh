#!/usr/bin/env bash
# benchmarks/chunks.sh — what the chunk size costs a throttled card (issue 18): `provision write`
# of one raw image to one loop card (--direct-io=on) throttled with blkio v1, once per chunk
# size, write only (--no-verify) and with verification. Small chunks save memory per card but
# make more, smaller writes; this measures what that means for the card's speed.
#
#   benchmarks/chunks.sh [--mbps 10] [--image-mib 64] [--sizes 128KiB,256KiB,512KiB,1MiB,2MiB,4MiB] [--bin DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MBPS=10; MIB=64; SIZES=128KiB,256KiB,512KiB,1MiB,2MiB,4MiB; BIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --mbps) MBPS=$2; shift ;;
    --image-mib) MIB=$2; shift ;;
    --sizes) SIZES=$2; shift ;;
    --bin) BIN=$2; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "benchmarks/chunks.sh needs root (loop devices, blkio cgroup)" >&2; exit 77; }
BLKIO=/sys/fs/cgroup/blkio
[ -w $BLKIO/blkio.throttle.write_bps_device ] || { echo "no blkio v1 cgroup at $BLKIO: cannot throttle the card" >&2; exit 77; }
if [ -z "$BIN" ]; then make -s release >/dev/null; BIN=$(swift build -c release --show-bin-path); fi
PROVISION=$BIN/provision
WORK=$(mktemp -d /var/tmp/provision-chunks.XXXXXX); LOOP=""
cleanup() {
  set +e
  if [ -n "$LOOP" ]; then
    mm=$(lsblk -dno MAJ:MIN "$LOOP" | tr -d ' ')
    echo "$mm 0" > $BLKIO/blkio.throttle.write_bps_device; echo "$mm 0" > $BLKIO/blkio.throttle.read_bps_device
    losetup -d "$LOOP"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT; trap 'exit 130' INT TERM
head -c $((MIB << 20)) /dev/urandom > "$WORK/image.img"
truncate -s $((MIB + 16))M "$WORK/card.img"
LOOP=$(losetup --find --show --direct-io=on "$WORK/card.img")
mm=$(lsblk -dno MAJ:MIN "$LOOP" | tr -d ' ')
echo "$mm $((MBPS * 1000000))" > $BLKIO/blkio.throttle.write_bps_device
echo "$mm $((MBPS * 2000000))" > $BLKIO/blkio.throttle.read_bps_device
echo "| chunk | write only (s) | MB/s | write + verify (s) |"
echo "|---|---|---|---|"
IFS=, read -r -a LIST <<< "$SIZES"
for c in "${LIST[@]}"; do
  s=$(date +%s.%N); "$PROVISION" write -y --nobmap --no-verify --chunk-size "$c" "$WORK/image.img" "$LOOP" >/dev/null 2>&1; e=$(date +%s.%N)
  w=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.2f", b - a }')
  s=$(date +%s.%N); "$PROVISION" write -y --nobmap --chunk-size "$c" "$WORK/image.img" "$LOOP" >/dev/null 2>&1; e=$(date +%s.%N)
  v=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.2f", b - a }')
  echo "| $c | $w | $(awk -v m="$MIB" -v t="$w" 'BEGIN { printf "%.1f", m * 1.048576 / t }') | $v |"
done
echo "card: $LOOP throttled to $MBPS MB/s write, $((MBPS * 2)) MB/s read; image $MIB MiB raw; load average $(cut -d' ' -f1-3 /proc/loadavg)"
