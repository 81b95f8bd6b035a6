//! The executable shipped to nodes: its hash (the cache key on every node) and its ELF facts.

use sha2::{Digest, Sha256};
use skyward_function::elf::{self, BinaryFacts};
use skyward_proto::message::BinaryHash;
use std::io::Read;
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
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok(ShippedBinary { path: path.to_path_buf(), hash: BinaryHash(hasher.finalize().into()), len, facts })
}
