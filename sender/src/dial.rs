//! Reaching a receiver: the mutually authenticated TLS connection (pinned to the
//! receiver's fingerprint, dead peers found by keepalive), and [`Target::connect`], the one
//! way every command and worker opens a session on a ferry target.

use crate::config::{Target, TargetKind};
use crate::session::{Session, SessionError};
use ferry_protocol::connection::ConnError;
use ferry_protocol::identity::Identity;
use ferry_protocol::message::Intent;
use ferry_protocol::pace::Pace;
use ferry_protocol::Fingerprint;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long connecting (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The mutually authenticated TLS connection to the receiver at `address`, its certificate
/// pinned to `fingerprint`: what a session (or a restore client) runs over.
pub async fn dial(
    address: &str,
    fingerprint: Fingerprint,
    identity: &Identity,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SessionError> {
    let conn_err = |source: ConnError| SessionError::Conn {
        address: address.to_string(),
        source,
    };
    let tls = ferry_protocol::tls::client_config(
        identity.certs.clone(),
        identity.key.clone_key(),
        fingerprint,
    )
    .map_err(|e| conn_err(ConnError::Protocol(e.to_string())))?;
    let connect = async {
        let tcp = TcpStream::connect(address).await?;
        let _ = tcp.set_nodelay(true);
        detect_dead_peers(&tcp);
        tokio_rustls::TlsConnector::from(tls)
            .connect(ferry_protocol::tls::server_name(), tcp)
            .await
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| conn_err(ConnError::Timeout("connecting")))?
        .map_err(|e| conn_err(e.into()))?;
    Ok(stream)
}

impl Target {
    /// Opens `module` with `intent` on this (ferry) target; the one way every command and
    /// worker connects. Gateways are tried in the configured order.
    pub async fn connect(
        &self,
        identity: &Identity,
        module: &str,
        intent: Intent,
    ) -> Result<Session, SessionError> {
        self.connect_from(identity, module, intent, 0)
            .await
            .map(|(session, _)| session)
    }

    /// Every address of the target: the receiver, or its gateways in the configured order.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.address.as_str()).chain(self.more_addresses.iter().map(|a| a.as_str()))
    }

    /// [`Target::connect`], trying the gateways from the `first`-th round (the one that
    /// worked last, for a worker): the first that takes the session, and its index. A gateway
    /// that is down, or refuses because another holds the module's write lease, passes the
    /// turn to the next.
    pub async fn connect_from(
        &self,
        identity: &Identity,
        module: &str,
        intent: Intent,
        first: usize,
    ) -> Result<(Session, usize), SessionError> {
        let TargetKind::Ferry {
            fingerprint,
            compress,
            bwlimit_kib,
        } = self.kind
        else {
            return Err(SessionError::Unsupported(format!(
                "target {}: an rsync target has no ferry session",
                self.name
            )));
        };
        let addresses: Vec<&str> = self.addresses().collect();
        let mut failed = Vec::new();
        for turn in 0..addresses.len() {
            let i = (first + turn) % addresses.len();
            let address = addresses[i];
            let pace = bwlimit_kib.map(|kib| Pace::shared(&self.name, kib));
            let opened = async {
                let stream = dial(address, fingerprint, identity).await?;
                Session::open(stream, address, module, intent, compress, pace)
                    .await
                    .map(|s| s.named(&self.name))
                    .map_err(|source| SessionError::Conn {
                        address: address.to_string(),
                        source,
                    })
            };
            match opened.await {
                Ok(session) => return Ok((session, i)),
                Err(e) if addresses.len() == 1 => return Err(e),
                Err(e) => failed.push(e.to_string()),
            }
        }
        Err(SessionError::NoGateway(failed.join("; ")))
    }
}

/// A receiver that vanishes without closing (power loss, cable, firewall) must not leave
/// requests waiting forever: keepalive probes find an idle dead peer in about 30 s, and
/// `TCP_USER_TIMEOUT` fails writes the peer does not acknowledge within 30 s.
fn detect_dead_peers(tcp: &TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: `fd` is an open socket owned by `tcp`; the option value is a c_int.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 15);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000);
}
