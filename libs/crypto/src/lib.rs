//! Key material of the mesh and the operations on it.
//!
//! - [`SigningKeyPair`]: Ed25519 keys with a key id, used for access tokens and,
//!   in later services, consent attestations (R9), audit checkpoints (R11) and
//!   deletion certificates (R6).
//! - [`KeyedHasher`]: HMAC-SHA256 under a mesh secret, for phone numbers (never
//!   stored in clear) and pseudonymous person ids (R17).
//!
//! Keys live in files of mode 0600 in a keys directory; the embedded default
//! generates them on first start, the distributed mode mounts them as secrets.

pub mod key_list;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors of key loading and signing.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but does not hold a key of the expected form.
    #[error("key file {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: &'static str },
    /// A key file is missing and generation was not allowed.
    #[error("key file {0} is missing; generate keys or mount them")]
    Missing(PathBuf),
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// PKCS#8 encoding failed.
    #[error("key encoding failed")]
    Encoding,
}

fn random_32() -> Result<[u8; 32], CryptoError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| CryptoError::Random(e.to_string()))?;
    Ok(b)
}

/// Reads a 32-byte key stored as hex text, or creates it when `generate` is set.
fn load_or_create_32(path: &Path, generate: bool) -> Result<[u8; 32], CryptoError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim())
                .map_err(|_| CryptoError::Malformed { path: path.to_owned(), reason: "expected 64 hex characters" })?;
            <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| CryptoError::Malformed { path: path.to_owned(), reason: "expected 32 bytes" })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !generate {
                return Err(CryptoError::Missing(path.to_owned()));
            }
            let key = random_32()?;
            write_secret_file(path, hex::encode(key).as_bytes())?;
            Ok(key)
        }
        Err(source) => Err(CryptoError::Io { path: path.to_owned(), source }),
    }
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file + rename),
/// creating the parent directory with mode 0700.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), CryptoError> {
    let io = |source| CryptoError::Io { path: path.to_owned(), source };
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        fs::create_dir_all(parent).map_err(io)?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(contents).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)
}

/// An Ed25519 key pair with its key id (first 8 bytes of SHA-256 of the
/// public key, hex), so that verifiers can pick the right key after rotation.
#[derive(Clone)]
pub struct SigningKeyPair {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyPair").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl SigningKeyPair {
    /// Loads the key at `path` (64 hex chars of seed), generating it if missing
    /// and `generate` is set.
    pub fn load_or_generate(path: &Path, generate: bool) -> Result<Self, CryptoError> {
        let seed = load_or_create_32(path, generate)?;
        Ok(Self::from_seed(seed))
    }

    /// Builds the pair from a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let key_id = key_id_of(&key.verifying_key());
        Self { key, key_id }
    }

    /// A fresh random key pair (tests, rotation).
    pub fn generate() -> Result<Self, CryptoError> {
        Ok(Self::from_seed(random_32()?))
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half, for publication.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The public key as 32 raw bytes.
    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// PKCS#8 DER of the private key (for JWT libraries).
    pub fn private_pkcs8_der(&self) -> Result<Vec<u8>, CryptoError> {
        self.key.to_pkcs8_der().map(|d| d.as_bytes().to_vec()).map_err(|_| CryptoError::Encoding)
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// The key id of a public key.
pub fn key_id_of(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(&digest[..8])
}

/// Verifies an Ed25519 signature with a raw 32-byte public key.
pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    key.verify(message, &sig).is_ok()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// HMAC-SHA256 under the mesh secret, with domain separation, so that phone
/// numbers can be matched without being stored and persons get stable
/// pseudonyms that reveal nothing (R17).
#[derive(Clone)]
pub struct KeyedHasher {
    secret: [u8; 32],
}

impl std::fmt::Debug for KeyedHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyedHasher(..)")
    }
}

impl KeyedHasher {
    /// Loads the secret at `path`, generating it if missing and allowed.
    pub fn load_or_generate(path: &Path, generate: bool) -> Result<Self, CryptoError> {
        Ok(Self { secret: load_or_create_32(path, generate)? })
    }

    /// Builds a hasher from raw secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    fn mac(&self, domain: &str, tenant_id: &str, value: &str) -> [u8; 32] {
        // The key length is fixed at 32 bytes, which HMAC always accepts.
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => unreachable_hmac(),
        };
        for part in [domain, tenant_id, value] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    /// Keyed hash of a normalised phone number within a tenant, hex.
    pub fn phone_hash(&self, tenant_id: &str, normalised_phone: &str) -> String {
        hex::encode(self.mac("phone.v1", tenant_id, normalised_phone))
    }

    /// Keyed hash of a normalised card number within a tenant, hex: cards are
    /// looked up by it and never stored in clear.
    pub fn card_hash(&self, tenant_id: &str, normalised_card: &str) -> String {
        hex::encode(self.mac("card.v1", tenant_id, normalised_card))
    }

    /// Keyed hash of a visitor pass code within a tenant, hex.
    pub fn visitor_code_hash(&self, tenant_id: &str, code: &str) -> String {
        hex::encode(self.mac("visitor.v1", tenant_id, code))
    }

    /// The key an estate's gates hash cards and visitor codes with in their
    /// offline bundle (R15). Derived per (tenant, estate), so a key taken
    /// from one estate's gate says nothing about another estate's cards.
    pub fn offline_key(&self, tenant_id: &str, estate_id: &str) -> [u8; 32] {
        self.mac("offline-key.v1", tenant_id, estate_id)
    }

    /// The pseudonymous id of a person: stable, tenant-bound, not reversible
    /// without the mesh secret.
    pub fn pseudonym(&self, tenant_id: &str, person_id: &str) -> String {
        format!("psn_{}", hex::encode(&self.mac("pseudonym.v1", tenant_id, person_id)[..16]))
    }
}

/// Seals small secrets that the mesh must read back (QR / TOTP seeds) with
/// AES-256-GCM under a key derived per tenant from a master key, bound to
/// the record they belong to (associated data), so a database dump holds
/// no secret in clear and a sealed value cannot be moved to another record.
#[derive(Clone)]
pub struct SecretBox {
    master: [u8; 32],
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// Loads the master key at `path`, generating it if missing and allowed.
    pub fn load_or_generate(path: &Path, generate: bool) -> Result<Self, CryptoError> {
        Ok(Self { master: load_or_create_32(path, generate)? })
    }

    /// A box with a given master key (tests).
    pub fn from_master(master: [u8; 32]) -> Self {
        Self { master }
    }

    fn cipher(&self, tenant_id: &str) -> aes_gcm::Aes256Gcm {
        use aes_gcm::KeyInit;
        let key = KeyedHasher::from_secret(self.master).mac("secret-box.v1", tenant_id, "");
        aes_gcm::Aes256Gcm::new(&key.into())
    }

    /// Encrypts `plaintext` for `tenant_id`, bound to `record_id`; returns
    /// nonce || ciphertext.
    pub fn seal(&self, tenant_id: &str, record_id: &str, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        use aes_gcm::aead::{Aead, Payload};
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| CryptoError::Random(e.to_string()))?;
        let ct = self
            .cipher(tenant_id)
            .encrypt(&nonce.into(), Payload { msg: plaintext, aad: record_id.as_bytes() })
            .map_err(|_| CryptoError::Encoding)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts what [`SecretBox::seal`] produced for the same tenant and record.
    pub fn open(&self, tenant_id: &str, record_id: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        use aes_gcm::aead::{Aead, Payload};
        if sealed.len() < 12 + 16 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(12);
        let nonce = <[u8; 12]>::try_from(nonce).ok()?;
        self.cipher(tenant_id).decrypt(&nonce.into(), Payload { msg: ct, aad: record_id.as_bytes() }).ok()
    }
}

/// Hash of a normalised card or visitor code under an estate's offline key
/// (see [`KeyedHasher::offline_key`]), hex. `kind` is "card" or "visitor".
/// The gate SDK computes the same from what a reader presents.
pub fn offline_hash(key: &[u8; 32], kind: &str, normalised: &str) -> String {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    for part in ["offline.v1", kind, normalised] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    hex::encode(mac.finalize().into_bytes())
}

/// Canonical form of a card: optional facility code, UID in upper-case hex
/// or decimal digits, separators dropped. `None` when it is not a card.
pub fn normalise_card(uid: &str, facility_code: &str) -> Option<String> {
    let uid: String = uid.chars().filter(|c| !matches!(c, ' ' | ':' | '-')).collect::<String>().to_ascii_uppercase();
    if uid.len() < 4 || uid.len() > 32 || !uid.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let facility = facility_code.trim();
    if facility.len() > 16 || !facility.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(format!("fc={facility};uid={uid}"))
}

/// Canonical form of a visitor pass code; `None` when it cannot be one.
pub fn normalise_visitor_code(code: &str) -> Option<String> {
    let code = code.trim().to_ascii_uppercase();
    (!code.is_empty() && code.len() <= 64).then_some(code)
}

#[allow(clippy::panic)]
fn unreachable_hmac() -> ! {
    // HMAC accepts keys of any length; this cannot happen with a 32-byte key.
    panic!("hmac rejected a 32-byte key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_and_sign() -> Result<(), CryptoError> {
        let dir = tempfile::tempdir().map_err(|e| CryptoError::Io { path: PathBuf::new(), source: e })?;
        let path = dir.path().join("keys/token.ed25519");
        let a = SigningKeyPair::load_or_generate(&path, true)?;
        let b = SigningKeyPair::load_or_generate(&path, false)?;
        assert_eq!(a.key_id(), b.key_id());
        let mode =
            fs::metadata(&path).map_err(|e| CryptoError::Io { path: path.clone(), source: e })?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sig = a.sign(b"hello");
        assert!(verify_signature(&b.public_key_bytes(), b"hello", &sig));
        assert!(!verify_signature(&b.public_key_bytes(), b"hellO", &sig));
        Ok(())
    }

    #[test]
    fn missing_key_without_generation_fails() {
        let r = SigningKeyPair::load_or_generate(Path::new("/nonexistent/dir/k"), false);
        assert!(matches!(r, Err(CryptoError::Missing(_))));
    }

    #[test]
    fn sealed_secrets_open_only_for_their_tenant_and_record() -> Result<(), CryptoError> {
        let b = SecretBox::from_master([3; 32]);
        let sealed = b.seal("t1", "c1", b"seed")?;
        assert_eq!(b.open("t1", "c1", &sealed).as_deref(), Some(&b"seed"[..]));
        assert!(b.open("t2", "c1", &sealed).is_none());
        assert!(b.open("t1", "c2", &sealed).is_none());
        assert!(!sealed.windows(4).any(|w| w == b"seed"));
        Ok(())
    }

    #[test]
    fn pseudonyms_are_tenant_bound() {
        let h = KeyedHasher::from_secret([7; 32]);
        assert_ne!(h.pseudonym("t1", "p"), h.pseudonym("t2", "p"));
        assert_eq!(h.pseudonym("t1", "p"), h.pseudonym("t1", "p"));
        assert_ne!(h.phone_hash("t1", "+86138"), h.phone_hash("t1", "+86139"));
    }
}
