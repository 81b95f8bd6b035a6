//! The executable shipped to nodes: its hash (the cache key on every node) and its ELF facts.

use skyward_function::elf::{self, BinaryFacts};
use skyward_proto::message::BinaryHash;
use std::path::{Path, PathBuf};

/// An executable ready to ship.
#[derive(Debug, Clone)]
pub(crate) struct ShippedBinary {
    /// Where it is on this machine.
    pub(crate) path: PathBuf,
    /// SHA-256 of its bytes.
    pub(crate) hash: BinaryHash,
    /// Size in bytes.
    pub(crate) len: u64,
    /// Architecture and C library it needs.
    pub(crate) facts: BinaryFacts,
}

/// Hash and inspect the executable at `path`, reusing this process's earlier answer while the
/// file's size and modification time are unchanged (a program starting many pools hashes once).
pub(crate) fn inspect(path: &Path) -> Result<ShippedBinary, String> {
    type Key = (PathBuf, u64, std::time::SystemTime);
    static CACHE: std::sync::Mutex<Option<(Key, ShippedBinary)>> = std::sync::Mutex::new(None);
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key: Key = (path.to_path_buf(), meta.len(), meta.modified().map_err(|e| e.to_string())?);
    if let Some((k, shipped)) = CACHE.lock().expect("hash cache").as_ref()
        && *k == key
    {
        return Ok(shipped.clone());
    }
    let shipped = hash_and_inspect(path)?;
    *CACHE.lock().expect("hash cache") = Some((key, shipped.clone()));
    Ok(shipped)
}

fn hash_and_inspect(path: &Path) -> Result<ShippedBinary, String> {
    let facts = elf::inspect_file(path).map_err(|e| format!("cannot ship {}: {e}", path.display()))?;
    let (hash, len) = skyward_provider::sha256_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(ShippedBinary { path: path.to_path_buf(), hash: BinaryHash(hash), len, facts })
}
