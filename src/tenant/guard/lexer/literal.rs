//! Reading one constant where it starts: how the guard's memo checks that a text differs
//! from one it passed only in its constants (`memo.rs`).

use super::{Kind, Lexer};

/// A constant: what [`literal_end`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Literal {
    Number,
    Str,
}

/// Where the constant (a number or a string, in any of their forms) that starts at `at` in
/// `sql` ends, as [`lex`](super::lex) reads it with `standard_conforming`; `None` unless a constant
/// starts there and reads without error. Reading a token looks only at its own bytes and
/// those after it, never at those before.
pub fn literal_end(sql: &[u8], at: usize, standard_conforming: bool) -> Option<(usize, Literal)> {
    let b = *sql.get(at)?;
    let mut lx = Lexer {
        src: sql,
        text: None,
        pos: at,
        standard_conforming,
        token_start: at,
    };
    let literal = match lx.token(b).ok()? {
        Kind::Number(_) => Literal::Number,
        Kind::Str { .. } => Literal::Str,
        _ => return None,
    };
    Some((lx.pos, literal))
}
