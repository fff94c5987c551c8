//! Decoders for the few client messages pgtenant reads (docs 55.7): the SASL responses during
//! authentication and the text of Query and Parse.
//!
//! Each takes the message body (after the type byte and length) and checks every length
//! against what is actually there; malformed input is an error, never a panic.

use thiserror::Error;

use super::{take_cstr, take_i32};

/// A client message body that does not match its declared layout.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("malformed {0} message")]
pub struct Malformed(pub &'static str);

/// SASLInitialResponse: the chosen mechanism and the client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    pub mechanism: &'a str,
    pub data: &'a [u8],
}

/// Decodes a SASLInitialResponse body.
pub fn sasl_initial_response(body: &[u8]) -> Result<SaslInitialResponse<'_>, Malformed> {
    const WHAT: Malformed = Malformed("SASLInitialResponse");
    let (mechanism, rest) = take_cstr(body).ok_or(WHAT)?;
    let mechanism = std::str::from_utf8(mechanism).map_err(|_| WHAT)?;
    let (len, rest) = take_i32(rest).ok_or(WHAT)?;
    let data = match len {
        -1 => &[][..],
        n if n >= 0 && n as usize == rest.len() => rest,
        _ => return Err(WHAT),
    };
    Ok(SaslInitialResponse { mechanism, data })
}

/// The SQL text of a Query body, or of a Parse body (`(statement name, text)`).
pub fn query_text(body: &[u8]) -> Result<&str, Malformed> {
    const WHAT: Malformed = Malformed("Query");
    let (text, rest) = take_cstr(body).ok_or(WHAT)?;
    if !rest.is_empty() {
        return Err(WHAT);
    }
    std::str::from_utf8(text).map_err(|_| WHAT)
}

/// The statement name and SQL text of a Parse body.
pub fn parse_text(body: &[u8]) -> Result<(&str, &str), Malformed> {
    const WHAT: Malformed = Malformed("Parse");
    let (name, rest) = take_cstr(body).ok_or(WHAT)?;
    let (text, _) = take_cstr(rest).ok_or(WHAT)?;
    let name = std::str::from_utf8(name).map_err(|_| WHAT)?;
    let text = std::str::from_utf8(text).map_err(|_| WHAT)?;
    Ok((name, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;

    fn body(buf: &BytesMut) -> &[u8] {
        &buf[5..]
    }

    #[test]
    fn sasl_initial_response_round_trips_with_a_real_encoder() {
        let mut buf = BytesMut::new();
        frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", &mut buf).unwrap();
        let m = sasl_initial_response(body(&buf)).unwrap();
        assert_eq!(m.mechanism, "SCRAM-SHA-256");
        assert_eq!(m.data, b"n,,n=,r=abc");
    }

    #[test]
    fn sasl_initial_response_checks_the_inner_length() {
        assert!(sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x09abc").is_err());
        assert!(sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xfe").is_err());
        assert!(sasl_initial_response(b"SCRAM-SHA-256").is_err());
        assert!(sasl_initial_response(b"SCRAM-SHA-256\0\0\0").is_err());
    }

    #[test]
    fn query_and_parse_text() {
        let mut buf = BytesMut::new();
        frontend::query("select 1", &mut buf).unwrap();
        assert_eq!(query_text(body(&buf)).unwrap(), "select 1");
        let mut buf = BytesMut::new();
        frontend::parse("s1", "select $1", [23u32], &mut buf).unwrap();
        assert_eq!(parse_text(body(&buf)).unwrap(), ("s1", "select $1"));
        assert!(query_text(b"no terminator").is_err());
    }
}
