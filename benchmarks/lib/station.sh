# Sourced by benchmarks/daemon.sh and benchmarks/clients.sh: a station on loop cards, with the
# project's udev rules (and a systemd-udevd if none runs), and its undoing on every ending.
# The sourcing script sets WORK, TOKEN and BLKIO and keeps LOOPS (the loop devices it
# attached), RULES, DAEMON (provisiond's pid) and UDEVD_STARTED, all starting empty (0).

# The groups the config names, a running systemd-udevd, and the project's rules (the loop-card
# rule included) under /run/udev/rules.d, named for this run.
begin_station() {
  getent group provision >/dev/null || groupadd --system provision
  getent group provision-admin >/dev/null || groupadd --system provision-admin
  if ! udevadm control --ping >/dev/null 2>&1; then
    /lib/systemd/systemd-udevd --daemon; UDEVD_STARTED=1
    for _ in $(seq 50); do udevadm control --ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  mkdir -p /run/udev/rules.d
  local r dest
  for r in udev-rules/70-provision.rules udev-rules/99-provision-test-loop.rules; do
    dest=/run/udev/rules.d/$(basename "${r%.rules}")-bench-$TOKEN.rules
    cp "$r" "$dest"; RULES+=("$dest")
  done
  udevadm control --reload
}

# Undoes it all: provisiond (TERM, 15 s to finish, then KILL), the loop cards — only those
# still backed by a file of $WORK (a number since reused by another program is not touched),
# their throttles cleared first — the rules, and a udevd this run started; $WORK unless KEEP=1.
end_station() {
  local l mm r
  if [ -n "$DAEMON" ] && kill -0 "$DAEMON" 2>/dev/null; then
    kill -TERM "$DAEMON"
    for _ in $(seq 150); do kill -0 "$DAEMON" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DAEMON" 2>/dev/null
    wait "$DAEMON" 2>/dev/null
  fi
  for l in "${LOOPS[@]}"; do
    if grep -q "$WORK" "/sys/block/$(basename "$l")/loop/backing_file" 2>/dev/null; then
      mm=$(cat "/sys/block/$(basename "$l")/dev")
      echo "$mm 0" > $BLKIO/blkio.throttle.write_bps_device 2>/dev/null
      echo "$mm 0" > $BLKIO/blkio.throttle.read_bps_device 2>/dev/null
      losetup -d "$l" 2>/dev/null
    fi
  done
  for r in "${RULES[@]}"; do rm -f "$r"; done
  [ ${#RULES[@]} -gt 0 ] && udevadm control --reload 2>/dev/null
  [ "$UDEVD_STARTED" = 1 ] && udevadm control --exit 2>/dev/null
  if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
