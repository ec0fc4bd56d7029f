//! Per-person data keys (crypto-shredding, R5/R9).
//!
//! Every template is sealed with AES-256-GCM under a random data key of its
//! person at one estate. The data key is kept only in the vault: a directory
//! apart from the template database, one file per key, the key wrapped
//! (AES-256-GCM) by the tenant key. Deleting a person overwrites and removes
//! the key file, so a copy of the template database taken before the
//! deletion, or a backup of it, can no longer be decrypted by anyone.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Vault failures. Messages name files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A file could not be read or written.
    #[error("key vault {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No randomness.
    #[error("no randomness available: {0}")]
    Random(String),
    /// A wrapped key or ciphertext did not authenticate.
    #[error("a key or template did not decrypt (wrong tenant key, or tampered)")]
    Decrypt,
    /// The key does not exist (destroyed).
    #[error("data key {0} does not exist")]
    Missing(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VaultError + '_ {
    move |source| VaultError::Io { path: path.to_owned(), source }
}

fn random<const N: usize>() -> Result<[u8; N], VaultError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| VaultError::Random(e.to_string()))?;
    Ok(b)
}

/// Seals `msg` under `key` bound to `aad`: nonce || ciphertext.
pub fn seal(key: &[u8; 32], aad: &[u8], msg: &[u8]) -> Result<Vec<u8>, VaultError> {
    let nonce: [u8; 12] = random()?;
    let ct =
        Aes256Gcm::new(key.into()).encrypt(&nonce.into(), Payload { msg, aad }).map_err(|_| VaultError::Decrypt)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens what [`seal`] produced with the same key and `aad`.
pub fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
    if sealed.len() < 28 {
        return Err(VaultError::Decrypt);
    }
    let (nonce, ct) = sealed.split_at(12);
    let nonce = <[u8; 12]>::try_from(nonce).map_err(|_| VaultError::Decrypt)?;
    Aes256Gcm::new(key.into()).decrypt(&nonce.into(), Payload { msg: ct, aad }).map_err(|_| VaultError::Decrypt)
}

/// The key vault of one tenant.
pub struct Vault {
    dir: PathBuf,
    tenant_key: [u8; 32],
    tenant_id: String,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("dir", &self.dir).field("tenant_id", &self.tenant_id).finish_non_exhaustive()
    }
}

/// Loads a 32-byte key file, creating it (mode 0600) when missing and allowed.
pub fn load_or_create_key(path: &Path, generate: bool) -> Result<[u8; 32], VaultError> {
    match std::fs::read(path) {
        Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| VaultError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "a key file must hold exactly 32 bytes"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
            let key: [u8; 32] = random()?;
            write_private(path, &key)?;
            Ok(key)
        }
        Err(e) => Err(VaultError::Io { path: path.to_owned(), source: e }),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(path);
    Ok(())
}

fn sync_dir(path: &Path) {
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
}

impl Vault {
    /// Opens (creating) the vault directory of `tenant_id`.
    pub fn open(dir: &Path, tenant_id: &str, tenant_key: [u8; 32]) -> Result<Self, VaultError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Self { dir: dir.to_owned(), tenant_key, tenant_id: tenant_id.to_owned() })
    }

    fn path(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}.key"))
    }

    fn aad(&self, key_id: &str) -> Vec<u8> {
        format!("estate.facematch.dek.v1\0{}\0{key_id}", self.tenant_id).into_bytes()
    }

    /// Creates a new data key; returns its id and the key.
    pub fn create(&self) -> Result<(String, [u8; 32]), VaultError> {
        let key_id = format!("dek-{}", uuid::Uuid::new_v4().simple());
        let key: [u8; 32] = random()?;
        let wrapped = seal(&self.tenant_key, &self.aad(&key_id), &key)?;
        write_private(&self.path(&key_id), &wrapped)?;
        Ok((key_id, key))
    }

    /// The data key `key_id`, unwrapped.
    pub fn get(&self, key_id: &str) -> Result<[u8; 32], VaultError> {
        if !valid_id(key_id) {
            return Err(VaultError::Missing(key_id.to_owned()));
        }
        let path = self.path(key_id);
        let wrapped = match std::fs::read(&path) {
            Ok(w) => w,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(VaultError::Missing(key_id.to_owned())),
            Err(e) => return Err(VaultError::Io { path, source: e }),
        };
        let key = open(&self.tenant_key, &self.aad(key_id), &wrapped)?;
        <[u8; 32]>::try_from(key.as_slice()).map_err(|_| VaultError::Decrypt)
    }

    /// Destroys `key_id`: overwrites the file with zeros, syncs, removes it.
    /// Destroying a key that is gone succeeds.
    pub fn destroy(&self, key_id: &str) -> Result<(), VaultError> {
        if !valid_id(key_id) {
            return Ok(());
        }
        let path = self.path(key_id);
        match std::fs::metadata(&path) {
            Ok(meta) => {
                let mut f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                let len = usize::try_from(meta.len()).unwrap_or(0);
                f.write_all(&vec![0u8; len]).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                drop(f);
                std::fs::remove_file(&path).map_err(io(&path))?;
                sync_dir(&path);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VaultError::Io { path, source: e }),
        }
    }

    /// Ids of every key in the vault (to destroy orphans after a crash).
    pub fn key_ids(&self) -> Result<Vec<String>, VaultError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".key")
                && valid_id(id)
            {
                out.push(id.to_owned());
            }
        }
        Ok(out)
    }
}

fn valid_id(key_id: &str) -> bool {
    key_id.starts_with("dek-") && key_id.len() <= 64 && key_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destroyed_keys_are_gone_and_a_foreign_tenant_key_does_not_open() -> Result<(), VaultError> {
        let dir = tempfile::tempdir().map_err(io(Path::new("tmp")))?;
        let vault = Vault::open(dir.path(), "t1", [7; 32])?;
        let (id, key) = vault.create()?;
        assert_eq!(vault.get(&id)?, key);
        let other = Vault::open(dir.path(), "t1", [8; 32])?;
        assert!(matches!(other.get(&id), Err(VaultError::Decrypt)));
        let sealed = seal(&key, b"t-1", b"template")?;
        assert_eq!(open(&key, b"t-1", &sealed)?, b"template");
        assert!(open(&key, b"t-2", &sealed).is_err());
        vault.destroy(&id)?;
        assert!(matches!(vault.get(&id), Err(VaultError::Missing(_))));
        vault.destroy(&id)?;
        assert!(vault.key_ids()?.is_empty());
        Ok(())
    }
}
