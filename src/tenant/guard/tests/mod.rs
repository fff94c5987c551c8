//! Guard cases: every spelling family of the constructs the guard refuses, and the harmless
//! statements real applications send, which must pass.

use std::time::Duration;

use super::*;

fn shared() -> Policy {
    Policy {
        scope: Scope::Tenant,
        protect_search_path: false,
        readonly: false,
        max_statement_timeout: Some(Duration::from_secs(30)),
        notify_prefix: Some("acme.".into()),
        allow_ddl: false,
        prepared_prefix: None,
        lock_salt: Some(0x8000_0000_0000_0001),
        unchecked: false,
        prepared_view: None,
    }
}

fn schema() -> Policy {
    Policy {
        protect_search_path: true,
        ..shared()
    }
}

fn readonly() -> Policy {
    Policy {
        readonly: true,
        ..shared()
    }
}

fn dedicated() -> Policy {
    Policy {
        scope: Scope::Dedicated,
        notify_prefix: None,
        ..shared()
    }
}

fn ddl() -> Policy {
    Policy {
        allow_ddl: true,
        prepared_prefix: None,
        ..schema()
    }
}

fn assert_allowed(p: &Policy, cases: &[&str]) {
    for sql in cases {
        let v = p.check(sql.as_bytes(), true);
        assert!(v.refusal.is_none(), "refused but should pass: {sql}\n{v:?}");
    }
}

fn assert_refused(p: &Policy, cases: &[&str]) {
    for sql in cases {
        let v = p.check(sql.as_bytes(), true);
        let r = v
            .refusal
            .unwrap_or_else(|| panic!("passed but should be refused: {sql}"));
        assert_eq!(r.sqlstate, "42501", "{sql}");
        assert!(!r.message.is_empty());
    }
}

/// A shared tenant under transaction pooling.
fn pooled() -> Policy {
    Policy {
        prepared_prefix: Some("pgt_c7_".into()),
        ..shared()
    }
}

mod gating;
mod literals;
mod placements;
mod pooling;
mod statements;
