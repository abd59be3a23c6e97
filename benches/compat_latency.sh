#!/usr/bin/env bash
# Compatibility-mode latency: a new small file, from close to present in a stock rsyncd
# module, through `ferry send` with an rsync target, beside lsyncd (`default.rsync`,
# `delay = 0`) into another module of the same rsyncd, in the same run. Prints p50/p90 over
# N files for each, and the ratio.
# Usage: benches/compat_latency.sh [FERRY_BINARY] [N]   (needs rsync and lsyncd; 127.0.0.1 only)
set -euo pipefail
ferry=${1:-target/release/ferry}
n=${2:-30}
command -v lsyncd >/dev/null || { echo "lsyncd is not installed (apt-get install lsyncd)" >&2; exit 2; }
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
mkdir -p "$dir"/{ferry,lsyncd}/{src/sub,dst} "$dir/send"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'rsync:pw\n' > "$dir/secrets"; chmod 600 "$dir/secrets"
printf 'pw\n' > "$dir/pass"; chmod 600 "$dir/pass"
cat > "$dir/rsyncd.conf" <<CONF
use chroot = no
munge symlinks = no
pid file =
uid = root
gid = root
read only = no
auth users = rsync
secrets file = $dir/secrets
[ferry]
path = $dir/ferry/dst
[lsyncd]
path = $dir/lsyncd/dst
CONF
rsync --daemon --no-detach --config="$dir/rsyncd.conf" --port="$port" --address=127.0.0.1 &
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.05; done

# Seconds from each new file's close until it is in $1/dst; prints them, one per line.
probe() {
    python3 - "$1" "$n" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    p = f"{d}/src/sub/f{i}"
    t = time.monotonic()
    with open(p, "w") as f:
        f.write("x" * 100)
    while not os.path.exists(f"{d}/dst/sub/f{i}"):
        time.sleep(0.0005)
    print((time.monotonic() - t) * 1e3)
    time.sleep(0.4)
PY
}

"$ferry" keygen "$dir/send" >/dev/null
cat > "$dir/send/sender.toml" <<CONF
cert = "cert.pem"
key = "key.pem"
[targets.old]
kind = "rsync"
address = "127.0.0.1:$port"
user = "rsync"
password_file = "$dir/pass"
[[sync]]
name = "ferry"
source = "$dir/ferry/src"
targets = ["old"]
module = "ferry"
CONF
FERRY_LOG=debug "$ferry" send --config "$dir/send/sender.toml" 2>"$dir/log" &
sender=$!
until grep -q reconciled "$dir/log"; do sleep 0.05; done
probe "$dir/ferry" > "$dir/ferry.ms"
kill "$sender"; wait "$sender" 2>/dev/null || true

cat > "$dir/lsyncd.lua" <<CONF
settings { nodaemon = true, insist = true }
sync { default.rsync, source = "$dir/lsyncd/src", delay = 0,
       target = "rsync://rsync@127.0.0.1:$port/lsyncd/",
       rsync = { archive = true, password_file = "$dir/pass" } }
CONF
lsyncd "$dir/lsyncd.lua" > "$dir/lsyncd.log" 2>&1 &
lsync=$!
until grep -q "Startup of .* finished" "$dir/lsyncd.log"; do sleep 0.05; done
probe "$dir/lsyncd" > "$dir/lsyncd.ms"
kill "$lsync"; wait "$lsync" 2>/dev/null || true

python3 - "$dir" "$n" <<'PY'
import sys
d, n = sys.argv[1], int(sys.argv[2])
q = lambda v, p: v[min(len(v) - 1, int(len(v) * p))]
# A ferry batch is done when its rsync run is (the parent directory's time included).
batches = sorted(int(l.split("elapsed_ms=")[1].split()[0]) for l in open(f"{d}/log")
                 if "synced (rsync --files-from)" in l and "elapsed_ms=" in l)
p50 = {}
for who in ("ferry", "lsyncd"):
    lat = sorted(float(l) for l in open(f"{d}/{who}.ms"))
    p50[who] = q(lat, .5)
    print(f"{who:6}: new small file in the rsyncd module after p50 {q(lat, .5):6.1f} ms, "
          f"p90 {q(lat, .9):6.1f} ms (n={n})")
print(f"ferry's whole batch (its rsync run) p50 {q(batches, .5)} ms, p90 {q(batches, .9)} ms "
      f"({len(batches)} batches)")
print(f"ferry/lsyncd p50: {p50['ferry'] / p50['lsyncd']:.2f}x")
PY
