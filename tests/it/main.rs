//! moeshard's cross-process end-to-end tests: expert-node daemons (this crate's
//! `moeshard-test-node`, or `$MOESHARD_BIN expert-node`) and coordinators in this process,
//! with faults injected between them by the harness (`tests/lib.rs`). One module per area.

mod bandwidth;
mod common;
mod hostile;
mod latency;
mod stalls;
