//! Keys and message authentication (HMAC-SHA256) for what Vireo must not
//! take on trust: a snapshot directory (anyone can write one; only a VMM
//! holding the user's snapshot key can sign one) and a migration source
//! (anyone who can reach the port can connect; only one holding the shared
//! migration key can answer the destination's challenge).
//!
//! Invariants: a key is at least [`MIN_KEY`] bytes, read from a file only
//! its owner can read; tags are compared in constant time (the `hmac`
//! crate's `verify_slice`); challenges are fresh random bytes from the
//! kernel (`getrandom`).

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::VmmError;

/// The shortest key accepted, in bytes.
pub const MIN_KEY: usize = 16;
/// Bytes of a MAC tag (HMAC-SHA256).
pub const TAG: usize = 32;

/// A secret key. Its bytes never appear in messages or Debug output.
#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
    /// Where it came from, for messages.
    pub path: PathBuf,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.path.display())
    }
}

fn bad_key(path: &Path, why: String) -> VmmError {
    VmmError::Config(format!("key file {}: {why}", path.display()))
}

impl Key {
    /// A key from `path`: its contents, surrounding whitespace trimmed.
    /// Refused if others may read it or if it is too short.
    pub fn from_file(path: &Path) -> Result<Key, VmmError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| bad_key(path, e.to_string()))?;
        let m = f.metadata().map_err(|e| bad_key(path, e.to_string()))?;
        if !m.is_file() {
            return Err(bad_key(path, "not a regular file".into()));
        }
        if m.mode() & 0o077 != 0 {
            return Err(bad_key(
                path,
                format!(
                    "other users may read or write it (mode {:o}); chmod 600 it",
                    m.mode() & 0o777
                ),
            ));
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, 4096), &mut bytes)
            .map_err(|e| bad_key(path, e.to_string()))?;
        let trimmed = bytes.trim_ascii().to_vec();
        if trimmed.len() < MIN_KEY {
            return Err(bad_key(
                path,
                format!(
                    "{} bytes; a key has at least {MIN_KEY} (e.g. head -c 32 /dev/urandom | base64)",
                    trimmed.len()
                ),
            ));
        }
        Ok(Key {
            bytes: trimmed,
            path: path.to_path_buf(),
        })
    }

    /// The key at `path`, made first (32 random bytes, hex, mode 0600, in
    /// a directory made 0700) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Key, VmmError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if path.symlink_metadata().is_err() {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| bad_key(path, format!("cannot make its directory: {e}")))?;
            }
            let hex: String = random::<32>().iter().map(|b| format!("{b:02x}")).collect();
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
            {
                Ok(mut f) => {
                    f.write_all(hex.as_bytes())
                        .and_then(|_| f.write_all(b"\n"))
                        .and_then(|_| f.sync_all())
                        .map_err(|e| bad_key(path, format!("cannot write: {e}")))?;
                    tracing::info!("made a new snapshot key at {}", path.display());
                }
                // Another VMM made it meanwhile: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(bad_key(path, format!("cannot create: {e}"))),
            }
        }
        Key::from_file(path)
    }

    /// A key from bytes (tests and tools).
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, VmmError> {
        if bytes.len() < MIN_KEY {
            return Err(VmmError::Config(format!(
                "a key has at least {MIN_KEY} bytes"
            )));
        }
        Ok(Key {
            bytes: bytes.to_vec(),
            path: PathBuf::from("(given)"),
        })
    }

    fn mac_of(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        for p in parts {
            // Length-prefixed, so ("ab","c") and ("a","bc") differ.
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// The tag of `parts` under this key.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG] {
        self.mac_of(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac_of(parts).verify_slice(tag).is_ok()
    }
}

/// `N` random bytes from the kernel.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: writes at most N - got bytes into b[got..], which is ours.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, 0) };
        if r > 0 {
            got += r as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom only fails before the pool is seeded on ancient
            // kernels or with bad arguments; never hand out a weak nonce.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    b
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of lower-case or upper-case hex `s`, if it is hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_under_the_same_key_and_parts() {
        let k = Key::from_bytes(b"0123456789abcdef-key").unwrap();
        let other = Key::from_bytes(b"0123456789abcdef-kez").unwrap();
        let t = k.tag(&[b"ab", b"c"]);
        assert!(k.verify(&[b"ab", b"c"], &t));
        assert!(!k.verify(&[b"a", b"bc"], &t), "parts are delimited");
        assert!(!other.verify(&[b"ab", b"c"], &t));
        assert!(!k.verify(&[b"ab", b"c"], &t[..31]));
        assert!(Key::from_bytes(b"short").is_err());
        assert_eq!(unhex(&hex(&t)).unwrap(), t.to_vec());
        assert_eq!(unhex("zz"), None);
        assert_ne!(random::<32>(), random::<32>());
    }

    #[test]
    fn key_files_are_private_and_made_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vireo-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("snapshot.key");
        let a = Key::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Key::load_or_create(&path).unwrap();
        assert_eq!(
            a.tag(&[b"x"]),
            b.tag(&[b"x"]),
            "the same key the second time"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::from_file(&path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let short = dir.join("short");
        std::fs::write(&short, b"abc\n").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Key::from_file(&short).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
