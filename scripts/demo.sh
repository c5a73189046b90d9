#!/usr/bin/env bash
# The demo behind `make demo`: a test image built without root, three loop-device "cards"
# (one throttled to SD-card speed), the real provisiond with a demo station config and real
# udevd with the project's rules; `provision watch` until every card is done, then
# `provision status` and the ledger's history. Everything is cleaned up at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$(swift build --show-bin-path)}
DEMO=${DEMO_DIR:-$PWD/.build/demo}
SOCK=$DEMO/control.sock
mkdir -p "$DEMO"
say() { printf '\n\033[1m>>> %s\033[0m\n' "$*"; }

LOOPS=(); RULES=(); DAEMON=""
cleanup() {
  set +e
  [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
  for l in "${LOOPS[@]}"; do
    mm=$(lsblk -dno MAJ:MIN "$l" 2>/dev/null | tr -d ' ')
    [ -n "$mm" ] && echo "$mm 0" > /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device 2>/dev/null
    losetup -d "$l" 2>/dev/null
  done
  for r in "${RULES[@]}"; do rm -f "$r"; done
  [ ${#RULES[@]} -gt 0 ] && udevadm control --reload 2>/dev/null
  rm -f "$DEMO"/provision-card-*.img
}
trap cleanup EXIT

say "building the test image (no root, no VM: sfdisk, mkfs.vfat + mcopy, mkfs.ext4 -d, bmaptool create)"
images/build-test-image --out "$DEMO" --compress zst --quiet

say "groups and udev: the project's rules plus the test rule that tags loop cards"
getent group provision >/dev/null || groupadd --system provision
getent group provision-admin >/dev/null || groupadd --system provision-admin
udevadm control --ping >/dev/null 2>&1 || { /lib/systemd/systemd-udevd --daemon; sleep 0.5; }
mkdir -p /run/udev/rules.d
for r in udev-rules/70-provision.rules udev-rules/99-provision-test-loop.rules; do
  dest=/run/udev/rules.d/$(basename "${r%.rules}")-demo.rules
  cp "$r" "$dest"; RULES+=("$dest")
done
udevadm control --reload

cat > "$DEMO/station.toml" <<TOML
[station]
name = "demo-bench"
allow_loop_devices = true          # the demo's cards are loop devices
ledger = "$DEMO/ledger.sqlite"
admin_group = "provision-admin"

[profiles.rpi]
image = "$DEMO/rpi-test.img.zst"   # its bmap rpi-test.img.bmap is found next to it
verify = true

[[slots]]
name = "A1"
match = "loop:*provision-card-A1*"
profile = "rpi"

[[slots]]
name = "A2"
match = "loop:*provision-card-A2*"
profile = "rpi"

[[slots]]
name = "B1"
match = "loop:*provision-card-B1*"
profile = "rpi"
TOML
"$BIN/provision" config check "$DEMO/station.toml"

say "starting provisiond"
rm -f "$DEMO/ledger.sqlite"* "$SOCK"
"$BIN/provisiond" --config "$DEMO/station.toml" --socket "$SOCK" > "$DEMO/provisiond.log" 2>&1 &
DAEMON=$!
export PROVISION_SOCKET=$SOCK
for _ in $(seq 100); do "$BIN/provision" status >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/provision" status >/dev/null || { cat "$DEMO/provisiond.log"; exit 1; }

say "plugging in three cards (B1 throttled to 20 MB/s write, like an SD card)"
for slot in A1 A2 B1; do
  f=$DEMO/provision-card-$slot.img
  rm -f "$f"; truncate -s 300M "$f"
  l=$(losetup --find --show --direct-io=on "$f"); LOOPS+=("$l")
  if [ $slot = B1 ]; then
    echo "$(lsblk -dno MAJ:MIN "$l" | tr -d ' ') 20000000" > /sys/fs/cgroup/blkio/blkio.throttle.write_bps_device
  fi
  echo "    $slot: $l"
done

say "provision watch (until all three cards are done)"
"$BIN/provision" watch --until-idle --expect-jobs 3

say "provision status"
"$BIN/provision" status
say "provision jobs (the ledger)"
"$BIN/provision" jobs
say "the cards equal the image (sha256 of the image vs. the first bytes of each card)"
size=$(stat -c %s "$DEMO/rpi-test.img")
echo "    image  $(sha256sum < "$DEMO/rpi-test.img" | cut -c1-16)"
for l in "${LOOPS[@]}"; do echo "    $l $(head -c "$size" "$l" | sha256sum | cut -c1-16)"; done
