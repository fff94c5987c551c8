//! The passes gated by the roles of a text's names (`roles.rs`) decide exactly what they
//! decide ungated: random statements over the words the passes act on, in every policy.

use proptest::prelude::*;

use super::super::lexer::lex;
use super::super::roles::Roles;
use super::*;

/// Words the gated passes act on, their quoted and upper-case spellings, and the words and
/// punctuation around them.
const WORDS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "into",
    "pg_settings",
    "set",
    "set_config",
    "(",
    ")",
    ",",
    ";",
    "'x'",
    "'statement_timeout'",
    "'on'",
    "false",
    "1",
    "$1",
    "pg_notify",
    "'ch'",
    "execute",
    "prepare",
    "deallocate",
    "p1",
    "as",
    "temp",
    "temporary",
    "create",
    "table",
    "t",
    "declare",
    "cursor",
    "with",
    "hold",
    "for",
    "pg_temp",
    "pg_temp_1",
    "pg_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_xact_lock",
    "pg_prepared_statements",
    "pg_catalog",
    ".",
    "\"execute\"",
    "\"temp\"",
    "\"pg_settings\"",
    "\"set_config\"",
    "lo_import",
    "dblink_exec",
    "pg_stat_activity",
    "query_to_xml",
    "from",
    "where",
    "=",
    "listen",
    "notify",
    "reset",
    "all",
    "discard",
    "begin",
    "read",
    "write",
    "commit",
    "and",
    "chain",
    "rollback",
    "to",
    "savepoint",
    "sp",
    "release",
    "explain",
    "copy",
    "stdin",
    "Update",
    "EXECUTE",
    "TEMP",
    "Pg_Settings",
    "SET_CONFIG",
    "application_name",
];

pub(super) fn policies() -> Vec<Policy> {
    vec![
        shared(),
        schema(),
        readonly(),
        dedicated(),
        ddl(),
        pooled(),
        Policy {
            prepared_view: Some("(SELECT 1)".into()),
            ..pooled()
        },
        Policy {
            scope: Scope::Dedicated,
            ..pooled()
        },
        Policy {
            unchecked: true,
            ..pooled()
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn gated_verdicts_equal_full_verdicts(
        words in proptest::collection::vec(prop::sample::select(WORDS), 1..14)
    ) {
        let sql = words.join(" ");
        let Ok(tokens) = lex(sql.as_bytes(), true) else {
            return Ok(());
        };
        let roles = Roles::of(&tokens);
        for p in policies() {
            let gated = p.check_tokens_gated(sql.as_bytes(), &tokens, roles);
            let full = p.check_tokens_gated(sql.as_bytes(), &tokens, Roles::ALL);
            prop_assert_eq!(gated, full, "{}", sql);
        }
    }
}
