//! A token buffer a session keeps, so that lexing its statements allocates nothing.

use super::{LexError, Token, lex_into};

/// One token buffer kept for a session's statements: lexing a statement then allocates
/// nothing once the buffer has grown to the session's longest statement.
#[derive(Debug, Default)]
pub struct TokenBuf(Vec<Token<'static>>);

impl TokenBuf {
    /// Lexes `sql` into the kept buffer; hand the tokens back with [`TokenBuf::keep`].
    pub fn lex<'a>(
        &mut self,
        sql: &'a [u8],
        standard_conforming: bool,
    ) -> Result<Vec<Token<'a>>, (LexError, usize)> {
        lex_into(
            sql,
            standard_conforming,
            recycle(std::mem::take(&mut self.0)),
        )
    }

    /// Takes the buffer back (its tokens dropped, its capacity kept).
    pub fn keep(&mut self, tokens: Vec<Token<'_>>) {
        self.0 = recycle(tokens);
    }
}

/// The same allocation as a buffer of tokens of another lifetime: emptied, then collected in
/// place (the standard library reuses a vector's allocation when the element layout is the
/// same, which it is: only the lifetime differs). The closure never runs.
#[allow(clippy::unnecessary_filter_map)] // `filter` cannot change the lifetime.
fn recycle<'b>(mut tokens: Vec<Token<'_>>) -> Vec<Token<'b>> {
    tokens.clear();
    tokens
        .into_iter()
        .filter_map(|_| None::<Token<'b>>)
        .collect()
}
