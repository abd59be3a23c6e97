//! A TCP proxy on 127.0.0.1 that forwards to a receiver and can cut every connection after
//! a number of bytes from the client (a link that drops). Stops on drop. (A link that stalls
//! is tested in memory and in virtual time: `live_loop::a_stalled_link_…`.)

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Proxy {
    pub addr: String,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Forwards to `upstream`; each connection is cut once the client sent `cut_after` bytes.
    pub fn start(upstream: &str, cut_after: Option<usize>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (upstream, stop2, count) = (upstream.to_string(), stop.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(client, server, cut_after));
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        Proxy {
            addr,
            connections,
            stop,
        }
    }
}

/// Copies `from` → `to` until either closes, or `limit` bytes went through; then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, limit: Option<usize>) {
    let mut buf = [0u8; 16 * 1024];
    let mut sent = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        let n = limit.map_or(n, |l| n.min(l.saturating_sub(sent)));
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
        if limit.is_some_and(|l| sent >= l) {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}
