//! The memo's claim (`memo.rs`): a text that is a remembered text with other constants where
//! its constants stood, each of the same kind, read to its end and beginning as the old one
//! did, lexes to the same tokens, constants aside; and when the remembered text qualifies,
//! the guard's verdict on it is the same, in every policy. Random texts over words that touch
//! constants on both sides (identifiers, `$n`, `.`, operators, comments, every form of
//! string), with and without spaces, in both `standard_conforming_strings` modes.

use proptest::prelude::*;

use super::super::lexer::{Kind, Literal, Token, lex};
use super::super::memo::{literals_not_read, same_but_literals};
use super::super::roles::Roles;
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
    "'a\\'",
    "E'\\''",
    "'x'\n'y'",
    "$a$ $ $a$",
    "N'n'",
    "X'ff'",
    "U&'d' UESCAPE '!'",
    "u&\"q\"",
    "e",
    "n",
    "b",
    "x",
    "u&",
    "notify c,",
    "set search_path =",
];

/// The tokens with every constant's text left out.
fn shape<'a>(tokens: &'a [Token<'a>]) -> Vec<Kind<'a>> {
    tokens
        .iter()
        .map(|t| match t.kind {
            Kind::Number(_) => Kind::Number(b""),
            Kind::Str { .. } => Kind::Str { value: None },
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

/// Per constant: how to make the new one (0: a number, 1: the old one with another body
/// between its quotes or dollar tags, 2: any bytes) and the text to use.
fn literals() -> impl Strategy<Value = Vec<(u8, String, String)>> {
    proptest::collection::vec(
        (
            0..3u8,
            prop_oneof![
                "[0-9]{1,3}(\\.[0-9]{0,2})?([eE][+-]?[0-9])?",
                "\\.[0-9]{1,2}",
                "[0-9.eE+a$-]{1,4}",
            ],
            prop_oneof![
                "[a\\\\' \n;$-]{0,6}",
                "[eEnNbBxXuU]?&?'[a\\\\' \n;-]{0,5}'( *\n? *'[a']{0,2}')?",
                "\\$[a]?\\$[a$ ']{0,3}\\$[a]?\\$",
                "[a' \\\\\n$\"]{1,5}",
            ],
        ),
        8,
    )
}

/// `old` (a string constant) with `body` between what opens and what closes it.
fn reshape(old: &str, body: &str) -> String {
    if let (Some(a), Some(b)) = (old.find('\''), old.rfind('\''))
        && a < b
    {
        return format!("{}{body}{}", &old[..=a], &old[b..]);
    }
    if let Some(e) = old.strip_prefix('$').and_then(|rest| rest.find('$')) {
        let tag = &old[..e + 2];
        return format!("{tag}{body}{tag}");
    }
    body.to_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]
    #[test]
    fn constants_in_the_same_places_give_the_same_tokens_and_verdict(
        first in prop::sample::select(&["select ", "update t set a =", "(", "set ", ""][..]),
        words in words(),
        replacements in literals(),
        standard_conforming in any::<bool>(),
    ) {
        let old: String = std::iter::once(first)
            .chain(words.iter().flat_map(|(w, sep)| [*w, *sep]))
            .collect();
        let Ok(old_tokens) = lex(old.as_bytes(), standard_conforming) else {
            return Ok(());
        };
        let spans: Vec<_> = old_tokens
            .iter()
            .filter_map(|t| match t.kind {
                Kind::Number(_) => Some((t.start..t.end, Literal::Number)),
                Kind::Str { .. } => Some((t.start..t.end, Literal::Str)),
                _ => None,
            })
            .collect();
        if spans.is_empty() {
            return Ok(());
        }
        let mut new = String::new();
        let mut at = 0;
        for ((span, _), (how, number, text)) in spans.iter().zip(replacements.iter().cycle()) {
            new.push_str(&old[at..span.start]);
            match how {
                0 => new.push_str(number),
                1 => new.push_str(&reshape(&old[span.clone()], text)),
                _ => new.push_str(text),
            }
            at = span.end;
        }
        new.push_str(&old[at..]);
        if !same_but_literals(old.as_bytes(), &spans, new.as_bytes(), standard_conforming) {
            return Ok(());
        }
        let new_tokens = lex(new.as_bytes(), standard_conforming);
        prop_assert!(new_tokens.is_ok(), "{:?} -> {:?}", old, new);
        let new_tokens = new_tokens.unwrap_or_default();
        prop_assert_eq!(shape(&old_tokens), shape(&new_tokens), "{:?} -> {:?}", old, new);
        if !literals_not_read(&old_tokens, Roles::of(&old_tokens)) {
            return Ok(());
        }
        for p in policies() {
            if p.check(old.as_bytes(), standard_conforming).is_untouched() {
                let verdict = p.check(new.as_bytes(), standard_conforming);
                prop_assert!(verdict.is_untouched(), "{:?} -> {:?}: {:?}", old, new, verdict);
            }
        }
    }
}

/// A constant the guard reads: remembered untouched in session pooling with one value, the
/// same text with another value over the tenant's limit is still refused.
#[test]
fn a_set_value_is_checked_again_for_every_constant() {
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
