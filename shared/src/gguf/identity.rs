//! Model identity: a SHA-256 digest of what defines a model, its metadata and tensor table.
//!
//! A node refuses a plan or a coordinator for a model file other than its own, so both
//! sides must compute the same 32 bytes from the same model however it is stored. The
//! digest therefore covers a canonical form rather than the raw header bytes: the
//! metadata without the `split.*` keys (a model split by `gguf-split` is the same model
//! as the merged file) and each tensor's name, type and shape without its part and
//! offset (which only say where the bytes lie). Weights are not read: hashing 500 GB on
//! every start would take minutes, and the tensor table already pins the shapes and
//! types the protocol relies on.

use sha2::{Digest, Sha256};

use super::writer::{serialize_raw_header, RawTensorInfo};
use super::GgufFile;

/// Prefix of the hashed bytes, so a digest of this form is never mistaken for another.
const DOMAIN: &[u8] = b"moeshard model identity v1\0";

/// Metadata keys left out of the identity: they describe how a model is stored.
fn is_storage_key(key: &str) -> bool {
    key.starts_with("split.")
}

/// The model identity of `file`: SHA-256 of a canonical header (metadata without the
/// `split.*` keys, then each tensor's name, type and shape in file order).
pub fn model_identity(file: &GgufFile) -> [u8; 32] {
    let metadata: Vec<_> = file
        .metadata()
        .iter()
        .filter(|(k, _)| !is_storage_key(k))
        .cloned()
        .collect();
    let tensors: Vec<_> = file
        .tensors()
        .iter()
        .map(|t| RawTensorInfo {
            name: t.name.clone(),
            ne: t.ne.clone(),
            type_id: t.ty.id(),
            offset: 0,
        })
        .collect();
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    hasher.update(serialize_raw_header(3, &metadata, &tensors));
    hasher.finalize().into()
}
