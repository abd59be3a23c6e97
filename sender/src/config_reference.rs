//! `ferry-sender.toml(5)`: every key of `sender.toml`, held to the parser by the tests in
//! `config.rs`.

use ferry_protocol::config_reference::{key, At, Default, Example, Reference, Table};

/// The reference of `sender.toml`.
pub fn reference() -> Reference {
    Reference {
        name: "ferry-sender.toml",
        summary: "configuration of the ferry sender (ferry send)",
        file: "/etc/ferry/sender.toml",
        description: &[
            "The sender watches source directories and keeps each equal to a module on one or \
             more targets: ferry receivers over mutual TLS, or stock rsyncd modules through the \
             rsync client (compatibility mode). The file is TOML. Unknown keys are errors, named \
             with their file and line; `ferry check-config FILE` checks a file without starting \
             anything. Relative paths resolve against the file's own directory. SIGHUP (`systemctl \
             reload ferry-sender`) reads the file again; a file that does not parse leaves the \
             running configuration as it was and says why.",
        ],
        tables: vec![
            Table {
                at: At::Root,
                text: "The sender's identity and its own services.",
                keys: vec![
                    key("cert", "path", Default::Required, r#""cert.pem""#,
                        "The sender's certificate (PEM), which receivers pin by its fingerprint in \
                         their modules' `clients`. `ferry keygen DIR` makes a pair; `ferry \
                         fingerprint FILE` prints the fingerprint."),
                    key("key", "path", Default::Required, r#""key.pem""#,
                        "The private key of `cert` (PEM). Keep it mode 0600."),
                    key("state_dir", "path", Default::Absent("none: digests are not kept across \
                         restarts and the guard cannot notice a different disk at a source"),
                        r#""/var/lib/ferry""#,
                        "Where the sender keeps what outlives a restart: content digests, and the \
                         filesystem each source was on (a different disk mounted at a source then \
                         holds deletions). Made mode 0700 at start if missing; its parent must \
                         exist."),
                    key("status_socket", "path", Default::Value(r#""/run/ferry/sender.sock""#),
                        r#""/run/ferry/sender.sock""#,
                        "The local socket `ferry status` and `ferry confirm-deletes` ask. If it \
                         cannot be made, the daemon runs on and says why, once."),
                    key("metrics_listen", "\"HOST:PORT\"", Default::Absent("off"),
                        r#""127.0.0.1:9813""#,
                        "Serve Prometheus metrics over plain HTTP at this address. A bad or busy \
                         address stops the start."),
                    key("watcher", "\"auto\" | \"fanotify\" | \"inotify\"", Default::Value(r#""auto""#),
                        r#""inotify""#,
                        "Which kernel interface watches the sources. `auto`: fanotify when this \
                         process may use it (root, a kernel with FAN_REPORT_DFID_NAME), else \
                         inotify; `fanotify`: refuse to start without it."),
                ],
            },
            Table {
                at: At::Map("targets"),
                text: "A receiver to push to, named by the table's NAME (which `[[sync]]` groups \
                       list in `targets`). A ferry receiver by default; `kind = \"rsync\"` makes it \
                       a stock rsyncd module (or rsync over ssh), driven through the rsync client.",
                keys: vec![
                    key("kind", "\"ferry\" | \"rsync\"", Default::Value(r#""ferry""#), r#""rsync""#,
                        "What runs there: `ferry receive`, or an rsyncd (compatibility mode). The \
                         keys from `user` on are for rsync targets only; a ferry target refuses \
                         them."),
                    key("address", "\"HOST:PORT\" or a list of them", Default::Required, r#""192.168.74.20:8730""#,
                        "Where the receiver listens. A ferry target needs the port; an rsyncd's \
                         defaults to 873; over ssh, the host to log in to. A ferry target may \
                         list several gateways to the same module on a shared filesystem \
                         (`[\"10.0.0.2:8730\", \"10.0.0.3:8730\"]`): a session goes to the \
                         first that takes it, starting from the one that took the last, so a \
                         gateway that dies or does not hold the module's write lease passes the \
                         turn to the next."),
                    key("fingerprint", "\"sha256:HEX\"", Default::Absent("required for a ferry \
                         target, refused for an rsync one"),
                        r#""sha256:0000000000000000000000000000000000000000000000000000000000000000""#,
                        "The receiver certificate's fingerprint (`ferry fingerprint \
                         receiver-cert.pem` on the backup host): the sender talks to that \
                         certificate only."),
                    key("compress", "boolean", Default::Value("false"), "true",
                        "Ferry: pack file bodies with zstd (a frame that would not shrink goes as \
                         it is; listings are always packed). Pays on slow links and compressible \
                         data; on a LAN it costs more CPU than it saves. Rsync: `--compress`."),
                    key("bwlimit_kib", "integer", Default::Absent("no cap"), "10240",
                        "A cap on what this target is sent, in KiB/s: for a ferry target, every \
                         session to it together (all groups), held within 1% over a minute and \
                         never slowing another target; for an rsync target, rsync's `--bwlimit` \
                         per run. 0 means no cap. A reload applies a new value."),
                    key("user", "string", Default::Absent("none (an rsyncd module without auth \
                         users; over ssh, ssh's own default)"),
                        r#""rsync""#,
                        "The rsyncd user (`auth users`), or the ssh login."),
                    key("password_file", "path", Default::Absent("none"), r#""/etc/rsync.pas""#,
                        "rsync's `--password-file` for an rsyncd: must be mode 0600 (checked at \
                         start). Not with `transport = \"ssh\"`, which authenticates with ssh \
                         keys."),
                    key("rsync_path", "path", Default::Value(r#""rsync""#), r#""/usr/bin/rsync""#,
                        "The rsync client to run, looked up in PATH unless a path is given."),
                    key("rsync_args", "list of strings", Default::Value("[]"),
                        r#"["--numeric-ids"]"#,
                        "Further rsync arguments, appended as given."),
                    key("timeout_s", "integer", Default::Value("60"), "100",
                        "rsync's I/O and connect timeout in seconds (`--timeout`, \
                         `--contimeout`)."),
                    key("transport", "\"daemon\" | \"ssh\"", Default::Value(r#""daemon""#),
                        r#""ssh""#,
                        "How rsync reaches the target: an rsyncd (`host::module`), or a remote \
                         shell (`user@host:path`, the group's `module` being the path)."),
                    key("rsh", "string", Default::Absent("\"ssh\" (with transport = \"ssh\" only)"),
                        r#""ssh -p 2222""#,
                        "The remote shell for `transport = \"ssh\"` (rsync's `--rsh`)."),
                ],
            },
            Table {
                at: At::List("sync"),
                text: "A sync group: one source directory kept equal to one module on each of its \
                       targets, watched live and compared whole at start.",
                keys: vec![
                    key("source", "path", Default::Required, r#""/file""#,
                        "The directory to keep. The sender reads it beneath a descriptor held \
                         on this directory; symlinks in it are sent as symlinks, never \
                         followed."),
                    key("targets", "list of strings", Default::Required, r#"["backup"]"#,
                        "Names of `[targets.NAME]` tables, at least one."),
                    key("module", "string", Default::Required, r#""file""#,
                        "The module on each target (the destination path with \
                         `transport = \"ssh\"`)."),
                    key("name", "string", Default::Absent("the module's name"), r#""file-docs""#,
                        "The group's name, as `ferry status`, `--group` and the logs say it; \
                         unique in the file."),
                    key("exclude", "list of strings", Default::Value("[]"), r#"["tmp/", "*.log"]"#,
                        "Patterns left out, as rsync reads them: `*.log` matches a name at any \
                         depth, `tmp/` directories only, a pattern containing `/` is anchored at \
                         the source, `*` does not cross `/` but `**` does. Excluded paths on the \
                         receiver are left alone."),
                    key("delete", "boolean", Default::Value("true"), "false",
                        "Propagate deletions (rsync's `--delete`). Without it nothing is removed \
                         on the receiver and renames arrive as copies."),
                    key("settle_ms", "integer", Default::Value("100"), "250",
                        "A written file still open is sent after this much quiet (a closed file \
                         at once)."),
                    key("max_delay_ms", "integer", Default::Value("1000"), "5000",
                        "... and at least this often while it keeps changing. Not shorter than \
                         `settle_ms`."),
                    key("delete_guard_percent", "integer 0-100", Default::Value("50"), "30",
                        "Deletions that would remove more than this share of the module's entries (and at \
                         least `delete_guard_min`), in one whole-tree compare or live within ten \
                         minutes, are held until an operator confirms (`ferry confirm-deletes \
                         GROUP`); everything else keeps flowing. A module that keeps history takes \
                         them without holding (they are kept there), saying so. 0 turns the guard off."),
                    key("delete_guard_min", "integer", Default::Value("1000"), "100",
                        "The fewest deletions that can trip the guard."),
                    key("preserve", "list of \"hardlinks\" | \"acls\" | \"xattrs\" | \"sparse\"",
                        Default::Value(r#"["hardlinks", "acls", "xattrs", "sparse"]"#),
                        r#"["hardlinks"]"#,
                        "What is kept beyond what `rsync -a` keeps: hard links within the group, \
                         POSIX ACLs, extended attributes (user.*, and as root trusted.* and \
                         security.*: SELinux labels, file capabilities), holes of sparse files. \
                         `[]` is `rsync -a`."),
                ],
            },
        ],
        examples: &[
            Example {
                title: "two groups to a ferry receiver",
                text: r#"cert = "cert.pem"
key = "key.pem"
state_dir = "/var/lib/ferry"

[targets.backup]
address = "192.168.74.20:8730"
fingerprint = "sha256:0000000000000000000000000000000000000000000000000000000000000000"

[[sync]]
source = "/file"
targets = ["backup"]
module = "file"
exclude = ["tmp/", "*.log"]

[[sync]]
source = "/code"
targets = ["backup"]
module = "code"
"#,
            },
            Example {
                title: "compatibility mode: a stock rsyncd, and rsync over ssh",
                text: r#"cert = "cert.pem"
key = "key.pem"

[targets.legacy]
kind = "rsync"
address = "192.168.74.20"
user = "rsync"
password_file = "/etc/rsync.pas"

[targets.offsite]
kind = "rsync"
address = "192.168.56.12"
transport = "ssh"

[[sync]]
source = "/file"
targets = ["legacy"]
module = "file"

[[sync]]
name = "file-offsite"
source = "/file"
targets = ["offsite"]
module = "/backup/file"
"#,
            },
        ],
        see_also: &["ferry(1)", "ferry-send(1)", "ferry-receiver.toml(5)", "rsync(1)"],
    }
}
