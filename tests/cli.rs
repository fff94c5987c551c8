//! The command line and the shipped examples: every file in `config/` loads, `check` reports
//! errors with file and line, `passwd` makes a verifier that authenticates its password, and
//! the demo starts and serves a working URL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

fn pgtenant() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgtenant"))
}

#[test]
fn every_config_example_loads() {
    let mut seen = 0;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = ["config", "docker"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().path());
    for path in files {
        if path.extension().is_some_and(|e| e == "toml") {
            pgtenant::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let out = pgtenant()
                .arg("check")
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            seen += 1;
        }
    }
    assert!(seen >= 2);
}

#[test]
fn check_names_file_and_line_of_an_error() {
    let dir = common::TempDir::new("cli");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[listen]\naddr = \"127.0.0.1:6432\"\n\n[shards.a]\nhost = \"h\"\ndatabase = \"d\"\nuser = \"u\"\nmax_conections = 5\n",
    )
    .unwrap();
    let out = pgtenant()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:8:", path.display())), "{err}");
    assert!(err.contains("max_conections"), "{err}");
}

#[test]
fn passwd_prints_a_verifier_for_the_password_on_stdin() {
    let mut child = pgtenant()
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let verifier = pgtenant::auth::verifier::ScramVerifier::parse(text.trim()).unwrap();
    assert!(!text.contains("s3cret"));

    use pgtenant::auth::scram::{SCRAM_SHA_256, ScramServer};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut server = ScramServer::new(verifier, true, None);
    let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
    let first = server
        .client_first(SCRAM_SHA_256, client.message())
        .unwrap();
    client.update(first.as_bytes()).unwrap();
    let last = server.client_final(client.message()).unwrap();
    client.finish(last.as_bytes()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_starts_and_a_printed_url_works() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .args(["--log-format", "json", "demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut all = String::new();
        let _ = tokio::io::BufReader::new(stderr)
            .read_to_string(&mut all)
            .await;
        all
    });
    let urls = async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut urls = Vec::new();
        let mut admin = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(start) = line.find("postgresql://") {
                let url = line[start..]
                    .split('"')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if url.ends_with("/pgtenant") {
                    admin = Some(url);
                } else {
                    urls.push(url);
                }
            }
            if line.contains("Press Ctrl-C") {
                break;
            }
        }
        (urls, admin)
    };
    let (urls, admin) = tokio::time::timeout(Duration::from_secs(120), urls)
        .await
        .expect("demo printed its URLs");
    assert_eq!(urls.len(), 4, "{urls:?}");
    // The printed admin console URL works.
    let admin = tokio_postgres::Config::from_str(&admin.expect("admin console URL")).unwrap();
    let console = common::connect_with(admin).await.unwrap();
    let tenants = console.simple_query("SHOW TENANTS").await.unwrap();
    let rows = tenants
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 4);
    drop(console);
    let config = tokio_postgres::Config::from_str(&urls[0]).unwrap();
    let client = common::connect_with(config).await.unwrap();
    let rows = client
        .query("SELECT name FROM items ORDER BY id", &[])
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["acme anvil", "acme rocket skates"]);
    drop(client);

    let pid = child.id().unwrap().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("demo stops on Ctrl-C")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // --log-format json: every line is one JSON object, without colour codes, and a
    // session's lines carry its id and tenant.
    let logs = logs.await.unwrap();
    assert!(!logs.contains('\u{1b}'), "ANSI codes in {logs}");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let authenticated = lines
        .iter()
        .find(|l| l["fields"]["message"] == "authenticated")
        .unwrap_or_else(|| panic!("no authenticated line in {logs}"));
    let session = &authenticated["spans"][0];
    assert_eq!(session["name"], "session");
    assert_eq!(session["tenant"], "acme", "{authenticated}");
    assert!(session["id"].is_u64(), "{authenticated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shards_reports_hardening_problems() {
    let env = common::start().await;
    let dir = common::TempDir::new("check");
    let path = dir.join("shards.toml");
    std::fs::write(&path, env.fixture.config("127.0.0.1:0", "")).unwrap();
    let run = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            pgtenant()
                .args(["check", "--shards", "--config"])
                .arg(path)
                .output()
                .unwrap()
        })
    };
    let out = run(path.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The sample world is sound except for PostgreSQL's default TEMP grant to PUBLIC.
    assert!(text.contains("TEMP is granted to PUBLIC"), "{text}");
    assert!(!text.contains("superuser"), "{text}");
    assert!(!text.contains("without ENABLE and FORCE"), "{text}");
    assert!(
        text.contains("shard \"initech-db\" as \"pgtenant_app\": OK"),
        "{text}"
    );
    assert!(!out.status.success());

    // A readable table without RLS and a default tenant context are reported.
    let db = env.fixture.shared_db.clone();
    env.admin_a(&format!(
        "CREATE TABLE public.leaky (x int); GRANT SELECT, TRUNCATE ON public.leaky TO pgtenant_app; \
         REVOKE TEMP ON DATABASE {db} FROM PUBLIC"
    ));
    common::world()
        .a
        .psql(
            "postgres",
            &format!(
                "ALTER DATABASE {db} SET app.current_tenant_id = '{}'",
                pgtenant::demo::ACME_ID
            ),
        )
        .unwrap();
    let out = run(path).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("without ENABLE and FORCE ROW LEVEL SECURITY: public.leaky"),
        "{text}"
    );
    assert!(text.contains("TRUNCATE"), "{text}");
    assert!(text.contains("database or role default"), "{text}");
    assert!(!text.contains("unverified setting"), "{text}");
    assert!(!text.contains("can see or signal other sessions"), "{text}");

    // A policy on the unverified setting, a key without the tenant column, and an undone
    // hardening are reported too.
    env.admin_a(
        "CREATE TABLE public.orders (id int UNIQUE, tenant_id uuid NOT NULL); \
         ALTER TABLE public.orders ENABLE ROW LEVEL SECURITY; \
         ALTER TABLE public.orders FORCE ROW LEVEL SECURITY; \
         CREATE POLICY legacy ON public.orders \
           USING (tenant_id = current_setting('app.current_tenant_id')::uuid); \
         GRANT SELECT ON pg_catalog.pg_stat_activity TO PUBLIC",
    );
    let out = run(dir.join("shards.toml")).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("unverified setting app.current_tenant_id")
            && text.contains("public.orders (legacy)"),
        "{text}"
    );
    assert!(text.contains("orders orders_id_key"), "{text}");
    assert!(
        text.contains("can see or signal other sessions") && text.contains("pg_stat_activity"),
        "{text}"
    );
    assert!(!text.contains("TEMP is granted"), "{text}");
    common::world()
        .a
        .psql(
            "postgres",
            &format!("ALTER DATABASE {db} RESET app.current_tenant_id"),
        )
        .unwrap();
}

/// `shard init` installs the verified context on a fresh database, creates the key file
/// (0600), hardens the login role's view of other sessions, and is idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_init_installs_the_verified_context_idempotently() {
    let w = common::world();
    let db = format!("initshard_{}", std::process::id());
    w.a.psql("postgres", &format!("DROP DATABASE IF EXISTS {db}"))
        .unwrap();
    w.a.psql("postgres", &format!("CREATE DATABASE {db}"))
        .unwrap();
    let dir = common::TempDir::new("init");
    let key = dir.join("s.key");
    let _ = std::fs::remove_file(&key);
    let config = dir.join("init.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n\n[shards.s]\nhost = \"127.0.0.1\"\nport = {}\n\
             database = \"{db}\"\nuser = \"pgtenant_app\"\npassword = \"{}\"\ntls = \"disable\"\n\
             context_key_file = \"{}\"\n",
            w.a.port,
            w.a.password,
            key.display()
        ),
    )
    .unwrap();
    // The proxy refuses to serve the shard until the key exists.
    let snapshot = pgtenant::config::load(&config).unwrap();
    assert!(common::start_proxy(snapshot).await.is_err());
    let admin = w.a.url(&db);
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || pgtenant().args(args).output().unwrap())
    };
    let init_args = |url: String| -> Vec<String> {
        let config = config.display().to_string();
        [
            "shard",
            "init",
            "--config",
            &config,
            "--shard",
            "s",
            "--admin-url",
            &url,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let args = init_args(admin.clone());
    let first = run(args.clone()).await.unwrap();
    let text = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        first.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        text.contains("created") && text.contains("pg_stat_activity"),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = run(args).await.unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept"));
    let probe =
        w.a.psql(
            &db,
            "SELECT has_table_privilege('pgtenant_app', 'pgtenant.context_key', 'SELECT'), \
                    has_table_privilege('pgtenant_app', 'pg_catalog.pg_stat_activity', 'SELECT'), \
                    has_function_privilege('pgtenant_app', 'pgtenant.tenant_id()', 'EXECUTE')",
        )
        .unwrap();
    assert_eq!(probe.trim(), "f|f|t");
    // A wrong admin database is refused before anything is installed.
    let wrong = run(init_args(w.a.url("postgres"))).await.unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("shard's database"));
    let snapshot = pgtenant::config::load(&config).unwrap();
    let running = common::start_proxy(snapshot).await.unwrap();
    running.shutdown(Duration::from_secs(1)).await;
}
