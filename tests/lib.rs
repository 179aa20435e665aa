//! Helpers for moeshard's cross-process end-to-end tests (coordinator and
//! expert-node daemons on loopback and in network namespaces). Those tests come
//! with the expert-node daemon; the engine's and CLI's tests live in
//! `coordinator/tests/it`, next to the binary they run.
