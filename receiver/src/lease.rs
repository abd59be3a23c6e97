//! A module's write lease, for receivers that serve one module on a shared filesystem as
//! interchangeable gateways: at most one of them writes it at a time.
//!
//! The lease is a small file on the shared filesystem (`lease = PATH` in the module) that
//! says who holds it and a counter the holder raises at every renewal (every third of the
//! expiry). Every read and write of it happens under a POSIX lock on the file, which a
//! distributed filesystem (GlusterFS's `features/locks`) holds for the whole cluster, so taking
//! it is a compare-and-swap.
//!
//! No clock is compared between hosts. A contender that reads someone else's lease notes the
//! counter and the moment it saw it, on its own monotonic clock; only if the counter has not
//! moved for a whole expiry does it take the lease. The holder, for its part, writes nothing
//! more once [`Lease::holds`] is false: a fifth of the expiry before the earliest moment a
//! contender may take over, measured from before its last renewal was written. A lease given
//! up at a clean stop is free at once.

use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A module's lease as one gateway sees it.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    module: String,
    /// This gateway's name, as the lease file and refusals say it.
    gateway: String,
    /// Unique to this process: a restarted gateway is a new holder.
    token: String,
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The counter we last wrote, and when we began writing it: we hold the lease until a
    /// fifth of the expiry before `ttl` has passed since.
    ours: Option<(u64, Instant)>,
    /// Someone else's lease: its token and counter, and when we first saw that pair.
    seen: Option<(String, u64, Instant)>,
    /// A renewal thread runs.
    renewing: bool,
    /// Renewals stop (a holder whose process hangs, or whose storage stalls).
    #[cfg(test)]
    stalled: bool,
}

/// What the lease file says.
#[derive(Debug, Clone, PartialEq, Default)]
struct Record {
    holder: String,
    token: String,
    counter: u64,
    ttl_ms: u64,
}

impl Record {
    fn parse(text: &str) -> Record {
        let mut r = Record::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "holder" => r.holder = v.to_string(),
                "token" => r.token = v.to_string(),
                "counter" => r.counter = v.parse().unwrap_or(0),
                "ttl_ms" => r.ttl_ms = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        r
    }

    fn text(&self) -> String {
        format!(
            "holder={}\ntoken={}\ncounter={}\nttl_ms={}\n",
            self.holder, self.token, self.counter, self.ttl_ms
        )
    }

    fn is_free(&self) -> bool {
        self.token.is_empty()
    }
}

/// Why this gateway may not write the module now.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Another gateway holds the lease.
    Held {
        /// Its name.
        holder: String,
        /// How long its lease has gone unrenewed as seen from here, and its expiry.
        unrenewed: Duration,
        /// The expiry it wrote.
        ttl: Duration,
    },
    /// The lease file could not be read or written.
    Io(String),
}

impl Lease {
    /// The lease of `module` at `path`, taken as `gateway`, expiring after `ttl` unrenewed.
    pub fn new(path: &Path, module: &str, gateway: &str, ttl: Duration) -> Lease {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Lease {
            path: path.to_path_buf(),
            module: module.to_string(),
            gateway: gateway.to_string(),
            token: format!("{}.{:016x}", std::process::id(), h.finish()),
            ttl,
            state: Mutex::new(State::default()),
        }
    }

    /// This gateway's name.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Whether this gateway holds the lease now (writes are allowed).
    pub fn holds(&self) -> bool {
        let state = self.state.lock().expect("lease lock");
        state
            .ours
            .is_some_and(|(_, at)| at.elapsed() < self.valid_for())
    }

    fn valid_for(&self) -> Duration {
        self.ttl - self.ttl / 5
    }

    /// Holds the lease, taking it if it is free or its holder has not renewed it for a whole
    /// expiry. `Ok(true)`: taken from another holder or free (what an earlier holder left in
    /// flight may be swept); `Ok(false)`: this one held it already.
    /// Blocking: it reads and writes the lease file.
    pub fn acquire(self: &Arc<Self>) -> Result<bool, Refusal> {
        if self.holds() {
            return Ok(false);
        }
        let taken = self.locked(|file, state| {
            let now = Instant::now();
            let record = read(file)?;
            if !record.is_free() && record.token != self.token {
                let first = match &state.seen {
                    Some((token, counter, at))
                        if *token == record.token && *counter == record.counter =>
                    {
                        *at
                    }
                    _ => {
                        state.seen = Some((record.token.clone(), record.counter, now));
                        now
                    }
                };
                let ttl = Duration::from_millis(record.ttl_ms.max(1));
                let unrenewed = now - first;
                if unrenewed < ttl {
                    return Ok(Err(Refusal::Held {
                        holder: record.holder,
                        unrenewed,
                        ttl,
                    }));
                }
                tracing::warn!(
                    module = %self.module,
                    holder = %record.holder,
                    "taking the write lease: its holder has not renewed it for {:.1} s",
                    unrenewed.as_secs_f64()
                );
            }
            let counter = record.counter + 1;
            write(file, &self.record(counter))?;
            state.ours = Some((counter, now));
            state.seen = None;
            // Still ours (a renewal came late, and nobody took it meanwhile): nothing of
            // another writer's can be in flight.
            Ok(Ok(record.token != self.token))
        });
        match taken {
            Ok(Ok(from_another)) => {
                tracing::info!(module = %self.module, gateway = %self.gateway, "holding the write lease");
                self.keep_renewing();
                Ok(from_another)
            }
            Ok(Err(refusal)) => Err(refusal),
            Err(e) => Err(Refusal::Io(format!(
                "lease {}: {}",
                self.path.display(),
                ferry_protocol::io_reason(&e)
            ))),
        }
    }

    /// Gives the lease up (a clean stop): another gateway may take it at once.
    pub fn release(&self) {
        let r = self.locked(|file, state| {
            state.ours = None;
            let record = read(file)?;
            if record.token == self.token {
                let free = Record {
                    counter: record.counter,
                    ..Record::default()
                };
                write(file, &free)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(module = %self.module, "could not give up the write lease: {e}");
        }
    }

    fn record(&self, counter: u64) -> Record {
        Record {
            holder: self.gateway.clone(),
            token: self.token.clone(),
            counter,
            ttl_ms: self.ttl.as_millis() as u64,
        }
    }

    /// Renews the lease every third of its expiry on a thread of its own, until it is lost,
    /// given up, or the last handle on it goes.
    fn keep_renewing(self: &Arc<Self>) {
        {
            let mut state = self.state.lock().expect("lease lock");
            if state.renewing {
                return;
            }
            state.renewing = true;
        }
        let weak = Arc::downgrade(self);
        let every = self.ttl / 3;
        let spawned = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(lease) = weak.upgrade() else { return };
                if !lease.renew() {
                    lease.state.lock().expect("lease lock").renewing = false;
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::error!(module = %self.module, "cannot renew the write lease: {e}");
            self.state.lock().expect("lease lock").renewing = false;
        }
    }

    /// One renewal; false once the lease is no longer ours.
    fn renew(&self) -> bool {
        let r = self.locked(|file, state| {
            #[cfg(test)]
            if state.stalled {
                return Ok(true);
            }
            let Some((counter, _)) = state.ours else {
                return Ok(false);
            };
            let started = Instant::now();
            let record = read(file)?;
            if record.token != self.token || record.counter != counter {
                state.ours = None;
                tracing::warn!(
                    module = %self.module,
                    holder = %record.holder,
                    "the write lease was taken over; this gateway writes the module no more"
                );
                return Ok(false);
            }
            write(file, &self.record(counter + 1))?;
            state.ours = Some((counter + 1, started));
            Ok(true)
        });
        r.unwrap_or_else(|e| {
            // Not renewed: `holds` runs out on its own; try again next time.
            tracing::warn!(module = %self.module, "could not renew the write lease: {e}");
            self.state.lock().expect("lease lock").ours.is_some()
        })
    }

    /// Runs `f` on the lease file under its POSIX lock (and this lease's own mutex).
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut fs::File, &mut State) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut state = self.state.lock().expect("lease lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)?;
        lock(&file)?;
        // Closing the file drops the lock.
        f(&mut file, &mut state)
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// Takes a POSIX write lock on the whole of `file`, trying for up to 5 s (a holder keeps it
/// for one read and one write).
fn lock(file: &fs::File) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: a zeroed flock is valid; the fields set describe the whole file.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: a valid descriptor and a valid flock.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(libc::EINTR) => {}
            _ => return Err(e),
        }
    }
}

fn read(file: &mut fs::File) -> io::Result<Record> {
    let mut text = String::new();
    file.seek(io::SeekFrom::Start(0))?;
    file.take(4096).read_to_string(&mut text)?;
    Ok(Record::parse(&text))
}

fn write(file: &mut fs::File, record: &Record) -> io::Result<()> {
    let text = record.text();
    file.seek(io::SeekFrom::Start(0))?;
    file.write_all(text.as_bytes())?;
    file.set_len(text.len() as u64)?;
    file.sync_data()
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Held {
                holder,
                unrenewed,
                ttl,
            } => write!(
                f,
                "gateway {holder} holds the write lease (unrenewed for {:.1} s of its {:.0} s \
                 expiry as seen here); write through it, or wait for it to expire",
                unrenewed.as_secs_f64(),
                ttl.as_secs_f64()
            ),
            Refusal::Io(why) => write!(f, "{why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, ttl: Duration) -> (Arc<Lease>, Arc<Lease>) {
        let path = dir.join("m.lease");
        (
            Arc::new(Lease::new(&path, "m", "gw-a", ttl)),
            Arc::new(Lease::new(&path, "m", "gw-b", ttl)),
        )
    }

    #[test]
    fn a_held_lease_is_refused_naming_its_holder_until_it_goes_unrenewed() {
        let dir = tempfile::tempdir().unwrap();
        // Long enough that a loaded machine still renews within it.
        let ttl = Duration::from_secs(2);
        let (a, b) = pair(dir.path(), ttl);
        assert_eq!(a.acquire(), Ok(true));
        assert!(a.holds());
        // While a renews, b is refused however long it tries (across several renewals).
        let until = Instant::now() + ttl * 2;
        let mut refusals = 0;
        while Instant::now() < until {
            match b.acquire() {
                Err(Refusal::Held { holder, .. }) => assert_eq!(holder, "gw-a"),
                other => panic!("b got {other:?} while a renews"),
            }
            refusals += 1;
            std::thread::sleep(Duration::from_millis(30));
        }
        assert!(refusals > 10);
        assert!(a.holds());
        // a stops renewing (its process hangs): it stops writing before b may take over, and
        // b takes the lease only once it has seen it unrenewed for a whole expiry.
        let last_renewal = {
            let mut state = a.state.lock().unwrap();
            state.stalled = true;
            state.ours.unwrap().1
        };
        let taken = loop {
            match b.acquire() {
                Ok(taken) => break taken,
                Err(Refusal::Held { .. }) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("{e}"),
            }
        };
        let taken_at = Instant::now();
        assert!(taken);
        assert!(!a.holds(), "both hold the lease");
        assert!(taken_at - last_renewal >= ttl);
        assert!(b.holds());
    }

    #[test]
    fn a_holder_whose_lease_was_taken_lets_go_at_its_next_renewal() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_millis(500);
        let (a, b) = pair(dir.path(), ttl);
        a.acquire().unwrap();
        // The file is overwritten with someone else's lease: a's renewal finds it and lets go.
        let other = Lease::new(&dir.path().join("m.lease"), "m", "gw-c", ttl);
        other.locked(|f, _| write(f, &other.record(1000))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.holds() {
            assert!(Instant::now() < deadline, "a still holds a lease it lost");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(b.acquire(), Err(Refusal::Held { holder, .. }) if holder == "gw-c"));
    }

    #[test]
    fn a_lease_given_up_is_free_at_once_and_a_new_process_is_a_new_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = pair(dir.path(), Duration::from_secs(60));
        a.acquire().unwrap();
        a.release();
        assert!(!a.holds());
        assert_eq!(b.acquire(), Ok(true));
        // The same gateway name in a new process (a restart) is refused while b holds it.
        let again = Arc::new(Lease::new(
            &dir.path().join("m.lease"),
            "m",
            "gw-b",
            Duration::from_secs(60),
        ));
        assert!(matches!(again.acquire(), Err(Refusal::Held { .. })));
    }
}
