#!/usr/bin/env bash
# A tree of ~1,000,000 empty files (DIRS directories of PER files) pushed with `send --once`
# beside `rsync -a` into a stock rsyncd, both on 127.0.0.1: the initial copy, nothing changed,
# and ten files changed, each from a fresh process. Prints the time and the peak resident
# memory of the ferry sender (`send --once`), of the ferry receiver during that run (its peak
# reset before each), and of the rsync client (`-a`; one no-change run also with `-aHAX`,
# which compares what ferry compares by default).
# Usage: benches/scale.sh [FERRY_BINARY] [DIRS] [PER]   (needs rsync and GNU time; root;
# DIR=/some/where puts the trees there, default the system temp dir; ROWS=copy stops after
# the initial copy, for a tree too large to time every row)
set -euo pipefail
. "$(dirname "$0")/common.sh"
ferry=$(realpath "${1:-target/release/ferry}")
dirs=${2:-1000}
per=${3:-1000}
w=$(mktemp -d -p "${DIR:-${TMPDIR:-/tmp}}")
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$w"' EXIT
mkdir -p "$w"/{src,dst,rdst,send,recv}
python3 - "$w/src" "$dirs" "$per" <<'PY'
import os, sys
root, dirs, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for d in range(dirs):
    p = os.path.join(root, f"d{d}")
    os.mkdir(p)
    for f in range(per):
        open(os.path.join(p, f"f{f}"), "wb").close()
PY
echo "source entries: $(find "$w/src" | wc -l)"
fport=$(free_port); rport=$(free_port)
sfp=$("$ferry" keygen "$w/send"); rfp=$("$ferry" keygen "$w/recv")
receiver_toml "$w/recv/receiver.toml" "$fport" "$w/dst" "$sfp"
sender_toml "$w/send/sender.toml" "$fport" "$rfp" "$w/src"
printf 'use chroot = no\npid file =\nuid = root\ngid = root\n[m]\npath = %s\nread only = false\n' \
    "$w/rdst" > "$w/rsyncd.conf"
FERRY_LOG=warn "$ferry" receive --config "$w/recv/receiver.toml" &
recv=$!
rsync --daemon --no-detach --address=127.0.0.1 --port="$rport" --config="$w/rsyncd.conf" &
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$fport") 2>/dev/null && break
    sleep 0.1
done

# One run of each tool: "label: ferry T s (sender M MB, receiver M MB), rsync T s (client M MB)".
round() {
    local label=$1
    echo 5 > /proc/$recv/clear_refs
    local t0 t1 t2
    t0=$(date +%s.%N)
    FERRY_LOG=warn /usr/bin/time -f %M -o "$w/fm" "$ferry" send --once --config "$w/send/sender.toml" >/dev/null
    t1=$(date +%s.%N)
    /usr/bin/time -f %M -o "$w/rm" rsync -a --delete "$w/src/" "rsync://127.0.0.1:$rport/m/"
    t2=$(date +%s.%N)
    local rhwm
    rhwm=$(awk '/VmHWM/ {print $2}' /proc/$recv/status)
    local tf tr
    tf=$(echo "$t1 - $t0" | bc); tr=$(echo "$t2 - $t1" | bc)
    printf '%s: ferry %.2f s (sender %d MB, receiver %d MB); rsync %.2f s (client %d MB); ratio %.2f\n' \
        "$label" "$tf" $(($(tail -1 "$w/fm") / 1024)) $((rhwm / 1024)) "$tr" \
        $(($(tail -1 "$w/rm") / 1024)) "$(echo "$tf / $tr" | bc -l)"
}
sync
round "initial copy"
[ "${ROWS:-all}" = copy ] && exit 0
sync
# The first compare after the copy reads the whole module on the receiver (every directory
# changed); the second takes the receiver's kept summary (see ARCHITECTURE.md).
round "nothing changed, receiver reads all"
round "nothing changed, summary kept"
# rsync comparing what ferry compares by default (hard links, ACLs, attributes).
t0=$(date +%s.%N)
rsync -aHAX --delete "$w/src/" "rsync://127.0.0.1:$rport/m/"
printf 'nothing changed, rsync -aHAX: %.2f s\n' "$(echo "$(date +%s.%N) - $t0" | bc)"
for i in $(seq 0 9); do echo "changed $i" > "$w/src/d$((i * 97 % dirs))/f$((i * 31 % per))"; done
round "ten files changed"
"$ferry" verify "$w/src" "$w/dst" >/dev/null && echo "ferry's copy verified equal"
