//! SCRAM-SHA-256 verifiers in PostgreSQL's `pg_authid` format:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts, RFC 5802 §3).
//!
//! pgtenant stores only these, never passwords. `mock` builds a stable stand-in for unknown
//! users so that an unknown tenant or user costs the same work as a wrong password.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// A parsed SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// Why a verifier string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid SCRAM verifier: {0} (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as printed by `pgtenant passwd`)"
)]
pub struct VerifierError(&'static str);

impl ScramVerifier {
    /// Parses the `pg_authid` format.
    pub fn parse(text: &str) -> Result<Self, VerifierError> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(VerifierError("missing SCRAM-SHA-256$ prefix"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(VerifierError("missing '$' before the keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(VerifierError("missing ':' between iterations and salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(VerifierError("missing ':' between the keys"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| VerifierError("iterations is not a number"))?;
        if iterations == 0 {
            return Err(VerifierError("iterations must be positive"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| VerifierError("salt is not base64"))?;
        if salt.is_empty() {
            return Err(VerifierError("salt is empty"));
        }
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// A verifier for `password` with a random salt and 4096 iterations (PostgreSQL's default),
    /// computed by postgres-protocol exactly as `PQencryptPasswordConn` does (with SASLprep).
    pub fn from_password(password: &[u8]) -> String {
        postgres_protocol::password::scram_sha_256(password)
    }

    /// A stand-in verifier for an identity that does not exist: its salt is stable for the
    /// same `identity` (so repeated probes see the same salt) and its keys match no password.
    pub fn mock(process_secret: &[u8; 32], identity: &str) -> Self {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut mac = match Hmac::<Sha256>::new_from_slice(process_secret) {
                Ok(mac) => mac,
                Err(_) => return [0; 32],
            };
            mac.update(label);
            mac.update(identity.as_bytes());
            mac.finalize().into_bytes().into()
        };
        ScramVerifier {
            iterations: 4096,
            salt: derive(b"salt")[..16].to_vec(),
            stored_key: derive(b"stored"),
            server_key: derive(b"server"),
        }
    }
}

fn key32(text: &str) -> Result<[u8; 32], VerifierError> {
    B64.decode(text)
        .map_err(|_| VerifierError("key is not base64"))?
        .try_into()
        .map_err(|_| VerifierError("key is not 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_postgres_protocol_makes() {
        let text = ScramVerifier::from_password(b"secret");
        let v = ScramVerifier::parse(&text).unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt.len(), 16);
    }

    #[test]
    fn refuses_malformed_verifiers() {
        for bad in [
            "",
            "md5abcdef",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$AAAA:AAAA",
        ] {
            assert!(ScramVerifier::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mock_verifiers_are_stable_per_identity() {
        let secret = [7u8; 32];
        assert_eq!(
            ScramVerifier::mock(&secret, "acme/app"),
            ScramVerifier::mock(&secret, "acme/app")
        );
        assert_ne!(
            ScramVerifier::mock(&secret, "acme/app").salt,
            ScramVerifier::mock(&secret, "acme/other").salt
        );
    }

    #[test]
    fn debug_output_hides_keys() {
        let v = ScramVerifier::parse(&ScramVerifier::from_password(b"pw")).unwrap();
        let shown = format!("{v:?}");
        assert!(!shown.contains(&format!("{:?}", v.stored_key)));
    }
}
