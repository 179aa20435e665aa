//! The coordinator's handling of a node's replies: any bytes, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    proto::fuzz::check_node_reply(data);
});
