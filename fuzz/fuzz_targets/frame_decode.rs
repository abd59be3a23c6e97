//! Any bytes from a peer: decoding a frame returns a message, "not yet", or an error — it
//! never panics, and a decoded message encodes to the same frame.
#![no_main]
use ferry_protocol::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((msg, used))) = frame::decode(data) {
        let mut again = Vec::new();
        frame::encode(&msg, &mut again).expect("a decoded message encodes");
        assert_eq!(&again[..], &data[..used]);
    }
});
