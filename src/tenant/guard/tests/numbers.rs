//! The memo's claim (`memo.rs`): a text that is a remembered text with other numbers where
//! its numbers stood, each read to its end and beginning as the old one did, lexes to the
//! same tokens, numbers aside; and when the remembered text qualifies, the guard's verdict
//! on it is the same, in every policy. Random texts over words that touch numbers on both
//! sides (identifiers, `$n`, `.`, operators, comments, strings), with and without spaces.

use proptest::prelude::*;

use super::super::lexer::{Kind, Token, lex};
use super::super::memo::{numbers_not_read, same_but_numbers};
use super::gating::policies;

const WORDS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "with",
    "values",
    "set",
    "explain",
    "prepare",
    "from",
    "where",
    "id",
    "x",
    "e",
    "a_1",
    "$1",
    "$",
    ".",
    "..",
    "=",
    "-",
    "+",
    "*",
    "<>",
    "(",
    ")",
    ",",
    ";",
    "::",
    "'s'",
    "e'x'",
    "'a''b'",
    "\"q\"",
    "$$d$$",
    "5",
    ".5",
    "1.5",
    "1e3",
    "2E-1",
    "12",
    "1..2",
    "0.",
    "/*c*/",
    "--c\n",
    "pg_settings",
    "statement_timeout",
    "to",
    "set_config",
    "pg_advisory_lock",
    "limit",
    "offset",
    "&",
    "U&'x'",
    "b'1'",
    "set statement_timeout =",
    "select * from t where id =",
];

/// The tokens with every number's text left out.
fn shape<'a>(tokens: &'a [Token<'a>]) -> Vec<Kind<'a>> {
    tokens
        .iter()
        .map(|t| match t.kind {
            Kind::Number(_) => Kind::Number(b""),
            ref k => k.clone(),
        })
        .collect()
}

fn words() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
    proptest::collection::vec(
        (
            prop::sample::select(WORDS),
            prop::sample::select(&[" ", "", "\n"][..]),
        ),
        1..12,
    )
}

fn numbers() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(
        prop_oneof![
            "[0-9]{1,3}(\\.[0-9]{0,2})?([eE][+-]?[0-9])?",
            "\\.[0-9]{1,2}",
            "[0-9.eE+a$-]{1,4}",
        ],
        8,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]
    #[test]
    fn numbers_in_the_same_places_give_the_same_tokens_and_verdict(
        first in prop::sample::select(&["select ", "update t set a =", "(", "set ", ""][..]),
        words in words(),
        replacements in numbers(),
    ) {
        let old: String = std::iter::once(first)
            .chain(words.iter().flat_map(|(w, sep)| [*w, *sep]))
            .collect();
        let Ok(old_tokens) = lex(old.as_bytes(), true) else {
            return Ok(());
        };
        let spans: Vec<_> = old_tokens
            .iter()
            .filter(|t| matches!(t.kind, Kind::Number(_)))
            .map(|t| t.start..t.end)
            .collect();
        if spans.is_empty() {
            return Ok(());
        }
        let mut new = String::new();
        let mut at = 0;
        for (span, number) in spans.iter().zip(replacements.iter().cycle()) {
            new.push_str(&old[at..span.start]);
            new.push_str(number);
            at = span.end;
        }
        new.push_str(&old[at..]);
        if !same_but_numbers(old.as_bytes(), &spans, new.as_bytes()) {
            return Ok(());
        }
        let new_tokens = lex(new.as_bytes(), true);
        prop_assert!(new_tokens.is_ok(), "{:?} -> {:?}", old, new);
        let new_tokens = new_tokens.unwrap_or_default();
        prop_assert_eq!(shape(&old_tokens), shape(&new_tokens), "{:?} -> {:?}", old, new);
        if !numbers_not_read(&old_tokens) {
            return Ok(());
        }
        for p in policies() {
            if p.check(old.as_bytes(), true).is_untouched() {
                let verdict = p.check(new.as_bytes(), true);
                prop_assert!(verdict.is_untouched(), "{:?} -> {:?}: {:?}", old, new, verdict);
            }
        }
    }
}

/// A number the guard reads: remembered untouched in session pooling with one value, the
/// same text with another value over the tenant's limit is still refused.
#[test]
fn a_set_value_is_checked_again_for_every_number() {
    use super::super::lexer::TokenBuf;
    use super::super::memo::PassedTexts;
    for p in policies() {
        let (mut buf, mut passed) = (TokenBuf::default(), PassedTexts::default());
        let low = b"SET statement_timeout = 5";
        let high = b"SET statement_timeout = 99999999";
        let full = p.check(high, true);
        p.check_remembering(low, true, &mut buf, &mut passed);
        let remembered = p.check_remembering(high, true, &mut buf, &mut passed);
        assert_eq!(remembered, full);
    }
    // ... and in the policies where a SET passes untouched, the high value is refused.
    let refused = policies()
        .iter()
        .filter(|p| {
            p.check(b"SET statement_timeout = 5", true).is_untouched()
                && p.check(b"SET statement_timeout = 99999999", true)
                    .refusal
                    .is_some()
        })
        .count();
    assert!(refused > 0);
}
