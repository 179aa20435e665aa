//! moeshard's cross-process end-to-end tests: one binary, one module per area
//! (none yet: they come with the expert-node daemon).
