#!/usr/bin/env bash
# Builds the .deb with cargo-deb from the binary the tests just built (only the contents are
# checked here; a release package is made as README says) and checks that it carries the
# binary, both units, the sysctl file, example configurations, man pages and completions.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug/ferry
[[ -x $bin ]] || { echo "check-deb: $bin missing; run the tests first" >&2; exit 1; }
rm -rf target/assets
"$bin" manual target/assets
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# cargo-deb warns that the dev profile is not for releases; that is the point here.
if ! cargo deb --no-build --profile dev --no-strip --locked -o "$work/ferry.deb" >"$work/log" 2>&1; then
    cat "$work/log" >&2
    exit 1
fi
list=$(dpkg-deb -c "$work/ferry.deb" | awk '{ print $NF }')
fail=0
for path in \
    ./usr/bin/ferry \
    ./usr/lib/systemd/system/ferry-receiver.service \
    ./usr/lib/systemd/system/ferry-sender.service \
    ./usr/lib/sysctl.d/90-ferry.conf \
    ./usr/share/doc/ferry/examples/receiver.toml \
    ./usr/share/doc/ferry/examples/sender.toml \
    ./usr/share/man/man1/ferry.1.gz \
    ./usr/share/man/man1/ferry-send.1.gz \
    ./usr/share/man/man1/ferry-receive.1.gz \
    ./usr/share/man/man1/ferry-status.1.gz \
    ./usr/share/man/man5/ferry-sender.toml.5.gz \
    ./usr/share/man/man5/ferry-receiver.toml.5.gz \
    ./usr/share/bash-completion/completions/ferry \
    ./usr/share/zsh/vendor-completions/_ferry \
    ./usr/share/fish/vendor_completions.d/ferry.fish; do
    grep -qxF "$path" <<<"$list" || { echo "check-deb: the package lacks $path" >&2; fail=1; }
done
# The maintainer scripts: nothing enabled or started at install, systemd reloaded, a running
# daemon restarted after an upgrade (try-restart: only if it runs), stopped on removal, the
# kernel limits applied; the example configurations are conffiles; a changelog.
dpkg-deb -e "$work/ferry.deb" "$work/control"
script() { cat "$work/control/$1" 2>/dev/null || true; }
need() { # FILE TEXT WHY
    grep -qF -- "$2" <<<"$(script "$1")" || { echo "check-deb: $1 lacks \`$2\` ($3)" >&2; fail=1; }
}
need postinst 'sysctl --quiet --system' 'kernel limits at install'
need postinst 'systemctl --system daemon-reload' 'systemd sees new units'
for unit in ferry-receiver.service ferry-sender.service; do
    need postinst "deb-systemd-invoke try-restart $unit" "a running $unit restarted after an upgrade"
    need prerm "deb-systemd-invoke stop $unit" "$unit stopped on removal"
done
# Enabling happens only where the operator had enabled it before (`was-enabled`).
enables=$(script postinst | grep -c 'deb-systemd-helper enable' || true)
kept=$(script postinst | grep -c 'deb-systemd-helper --quiet was-enabled' || true)
if script postinst | grep -qE 'deb-systemd-invoke (start|\$_dh_action)' || ((enables != kept)); then
    echo "check-deb: postinst starts or enables a unit at install" >&2
    fail=1
fi
for conf in /etc/ferry/receiver.toml /etc/ferry/sender.toml; do
    need conffiles "$conf" 'dpkg keeps the operator edits'
done
grep -qxF ./usr/share/doc/ferry/changelog.Debian.gz <<<"$list" ||
    { echo "check-deb: the package lacks its changelog" >&2; fail=1; }
# What is inside works and is what deploy/ holds.
dpkg-deb -x "$work/ferry.deb" "$work/root"
"$work/root/usr/bin/ferry" --version >/dev/null
for unit in ferry-receiver.service ferry-sender.service; do
    cmp -s "deploy/$unit" "$work/root/usr/lib/systemd/system/$unit" ||
        { echo "check-deb: $unit differs from deploy/$unit" >&2; fail=1; }
done
grep -qF 'json' <(zcat "$work/root/usr/share/man/man1/ferry-status.1.gz") ||
    { echo "check-deb: ferry-status(1) does not document --json" >&2; fail=1; }
# The configuration reference: every key (its test holds the page to the parser).
for key in delete_guard_min rsync_args watcher; do
    grep -qF "\\fB$key\\fR = " <(zcat "$work/root/usr/share/man/man5/ferry-sender.toml.5.gz") ||
        { echo "check-deb: ferry-sender.toml(5) lacks $key" >&2; fail=1; }
done
for key in restore_clients history_floor listen; do
    grep -qF "\\fB$key\\fR = " <(zcat "$work/root/usr/share/man/man5/ferry-receiver.toml.5.gz") ||
        { echo "check-deb: ferry-receiver.toml(5) lacks $key" >&2; fail=1; }
done
((fail == 0)) && echo "check-deb: $(grep -c . <<<"$list") entries, all expected files present"
exit "$fail"
