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
inventory = "$DEMO/inventory.toml"  # unit names and per-unit accounts
cache_dir = "$DEMO/cache"           # the .zst is decompressed once for all cards

[profiles.rpi]
image = "$DEMO/rpi-test.img.zst"   # its bmap rpi-test.img.bmap is found next to it
verify = true
[profiles.rpi.root]                # users go into the ext4 root filesystem, partition 2
partition = 2
[[profiles.rpi.users]]
name = "pi"
groups = ["users"]
password = "generate"             # a different random password on every card

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
cat > "$DEMO/inventory.toml" <<TOML
name_pattern = "bench-{seq:03}"
password_export = "$DEMO/passwords.tsv"
TOML
rm -f "$DEMO/passwords.tsv"
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
say "generated passwords, exported 0600 for the operator (never in the ledger or the log)"
ls -l "$DEMO/passwords.tsv" | cut -d' ' -f1,9
sqlite3 "$DEMO/ledger.sqlite" "SELECT 'ledger: job ' || jobId || ' user ' || name || ' uid ' || uid || ' hash ' || substr(hash, 1, 12) || '…' FROM jobUser"
say "each card's root filesystem: e2fsck -fn clean, and its own /etc/shadow entry (debugfs, no mount)"
for l in "${LOOPS[@]}"; do
  start=$(sfdisk --json "$l" | python3 -c 'import json,sys; p=json.load(sys.stdin)["partitiontable"]["partitions"][1]; print(p["start"] * 512)')
  e2fsck -fn "$l?offset=$start" >/dev/null 2>&1 && fsck=clean || fsck=DIRTY
  echo "    $l: e2fsck $fsck; $(debugfs -R 'cat /etc/shadow' "$l?offset=$start" 2>/dev/null | grep '^pi:' | cut -c1-28)…"
done
say "the boot partition equals the image's (the root partition now differs: it has the unit's users)"
size=$((100 << 20))
echo "    image      $(head -c "$size" "$DEMO/rpi-test.img" | sha256sum | cut -c1-16)"
for l in "${LOOPS[@]}"; do echo "    $l $(dd if="$l" iflag=direct bs=1M count=100 status=none | sha256sum | cut -c1-16)"; done
