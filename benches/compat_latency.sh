#!/usr/bin/env bash
# Compatibility-mode latency: a new small file, from close to present in a stock rsyncd
# module with its parent's time restored, through `ferry send` with an rsync target. Prints p50/p90 over N files.
# Usage: benches/compat_latency.sh [FERRY_BINARY] [N]   (needs rsync; 127.0.0.1 only)
set -euo pipefail
ferry=${1:-target/release/ferry}
n=${2:-30}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$dir"' EXIT
mkdir -p "$dir/src/sub" "$dir/dst" "$dir/send"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'rsync:pw\n' > "$dir/secrets"; chmod 600 "$dir/secrets"
printf 'pw\n' > "$dir/pass"; chmod 600 "$dir/pass"
cat > "$dir/rsyncd.conf" <<CONF
use chroot = no
munge symlinks = no
pid file =
uid = root
gid = root
[file]
path = $dir/dst
read only = no
auth users = rsync
secrets file = $dir/secrets
CONF
rsync --daemon --no-detach --config="$dir/rsyncd.conf" --port="$port" --address=127.0.0.1 &
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
name = "file"
source = "$dir/src"
targets = ["old"]
module = "file"
CONF
FERRY_LOG=debug "$ferry" send --config "$dir/send/sender.toml" 2>"$dir/log" &
until grep -q reconciled "$dir/log"; do sleep 0.05; done
python3 - "$dir" "$n" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
lat = []
for i in range(n):
    p = f"{d}/src/sub/f{i}"
    t = time.monotonic()
    with open(p, "w") as f:
        f.write("x" * 100)
    while not os.path.exists(f"{d}/dst/sub/f{i}"):
        time.sleep(0.001)
    lat.append((time.monotonic() - t) * 1e3)
    time.sleep(0.4)
# A batch is done when its last rsync run is (the parent directory's time included).
batches = []
for line in open(f"{d}/log"):
    if "synced (rsync --files-from)" in line and "elapsed_ms=" in line:
        batches.append(int(line.split("elapsed_ms=")[1].split()[0]))
lat.sort(); batches.sort()
q = lambda v, p: v[min(len(v) - 1, int(len(v) * p))]
print(f"compat mode, new small file: in the module after p50 {q(lat, .5):.0f} ms, "
      f"p90 {q(lat, .9):.0f} ms; whole batch (rsync runs) p50 {q(batches, .5)} ms, "
      f"p90 {q(batches, .9)} ms  (n={n}, {len(batches)} batches)")
PY
