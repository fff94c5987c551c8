//! A shared shard's context key (`context_key_file`): loaded, generated and written with
//! private permissions, and the HMAC tokens pgtenant binds with it (the protocol is described
//! in `tenant::context`).

use std::fmt::Write as _;
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::TenantId;

/// Key length in bytes (the SHA-256 block is 64; 32 random bytes are the usual HMAC key).
const KEY_LEN: usize = 32;
const BLOCK: usize = 64;

/// A shard's context key, and the counter that makes each token unique.
pub struct ContextKey([u8; KEY_LEN], std::sync::atomic::AtomicU64);

impl std::fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextKey(..)")
    }
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: expected {KEY_LEN} bytes as {digits} hex digits", digits = KEY_LEN * 2)]
    Format(String),
    #[error("{0}: readable by others; run chmod 600 on it")]
    Permissions(String),
}

impl ContextKey {
    /// A new random key.
    pub fn generate() -> ContextKey {
        ContextKey(rand::random(), Default::default())
    }

    /// A new token for `tenant` on backend `pid` (the counter advances).
    pub fn next_token(&self, tenant: TenantId, pid: i32) -> String {
        let n = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.token(tenant, pid, n)
    }

    /// Reads a key file (hex, one line). The file must not be readable by group or others.
    pub fn load(path: &Path) -> Result<ContextKey, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: shown.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path)
                .map_err(|source| KeyError::Io {
                    path: shown.clone(),
                    source,
                })?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions(shown));
            }
        }
        Self::from_hex(text.trim()).ok_or(KeyError::Format(shown))
    }

    /// Writes the key to `path` with mode 0600, refusing to overwrite an existing file.
    pub fn create(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write as _;
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        file.write_all(format!("{}\n", hex(&self.0)).as_bytes())
            .map_err(io)
    }

    fn from_hex(text: &str) -> Option<ContextKey> {
        if text.len() != KEY_LEN * 2 {
            return None;
        }
        let mut key = [0u8; KEY_LEN];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ContextKey(key, Default::default()))
    }

    /// The token binding `tenant` on the backend `pid`; `counter` makes every token unique.
    pub fn token(&self, tenant: TenantId, pid: i32, counter: u64) -> String {
        let message = format!("{tenant}:{pid}:{counter}");
        // A 32-byte key is always accepted by HMAC.
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(message.as_bytes());
        format!("{message}:{}", hex(&mac.finalize().into_bytes()))
    }

    /// The namespace of `tenant`'s advisory lock keys on this shard: a value only pgtenant can
    /// compute (the key is secret), the same for every pgtenant sharing the key.
    pub fn lock_salt(&self, tenant: TenantId) -> u64 {
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) else {
            return 0;
        };
        mac.update(format!("advisory-locks:{tenant}").as_bytes());
        let out = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out[..8]);
        u64::from_be_bytes(first)
    }

    /// The HMAC inner and outer padded keys, as the database stores them.
    fn pads(&self) -> ([u8; BLOCK], [u8; BLOCK]) {
        let mut inner = [0x36u8; BLOCK];
        let mut outer = [0x5cu8; BLOCK];
        for (i, k) in self.0.iter().enumerate() {
            inner[i] ^= k;
            outer[i] ^= k;
        }
        (inner, outer)
    }

    /// SQL that stores this key's pads on the shard (run by `shard init`, as the admin).
    pub fn store_sql(&self) -> String {
        let (inner, outer) = self.pads();
        format!(
            "TRUNCATE pgtenant.context_key; \
             INSERT INTO pgtenant.context_key (inner_pad, outer_pad) \
             VALUES ('\\x{}'::bytea, '\\x{}'::bytea)",
            hex(&inner),
            hex(&outer)
        )
    }

    /// A short fingerprint of the key (to compare the file with the shard without showing
    /// the key): hex of HMAC("pgtenant key check"), first 16 digits.
    pub fn fingerprint(&self) -> String {
        let token = self.token(TenantId(uuid::Uuid::nil()), 0, 0);
        token
            .rsplit(':')
            .next()
            .unwrap_or("")
            .chars()
            .take(16)
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_rfc2104_hmac() {
        // RFC 4231 test case 2 uses a short key; check our pads against the hmac crate instead.
        let key = ContextKey([7u8; KEY_LEN], Default::default());
        let id = TenantId::parse("6f1c2b7e-1d0a-4c39-9d0e-6f3b2a1c9e01").unwrap();
        let token = key.token(id, 4242, 9);
        let (inner, outer) = key.pads();
        let msg = "6f1c2b7e-1d0a-4c39-9d0e-6f3b2a1c9e01:4242:9";
        use sha2::Digest as _;
        let ih = Sha256::new()
            .chain_update(inner)
            .chain_update(msg.as_bytes())
            .finalize();
        let oh = Sha256::new()
            .chain_update(outer)
            .chain_update(ih)
            .finalize();
        assert_eq!(token, format!("{msg}:{}", hex(&oh)));
    }

    #[test]
    fn key_files_round_trip_and_must_be_private() {
        let dir = std::env::temp_dir().join(format!("pgt-key-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let key = ContextKey::generate();
        key.create(&path).unwrap();
        assert_eq!(ContextKey::load(&path).unwrap().0, key.0);
        assert!(key.create(&path).is_err(), "never overwrites");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                ContextKey::load(&path),
                Err(KeyError::Permissions(_))
            ));
        }
        std::fs::write(dir.join("bad"), "zz").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.join("bad"), std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        assert!(matches!(
            ContextKey::load(&dir.join("bad")),
            Err(KeyError::Format(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
