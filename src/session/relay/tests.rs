//! Relay logic over byte buffers: forwarding, refusal substitution and error replacement,
//! the rebind after RESET ALL, notification renaming, and the query rate.

use super::*;
use crate::pool::server_conn::SERVER_WHOLE;
use crate::protocol::TxStatus;
use crate::protocol::frame::split_whole;

fn msg(t: u8, body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    encode::raw(t, body, &mut b);
    b
}

fn query(sql: &str) -> BytesMut {
    msg(b'Q', format!("{sql}\0").as_bytes())
}

struct Harness {
    relay: Relay,
    tracker: ConnTracker,
    scanner: FrameScanner,
    params: BTreeMap<String, String>,
    pooled: PooledState,
}

impl Harness {
    fn new(qps: Option<u32>) -> Self {
        Harness {
            relay: Relay::new(1 << 20, RelayRules::sample_shared(qps)),
            tracker: ConnTracker::default(),
            scanner: FrameScanner::new(SERVER_WHOLE, 1 << 20),
            params: BTreeMap::new(),
            pooled: PooledState::default(),
        }
    }

    /// What reaches the server for `client` bytes, as (tag, body) pairs.
    fn client(&mut self, client: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut input = BytesMut::from(client);
        let mut out = BytesMut::new();
        self.relay
            .client_bytes(&mut input, &mut out, &mut self.tracker, &mut self.pooled)
            .unwrap();
        split_whole(&out)
            .map(|m| m.map(|(t, b)| (t, b.to_vec())).unwrap())
            .collect()
    }

    /// What reaches the client for `server` bytes.
    fn server(&mut self, server: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut input = BytesMut::from(server);
        let mut out = BytesMut::new();
        self.relay
            .server_bytes(
                &mut self.scanner,
                &mut input,
                &mut out,
                &mut self.tracker,
                &mut self.params,
                &mut self.pooled,
            )
            .unwrap();
        split_whole(&out)
            .map(|m| m.map(|(t, b)| (t, b.to_vec())).unwrap())
            .collect()
    }
}

fn server_error(code: &str) -> BytesMut {
    msg(
        b'E',
        format!("SERROR\0C{code}\0Mserver says no\0\0").as_bytes(),
    )
}

fn ready(status: u8) -> BytesMut {
    msg(b'Z', &[status])
}

fn field(body: &[u8], code: u8) -> String {
    crate::protocol::server_msgs::error_fields(body)
        .map(|f| match code {
            b'C' => f.code,
            _ => f.message,
        })
        .unwrap()
}

#[test]
fn allowed_queries_pass_unchanged() {
    let mut h = Harness::new(None);
    let q = query("SELECT 1");
    assert_eq!(h.client(&q), vec![(b'Q', b"SELECT 1\0".to_vec())]);
    let mut reply = msg(b'C', b"SELECT 1\0");
    reply.extend_from_slice(&ready(b'I'));
    assert_eq!(h.server(&reply).len(), 2);
    assert!(h.tracker.is_idle());
}

#[test]
fn a_refused_query_gets_pgtenants_error_in_its_place() {
    let mut h = Harness::new(None);
    let mut input = query("SELECT 1");
    input.extend_from_slice(&query("SET app.current_tenant_id = 'x'"));
    input.extend_from_slice(&query("SELECT 2"));
    let sent = h.client(&input);
    assert_eq!(sent.len(), 3);
    assert_eq!(
        sent[1].1, REFUSED_SQL,
        "the refused text never reaches the server"
    );

    // The server answers the three in order; only the middle error is replaced.
    let mut reply = msg(b'C', b"SELECT 1\0");
    reply.extend_from_slice(&ready(b'I'));
    reply.extend_from_slice(&server_error("42601"));
    reply.extend_from_slice(&ready(b'I'));
    reply.extend_from_slice(&server_error("42P01"));
    reply.extend_from_slice(&ready(b'I'));
    let got = h.server(&reply);
    let errors: Vec<String> = got
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| field(b, b'C'))
        .collect();
    assert_eq!(errors, ["42501", "42P01"]);
    assert!(
        got.iter()
            .filter(|(t, _)| *t == b'E')
            .any(|(_, b)| field(b, b'M').contains("app.current_tenant_id"))
    );
    assert_eq!(h.relay.counters.refused, 1);
}

#[test]
fn a_refused_parse_becomes_an_unnamed_failure_until_sync() {
    let mut h = Harness::new(None);
    let mut input = BytesMut::new();
    postgres_protocol::message::frontend::parse(
        "s1",
        "SELECT set_config('app.current_tenant_id', $1, false)",
        [25u32],
        &mut input,
    )
    .unwrap();
    postgres_protocol::message::frontend::sync(&mut input);
    let sent = h.client(&input);
    assert_eq!(sent[0].0, b'P');
    // Unnamed: a later Bind of "s1" fails as it would after a failed Parse.
    assert!(sent[0].1.starts_with(b"\0PGTENANT_REFUSED_STATEMENT\0"));
    assert_eq!(&sent[0].1[sent[0].1.len() - 6..], &[0, 1, 0, 0, 0, 25]);
    let mut reply = server_error("42601");
    reply.extend_from_slice(&ready(b'I'));
    let got = h.server(&reply);
    assert_eq!(field(&got[0].1, b'C'), "42501");
}

#[test]
fn reset_all_is_followed_by_a_rebind_whose_replies_are_consumed() {
    let mut h = Harness::new(None);
    let sent = h.client(&query("RESET ALL"));
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].1, b"SET app.current_tenant_id TO 'x'\0");
    assert_eq!(h.tracker.pending(), 2);

    let mut reply = msg(b'C', b"RESET\0");
    reply.extend_from_slice(&msg(b'S', b"application_name\0\0"));
    reply.extend_from_slice(&ready(b'I'));
    reply.extend_from_slice(&msg(b'C', b"SET\0"));
    reply.extend_from_slice(&msg(b'S', b"application_name\0app\0"));
    reply.extend_from_slice(&ready(b'I'));
    let got: Vec<u8> = h.server(&reply).iter().map(|(t, _)| *t).collect();
    // The client sees its own reply and the parameter changes, not the rebind's CommandComplete
    // or ReadyForQuery.
    assert_eq!(got, b"CSZS");
    assert!(h.tracker.is_idle());
}

#[test]
fn a_failed_rebind_makes_the_server_connection_unusable() {
    let mut h = Harness::new(None);
    h.client(&query("RESET ALL"));
    let mut reply = msg(b'C', b"RESET\0");
    reply.extend_from_slice(&ready(b'I'));
    reply.extend_from_slice(&server_error("57014"));
    reply.extend_from_slice(&ready(b'I'));
    let mut input = BytesMut::from(&reply[..]);
    let mut out = BytesMut::new();
    let result = h.relay.server_bytes(
        &mut h.scanner,
        &mut input,
        &mut out,
        &mut h.tracker,
        &mut h.params,
        &mut h.pooled,
    );
    assert!(
        matches!(result, Err(ServerProtocolError::BindingFailed(_))),
        "{result:?}"
    );
    assert!(
        h.relay.server_unusable(),
        "never used again, never returned"
    );
    let shown: Vec<u8> = split_whole(&out).map(|m| m.unwrap().0).collect();
    assert_eq!(shown, b"CZ", "the client saw only its own replies");
}

#[test]
fn notifications_leave_the_namespace_on_the_way_out() {
    let mut h = Harness::new(None);
    let mut body = 42i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"acme.events\0hello\0");
    let got = h.server(&msg(b'A', &body));
    assert_eq!(&got[0].1[4..], b"events\0hello\0");

    let mut foreign = 42i32.to_be_bytes().to_vec();
    foreign.extend_from_slice(b"globex.events\0secret\0");
    assert!(h.server(&msg(b'A', &foreign)).is_empty());
}

#[test]
fn listen_is_rewritten_into_the_namespace() {
    let mut h = Harness::new(None);
    let sent = h.client(&query("LISTEN events"));
    assert_eq!(sent[0].1, b"LISTEN \"acme.events\"\0");
}

#[test]
fn the_query_rate_refuses_with_53400() {
    let mut h = Harness::new(Some(2));
    let mut input = BytesMut::new();
    for _ in 0..3 {
        input.extend_from_slice(&query("SELECT 1"));
    }
    let sent = h.client(&input);
    assert_eq!(sent[2].1, REFUSED_SQL);
    let mut reply = BytesMut::new();
    for _ in 0..2 {
        reply.extend_from_slice(&msg(b'C', b"SELECT 1\0"));
        reply.extend_from_slice(&ready(b'I'));
    }
    reply.extend_from_slice(&server_error("42601"));
    reply.extend_from_slice(&ready(b'I'));
    let got = h.server(&reply);
    let e = got.iter().find(|(t, _)| *t == b'E').unwrap();
    assert_eq!(field(&e.1, b'C'), "53400");
    assert_eq!(h.relay.counters.throttled, 1);

    // Extended protocol: the Execute is refused through an unknown portal.
    let mut ext = BytesMut::new();
    postgres_protocol::message::frontend::execute("", 0, &mut ext).unwrap();
    let sent = h.client(&ext);
    assert!(sent[0].1.starts_with(b"pgtenant_refused_portal\0"));
}

#[test]
fn function_call_messages_are_refused() {
    let mut h = Harness::new(None);
    let sent = h.client(&msg(b'F', &[0, 0, 3, 0xe8, 0, 0, 0, 0, 0, 0]));
    assert_eq!(sent, vec![(b'Q', REFUSED_SQL.to_vec())]);
    let mut reply = server_error("42601");
    reply.extend_from_slice(&ready(b'I'));
    let got = h.server(&reply);
    assert_eq!(field(&got[0].1, b'C'), "42501");
}

#[test]
fn standard_conforming_strings_follows_the_server() {
    let mut h = Harness::new(None);
    h.server(&msg(b'S', b"standard_conforming_strings\0off\0"));
    // With it off, this hides nothing: the string runs to the end.
    let sent = h.client(&query(
        "SELECT 'a\\', set_config('app.current_tenant_id', 'x', false) --'",
    ));
    assert_ne!(sent[0].1, REFUSED_SQL);
    h.server(&msg(b'S', b"standard_conforming_strings\0on\0"));
    let sent = h.client(&query(
        "SELECT 'a\\', set_config('app.current_tenant_id', 'x', false) --'",
    ));
    assert_eq!(sent[0].1, REFUSED_SQL);
}

#[test]
fn busy_and_ready_times_follow_the_exchange() {
    let mut h = Harness::new(None);
    assert!(h.relay.busy_since().is_none());
    h.client(&query("SELECT pg_sleep(1)"));
    assert!(h.relay.busy_since().is_some());
    assert!(h.relay.ready_since().is_none());
    h.server(&ready(b'T'));
    assert!(h.relay.busy_since().is_none());
    assert!(h.relay.ready_since().is_some());
    assert_eq!(h.tracker.status(), TxStatus::InTransaction);
}

fn pooled_harness() -> Harness {
    let mut rules = RelayRules::sample_shared(None);
    rules.policy.prepared_prefix = Some("pgt_c1_".into());
    let mut h = Harness {
        relay: Relay::new(1 << 20, rules),
        tracker: ConnTracker::default(),
        scanner: FrameScanner::new(SERVER_WHOLE, 1 << 20),
        params: BTreeMap::new(),
        pooled: PooledState::default(),
    };
    // A connection that already has this client's settings: the binding goes in band.
    h.pooled.settings_of = Some(h.relay.settings_key());
    h.pooled.used = true;
    let mut out = BytesMut::new();
    h.relay
        .attach(&mut out, &mut h.tracker, &mut h.pooled, false);
    assert!(out.is_empty(), "nothing up front");
    h
}

#[test]
fn in_band_binding_prefixes_a_simple_query_and_consumes_its_reply() {
    let mut h = pooled_harness();
    let sent = h.client(&query("SELECT 1"));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, b"SET app.current_tenant_id TO 'x'; SELECT 1\0");
    let mut reply = msg(b'C', b"SET\0");
    reply.extend_from_slice(&msg(b'T', b"\0\0"));
    reply.extend_from_slice(&msg(b'D', b"\0\0"));
    reply.extend_from_slice(&msg(b'C', b"SELECT 1\0"));
    reply.extend_from_slice(&ready(b'I'));
    let got: Vec<u8> = h.server(&reply).iter().map(|(t, _)| *t).collect();
    assert_eq!(got, b"TDCZ");
    assert!(h.relay.at_release_point(&h.tracker));
}

#[test]
fn in_band_binding_shifts_error_positions_back() {
    let mut h = pooled_harness();
    h.client(&query("SELECT nosuch"));
    let shift = "SET app.current_tenant_id TO 'x'; ".len();
    let mut reply = msg(b'C', b"SET\0");
    reply.extend_from_slice(&msg(
        b'E',
        format!("SERROR\0C42703\0Mcolumn does not exist\0P{}\0\0", shift + 8).as_bytes(),
    ));
    reply.extend_from_slice(&ready(b'I'));
    let got = h.server(&reply);
    assert_eq!(got[0].0, b'E');
    assert!(String::from_utf8_lossy(&got[0].1).contains("P8\0"));
}

#[test]
fn in_band_binding_rides_an_extended_batch() {
    let mut h = pooled_harness();
    let mut batch = BytesMut::new();
    postgres_protocol::message::frontend::parse("s1", "SELECT 1", [], &mut batch).unwrap();
    postgres_protocol::message::frontend::describe(b'S', "s1", &mut batch).unwrap();
    postgres_protocol::message::frontend::sync(&mut batch);
    let sent: Vec<u8> = h.client(&batch).iter().map(|(t, _)| *t).collect();
    // pgtenant's Parse + Bind + Execute, then the client's Parse, Describe, Sync.
    assert_eq!(sent, b"PBEPDS");
    let mut reply = msg(b'1', b"");
    reply.extend_from_slice(&msg(b'2', b""));
    reply.extend_from_slice(&msg(b'D', b"\0\x01\0\0\0\x01x"));
    reply.extend_from_slice(&msg(b'C', b"SELECT 1\0"));
    reply.extend_from_slice(&msg(b'1', b""));
    reply.extend_from_slice(&msg(b't', b"\0\0"));
    reply.extend_from_slice(&msg(b'T', b"\0\0"));
    reply.extend_from_slice(&ready(b'I'));
    let got: Vec<u8> = h.server(&reply).iter().map(|(t, _)| *t).collect();
    assert_eq!(got, b"1tTZ");
}

#[test]
fn statements_the_server_confirmed_stay_cached_when_their_transaction_fails() {
    let mut h = pooled_harness();
    let mut batch = BytesMut::new();
    postgres_protocol::message::frontend::parse("s1", "SELECT 1", [], &mut batch).unwrap();
    postgres_protocol::message::frontend::parse("s2", "SELEC 2", [], &mut batch).unwrap();
    postgres_protocol::message::frontend::sync(&mut batch);
    let sent: Vec<u8> = h.client(&batch).iter().map(|(t, _)| *t).collect();
    assert_eq!(sent, b"PBEPPS");
    let bind_name = h.relay.rules.binding.statement().0.to_owned();
    // The binding and s1 are parsed; s2 is a syntax error.
    let mut reply = msg(b'1', b"");
    reply.extend_from_slice(&msg(b'2', b""));
    reply.extend_from_slice(&msg(b'D', b"\0\x01\0\0\0\x01x"));
    reply.extend_from_slice(&msg(b'C', b"SELECT 1\0"));
    reply.extend_from_slice(&msg(b'1', b""));
    reply.extend_from_slice(&server_error("42601"));
    reply.extend_from_slice(&ready(b'I'));
    let got: Vec<u8> = h.server(&reply).iter().map(|(t, _)| *t).collect();
    assert_eq!(got, b"1EZ");
    assert!(
        h.pooled.prepared.contains(&bind_name),
        "the binding statement exists on the server: forgetting it means 42P05 later"
    );
    assert_eq!(h.pooled.prepared.len(), 2, "s1 stays cached, s2 does not");
}

fn pooled_client(client_id: u64, rebind_sql: &str) -> Relay {
    let mut rules = RelayRules::sample_shared(None);
    rules.policy.prepared_prefix = Some(format!("pgt_c{client_id}_"));
    rules.client_id = client_id;
    rules.rebind_sql = rebind_sql.into();
    Relay::new(1 << 20, rules)
}

#[test]
fn a_connection_needs_no_replay_for_a_client_with_the_same_session_state() {
    let mut h = pooled_harness();
    // Another client, same setup and no SETs of its own: nothing to set up.
    let mut other = pooled_client(2, "SET app.current_tenant_id TO 'x'");
    let before = h
        .pooled
        .settings_of
        .clone()
        .expect("set up by the harness's client");
    assert!(
        other.setup_for(&mut h.pooled).is_none(),
        "nothing to replay"
    );
    // The connection now carries the other client's key: its next look compares pointers.
    let adopted = h.pooled.settings_of.clone().expect("still set up");
    assert!(!Arc::ptr_eq(&adopted, &before) && *adopted == *before);
    assert!(Arc::ptr_eq(&adopted, &other.settings_key()));
    let mut out = BytesMut::new();
    other.attach(&mut out, &mut h.tracker, &mut h.pooled, false);
    assert!(out.is_empty());
    assert_eq!(h.pooled.last_client, Some(2));
    // A read-only user of the same tenant: its setup differs, so the state is reset first.
    let mut reader = pooled_client(
        3,
        "SET app.current_tenant_id TO 'x'; SET default_transaction_read_only = on",
    );
    let (sql, pairs) = reader.setup_for(&mut h.pooled).expect("a setup");
    assert_eq!(
        sql,
        "RESET ALL; SET app.current_tenant_id TO 'x'; SET default_transaction_read_only = on"
    );
    assert!(pairs.is_empty());
    reader.setup_done(&mut h.pooled);
    assert!(reader.setup_for(&mut h.pooled).is_none());
}

#[test]
fn replayed_settings_and_the_token_travel_as_parameters() {
    let mut rules = RelayRules::sample_shared(None);
    rules.policy.prepared_prefix = Some("pgt_c4_".into());
    rules.startup_settings = vec![("application_name".into(), "x'; SELECT 1; --".into())];
    rules.binding.verified = true;
    let mut relay = Relay::new(1 << 20, rules);
    let mut pooled = PooledState {
        context_token: Some(("x".into(), "tok".into())),
        ..PooledState::default()
    };
    let (sql, pairs) = relay.setup_for(&mut pooled).expect("a setup");
    assert!(
        !sql.contains("SELECT 1"),
        "client text never becomes SQL: {sql}"
    );
    assert_eq!(
        pairs,
        [
            ("application_name".to_owned(), "x'; SELECT 1; --".to_owned()),
            ("pgtenant.context".to_owned(), "tok".to_owned())
        ]
    );
    relay.setup_done(&mut pooled);
}

#[test]
fn session_state_keys_cannot_be_forged_by_moving_text_between_parts() {
    use crate::pool::cache::settings_key;
    assert_ne!(settings_key("A", ["B|1:C"]), settings_key("A", ["B", "C"]));
    assert_ne!(settings_key("A|1:B", []), settings_key("A", ["B"]));
    assert_eq!(settings_key("A", ["B"]), settings_key("A", ["B"]));
}

#[test]
fn the_ready_for_query_after_listen_waits_for_the_hub() {
    let mut h = pooled_harness();
    let sent = h.client(&query("LISTEN ch"));
    // The client's (prefixed) LISTEN, then pgtenant's UNLISTEN on the pooled connection.
    assert_eq!(sent.len(), 2);
    assert!(!h.relay.holds_client_output(&h.tracker));
    let mut reply = msg(b'C', b"SET\0");
    reply.extend_from_slice(&msg(b'C', b"LISTEN\0"));
    reply.extend_from_slice(&ready(b'I'));
    h.server(&reply);
    assert!(
        h.relay.holds_client_output(&h.tracker),
        "the client's transaction is over and the hub has not listened yet"
    );
    // Inside an explicit transaction nothing is held: the client must be able to COMMIT.
    let mut h = pooled_harness();
    h.client(&query("BEGIN; LISTEN ch"));
    let mut reply = msg(b'C', b"SET\0");
    reply.extend_from_slice(&msg(b'C', b"BEGIN\0"));
    reply.extend_from_slice(&msg(b'C', b"LISTEN\0"));
    reply.extend_from_slice(&ready(b'T'));
    h.server(&reply);
    assert!(!h.relay.holds_client_output(&h.tracker));
    // Nor while an extended batch waits for its Sync (asyncpg prepares with Flush).
    let mut h = pooled_harness();
    let mut batch = BytesMut::new();
    postgres_protocol::message::frontend::parse("s1", "LISTEN ch", [], &mut batch).unwrap();
    postgres_protocol::message::frontend::describe(b'S', "s1", &mut batch).unwrap();
    postgres_protocol::message::frontend::flush(&mut batch);
    h.client(&batch);
    assert!(!h.relay.holds_client_output(&h.tracker));
}
