#!/usr/bin/env bash
# One file restored as it was at a moment from a module of ~1,000,000 entries, beside rsync
# pulling the same file from a stock rsyncd serving the same directory. The module is built
# directly on disk (1,000 directories of 999 files), so building it is the long part.
# Usage: benches/restore_one.sh [FERRY_BINARY] [DIRS]   (needs rsync; 127.0.0.1 only)
set -euo pipefail
. "$(dirname "$0")/common.sh"
ferry=${1:-target/release/ferry}
dirs=${2:-1000}
w=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$w"' EXIT
mkdir -p "$w"/{src/d7,dst,send,recv,out-r}
python3 - "$w/dst" "$dirs" <<'PY'
import os, sys
root, dirs = sys.argv[1], int(sys.argv[2])
for d in range(dirs):
    p = os.path.join(root, f"d{d}")
    os.mkdir(p)
    for f in range(999):
        with open(os.path.join(p, f"f{f}"), "wb") as fh:
            fh.write(b"x")
PY
echo "module entries: $(find "$w/dst" | wc -l)"
fport=$(free_port); rport=$(free_port)
sfp=$("$ferry" keygen "$w/send"); rfp=$("$ferry" keygen "$w/recv")
receiver_toml "$w/recv/receiver.toml" "$fport" "$w/dst" "$sfp" "history = \"$w/history\""
sender_toml "$w/send/sender.toml" "$fport" "$rfp" "$w/src" "delete = false" \
    'status_socket = "status.sock"'
printf 'use chroot = no\npid file =\nuid = root\ngid = root\n[m]\npath = %s\nread only = true\n' "$w/dst" > "$w/rsyncd.conf"
FERRY_LOG=warn "$ferry" receive --config "$w/recv/receiver.toml" &
rsync --daemon --no-detach --address=127.0.0.1 --port="$rport" --config="$w/rsyncd.conf" &
sleep 2
# d7/f7 changes twice; the moment between the changes is restored.
echo "second" > "$w/src/d7/f7"
FERRY_LOG=warn "$ferry" send --once --config "$w/send/sender.toml" >/dev/null
sleep 1; mid=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ); sleep 1
echo "third" > "$w/src/d7/f7"
FERRY_LOG=warn "$ferry" send --once --config "$w/send/sender.toml" >/dev/null
sync
for i in 1 2 3; do
    rm -rf "$w/out-f" "$w/out-r"/*
    t0=$(date +%s.%N)
    FERRY_LOG=warn "$ferry" restore --config "$w/send/sender.toml" --group m --at "$mid" \
        --path d7/f7 "$w/out-f" >/dev/null
    t1=$(date +%s.%N)
    rsync -a "rsync://127.0.0.1:$rport/m/d7/f7" "$w/out-r/"
    t2=$(date +%s.%N)
    got=$(cat "$w/out-f/d7/f7")
    [[ $got == second ]] || { echo "restored the wrong version: $got"; exit 1; }
    printf 'round %d: ferry restore --at --path d7/f7 %.3f s; rsync pull of d7/f7 %.3f s\n' \
        "$i" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)"
done
