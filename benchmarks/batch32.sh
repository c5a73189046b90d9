#!/usr/bin/env bash
# benchmarks/batch32.sh — lab scale (issue 18): one provisiond writing 32 throttled loop cards
# (a third each at 10, 20 and 40 MB/s) from one compressed image, each speed class alone, and
# 32 parallel `bmaptool copy` of the same image in the same run; for an xz image (how Raspberry
# Pi OS, Armbian and Debian's images ship) and a zstd one. Targets: every card ≤ 1.05× its
# time alone, daemon user CPU ≤ 2.5× one card's, peak RSS ≤ 128 MiB. Needs root and a quiet
# machine (32 cards at up to 40 MB/s want most of a disk; on a shared machine the ratios
# measure the neighbours). The image is 512 MiB with 144 MiB mapped: a 10 MB/s card takes
# 15 s, the whole run (release build aside) about ten minutes, and the 32 cards' backing files
# (4.6 GiB) fit in /dev/shm. Extra options go to batch.sh (--keep DIR, --formats, --backing).
#
#   benchmarks/batch32.sh [--formats xz,zst] [--keep DIR] [--backing DIR]
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,12p' "$0"; exit 0 ;; esac
exec "$(dirname "$0")/batch.sh" --cards 32 --formats xz,zst --image-mib 512 --mapped-mib 144 "$@"
