//! Helpers for moeshard's end-to-end tests: where the fixtures and the built binaries are.

use std::path::PathBuf;

/// The committed fixtures folder (`tests/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}
