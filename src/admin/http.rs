//! The HTTP endpoint at `admin.http`: `GET /metrics` (Prometheus text format), `/healthz`
//! (the process is up) and `/readyz` (every shard reachable, JSON per shard). A small
//! HTTP/1.1 responder: one request per connection, GET and HEAD only, bounded request head
//! and time, so the endpoint cannot be used to hold resources.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;
use crate::telemetry::audit::json_string;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a shard has to accept a TCP connection for `/readyz`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests served at once; more wait in the listen queue.
const MAX_CONCURRENT: usize = 64;

/// Serves the endpoint on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let _ = crate::timers::timeout(Duration::from_secs(30), handle(stream, &state))
                        .await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin http: accept failed");
                crate::timers::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The method and path of a request head, if it is complete and well formed.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&head[..end]).ok()?;
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

async fn handle(mut stream: TcpStream, state: &AppState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let parsed = loop {
        let n = match crate::timers::timeout(READ_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
        };
        head.extend_from_slice(&buf[..n]);
        if let Some(found) = request_line(&head) {
            break Some((found.0.to_owned(), found.1.to_owned()));
        }
        if head.len() > MAX_HEAD || head.windows(4).any(|w| w == b"\r\n\r\n") {
            break None;
        }
    };
    let (status, content_type, body) = match parsed.as_ref().map(|(m, p)| (m.as_str(), p.as_str()))
    {
        None => ("400 Bad Request", "text/plain", "bad request\n".to_owned()),
        Some((method, _)) if method != "GET" && method != "HEAD" => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET and HEAD\n".to_owned(),
        ),
        Some((_, "/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4",
            state
                .metrics
                .render(&state.quotas.all(), || record_shards(state)),
        ),
        Some((_, "/healthz")) => ("200 OK", "text/plain", "ok\n".to_owned()),
        Some((_, "/readyz")) => {
            let (ready, body) = readiness(state).await;
            let status = if ready {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", body)
        }
        Some(_) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let head_only = parsed.as_ref().is_some_and(|(m, _)| m == "HEAD");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Each shard of the snapshot in force, by name, and whether it is up: the health checks'
/// verdict, or without them (or before their first verdict, just after a start or a reload)
/// a TCP connection (concurrently; one that does not finish counts as down).
pub async fn probe_shards(state: &AppState) -> Vec<(String, Result<(), String>)> {
    let snapshot = state.snapshot();
    let checks = !snapshot.pool.health_check_interval.is_zero();
    let mut results = Vec::new();
    let mut probes = tokio::task::JoinSet::new();
    for shard in snapshot.shards.values() {
        // With health checks on, their verdict (a login every interval) is the answer.
        if checks {
            let health = state.pools.health(&shard.name);
            if health.checked() {
                let status = match health.down_since() {
                    Some((_, why)) => Err(why),
                    None => Ok(()),
                };
                results.push((shard.name.clone(), status));
                continue;
            }
        }
        let shard = Arc::clone(shard);
        probes.spawn(async move {
            let target = (shard.host.as_str(), shard.port);
            let result =
                match crate::timers::timeout(PROBE_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                };
            (shard.name.clone(), result)
        });
    }
    while let Some(done) = probes.join_next().await {
        if let Ok(r) = done {
            results.push(r);
        }
    }
    for name in snapshot.shards.keys() {
        if !results.iter().any(|(n, _)| n == name) {
            results.push((name.clone(), Err("the probe did not finish".to_owned())));
        }
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    results
}

/// `/readyz`: ready when every shard accepts a connection; the body names each shard with
/// its status.
pub async fn readiness(state: &AppState) -> (bool, String) {
    let results = probe_shards(state).await;
    let ready = results.iter().all(|(_, r)| r.is_ok());
    let shards: Vec<String> = results
        .iter()
        .map(|(name, r)| match r {
            Ok(()) => format!("{{\"name\":{},\"status\":\"up\"}}", json_string(name)),
            Err(e) => format!(
                "{{\"name\":{},\"status\":\"down\",\"error\":{}}}",
                json_string(name),
                json_string(e)
            ),
        })
        .collect();
    (
        ready,
        format!("{{\"ready\":{ready},\"shards\":[{}]}}\n", shards.join(",")),
    )
}

/// Records the shards' series: server connections by state, the pool's cap and waiters,
/// whether each server is up, and each replica's lag.
fn record_shards(state: &AppState) {
    use metrics::Label;
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;

    let mut shards: HashMap<String, [usize; 5]> = HashMap::new();
    for p in state.pools.stats() {
        let e = shards.entry(p.shard).or_default();
        e[0] += p.idle;
        e[1] += p.in_use;
        e[2] = e[2].max(p.max);
        e[3] += p.waiters;
    }
    // Pinned connections, from the tenants that pin them (a subset of those in use).
    let snapshot = state.snapshot();
    for (name, tenant) in state.quotas.all() {
        let pinned = tenant.stats.pinned.load(Ordering::Relaxed);
        if let (true, Some(t)) = (pinned > 0, snapshot.tenant_by_name(&name))
            && let Some(e) = shards.get_mut(&t.placement.shard)
        {
            e[4] += pinned;
        }
    }
    let all = snapshot
        .shards
        .values()
        .flat_map(|s| std::iter::once(s).chain(s.replicas.iter()));
    for shard in all {
        let health = state.pools.health(&shard.name);
        metrics::gauge!("pgtenant_shard_up", "shard" => shard.name.clone())
            .set(if health.is_down() { 0.0 } else { 1.0 });
        metrics::counter!("pgtenant_shard_down_total", "shard" => shard.name.clone())
            .absolute(health.downs());
        if let (true, Some(lag)) = (shard.is_replica(), health.lag()) {
            metrics::gauge!("pgtenant_replica_lag_seconds", "shard" => shard.name.clone())
                .set(lag.as_secs_f64());
        }
    }
    for (shard, [idle, in_use, max, waiters, pinned]) in shards {
        let g = |name: &'static str, extra: Option<&'static str>, v: usize| {
            let mut l = vec![Label::new("shard", shard.clone())];
            if let Some(s) = extra {
                l.push(Label::new("state", s));
            }
            metrics::gauge!(name, l).set(v as f64);
        };
        let pinned = pinned.min(in_use);
        g("pgtenant_server_connections", Some("idle"), idle);
        g(
            "pgtenant_server_connections",
            Some("active"),
            in_use - pinned,
        );
        g("pgtenant_server_connections", Some("pinned"), pinned);
        g("pgtenant_server_connections_max", None, max);
        g("pgtenant_pool_waiters", None, waiters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_line(b"GET /metrics HTTP/1.1\r\n"), None);
        assert_eq!(request_line(b"GET /metrics SPDY/3\r\n\r\n"), None);
        assert_eq!(request_line(b"\xff\xfe\r\n\r\n"), None);
        assert_eq!(json_string("a\"b\\\n"), "\"a\\\"b\\\\\\n\"");
    }
}
