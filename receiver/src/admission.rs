//! What an unauthenticated peer can cost, bounded: a connection is accepted only while fewer
//! than [`MAX_HANDSHAKES`] handshakes are in progress (past that, new connections wait in the
//! kernel's listen backlog, where they cost the receiver nothing, until a handshake ends), and
//! takes the place of the *oldest* handshake from its address when [`MAX_HANDSHAKES_PER_ADDRESS`]
//! are in progress from there already — so no one address can fill the slots, and an honest
//! peer behind the same address as a slowloris (NAT, a shared host) still gets in: its
//! handshake takes milliseconds, the attacker's idle ones are the oldest. Each has
//! [`HANDSHAKE_TIMEOUT`] to prove
//! its certificate and say `Hello`, and its frames may not exceed [`PRE_AUTH_FRAME`] bytes
//! until it is authorised. Only then does it take one of [`MAX_SESSIONS`] session slots; when
//! none is free it is refused with a reason, never left hanging.
//!
//! [`HANDSHAKE_TIMEOUT`]: ferry_protocol::connection::HANDSHAKE_TIMEOUT
//! [`PRE_AUTH_FRAME`]: ferry_protocol::connection::PRE_AUTH_FRAME

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Handshakes in progress at once, across all addresses.
pub const MAX_HANDSHAKES: usize = 128;
/// Handshakes in progress at once from one address.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;
/// Authenticated sessions served at once across all modules.
pub const MAX_SESSIONS: usize = 4096;

/// The receiver's admission counters.
pub struct Admission {
    handshakes: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    session_cap: usize,
    per_address: Arc<Mutex<HashMap<IpAddr, Pending>>>,
    next: AtomicU64,
    last_warning: AtomicU64,
    turned_away: AtomicU64,
}

impl Default for Admission {
    fn default() -> Self {
        Admission::new(MAX_HANDSHAKES, MAX_SESSIONS)
    }
}

/// One address's handshakes in progress, oldest first: each one's number and the token that
/// ends it when a newer one takes its place.
type Pending = VecDeque<(u64, CancellationToken)>;

/// A connection in its handshake; the slot is freed when this is dropped.
pub struct Handshake {
    _permit: OwnedSemaphorePermit,
    address: IpAddr,
    number: u64,
    evicted: CancellationToken,
    per_address: Arc<Mutex<HashMap<IpAddr, Pending>>>,
}

impl Handshake {
    /// Cancelled when a newer handshake from the same address took this one's place: the
    /// connection is closed.
    pub fn evicted(&self) -> CancellationToken {
        self.evicted.clone()
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut map = self.per_address.lock().expect("admission lock");
        if let Some(pending) = map.get_mut(&self.address) {
            pending.retain(|(n, _)| *n != self.number);
            if pending.is_empty() {
                map.remove(&self.address);
            }
        }
    }
}

impl Admission {
    /// Admission with the given caps.
    pub fn new(handshakes: usize, sessions: usize) -> Admission {
        Admission {
            handshakes: Arc::new(Semaphore::new(handshakes)),
            sessions: Arc::new(Semaphore::new(sessions)),
            session_cap: sessions,
            per_address: Arc::default(),
            next: AtomicU64::new(0),
            last_warning: AtomicU64::new(0),
            turned_away: AtomicU64::new(0),
        }
    }

    /// Waits for one of the [`MAX_HANDSHAKES`] slots; the accept loop takes one before it
    /// accepts.
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        self.handshakes
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// A slot if one is free now.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.handshakes.clone().try_acquire_owned().ok()
    }

    /// Admits a connection from `address` to its handshake with `slot`. When
    /// [`MAX_HANDSHAKES_PER_ADDRESS`] are in progress from that address already, the oldest of
    /// them is ended (its [`Handshake::evicted`] fires) to make room.
    pub fn handshake(&self, slot: OwnedSemaphorePermit, address: IpAddr) -> Handshake {
        let address = canonical(address);
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = CancellationToken::new();
        let oldest = {
            let mut map = self.per_address.lock().expect("admission lock");
            let pending = map.entry(address).or_default();
            let oldest = (pending.len() >= MAX_HANDSHAKES_PER_ADDRESS)
                .then(|| pending.pop_front())
                .flatten();
            pending.push_back((number, evicted.clone()));
            oldest
        };
        if let Some((_, token)) = oldest {
            token.cancel();
            self.turned_away(address);
        }
        Handshake {
            _permit: slot,
            address,
            number,
            evicted,
            per_address: self.per_address.clone(),
        }
    }

    /// A session slot, or `None`: refuse the session as busy.
    pub fn session(&self) -> Option<OwnedSemaphorePermit> {
        self.sessions.clone().try_acquire_owned().ok()
    }

    /// Sessions being served now.
    pub fn sessions_open(&self) -> usize {
        self.session_cap - self.sessions.available_permits()
    }

    /// Connections closed before their handshake, so far.
    pub fn turned_away_count(&self) -> u64 {
        self.turned_away.load(Ordering::Relaxed)
    }

    /// Counts a connection turned away, warning at most once a minute.
    fn turned_away(&self, address: IpAddr) {
        let count = self.turned_away.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %address,
                turned_away = count,
                "too many unauthenticated connections (at most {MAX_HANDSHAKES} in handshake, \
                 {MAX_HANDSHAKES_PER_ADDRESS} per address); closing the oldest from that address \
                 for each new one"
            );
        }
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_handshake_slot_and_its_newest_gets_in() {
        let a = Admission::new(40, 10);
        let attacker: IpAddr = "127.0.0.2".parse().unwrap();
        let mut held: Vec<Handshake> = Vec::new();
        for _ in 0..100 {
            let slot = a
                .try_slot()
                .expect("evicted handshakes give their slots back");
            held.push(a.handshake(slot, attacker));
            // An evicted connection's task ends and lets go of its handshake.
            held.retain(|h| !h.evicted().is_cancelled());
        }
        assert_eq!(held.len(), MAX_HANDSHAKES_PER_ADDRESS);
        assert_eq!(
            a.turned_away_count(),
            100 - MAX_HANDSHAKES_PER_ADDRESS as u64
        );
        // The newest from that address is in; the oldest made room for it.
        let oldest = held[0].evicted();
        let newest = a.handshake(a.try_slot().unwrap(), attacker);
        assert!(oldest.is_cancelled() && !newest.evicted().is_cancelled());
        // Another address is untouched by all this.
        let other = a.handshake(a.try_slot().unwrap(), "127.0.0.1".parse().unwrap());
        assert!(!other.evicted().is_cancelled());
        assert!(held[1..].iter().all(|h| !h.evicted().is_cancelled()));
    }

    #[test]
    fn the_global_handshake_cap_holds_across_addresses() {
        let a = Admission::new(3, 10);
        let held: Vec<_> = (1..=5)
            .filter_map(|i| {
                Some(a.handshake(a.try_slot()?, format!("10.0.0.{i}").parse().unwrap()))
            })
            .collect();
        assert_eq!(held.len(), 3);
        assert!(a.try_slot().is_none(), "the accept loop waits for a slot");
    }

    #[test]
    fn sessions_past_the_cap_are_refused_not_queued() {
        let a = Admission::new(3, 2);
        let s: Vec<_> = (0..3).filter_map(|_| a.session()).collect();
        assert_eq!(s.len(), 2);
    }
}
