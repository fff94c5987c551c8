//! Texts a session sent that the guard let through untouched, so that the same text sent
//! again (an unnamed Parse per transaction, as most drivers send, or a repeated Query) is
//! not lexed and checked again.
//!
//! Exact by construction: the guard's verdict is a function of the text, the session's
//! `standard_conforming_strings` and the [`Policy`]. Only verdicts with nothing to do (no
//! refusal, rewrite, rebind, effect or bound setting) are remembered, keyed by the exact
//! bytes and by the two policy values that change during a session (the advisory-lock salt,
//! which a tenant move changes, and `standard_conforming_strings`); anything else is checked
//! in full. Bounded: [`SLOTS`] texts of at most [`MAX_TEXT`] bytes per session, in buffers
//! that are reused, so remembering allocates nothing once the slots have grown.

use super::lexer::TokenBuf;
use super::types::{Policy, Verdict};

/// Texts remembered per session.
pub const SLOTS: usize = 8;
/// Longer texts are always checked in full.
pub const MAX_TEXT: usize = 1024;

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
    /// The slot the next text goes to (oldest first).
    next: usize,
    /// The policy values the texts were checked under.
    key: Option<Key>,
}

impl PassedTexts {
    fn key(policy: &Policy, standard_conforming: bool) -> Key {
        (standard_conforming, policy.lock_salt)
    }

    /// Whether `sql` was passed untouched under the same policy values.
    fn contains(&mut self, sql: &[u8], print: u64, key: Key) -> bool {
        if self.key != Some(key) {
            self.texts.iter_mut().for_each(Vec::clear);
            return false;
        }
        // Equal prints decide nothing: the bytes are compared.
        self.texts
            .iter()
            .zip(self.prints)
            .any(|(t, p)| p == print && t.as_slice() == sql)
    }

    fn remember(&mut self, sql: &[u8], print: u64, key: Key) {
        if sql.len() > MAX_TEXT || sql.is_empty() {
            return;
        }
        self.key = Some(key);
        if self.texts.len() < SLOTS {
            // Room for the texts of a session's statements to vary a little in length.
            let mut t = Vec::with_capacity(sql.len().max(128).next_power_of_two());
            t.extend_from_slice(sql);
            self.prints[self.texts.len()] = print;
            self.texts.push(t);
            return;
        }
        let slot = &mut self.texts[self.next];
        slot.clear();
        slot.extend_from_slice(sql);
        self.prints[self.next] = print;
        self.next = (self.next + 1) % SLOTS;
    }
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
        let verdict = self.check_reusing(sql, standard_conforming, buf);
        if verdict.is_untouched() {
            passed.remember(sql, print, key);
        }
        verdict
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
        // Oldest first out; long texts never kept.
        for i in 0..SLOTS + 2 {
            check(&p, &format!("SELECT {i}"), true, &mut passed);
        }
        assert_eq!(passed.texts.len(), SLOTS);
        assert!(!passed.holds(b"SELECT 0", (true, p.lock_salt)));
        assert!(passed.holds(
            format!("SELECT {}", SLOTS + 1).as_bytes(),
            (true, p.lock_salt)
        ));
        // A print is only a shortcut: another text under a remembered text's print is not
        // remembered, and prints of texts that differ in one byte differ.
        let kept = format!("SELECT {}", SLOTS + 1);
        let print = fingerprint(kept.as_bytes());
        assert!(!passed.contains(b"SELECT 99", print, (true, p.lock_salt)));
        assert_ne!(print, fingerprint(format!("SELECT {}", SLOTS).as_bytes()));
        assert_ne!(fingerprint(b"SELECT 1\0"), fingerprint(b"SELECT 1"));
        let long = format!("SELECT 1{}", " ".repeat(MAX_TEXT));
        check(&p, &long, true, &mut passed);
        assert!(!passed.holds(long.as_bytes(), (true, p.lock_salt)));
    }
}
