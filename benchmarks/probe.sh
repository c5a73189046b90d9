#!/usr/bin/env bash
# benchmarks/probe.sh — what the capacity probe (issue 16) costs on an SD-speed card.
#
# A 2 GiB loop card (--direct-io=on, backed in --backing DIR, /var/tmp by default) is
# throttled with the blkio v1 cgroup to --write-mbps (20) and --read-mbps (40) MB/s, and
# `provision write` writes a 1 GiB random raw image to it (verify on, as by default). The
# probe's own time is what provision prints ("capacity probe: N blocks ... in S s"); the
# write's time is the rest of the run. Run --rounds times (3), medians reported. Goal: the
# probe under 2 % of the write. Needs root and a built `provision` (swift build).
#
#   benchmarks/probe.sh [--rounds 3] [--write-mbps 20] [--read-mbps 40] [--backing DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=3; WMBPS=20; RMBPS=40; BACKING=/var/tmp
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift ;;
    --write-mbps) WMBPS=$2; shift ;;
    --read-mbps) RMBPS=$2; shift ;;
    --backing) BACKING=$2; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "probe.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

BIN=${PROVISION_BIN:-$(swift build --show-bin-path)}  # PROVISION_BIN: a copy, so a rebuild meanwhile does not matter
[ -x "$BIN/provision" ] || { echo "probe.sh: build first (swift build)" >&2; exit 1; }
WORK=$(mktemp -d "$BACKING/provision-probe-bench-XXXXXX")
LOOP=""
cleanup() {
  if [ -n "$LOOP" ]; then
    MM=$(cat /sys/block/${LOOP#/dev/}/dev)
    echo "$MM 0" > /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device || true
    echo "$MM 0" > /sys/fs/cgroup/blkio/blkio.throttle.read_bps_device || true
    losetup --detach "$LOOP" || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

head -c $((1 << 30)) /dev/urandom > "$WORK/image.raw"
truncate -s 2G "$WORK/provision-card-bench.img"
LOOP=$(losetup --find --show --direct-io=on "$WORK/provision-card-bench.img")
MM=$(cat /sys/block/${LOOP#/dev/}/dev)
echo "$MM $((WMBPS * 1000000))" > /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device
echo "$MM $((RMBPS * 1000000))" > /sys/fs/cgroup/blkio/blkio.throttle.read_bps_device

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
: > "$WORK/probe.txt"; : > "$WORK/write.txt"; : > "$WORK/blocks.txt"
for round in $(seq "$ROUNDS"); do
  start=$(date +%s.%N)
  "$BIN/provision" write --yes --nobmap "$WORK/image.raw" "$LOOP" 2> "$WORK/log.txt" || { cat "$WORK/log.txt" >&2; exit 1; }
  end=$(date +%s.%N)
  line=$(grep 'capacity probe:' "$WORK/log.txt")
  probe=$(sed -E 's/.* in ([0-9.]+) s$/\1/' <<< "$line")
  blocks=$(sed -E 's/capacity probe: ([0-9]+) blocks.*/\1/' <<< "$line")
  echo "$probe" >> "$WORK/probe.txt"
  echo "$blocks" >> "$WORK/blocks.txt"
  awk -v s="$start" -v e="$end" -v p="$probe" 'BEGIN {print e - s - p}' >> "$WORK/write.txt"
  echo "round $round: probe $probe s ($blocks blocks), write+verify $(tail -1 "$WORK/write.txt") s"
done
P=$(median < "$WORK/probe.txt"); W=$(median < "$WORK/write.txt"); B=$(median < "$WORK/blocks.txt")
echo
echo "card: 2 GiB loop, throttled to ${WMBPS} MB/s write, ${RMBPS} MB/s read; image: 1 GiB raw, verified"
awk -v p="$P" -v w="$W" -v b="$B" 'BEGIN {printf "probe: %.3f s for %d blocks; write+verify: %.1f s; probe = %.2f %% of the write (goal < 2 %%)\n", p, b, w, 100 * p / w}'
