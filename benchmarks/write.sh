#!/usr/bin/env bash
# benchmarks/write.sh — provision write against dd and bmaptool, measured in the same run.
#
# Cards are loop devices (--direct-io=on), unthrottled and throttled with the blkio v1
# cgroup to SD-card speeds. Images: (a) 512 MiB random raw; (b) 2 GiB with ~20% mapped and
# its bmap; (c) the image of (b) as .zst and .xz (with the bmap).
# Prints a table with wall time, peak RSS and ratios. Needs root.
#
# Cards and images live in --backing DIR: by default /dev/shm (RAM) when the machine has
# 8 GiB to spare, so the unthrottled card is as fast as a card can be and what is measured
# is the tools' own cost; a virtual disk's speed drifts by ±20–50 % from minute to minute
# with the host's cache. `--backing /var/tmp` measures on the disk instead.
# The unthrottled cases run --rounds times (default 7; the order of the tools rotates from
# round to round) and report medians.
#
#   benchmarks/write.sh [--quick] [--rounds 7] [--write-mbps 20] [--read-mbps 40] [--backing DIR]
#                       [--unthrottled-only] [--keep DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0; WMBPS=20; RMBPS=40; WORK=""; FAST_ROUNDS=7; BACKING=""; SPEEDS="fast sd"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --write-mbps) WMBPS=$2; shift ;;
    --read-mbps) RMBPS=$2; shift ;;
    --keep) WORK=$2; shift ;;
    --rounds) FAST_ROUNDS=$2; shift ;;
    --backing) BACKING=$2; shift ;;
    --unthrottled-only) SPEEDS="fast" ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "benchmarks/write.sh needs root (loop devices, blkio cgroup)" >&2; exit 77; }

make -s release >/dev/null
PROVISION=$(swift build -c release --show-bin-path)/provision

if [ $QUICK = 1 ]; then A_MB=128; B_MB=512; else A_MB=512; B_MB=2048; fi
if [ -z "$BACKING" ]; then
  avail_kib=$(awk '/MemAvailable/ { print $2 }' /proc/meminfo)
  if [ "$avail_kib" -ge $((8 << 20)) ]; then BACKING=/dev/shm; else BACKING=/var/tmp; fi
fi
WORK=${WORK:-$(mktemp -d "$BACKING/provision-bench.XXXXXX")}
mkdir -p "$WORK"
LOOPS=(); CARD=""
cleanup() {
  udevadm settle 2>/dev/null || true
  for l in "${LOOPS[@]}"; do
    unthrottle "$l" 2>/dev/null || true
    # udev may still be probing the card: retry until it lets go.
    for _ in $(seq 20); do losetup -d "$l" 2>/dev/null && break; sleep 0.2; done
  done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

BLKIO=/sys/fs/cgroup/blkio
throttle() { # loopdev write_Bps read_Bps
  local mm; mm=$(lsblk -dno MAJ:MIN "$1" | tr -d ' ')
  echo "$mm $2" > $BLKIO/blkio.throttle.write_bps_device
  echo "$mm $3" > $BLKIO/blkio.throttle.read_bps_device
}
unthrottle() { throttle "$1" 0 0; }

card() { # size_mb -> sets CARD to a new loop device (not in a $(…) subshell: LOOPS must
  # reach the cleanup trap)
  local f; f=$(mktemp "$WORK/provision-card-XXXXXX.img")
  truncate -s "$1M" "$f"
  CARD=$(losetup --find --show --direct-io=on "$f")
  LOOPS+=("$CARD")
}

FSTYPE=$(findmnt -T "$WORK" -no FSTYPE | tail -1)
echo ">>> building images in $WORK ($FSTYPE)"
A="$WORK/a-random.img"
head -c $((A_MB << 20)) /dev/urandom > "$A"
B="$WORK/b-sparse.img"
truncate -s "${B_MB}M" "$B"
# ~20% mapped: 4 MiB of random data in every 20 MiB, so bmap ranges are spread over the card.
for ((off = 0; off < B_MB; off += 20)); do
  dd if=/dev/urandom of="$B" bs=1M count=4 seek=$off conv=notrunc status=none
done
bmaptool create -o "$B.bmap" "$B" 2>/dev/null
zstd -q -T0 -f "$B" -o "$B.zst"
xz -T0 -k -f -1 "$B"
cp "$B.bmap" "$B.zst.bmap"; cp "$B.bmap" "$B.xz.bmap"
WARM="$WORK/warm.img"  # see warm_tools
head -c 1M /dev/urandom > "$WARM"
zstd -q -f "$WARM" -o "$WARM.zst"
xz -k -f -1 "$WARM"
card 8; WARMCARD=$CARD

# run LABEL CMD... : wall seconds and peak RSS (KiB) of the command. Before each run the page
# cache is dropped (the image is read from disk by every tool) and then each tool writes a
# 1 MiB image (.zst and .xz) to a small loop card, so that no tool pays for reading its binary,
# libraries and the code of a write from disk: that is start-up from a cold disk, not
# writing (provision's Swift runtime, Foundation and ICU cost 0.05–0.2 s cold, more than
# `--help` brings back; bmaptool's Python imports as much).
# With REPS > 1 the label is measured REPS times (rounds interleaved by the caller) and the
# median is reported: the unthrottled loop sits on a virtual disk whose speed drifts by
# ±20 % from one second to the next.
declare -A WALL RSS SAMPLES FASTEST PROBES PROBE
warm_tools() {
  local f
  for f in "$WARM.zst" "$WARM.xz"; do
    "$PROVISION" write --yes "$f" "$WARMCARD" >/dev/null 2>&1 || true
    bmaptool copy --nobmap "$f" "$WARMCARD" >/dev/null 2>&1 || true
  done
  dd if="$WARM" of="$WARMCARD" bs=4M oflag=direct status=none 2>/dev/null || true
}
run() {
  local label=$1; shift
  sync; echo 3 > /proc/sys/vm/drop_caches
  warm_tools
  sleep 1  # let the virtual disk finish the previous run's writes behind our back
  local out; out=$(mktemp)
  /usr/bin/time -v -o "$out" "$@" >/dev/null 2>"$out.err" || { echo "FAILED: $label: $*"; cat "$out.err"; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i]; print s }' "$out")
  rss=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$out")
  # provision write's capacity probe (issue 16), which dd and bmaptool do not do: its own line
  # says how long it took ("capacity probe: … came back as written in 0.452 s").
  local probe; probe=$(sed -n 's/^.*capacity probe: .* in \([0-9.]*\) s$/\1/p' "$out.err" | tail -1)
  if [ -n "$probe" ]; then
    PROBES[$label]+="$probe "
    PROBE[$label]=$(echo ${PROBES[$label]} | tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
  fi
  rm -f "$out" "$out.err"
  SAMPLES[$label]+="$wall "
  WALL[$label]=$(echo ${SAMPLES[$label]} | tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
  FASTEST[$label]=$(echo ${SAMPLES[$label]} | tr ' ' '\n' | sort -n | head -1)
  [ -n "${RSS[$label]:-}" ] && [ "${RSS[$label]}" -ge "$rss" ] || RSS[$label]=$rss
  printf '    %-34s %8.2f s  %7d KiB\n' "$label" "$wall" "$rss"
}

ddwr() { # image dev bytes: dd write + O_DIRECT read-back, as a person would verify by hand
  dd if="$1" of="$2" bs=4M oflag=direct conv=fsync status=none
  dd if="$2" of=/dev/null bs=4M iflag=direct count=$(( ($3 + 4194303) / 4194304 )) status=none
}
export -f ddwr

# rotate R ITEM... : the items, starting at position R (mod count): in round r each tool
# goes first once in a while, so no tool always runs right after another's writes.
rotate() { local r=$1; shift; local n=$#; local i; for ((i = 0; i < n; i++)); do local k=$(( (i + r) % n + 1 )); echo "${!k}"; done; }

bench_speed() { # name write_Bps read_Bps rounds
  local name=$1 wbps=$2 rbps=$3 reps=$4
  echo ">>> $name ($reps round(s); the median is reported)"
  card $((B_MB + 64)); local c=$CARD
  [ "$wbps" = 0 ] || throttle "$c" "$wbps" "$rbps"
  local step
  for ((r = 0; r < reps; r++)); do
    while read -r step; do
      case $step in
        dd) run "$name a dd+readback" bash -c "ddwr '$A' '$c' $((A_MB << 20))" ;;
        bmaptool) run "$name a bmaptool copy" bmaptool copy --nobmap "$A" "$c" ;;
        provision) run "$name a provision write" "$PROVISION" write --yes --nobmap "$A" "$c" ;;
      esac
    done < <(rotate $r dd bmaptool provision)
  done
  for ((r = 0; r < reps; r++)); do
    while read -r step; do
      case $step in
        dd) run "$name b dd+readback" bash -c "ddwr '$B' '$c' $((B_MB << 20))" ;;
        bmaptool) run "$name b bmaptool copy" bmaptool copy --bmap "$B.bmap" "$B" "$c" ;;
        provision) run "$name b provision write" "$PROVISION" write --yes "$B" "$c" ;;
        bmaptool-zst) run "$name c bmaptool copy zst" bmaptool copy --bmap "$B.bmap" "$B.zst" "$c" ;;
        provision-zst) run "$name c provision write zst" "$PROVISION" write --yes "$B.zst" "$c" ;;
        bmaptool-xz) run "$name c bmaptool copy xz" bmaptool copy --bmap "$B.bmap" "$B.xz" "$c" ;;
        provision-xz) run "$name c provision write xz" "$PROVISION" write --yes "$B.xz" "$c" ;;
      esac
    done < <(rotate $r dd bmaptool provision bmaptool-zst provision-zst bmaptool-xz provision-xz)
  done
  unthrottle "$c"
}

bench_speed "fast" 0 0 "$FAST_ROUNDS"
[ "$SPEEDS" = fast ] || bench_speed "sd" $((WMBPS * 1000000)) $((RMBPS * 1000000)) 1

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# provision write's median time, with its capacity probe's median in brackets when it ran one.
pw() { if [ -n "${PROBE[$1]:-}" ]; then echo "${WALL[$1]} s (probe ${PROBE[$1]} s)"; else echo "${WALL[$1]} s"; fi; }
# The same without the probe: what compares like for like with dd and bmaptool.
noprobe() { awk -v a="${WALL[$1]}" -v p="${PROBE[$1]:-0}" 'BEGIN { printf "%.2f", a - p }'; }
maxrss=0
for k in "${!RSS[@]}"; do case "$k" in *provision*) [ "${RSS[$k]}" -gt $maxrss ] && maxrss=${RSS[$k]} ;; esac; done
echo
echo "## provision write vs dd and bmaptool (a: ${A_MB} MiB random; b: ${B_MB} MiB, 20% mapped, bmap; c: b as zst/xz)"
echo
echo "| card | case | dd write+read | bmaptool copy | provision write (+verify) | vs dd | vs bmaptool | target |"
echo "|---|---|---|---|---|---|---|---|"
for s in $SPEEDS; do
  lbl="unthrottled ($FSTYPE)"; [ $s = sd ] && lbl="SD ${WMBPS}/${RMBPS} MB/s"
  echo "| $lbl | a raw | ${WALL[$s a dd+readback]} s | ${WALL[$s a bmaptool copy]} s | $(pw "$s a provision write") | $(ratio "${WALL[$s a provision write]}" "${WALL[$s a dd+readback]}") | $(ratio "${WALL[$s a provision write]}" "${WALL[$s a bmaptool copy]}") | ≤ 1.03× dd |"
  echo "| $lbl | b bmap | ${WALL[$s b dd+readback]} s | ${WALL[$s b bmaptool copy]} s | $(pw "$s b provision write") | $(ratio "${WALL[$s b provision write]}" "${WALL[$s b dd+readback]}") | $(ratio "${WALL[$s b provision write]}" "${WALL[$s b bmaptool copy]}") | ≤ 1.0× bmaptool |"
  echo "| $lbl | c zst | – | ${WALL[$s c bmaptool copy zst]} s | $(pw "$s c provision write zst") | – | $(ratio "${WALL[$s c provision write zst]}" "${WALL[$s c bmaptool copy zst]}") | ≤ 1.05× raw: $(ratio "${WALL[$s c provision write zst]}" "${WALL[$s b provision write]}")× |"
  echo "| $lbl | c xz | – | ${WALL[$s c bmaptool copy xz]} s | $(pw "$s c provision write xz") | – | $(ratio "${WALL[$s c provision write xz]}" "${WALL[$s c bmaptool copy xz]}") | (xz: $(ratio "${WALL[$s c provision write xz]}" "${WALL[$s b provision write]}")× raw) |"
done
echo
for s in $SPEEDS; do
  lbl="unthrottled ($FSTYPE)"; [ $s = sd ] && lbl="SD ${WMBPS}/${RMBPS} MB/s"
  [ -n "${PROBE[$s b provision write]:-}" ] || continue
  echo "without the capacity probe, $lbl: a $(ratio "$(noprobe "$s a provision write")" "${WALL[$s a dd+readback]}")× dd," \
       "b $(ratio "$(noprobe "$s b provision write")" "${WALL[$s b bmaptool copy]}")× bmaptool," \
       "zst $(ratio "$(noprobe "$s c provision write zst")" "${WALL[$s c bmaptool copy zst]}")× bmaptool"
done
if [ "$FAST_ROUNDS" -gt 1 ]; then
  # Noise on a shared host only ever adds time: the fastest of the rounds is each tool's own
  # cost, as Python's timeit argues for its minimum. Both are printed; the table is medians.
  f() { echo "${FASTEST[fast $1]}"; }
  echo
  echo "fastest of $FAST_ROUNDS unthrottled rounds: a $(f "a provision write") s vs dd $(f "a dd+readback") s = $(ratio "$(f "a provision write")" "$(f "a dd+readback")")×;" \
       "b $(f "b provision write") s vs bmaptool $(f "b bmaptool copy") s = $(ratio "$(f "b provision write")" "$(f "b bmaptool copy")")×;" \
       "zst $(f "c provision write zst") s vs raw $(f "b provision write") s = $(ratio "$(f "c provision write zst")" "$(f "b provision write")")×"
fi
echo
echo "peak RSS of provision write over all runs: $((maxrss / 1024)) MiB (target ≤ 64 MiB); bmaptool: $(( ${RSS[$s b bmaptool copy]} / 1024 )) MiB"
