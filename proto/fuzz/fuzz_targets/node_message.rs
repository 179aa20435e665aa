//! Fuzzes a node's handling of a coordinator message (decode, then every check)
//! through `proto::fuzz::check_coordinator_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proto::fuzz::check_coordinator_message(data));
