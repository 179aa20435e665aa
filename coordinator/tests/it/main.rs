//! Integration tests of the coordinator: the engine against llama.cpp's and
//! transformers' references, and the `moeshard` command line as a user runs it.

mod batching;
mod cli;
mod convert;
mod distributed;
mod failover;
mod fixtures;
mod mtls;
mod plan;
mod predict;
mod server;
mod smollm2;
mod soak;
mod sockets;
mod support;
mod synth;
