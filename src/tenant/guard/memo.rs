//! Texts a session sent that the guard let through untouched, so that the same text sent
//! again (an unnamed Parse per transaction, as most drivers send, or a repeated Query) is
//! not lexed and checked again; nor is a query that differs from one of them only in its
//! constants (`... WHERE id = 42` sent again with `id = 43`, as `pgbench -S` sends, or
//! `name = 'b'` after `name = 'a'`, as drivers that put parameters in the text send).
//!
//! Exact by construction: the guard's verdict is a function of the text, the session's
//! `standard_conforming_strings` and the [`Policy`]. Only verdicts with nothing to do (no
//! refusal, rewrite, rebind, effect or bound setting) are remembered, keyed by the exact
//! bytes and by the two policy values that change during a session (the advisory-lock salt,
//! which a tenant move changes, and `standard_conforming_strings`); anything else is checked
//! in full. Bounded: [`SLOTS`] texts of at most [`MAX_TEXT`] bytes per session, in buffers
//! that are reused, so remembering allocates nothing once the slots have grown.
//!
//! Other constants in the same places give the same verdict when three things hold:
//! - *The same tokens.* The new text has the remembered text's bytes outside its constants,
//!   and where each constant stood, one constant of the same kind (number or string) that
//!   the lexer reads to its end ([`lexer::literal_end`]) and that begins with the same byte
//!   (or, for a number, a digit where a digit was). Lexing reads each token from its start
//!   and looks at the bytes after it, never before; a token that ends where a constant
//!   begins looks at most at the constant's first bytes, which are alike (`$1` or a name
//!   takes digits in, which is why a digit must stay a digit, and a string's prefix or
//!   opening quote stays the same). So the new text lexes to the same tokens, constants
//!   aside.
//! - *Constants are not read.* The guard reads a number's or string's value only for `SET`,
//!   `NOTIFY`, `set_config` and `pg_notify`, so only texts whose every statement is a query
//!   or a write ([`QUERY_WORDS`], or a parenthesised query) qualify.
//! - *No name a pass acts on.* Texts naming anything but `insert`, `update`, `delete` or
//!   `merge` (see `roles.rs`) never qualify, so no pass that looks at arguments runs.
//!
//! The test `constants_in_the_same_places_give_the_same_tokens_and_verdict` checks this
//! against the lexer and the guard with random texts and constants.

use std::ops::Range;

use super::lexer::{self, Kind, Literal, Token, TokenBuf};
use super::roles::{self, Roles};
use super::types::{Policy, Verdict};

/// Texts remembered per session.
pub const SLOTS: usize = 8;
/// Longer texts are always checked in full.
pub const MAX_TEXT: usize = 1024;

/// The first words of the statements whose constants the guard never reads.
const QUERY_WORDS: &[&str] = &[
    "select", "insert", "update", "delete", "merge", "with", "values", "table",
];

/// What the texts were checked under: `standard_conforming_strings` and the advisory-lock salt.
type Key = (bool, Option<u64>);

/// The texts the guard passed untouched for one session.
#[derive(Debug, Default)]
pub struct PassedTexts {
    texts: Vec<Vec<u8>>,
    /// Each text's [`fingerprint`], compared before its bytes: a text that differs from all
    /// of them (another literal each time, as `pgbench -S` sends) costs one pass over its
    /// bytes, not one comparison per slot.
    prints: [u64; SLOTS],
    /// Where each text's constants stand and what they are, when other constants there give
    /// the same verdict (see the module); empty otherwise.
    literals: Vec<Vec<(Range<usize>, Literal)>>,
    /// The slot the next text goes to (oldest first).
    next: usize,
    /// The policy values the texts were checked under.
    key: Option<Key>,
}

impl PassedTexts {
    fn key(policy: &Policy, standard_conforming: bool) -> Key {
        (standard_conforming, policy.lock_salt)
    }

    /// Whether `sql` was passed untouched under the same policy values, or differs from such
    /// a text only in constants that do not change the verdict.
    fn contains(&mut self, sql: &[u8], print: u64, key: Key) -> bool {
        if self.key != Some(key) {
            self.texts.iter_mut().for_each(Vec::clear);
            self.literals.iter_mut().for_each(Vec::clear);
            return false;
        }
        // Equal prints decide nothing: the bytes are compared.
        self.texts
            .iter()
            .zip(self.prints)
            .any(|(t, p)| p == print && t.as_slice() == sql)
            || self.texts.iter().zip(&self.literals).any(|(t, literals)| {
                !literals.is_empty() && same_but_literals(t, literals, sql, key.0)
            })
    }

    fn remember(&mut self, sql: &[u8], print: u64, key: Key, tokens: &[Token<'_>], named: Roles) {
        if sql.len() > MAX_TEXT || sql.is_empty() {
            return;
        }
        self.key = Some(key);
        let slot = if self.texts.len() < SLOTS {
            // Room for the texts of a session's statements to vary a little in length.
            self.texts
                .push(Vec::with_capacity(sql.len().max(128).next_power_of_two()));
            self.literals.push(Vec::new());
            self.texts.len() - 1
        } else {
            let slot = self.next;
            self.next = (self.next + 1) % SLOTS;
            slot
        };
        let (Some(text), Some(literals)) = (self.texts.get_mut(slot), self.literals.get_mut(slot))
        else {
            return;
        };
        text.clear();
        text.extend_from_slice(sql);
        self.prints[slot] = print;
        literals.clear();
        if literals_not_read(tokens, named) {
            literals.extend(tokens.iter().filter_map(|t| match t.kind {
                Kind::Number(_) => Some((t.start..t.end, Literal::Number)),
                Kind::Str { .. } => Some((t.start..t.end, Literal::Str)),
                _ => None,
            }));
        }
    }
}

/// Whether the guard's verdict on `tokens` (whose names have the roles `named`) is the same
/// whatever their constants' values: every statement a query or a write, and no name a pass
/// acts on other than a write's (see the module).
pub(super) fn literals_not_read(tokens: &[Token<'_>], named: Roles) -> bool {
    if named.any(!roles::WRITE) {
        return false;
    }
    tokens
        .split(|t| t.is_punct(b';'))
        .all(|stmt| match stmt.first() {
            None => true,
            Some(t) => t.is_punct(b'(') || QUERY_WORDS.iter().any(|w| t.is_keyword(w)),
        })
}

/// Whether `new` is `old` with other constants where `literals` (ascending, from lexing
/// `old` with `standard_conforming`) stand, each of the same kind, read by the lexer to its
/// end and beginning as the old one did (see the module).
pub(super) fn same_but_literals(
    old: &[u8],
    literals: &[(Range<usize>, Literal)],
    new: &[u8],
    standard_conforming: bool,
) -> bool {
    let (mut o, mut n) = (0, 0);
    for (span, kind) in literals {
        let (Some(same), Some(&first)) = (old.get(o..span.start), old.get(span.start)) else {
            return false;
        };
        if new.get(n..n + same.len()) != Some(same) {
            return false;
        }
        n += same.len();
        let begins_alike = new
            .get(n)
            .is_some_and(|&c| c == first || (c.is_ascii_digit() && first.is_ascii_digit()));
        if !begins_alike {
            return false;
        }
        match lexer::literal_end(new, n, standard_conforming) {
            Some((end, read)) if read == *kind => n = end,
            _ => return false,
        }
        o = span.end;
    }
    old.get(o..).is_some_and(|rest| new.get(n..) == Some(rest))
}

/// A hash of `sql` that tells most different texts apart in one pass (eight bytes at a
/// time). Only a shortcut: texts with equal prints are still compared byte for byte.
fn fingerprint(sql: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = sql.len() as u64;
    let mut words = sql.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(K);
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    (h.rotate_left(5) ^ u64::from_le_bytes(last)).wrapping_mul(K)
}

impl Verdict {
    /// Nothing to do: the text goes to the server as it is, with no effect on the session.
    pub fn is_untouched(&self) -> bool {
        let Verdict {
            refusal,
            rewritten,
            rebind,
            effects,
            wants_prepared_view,
            bound_settings,
        } = self;
        refusal.is_none()
            && rewritten.is_none()
            && !rebind
            && effects.is_empty()
            && !wants_prepared_view
            && bound_settings.is_empty()
    }
}

impl Policy {
    /// Like [`Policy::check_reusing`], answering at once for a text `passed` holds (see the
    /// module). With a [`Policy::prepared_view`] set, checks in full and remembers nothing.
    pub fn check_remembering(
        &self,
        sql: &[u8],
        standard_conforming: bool,
        buf: &mut TokenBuf,
        passed: &mut PassedTexts,
    ) -> Verdict {
        if self.prepared_view.is_some() {
            return self.check_reusing(sql, standard_conforming, buf);
        }
        let key = PassedTexts::key(self, standard_conforming);
        let print = fingerprint(sql);
        if passed.contains(sql, print, key) {
            return Verdict::default();
        }
        self.check_then(sql, standard_conforming, buf, |tokens, named, verdict| {
            if verdict.is_untouched() {
                passed.remember(sql, print, key, tokens, named);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::relay::RelayRules;

    impl PassedTexts {
        fn holds(&mut self, sql: &[u8], key: Key) -> bool {
            self.contains(sql, fingerprint(sql), key)
        }
    }

    fn check(p: &Policy, sql: &str, sc: bool, passed: &mut PassedTexts) -> Verdict {
        p.check_remembering(sql.as_bytes(), sc, &mut TokenBuf::default(), passed)
    }

    #[test]
    fn only_untouched_texts_are_remembered_and_a_hit_is_the_full_verdict() {
        let mut p = RelayRules::sample_shared(None).policy;
        p.prepared_prefix = Some("pgt_c1_".into());
        p.lock_salt = Some(7);
        let mut passed = PassedTexts::default();
        // Untouched: remembered.
        let plain = "SELECT a FROM t WHERE id = $1";
        assert!(check(&p, plain, true, &mut passed).is_untouched());
        assert!(passed.holds(plain.as_bytes(), (true, Some(7))));
        // Refused, rewritten or with effects: never remembered, and every time the same
        // verdict as the guard's.
        for sql in [
            "SELECT set_config('app.current_tenant_id', 'x', false)",
            "SELECT pg_advisory_lock(1)",
            "SET search_path = public",
            "SET TIME ZONE 'UTC'",
            "PREPARE s AS SELECT 1",
            "LISTEN c",
            "RESET ALL",
            "SELECT * FROM pg_prepared_statements",
        ] {
            let full = p.check(sql.as_bytes(), true);
            assert!(!full.is_untouched(), "{sql}");
            for _ in 0..2 {
                let v = check(&p, sql, true, &mut passed);
                assert_eq!(format!("{v:?}"), format!("{full:?}"), "{sql}");
            }
            assert!(!passed.holds(sql.as_bytes(), (true, Some(7))), "{sql}");
        }
        // A refusal does not depend on what was remembered before.
        let bad = "SELECT pg_read_file('x')";
        assert!(check(&p, bad, true, &mut passed).refusal.is_some());
        assert!(check(&p, bad, true, &mut passed).refusal.is_some());
    }

    #[test]
    fn another_salt_or_string_mode_forgets_and_the_slots_are_bounded() {
        let p = RelayRules::sample_shared(None).policy;
        let mut passed = PassedTexts::default();
        let sql = "SELECT 'a\\' , 1";
        check(&p, sql, true, &mut passed);
        assert!(passed.holds(sql.as_bytes(), (true, p.lock_salt)));
        // With standard_conforming_strings off the same bytes lex differently.
        assert!(!passed.holds(sql.as_bytes(), (false, p.lock_salt)));
        assert!(
            !passed.holds(sql.as_bytes(), (true, p.lock_salt)),
            "forgotten"
        );
        check(&p, sql, true, &mut passed);
        assert!(!passed.holds(sql.as_bytes(), (true, Some(99))));
        // Oldest first out; long texts never kept. (Names, not constants: texts that differ
        // only in constants share a slot.)
        for i in 0..SLOTS + 2 {
            check(&p, &format!("SELECT c{i}"), true, &mut passed);
        }
        assert_eq!(passed.texts.len(), SLOTS);
        assert!(!passed.holds(b"SELECT c0", (true, p.lock_salt)));
        assert!(passed.holds(
            format!("SELECT c{}", SLOTS + 1).as_bytes(),
            (true, p.lock_salt)
        ));
        // A print is only a shortcut: another text under a remembered text's print is not
        // remembered, and prints of texts that differ in one byte differ.
        let kept = format!("SELECT c{}", SLOTS + 1);
        let print = fingerprint(kept.as_bytes());
        assert!(!passed.contains(b"SELECT c99", print, (true, p.lock_salt)));
        assert_ne!(print, fingerprint(format!("SELECT c{}", SLOTS).as_bytes()));
        assert_ne!(fingerprint(b"SELECT 1\0"), fingerprint(b"SELECT 1"));
        let long = format!("SELECT 1{}", " ".repeat(MAX_TEXT));
        check(&p, &long, true, &mut passed);
        assert!(!passed.holds(long.as_bytes(), (true, p.lock_salt)));
    }

    #[test]
    fn a_query_with_other_constants_is_answered_without_lexing_and_nothing_else_is() {
        let p = RelayRules::sample_shared(None).policy;
        let key = (true, p.lock_salt);
        let mut passed = PassedTexts::default();
        let sql = "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = 'a' LIMIT 10";
        assert!(check(&p, sql, true, &mut passed).is_untouched());
        assert_eq!(passed.literals[0].len(), 4);
        for same in [
            "SELECT name FROM items WHERE id = 43 AND x > .25 AND n = 'it''s' LIMIT 1",
            "SELECT name FROM items WHERE id = 4.5e3 AND x > .5e-2 AND n = '' LIMIT 99999999999",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = '\\' LIMIT 10",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = 'a'\n'b' LIMIT 10",
        ] {
            assert!(passed.holds(same.as_bytes(), key), "{same}");
        }
        for other in [
            // Another word, or a constant that does not end where a constant ended.
            "SELECT name FROM items WHERE id = 42 OR x > .5 AND n = 'a' LIMIT 10",
            "SELECT name FROM items WHERE id = 42x AND x > .5 AND n = 'a' LIMIT 10",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = 'a' LIMIT 10;",
            "SELECT name FROM items WHERE id = 4 2 AND x > .5 AND n = 'a' LIMIT 10",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = 'a' 'b' LIMIT 10",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = 'a'; DROP TABLE t; --' LIMIT 10",
            // A string where a number was, another form of string, an open string.
            "SELECT name FROM items WHERE id = '42' AND x > .5 AND n = 'a' LIMIT 10",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = E'a' LIMIT 10",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = $$a$$ LIMIT 10",
            "SELECT name FROM items WHERE id = 42 AND x > .5 AND n = 'a LIMIT 10",
            // A digit where a '.' began: `x.5` is a name and a number, `x5` one name.
            "SELECT name FROM items WHERE id = 42 AND x > 5 AND n = 'a' LIMIT 10",
            "SELECT name FROM items WHERE id = AND x > .5 AND n = 'a' LIMIT 10",
        ] {
            assert!(!passed.holds(other.as_bytes(), key), "{other}");
        }
        // Under standard_conforming_strings off the same bytes are another key: never held.
        assert!(!passed.holds(sql.as_bytes(), (false, p.lock_salt)));
        let mut passed = PassedTexts::default();
        check(&p, "SELECT t.5, $1.5, x'1f', e'\\n'", true, &mut passed);
        assert_eq!(passed.literals[0].len(), 4);
        assert!(passed.holds(b"SELECT t.7, $1.8, x'00', e'\\t'", key));
        assert!(!passed.holds(b"SELECT t55, $1.5, x'1f', e'\\n'", key));
        assert!(!passed.holds(b"SELECT t.5, $15, x'1f', e'\\n'", key));
        assert!(!passed.holds(b"SELECT t.5, $1.5, X'1f', e'\\n'", key));
        assert!(!passed.holds(b"SELECT t.5, $1.5, x'1f', e'\\'", key));
        // Texts whose constants the guard may read, or that name what a pass acts on, are
        // remembered exactly only.
        let mut passed = PassedTexts::default();
        for sql in [
            "SET statement_timeout = 5",
            "SET search_path = 'public'",
            "SELECT 1; SET statement_timeout = '5s'",
            "EXPLAIN SELECT 1",
            "NOTIFY c, 'x'",
            "SELECT 1 FROM pg_settings",
            "SELECT set_config('application_name', 'x', false)",
        ] {
            let mut p = p.clone();
            p.prepared_prefix = None;
            if check(&p, sql, true, &mut passed).is_untouched() {
                assert!(passed.holds(sql.as_bytes(), key), "{sql}");
            }
        }
        assert!(passed.literals.iter().all(Vec::is_empty));
        // A write qualifies; another key forgets the constants too.
        check(&p, "UPDATE t SET a = 'x' WHERE id = 7", true, &mut passed);
        assert!(passed.holds(b"UPDATE t SET a = 'yy' WHERE id = 70", key));
        assert!(!passed.holds(b"UPDATE t SET a = 'yy' WHERE id = 70", (false, p.lock_salt)));
        assert!(passed.literals.iter().all(Vec::is_empty));
    }
}
