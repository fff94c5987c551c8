//! The guard's lexer and policy on arbitrary SQL bytes, under every policy shape and both
//! settings of standard_conforming_strings: no panic, and a refusal always has a message.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pgtenant::tenant::guard::{Policy, Scope};

fuzz_target!(|data: &[u8]| {
    let policies = [
        Policy {
            scope: Scope::Tenant,
            protect_search_path: true,
            readonly: true,
            max_statement_timeout: Some(Duration::from_secs(30)),
            notify_prefix: Some("acme.".into()),
            allow_ddl: false,
            prepared_prefix: Some("pgt_c1_".into()),
            lock_salt: Some(0x8000_0000_0000_0001),
            unchecked: false,
            prepared_view: None,
        },
        Policy {
            scope: Scope::Dedicated,
            protect_search_path: false,
            readonly: false,
            max_statement_timeout: None,
            notify_prefix: None,
            allow_ddl: true,
            prepared_prefix: None,
            lock_salt: None,
            unchecked: false,
            prepared_view: None,
        },
    ];
    for scs in [true, false] {
        let _ = pgtenant::tenant::guard::lexer::lex(data, scs);
        for p in &policies {
            let v = p.check(data, scs);
            if let Some(r) = v.refusal {
                assert!(!r.message.is_empty());
            }
            if let Some(text) = v.rewritten {
                // A rewrite (channels moved into the namespace) still lexes.
                assert!(pgtenant::tenant::guard::lexer::lex(text.as_bytes(), scs).is_ok());
                assert!(text.contains("acme."));
            }
        }
    }
});
