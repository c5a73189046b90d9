#!/usr/bin/env bash
# benchmarks/clients.sh — `status` latency while hostile clients flood the control socket
# (issue 13, point 3: "status from another client answers in under 100 ms throughout").
#
# A station of 3 slots. A flood process, run as `nobody` in the socket's group (a reader, as
# an untrusted member of the provision group would be), opens 200 connections that each send
# 4,000 `status` requests and never read, then 1,100 idle connections (the daemon admits what
# its descriptor budget allows and refuses the rest with a reason). Three cards (loop devices
# throttled to 20 MB/s, an SD card's speed) arrive while every connection is taken, and are
# written. Throughout, a probe opens a fresh
# root connection every 50 ms (connect → hello → status → reply) and times it.
# Printed: the probe's p50/p90/p99/max, the same for a quiet daemon measured first in the same
# run, the daemon's peak descriptors and memory, and the cards' outcome.
# Target: max < 100 ms with the release build.
#
#   benchmarks/clients.sh [--debug] [--keep]
#   BIN=DIR benchmarks/clients.sh     # use provisiond/provision from DIR, build nothing
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=release; BUILD=""; KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) CONFIG=debug ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "benchmarks/clients.sh needs root (loop devices, udev rules, setpriv)" >&2; exit 77; }
command -v python3 >/dev/null || { echo "benchmarks/clients.sh needs python3 (apt-get install python3)" >&2; exit 69; }

if [ -z "${BIN:-}" ]; then
  echo ">>> building provisiond and provision ($CONFIG)"
  if [ "$CONFIG" = release ]; then
    make -s release >/dev/null
    BIN=$(swift build -c release --static-swift-stdlib --show-bin-path)
  else
    swift build -c "$CONFIG" --product provisiond >/dev/null
    swift build -c "$CONFIG" --product provision >/dev/null
    BIN=$(swift build -c "$CONFIG" --show-bin-path)
  fi
  BUILD="$CONFIG build"
fi
BUILD=${BUILD:-binaries from $BIN}
PROVISIOND=$BIN/provisiond; PROVISION=$BIN/provision
[ -x "$PROVISIOND" ] && [ -x "$PROVISION" ] || { echo "no provisiond/provision in $BIN" >&2; exit 66; }

SLOTS=3; IMAGE_MB=8; CARD_MB=32; PIPELINERS=${PIPELINERS:-200}; IDLE=${IDLE:-1100}; BURST=4000; CARD_BPS=20000000
BLKIO=/sys/fs/cgroup/blkio
[ -w $BLKIO/blkio.throttle.write_bps_device ] || { echo "no blkio v1 cgroup at $BLKIO: cannot throttle the cards" >&2; exit 77; }
WORK=$(mktemp -d /var/tmp/provision-clients-bench.XXXXXX)
chmod 755 "$WORK"
SOCK=$WORK/control.sock; LOG=$WORK/provisiond.log
TOKEN=${WORK##*.}
LOOPS=(); RULES=(); DAEMON=""; FLOOD=""; PROBE=""; UDEVD_STARTED=0

# shellcheck source=lib/station.sh
. benchmarks/lib/station.sh
cleanup() {
  set +e
  for p in "$PROBE" "$FLOOD"; do [ -n "$p" ] && kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  end_station
}
trap cleanup EXIT
trap 'exit 130' INT TERM

begin_station
head -c $((IMAGE_MB << 20)) /dev/urandom > "$WORK/image.img"
{
  cat <<TOML
[station]
name = "clients-$TOKEN"
allow_loop_devices = true
ledger = "$WORK/ledger.sqlite"
admin_group = "provision-admin"
max_clients = 5000
idle_client_timeout = 3600   # the idle flood stays for the whole run (the worst case), not closed after 60 s

[profiles.bench]
image = "$WORK/image.img"
verify = true
TOML
  for i in $(seq $SLOTS); do
    printf '\n[[slots]]\nname = "F%d"\nmatch = "loop:*/provision-card-F%d-%s-*"\nprofile = "bench"\n' "$i" "$i" "$TOKEN"
  done
} > "$WORK/station.toml"
"$PROVISION" config check "$WORK/station.toml" >/dev/null

# As systemd starts it: 1,024 descriptors, so the daemon's own clamp decides the cap.
prlimit --nofile=1024:1024 "$PROVISIOND" --config "$WORK/station.toml" --socket "$SOCK" >>"$LOG" 2>&1 &
DAEMON=$!
for _ in $(seq 200); do "$PROVISION" status --socket "$SOCK" >/dev/null 2>&1 && break; sleep 0.05; done
"$PROVISION" status --socket "$SOCK" >/dev/null || { echo "provisiond does not answer; log:" >&2; cat "$LOG" >&2; exit 1; }

cat > "$WORK/probe.py" <<'PY'
# Every 50 ms: a fresh connection, hello, status, reply; latency from connect to reply.
import json, os, signal, socket, sys, time
path, out, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
stop = False
def on_term(*_):
    global stop; stop = True
signal.signal(signal.SIGTERM, on_term)
def line(s, buf):
    while b"\n" not in buf:
        chunk = s.recv(1 << 16)
        if not chunk: raise RuntimeError("closed")
        buf += chunk
    return buf.split(b"\n", 1)
lat, worst, failures, fds, rss = [], [], 0, 0, 0
i = 0
while not stop:
    i += 1
    t0 = time.perf_counter()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(10); s.connect(path)
        hello, buf = line(s, b"")
        assert b'"hello"' in hello, hello[:200]
        s.sendall(b'{"id":%d,"method":"status"}\n' % i)
        reply, buf = line(s, buf)
        assert json.loads(reply).get("ok"), reply[:200]
        s.close()
        lat.append((time.perf_counter() - t0) * 1000)
        worst.append((lat[-1], time.time() - (time.perf_counter() - t0)))
    except Exception as e:
        failures += 1
    try:
        fds = max(fds, len(os.listdir("/proc/%d/fd" % pid)))
        rss = max(rss, int([l for l in open("/proc/%d/status" % pid) if l.startswith("VmRSS:")][0].split()[1]))
    except OSError:
        pass
    left = 0.05 - (time.perf_counter() - t0)
    if left > 0: time.sleep(left)
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))] if lat else float("nan")
json.dump({"n": len(lat), "failures": failures, "p50": pct(50), "p90": pct(90), "p99": pct(99),
           "max": lat[-1] if lat else float("nan"), "fds": fds, "rssKiB": rss,
           "worst": sorted(worst, reverse=True)[:5]}, open(out, "w"))
PY

cat > "$WORK/flood.py" <<'PY'
import json, socket, sys
path, pipeliners, idle, burst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
requests = b"".join(b'{"id":%d,"method":"status"}\n' % i for i in range(burst))
held, admitted, refused = [], 0, 0
for _ in range(pipeliners):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path); s.setblocking(False)
    try: s.send(requests)
    except OSError: pass
    held.append(s)
for _ in range(idle):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(60); s.connect(path)
    data = b""
    while b"\n" not in data:
        chunk = s.recv(65536)
        if not chunk: break
        data += chunk
    if b'"hello"' in data: admitted += 1; held.append(s)
    else: refused += 1; s.close()
print(json.dumps({"admitted": admitted, "refused": refused}), flush=True)
sys.stdin.read()
PY

probe() {  # probe OUT — runs until SIGTERM
  python3 "$WORK/probe.py" "$SOCK" "$1" "$DAEMON" & PROBE=$!
}
stop_probe() { kill -TERM "$PROBE"; wait "$PROBE" || true; PROBE=""; }
show() {  # show LABEL FILE
  python3 - "$@" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
print("%-26s %5d samples  p50 %7.1f ms  p90 %7.1f ms  p99 %7.1f ms  max %7.1f ms  failures %d  daemon peak %d fds, %d MiB"
      % (sys.argv[1], r["n"], r["p50"], r["p90"], r["p99"], r["max"], r["failures"], r["fds"], r["rssKiB"] // 1024))
if len(sys.argv) > 3:
    marks = [l.split(" ", 1) for l in open(sys.argv[3]).read().splitlines()]
    def when(t):
        last = max((m for m in marks if float(m[0]) <= t), key=lambda m: float(m[0]), default=None)
        return "%.1f s after %s" % (t - float(last[0]), last[1]) if last else "before the flood"
    print("  slowest: " + "; ".join("%.0f ms %s" % (ms, when(t)) for ms, t in r["worst"]))
PY
}

echo ">>> quiet daemon: 10 s of probes"
probe "$WORK/quiet.json"; sleep 10; stop_probe

echo ">>> flood: $PIPELINERS pipelining clients ($BURST requests each, never read) and $IDLE idle ones; then $SLOTS cards"
mark() { echo "$(date +%s.%N) $*" >> "$WORK/marks"; }
probe "$WORK/flood.json"
sleep 1
mark "the flood started"
mkfifo "$WORK/flood.in"
setpriv --reuid=nobody --regid=nogroup --groups="$(getent group provision | cut -d: -f3)" \
  /usr/bin/python3 "$WORK/flood.py" "$SOCK" $PIPELINERS $IDLE $BURST < "$WORK/flood.in" > "$WORK/flood.ready" &
FLOOD=$!
exec 9>"$WORK/flood.in"
for _ in $(seq 1800); do [ -s "$WORK/flood.ready" ] && break; sleep 0.1; done
[ -s "$WORK/flood.ready" ] || { echo "the flood did not get its connections within 180 s" >&2; exit 1; }
mark "every flood connection was open"
for i in $(seq $SLOTS); do
  f=$WORK/provision-card-F$i-$TOKEN-x.img
  truncate -s ${CARD_MB}M "$f"
  l=$(losetup --find --show --direct-io=on "$f"); LOOPS+=("$l")
  # SD-card speed, as at a bench: a card's job waits on its card, it does not spin the CPU.
  mm=$(cat "/sys/block/$(basename "$l")/dev")
  echo "$mm $CARD_BPS" > $BLKIO/blkio.throttle.write_bps_device
  echo "$mm $CARD_BPS" > $BLKIO/blkio.throttle.read_bps_device
done
mark "the cards arrived"
for _ in $(seq 1800); do
  final=$("$PROVISION" status --socket "$SOCK" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(sum(1 for x in s["slots"] if x.get("job") and x["job"]["state"] in ("done","failed","cancelled")))')
  [ "$final" = $SLOTS ] && break; sleep 0.1
done
mark "the cards were done"
sleep 1
stop_probe
exec 9>&-; wait "$FLOOD" || true; FLOOD=""
states=$("$PROVISION" status --socket "$SOCK" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(" ".join("%s=%s" % (x["name"], x["job"]["state"] if x.get("job") else "none") for x in s["slots"]))')
dropped=$(grep -c "does not read its replies" "$LOG" || true)

echo
echo "provision clients benchmark — $BUILD, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')"
show "quiet daemon" "$WORK/quiet.json"
show "under the flood" "$WORK/flood.json" "$WORK/marks"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("flood: %d idle admitted, %d refused with a reason; %s pipelining clients dropped for not reading" % (r["admitted"], r["refused"], sys.argv[2]))' "$WORK/flood.ready" "$dropped"
echo "cards: $states"
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("target max < 100 ms: %s (%.1f ms)" % ("met" if r["max"] < 100 and r["failures"] == 0 else "MISSED", r["max"]))' "$WORK/flood.json"
