//! Access decisions for a session: pure functions of the module, the peer and the request.

use crate::config::Module;
use ferry_protocol::message::Intent;
use ferry_protocol::Fingerprint;
use std::net::IpAddr;

/// Why a session was refused. The text is sent to the peer and logged here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such module.
    #[error("unknown module {0:?}")]
    UnknownModule(String),
    /// The client certificate is not listed in the module's `clients` (`restore_clients` for a
    /// restore).
    #[error("certificate {fingerprint} is not allowed into module {module:?}")]
    ClientNotAllowed {
        /// Module.
        module: String,
        /// Client fingerprint.
        fingerprint: Fingerprint,
    },
    /// The peer address is not in `hosts_allow`.
    #[error("host {ip} is not allowed into module {module:?}")]
    HostNotAllowed {
        /// Module.
        module: String,
        /// Peer address.
        ip: IpAddr,
    },
    /// Write intent on a read-only module.
    #[error("module {0:?} is read-only")]
    ReadOnly(String),
    /// `max_connections` reached.
    #[error("module {module:?} already has its maximum of {max} connections")]
    TooManyConnections {
        /// Module.
        module: String,
        /// The limit.
        max: usize,
    },
}

/// Decides whether `fingerprint` at `ip` may open a session with `intent` on `module`, given
/// `active` sessions already open on it.
pub fn authorize(
    module: &Module,
    fingerprint: Fingerprint,
    ip: IpAddr,
    intent: Intent,
    active: usize,
) -> Result<(), Refusal> {
    let listed = match intent {
        Intent::Restore => &module.restore_clients,
        Intent::Write | Intent::Read => &module.clients,
    };
    if !listed.contains(&fingerprint) {
        return Err(Refusal::ClientNotAllowed {
            module: module.name.clone(),
            fingerprint,
        });
    }
    if let Some(allow) = &module.hosts_allow {
        if !allow.iter().any(|p| p.matches(ip)) {
            return Err(Refusal::HostNotAllowed {
                module: module.name.clone(),
                ip,
            });
        }
    }
    if intent == Intent::Write && module.read_only {
        return Err(Refusal::ReadOnly(module.name.clone()));
    }
    if let Some(max) = module.max_connections {
        if active >= max {
            return Err(Refusal::TooManyConnections {
                module: module.name.clone(),
                max,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> Module {
        Module {
            name: "file".into(),
            path: "/data/file".into(),
            clients: vec![ferry_protocol::fingerprint::of_der(b"good")],
            restore_clients: vec![ferry_protocol::fingerprint::of_der(b"restorer")],
            hosts_allow: Some(vec![
                "10.255.60.0/24".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
            ]),
            read_only: false,
            max_connections: Some(2),
            comment: None,
            devices: false,
            setuid: false,
            owner: Default::default(),
            history: None,
            lease: None,
        }
    }

    #[test]
    fn authorize_table() {
        let m = module();
        let good = ferry_protocol::fingerprint::of_der(b"good");
        let bad = ferry_protocol::fingerprint::of_der(b"bad");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let far: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(authorize(&m, good, lo, Intent::Write, 0), Ok(()));
        assert!(matches!(
            authorize(&m, bad, lo, Intent::Write, 0),
            Err(Refusal::ClientNotAllowed { .. })
        ));
        assert!(matches!(
            authorize(&m, good, far, Intent::Write, 0),
            Err(Refusal::HostNotAllowed { .. })
        ));
        assert!(matches!(
            authorize(&m, good, lo, Intent::Write, 2),
            Err(Refusal::TooManyConnections { max: 2, .. })
        ));
        let ro = Module {
            read_only: true,
            ..m
        };
        assert!(matches!(
            authorize(&ro, good, lo, Intent::Write, 0),
            Err(Refusal::ReadOnly(_))
        ));
        assert_eq!(authorize(&ro, good, lo, Intent::Read, 0), Ok(()));
        // Restores: `restore_clients` only, and a read-only module serves them.
        let restorer = ferry_protocol::fingerprint::of_der(b"restorer");
        assert_eq!(authorize(&ro, restorer, lo, Intent::Restore, 0), Ok(()));
        assert!(matches!(
            authorize(&ro, good, lo, Intent::Restore, 0),
            Err(Refusal::ClientNotAllowed { .. })
        ));
        assert!(matches!(
            authorize(&ro, restorer, lo, Intent::Write, 0),
            Err(Refusal::ClientNotAllowed { .. })
        ));
        assert!(matches!(
            authorize(&ro, restorer, far, Intent::Restore, 0),
            Err(Refusal::HostNotAllowed { .. })
        ));
    }
}
