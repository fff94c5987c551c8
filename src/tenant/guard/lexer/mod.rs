//! A lexer that splits SQL text exactly as PostgreSQL's scanner does (`src/backend/parser/
//! scan.l`; docs 4.1 "Lexical Structure"), for the guard.
//!
//! It works on bytes, so any ASCII-safe client encoding lexes correctly. It handles case
//! folding of identifiers, `"quoted"` and `U&"…" UESCAPE` identifiers, `'…'`, `E'…'`, `B'…'`,
//! `X'…'`, `N'…'`, `U&'…'` and `$tag$…$tag$` strings, nested `/* */` comments, `--` comments,
//! numbers as PostgreSQL 15 splits them (`1abc` is a number then an identifier), operators cut
//! at comment starts, and `standard_conforming_strings = off`. Anything unterminated or
//! undecodable is an error: the guard refuses what it cannot lex.

use std::borrow::Cow;

/// A lexing failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    #[error("unterminated quoted string")]
    UnterminatedString,
    #[error("unterminated quoted identifier")]
    UnterminatedIdentifier,
    #[error("zero-length delimited identifier")]
    EmptyIdentifier,
    #[error("unterminated /* comment")]
    UnterminatedComment,
    #[error("unterminated dollar-quoted string")]
    UnterminatedDollarQuote,
    #[error("invalid Unicode escape")]
    BadUnicodeEscape,
}

/// What a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind<'a> {
    /// An identifier or keyword, case-folded (unquoted) or exact (quoted).
    Ident { name: Cow<'a, str>, quoted: bool },
    /// A string constant; `value` is its decoded content when decoding is certain (borrowed
    /// from the text unless decoding changed it: `''` or a continuation).
    Str { value: Option<Cow<'a, str>> },
    /// A numeric constant, as written.
    Number(&'a [u8]),
    /// A positional parameter `$n`.
    Param,
    /// An operator, e.g. `=`, `::`, `->>`.
    Op(&'a [u8]),
    /// One of `( ) [ ] , ; : .`.
    Punct(u8),
}

/// A token and where it stands in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token<'a> {
    pub kind: Kind<'a>,
    pub start: usize,
    pub end: usize,
}

impl Token<'_> {
    /// The identifier's name, if this is an identifier.
    pub fn ident(&self) -> Option<&str> {
        match &self.kind {
            Kind::Ident { name, .. } => Some(name),
            _ => None,
        }
    }

    /// True for an unquoted identifier equal to `keyword` (lower case).
    pub fn is_keyword(&self, keyword: &str) -> bool {
        matches!(&self.kind, Kind::Ident { name, quoted: false } if name == keyword)
    }

    /// True for the punctuation byte `p`.
    pub fn is_punct(&self, p: u8) -> bool {
        matches!(self.kind, Kind::Punct(c) if c == p)
    }
}

mod class;
mod literal;
use class::{ident_scan, is_dollar_tag_cont, is_ident_cont, is_ident_start, is_op_char, is_space};
pub use literal::{Literal, literal_end};

struct Lexer<'a> {
    src: &'a [u8],
    /// `src` as text, when it is valid UTF-8 (checked once: names are slices of it).
    text: Option<&'a str>,
    pos: usize,
    standard_conforming: bool,
    /// Where the token (or comment) being read started: where a lexing error is reported.
    token_start: usize,
}

/// Lexes `sql`. `standard_conforming` is the session's `standard_conforming_strings`.
pub fn lex(sql: &[u8], standard_conforming: bool) -> Result<Vec<Token<'_>>, LexError> {
    lex_at(sql, standard_conforming).map_err(|(e, _)| e)
}

/// Like [`lex`], with the byte offset of the token a failure is reported at.
pub fn lex_at(sql: &[u8], standard_conforming: bool) -> Result<Vec<Token<'_>>, (LexError, usize)> {
    lex_into(sql, standard_conforming, Vec::new())
}

/// Lexes into `out` (emptied first), so a caller can keep one buffer for many statements.
fn lex_into<'a>(
    sql: &'a [u8],
    standard_conforming: bool,
    mut out: Vec<Token<'a>>,
) -> Result<Vec<Token<'a>>, (LexError, usize)> {
    out.clear();
    // About one token per five bytes of typical SQL: one allocation for a new buffer, rarely
    // a second; none for a kept one that has grown already.
    out.reserve(sql.len() / 5 + 4);
    let mut lx = Lexer {
        src: sql,
        text: std::str::from_utf8(sql).ok(),
        pos: 0,
        standard_conforming,
        token_start: 0,
    };
    loop {
        match lx.next_into(&mut out) {
            Ok(true) => {}
            Ok(false) => return Ok(out),
            Err(e) => return Err((e, lx.token_start)),
        }
    }
}

impl<'a> Lexer<'a> {
    fn peek(&self, off: usize) -> Option<u8> {
        self.src.get(self.pos + off).copied()
    }

    fn rest(&self) -> &'a [u8] {
        &self.src[self.pos..]
    }

    #[inline]
    fn skip_space_and_comments(&mut self) -> Result<(), LexError> {
        loop {
            // Most tokens follow one space or none: only a '-' or '/' can start a comment.
            match self.peek(0) {
                Some(b) if is_space(b) => {
                    self.pos += 1;
                    continue;
                }
                Some(b'-' | b'/') => {}
                _ => return Ok(()),
            }
            match (self.peek(0), self.peek(1)) {
                (Some(b'-'), Some(b'-')) => {
                    while let Some(b) = self.peek(0) {
                        self.pos += 1;
                        if b == b'\n' || b == b'\r' {
                            break;
                        }
                    }
                }
                (Some(b'/'), Some(b'*')) => {
                    self.token_start = self.pos;
                    self.skip_block_comment()?
                }
                _ => return Ok(()),
            }
        }
    }

    fn skip_block_comment(&mut self) -> Result<(), LexError> {
        let mut depth = 0usize;
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b'/'), Some(b'*')) => {
                    depth += 1;
                    self.pos += 2;
                }
                (Some(b'*'), Some(b'/')) => {
                    depth -= 1;
                    self.pos += 2;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                (Some(_), _) => self.pos += 1,
                (None, _) => return Err(LexError::UnterminatedComment),
            }
        }
    }

    /// Pushes the next token onto `out` (built in place: returned through a `Result`, the
    /// token was copied twice); false at the end of the text.
    fn next_into(&mut self, out: &mut Vec<Token<'a>>) -> Result<bool, LexError> {
        self.skip_space_and_comments()?;
        let start = self.pos;
        self.token_start = start;
        let Some(b) = self.peek(0) else {
            return Ok(false);
        };
        let kind = self.token(b)?;
        out.push(Token {
            kind,
            start,
            end: self.pos,
        });
        Ok(true)
    }

    /// The token that starts with `b` at `self.pos` (past any space and comment), read to its
    /// end.
    #[inline(always)]
    fn token(&mut self, b: u8) -> Result<Kind<'a>, LexError> {
        let start = self.pos;
        let next = self.peek(1);
        Ok(match b {
            b'\'' => self.string(false, false)?,
            b'"' => self.quoted_ident(false)?,
            b'$' if next.is_some_and(|c| c.is_ascii_digit()) => {
                self.pos += 1;
                while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
                Kind::Param
            }
            b'$' => self.dollar_string()?,
            b'0'..=b'9' => self.number(),
            b'.' if next.is_some_and(|c| c.is_ascii_digit()) => self.number(),
            b'(' | b')' | b'[' | b']' | b',' | b';' | b'.' => {
                self.pos += 1;
                Kind::Punct(b)
            }
            b':' => {
                if next == Some(b':') || next == Some(b'=') {
                    self.pos += 2;
                    Kind::Op(&self.src[start..start + 2])
                } else {
                    self.pos += 1;
                    Kind::Punct(b':')
                }
            }
            // Prefixed strings and identifiers: E'', B'', X'', N'', U&'', U&"".
            b'e' | b'E' if next == Some(b'\'') => {
                self.pos += 1;
                self.string(true, false)?
            }
            b'n' | b'N' if next == Some(b'\'') => {
                self.pos += 1;
                self.string(false, false)?
            }
            // Bit strings end at the first quote: `''` is not a quote inside them (scan.l has
            // no xqdouble rule for the xb and xh states).
            b'b' | b'B' | b'x' | b'X' if next == Some(b'\'') => {
                self.pos += 1;
                self.bit_string()?
            }
            b'u' | b'U' if next == Some(b'&') && self.peek(2) == Some(b'\'') => {
                self.pos += 2;
                self.string(false, true)?
            }
            b'u' | b'U' if next == Some(b'&') && self.peek(2) == Some(b'"') => {
                self.pos += 2;
                self.quoted_ident(true)?
            }
            c if is_ident_start(c) => {
                let rest = &self.src[start..];
                let (len, upper) = ident_scan(rest);
                self.pos = start + len;
                let raw = &rest[..len];
                let name = if !upper {
                    // A token starts and ends next to ASCII bytes (or the text's ends), so in
                    // valid text it is a slice of it; otherwise its bytes are decoded.
                    match self.text.and_then(|t| t.get(start..self.pos)) {
                        Some(s) => Cow::Borrowed(s),
                        None => String::from_utf8_lossy(raw),
                    }
                } else if let Some(k) = common_keyword(raw) {
                    Cow::Borrowed(k)
                } else {
                    Cow::Owned(String::from_utf8_lossy(raw).to_ascii_lowercase())
                };
                Kind::Ident {
                    name,
                    quoted: false,
                }
            }
            c if is_op_char(c) => self.operator(),
            _ => {
                // Any other byte stands alone; PostgreSQL would reject it, and the guard treats
                // it as an operator it does not know.
                self.pos += 1;
                Kind::Op(&self.src[start..self.pos])
            }
        })
    }

    fn operator(&mut self) -> Kind<'a> {
        let start = self.pos;
        let mut end = start;
        while end < self.src.len() && is_op_char(self.src[end]) {
            end += 1;
        }
        let mut op = &self.src[start..end];
        // A comment start inside an operator ends the operator there.
        for i in 0..op.len().saturating_sub(1) {
            if &op[i..i + 2] == b"/*" || &op[i..i + 2] == b"--" {
                op = &op[..i];
                break;
            }
        }
        self.pos = start + op.len().max(1);
        Kind::Op(&self.src[start..self.pos])
    }

    fn number(&mut self) -> Kind<'a> {
        let start = self.pos;
        while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.peek(0) == Some(b'.') && self.peek(1) != Some(b'.') {
            self.pos += 1;
            while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
        }
        if matches!(self.peek(0), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(self.peek(1), Some(b'+' | b'-')));
            if self.peek(1 + sign).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1 + sign;
                while self.peek(0).is_some_and(|c| c.is_ascii_digit()) {
                    self.pos += 1;
                }
            }
        }
        Kind::Number(&self.src[start..self.pos])
    }

    /// A `'…'` string starting at the opening quote. `escapes`: E'' backslash escapes (also
    /// plain strings when standard_conforming_strings is off). `unicode`: U&'' (value not
    /// decoded).
    fn string(&mut self, escapes: bool, unicode: bool) -> Result<Kind<'a>, LexError> {
        let backslash = escapes || (!self.standard_conforming && !unicode);
        // Most literals hold no quote, no escape and no continuation: their value is the text
        // between the quotes, borrowed.
        let open = self.pos;
        let body = &self.src[open + 1..];
        if let Some(n) = memchr::memchr(b'\'', body)
            && self.src.get(open + n + 2) != Some(&b'\'')
            && !(backslash && body[..n].contains(&b'\\'))
        {
            self.pos = open + n + 2;
            if !self.continues() {
                if unicode {
                    self.skip_uescape()?;
                    return Ok(Kind::Str { value: None });
                }
                let value = std::str::from_utf8(&body[..n]).ok().map(Cow::Borrowed);
                return Ok(Kind::Str { value });
            }
            self.pos = open;
        }
        let mut value: Option<Vec<u8>> = Some(Vec::new());
        loop {
            // self.pos is at an opening quote.
            self.pos += 1;
            loop {
                let Some(c) = self.peek(0) else {
                    return Err(LexError::UnterminatedString);
                };
                if c == b'\'' {
                    if self.peek(1) == Some(b'\'') {
                        if let Some(v) = value.as_mut() {
                            v.push(b'\'');
                        }
                        self.pos += 2;
                        continue;
                    }
                    self.pos += 1;
                    break;
                }
                if c == b'\\' && backslash {
                    // The escape's meaning is not decoded; the value is no longer certain.
                    value = None;
                    if self.peek(1).is_none() {
                        return Err(LexError::UnterminatedString);
                    }
                    self.pos += 2;
                    continue;
                }
                if let Some(v) = value.as_mut() {
                    v.push(c);
                }
                self.pos += 1;
            }
            // 'a' <newline> 'b' continues the same string.
            if !self.continues() {
                break;
            }
        }
        if unicode {
            self.skip_uescape()?;
            value = None;
        }
        Ok(Kind::Str {
            value: value.and_then(|v| String::from_utf8(v).ok().map(Cow::Owned)),
        })
    }

    /// A `B'…'` or `X'…'` bit string starting at the opening quote: everything up to the next
    /// quote, then continuations (`'…'` after whitespace holding a newline) the same way.
    fn bit_string(&mut self) -> Result<Kind<'a>, LexError> {
        let mut value = Vec::new();
        loop {
            self.pos += 1;
            loop {
                match self.peek(0) {
                    None => return Err(LexError::UnterminatedString),
                    Some(b'\'') => {
                        self.pos += 1;
                        break;
                    }
                    Some(c) => {
                        value.push(c);
                        self.pos += 1;
                    }
                }
            }
            if !self.continues() {
                break;
            }
        }
        Ok(Kind::Str {
            value: String::from_utf8(value).ok().map(Cow::Owned),
        })
    }

    /// After a closing quote: whether whitespace holding a newline and another quote follow
    /// (the literal continues; `self.pos` is then at that quote). Otherwise nothing is consumed.
    fn continues(&mut self) -> bool {
        let save = self.pos;
        let mut saw_newline = false;
        while let Some(c) = self.peek(0) {
            if c == b'\n' || c == b'\r' {
                saw_newline = true;
            } else if !is_space(c) {
                break;
            }
            self.pos += 1;
        }
        if saw_newline && self.peek(0) == Some(b'\'') {
            return true;
        }
        self.pos = save;
        false
    }

    /// A `"…"` identifier at the opening quote; `unicode` for `U&"…"`.
    fn quoted_ident(&mut self, unicode: bool) -> Result<Kind<'a>, LexError> {
        self.pos += 1;
        // Most quoted names (an ORM quotes every one) hold no `""`: borrowed.
        let body = self.rest();
        if !unicode
            && let Some(n) = memchr::memchr(b'"', body)
            && n > 0
            && body.get(n + 1) != Some(&b'"')
            && let Ok(name) = std::str::from_utf8(&body[..n])
        {
            self.pos += n + 1;
            return Ok(Kind::Ident {
                name: Cow::Borrowed(name),
                quoted: true,
            });
        }
        let mut raw = Vec::new();
        loop {
            let Some(c) = self.peek(0) else {
                return Err(LexError::UnterminatedIdentifier);
            };
            self.pos += 1;
            if c == b'"' {
                if self.peek(0) == Some(b'"') {
                    raw.push(b'"');
                    self.pos += 1;
                    continue;
                }
                break;
            }
            raw.push(c);
        }
        if raw.is_empty() {
            return Err(LexError::EmptyIdentifier);
        }
        let name = if unicode {
            let escape = self.skip_uescape()?.unwrap_or(b'\\');
            decode_unicode_escapes(&raw, escape)?
        } else {
            String::from_utf8_lossy(&raw).into_owned()
        };
        Ok(Kind::Ident {
            name: Cow::Owned(name),
            quoted: true,
        })
    }

    /// After a U& literal: an optional `UESCAPE 'c'`; returns the escape character.
    fn skip_uescape(&mut self) -> Result<Option<u8>, LexError> {
        let save = self.pos;
        self.skip_space_and_comments()?;
        let word = self.rest();
        if word.len() >= 7 && word[..7].eq_ignore_ascii_case(b"uescape") {
            let after_word = self.pos + 7;
            if self.src.get(after_word).is_some_and(|&c| is_ident_cont(c)) {
                self.pos = save;
                return Ok(None);
            }
            self.pos = after_word;
            self.skip_space_and_comments()?;
            let r = self.rest();
            if r.len() >= 3 && r[0] == b'\'' && r[2] == b'\'' {
                let c = r[1];
                let invalid =
                    c.is_ascii_hexdigit() || c == b'+' || c == b'\'' || c == b'"' || is_space(c);
                if invalid {
                    return Err(LexError::BadUnicodeEscape);
                }
                self.pos += 3;
                return Ok(Some(c));
            }
            return Err(LexError::BadUnicodeEscape);
        }
        self.pos = save;
        Ok(None)
    }

    /// `$tag$…$tag$` at the first `$`; a `$` that does not open a tag is an operator-like
    /// byte.
    fn dollar_string(&mut self) -> Result<Kind<'a>, LexError> {
        let start = self.pos;
        let mut end = start + 1;
        if self.src.get(end).is_some_and(|&c| is_ident_start(c)) {
            while self.src.get(end).is_some_and(|&c| is_dollar_tag_cont(c)) {
                end += 1;
            }
        }
        if self.src.get(end) != Some(&b'$') {
            self.pos += 1;
            return Ok(Kind::Op(&self.src[start..start + 1]));
        }
        let tag = &self.src[start..=end];
        let body_start = end + 1;
        let body = &self.src[body_start..];
        let close = body
            .windows(tag.len())
            .position(|w| w == tag)
            .ok_or(LexError::UnterminatedDollarQuote)?;
        self.pos = body_start + close + tag.len();
        Ok(Kind::Str {
            value: std::str::from_utf8(&body[..close]).ok().map(Cow::Borrowed),
        })
    }
}

mod keywords;
mod text;

use keywords::common_keyword;
#[cfg(test)]
use keywords::{COMMON_KEYWORDS, LONGEST_KEYWORD};
use text::decode_unicode_escapes;
pub use text::postgres_syntax_error;

mod reuse;

pub use reuse::TokenBuf;

#[cfg(test)]
mod tests;
