//! `ferry-receiver.toml(5)`: every key of `receiver.toml`, held to the parser by the tests in
//! `config.rs`.

use ferry_protocol::config_reference::{key, At, Default, Example, Reference, Table};

/// The reference of `receiver.toml`.
pub fn reference() -> Reference {
    Reference {
        name: "ferry-receiver.toml",
        summary: "configuration of the ferry receiver (ferry receive)",
        file: "/etc/ferry/receiver.toml",
        description: &[
            "The receiver replaces rsyncd on the backup host: it listens for senders over mutual \
             TLS and writes each module beneath its path, atomically and durably, keeping what it \
             supersedes in the module's history if the module has one. The file is TOML. Unknown \
             keys are errors, named with their file and line; `ferry check-config FILE` checks a \
             file without starting anything. Relative paths resolve against the file's own \
             directory. SIGHUP (`systemctl reload ferry-receiver`) reads the file again: new \
             sessions get the new modules and certificate, open ones finish with what they \
             started with; `listen` and `metrics_listen` need a restart.",
            "A module whose path is missing, not a directory, or (if writable) on a read-only \
             filesystem does not stop the receiver: it is logged once and its clients are refused \
             with the reason, and it is tried again at each connection.",
        ],
        tables: vec![
            Table {
                at: At::Root,
                text: "The receiver's address, identity and own services.",
                keys: vec![
                    key(
                        "listen",
                        "\"HOST:PORT\"",
                        Default::Required,
                        r#""0.0.0.0:8730""#,
                        "The address senders connect to (`[::]:8730` for IPv6).",
                    ),
                    key(
                        "cert",
                        "path",
                        Default::Required,
                        r#""cert.pem""#,
                        "The receiver's certificate (PEM), which senders pin by its fingerprint \
                         in their targets' `fingerprint`. `ferry keygen DIR` makes a pair; `ferry \
                         fingerprint FILE` prints the fingerprint.",
                    ),
                    key(
                        "key",
                        "path",
                        Default::Required,
                        r#""key.pem""#,
                        "The private key of `cert` (PEM). The receiver warns when others can \
                         read it.",
                    ),
                    key(
                        "state_dir",
                        "path",
                        Default::Absent(
                            "none: content digests are computed \
                         again after a restart",
                        ),
                        r#""/var/lib/ferry""#,
                        "Where content digests are kept across restarts (a faster `verify` and \
                         start-up compare).",
                    ),
                    key(
                        "metrics_listen",
                        "\"HOST:PORT\"",
                        Default::Absent("off"),
                        r#""127.0.0.1:9814""#,
                        "Serve Prometheus metrics over plain HTTP at this address.",
                    ),
                    key(
                        "gateway",
                        "string",
                        Default::Absent("the host's name and the listen port"),
                        r#""gw-a""#,
                        "This receiver's name as one of several gateways to modules on a shared \
                         filesystem: written in the write lease it holds, and named to senders \
                         another gateway refuses.",
                    ),
                ],
            },
            Table {
                at: At::Map("modules"),
                text: "A module: a directory tree that senders write into, named by the table's \
                       NAME (rsyncd's `[NAME]`), which senders give as a group's `module`.",
                keys: vec![
                    key(
                        "path",
                        "path",
                        Default::Required,
                        r#""/data/file""#,
                        "The module's root directory. Everything is written beneath a descriptor \
                         held on it; nothing a sender asks can reach outside it.",
                    ),
                    key(
                        "clients",
                        "list of \"sha256:HEX\"",
                        Default::Value("[]"),
                        r#"["sha256:0000000000000000000000000000000000000000000000000000000000000000"]"#,
                        "Fingerprints of the sender certificates allowed in (rsyncd's `auth \
                         users` and `secrets file`). An empty list admits nobody, which \
                         `check-config` warns of.",
                    ),
                    key(
                        "restore_clients",
                        "list of \"sha256:HEX\"",
                        Default::Absent(
                            "the \
                         module's clients",
                        ),
                        "[]",
                        "Fingerprints that may `ferry restore` from the module over the network \
                         (a read session). `[]`: restore only on the backup host itself.",
                    ),
                    key(
                        "hosts_allow",
                        "list of strings",
                        Default::Absent("any address"),
                        r#"["10.255.50.63", "10.255.60.0/24"]"#,
                        "Peer addresses allowed in: IP addresses or CIDR blocks, IPv4 or IPv6 \
                         (rsyncd's `hosts allow`).",
                    ),
                    key(
                        "read_only",
                        "boolean",
                        Default::Value("true"),
                        "false",
                        "Refuse writes, as rsyncd does by default: a module to push to says \
                         `read_only = false`.",
                    ),
                    key(
                        "max_connections",
                        "integer",
                        Default::Absent("no limit"),
                        "200",
                        "Sessions open at once; one more is refused, saying so. At least 1.",
                    ),
                    key(
                        "comment",
                        "string",
                        Default::Absent("none"),
                        r#""the file server""#,
                        "Free text for whoever reads the file (rsyncd's `comment`).",
                    ),
                    key(
                        "devices",
                        "boolean",
                        Default::Value("false"),
                        "true",
                        "Create device nodes. Off by default: a sender could otherwise make \
                         `/dev/mem`.",
                    ),
                    key(
                        "setuid",
                        "boolean",
                        Default::Value("false"),
                        "true",
                        "Keep setuid and setgid bits and file capabilities. Off by default: they \
                         are dropped on the receiver (and `verify` reports them as `mode`).",
                    ),
                    key(
                        "owner",
                        "\"preserve\" | \"receiver\" | \"UID:GID\"",
                        Default::Value(r#""preserve""#),
                        r#""1000:1000""#,
                        "Whose files the module's are: as sent (applied when the receiver runs \
                         as root), the receiver's own user, or these numeric ids (rsyncd's `uid` \
                         and `gid`).",
                    ),
                    key(
                        "history",
                        "path",
                        Default::Absent(
                            "none: the module is a mirror, and a \
                         writable one says so at every start",
                        ),
                        r#""/data/.history/file""#,
                        "Keep every state the module supersedes: a replaced file, a deleted entry \
                         (a directory with everything under it), a name a rename lands on, old \
                         metadata. Old inodes are linked or moved here, not copied; \
                         `journal.sqlite3` says what each was. On the module's filesystem and \
                         mount, outside the module. No sender can shorten it.",
                    ),
                    key(
                        "keep",
                        "list of \"WHICH for AGE\"",
                        Default::Value(r#"["all for 1d", "hourly for 7d", "daily for 30d"]"#),
                        r#"["all for 2d", "every 10m for 7d", "weekly for 1y"]"#,
                        "Retention, with `history`: WHICH is `all`, `hourly`, `daily`, `weekly` \
                         or `every DURATION`; a version falls under the first rule (shortest AGE \
                         first) it is young enough for, and within a rule that keeps one per \
                         period the newest of each period stays. Older than every rule: \
                         pruned.",
                    ),
                    key(
                        "history_floor",
                        "duration",
                        Default::Value(r#""24h""#),
                        r#""3d""#,
                        "With `history`: versions younger than this are never pruned for space; \
                         when only they are left and space is short, the module refuses writes \
                         instead.",
                    ),
                    key(
                        "min_free_percent",
                        "integer 0-90",
                        Default::Value("10"),
                        "20",
                        "With `history`: below this much free space on the filesystem, the \
                         oldest versions are pruned first.",
                    ),
                    key(
                        "lease",
                        "path",
                        Default::Absent("none: this receiver is the module's only writer"),
                        r#""/gluster/backup/.leases/www""#,
                        "For a module that several receivers (gateways) serve on one shared \
                         filesystem: the write lease file, on that filesystem, outside the \
                         module. A gateway writes the module only while it holds the lease; \
                         another refuses writers, naming the holder, until the holder has not \
                         renewed it for `lease_seconds` (as measured by the one that takes it \
                         over: no clocks are compared). Reads (verify, restore) go through any \
                         gateway. With `history`, it is on the same filesystem, and only the \
                         lease holder writes and prunes it.",
                    ),
                    key(
                        "lease_seconds",
                        "integer 3-600",
                        Default::Value("10"),
                        "30",
                        "With `lease`: how long an unrenewed lease holds. The holder renews every \
                         third of it and stops writing a fifth of it before another may take it \
                         over; a clean stop gives the lease up at once.",
                    ),
                ],
            },
        ],
        examples: &[
            Example {
                title: "the rsyncd.conf modules of an old set-up, as ferry modules",
                text: r#"listen = "0.0.0.0:8730"
cert = "cert.pem"
key = "key.pem"

[modules.file]
path = "/data/file"
clients = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
hosts_allow = ["10.255.50.63", "10.255.50.64"]
read_only = false
max_connections = 200
history = "/data/.history/file"

[modules.code]
path = "/data/code"
clients = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
read_only = false
"#,
            },
            Example {
                title:
                    "a module that keeps a year, restored on the backup host only; a read-only one",
                text: r#"listen = "[::]:8730"
cert = "/etc/ferry/cert.pem"
key = "/etc/ferry/key.pem"
state_dir = "/var/lib/ferry"

[modules.www]
path = "/srv/backup/www"
clients = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
restore_clients = []
read_only = false
owner = "receiver"
history = "/srv/backup/.history/www"
keep = ["all for 1d", "daily for 30d", "weekly for 1y"]
history_floor = "48h"
min_free_percent = 15

[modules.archive]
path = "/srv/backup/archive"
restore_clients = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
comment = "read only: served for restores"
"#,
            },
            Example {
                title: "one of two gateways to a module on a GlusterFS volume (the other has \
                        gateway = \"gw-b\" and the same module)",
                text: r#"listen = "0.0.0.0:8730"
cert = "/etc/ferry/cert.pem"
key = "/etc/ferry/key.pem"
gateway = "gw-a"

[modules.www]
path = "/gluster/backup/www"
clients = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
read_only = false
lease = "/gluster/backup/.leases/www"
"#,
            },
        ],
        see_also: &[
            "ferry(1)",
            "ferry-receive(1)",
            "ferry-restore(1)",
            "ferry-sender.toml(5)",
        ],
    }
}
