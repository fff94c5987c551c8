//! Text the lexer hands out or reports: Unicode escapes decoded (`U&'...'` strings and
//! identifiers), and PostgreSQL's wording and position for text it cannot read.

use super::LexError;

/// The error PostgreSQL's scanner reports for `sql`, which failed to lex with `error` at byte
/// `at`: SQLSTATE 42601, its message (`unterminated quoted string at or near "'abc"`), and
/// the 1-based character position of the failing token.
pub fn postgres_syntax_error(sql: &[u8], error: &LexError, at: usize) -> (String, usize) {
    let rest = sql.get(at..).unwrap_or_default();
    let what = match error {
        LexError::UnterminatedString => match rest.first() {
            Some(b'b' | b'B') => "unterminated bit string literal",
            Some(b'x' | b'X') => "unterminated hexadecimal string literal",
            _ => "unterminated quoted string",
        },
        LexError::UnterminatedIdentifier => "unterminated quoted identifier",
        LexError::EmptyIdentifier => "zero-length delimited identifier",
        LexError::UnterminatedComment => "unterminated /* comment",
        LexError::UnterminatedDollarQuote => "unterminated dollar-quoted string",
        LexError::BadUnicodeEscape => "invalid Unicode escape",
    };
    // The scanner shows the token: for an unterminated one, the rest of the input.
    let near: &[u8] = match error {
        LexError::EmptyIdentifier => rest.get(..2).unwrap_or(rest),
        _ => rest,
    };
    let position = String::from_utf8_lossy(sql.get(..at).unwrap_or_default())
        .chars()
        .count()
        + 1;
    (
        format!("{what} at or near \"{}\"", String::from_utf8_lossy(near)),
        position,
    )
}

/// Decodes the `\XXXX` and `\+XXXXXX` escapes of a U& literal.
pub(super) fn decode_unicode_escapes(raw: &[u8], escape: u8) -> Result<String, LexError> {
    let mut out = String::new();
    let mut i = 0;
    let text = std::str::from_utf8(raw).map_err(|_| LexError::BadUnicodeEscape)?;
    let bytes = text.as_bytes();
    while i < bytes.len() {
        if bytes[i] != escape {
            let ch = text[i..].chars().next().ok_or(LexError::BadUnicodeEscape)?;
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        if bytes.get(i + 1) == Some(&escape) {
            out.push(escape as char);
            i += 2;
            continue;
        }
        let (digits, skip) = if bytes.get(i + 1) == Some(&b'+') {
            (bytes.get(i + 2..i + 8), 8)
        } else {
            (bytes.get(i + 1..i + 5), 5)
        };
        let digits = digits.ok_or(LexError::BadUnicodeEscape)?;
        let hex = std::str::from_utf8(digits).map_err(|_| LexError::BadUnicodeEscape)?;
        let code = u32::from_str_radix(hex, 16).map_err(|_| LexError::BadUnicodeEscape)?;
        out.push(char::from_u32(code).ok_or(LexError::BadUnicodeEscape)?);
        i += skip;
    }
    Ok(out)
}
