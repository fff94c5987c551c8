//! Framing and the relay on arbitrary byte streams, fed in two chunks at a fuzzer-chosen
//! split: no panic, pieces never overrun the buffer, and the relay never emits more than it
//! was given plus its own small messages.
#![no_main]

use std::collections::BTreeMap;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgtenant::pool::cache::PooledState;
use pgtenant::pool::server_conn::SERVER_WHOLE;
use pgtenant::protocol::frame::{FrameScanner, Piece, TagSet};
use pgtenant::protocol::tracker::ConnTracker;
use pgtenant::session::relay::{Relay, RelayRules};

fn rules() -> RelayRules {
    // Transaction pooling and a query rate: the paths that rewrite and refuse messages.
    let mut rules = RelayRules::sample_shared(Some(1000));
    rules.policy.prepared_prefix = Some("pgt_c1_".into());
    rules
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = (split as usize * rest.len()) / 256;
    let (first, second) = rest.split_at(cut);

    let mut scanner = FrameScanner::new(TagSet::of(b"QPZSE"), 4096);
    let mut buf = BytesMut::new();
    for chunk in [first, second] {
        buf.extend_from_slice(chunk);
        loop {
            match scanner.next(&buf) {
                Ok(Some(Piece::Whole { len, .. })) | Ok(Some(Piece::Pass { len, .. })) => {
                    assert!(len <= buf.len() && len > 0);
                    let _ = buf.split_to(len);
                }
                Ok(None) | Err(_) => break,
            }
        }
    }

    let mut relay = Relay::new(4096, rules());
    let mut tracker = ConnTracker::default();
    let mut pooled = PooledState::default();
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in [first, second] {
        input.extend_from_slice(chunk);
        if relay.client_bytes(&mut input, &mut out, &mut tracker, &mut pooled).is_err() {
            break;
        }
    }
    let mut server_scanner = FrameScanner::new(SERVER_WHOLE, 1 << 20);
    let mut params = BTreeMap::new();
    let mut input = BytesMut::new();
    let mut to_client = BytesMut::new();
    for chunk in [first, second] {
        input.extend_from_slice(chunk);
        if relay
            .server_bytes(
                &mut server_scanner,
                &mut input,
                &mut to_client,
                &mut tracker,
                &mut params,
                &mut pooled,
            )
            .is_err()
        {
            break;
        }
    }
    assert!(to_client.len() <= rest.len() + 4096);
});
