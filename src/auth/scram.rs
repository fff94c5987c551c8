//! Server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677, channel binding
//! `tls-server-end-point` from RFC 5929), as PostgreSQL runs it (docs 55.3.1,
//! `src/backend/libpq/auth-scram.c`), sans-IO.
//!
//! The proof is checked against the stored verifier with a constant-time comparison. An
//! exchange that runs against a mock verifier does every step a real one does and fails only
//! at the end, so unknown users cost what wrong passwords cost.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::verifier::ScramVerifier;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
const CB_TYPE: &str = "tls-server-end-point";

/// How an exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    /// The client broke the SCRAM message format (reported as a protocol violation).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for something this server refuses (mechanism, channel binding).
    #[error("{0}")]
    Refused(&'static str),
    /// The proof did not match (or the user does not exist).
    #[error("authentication failed")]
    Failed,
}

enum State {
    AwaitingFirst,
    AwaitingFinal {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
        plus: bool,
    },
    Done,
}

/// One SCRAM exchange.
pub struct ScramServer {
    verifier: ScramVerifier,
    real: bool,
    channel_binding: Option<Vec<u8>>,
    state: State,
}

impl ScramServer {
    /// `real` is false when `verifier` is a mock for an unknown identity. `channel_binding` is
    /// the `tls-server-end-point` hash of the certificate served, when the client is on TLS.
    pub fn new(verifier: ScramVerifier, real: bool, channel_binding: Option<Vec<u8>>) -> Self {
        ScramServer {
            verifier,
            real,
            channel_binding,
            state: State::AwaitingFirst,
        }
    }

    /// Mechanisms to offer, strongest first.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.channel_binding.is_some() {
            &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        } else {
            &[SCRAM_SHA_256]
        }
    }

    /// Handles the client-first-message; returns the server-first-message.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<String, ScramError> {
        if !matches!(self.state, State::AwaitingFirst) {
            return Err(ScramError::Malformed("unexpected client-first-message"));
        }
        let plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if self.channel_binding.is_some() => true,
            _ => return Err(ScramError::Refused("unsupported SASL mechanism")),
        };
        let text = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (flag, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("missing GS2 header"))?;
        match (flag, plus) {
            ("n", false) => {}
            ("y", false) if self.channel_binding.is_some() => {
                // The client supports channel binding and thinks we do not: a downgrade.
                return Err(ScramError::Refused(
                    "SCRAM channel binding negotiation error",
                ));
            }
            ("y", false) => {}
            (f, true) if f == format!("p={CB_TYPE}") => {}
            (f, _) if f.starts_with("p=") => {
                return Err(ScramError::Refused(
                    "unsupported SCRAM channel-binding type or mechanism",
                ));
            }
            _ => return Err(ScramError::Malformed("invalid channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("missing authzid separator"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Refused(
                "client uses authorization identity, but it is not supported",
            ));
        }
        let mut parts = bare.split(',');
        let user = parts.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(ScramError::Refused(
                "mandatory SCRAM extensions are not supported",
            ));
        }
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed("expected username attribute"));
        }
        let client_nonce = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected nonce attribute"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ScramError::Malformed("invalid nonce"));
        }
        let mut server_nonce = [0u8; 18];
        rand::fill(&mut server_nonce);
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = State::AwaitingFinal {
            gs2_header: format!("{flag},,"),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
            plus,
        };
        Ok(server_first)
    }

    /// Handles the client-final-message; returns the server-final-message on success.
    pub fn client_final(&mut self, data: &[u8]) -> Result<String, ScramError> {
        let State::AwaitingFinal {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
            plus,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Malformed("unexpected client-final-message"));
        };
        let text = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut parts = without_proof.split(',');
        let cbind = parts
            .next()
            .and_then(|p| p.strip_prefix("c="))
            .ok_or(ScramError::Malformed("missing channel binding"))?;
        let cbind = B64
            .decode(cbind)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        let mut expected_cbind = gs2_header.into_bytes();
        if plus {
            expected_cbind.extend_from_slice(self.channel_binding.as_deref().unwrap_or_default());
        }
        if !bool::from(cbind.ct_eq(&expected_cbind)) {
            return Err(ScramError::Refused("SCRAM channel binding check failed"));
        }
        let client_nonce = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        if client_nonce != nonce {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("invalid proof"))?;

        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(client_signature))
        {
            *k = p ^ s;
        }
        let derived: [u8; 32] = Sha256::digest(client_key).into();
        let matches = bool::from(derived.ct_eq(&self.verifier.stored_key));
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        if !(matches && self.real) {
            return Err(ScramError::Failed);
        }
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message);
            mac.finalize().into_bytes().into()
        }
        // HMAC accepts keys of any length; this arm is unreachable in practice.
        Err(_) => [0; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn verifier(pw: &str) -> ScramVerifier {
        ScramVerifier::parse(&ScramVerifier::from_password(pw.as_bytes())).unwrap()
    }

    /// Runs a full exchange with postgres-protocol's client (the one tokio-postgres uses).
    fn exchange(
        server: &mut ScramServer,
        password: &str,
        cb: ChannelBinding,
        mechanism: &str,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let first = server.client_first(mechanism, client.message())?;
        client.update(first.as_bytes()).unwrap();
        let last = server.client_final(client.message())?;
        client
            .finish(last.as_bytes())
            .expect("client accepts server signature");
        Ok(())
    }

    #[test]
    fn right_password_authenticates() {
        let mut s = ScramServer::new(verifier("hunter2"), true, None);
        exchange(
            &mut s,
            "hunter2",
            ChannelBinding::unsupported(),
            SCRAM_SHA_256,
        )
        .unwrap();
    }

    #[test]
    fn wrong_password_fails() {
        let mut s = ScramServer::new(verifier("hunter2"), true, None);
        assert_eq!(
            exchange(
                &mut s,
                "hunter3",
                ChannelBinding::unsupported(),
                SCRAM_SHA_256
            ),
            Err(ScramError::Failed)
        );
    }

    #[test]
    fn mock_verifier_fails_even_with_its_own_keys() {
        let v = verifier("pw");
        let mut s = ScramServer::new(v, false, None);
        assert_eq!(
            exchange(&mut s, "pw", ChannelBinding::unsupported(), SCRAM_SHA_256),
            Err(ScramError::Failed)
        );
    }

    #[test]
    fn channel_binding_plus_works_and_checks_the_hash() {
        let cb = vec![9u8; 32];
        let mut s = ScramServer::new(verifier("pw"), true, Some(cb.clone()));
        assert_eq!(s.mechanisms(), &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256]);
        exchange(
            &mut s,
            "pw",
            ChannelBinding::tls_server_end_point(cb),
            SCRAM_SHA_256_PLUS,
        )
        .unwrap();

        let mut s = ScramServer::new(verifier("pw"), true, Some(vec![1u8; 32]));
        assert!(matches!(
            exchange(
                &mut s,
                "pw",
                ChannelBinding::tls_server_end_point(vec![2u8; 32]),
                SCRAM_SHA_256_PLUS
            ),
            Err(ScramError::Refused(_))
        ));
    }

    #[test]
    fn downgrade_and_plus_without_tls_are_refused() {
        let mut s = ScramServer::new(verifier("pw"), true, Some(vec![1u8; 32]));
        assert!(matches!(
            s.client_first(SCRAM_SHA_256, b"y,,n=,r=abc"),
            Err(ScramError::Refused(_))
        ));
        let mut s = ScramServer::new(verifier("pw"), true, None);
        assert!(matches!(
            s.client_first(SCRAM_SHA_256_PLUS, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::Refused(_))
        ));
        let mut s = ScramServer::new(verifier("pw"), true, None);
        assert!(s.client_first(SCRAM_SHA_256, b"y,,n=,r=abc").is_ok());
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for first in [
            &b""[..],
            b"n",
            b"n,,",
            b"n,a=x,n=,r=abc",
            b"n,,m=ext,n=,r=x",
            b"n,,n=,r=",
            b"n,,n=,x=1",
            b"\xff\xfe",
        ] {
            let mut s = ScramServer::new(verifier("pw"), true, None);
            assert!(s.client_first(SCRAM_SHA_256, first).is_err());
        }
        for last in [
            &b""[..],
            b"c=biws,r=abc",
            b"c=biws,r=abc,p=!!",
            b"c=!!,r=abc,p=AAAA",
            b"r=abc,p=AAAA",
        ] {
            let mut s = ScramServer::new(verifier("pw"), true, None);
            s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").unwrap();
            assert!(s.client_final(last).is_err());
        }
    }

    #[test]
    fn an_exchange_cannot_be_replayed() {
        let mut s = ScramServer::new(verifier("pw"), true, None);
        exchange(&mut s, "pw", ChannelBinding::unsupported(), SCRAM_SHA_256).unwrap();
        assert!(s.client_final(b"c=biws,r=x,p=AAAA").is_err());
        assert!(s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").is_err());
    }
}
