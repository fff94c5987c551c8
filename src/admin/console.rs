//! The admin console (DESIGN.md §7): database `pgtenant`, the users of `[admin]` with SCRAM,
//! simple queries from psql. Commands: `SHOW TENANTS | TENANT <t> | POOLS | SHARDS | CLIENTS |
//! SERVERS | STATS | CONFIG | VERSION`, `RELOAD`, `PAUSE [<t>]`, `RESUME [<t>]`,
//! `MOVE TENANT <t> TO <shard> [TIMEOUT <d>]`, `KILL <t>`,
//! `SHUTDOWN`. Results are text rows psql shows as tables; anything else is a clear error.
//! Tenants never reach it: only `[admin]` users authenticate to this database.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::error::{ClientError, sqlstate};
use crate::net::stream::ClientStream;
use crate::protocol::{TxStatus, encode, tag};
use crate::quota::TenantStats;
use crate::registry::ClientEntry;
use crate::state::AppState;

/// The database name that reaches the console.
pub const DATABASE: &str = "pgtenant";
/// Largest message the console reads.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long PAUSE waits for the transactions in flight.
const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// A result: rows for a table, a bare command tag, or an error.
enum Reply {
    Rows {
        columns: &'static [&'static str],
        rows: Vec<Vec<Option<String>>>,
        tag: String,
    },
    Done(&'static str),
    Error(ClientError),
}

fn rows(columns: &'static [&'static str], rows: Vec<Vec<Option<String>>>) -> Reply {
    let tag = format!("SHOW {}", rows.len());
    Reply::Rows { columns, rows, tag }
}

fn text(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn error(code: &'static str, message: impl Into<String>) -> Reply {
    Reply::Error(ClientError::error(code, message.into()))
}

/// Serves an authenticated admin `user` until it leaves.
pub async fn serve(state: &AppState, mut stream: ClientStream, who: &crate::telemetry::audit::Who) {
    let user = who.user.as_deref().unwrap_or_default();
    tracing::info!(user, "admin console session");
    let mut out = BytesMut::new();
    for (name, value) in [
        ("server_version", "15.0 (pgtenant admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        encode::parameter_status(name, value, &mut out);
    }
    encode::backend_key_data(0, 0, &mut out);
    encode::ready_for_query(TxStatus::Idle, &mut out);
    loop {
        if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        out.clear();
        let message = tokio::select! {
            m = crate::auth::read_message(&mut stream, MAX_MESSAGE) => m,
            _ = state.draining.cancelled() => return,
        };
        let (t, body) = match message {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => return,
        };
        match t {
            tag::TERMINATE => return,
            tag::QUERY => {
                let sql = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body));
                let commands: Vec<&str> = sql
                    .split(';')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect();
                if commands.is_empty() {
                    encode::empty_query(&mut out);
                }
                for command in commands {
                    tracing::info!(user, command, "admin command");
                    state.audit.event(
                        "admin_command",
                        who,
                        &[("command", crate::telemetry::audit::str_value(command))],
                    );
                    match run(state, command).await {
                        Reply::Rows { columns, rows, tag } => {
                            encode::text_rows(columns, &rows, &tag, &mut out)
                        }
                        Reply::Done(tag) => encode::command_complete(tag, &mut out),
                        Reply::Error(e) => {
                            e.encode(&mut out);
                            break;
                        }
                    }
                }
                encode::ready_for_query(TxStatus::Idle, &mut out);
            }
            _ => {
                ClientError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the pgtenant admin console accepts simple queries only",
                )
                .encode(&mut out);
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

/// Runs one console command.
async fn run(state: &AppState, command: &str) -> Reply {
    let words: Vec<&str> = command.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
    let arg = |i: usize| words.get(i).map(|w| w.trim_matches('"'));
    match upper.as_slice() {
        ["SHOW", "TENANTS"] => show_tenants(state),
        ["SHOW", "TENANT", _] => show_tenant(state, arg(2).unwrap_or_default()),
        ["SHOW", "POOLS"] => show_pools(state),
        ["SHOW", "SHARDS"] => show_shards(state).await,
        ["SHOW", "CLIENTS"] => show_clients(state),
        ["SHOW", "SERVERS"] => show_servers(state),
        ["SHOW", "STATS"] => show_stats(state),
        ["SHOW", "CONFIG"] => show_config(state),
        ["SHOW", "VERSION"] => rows(
            &["version"],
            vec![vec![text(format!(
                "pgtenant {}",
                env!("CARGO_PKG_VERSION")
            ))]],
        ),
        ["RELOAD"] => match state.reload_from_source().await {
            Ok(()) => Reply::Done("RELOAD"),
            Err(e) => error(
                sqlstate::CONFIG_FILE_ERROR,
                format!("reload failed; the configuration in force is unchanged: {e:#}"),
            ),
        },
        ["PAUSE"] => pause(state, None).await,
        ["PAUSE", _] => pause(state, arg(1)).await,
        ["RESUME"] => {
            state.pauses.resume(None);
            Reply::Done("RESUME")
        }
        ["RESUME", _] => match known(state, arg(1)) {
            Some(t) => {
                state.pauses.resume(Some(t));
                Reply::Done("RESUME")
            }
            None => unknown_tenant(arg(1)),
        },
        ["KILL", _] => match known(state, arg(1)) {
            Some(t) => {
                let n = state.clients.kill(t);
                tracing::info!(tenant = t, sessions = n, "admin KILL");
                Reply::Done("KILL")
            }
            None => unknown_tenant(arg(1)),
        },
        ["MOVE", "TENANT", _, "TO", _] => move_tenant(state, arg(2), arg(4), None).await,
        ["MOVE", "TENANT", _, "TO", _, "TIMEOUT", _] => {
            move_tenant(state, arg(2), arg(4), arg(6)).await
        }
        ["SHUTDOWN"] => {
            state.request_shutdown();
            Reply::Done("SHUTDOWN")
        }
        _ => error(
            sqlstate::SYNTAX_ERROR,
            format!(
                "unknown admin command {command:?}; try SHOW TENANTS | TENANT <t> | POOLS | \
                 SHARDS | CLIENTS | SERVERS | STATS | CONFIG | VERSION, RELOAD, PAUSE [<t>], \
                 RESUME [<t>], MOVE TENANT <t> TO <shard> [TIMEOUT <d>], KILL <t>, SHUTDOWN"
            ),
        ),
    }
}

/// The tenant called `name` in the snapshot in force.
fn known<'a>(state: &AppState, name: Option<&'a str>) -> Option<&'a str> {
    name.filter(|n| state.snapshot().tenant_by_name(n).is_some())
}

fn unknown_tenant(name: Option<&str>) -> Reply {
    error(
        sqlstate::UNDEFINED_OBJECT,
        format!("tenant {:?} does not exist", name.unwrap_or_default()),
    )
}

async fn pause(state: &AppState, tenant: Option<&str>) -> Reply {
    if tenant.is_some() && known(state, tenant).is_none() {
        return unknown_tenant(tenant);
    }
    state.pauses.pause(tenant);
    // Wait for the transactions in flight (of that tenant, or all) to end.
    match state.wait_for_transactions(tenant, PAUSE_WAIT).await {
        Ok(()) => Reply::Done("PAUSE"),
        Err(busy) => error(
            sqlstate::LOCK_NOT_AVAILABLE,
            format!(
                "paused, but {busy} transaction(s) still running after {PAUSE_WAIT:?}; \
                 new transactions wait until RESUME"
            ),
        ),
    }
}

/// `MOVE TENANT <t> TO <shard> [TIMEOUT <d>]` (default timeout: PAUSE's).
async fn move_tenant(
    state: &AppState,
    tenant: Option<&str>,
    shard: Option<&str>,
    timeout: Option<&str>,
) -> Reply {
    use crate::state::MoveError;
    let (tenant, shard) = (tenant.unwrap_or_default(), shard.unwrap_or_default());
    let timeout = match timeout.map(crate::config::parse_duration) {
        None => PAUSE_WAIT,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return error(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!("invalid TIMEOUT: {e}"),
            );
        }
    };
    let from = state
        .snapshot()
        .tenant_by_name(tenant)
        .map(|t| t.placement.shard.clone())
        .unwrap_or_default();
    match state.move_tenant(tenant, shard, timeout).await {
        Ok(held) => Reply::Rows {
            columns: &["tenant", "from_shard", "to_shard", "paused_ms"],
            rows: vec![vec![
                text(tenant),
                text(from),
                text(shard),
                text(format!("{:.1}", held.as_secs_f64() * 1000.0)),
            ]],
            tag: "MOVE".to_owned(),
        },
        Err(MoveError::UnknownTenant) => unknown_tenant(Some(tenant)),
        Err(e @ MoveError::UnknownShard) => {
            error(sqlstate::UNDEFINED_OBJECT, format!("shard {shard:?}: {e}"))
        }
        Err(e @ MoveError::Busy(..)) => error(sqlstate::LOCK_NOT_AVAILABLE, e.to_string()),
        Err(e @ MoveError::SessionMode) => error(sqlstate::OBJECT_IN_USE, e.to_string()),
        Err(e @ (MoveError::Source(_) | MoveError::Invalid(_))) => {
            error(sqlstate::CONFIG_FILE_ERROR, e.to_string())
        }
    }
}

fn show_tenants(state: &AppState) -> Reply {
    let snapshot = state.snapshot();
    let live: std::collections::HashMap<String, _> = state.quotas.all().into_iter().collect();
    let list = snapshot
        .tenants
        .iter()
        .map(|t| {
            let s = live.get(&t.name);
            let count = |f: fn(&crate::quota::TenantState) -> u64| s.map_or(0, |s| f(s));
            vec![
                text(&t.name),
                text(t.id),
                text(format!("{:?}", t.placement.kind).to_lowercase()),
                text(&t.placement.shard),
                text(t.plan.as_deref().unwrap_or("")),
                text(count(|s| s.clients() as u64)),
                text(count(|s| s.stats.active.load(Ordering::Relaxed) as u64)),
                text(count(|s| s.stats.waiting.load(Ordering::Relaxed) as u64)),
                text(state.pauses.is_paused(&t.name)),
            ]
        })
        .collect();
    rows(
        &[
            "tenant",
            "id",
            "placement",
            "shard",
            "plan",
            "clients",
            "active",
            "waiting",
            "paused",
        ],
        list,
    )
}

fn show_tenant(state: &AppState, name: &str) -> Reply {
    let snapshot = state.snapshot();
    let Some(t) = snapshot.tenant_by_name(name) else {
        return unknown_tenant(Some(name));
    };
    let live = state.quotas.tenant(&t.name);
    let s = &live.stats;
    let mut r: Vec<(&str, String)> = vec![
        ("name", t.name.clone()),
        ("id", t.id.to_string()),
        ("subdomain", t.subdomain.clone()),
        (
            "placement",
            format!("{:?}", t.placement.kind).to_lowercase(),
        ),
        ("shard", t.placement.shard.clone()),
        ("schema", t.placement.schema.clone().unwrap_or_default()),
        ("plan", t.plan.clone().unwrap_or_default()),
        ("users", {
            let mut u: Vec<&str> = t.users.keys().map(String::as_str).collect();
            u.sort_unstable();
            u.join(", ")
        }),
        ("clients", live.clients().to_string()),
        ("active", s.active.load(Ordering::Relaxed).to_string()),
        ("waiting", s.waiting.load(Ordering::Relaxed).to_string()),
        ("paused", state.pauses.is_paused(&t.name).to_string()),
        ("queries", TenantStats::get(&s.queries).to_string()),
        (
            "transactions",
            TenantStats::get(&s.transactions).to_string(),
        ),
    ];
    let limits = &t.limits;
    let opt = |v: Option<usize>| v.map_or("none".to_owned(), |n| n.to_string());
    r.push(("max_client_connections", opt(limits.max_client_connections)));
    r.push(("max_server_connections", opt(limits.max_server_connections)));
    r.push((
        "queries_per_second",
        limits
            .queries_per_second
            .map_or("none".to_owned(), |n| n.to_string()),
    ));
    r.push((
        "statement_timeout",
        limits
            .statement_timeout
            .map_or("none".to_owned(), crate::config::format_duration),
    ));
    rows(
        &["key", "value"],
        r.into_iter().map(|(k, v)| vec![text(k), Some(v)]).collect(),
    )
}

fn show_pools(state: &AppState) -> Reply {
    let mut pools = state.pools.stats();
    pools.sort_by(|a, b| (&a.shard, &a.user).cmp(&(&b.shard, &b.user)));
    rows(
        &["shard", "user", "idle", "in_use", "max", "waiting"],
        pools
            .into_iter()
            .map(|p| {
                vec![
                    text(p.shard),
                    text(p.user),
                    text(p.idle),
                    text(p.in_use),
                    text(p.max),
                    text(p.waiters),
                ]
            })
            .collect(),
    )
}

async fn show_shards(state: &AppState) -> Reply {
    let snapshot = state.snapshot();
    let status = super::http::probe_shards(state).await;
    rows(
        &[
            "shard",
            "host",
            "port",
            "database",
            "max_connections",
            "verified_context",
            "status",
        ],
        snapshot
            .shards
            .values()
            .map(|s| {
                let up = status.iter().any(|(name, r)| *name == s.name && r.is_ok());
                vec![
                    text(&s.name),
                    text(&s.host),
                    text(s.port),
                    text(&s.database),
                    text(s.max_connections),
                    text(s.context_key.is_some()),
                    text(if up { "up" } else { "down" }),
                ]
            })
            .collect(),
    )
}

fn show_clients(state: &AppState) -> Reply {
    let mut clients = state.clients.list();
    clients.sort_by_key(|(id, _)| *id);
    rows(
        &["id", "tenant", "user", "address", "connected_seconds"],
        clients
            .into_iter()
            .map(|(id, c): (u64, ClientEntry)| {
                vec![
                    text(id),
                    text(c.tenant),
                    text(c.user),
                    text(c.peer),
                    text(c.since.elapsed().as_secs()),
                ]
            })
            .collect(),
    )
}

fn show_servers(state: &AppState) -> Reply {
    let mut pools = state.pools.stats();
    pools.sort_by(|a, b| (&a.shard, &a.user).cmp(&(&b.shard, &b.user)));
    let mut r = Vec::new();
    for p in pools {
        for (st, n) in [("idle", p.idle), ("in_use", p.in_use)] {
            r.push(vec![text(&p.shard), text(&p.user), text(st), text(n)]);
        }
    }
    rows(&["shard", "user", "state", "connections"], r)
}

fn show_stats(state: &AppState) -> Reply {
    let mut tenants = state.quotas.all();
    tenants.sort_by(|a, b| a.0.cmp(&b.0));
    rows(
        &[
            "tenant",
            "queries",
            "transactions",
            "guard_refusals",
            "throttled",
            "client_cap_refusals",
            "server_cap_refusals",
            "bytes_from_clients",
            "bytes_to_clients",
        ],
        tenants
            .into_iter()
            .map(|(name, t)| {
                let s = &t.stats;
                vec![
                    text(name),
                    text(TenantStats::get(&s.queries)),
                    text(TenantStats::get(&s.transactions)),
                    text(TenantStats::get(&s.guard_refusals)),
                    text(TenantStats::get(&s.throttled)),
                    text(TenantStats::get(&s.client_cap_refusals)),
                    text(TenantStats::get(&s.server_cap_refusals)),
                    text(TenantStats::get(&s.bytes_from_clients)),
                    text(TenantStats::get(&s.bytes_to_clients)),
                ]
            })
            .collect(),
    )
}

fn show_config(state: &AppState) -> Reply {
    let s = state.snapshot();
    let d = crate::config::format_duration;
    let r: Vec<(&str, String)> = vec![
        ("source", s.source.display().to_string()),
        ("listen.addr", s.listen.addr.to_string()),
        (
            "listen.max_message_size",
            s.listen.max_message_size.to_string(),
        ),
        ("listen.startup_timeout", d(s.listen.startup_timeout)),
        ("pool.mode", format!("{:?}", s.pool.mode).to_lowercase()),
        ("pool.checkout_timeout", d(s.pool.checkout_timeout)),
        ("pool.server_idle_timeout", d(s.pool.server_idle_timeout)),
        ("pool.connect_timeout", d(s.pool.connect_timeout)),
        ("pool.client_write_timeout", d(s.pool.client_write_timeout)),
        (
            "admin.http",
            s.admin.http.map_or("none".to_owned(), |a| a.to_string()),
        ),
        ("admin.users", s.admin.users.len().to_string()),
        (
            "metrics.tenant_labels",
            match s.admin.tenant_labels {
                crate::config::TenantLabels::All => "all".to_owned(),
                crate::config::TenantLabels::None => "none".to_owned(),
                crate::config::TenantLabels::Top(n) => format!("top:{n}"),
            },
        ),
        ("shards", s.shards.len().to_string()),
        ("tenants", s.tenants.len().to_string()),
    ];
    rows(
        &["key", "value"],
        r.into_iter().map(|(k, v)| vec![text(k), Some(v)]).collect(),
    )
}
