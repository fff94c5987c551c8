use super::*;

fn idents(sql: &str) -> Vec<String> {
    lex(sql.as_bytes(), true)
        .unwrap()
        .iter()
        .filter_map(|t| t.ident().map(str::to_owned))
        .collect()
}

#[test]
fn identifiers_fold_and_quoted_ones_keep_case() {
    assert_eq!(
        idents("SELECT Foo, \"Bar\", \"a\"\"b\""),
        ["select", "foo", "Bar", "a\"b"]
    );
}

#[test]
fn unicode_identifiers_decode() {
    assert_eq!(idents(r#"U&"s\0065t_config""#), ["set_config"]);
    assert_eq!(idents(r#"U&"s!0065t_config" UESCAPE '!'"#), ["set_config"]);
    assert_eq!(idents(r#"u&"\+000073et""#), ["set"]);
    assert!(lex(br#"U&"\00zz""#, true).is_err());
    assert!(lex(br#"U&"x" UESCAPE 'a'"#, true).is_err());
}

#[test]
fn strings_hide_their_content() {
    assert_eq!(
        idents("SELECT 'set_config(' , E'\\'set_config', $$set_config$$, $a$ x $a$"),
        ["select"]
    );
    let t = lex(b"'it''s'", true).unwrap();
    assert_eq!(
        t[0].kind,
        Kind::Str {
            value: Some("it's".into())
        }
    );
}

#[test]
fn backslashes_follow_standard_conforming_strings() {
    // With standard_conforming_strings off, \' does not end the string.
    assert_eq!(
        idents(r"SELECT 'a\' , set_config"),
        ["select", "set_config"]
    );
    assert_eq!(
        lex(br"SELECT 'a\' , set_config", false).unwrap_err(),
        LexError::UnterminatedString
    );
    assert_eq!(
        lex(br"SELECT 'a\', set_config', x", false)
            .unwrap()
            .iter()
            .filter_map(|t| t.ident().map(str::to_owned))
            .collect::<Vec<_>>(),
        ["select", "x"]
    );
}

#[test]
fn comments_nest_and_are_skipped() {
    assert_eq!(
        idents("SELECT /* a /* set_config */ b */ x -- set_config\n, y"),
        ["select", "x", "y"]
    );
    assert_eq!(
        lex(b"SELECT /* /* */", true).unwrap_err(),
        LexError::UnterminatedComment
    );
}

#[test]
fn dollar_signs_inside_identifiers_do_not_open_quotes() {
    assert_eq!(idents("SELECT a$$b"), ["select", "a$$b"]);
    assert_eq!(idents("SELECT $1, $x$ y $x$"), ["select"]);
    assert_eq!(
        lex(b"SELECT $a$ open", true).unwrap_err(),
        LexError::UnterminatedDollarQuote
    );
}

#[test]
fn numbers_split_like_postgres_15() {
    assert_eq!(idents("SELECT 1set_config"), ["select", "set_config"]);
    assert_eq!(idents("SELECT 1.5e3abc, .5x"), ["select", "abc", "x"]);
}

#[test]
fn operators_stop_at_comment_starts() {
    let t = lex(b"SELECT 1 +/* c */ 2", true).unwrap();
    assert!(t.iter().any(|t| t.kind == Kind::Op(b"+")));
    assert_eq!(idents("SELECT 1 --set_config\n"), ["select"]);
}

#[test]
fn bit_strings_end_at_the_first_quote() {
    // The guard once read x'''...' as one string with an escaped quote; PostgreSQL reads
    // x'' and then code (found by tests/guard_differential.rs).
    let sql = b"SELECT x''; SELECT set_config('a', 'b', false) --'";
    let tokens = lex(sql, true).unwrap();
    assert!(tokens.iter().any(|t| t.ident() == Some("set_config")));
    assert_eq!(tokens.iter().filter(|t| t.is_punct(b';')).count(), 1);
    let tokens = lex(b"SELECT B'01'\n'10'", true).unwrap();
    assert_eq!(tokens.len(), 2, "a continued bit string is one token");
}

#[test]
fn string_continuation_needs_a_newline() {
    let t = lex(b"SELECT 'a'\n'b'", true).unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(
        t[1].kind,
        Kind::Str {
            value: Some("ab".into())
        }
    );
    assert!(lex(b"SELECT 'a' 'b'", true).unwrap().len() == 3);
}

#[test]
fn unterminated_things_are_errors() {
    for bad in [
        &b"SELECT 'x"[..],
        b"SELECT \"x",
        b"SELECT \"\"",
        b"SELECT E'\\",
        b"SELECT U&'x' UESCAPE",
    ] {
        assert!(lex(bad, true).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn a_kept_token_buffer_lexes_like_lex_and_keeps_its_allocation() {
    let mut buf = TokenBuf::default();
    let first = b"SELECT a, b FROM t WHERE c = 'x' AND d = $1";
    let tokens = buf.lex(first, true).unwrap();
    assert_eq!(tokens, lex(first, true).unwrap());
    let at = tokens.as_ptr() as usize;
    buf.keep(tokens);
    let second = b"UPDATE t SET a = 1";
    let tokens = buf.lex(second, true).unwrap();
    assert_eq!(tokens, lex(second, true).unwrap());
    assert_eq!(tokens.as_ptr() as usize, at, "the same allocation, reused");
    buf.keep(tokens);
    assert!(buf.lex(b"SELECT 'unterminated", true).is_err());
}

#[test]
fn plain_literals_and_quoted_names_are_borrowed_and_the_rest_decoded() {
    let value = |sql: &[u8], conforming: bool| match lex(sql, conforming).unwrap().remove(0).kind {
        Kind::Str { value } => value.map(|v| (matches!(v, Cow::Borrowed(_)), v.into_owned())),
        other => panic!("{other:?}"),
    };
    // The text between the quotes: borrowed.
    for (sql, want) in [
        (&b"'abc'"[..], "abc"),
        (b"E'abc'", "abc"),
        (b"N'abc'", "abc"),
        (b"''", ""),
        (b"$$a'b$$", "a'b"),
        (b"$t$x$t$", "x"),
        (b"'a' 'b'", "a"),
    ] {
        assert_eq!(value(sql, true), Some((true, want.into())), "{sql:?}");
    }
    // Decoded: a doubled quote, a continuation.
    assert_eq!(value(b"'it''s'", true), Some((false, "it's".into())));
    assert_eq!(value(b"'a'\n'b'", true), Some((false, "ab".into())));
    // Not certain: escapes, U&, bytes that are not UTF-8.
    assert_eq!(value(br"E'a\nb'", true), None);
    assert_eq!(value(br"'a\b'", false), None);
    assert_eq!(value(br"'a\b'", true), Some((true, r"a\b".into())));
    assert_eq!(value(b"U&'abc'", true), None);
    assert_eq!(value(b"'\xff'", true), None);
    // Quoted names: borrowed unless they hold `""` or need decoding.
    let name = |sql: &[u8]| match lex(sql, true).unwrap().remove(0).kind {
        Kind::Ident { name, quoted } => {
            (quoted, matches!(name, Cow::Borrowed(_)), name.into_owned())
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(name(b"\"Items\""), (true, true, "Items".into()));
    assert_eq!(name(b"\"a\"\"b\""), (true, false, "a\"b".into()));
    assert_eq!(name(b"\"\xff\""), (true, false, "\u{fffd}".into()));
    assert_eq!(name(br#"U&"\0061""#), (true, false, "a".into()));
    // Upper-case common keywords fold without allocating; other names fold allocated.
    assert_eq!(name(b"SELECT"), (false, true, "select".into()));
    assert_eq!(name(b"TRANSACTION"), (false, true, "transaction".into()));
    assert_eq!(name(b"Items"), (false, false, "items".into()));
    assert!(COMMON_KEYWORDS.iter().all(|k| k.len() <= LONGEST_KEYWORD));
    for k in COMMON_KEYWORDS {
        assert_eq!(common_keyword(k.to_ascii_uppercase().as_bytes()), Some(*k));
    }
    for k in COMMON_KEYWORDS {
        let mixed: String = k
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        assert_eq!(common_keyword(mixed.as_bytes()), Some(*k), "{mixed}");
    }
    assert_eq!(common_keyword(b"IsoLation"), Some("isolation"));
    for miss in [
        "selects",
        "selec",
        "x",
        "returningx",
        "transactions",
        "isolatiom",
        "transactiox",
    ] {
        assert_eq!(common_keyword(miss.as_bytes()), None, "{miss}");
    }
}
