#!/usr/bin/env bash
# One change in a big file, on the disk it runs on: SIZE MiB written once, then ROUNDS times
# 1 MiB of it changed at a new place and sent again, by each ferry binary given (alternately,
# taking turns to go first, each run after a sync, so the disk's drift and writeback fall on
# all alike) and by `rsync -a -I` (one file: always its delta
# algorithm, as a changed mtime would) into a stock rsyncd on 127.0.0.1.
# Prints each round's seconds, the medians, the ratios to rsync, what the module's filesystem
# grew by per change (with history on, which keeps every old version: on a filesystem that
# clones, only the changed extents), and the disk's own dd + fdatasync rate.
# Usage: FERRY_BENCH_DIR=/mnt/xfs benches/delta_change.sh FERRY [FERRY_OTHER] [SIZE] [ROUNDS]
set -euo pipefail
ferries=("$(realpath "${1:-target/release/ferry}")")
if [[ ${2:-} && ! ${2:-} =~ ^[0-9]+$ ]]; then ferries+=("$(realpath "$2")"); shift; fi
size=${2:-256}
rounds=${3:-5}
w=$(mktemp -d "${FERRY_BENCH_DIR:-${TMPDIR:-/tmp}}/delta-change.XXXXXX")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$w"' EXIT
mkdir -p "$w/src" "$w/keys"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
used() { df -B1 --output=used "$w" | tail -1; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
sfp=$("${ferries[0]}" keygen "$w/keys/send")
rfp=$("${ferries[0]}" keygen "$w/keys/recv")
head -c "${size}M" /dev/urandom > "$w/src/big"

# A receiver per binary (module with history), and an rsyncd.
for i in "${!ferries[@]}"; do
    port=$(free_port)
    mkdir -p "$w/m$i" "$w/h$i"
    cat > "$w/recv$i.toml" <<T
listen = "127.0.0.1:$port"
cert = "$w/keys/recv/cert.pem"
key = "$w/keys/recv/key.pem"
[modules.m]
path = "$w/m$i"
clients = ["$sfp"]
read_only = false
history = "$w/h$i"
T
    cat > "$w/send$i.toml" <<T
cert = "$w/keys/send/cert.pem"
key = "$w/keys/send/key.pem"
status_socket = "$w/s$i.sock"
[targets.t]
address = "127.0.0.1:$port"
fingerprint = "$rfp"
[[sync]]
source = "$w/src"
targets = ["t"]
module = "m"
T
    FERRY_LOG=warn "${ferries[$i]}" receive --config "$w/recv$i.toml" 2>>"$w/recv$i.log" &
    pids+=($!)
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.1; done
done
rport=$(free_port)
mkdir -p "$w/r"
cat > "$w/rsyncd.conf" <<T
port = $rport
address = 127.0.0.1
use chroot = no
[m]
path = $w/r
read only = no
uid = root
gid = root
T
rsync --daemon --no-detach --config="$w/rsyncd.conf" &
pids+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$rport") 2>/dev/null; do sleep 0.1; done

timed() { local t; t=$(date +%s.%N); "$@" >/dev/null 2>>"$w/errors"; echo "$(date +%s.%N) - $t" | bc; }
ferry_once() { FERRY_LOG=warn "${ferries[$1]}" send --once --config "$w/send$1.toml"; }

for i in "${!ferries[@]}"; do ferry_once "$i" >/dev/null; done
rsync -a "$w/src/" "rsync://127.0.0.1:$rport/m/"
sync
declare -A took grew
for r in $(seq 1 "$rounds"); do
    # 1 MiB at a new place each round.
    dd if=/dev/urandom of="$w/src/big" bs=1M count=1 seek=$(( (r * 37) % (size - 1) )) conv=notrunc status=none
    # The binaries take turns going first; each run starts after a sync, so none pays for
    # the writeback of what the run before it left in the page cache.
    order=("${!ferries[@]}")
    if (( r % 2 == 0 )); then mapfile -t order < <(printf '%s\n' "${order[@]}" | tac); fi
    for i in "${order[@]}"; do
        sync
        before=$(used)
        took[$i]+="$(timed ferry_once "$i") "
        grew[$i]+="$(( $(used) - before )) "
    done
    sync
    took[rsync]+="$(timed rsync -a -I "$w/src/" "rsync://127.0.0.1:$rport/m/") "
done
for i in "${!ferries[@]}"; do cmp "$w/src/big" "$w/m$i/big" || { echo "ferry ${ferries[$i]}: the copy differs"; exit 1; }; done
cmp "$w/src/big" "$w/r/big"
ref=$(tr ' ' '\n' <<<"${took[rsync]}" | grep . | median)
echo "$size MiB file, 1 MiB changed, $rounds rounds, on $(df --output=fstype "$w" | tail -1) ($w)"
printf '%-44s %s  median %.3f s\n' "rsync -a -I (rsyncd)" "${took[rsync]}" "$ref"
for i in "${!ferries[@]}"; do
    m=$(tr ' ' '\n' <<<"${took[$i]}" | grep . | median)
    g=$(tr ' ' '\n' <<<"${grew[$i]}" | grep . | median)
    printf '%-44s %s  median %.3f s  %.2fx rsync  fs grew %.1f MiB per change\n' \
        "${ferries[$i]}" "${took[$i]}" "$m" "$(echo "$m / $ref" | bc -l)" "$(echo "$g / 1048576" | bc -l)"
done
t=$(date +%s.%N)
dd if=/dev/zero of="$w/dd" bs=1M count="$size" conv=fdatasync status=none
printf 'disk: dd + fdatasync of %d MiB: %.0f MiB/s\n' "$size" "$(echo "$size / ($(date +%s.%N) - $t)" | bc -l)"
