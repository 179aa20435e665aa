//! Fuzzes the GGUF reader (and the writer's agreement with it) through
//! `shared::fuzz::check_gguf`, where crash inputs are also replayed as unit tests.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shared::fuzz::check_gguf(data));
