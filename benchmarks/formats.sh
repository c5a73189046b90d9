#!/usr/bin/env bash
# Issue 17: every image format, provision vs bmaptool copy (3.6), to a file target, with and
# without a bmap. Each result is checked with cmp against the image. Prints a Markdown table.
#   bash benchmarks/formats.sh [BIN_DIR]     (default: .build/debug; use a release build for speed)
# Then gzip, xz and zstd through provision's own decoders and through libarchive.
set -euo pipefail
BIN=${1:-$(cd "$(dirname "$0")/.." && pwd)/.build/debug}
W=$(mktemp -d /var/tmp/provision-formats.XXXXXX)
trap 'rm -rf "$W"' EXIT
cd "$W"

# 256 MiB with 64 MiB of data in two runs (shared libraries: they compress like a root file
# system), holes elsewhere.
truncate -s 256M disk.img
find /usr/lib/x86_64-linux-gnu -name '*.so*' -type f -size +100k 2>/dev/null | head -400 | xargs cat 2>/dev/null | head -c 64M > data.bin || true  # head closes the pipe early: not a failure
dd if=data.bin of=disk.img bs=1M count=32 seek=4 conv=notrunc status=none
dd if=data.bin of=disk.img bs=1M skip=32 count=32 seek=100 conv=notrunc status=none
bmaptool -q create -o disk.img.bmap disk.img

pack() {
  case $1 in
    raw) cp --sparse=always disk.img p.img ;;
    gz) gzip -c disk.img > p.img.gz ;;
    xz) xz -T1 -3 -c disk.img > p.img.xz ;;
    zst) zstd -q -c disk.img > p.img.zst ;;
    bz2) bzip2 -c disk.img > p.img.bz2 ;;
    lz4) lz4 -q -c disk.img > p.img.lz4 ;;
    lzo) lzop -c disk.img > p.img.lzo ;;
    zip) cp --sparse=always disk.img p.img && zip -q p.zip p.img && rm p.img ;;
    tar.gz) cp --sparse=always disk.img p.img && tar -czf p.tar.gz p.img && rm p.img ;;
    tar.xz) cp --sparse=always disk.img p.img && tar -cJf p.tar.xz p.img && rm p.img ;;
  esac
}
name() { case $1 in raw) echo p.img ;; zip) echo p.zip ;; tar.*) echo p.$1 ;; *) echo p.img.$1 ;; esac; }

seconds() { /usr/bin/time -f %e -o t.txt "$@" >/dev/null 2>err.txt && cat t.txt || echo "fails: $(grep -v '^$' err.txt | tail -1 | cut -c1-70)"; }
check() { if [ -f out.img ] && cmp -s disk.img out.img; then echo "$1"; else echo "$1 (≠ image)"; fi; }

echo "| format | provision, bmap | bmaptool copy, bmap | provision, no bmap | bmaptool copy --nobmap |"
echo "|---|---|---|---|---|"
for f in raw gz xz zst bz2 lz4 lzo zip tar.gz tar.xz; do
  pack $f
  n=$(name $f)
  sync
  row="| $f |"
  rm -f out.img; r=$(seconds "$BIN/provision" write --yes --bmap disk.img.bmap "$n" out.img); row+=" $(check "$r") |"
  rm -f out.img; r=$(seconds bmaptool -q copy --bmap disk.img.bmap "$n" out.img); row+=" $(check "$r") |"
  rm -f out.img; r=$(seconds "$BIN/provision" write --yes --nobmap "$n" out.img); row+=" $(check "$r") |"
  rm -f out.img; r=$(seconds bmaptool -q copy --nobmap "$n" out.img); row+=" $(check "$r") |"
  echo "$row"
  rm -f "$n"
done

# gzip, xz and zstd: provision's own decoders against the same streams read through
# libarchive (PROVISION_DECODER=libarchive, a switch for this measurement only), no bmap so
# every byte is decoded; the median of 3 runs, each result checked with cmp.
echo
echo "| format | provision native decoder | through libarchive |"
echo "|---|---|---|"
median3() { sort -g | sed -n 2p; }
for f in gz xz zst; do
  pack $f
  n=$(name $f)
  row="| $f |"
  for dec in native libarchive; do
    : > times.txt
    for i in 1 2 3; do
      rm -f out.img
      PROVISION_DECODER=$dec /usr/bin/time -f %e -o t.txt "$BIN/provision" write --yes --nobmap "$n" out.img >/dev/null 2>err.txt || { echo "fails: $(tail -1 err.txt)"; exit 1; }
      cmp -s disk.img out.img || { echo "$f via $dec: result differs from the image"; exit 1; }
      cat t.txt >> times.txt
    done
    row+=" $(median3 < times.txt) s |"
  done
  echo "$row"
  rm -f "$n"
done
