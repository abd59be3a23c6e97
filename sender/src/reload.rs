//! What a reload (SIGHUP) does to the running sync groups: a pure decision over what each
//! group runs, table-tested. The daemon carries it out (prepare what starts, then stop what
//! goes, then launch).

use crate::config::{SyncGroup, Target};
use ferry_protocol::Fingerprint;
use std::collections::BTreeMap;

/// What must be equal for a reload to leave a group running: its settings, its targets'
/// settings, and the identity's fingerprint when any of them is a ferry target (rsync targets
/// do not use it, so a new certificate leaves their groups alone).
#[derive(Debug, Clone, PartialEq)]
pub struct Runs {
    /// The group's settings.
    pub group: SyncGroup,
    /// Its targets, as configured.
    pub targets: Vec<Target>,
    /// The identity's fingerprint, if any target is a ferry target.
    pub identity: Option<Fingerprint>,
}

impl Runs {
    /// What `group` runs under a configuration with `targets` and the identity `identity`.
    pub fn of(
        group: &SyncGroup,
        targets: &BTreeMap<String, Target>,
        identity: Fingerprint,
    ) -> Runs {
        let targets: Vec<Target> = group
            .targets
            .iter()
            .filter_map(|name| targets.get(name).cloned())
            .collect();
        let identity = targets
            .iter()
            .any(|t| t.fingerprint().is_some())
            .then_some(identity);
        Runs {
            group: group.clone(),
            targets,
            identity,
        }
    }
}

/// The groups a reload leaves running, starts, restarts and stops, by name, in the order of
/// the new configuration (stopped ones by name).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Running and unchanged: left alone (connections, pending changes, retries).
    pub unchanged: Vec<String>,
    /// New: started.
    pub added: Vec<String>,
    /// Running, but something they run changed: stopped, then started anew.
    pub changed: Vec<String>,
    /// Running and no longer configured: stopped.
    pub removed: Vec<String>,
}

impl ReloadPlan {
    /// True if the group `name` starts (added or changed).
    pub fn starts(&self, name: &str) -> bool {
        self.added.iter().chain(&self.changed).any(|n| n == name)
    }

    /// The one-line summary the daemon logs and tells systemd.
    pub fn summary(&self) -> String {
        format!(
            "{} groups running: {} added, {} changed, {} removed",
            self.unchanged.len() + self.added.len() + self.changed.len(),
            self.added.len(),
            self.changed.len(),
            self.removed.len()
        )
    }
}

/// What switching from `running` (by group name) to `wanted` does.
pub fn plan(running: &BTreeMap<String, Runs>, wanted: &[Runs]) -> ReloadPlan {
    let mut out = ReloadPlan::default();
    for w in wanted {
        let name = w.group.name.clone();
        match running.get(&name) {
            Some(r) if r == w => out.unchanged.push(name),
            Some(_) => out.changed.push(name),
            None => out.added.push(name),
        }
    }
    out.removed = running
        .keys()
        .filter(|n| !wanted.iter().any(|w| &w.group.name == *n))
        .cloned()
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RsyncTarget, TargetKind};
    use std::path::PathBuf;

    fn ferry(name: &str, address: &str) -> Target {
        Target {
            name: name.into(),
            address: address.into(),
            more_addresses: Vec::new(),
            kind: TargetKind::Ferry {
                fingerprint: Fingerprint::from_sha256([7; 32]),
                compress: false,
                bwlimit_kib: None,
            },
        }
    }

    fn rsync(name: &str) -> Target {
        Target {
            name: name.into(),
            address: "backup:873".into(),
            more_addresses: Vec::new(),
            kind: TargetKind::Rsync(RsyncTarget {
                user: None,
                password_file: None,
                rsync_path: "rsync".into(),
                args: Vec::new(),
                timeout_s: 60,
                rsh: None,
            }),
        }
    }

    fn group(name: &str, targets: &[&str]) -> SyncGroup {
        let targets = targets.iter().map(|t| t.to_string()).collect();
        SyncGroup::new(name, PathBuf::from(format!("/src/{name}")), targets, name)
    }

    #[test]
    fn each_group_is_kept_started_restarted_or_stopped_by_what_it_runs() {
        let (me, renewed) = (
            Fingerprint::from_sha256([1; 32]),
            Fingerprint::from_sha256([2; 32]),
        );
        let targets: BTreeMap<String, Target> = [ferry("f", "a:1"), rsync("r")]
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let moved: BTreeMap<String, Target> = [ferry("f", "b:1"), rsync("r")]
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let mut capped = targets.clone();
        if let Some(Target {
            kind: TargetKind::Ferry { bwlimit_kib, .. },
            ..
        }) = capped.get_mut("f")
        {
            *bwlimit_kib = Some(512);
        }
        let running: BTreeMap<String, Runs> = [
            group("kept", &["f"]),
            group("gone", &["f"]),
            group("excludes", &["f"]),
            group("to-rsync", &["r"]),
        ]
        .iter()
        .map(|g| (g.name.clone(), Runs::of(g, &targets, me)))
        .collect();
        let mut excludes = group("excludes", &["f"]);
        excludes.filter = crate::filter::Filter::new(&["*.tmp".into()]).unwrap();
        type Case<'a> = (
            &'a str,
            Vec<SyncGroup>,
            &'a BTreeMap<String, Target>,
            Fingerprint,
            [&'a [&'a str]; 4],
        );
        let cases: Vec<Case> = vec![
            (
                "the same file: nothing happens",
                vec![
                    group("kept", &["f"]),
                    group("gone", &["f"]),
                    group("excludes", &["f"]),
                    group("to-rsync", &["r"]),
                ],
                &targets,
                me,
                [&["kept", "gone", "excludes", "to-rsync"], &[], &[], &[]],
            ),
            (
                "a group added, one removed, one's excludes changed",
                vec![
                    group("kept", &["f"]),
                    excludes.clone(),
                    group("to-rsync", &["r"]),
                    group("new", &["r"]),
                ],
                &targets,
                me,
                [&["kept", "to-rsync"], &["new"], &["excludes"], &["gone"]],
            ),
            (
                "a ferry target moved: its groups restart, the rsync one does not",
                vec![group("kept", &["f"]), group("to-rsync", &["r"])],
                &moved,
                me,
                [&["to-rsync"], &[], &["kept"], &["excludes", "gone"]],
            ),
            (
                "a ferry target's bandwidth cap changed: its groups restart with the new cap",
                vec![group("kept", &["f"]), group("to-rsync", &["r"])],
                &capped,
                me,
                [&["to-rsync"], &[], &["kept"], &["excludes", "gone"]],
            ),
            (
                "a new certificate: groups with a ferry target restart",
                vec![group("kept", &["f"]), group("to-rsync", &["r"])],
                &targets,
                renewed,
                [&["to-rsync"], &[], &["kept"], &["excludes", "gone"]],
            ),
            (
                "a group moved to another target",
                vec![group("kept", &["r"]), group("to-rsync", &["r"])],
                &targets,
                me,
                [&["to-rsync"], &[], &["kept"], &["excludes", "gone"]],
            ),
        ];
        for (what, syncs, targets, identity, [unchanged, added, changed, removed]) in cases {
            let wanted: Vec<Runs> = syncs
                .iter()
                .map(|g| Runs::of(g, targets, identity))
                .collect();
            let p = plan(&running, &wanted);
            let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let mut removed = names(removed);
            removed.sort();
            assert_eq!(
                p,
                ReloadPlan {
                    unchanged: names(unchanged),
                    added: names(added),
                    changed: names(changed),
                    removed,
                },
                "{what}"
            );
        }
    }
}
