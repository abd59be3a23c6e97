#!/usr/bin/env bash
# What history costs: the same `send --once` into a module without history and into one with
# it, alternately, on the same disk in one run (these disks drift between runs: read the
# ratios). Workloads: the initial sync of FILES small files in 100-file directories, then
# every file rewritten (same size, new bytes: with history every old version is kept), then
# every file deleted (with history the directories move into it whole), then a live burst of
# BURST new 1 KiB files under a running `ferry send`, until the module has them all.
# Usage: benches/history_cost.sh [FERRY_BINARY] [FILES] [ROUNDS] [BURST]   (127.0.0.1 only)
# The work directory is made under $FERRY_BENCH_DIR (default: the system temp dir).
set -euo pipefail
. "$(dirname "$0")/common.sh"
ferry=$(realpath "${1:-target/release/ferry}")
files=${2:-20000}
rounds=${3:-3}
burst=${4:-50000}
w=$(mktemp -d "${FERRY_BENCH_DIR:-${TMPDIR:-/tmp}}/history-cost.XXXXXX")
recv=
trap '[[ -n $recv ]] && kill $recv 2>/dev/null; rm -rf "$w"' EXIT
mkdir -p "$w"/{src,send,recv}
port=$(free_port)
sfp=$("$ferry" keygen "$w/send"); rfp=$("$ferry" keygen "$w/recv")

# Fills src with $files files of 4 KiB (seeded by $1) in directories of 100.
fill() {
    python3 - "$w/src" "$files" "$1" <<'PY'
import os, random, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for i in range(n):
    d = os.path.join(root, f"d{i // 100}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "wb") as fh:
        fh.write(rng.randbytes(4096))
PY
}

# Starts a receiver whose one module m is at $w/m, with history at $w/h when $1 is "kept".
start() {
    rm -rf "$w/m" "$w/h"; mkdir -p "$w/m"
    local history=""
    if [[ $1 == kept ]]; then mkdir -p "$w/h"; history="history = \"$w/h\""; fi
    receiver_toml "$w/recv/receiver.toml" "$port" "$w/m" "$sfp" "$history"
    FERRY_LOG=warn "$ferry" receive --config "$w/recv/receiver.toml" 2>>"$w/recv.log" &
    recv=$!
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.1; done
}

# The receiver's CPU seconds (user + system) so far: steadier than wall time on a drifting disk.
cpu() {
    local hz; hz=$(getconf CLK_TCK)
    awk -v hz="$hz" '{ print ($14 + $15) / hz }' "/proc/$recv/stat"
}

stop() { kill "$recv"; wait "$recv" 2>/dev/null || true; recv=; }

# Seconds from the last of $burst new files closed under a running `ferry send` until the
# module holds them all.
live_burst() {
    FERRY_LOG=info "$ferry" send --config "$w/send/sender.toml" 2>"$w/send.log" &
    local sender=$!
    until grep -q reconciled "$w/send.log"; do sleep 0.1; done
    python3 - "$w/src" "$w/m" "$burst" <<'PY'
import os, sys, time
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    d = os.path.join(src, "burst", f"b{i // 100}")
    if i % 100 == 0:
        os.makedirs(d)
    with open(os.path.join(d, f"f{i}"), "wb") as fh:
        fh.write(b"x" * 1024)
written = time.monotonic()
deadline = written + 600
while True:
    have = 0
    try:
        for e in os.scandir(os.path.join(dst, "burst")):
            have += len(os.listdir(e.path))
    except FileNotFoundError:
        pass
    if have >= n:
        break
    assert time.monotonic() < deadline, f"{have} of {n} after 600 s"
    time.sleep(0.05)
print(f"{time.monotonic() - written:.2f}")
PY
    kill "$sender"; wait "$sender" 2>/dev/null || true
}

# Seconds one `send --once` takes.
once() {
    sync
    local t0 t1
    t0=$(date +%s.%N)
    FERRY_LOG=warn "$ferry" send --once --config "$w/send/sender.toml" >/dev/null
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}

sender_toml "$w/send/sender.toml" "$port" "$rfp" "$w/src" "delete_guard_percent = 0"

declare -A sum
for k in plain kept; do for s in initial rewrite delete burst cpu; do sum[$k.$s]=0; done; done
printf '%-6s %-6s %10s %10s %10s %10s %10s\n' round module initial rewrite delete burst \
    'recv cpu'
for r in $(seq 1 "$rounds"); do
    # Both orders: the second writer of a round can be slowed by the first.
    order="plain kept"; (( r % 2 == 0 )) && order="kept plain"
    for k in $order; do
        rm -rf "$w/src"; mkdir -p "$w/src"; fill 1
        start "$k"
        i=$(once)
        fill 2
        u=$(once)
        rm -rf "$w/src"/*
        d=$(once)
        b=$(live_burst)
        c=$(cpu)
        stop
        printf '%-6s %-6s %10.2f %10.2f %10.2f %10.2f %10.2f\n' "$r" "$k" "$i" "$u" "$d" "$b" "$c"
        sum[$k.initial]=$(echo "${sum[$k.initial]} + $i" | bc)
        sum[$k.rewrite]=$(echo "${sum[$k.rewrite]} + $u" | bc)
        sum[$k.delete]=$(echo "${sum[$k.delete]} + $d" | bc)
        sum[$k.burst]=$(echo "${sum[$k.burst]} + $b" | bc)
        sum[$k.cpu]=$(echo "${sum[$k.cpu]} + $c" | bc)
    done
done
for s in initial rewrite delete burst cpu; do
    printf '%-8s history %8.2f s, none %8.2f s: %.2fx\n' "$s" "${sum[kept.$s]}" \
        "${sum[plain.$s]}" "$(echo "${sum[kept.$s]} / ${sum[plain.$s]}" | bc -l)"
done
