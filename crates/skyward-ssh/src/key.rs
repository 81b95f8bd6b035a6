//! The pool's SSH key: ed25519, created once per pool, private half in a 0600 file.

use crate::SshError;
use rand::TryRngCore;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the private key inside the pool's state directory.
pub const KEY_FILE: &str = "id_ed25519";

/// The pool's ed25519 key pair. `Debug` shows only the public fingerprint.
#[derive(Clone)]
pub struct PoolKey {
    private: Arc<PrivateKey>,
    public_openssh: String,
    path: PathBuf,
}

impl std::fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolKey").field("path", &self.path).field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

fn local_error(path: &Path, message: impl std::fmt::Display) -> SshError {
    SshError::Local { path: path.display().to_string(), message: message.to_string() }
}

impl PoolKey {
    /// Load `dir/id_ed25519`, or create it (mode 0600; `dir` 0700) with its `.pub` beside it.
    /// A key file readable by group or others is refused, as OpenSSH does.
    pub fn load_or_create(dir: &Path) -> Result<PoolKey, SshError> {
        let path = dir.join(KEY_FILE);
        if path.exists() {
            let meta = std::fs::metadata(&path).map_err(|e| local_error(&path, e))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(local_error(
                    &path,
                    format!("private key has mode {mode:o}; it must be 0600 (hint: chmod 600 {})", path.display()),
                ));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| local_error(&path, e))?;
            let private =
                PrivateKey::from_openssh(text.as_bytes()).map_err(|e| local_error(&path, format!("not an OpenSSH private key: {e}")))?;
            return Self::from_private(private, path);
        }
        std::fs::create_dir_all(dir).map_err(|e| local_error(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| local_error(dir, e))?;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| local_error(&path, format!("no randomness for a key: {e}")))?;
        let private = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        seed.fill(0);
        let pem = private.to_openssh(LineEnding::LF).map_err(|e| local_error(&path, e))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| local_error(&path, format!("cannot create key file: {e}")))?;
        file.write_all(pem.as_bytes()).map_err(|e| local_error(&path, e))?;
        let key = Self::from_private(private, path.clone())?;
        let pub_path = dir.join(format!("{KEY_FILE}.pub"));
        std::fs::write(&pub_path, format!("{}\n", key.public_openssh)).map_err(|e| local_error(&pub_path, e))?;
        Ok(key)
    }

    fn from_private(private: PrivateKey, path: PathBuf) -> Result<PoolKey, SshError> {
        let public_openssh = private.public_key().to_openssh().map_err(|e| local_error(&path, e))?;
        Ok(PoolKey { private: Arc::new(private), public_openssh, path })
    }

    /// The public key in `authorized_keys` form.
    pub fn public_openssh(&self) -> &str {
        &self.public_openssh
    }

    /// `SHA256:...` fingerprint of the public key.
    pub fn fingerprint(&self) -> String {
        self.private.public_key().fingerprint(HashAlg::Sha256).to_string()
    }

    /// Path of the private key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn private(&self) -> Arc<PrivateKey> {
        Arc::clone(&self.private)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_private_mode_and_reloaded_identically() {
        let dir = std::env::temp_dir().join(format!("skyward-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = PoolKey::load_or_create(&dir).unwrap();
        let mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(a.public_openssh().starts_with("ssh-ed25519 "));
        let b = PoolKey::load_or_create(&dir).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(!format!("{a:?}").contains("PRIVATE"));
        std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PoolKey::load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("must be 0600"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
