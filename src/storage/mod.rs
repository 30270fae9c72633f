//! Image storage: content-addressed blobs behind a `Store` trait, and signed expiring links
//! that the server itself serves (`response_format=url`).

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image store i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid image key")]
    BadKey,
}

/// Where encoded images live. Keys are `<sha256 hex>.<ext>`, so identical images are stored once.
pub trait Store: Send + Sync {
    fn put(&self, bytes: &[u8], ext: &str) -> Result<String, StoreError>;
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        let (hash, ext) = key.split_once('.').ok_or(StoreError::BadKey)?;
        let valid = hash.len() == 64
            && hash
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && matches!(ext, "png" | "jpeg" | "webp");
        if !valid {
            return Err(StoreError::BadKey);
        }
        Ok(self.root.join(&hash[..2]).join(key))
    }
}

impl Store for FsStore {
    fn put(&self, bytes: &[u8], ext: &str) -> Result<String, StoreError> {
        let key = format!("{}.{ext}", hex::encode(Sha256::digest(bytes)));
        let path = self.path_of(&key)?;
        if path.is_file() {
            return Ok(key);
        }
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().unwrap_or(&self.root)).map_err(io)?;
        let tmp = path.with_extension(format!("{ext}.partial-{}", uuid::Uuid::new_v4()));
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(key)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path_of(key)?;
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }
}

/// HMAC-signed, expiring image links: `/v1/files/images/<key>?expires=<unix s>&sig=<hex>`.
#[derive(Clone)]
pub struct LinkSigner {
    secret: Vec<u8>,
}

impl LinkSigner {
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    fn mac(&self, key: &str, expires: u64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(b"candela-image-link\0");
        mac.update(key.as_bytes());
        mac.update(b"\0");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    pub fn path(&self, key: &str, expires: u64) -> String {
        let sig = hex::encode(self.mac(key, expires).finalize().into_bytes());
        format!("/v1/files/images/{key}?expires={expires}&sig={sig}")
    }

    /// Constant-time signature check plus expiry.
    pub fn verify(&self, key: &str, expires: u64, sig: &str, now: u64) -> bool {
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        expires >= now && self.mac(key, expires).verify_slice(&sig).is_ok()
    }
}

pub fn load_or_create_link_secret(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    let path = data_dir.join("link_secret");
    if let Ok(s) = std::fs::read(&path) {
        if s.len() >= 32 {
            return Ok(s);
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let secret: [u8; 32] = rand::random();
    let secret = hex::encode(secret).into_bytes();
    std::fs::write(&path, &secret)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_content_addressed_and_rejects_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().to_path_buf());
        let a = store.put(b"hello", "png").unwrap();
        assert_eq!(a, store.put(b"hello", "png").unwrap());
        assert_eq!(store.get(&a).unwrap().unwrap(), b"hello");
        assert!(store.get("../../etc/passwd.png").is_err());
        assert!(store.get(&format!("{}.exe", &a[..64])).is_err());
    }

    #[test]
    fn links_expire_and_resist_tampering() {
        let s = LinkSigner::new(b"k".repeat(32));
        let key = format!("{}.png", "a".repeat(64));
        let path = s.path(&key, 1000);
        let sig = path.rsplit("sig=").next().unwrap();
        assert!(s.verify(&key, 1000, sig, 999));
        assert!(!s.verify(&key, 1000, sig, 1001), "expired");
        assert!(!s.verify(&key, 2000, sig, 999), "expiry changed");
        assert!(
            !s.verify(&format!("{}.png", "b".repeat(64)), 1000, sig, 999),
            "other key"
        );
    }
}
