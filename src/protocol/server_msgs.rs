//! Decoders for the server messages pgtenant reads (docs 55.7): Authentication*,
//! ParameterStatus, BackendKeyData, ReadyForQuery and the fields of ErrorResponse.
//!
//! Everything else a server sends is forwarded as bytes without being decoded.

use super::client_msgs::Malformed;
use super::{TxStatus, take_cstr, take_i32};

/// The Authentication* request a server sends during startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<&'a str>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSS, SSPI and anything newer: not supported towards servers.
    Unsupported(i32),
}

/// Decodes an Authentication body.
pub fn auth_request(body: &[u8]) -> Result<AuthRequest<'_>, Malformed> {
    const WHAT: Malformed = Malformed("Authentication");
    let (code, rest) = take_i32(body).ok_or(WHAT)?;
    Ok(match code {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => AuthRequest::Md5 {
            salt: rest.get(..4).ok_or(WHAT)?.try_into().map_err(|_| WHAT)?,
        },
        10 => {
            let mut mechanisms = Vec::new();
            let mut rest = rest;
            loop {
                let (name, tail) = take_cstr(rest).ok_or(WHAT)?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(std::str::from_utf8(name).map_err(|_| WHAT)?);
                rest = tail;
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(rest),
        12 => AuthRequest::SaslFinal(rest),
        other => AuthRequest::Unsupported(other),
    })
}

/// Decodes a ReadyForQuery body.
pub fn ready_for_query(body: &[u8]) -> Result<TxStatus, Malformed> {
    match body {
        [b] => TxStatus::from_byte(*b).ok_or(Malformed("ReadyForQuery")),
        _ => Err(Malformed("ReadyForQuery")),
    }
}

/// Decodes a ParameterStatus body into `(name, value)`.
pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), Malformed> {
    const WHAT: Malformed = Malformed("ParameterStatus");
    let (name, rest) = take_cstr(body).ok_or(WHAT)?;
    let (value, _) = take_cstr(rest).ok_or(WHAT)?;
    Ok((
        std::str::from_utf8(name).map_err(|_| WHAT)?,
        std::str::from_utf8(value).map_err(|_| WHAT)?,
    ))
}

/// Decodes a BackendKeyData body into `(process id, secret key bytes)`.
pub fn backend_key_data(body: &[u8]) -> Result<(i32, &[u8]), Malformed> {
    let (pid, secret) = take_i32(body).ok_or(Malformed("BackendKeyData"))?;
    if secret.len() < 4 || secret.len() > 256 {
        return Err(Malformed("BackendKeyData"));
    }
    Ok((pid, secret))
}

/// The fields of an ErrorResponse or NoticeResponse that pgtenant logs or relays.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

/// Decodes the fields of an ErrorResponse/NoticeResponse body.
pub fn error_fields(mut body: &[u8]) -> Result<ErrorFields, Malformed> {
    const WHAT: Malformed = Malformed("ErrorResponse");
    let mut fields = ErrorFields::default();
    loop {
        let (&code, rest) = body.split_first().ok_or(WHAT)?;
        if code == 0 {
            return Ok(fields);
        }
        let (value, rest) = take_cstr(rest).ok_or(WHAT)?;
        let value = String::from_utf8_lossy(value).into_owned();
        match code {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
        body = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_requests() {
        assert_eq!(auth_request(&[0, 0, 0, 0]).unwrap(), AuthRequest::Ok);
        assert_eq!(
            auth_request(&[0, 0, 0, 5, 1, 2, 3, 4]).unwrap(),
            AuthRequest::Md5 { salt: [1, 2, 3, 4] }
        );
        assert!(auth_request(&[0, 0, 0, 5, 1]).is_err());
        assert_eq!(
            auth_request(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0").unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
            }
        );
        assert!(auth_request(b"\0\0\0\x0aSCRAM").is_err());
        assert_eq!(
            auth_request(&[0, 0, 0, 7]).unwrap(),
            AuthRequest::Unsupported(7)
        );
    }

    #[test]
    fn status_and_key_messages() {
        assert_eq!(ready_for_query(b"T").unwrap(), TxStatus::InTransaction);
        assert!(ready_for_query(b"X").is_err());
        assert!(ready_for_query(b"").is_err());
        assert_eq!(
            parameter_status(b"TimeZone\0UTC\0").unwrap(),
            ("TimeZone", "UTC")
        );
        assert_eq!(
            backend_key_data(&[0, 0, 0, 9, 1, 2, 3, 4]).unwrap(),
            (9, &[1u8, 2, 3, 4][..])
        );
        assert!(backend_key_data(&[0, 0, 0, 9, 1]).is_err());
    }

    #[test]
    fn error_fields_survive_truncation() {
        let f = error_fields(b"SERROR\0VERROR\0C42501\0Mdenied\0\0").unwrap();
        assert_eq!(
            (f.severity.as_str(), f.code.as_str(), f.message.as_str()),
            ("ERROR", "42501", "denied")
        );
        assert!(error_fields(b"SERROR\0C425").is_err());
        assert!(error_fields(b"").is_err());
    }
}
