//! Entry points for the cargo-fuzz targets in `shared/fuzz`, kept here so that
//! crash inputs can be replayed by ordinary unit tests.
//!
//! OWNED BY HELPER "gguf" (being written).
