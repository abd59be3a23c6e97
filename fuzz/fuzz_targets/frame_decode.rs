//! Any bytes from a peer: decoding a frame returns a message, "not yet", or an error — it
//! never panics, and a decoded message survives encoding and decoding again unchanged.
//! (bincode accepts non-canonical varints, so the bytes themselves may differ.)
#![no_main]
use ferry_wire::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, _))) = frame::decode(data) {
        let mut again = Vec::new();
        frame::encode(&msg, &mut again).expect("a decoded message encodes");
        let (back, used) = frame::decode(&again).unwrap().unwrap();
        assert_eq!(back, msg);
        assert_eq!(used, again.len());
    }
});
