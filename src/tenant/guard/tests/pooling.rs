//! Transaction pooling: session effects, the statement timeout ceiling, advisory lock
//! namespaces, the prepared-statements view, and set_config with bound values.

use super::*;

#[test]
fn transaction_pooling_reports_session_effects() {
    let cases: Vec<(&str, Vec<Effect>, Option<&str>)> = vec![
        (
            "SET work_mem = '64MB'",
            vec![Effect::Set {
                key: "work_mem".into(),
                pairs: vec![("work_mem".into(), "64MB".into())],
            }],
            None,
        ),
        ("SET LOCAL work_mem = '64MB'", vec![], None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", vec![], None),
        (
            "set time zone 'UTC'",
            vec![Effect::Set {
                key: "timezone".into(),
                pairs: vec![("timezone".into(), "UTC".into())],
            }],
            None,
        ),
        (
            "SET SESSION datestyle TO ISO, DMY",
            vec![Effect::Set {
                key: "datestyle".into(),
                pairs: vec![("datestyle".into(), "iso, dmy".into())],
            }],
            None,
        ),
        (
            "RESET work_mem",
            vec![Effect::Reset("work_mem".into())],
            None,
        ),
        ("RESET ALL", vec![Effect::ResetAll], None),
        ("DISCARD ALL", vec![Effect::DiscardAll], None),
        (
            "LISTEN ev",
            vec![Effect::Listen("acme.ev".into())],
            Some("LISTEN \"acme.ev\""),
        ),
        ("UNLISTEN *", vec![Effect::UnlistenAll], None),
        (
            "PREPARE q (int) AS SELECT $1",
            vec![Effect::Prepare {
                server_name: "pgt_c7_q".into(),
                sql: "PREPARE \"pgt_c7_q\" (int) AS SELECT $1".into(),
                shown: "PREPARE q (int) AS SELECT $1".into(),
            }],
            Some("PREPARE \"pgt_c7_q\" (int) AS SELECT $1"),
        ),
        (
            "EXECUTE q(1); DEALLOCATE q",
            vec![
                Effect::Execute("pgt_c7_q".into()),
                Effect::Deallocate("pgt_c7_q".into()),
            ],
            Some("EXECUTE \"pgt_c7_q\"(1); DEALLOCATE \"pgt_c7_q\""),
        ),
        (
            "DEALLOCATE PREPARE q",
            vec![Effect::Deallocate("pgt_c7_q".into())],
            Some("DEALLOCATE PREPARE \"pgt_c7_q\""),
        ),
        ("DEALLOCATE ALL", vec![Effect::DeallocateAll], None),
        ("SELECT 1", vec![], None),
        ("BEGIN", vec![], None),
        ("COMMIT", vec![], None),
        ("END AND NO CHAIN", vec![], None),
        ("COMMIT AND CHAIN", vec![Effect::CommitChain], None),
        ("ROLLBACK", vec![Effect::Rollback], None),
        ("abort work and chain", vec![Effect::Rollback], None),
        ("SAVEPOINT s1", vec![Effect::Savepoint("s1".into())], None),
        (
            "ROLLBACK TRANSACTION TO SAVEPOINT S1",
            vec![Effect::RollbackTo("s1".into())],
            None,
        ),
        (
            "ROLLBACK TO s1",
            vec![Effect::RollbackTo("s1".into())],
            None,
        ),
        (
            "RELEASE SAVEPOINT s1",
            vec![Effect::Release("s1".into())],
            None,
        ),
        ("RELEASE s1", vec![Effect::Release("s1".into())], None),
        (
            "CREATE TEMP TABLE t (x int)",
            vec![Effect::Pin("a temporary table")],
            None,
        ),
        (
            "create global temporary table t (x int)",
            vec![Effect::Pin("a temporary table")],
            None,
        ),
        (
            "SELECT 1 AS x INTO TEMP t",
            vec![Effect::Pin("a temporary table")],
            None,
        ),
        ("SELECT temp FROM weather", vec![], None),
        (
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            vec![Effect::Pin("a WITH HOLD cursor")],
            None,
        ),
        ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", vec![], None),
    ];
    for (sql, effects, rewritten) in cases {
        let v = pooled().check(sql.as_bytes(), true);
        assert!(v.refusal.is_none(), "{sql}: {v:?}");
        assert_eq!(v.effects, effects, "{sql}");
        assert_eq!(v.rewritten.as_deref(), rewritten, "{sql}");
    }
    // Session pooling reports none.
    assert!(
        shared()
            .check(b"SET work_mem = '1MB'", true)
            .effects
            .is_empty()
    );
}

#[test]
fn the_plans_statement_timeout_is_a_ceiling_reset_and_default_cannot_lift() {
    for policy in [shared(), dedicated(), pooled()] {
        let cases = [
            (
                "RESET statement_timeout",
                "SET statement_timeout TO '30000ms'",
            ),
            (
                "reset STATEMENT_TIMEOUT; select 1",
                "SET statement_timeout TO '30000ms'; select 1",
            ),
            (
                "SET statement_timeout TO DEFAULT",
                "SET statement_timeout TO '30000ms'",
            ),
            (
                "SET SESSION statement_timeout = default",
                "SET SESSION statement_timeout = '30000ms'",
            ),
            (
                "SET LOCAL statement_timeout TO DEFAULT",
                "SET LOCAL statement_timeout TO '30000ms'",
            ),
        ];
        for (sql, rewritten) in cases {
            let v = policy.check(sql.as_bytes(), true);
            assert!(v.refusal.is_none(), "{sql}: {v:?}");
            assert_eq!(v.rewritten.as_deref(), Some(rewritten), "{sql}");
        }
        assert_refused(
            &policy,
            &[
                "SET statement_timeout = 0",
                "SET statement_timeout TO '0'",
                "SELECT set_config('statement_timeout', NULL, false)",
                "SELECT set_config('statement_timeout', '0', false)",
            ],
        );
    }
    // Without a plan limit nothing is rewritten.
    let free = Policy {
        max_statement_timeout: None,
        ..shared()
    };
    assert_eq!(free.check(b"RESET statement_timeout", true).rewritten, None);
}

#[test]
fn advisory_lock_keys_move_into_the_tenants_namespace() {
    let cases = [
        (
            "SELECT pg_advisory_lock(4242)",
            "SELECT pg_advisory_lock((4242)::bigint # '-9223372036854775807'::bigint)",
        ),
        (
            "select pg_catalog.pg_try_advisory_xact_lock(1, f(2, 3))",
            "select pg_catalog.pg_try_advisory_xact_lock((1)::integer # '-2147483648'::integer, ( f(2, 3))::integer # '1'::integer)",
        ),
        (
            "SELECT pg_advisory_unlock(pg_advisory_lock_shared(1)::int::bigint)",
            "SELECT pg_advisory_unlock((pg_advisory_lock_shared((1)::bigint # '-9223372036854775807'::bigint)::int::bigint)::bigint # '-9223372036854775807'::bigint)",
        ),
        (
            "SELECT pg_advisory_unlock_all()",
            "SELECT pg_advisory_unlock_all()",
        ),
    ];
    for (sql, rewritten) in cases {
        let v = shared().check(sql.as_bytes(), true);
        assert!(v.refusal.is_none(), "{sql}: {v:?}");
        assert_eq!(v.rewritten.as_deref().unwrap_or(sql), rewritten, "{sql}");
    }
    assert_refused(
        &shared(),
        &[
            "SELECT pg_advisory_lock()",
            "SELECT pg_advisory_lock(1, 2, 3)",
            "SELECT pg_advisory_lock",
            "SELECT pg_advisory_lock(1",
        ],
    );
    // Dedicated placements keep PostgreSQL's keys.
    assert_eq!(
        dedicated()
            .check(b"SELECT pg_advisory_lock(4242)", true)
            .rewritten,
        None
    );
    // Session-level locks pin the connection in transaction pooling; xact ones do not.
    assert_eq!(
        pooled()
            .check(b"SELECT pg_try_advisory_lock(1)", true)
            .effects,
        vec![Effect::Pin("a session advisory lock")]
    );
    assert!(
        pooled()
            .check(b"SELECT pg_advisory_xact_lock(1)", true)
            .effects
            .is_empty()
    );
}

#[test]
fn pg_prepared_statements_is_replaced_by_the_clients_view() {
    let v = pooled().check(b"SELECT * FROM pg_prepared_statements", true);
    assert!(v.wants_prepared_view && v.refusal.is_none());
    // Session pooling leaves it alone.
    assert!(
        !shared()
            .check(b"SELECT * FROM pg_prepared_statements", true)
            .wants_prepared_view
    );
    let p = Policy {
        prepared_view: Some("(VIEW)".into()),
        ..pooled()
    };
    for (sql, rewritten) in [
        (
            "SELECT name FROM pg_prepared_statements",
            "SELECT name FROM (VIEW) AS pg_prepared_statements",
        ),
        (
            "select pg_prepared_statements.name from pg_catalog.pg_prepared_statements where true",
            "select pg_prepared_statements.name from (VIEW) AS pg_prepared_statements where true",
        ),
        (
            "SELECT p.name FROM pg_prepared_statements p",
            "SELECT p.name FROM (VIEW) p",
        ),
        (
            "SELECT ps.name FROM \"pg_prepared_statements\" AS ps",
            "SELECT ps.name FROM (VIEW) AS ps",
        ),
    ] {
        let v = p.check(sql.as_bytes(), true);
        assert!(!v.wants_prepared_view && v.refusal.is_none(), "{sql}");
        assert_eq!(v.rewritten.as_deref(), Some(rewritten), "{sql}");
    }
    // One token rewritten two ways (a statement name or a channel that is also the view's
    // name) panicked the session while the text was rewritten: it is refused.
    for sql in [
        "EXECUTE pg_prepared_statements",
        "select execute pg_prepared_statements",
        "PREPARE pg_prepared_statements AS SELECT 1",
        "LISTEN pg_prepared_statements",
        "NOTIFY pg_prepared_statements",
    ] {
        let r = p.check(sql.as_bytes(), true).refusal;
        assert_eq!(r.map(|r| r.sqlstate), Some("42501"), "{sql}");
    }
    // Each mention gets a copy of the view: their total is bounded, not the text's length
    // times the client's statements (a 230 kB text naming a 1 MiB view 10,000 times).
    let big = Policy {
        prepared_view: Some(format!("({})", "x".repeat(1 << 20))),
        ..pooled()
    };
    let named = |n: usize| {
        let mut sql = "SELECT 1 FROM pg_prepared_statements".to_owned();
        sql.push_str(&", pg_prepared_statements".repeat(n - 1));
        sql
    };
    let v = big.check(named(60).as_bytes(), true);
    assert!(
        v.refusal.is_none() && v.rewritten.is_some(),
        "{:?}",
        v.refusal
    );
    let r = big.check(named(100).as_bytes(), true).refusal;
    assert_eq!(r.map(|r| r.sqlstate), Some("54000"));
    // Lock keys are rewritten at their parentheses only: a view inside one is no overlap.
    let sql = "SELECT pg_advisory_xact_lock((SELECT count(*) FROM pg_prepared_statements))";
    let v = p.check(sql.as_bytes(), true);
    assert!(v.refusal.is_none(), "{v:?}");
    assert!(
        v.rewritten
            .is_some_and(|s| s.contains("FROM (VIEW) AS pg_prepared_statements"))
    );
}

/// `set_config` with query parameters passes the text check and is checked again with the
/// values a Bind gives: the same rules as literals.
#[test]
fn set_config_parameters_are_checked_with_their_values() {
    use crate::tenant::guard::{Bound, parse_bool};
    let policy = Policy {
        readonly: true,
        max_statement_timeout: Some(std::time::Duration::from_secs(60)),
        ..shared()
    };
    let verdict = policy.check(b"select set_config($1, $2::text, false)", true);
    assert!(verdict.refusal.is_none(), "{verdict:?}");
    let [call] = verdict.bound_settings.as_slice() else {
        panic!("one call expected: {verdict:?}");
    };
    let text = |v: &'static str| {
        Some(Bound {
            value: Some(v.as_bytes()),
            binary: false,
        })
    };
    let run = |name: Option<Bound<'static>>, value: Option<Bound<'static>>| {
        policy.check_bound_set_config(call, true, move |n| match n {
            1 => name.as_ref().map(|b| Bound {
                value: b.value,
                binary: b.binary,
            }),
            2 => value.as_ref().map(|b| Bound {
                value: b.value,
                binary: b.binary,
            }),
            _ => None,
        })
    };
    for (name, value) in [
        ("app.current_tenant_id", "x"),
        ("APP.Current_Tenant_ID", "x"),
        ("pgtenant.context", "x"),
        ("role", "postgres"),
        ("statement_timeout", "0"),
        ("statement_timeout", "2h"),
        ("default_transaction_read_only", "off"),
        ("client_encoding", "SJIS"),
        ("standard_conforming_strings", "off"),
        ("backslash_quote", "on"),
        ("shared_buffers", "1GB"),
    ] {
        let r = run(text(name), text(value));
        assert!(r.is_err(), "{name} = {value} should be refused: {r:?}");
    }
    // NULL resets: refused where the reset would lift a limit.
    for name in ["statement_timeout", "default_transaction_read_only"] {
        assert!(
            run(
                text(name),
                Some(Bound {
                    value: None,
                    binary: false
                })
            )
            .is_err()
        );
    }
    assert_eq!(
        run(
            text("work_mem"),
            Some(Bound {
                value: None,
                binary: false
            })
        )
        .unwrap(),
        Some(Effect::Reset("work_mem".into()))
    );
    assert_eq!(
        run(text("Work_Mem"), text("64MB")).unwrap(),
        Some(Effect::Set {
            key: "work_mem".into(),
            pairs: vec![("work_mem".into(), "64MB".into())]
        })
    );
    assert_eq!(
        run(text("statement_timeout"), text(" 5s ")).unwrap(),
        Some(Effect::Set {
            key: "statement_timeout".into(),
            pairs: vec![("statement_timeout".into(), " 5s ".into())]
        })
    );
    // A NULL name is the server's error; a value that is not UTF-8 or holds NUL is refused.
    assert_eq!(
        run(
            Some(Bound {
                value: None,
                binary: false
            }),
            text("x")
        )
        .unwrap(),
        None
    );
    assert!(
        run(
            Some(Bound {
                value: Some(b"work_mem\0x"),
                binary: false
            }),
            text("1MB")
        )
        .is_err()
    );
    assert!(
        run(
            text("work_mem"),
            Some(Bound {
                value: Some(b"\xff"),
                binary: true
            })
        )
        .is_err()
    );
    assert!(run(None, text("1MB")).is_err());

    // is_local: true changes nothing past the transaction; a bound one is read as PostgreSQL.
    let local = policy.check(b"SELECT set_config('work_mem', '1MB', $1)", true);
    let [call] = local.bound_settings.as_slice() else {
        panic!("{local:?}");
    };
    let with = |v: Bound<'static>| {
        policy.check_bound_set_config(call, true, move |_| {
            Some(Bound {
                value: v.value,
                binary: v.binary,
            })
        })
    };
    assert_eq!(
        with(Bound {
            value: Some(b"on"),
            binary: false
        })
        .unwrap(),
        None
    );
    assert_eq!(
        with(Bound {
            value: Some(&[1]),
            binary: true
        })
        .unwrap(),
        None
    );
    assert!(
        with(Bound {
            value: Some(b"off"),
            binary: false
        })
        .unwrap()
        .is_some()
    );
    assert!(
        with(Bound {
            value: Some(b"maybe"),
            binary: false
        })
        .is_err()
    );
    assert!(call.check_types(&[16]).is_ok());
    assert!(call.check_types(&[25]).is_err());
    assert!(verdict.bound_settings[0].check_types(&[0, 1043]).is_ok());
    assert!(verdict.bound_settings[0].check_types(&[1042, 25]).is_err());
    assert!(verdict.bound_settings[0].check_types(&[19]).is_err());

    for (text, value) in [
        ("t", Some(true)),
        (" YES ", Some(true)),
        ("on", Some(true)),
        ("1", Some(true)),
        ("f", Some(false)),
        ("off", Some(false)),
        ("No", Some(false)),
        ("o", None),
        ("", None),
        ("2", None),
    ] {
        assert_eq!(parse_bool(text), value, "{text:?}");
    }
}

/// With transaction pooling a session-level set_config is replayed like SET, and one whose
/// value cannot be known is refused (it would stay behind on the server connection).
#[test]
fn session_level_set_config_is_replayed_in_transaction_mode() {
    let p = Policy {
        prepared_prefix: Some("pgt_c1_".into()),
        ..shared()
    };
    let v = p.check(
        b"SELECT set_config('work_mem', '8MB', false), set_config('lock_timeout', '1s', true)",
        true,
    );
    assert!(v.refusal.is_none(), "{v:?}");
    assert_eq!(
        v.effects,
        vec![Effect::Set {
            key: "work_mem".into(),
            pairs: vec![("work_mem".into(), "8MB".into())]
        }]
    );
    let v = p.check(b"SELECT set_config('work_mem', NULL, false)", true);
    assert_eq!(v.effects, vec![Effect::Reset("work_mem".into())]);
    assert_refused(
        &p,
        &[
            "SELECT set_config('work_mem', w, false) FROM t",
            "SELECT set_config('work_mem', '1MB', is_local) FROM t",
        ],
    );
    // Session pooling needs no replay: an expression is the server's business there.
    assert_allowed(
        &shared(),
        &["SELECT set_config('work_mem', w, false) FROM t"],
    );
}

/// The quick first-letters check never lets a denied name through.
#[test]
fn every_denied_name_is_caught() {
    for name in super::roles::denied_names() {
        assert!(super::roles::is_denied(name), "{name}");
    }
    assert!(!super::roles::is_denied("pgbench_accounts"));
}
