//! The `pgtenant` binary: parses the command line, sets up logging and hands over to the
//! library.

use std::io::BufRead;
use std::process::ExitCode;

use clap::Parser;
use pgtenant::cli::{CatalogCommand, Cli, Command, LogFormat, ShardCommand};

/// jemalloc with its background thread: memory freed when clients leave goes back to the
/// system within seconds (dirty pages decay after 10 s), where glibc's malloc keeps the peak.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgtenant: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to standard error, filtered by `RUST_LOG` (default `info`). Text has ANSI colours only
/// when standard error is a terminal; JSON is one object per line, its `spans` carrying the
/// session id, client address and tenant.
fn init_logging(format: LogFormat) {
    use pgtenant::telemetry::session_span::SessionScoped;
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (targets, env) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let registry = tracing_subscriber::registry().with(targets).with(env);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // A session's span is entered only when one of its lines is written (see SessionScoped).
    match format {
        LogFormat::Text => {
            SessionScoped::new(registry.with(layer.with_ansi(std::io::stderr().is_terminal())))
                .init()
        }
        LogFormat::Json => {
            SessionScoped::new(registry.with(layer.json().with_current_span(false))).init()
        }
    }
}

/// The filter `RUST_LOG` asks for. Levels per target (`info`, `pgtenant::pool=debug,warn`)
/// become a static `Targets` filter, decided once per call site: an `EnvFilter` also looks its
/// span table up, behind a process-wide lock, every time a span is entered or left, which the
/// session span is twice per transaction. Only directives `Targets` cannot express (span names,
/// field values) take the `EnvFilter`. Unset or invalid: `info`.
fn log_filter(
    spec: Option<&str>,
) -> (
    Option<tracing_subscriber::filter::Targets>,
    Option<tracing_subscriber::EnvFilter>,
) {
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    if let Ok(targets) = spec.parse() {
        return (Some(targets), None);
    }
    match tracing_subscriber::EnvFilter::try_new(spec) {
        Ok(env) => (None, Some(env)),
        Err(_) => (
            Some(tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)),
            None,
        ),
    }
}

/// Without `--threads`: one thread on a machine of two cores or fewer, else one per core.
/// Measured with `scripts/bench.sh` on a 2-core machine that also runs PostgreSQL, one
/// thread served as many or more transactions per second than two, with less CPU per
/// transaction and less added latency: a second proxy thread only competes with PostgreSQL
/// for the cores and adds cross-thread wake-ups. With more cores there is room for more
/// threads.
fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores <= 2 { 1 } else { cores }
}

/// The runtime `run` and `demo` serve clients on: `--threads` (else [`default_threads`]),
/// sockets only, its timers kept on a thread of their own (see `pgtenant::timers`).
fn proxy_runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    match threads.unwrap_or_else(default_threads) {
        0 => anyhow::bail!("--threads must be at least 1"),
        n => Ok(pgtenant::timers::proxy_runtime(n)?),
    }
}

fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let path = cli
                .config
                .ok_or_else(|| anyhow::anyhow!("no configuration: pass --config FILE"))?;
            proxy_runtime(cli.threads)?.block_on(pgtenant::app::run(path))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { shards } => {
            let path = cli
                .config
                .ok_or_else(|| anyhow::anyhow!("no configuration: pass --config FILE"))?;
            let snapshot = match runtime()?.block_on(pgtenant::catalog::load(&path, None)) {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            println!(
                "{}: OK ({} shards, {} tenants)",
                path.display(),
                snapshot.shards.len(),
                snapshot.tenants.len()
            );
            if !shards {
                return Ok(ExitCode::SUCCESS);
            }
            let timeout = snapshot.pool.connect_timeout;
            let reports = runtime()?.block_on(pgtenant::check::inspect_shards(&snapshot, timeout));
            let mut sound = true;
            for r in reports {
                let who = format!("shard {:?} as {:?}", r.shard, r.login);
                if let Some(e) = r.error {
                    println!("{who}: cannot inspect: {e}");
                    sound = false;
                } else if r.problems.is_empty() {
                    println!("{who}: OK");
                } else {
                    sound = false;
                    for p in r.problems {
                        println!("{who}: WARNING: {p}");
                    }
                }
            }
            Ok(if sound {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Passwd => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                anyhow::bail!("empty password on standard input");
            }
            println!(
                "{}",
                pgtenant::auth::verifier::ScramVerifier::from_password(password.as_bytes())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Shard(ShardCommand::Init { shard, admin_url }) => {
            let path = cli
                .config
                .ok_or_else(|| anyhow::anyhow!("no configuration: pass --config FILE"))?;
            let snapshot = pgtenant::config::load(&path)?;
            let timeout = snapshot.pool.connect_timeout;
            let report = runtime()?.block_on(pgtenant::shard_init::init(
                &snapshot, &shard, &admin_url, timeout,
            ))?;
            match &report.context {
                Some((file, created, fingerprint)) => println!(
                    "shard {shard:?}: verified tenant context installed (key {file} {}, fingerprint {fingerprint})",
                    if *created { "created" } else { "kept" },
                ),
                None => println!(
                    "shard {shard:?}: hardened only (no context_key_file: no verified tenant context)"
                ),
            }
            println!(
                "revoked from PUBLIC (granted to pg_read_all_stats): {}",
                report.revoked.join(", ")
            );
            println!(
                "RLS policies should read (SELECT pgtenant.tenant_id()); `pgtenant check --shards` lists those that do not"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Catalog(command) => {
            let path = cli
                .config
                .ok_or_else(|| anyhow::anyhow!("no configuration: pass --config FILE"))?;
            let (CatalogCommand::Init { dsn } | CatalogCommand::Import { dsn }) = &command;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
            let dsn = match dsn {
                Some(dsn) => dsn.clone(),
                None => pgtenant::config::load_str(&text, &path)?
                    .catalog
                    .dsn
                    .map(|s| s.0)
                    .ok_or_else(|| {
                        anyhow::anyhow!("no catalog database: pass --dsn or set [catalog] dsn")
                    })?,
            };
            let pool = pgtenant::catalog::pool(&dsn)?;
            runtime()?.block_on(async {
                match command {
                    CatalogCommand::Init { .. } => {
                        pgtenant::catalog::init(&pool).await?;
                        println!("catalog tables ready (schema pgtenant_catalog)");
                    }
                    CatalogCommand::Import { .. } => {
                        let n = pgtenant::catalog::import(&pool, &text, &path).await?;
                        println!(
                            "imported {} shards, {} plans, {} tenants, {} users from {}",
                            n.shards,
                            n.plans,
                            n.tenants,
                            n.users,
                            path.display()
                        );
                    }
                }
                Ok::<_, anyhow::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { port } => {
            // At least two threads: the demo blocks one while its clusters start and stop.
            let threads = cli.threads.unwrap_or_else(default_threads).max(2);
            proxy_runtime(Some(threads))?.block_on(pgtenant::demo::run(port))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn plain_levels_take_the_static_filter_and_span_directives_the_env_filter() {
        for spec in [
            None,
            Some(""),
            Some("info"),
            Some("pgtenant::pool=debug,warn"),
        ] {
            let (targets, env) = log_filter(spec);
            assert!(targets.is_some() && env.is_none(), "{spec:?}");
        }
        let (targets, env) = log_filter(Some("[session{tenant=acme}]=debug,info"));
        assert!(targets.is_none() && env.is_some());
        let (targets, env) = log_filter(Some("[[[=="));
        assert!(env.is_none());
        assert_eq!(
            targets.and_then(|t| t.default_level()),
            Some(tracing::level_filters::LevelFilter::INFO),
            "an invalid spec falls back to info"
        );
    }
}
