#!/usr/bin/env bash
# benchmarks/soak.sh — a station that runs for a month: 500 cards through one daemon.
#
# The endurance scenario of Tests/IntegrationTests/EnduranceTests.swift at soak length: the
# test image (.zst through the station's cache, bmap, a user injected, e2fsck) onto loop cards
# one after another, nine in ten done, the rest cancelled, pulled mid-write or failed (a
# truncated image). Every 50 cards it prints the daemon's open descriptors, threads and
# resident memory, then the slope of each per 100 cards. Goal: zero (memory within noise).
# The daemon and CLI are the release build (the shipping binaries); the scenario runs as a
# Swift test, so the same code drives the 50-card test in `make test`.
# Needs root (loop devices, udev rules). Cleans up after itself.
#
#   benchmarks/soak.sh [--cards 500] [--every 50] [--debug]
set -euo pipefail
cd "$(dirname "$0")/.."
CARDS=500; EVERY=50; CONFIG=release
while [ $# -gt 0 ]; do
  case "$1" in
    --cards) CARDS=$2; shift ;;
    --every) EVERY=$2; shift ;;
    --debug) CONFIG=debug ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "benchmarks/soak.sh needs root (loop devices, udev rules)" >&2; exit 77; }

echo ">>> building the $CONFIG daemon and the test bundle"
[ $CONFIG = release ] && make -s release >/dev/null
swift build --build-tests >/dev/null
BIN=$(swift build -c $CONFIG --show-bin-path)

echo ">>> $CARDS cards through one $CONFIG provisiond (a sample every $EVERY)"
start=$(date +%s)
PROVISION_BIN_DIR=$BIN PROVISION_ENDURANCE_CARDS=$CARDS PROVISION_ENDURANCE_EVERY=$EVERY \
  swift test --skip-build --filter 'EnduranceTests' 2>&1 | tee /tmp/provision-soak.$$.log | grep -E '^endurance:|passed|failed|issue' || true
echo ">>> $(( $(date +%s) - start )) s"
grep -q 'endurance: slope' /tmp/provision-soak.$$.log || { echo "the soak did not finish: see /tmp/provision-soak.$$.log" >&2; exit 1; }
grep -qE 'Test run with .* passed' /tmp/provision-soak.$$.log && rm -f /tmp/provision-soak.$$.log
