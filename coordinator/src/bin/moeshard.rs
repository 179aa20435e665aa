//! `moeshard`: the user-facing command line.

fn main() {}
