//! A hostile signature or delta: parsing a peer signature, and applying a peer delta to a base
//! file (as the receiver does), never panic, never loop, never exceed the window.
#![no_main]
use ferry_wire::delta;
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let split = (data[0] as usize * 256 + data[1] as usize) % data.len();
    let (base, delta_bytes) = data[2..].split_at(split.min(data.len() - 2));
    let _ = delta::parse_peer_signature(data.to_vec());
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(base).unwrap();
    let window = (data[0] as u64) << 12;
    let mut out = Vec::new();
    if delta::apply_window_at(&f, base.len() as u64, delta_bytes, window, &mut out).is_ok() {
        assert_eq!(out.len() as u64, window);
    }
    assert!(out.len() as u64 <= window.min(delta::WINDOW as u64));
});
