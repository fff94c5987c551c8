//! The operator surface: Prometheus metrics and health at `admin.http`. The `metrics`
//! recorder is one per process (as in production, one instance per process), so the
//! scenarios run one after the other in a single test and compare values before and after.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::{Env, code, start_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` (or another `method`): status code and body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the series `name{labels}` (labels as rendered, in order), if present.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn with_admin(labels: &str) -> (Env, SocketAddr) {
    let env = start_with(
        &format!("[admin]\nhttp = \"127.0.0.1:0\"\n\n[metrics]\ntenant_labels = \"{labels}\"\n"),
        |t| t,
    )
    .await;
    let admin = env.proxy.admin_addr.expect("admin http bound");
    (env, admin)
}

#[tokio::test]
async fn operator_http_endpoint() {
    metrics_count_what_tenants_do_and_health_answers().await;
    readiness_reports_a_shard_that_is_down().await;
    top_n_gives_labels_to_the_active_tenants_and_the_rest_share_other().await;
}

async fn metrics_count_what_tenants_do_and_health_answers() {
    let (env, admin) = with_admin("all").await;
    let acme = env.connect("acme").await;
    for _ in 0..5 {
        acme.simple_query("SELECT count(*) FROM items")
            .await
            .unwrap();
    }
    acme.simple_query("BEGIN; SELECT 1; COMMIT").await.unwrap();
    let err = acme
        .simple_query("SELECT pg_terminate_backend(1)")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    // A wrong password.
    let mut wrong = env.pg_config("acme");
    wrong.password("not-the-password");
    assert!(wrong.connect(tokio_postgres::NoTls).await.is_err());
    // A refused statement is counted when the server's reply to pgtenant's stand-in for it is
    // read, which may be just after the client has its error.
    let stats = env.proxy.state.quotas.tenant("acme");
    common::until(
        "the refusal counted",
        std::time::Duration::from_secs(10),
        || pgtenant::quota::TenantStats::get(&stats.stats.guard_refusals) == 1,
    )
    .await;

    let (status, m) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let acme_label = "{tenant=\"acme\"}";
    let queries = value(&m, &format!("pgtenant_queries_total{acme_label}")).unwrap();
    assert!(queries >= 7.0, "queries {queries}\n{m}");
    let transactions = value(&m, &format!("pgtenant_transactions_total{acme_label}")).unwrap();
    assert!(transactions >= 6.0, "transactions {transactions}");
    assert_eq!(
        value(&m, &format!("pgtenant_guard_refusals_total{acme_label}")),
        Some(1.0),
        "{m}"
    );
    assert!(value(&m, "pgtenant_auth_failures_total{kind=\"password\"}").unwrap() >= 1.0);
    assert!(
        value(
            &m,
            "pgtenant_client_connections{state=\"idle\",tenant=\"acme\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    assert!(
        m.contains("pgtenant_transaction_duration_seconds_bucket{tenant=\"acme\",le=\"0.1\"}"),
        "{m}"
    );
    assert!(m.contains("pgtenant_checkout_wait_seconds_sum{tenant=\"acme\"}"));
    assert!(m.contains("# TYPE pgtenant_query_duration_seconds histogram"));
    let histogram = |m: &str, name: &str, series: &str| {
        value(m, &format!("pgtenant_{name}_seconds_{series}")).unwrap_or(-1.0)
    };
    let tx = histogram(&m, "transaction_duration", "count{tenant=\"acme\"}");
    assert!(tx >= 6.0, "{m}");
    for name in ["transaction_duration", "query_duration", "checkout_wait"] {
        assert_eq!(
            histogram(&m, name, "count{tenant=\"acme\"}"),
            histogram(&m, name, "bucket{tenant=\"acme\",le=\"+Inf\"}"),
            "{name}: {m}"
        );
    }
    let query_count = histogram(&m, "query_duration", "count{tenant=\"acme\"}");
    assert!(
        value(
            &m,
            "pgtenant_client_bytes_total{direction=\"from_client\",tenant=\"acme\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(m.contains("pgtenant_server_connections{shard="), "{m}");
    assert!(m.contains("# TYPE pgtenant_queries_total counter"));
    // No user names, passwords or query text in the labels.
    assert!(!m.contains("app."), "a user name leaked into the metrics");
    assert!(!m.contains("items"));

    // Counters only grow: five more queries are five more.
    for _ in 0..5 {
        acme.simple_query("SELECT 1").await.unwrap();
    }
    let (_, m2) = http(admin, "GET", "/metrics").await;
    let after = value(&m2, &format!("pgtenant_queries_total{acme_label}")).unwrap();
    assert_eq!(after, queries + 5.0);
    // Histograms too: each scrape adds what happened since the last one, once.
    assert_eq!(
        histogram(&m2, "query_duration", "count{tenant=\"acme\"}"),
        query_count + 5.0,
        "{m2}"
    );
    // A temporary table pins acme's server connection: one pinned on shared-a.
    acme.simple_query("CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    let (_, pinned) = http(admin, "GET", "/metrics").await;
    assert_eq!(
        value(
            &pinned,
            "pgtenant_server_connections{shard=\"shared-a\",state=\"pinned\"}"
        ),
        Some(1.0),
        "{pinned}"
    );
    acme.simple_query("DISCARD ALL").await.unwrap();
    let (_, unpinned) = http(admin, "GET", "/metrics").await;
    assert_eq!(
        value(
            &unpinned,
            "pgtenant_server_connections{shard=\"shared-a\",state=\"pinned\"}"
        ),
        Some(0.0)
    );

    // Every series the Grafana dashboard queries is one pgtenant exports (a failed reload
    // first, so that its counter exists).
    let _ = env.proxy.state.reload_from_source().await;
    let (_, scraped) = http(admin, "GET", "/metrics").await;
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/grafana-dashboard.json"),
    )
    .unwrap();
    let mut names: Vec<&str> = dashboard
        .match_indices("pgtenant_")
        .map(|(at, _)| {
            let rest = &dashboard[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        assert!(
            scraped
                .lines()
                .any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' '])),
            "the dashboard queries {name}, which /metrics does not export:\n{scraped}"
        );
    }

    assert_eq!(
        http(admin, "GET", "/healthz").await,
        (200, "ok\n".to_owned())
    );
    let (status, body) = http(admin, "GET", "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("{\"ready\":true,\"shards\":[{\"name\":"),
        "{body}"
    );
    assert!(!body.contains("down"));
    assert_eq!(http(admin, "GET", "/nothing").await.0, 404);
    assert_eq!(http(admin, "POST", "/metrics").await.0, 405);
    // A head that never ends is cut off, not buffered forever.
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(&vec![b'a'; 20_000]).await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

async fn readiness_reports_a_shard_that_is_down() {
    // A second shard pointing at a port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let env = start_with(
        &format!(
            "[shards.dead]\nhost = \"127.0.0.1\"\nport = {port}\ndatabase = \"x\"\nuser = \"x\"\npassword = \"x\"\ntls = \"disable\"\n\n[admin]\nhttp = \"127.0.0.1:0\"\n"
        ),
        |t| t,
    )
    .await;
    let (status, body) = http(env.proxy.admin_addr.unwrap(), "GET", "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"name\":\"dead\",\"status\":\"down\""),
        "{body}"
    );
    assert!(body.contains("\"status\":\"up\""), "{body}");
}

async fn top_n_gives_labels_to_the_active_tenants_and_the_rest_share_other() {
    let (env, admin) = with_admin("top:1").await;
    let series = |t: &str| format!("pgtenant_queries_total{{tenant=\"{t}\"}}");
    let (_, before) = http(admin, "GET", "/metrics").await;
    let acme = env.connect("acme").await;
    acme.simple_query("SELECT 1").await.unwrap();
    let (_, m) = http(admin, "GET", "/metrics").await;
    let globex = env.connect("globex").await;
    for _ in 0..3 {
        globex.simple_query("SELECT 1").await.unwrap();
    }
    let (_, after) = http(admin, "GET", "/metrics").await;
    let get = |m: &str, t: &str| value(m, &series(t)).unwrap_or(0.0);
    // acme, active first, holds the one label; globex counts under "other".
    assert!(get(&m, "acme") > get(&before, "acme"), "{m}");
    assert_eq!(get(&after, "other") - get(&m, "other"), 3.0, "{after}");
    assert_eq!(get(&after, "globex"), get(&before, "globex"), "{after}");
}

/// The admin console: psql and tokio-postgres against database `pgtenant` as an `[admin]`
/// user; tenants' users and wrong passwords are refused as a wrong password is.
#[tokio::test]
async fn admin_console() {
    let verifier = pgtenant::auth::verifier::ScramVerifier::from_password(b"dba-secret");
    let env = start_with(
        &format!("[admin]\nusers = [{{ name = \"dba\", scram = \"{verifier}\" }}]\n"),
        |t| t,
    )
    .await;
    let admin_url = format!(
        "postgresql://dba:dba-secret@127.0.0.1:{}/pgtenant",
        env.port()
    );
    let (console, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<Vec<String>> {
        msgs.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_owned())
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    };
    let acme = env.connect("acme").await;
    acme.simple_query("SELECT 1").await.unwrap();

    let tenants = rows(console.simple_query("SHOW TENANTS").await.unwrap());
    let acme_row = tenants
        .iter()
        .find(|r| r[0] == "acme")
        .expect("acme listed");
    assert_eq!(acme_row[2], "shared");
    assert_eq!(acme_row[5], "1", "one client: {acme_row:?}");
    assert_eq!(acme_row[8], "false");
    assert_eq!(tenants.len(), 4, "{tenants:?}");
    let detail = rows(console.simple_query("show tenant acme").await.unwrap());
    assert!(
        detail.iter().any(|r| r[0] == "queries" && r[1] != "0"),
        "{detail:?}"
    );
    let pools = rows(console.simple_query("SHOW POOLS").await.unwrap());
    assert!(pools.iter().any(|r| r[0] == "shared-a"), "{pools:?}");
    let shards = rows(console.simple_query("SHOW SHARDS").await.unwrap());
    assert!(shards.iter().all(|r| r[6] == "up"), "{shards:?}");
    let clients = rows(console.simple_query("SHOW CLIENTS").await.unwrap());
    assert!(clients.iter().any(|r| r[1] == "acme"), "{clients:?}");
    for cmd in [
        "SHOW SERVERS",
        "SHOW STATS",
        "SHOW CONFIG",
        "SHOW VERSION; SHOW POOLS",
    ] {
        assert!(
            !rows(console.simple_query(cmd).await.unwrap()).is_empty(),
            "{cmd}"
        );
    }
    // Unknown commands and tenants: clear errors, and the console goes on.
    let err = console.simple_query("DROP TABLE items").await.unwrap_err();
    assert_eq!(code(&err), "42601");
    assert!(common::message(&err).contains("unknown admin command"));
    let err = console.simple_query("PAUSE nosuch").await.unwrap_err();
    assert_eq!(code(&err), "42704");
    // The extended protocol is refused with a clear error (the console speaks simple queries).
    let err = console.query("SHOW TENANTS", &[]).await.unwrap_err();
    assert_eq!(code(&err), "0A000");

    // PAUSE acme: its next transaction waits until RESUME; globex is not affected.
    let (console, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    console.simple_query("PAUSE acme").await.unwrap();
    let paused = tokio::spawn(async move { acme.simple_query("SELECT 2").await.map(|_| acme) });
    let globex = env.connect("globex").await;
    globex.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!paused.is_finished(), "a paused tenant's transaction ran");
    console.simple_query("RESUME acme").await.unwrap();
    let acme = tokio::time::timeout(std::time::Duration::from_secs(5), paused)
        .await
        .expect("resumed")
        .unwrap()
        .unwrap();

    // KILL acme: its sessions end with 57P01; globex goes on.
    console.simple_query("KILL acme").await.unwrap();
    let err = acme.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.code().map(|c| c.code()) == Some("57P01") || err.is_closed(),
        "{err:?}"
    );
    globex.simple_query("SELECT 1").await.unwrap();
    assert!(
        env.connect("acme")
            .await
            .simple_query("SELECT 1")
            .await
            .is_ok()
    );

    // RELOAD of the file in force: this test's configuration has no file, so the error is
    // reported and nothing changes.
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&err), "F0000");

    // Tenants' users, unknown users and wrong passwords: a wrong password, every time.
    let t = env.tenant("acme");
    for url in [
        format!("postgresql://dba:wrong@127.0.0.1:{}/pgtenant", env.port()),
        format!("postgresql://nobody:x@127.0.0.1:{}/pgtenant", env.port()),
        format!(
            "postgresql://{}.acme:{}@127.0.0.1:{}/pgtenant",
            t.user,
            t.password,
            env.port()
        ),
    ] {
        let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        assert_eq!(code(&err), "28P01", "{url}");
    }
    // psql runs the commands (off the runtime the proxy runs on).
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || common::psql(&admin_url, "SHOW POOLS; SHOW VERSION"))
            .await
            .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("shared-a|") && out.contains("pgtenant "),
        "{out}"
    );
}

/// The configuration file is watched: a change applies without a signal, even when the file
/// is replaced by rename as editors and ConfigMaps do; an invalid file changes nothing; a
/// removed tenant's sessions end at their next transaction with a clear error while the
/// others go on.
#[tokio::test]
async fn a_changed_file_is_reloaded_and_a_removed_tenant_ends_at_its_next_transaction() {
    let (env, path) = common::start_from_file("").await;
    let stop = tokio_util::sync::CancellationToken::new();
    pgtenant::admin::watch::start(path.clone(), env.proxy.state.clone(), stop.clone())
        .expect("watch");
    let original = std::fs::read_to_string(&path).unwrap();
    let acme = env.connect("acme").await;
    let globex = env.connect("globex").await;
    acme.simple_query("SELECT 1").await.unwrap();

    // An invalid file: nothing changes.
    let replace = |text: &str| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    replace("this is not toml [");
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    acme.simple_query("SELECT 1").await.unwrap();
    assert!(env.proxy.state.snapshot().tenant_by_name("acme").is_some());

    // acme removed, by rename.
    let without_acme = common::without_tenant(&original, "acme");
    assert_ne!(without_acme, original);
    replace(&without_acme);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while env.proxy.state.snapshot().tenant_by_name("acme").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was not applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let err = acme.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(code(&err), "57P01", "{err:?}");
    assert!(common::message(&err).contains("removed"), "{err:?}");
    globex.simple_query("SELECT 1").await.unwrap();
    let mut again = env.pg_config("acme");
    assert!(
        again
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await
            .is_err()
    );

    // Back again: acme connects.
    replace(&original);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while env.proxy.state.snapshot().tenant_by_name("acme").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was not applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    env.connect("acme")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    stop.cancel();
}

/// The audit log: JSON lines for connect, auth, route, refusals and disconnect, never a
/// password or query text; reopened on request (SIGHUP) for rotation.
#[tokio::test]
async fn the_audit_log_records_sessions_without_secrets() {
    let dir = common::TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&path);
    let env = start_with(&format!("[audit]\npath = \"{}\"\n", path.display()), |t| t).await;
    let acme = env.connect("acme").await;
    acme.simple_query("SELECT 'secret-literal-value'")
        .await
        .unwrap();
    let err = acme
        .simple_query("SELECT pg_terminate_backend(1), 'another-secret'")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "42501");
    drop(acme);
    let mut wrong = env.pg_config("globex");
    wrong.password("wrong-password-value");
    assert!(wrong.connect(tokio_postgres::NoTls).await.is_err());

    let password = env.tenant("acme").password.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("\"event\":\"disconnect\"") && text.contains("\"event\":\"auth_fail\"") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "audit log incomplete:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for line in text.lines() {
        assert!(
            line.starts_with("{\"time\":\"20") && line.ends_with('}'),
            "{line}"
        );
        assert!(line.contains("\"session\":"), "{line}");
    }
    let has = |event: &str, also: &str| {
        text.lines()
            .any(|l| l.contains(&format!("\"event\":\"{event}\"")) && l.contains(also))
    };
    assert!(has("connect", "\"client\":\"127.0.0.1:"));
    assert!(has("auth_ok", "\"tenant\":\"acme\""));
    assert!(has("route", "\"shard\":\"shared-a\""));
    assert!(has("guard_refusal", "\"sqlstate\":\"42501\""));
    assert!(has("guard_refusal", "pg_terminate_backend"));
    assert!(has("auth_fail", "\"sqlstate\":\"28P01\""));
    assert!(has("disconnect", "\"queries\":2"), "{text}");
    for secret in [
        password.as_str(),
        "wrong-password-value",
        "secret-literal-value",
        "another-secret",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into the audit log");
    }
    // Rotation: move the file away and reopen; new lines go to a new file.
    let rotated = dir.join("audit.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    env.proxy.state.audit.reopen();
    env.connect("globex")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&path)
        .unwrap_or_default()
        .contains("\"tenant\":\"globex\"")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing written after reopen"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
