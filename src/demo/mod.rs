//! `pgtenant demo` (DESIGN.md §9): two throwaway clusters, a sample schema with row-level
//! security, four tenants (two shared, one schema, one dedicated) and a ready psql URL for
//! each. The sample world ([`world`]) also serves the integration tests, so what the demo
//! shows is what the tests check; outside the demo it is public only with the `fixtures`
//! feature (the tests' own dependency on this crate turns it on).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::localpg::{Cluster, LocalPgError};

#[cfg(not(feature = "fixtures"))]
mod world;
#[cfg(feature = "fixtures")]
pub mod world;
#[cfg(feature = "fixtures")]
pub use world::*;
#[cfg(not(feature = "fixtures"))]
use world::{create_fixture, create_roles, tenant_url};

/// Prints a line of the demo's output; a closed stdout must not stop the cleanup.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Runs the demo until Ctrl-C.
pub async fn run(port: u16) -> anyhow::Result<()> {
    say!("pgtenant demo: starting two throwaway PostgreSQL clusters...");
    let (a, b) = tokio::task::spawn_blocking(|| -> Result<(Cluster, Cluster), LocalPgError> {
        Ok((Cluster::start(&[])?, Cluster::start(&[])?))
    })
    .await??;
    let fixture = {
        let (a, b) = (&a, &b);
        tokio::task::block_in_place(|| {
            create_roles(a, b)?;
            create_fixture(a, b, "")
        })?
    };
    let dir: PathBuf = std::env::temp_dir().join(format!("pgtenant-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("pgtenant.toml");
    let admin_password = format!("{:016x}", rand::random::<u64>());
    let admin = format!(
        "[admin]\nhttp = \"127.0.0.1:0\"\nusers = [{{ name = \"dba\", scram = \"{}\" }}]\n",
        crate::auth::verifier::ScramVerifier::from_password(admin_password.as_bytes())
    );
    let mut running = None;
    for candidate in [port, 0] {
        std::fs::write(
            &path,
            fixture.config(&format!("127.0.0.1:{candidate}"), &admin),
        )?;
        let snapshot = crate::config::load(&path)?;
        match crate::app::start(snapshot).await {
            Ok(r) => {
                running = Some(r);
                break;
            }
            Err(e) => say!("  port {candidate} is not available ({e:#}); trying another"),
        }
    }
    let running = running.context("could not start the proxy")?;
    let port = running.addr.port();
    say!(
        "pgtenant is listening on {} (configuration: {})",
        running.addr,
        path.display()
    );
    if let Some(admin) = running.admin_addr {
        say!("Metrics: curl http://{admin}/metrics   (health: /healthz, /readyz)");
    }
    say!(
        "Admin console: psql \"postgresql://dba:{admin_password}@127.0.0.1:{}/pgtenant\"   (try SHOW TENANTS;)",
        running.addr.port()
    );
    say!(
        "Shards: 127.0.0.1:{} (database {}: the shared and schema tenants), 127.0.0.1:{} (database {}: the dedicated one)",
        a.port,
        fixture.shared_db,
        b.port,
        fixture.dedicated_db
    );
    say!("Connect as a tenant (each sees only its own rows: try `SELECT * FROM items;`):");
    for t in &fixture.tenants {
        say!(
            "  {:<9} {:<10} psql \"{}\"   (its row: {})",
            t.name,
            format!("({})", t.kind),
            tenant_url(t, port),
            t.sample_row
        );
    }
    say!("Press Ctrl-C to stop; the clusters are removed on exit.");
    crate::app::wait_for_signals(&running, Some(&path)).await?;
    say!("stopping...");
    running.shutdown(Duration::from_secs(2)).await;
    tokio::task::block_in_place(move || {
        drop(a);
        drop(b);
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
