//! This node's WireGuard identity: a Curve25519 key pair made on the first
//! start and kept in one root-only file that never leaves the node, and the
//! limit on the handshakes it answers.

use std::{
    fmt,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
};

use base64::{Engine, engine::general_purpose::STANDARD};
use boringtun::{noise::rate_limiter::RateLimiter, x25519};
use serde::{Deserialize, Serialize};

/// Key material failures. Each says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a WireGuard private key (32 bytes in base64); move it aside and a new key is made"
    )]
    BadKeyFile { path: PathBuf },
    #[error(
        "{path} is readable by others than root (mode {mode:o}); `chmod 600` it, or move it aside and a new key is made"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("no randomness from the kernel: {0}")]
    Random(std::io::Error),
}

/// A WireGuard public key, written in base64 as `wg` writes it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The key as x25519 wants it.
    pub fn x25519(&self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| format!("invalid WireGuard public key {s:?}: {e}"))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            format!("invalid WireGuard public key {s:?}: it must be 32 bytes in base64")
        })?;
        Ok(PublicKey(key))
    }
}

impl TryFrom<String> for PublicKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_string()
    }
}

/// Handshake messages an identity checks per second before it asks their
/// senders to prove their address with a cookie first (WireGuard §5.4.7);
/// boringtun's own device allows as many. An initiation that gets answered
/// is checked twice (by the engine before its Diffie-Hellman, then by the
/// tunnel that answers it), so about half as many initiations a second go
/// through without a cookie.
pub const HANDSHAKES_PER_SECOND: u64 = 100;

/// A key pair, and the limiter of the handshakes sent to it. The private
/// half is never printed, serialised or sent.
#[derive(Clone)]
pub struct Identity {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Checks mac1 (keyed by this public key) and mac2 of handshake
    /// messages before any Diffie-Hellman is spent on them, and answers
    /// with cookies under load. One per key, shared by the engine and
    /// every tunnel of this key (clones share it); the engine's timer
    /// thread resets its count each second.
    limiter: Arc<RateLimiter>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public_key())
    }
}

impl Identity {
    /// A new key pair from the kernel's randomness.
    pub fn generate() -> Result<Identity, KeyError> {
        let mut bytes = [0u8; 32];
        crate::random::fill(&mut bytes).map_err(KeyError::Random)?;
        Ok(Identity::from_secret(bytes))
    }

    /// The key pair of a private key (clamped by x25519 as it is used).
    pub fn from_secret(bytes: [u8; 32]) -> Identity {
        let secret = x25519::StaticSecret::from(bytes);
        let public = x25519::PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND));
        Identity {
            secret,
            public,
            limiter,
        }
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(*self.public.as_bytes())
    }

    /// The private half, for the protocol engine.
    pub fn secret(&self) -> &x25519::StaticSecret {
        &self.secret
    }

    /// The public half, for the protocol engine.
    pub fn public(&self) -> &x25519::PublicKey {
        &self.public
    }

    /// The handshake limiter of this key, for the protocol engine and this
    /// key's tunnels.
    pub fn limiter(&self) -> &Arc<RateLimiter> {
        &self.limiter
    }
}

/// File name of the node's private key in its key directory.
pub const KEY_FILE: &str = "wireguard.key";

/// The node's private key file: `<dir>/wireguard.key`, mode 0600 in a
/// 0700 directory, replaced atomically.
pub struct KeyFile {
    dir: PathBuf,
}

impl KeyFile {
    /// The key file in `dir`.
    pub fn in_dir(dir: &Path) -> KeyFile {
        KeyFile {
            dir: dir.to_owned(),
        }
    }

    /// Its path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// The stored identity, or a new one stored now (first start). The
    /// bool says whether it was made now.
    pub fn load_or_create(&self) -> Result<(Identity, bool), KeyError> {
        let path = self.path();
        match fs::metadata(&path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Exposed { path, mode });
                }
                let text = fs::read_to_string(&path).map_err(|source| KeyError::Io {
                    action: "read",
                    path: path.clone(),
                    source,
                })?;
                let bytes = STANDARD
                    .decode(text.trim())
                    .map_err(|_| KeyError::BadKeyFile { path: path.clone() })?;
                let secret: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| KeyError::BadKeyFile { path: path.clone() })?;
                Ok((Identity::from_secret(secret), false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::generate()?;
                self.store(&id)?;
                Ok((id, true))
            }
            Err(source) => Err(KeyError::Io {
                action: "stat",
                path,
                source,
            }),
        }
    }

    /// Replaces the stored identity with `id`: written to a 0600 temporary
    /// file, synced, renamed over the old one.
    pub fn store(&self, id: &Identity) -> Result<(), KeyError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| KeyError::Io {
                action,
                path,
                source,
            }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io("create", &self.dir))?;
        let tmp = self.dir.join(format!("{KEY_FILE}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        let text = format!("{}\n", STANDARD.encode(id.secret.to_bytes()));
        f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        let path = self.path();
        fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;

    #[test]
    fn first_start_makes_a_root_only_key_and_later_starts_reuse_it() {
        let tmp = TestDir::new("keys-create");
        let dir = tmp.path();
        let file = KeyFile::in_dir(dir);
        let (a, made) = file.load_or_create().unwrap();
        assert!(made);
        let mode = fs::metadata(file.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (b, made) = file.load_or_create().unwrap();
        assert!(!made);
        assert_eq!(a.public_key(), b.public_key());
    }

    #[test]
    fn a_key_others_can_read_or_a_bad_file_is_refused() {
        let tmp = TestDir::new("keys-refuse");
        let file = KeyFile::in_dir(tmp.path());
        file.load_or_create().unwrap();
        fs::set_permissions(file.path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            file.load_or_create(),
            Err(KeyError::Exposed { .. })
        ));
        fs::set_permissions(file.path(), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(file.path(), "not a key\n").unwrap();
        let err = file.load_or_create().unwrap_err();
        assert!(err.to_string().contains("move it aside"), "{err}");
    }

    #[test]
    fn public_keys_round_trip_through_base64_and_json() {
        let id = Identity::generate().unwrap();
        let k = id.public_key();
        assert_eq!(k.to_string().len(), 44);
        assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), k);
        assert!("AAAA".parse::<PublicKey>().is_err());
        assert!("not base64!".parse::<PublicKey>().is_err());
        assert_ne!(Identity::generate().unwrap().public_key(), k);
    }
}
