//! Load comparison: pgbench `-S` straight to PostgreSQL, through pgtenant and through
//! PgBouncer, interleaved in one run (the order rotates each round), with medians, ratios to
//! direct, the latency each proxy adds per query, and each proxy's own CPU time per
//! transaction (from /proc; in total and the part in user space), and the whole machine's
//! busy CPU per transaction and idle share (from /proc/stat). Run it with
//! `scripts/bench.sh`, which builds the release binary (with profile-guided optimisation) and
//! installs PgBouncer with apt if it is missing. Speed is measured here, never asserted in tests.
//!
//! Targets: `direct`; `pgtenant` (a dedicated tenant: no guard); `pgt+guard` (a shared tenant
//! on the same database, so every statement also goes through the full guard and the binding);
//! `pgt+rls` and `pgt+verified` (shared tenants on databases where pgbench_accounts has a
//! row-level security policy: on the unverified setting, and on the verified context with a
//! shard key, so the pair measures what the verified context costs); `pgbouncer` (same pool
//! mode and server pool size). Both proxies get 16 server connections.
//!
//! Options: `--seconds N` per run (default 10), `--rounds N` (default 3), `--clients 1,16,64`,
//! `--modes simple,extended,prepared`, `--pool-mode transaction|session` (default
//! transaction), `--connect-clients N` (a `-C` run, new connection per transaction, with N
//! clients; 0 to skip; default 8), `--no-pgbouncer`, `--metrics` (adds `pgt+metrics`: the
//! `pgtenant` target on a second instance with `admin.http` on, scraped every second, to
//! measure what recording metrics costs), `--plain-binary PATH` (adds `plain` and
//! `plain+vrf`: the `pgtenant` and `pgt+verified` targets through a second instance run by
//! another build, e.g. the one without profile-guided optimisation beside the one with it),
//! `--rate TPS` (pgbench `-R`: every target at the same rate, which compares CPU per
//! transaction at the same throughput: a proxy's CPU per transaction grows as its tps falls,
//! since each wake-up then serves fewer transactions), `--targets pgtenant,direct` (only
//! these, e.g. while profiling one of them).
//!
//! The binary measured is `PGTENANT_BIN`, else target/release/pgtenant; `scripts/bench.sh`
//! sets it to the build with profile-guided optimisation (`scripts/pgo.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use pgtenant::auth::verifier::ScramVerifier;
use pgtenant::localpg::Cluster;

const SERVER_CONNECTIONS: usize = 16;

struct Options {
    seconds: u32,
    rounds: usize,
    clients: Vec<u32>,
    modes: Vec<String>,
    pool_mode: String,
    connect_clients: u32,
    pgbouncer: bool,
    /// Only these targets (all when empty).
    targets: Vec<String>,
    /// pgtenant's `--threads` (its default when absent).
    proxy_threads: Option<usize>,
    /// Also run `pgt+metrics`: a second pgtenant with `admin.http` on (metrics recorded and
    /// scraped every second), to compare with `pgtenant` in the same run.
    metrics: bool,
    /// Also run `plain` and `plain+vrf`: `pgtenant` and `pgt+verified` through this build.
    plain_binary: Option<String>,
    /// pgbench's `-R`: every target at the same transactions per second, so CPU per
    /// transaction compares at the same throughput.
    rate: Option<u32>,
}

fn options() -> Options {
    let mut o = Options {
        seconds: 10,
        rounds: 3,
        clients: vec![1, 16, 64],
        modes: vec!["simple".into(), "extended".into(), "prepared".into()],
        pool_mode: "transaction".into(),
        connect_clients: 8,
        pgbouncer: true,
        targets: Vec::new(),
        proxy_threads: None,
        metrics: false,
        plain_binary: None,
        rate: None,
    };
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--no-pgbouncer") {
        args.remove(i);
        o.pgbouncer = false;
    }
    if let Some(i) = args.iter().position(|a| a == "--metrics") {
        args.remove(i);
        o.metrics = true;
    }
    for pair in args.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--seconds" => o.seconds = value.parse().expect("--seconds N"),
            "--rounds" => o.rounds = value.parse().expect("--rounds N"),
            "--clients" => {
                o.clients = value
                    .split(',')
                    .map(|c| c.parse().expect("--clients 1,16"))
                    .collect()
            }
            "--modes" => o.modes = value.split(',').map(str::to_owned).collect(),
            "--pool-mode" => o.pool_mode = value,
            "--targets" => o.targets = value.split(',').map(str::to_owned).collect(),
            "--proxy-threads" => o.proxy_threads = Some(value.parse().expect("--proxy-threads N")),
            "--connect-clients" => o.connect_clients = value.parse().expect("--connect-clients N"),
            "--plain-binary" => o.plain_binary = Some(value),
            "--rate" => o.rate = Some(value.parse().expect("--rate TPS")),
            other => panic!("unknown option {other}"),
        }
    }
    o
}

/// One pgbench run's result; `None` when pgbench failed (e.g. prepared statements through a
/// pooler that does not support them).
struct Run {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
}

fn pgbench(
    cluster: &Cluster,
    url: &str,
    clients: u32,
    mode: &str,
    connect: bool,
    opts: &Options,
    password: &str,
) -> Option<Run> {
    let mut cmd = Command::new(cluster.binary("pgbench"));
    cmd.args(["-n", "-S", "-M", mode, "-T", &opts.seconds.to_string()])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ]);
    if connect {
        cmd.arg("-C");
    }
    if let Some(rate) = opts.rate {
        cmd.args(["-R", &rate.to_string()]);
    }
    let out = cmd.arg(url).env("PGPASSWORD", password).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "  pgbench failed: {}",
            err.lines().next().unwrap_or_default()
        );
        return None;
    }
    let number = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    Some(Run {
        tps: number("tps = ")?,
        latency_ms: number("latency average = ")?,
        transactions: number("number of transactions actually processed: ")? as u64,
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

struct Target {
    name: &'static str,
    url: String,
    password: String,
    pid: Option<u32>,
}

fn pgtenant_config(
    port: u16,
    cluster: &Cluster,
    pool_mode: &str,
    client_password: &str,
    key_file: &Path,
) -> String {
    let verifier = ScramVerifier::from_password(client_password.as_bytes());
    let shard_on = |name: &str, db: &str| {
        format!(
            "[shards.{name}]\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"{db}\"\nuser = \"pgtenant_app\"\n\
             password = \"{}\"\nmax_connections = {SERVER_CONNECTIONS}\ntls = \"disable\"\n",
            cluster.port, cluster.password
        )
    };
    let shard = |name: &str| shard_on(name, "bench");
    let tenant = |n: u32, name: &str, shard: &str| {
        format!(
            "[[tenants]]\nid = \"00000000-0000-0000-0000-0000000{n:05}\"\nname = \"{name}\"\n\
             placement = {{ kind = \"shared\", shard = \"{shard}\" }}\n\
             [[tenants.users]]\nname = \"app\"\nscram = \"{verifier}\"\n"
        )
    };
    // Two shared tenants on databases whose pgbench_accounts has row-level security: one
    // policy reads the unverified setting, the other the verified context (shard key).
    let rls = format!(
        "{}{}context_key_file = \"{}\"\n{}{}",
        shard_on("bench-rls", "benchu"),
        shard_on("bench-verified", "benchv"),
        key_file.display(),
        tenant(1, "benchrls", "bench-rls"),
        tenant(2, "benchverified", "bench-verified"),
    );
    format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\n[pool]\nmode = \"{pool_mode}\"\n{}{}\
         [[tenants]]\nid = \"00000000-0000-0000-0000-00000000be4c\"\nname = \"bench\"\n\
         placement = {{ kind = \"dedicated\", shard = \"bench\" }}\n\
         [[tenants.users]]\nname = \"app\"\nscram = \"{verifier}\"\n\
         # The same database as a shared placement: every statement goes through the full guard.\n\
         [[tenants]]\nid = \"00000000-0000-0000-0000-00000000be4d\"\nname = \"benchshared\"\n\
         placement = {{ kind = \"shared\", shard = \"bench-shared\" }}\n\
         [[tenants.users]]\nname = \"app\"\nscram = \"{verifier}\"\n{rls}",
        shard("bench"),
        shard("bench-shared"),
    )
}

/// `pgbench -i` at `scale` on `url`.
fn pgbench_init(cluster: &Cluster, url: &str, scale: u32) {
    let init = Command::new(cluster.binary("pgbench"))
        .args(["-i", "-q", "-s", &scale.to_string(), url])
        .env("PGPASSWORD", &cluster.password)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// `benchu` and `benchv`: pgbench tables (scale 1) owned by the superuser, readable by the
/// login role through a row-level security policy on pgbench_accounts: `benchu`'s reads
/// `app.current_tenant_id`, `benchv`'s the verified context (installed as `shard init`
/// does, with the key written to `key_file`).
fn rls_databases(cluster: &Cluster, key_file: &Path) {
    let key = pgtenant::tenant::context::ContextKey::generate();
    key.create(key_file).unwrap();
    for (db, check) in [
        (
            "benchu",
            "NULLIF(current_setting('app.current_tenant_id', true), '')::uuid IS NOT NULL",
        ),
        ("benchv", "(SELECT pgtenant.tenant_id()) IS NOT NULL"),
    ] {
        cluster
            .psql("postgres", &format!("CREATE DATABASE {db}"))
            .unwrap();
        pgbench_init(cluster, &cluster.url(db), 1);
        let install = if db == "benchv" {
            format!(
                "{}\n{};\n",
                pgtenant::tenant::context::install_sql("pgtenant_app"),
                key.store_sql()
            )
        } else {
            String::new()
        };
        cluster
            .psql(
                db,
                &format!(
                    "{install}GRANT SELECT ON ALL TABLES IN SCHEMA public TO pgtenant_app;\n\
                     ALTER TABLE pgbench_accounts ENABLE ROW LEVEL SECURITY;\n\
                     ALTER TABLE pgbench_accounts FORCE ROW LEVEL SECURITY;\n\
                     CREATE POLICY tenant ON pgbench_accounts USING ({check});"
                ),
            )
            .unwrap();
    }
}

fn main() {
    let opts = options();
    let binary = support::release_binary();

    eprintln!("starting PostgreSQL...");
    let cluster = Cluster::start(&[("max_connections", "300")]).expect("cluster");
    cluster
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE pgtenant_app LOGIN PASSWORD '{}'",
                cluster.password
            ),
        )
        .unwrap();
    cluster
        .psql("postgres", "CREATE DATABASE bench OWNER pgtenant_app")
        .unwrap();
    let direct_url = format!("postgresql://pgtenant_app@127.0.0.1:{}/bench", cluster.port);
    pgbench_init(&cluster, &direct_url, 10);

    let port = support::free_port();
    let dir = std::env::temp_dir().join(format!("pgtenant-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pgtenant.toml");
    let client_password = "bench-password";
    let key_file = dir.join("benchv.key");
    let _ = std::fs::remove_file(&key_file);
    rls_databases(&cluster, &key_file);
    std::fs::write(
        &config,
        pgtenant_config(port, &cluster, &opts.pool_mode, client_password, &key_file),
    )
    .unwrap();
    let proxy = start_proxy(&binary, opts.proxy_threads, &config, port);
    let through =
        |proxy: &support::Reaper, port: u16, name: &'static str, tenant: &str, db: &str| Target {
            name,
            url: format!("postgresql://app%40{tenant}@127.0.0.1:{port}/{db}"),
            password: client_password.into(),
            pid: Some(proxy.0.id()),
        };
    let mut targets = vec![
        Target {
            name: "direct",
            url: direct_url.clone(),
            password: cluster.password.clone(),
            pid: None,
        },
        through(&proxy, port, "pgtenant", "bench", "bench"),
        through(&proxy, port, "pgt+guard", "benchshared", "bench"),
        through(&proxy, port, "pgt+rls", "benchrls", "benchu"),
        through(&proxy, port, "pgt+verified", "benchverified", "benchv"),
    ];
    // Another build of pgtenant (the one without profile-guided optimisation), same
    // configuration, its own port: the `pgtenant` and `pgt+verified` targets again.
    let mut _plain = None;
    if let Some(plain_binary) = &opts.plain_binary {
        let port = support::free_port();
        let config = dir.join("pgtenant-plain.toml");
        let text = pgtenant_config(port, &cluster, &opts.pool_mode, client_password, &key_file);
        std::fs::write(&config, text).unwrap();
        let plain = start_proxy(Path::new(plain_binary), opts.proxy_threads, &config, port);
        targets.push(through(&plain, port, "plain", "bench", "bench"));
        targets.push(through(
            &plain,
            port,
            "plain+vrf",
            "benchverified",
            "benchv",
        ));
        _plain = Some(plain);
    }
    // The same configuration with metrics on, and a scraper, in a second process.
    let mut _metered = None;
    if opts.metrics {
        let port = support::free_port();
        let admin = support::free_port();
        let config = dir.join("pgtenant-metrics.toml");
        let text = pgtenant_config(port, &cluster, &opts.pool_mode, client_password, &key_file);
        std::fs::write(
            &config,
            format!("[admin]\nhttp = \"127.0.0.1:{admin}\"\n{text}"),
        )
        .unwrap();
        let metered = start_proxy(&binary, opts.proxy_threads, &config, port);
        targets.push(through(&metered, port, "pgt+metrics", "bench", "bench"));
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
                    return;
                };
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                let _ = s.read_to_end(&mut Vec::new());
            }
        });
        _metered = Some(metered);
    }
    let mut bouncer = None;
    if opts.pgbouncer && Path::new(support::PGBOUNCER).is_file() {
        let (child, bouncer_port) = support::start_pgbouncer(
            &dir,
            &cluster,
            support::Bouncer {
                dbname: "bench",
                // A plaintext entry: with a SCRAM verifier PgBouncer 1.18 reuses the client's
                // SCRAM keys for the server login, which fails for another server user.
                secret: client_password,
                server_login: Some(("pgtenant_app", &cluster.password)),
                pool_mode: &opts.pool_mode,
                pool_size: SERVER_CONNECTIONS,
                max_clients: 1000,
            },
        );
        targets.push(Target {
            name: "pgbouncer",
            url: format!("postgresql://app@127.0.0.1:{bouncer_port}/bench"),
            password: client_password.into(),
            pid: Some(child.0.id()),
        });
        bouncer = Some(child);
    }
    if !opts.targets.is_empty() {
        targets.retain(|t| opts.targets.iter().any(|n| n == t.name));
    }
    let ticks = support::clock_ticks_per_second();

    // Each scenario: (clients, pgbench mode, -C).
    let mut scenarios: Vec<(u32, String, bool)> = Vec::new();
    for &c in &opts.clients {
        for m in &opts.modes {
            scenarios.push((c, m.clone(), false));
        }
    }
    if opts.connect_clients > 0 {
        scenarios.push((opts.connect_clients, "simple".into(), true));
    }
    type Key = (u32, String, bool, &'static str);
    let mut results: BTreeMap<Key, Vec<Run>> = BTreeMap::new();
    // CPU per transaction: (total, in user space).
    let mut cpu: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    // The whole machine's busy CPU per transaction (every process: pgbench, PostgreSQL and
    // the proxy) and its idle share, from /proc/stat.
    let mut machine: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    for round in 0..opts.rounds {
        for (clients, mode, connect) in &scenarios {
            targets.rotate_left(1);
            for t in &targets {
                let label = if *connect { "-C " } else { "" };
                eprintln!(
                    "round {} {label}-c {clients} -M {mode} {}",
                    round + 1,
                    t.name
                );
                let before = t.pid.map(support::cpu_ticks);
                let machine_before = support::machine_ticks();
                let Some(run) = pgbench(
                    &cluster,
                    &t.url,
                    *clients,
                    mode,
                    *connect,
                    &opts,
                    &t.password,
                ) else {
                    continue;
                };
                let key = (*clients, mode.clone(), *connect, t.name);
                let (busy, idle) = support::machine_ticks();
                let (busy, idle) = (
                    busy.saturating_sub(machine_before.0) as f64,
                    idle.saturating_sub(machine_before.1) as f64,
                );
                machine.entry(key.clone()).or_default().push((
                    busy / ticks * 1e6 / run.transactions.max(1) as f64,
                    100.0 * idle / (busy + idle).max(1.0),
                ));
                if let (Some(pid), Some(before)) = (t.pid, before) {
                    let (user, system) = support::cpu_ticks(pid);
                    let user = user.saturating_sub(before.0) as f64 / ticks;
                    let system = system.saturating_sub(before.1) as f64 / ticks;
                    let per_tx = 1e6 / run.transactions.max(1) as f64;
                    cpu.entry(key.clone())
                        .or_default()
                        .push(((user + system) * per_tx, user * per_tx));
                }
                results.entry(key).or_default().push(run);
            }
        }
    }

    println!(
        "\npgbench -S{}, {} pooling, {SERVER_CONNECTIONS} server connections per proxy, pgtenant threads: {}, {} s per run, {} rounds, medians (scale 10, {} cores)",
        opts.rate.map_or_else(String::new, |r| format!(" -R {r}")),
        opts.pool_mode,
        opts.proxy_threads
            .map_or_else(|| "default".to_owned(), |n| n.to_string()),
        opts.seconds,
        opts.rounds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:>10} {:>9} {:>10} {:>10} {:>7} {:>9} {:>11} {:>10} {:>9} {:>11} {:>6}",
        "clients",
        "mode",
        "target",
        "tps",
        "ratio",
        "lat ms",
        "added us/q",
        "cpu us/tx",
        "(user)",
        "machine/tx",
        "idle%"
    );
    for (clients, mode, connect) in &scenarios {
        let pick = |target: &'static str| -> Option<(f64, f64)> {
            let runs = results.get(&(*clients, mode.clone(), *connect, target))?;
            Some((
                median(runs.iter().map(|r| r.tps).collect())?,
                median(runs.iter().map(|r| r.latency_ms).collect())?,
            ))
        };
        // Ratios and added latency need the direct run; without it they show as "-".
        let direct = pick("direct");
        let label = if *connect {
            format!("-C {clients}")
        } else {
            clients.to_string()
        };
        for name in [
            "direct",
            "pgtenant",
            "pgt+guard",
            "pgt+rls",
            "pgt+verified",
            "pgt+metrics",
            "plain",
            "plain+vrf",
            "pgbouncer",
        ] {
            let Some((tps, lat)) = pick(name) else {
                if targets.iter().any(|t| t.name == name) {
                    println!("{label:>10} {mode:>9} {name:>10} {:>10}", "failed");
                }
                continue;
            };
            let key = (*clients, mode.clone(), *connect, name);
            // The median of one part of each run's pair, as text ("-" without samples).
            let median_of = |pairs: &BTreeMap<Key, Vec<(f64, f64)>>, second: bool| {
                pairs
                    .get(&key)
                    .and_then(|v| {
                        median(v.iter().map(|p| if second { p.1 } else { p.0 }).collect())
                    })
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into())
            };
            let (cpu_text, user_text) = (median_of(&cpu, false), median_of(&cpu, true));
            let (machine_text, idle_text) = (median_of(&machine, false), median_of(&machine, true));
            let (ratio, added) = match direct {
                Some((d_tps, d_lat)) => (
                    format!("{:.2}", tps / d_tps),
                    format!("{:.1}", (lat - d_lat) * 1000.0),
                ),
                None => ("-".into(), "-".into()),
            };
            println!(
                "{label:>10} {mode:>9} {name:>10} {tps:>10.0} {ratio:>7} {lat:>9.3} {added:>11} {cpu_text:>10} {user_text:>9} {machine_text:>11} {idle_text:>6}",
            );
        }
    }
    drop((proxy, bouncer));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `binary` on `config` and waits until it listens on `port`.
fn start_proxy(binary: &Path, threads: Option<usize>, config: &Path, port: u16) -> support::Reaper {
    let mut cmd = Command::new(binary);
    if let Some(n) = threads {
        cmd.args(["--threads", &n.to_string()]);
    }
    let child = cmd
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start pgtenant");
    support::wait_for_port(port);
    support::Reaper(child)
}
