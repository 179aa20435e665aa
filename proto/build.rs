//! Generates the Rust types of `proto/moeshard.proto` with prost-build, and the gRPC
//! client and server of its `ExpertNode` service with tonic-prost-build (into the same
//! file, so both live in `proto::wire`).
//!
//! prost-build runs the system `protoc` (Debian's `protobuf-compiler`, which CI installs),
//! or the one `PROTOC` names; without one the build stops here with a message saying so
//! rather than with prost-build's panic.

use std::path::PathBuf;
use std::process::Command;

const SCHEMA: &str = "proto/moeshard.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={SCHEMA}");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let protoc = std::env::var_os("PROTOC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("protoc"));
    match Command::new(&protoc).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "`{} --version` failed ({}): the proto crate needs protoc to compile {SCHEMA}",
                protoc.display(),
                out.status
            )
            .into())
        }
        Err(e) => {
            return Err(format!(
                "cannot run protoc ({}: {e}): the proto crate needs it to compile {SCHEMA}; \
                 install it (Debian/Ubuntu: apt-get install protobuf-compiler) or set PROTOC",
                protoc.display()
            )
            .into())
        }
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_with_config(config, &[SCHEMA], &["proto"])?;
    Ok(())
}
