//! The expert-node daemon: serves the routed experts (or expert slices) it holds
//! from its local memory.
//!
//! Not built yet (the distributed-execution issue): the daemon currently only
//! parses its command line and says so.
