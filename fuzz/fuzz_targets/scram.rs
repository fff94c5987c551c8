//! The SCRAM server on arbitrary client messages and verifiers: no panic, and nothing
//! authenticates without the password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgtenant::auth::scram::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramServer};
use pgtenant::auth::verifier::ScramVerifier;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ScramVerifier::parse(text);
    }
    let verifier = ScramVerifier::mock(&[7; 32], "fuzz");
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let (first, last) = data.split_at(split);
    let last = last.get(1..).unwrap_or_default();
    for (mechanism, cb) in [(SCRAM_SHA_256, None), (SCRAM_SHA_256_PLUS, Some(vec![1u8; 32]))] {
        let mut server = ScramServer::new(verifier.clone(), false, cb);
        if server.client_first(mechanism, first).is_ok() {
            // A mock verifier never authenticates.
            assert!(server.client_final(last).is_err());
        }
        let mut server = ScramServer::new(verifier.clone(), true, None);
        if let Ok(reply) = server.client_first(SCRAM_SHA_256, first) {
            assert!(reply.starts_with("r="));
            // Without the password, a proof is accepted only by chance (2^-256).
            let _ = server.client_final(last);
        }
    }
});
