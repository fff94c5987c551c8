//! Running instances (`[peering]` with the catalog in PostgreSQL): each claims an id, keeps
//! its row fresh with its listener's address, and learns the others' from there.

use std::time::Duration;

use deadpool_postgres::Pool;

use super::{CatalogError, within};

/// An instance that has not refreshed its row for this long is gone: its id may be claimed.
const INSTANCE_TTL_SECONDS: i32 = 30;
/// How often a running instance refreshes its row and reads its peers'.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Claims an instance id for the listener at `addr`: the lowest id no live instance holds
/// (an instance restarted at the same address gets its old one back).
pub async fn claim_instance(pool: &Pool, addr: &str) -> Result<u8, CatalogError> {
    within(async {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        // One claim at a time, so that two instances starting together get different ids.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('pgtenant_catalog.instances'))",
            &[],
        )
        .await?;
        let row = tx
            .query_opt(
                "INSERT INTO pgtenant_catalog.instances (id, addr, seen)
                 SELECT g, $1, now() FROM generate_series(1, 255) g
                  WHERE NOT EXISTS (
                        SELECT 1 FROM pgtenant_catalog.instances i
                         WHERE i.id = g AND i.addr <> $1
                           AND i.seen > now() - make_interval(secs => $2))
                  ORDER BY g LIMIT 1
                 ON CONFLICT (id) DO UPDATE SET addr = EXCLUDED.addr, seen = now()
                 RETURNING id",
                &[&addr, &f64::from(INSTANCE_TTL_SECONDS)],
            )
            .await?;
        tx.commit().await?;
        let id: i16 = row
            .ok_or_else(|| CatalogError::Content("all 255 instance ids are taken".into()))?
            .get(0);
        u8::try_from(id).map_err(|_| CatalogError::Content(format!("instance id {id}")))
    })
    .await
}

/// Refreshes this instance's row (`id` at `addr`) and returns the other live instances.
pub async fn heartbeat(
    pool: &Pool,
    id: u8,
    addr: &str,
) -> Result<std::collections::BTreeMap<u8, String>, CatalogError> {
    within(async {
        let client = pool.get().await?;
        client
            .execute(
                "INSERT INTO pgtenant_catalog.instances (id, addr, seen) VALUES ($1, $2, now())
                 ON CONFLICT (id) DO UPDATE SET addr = EXCLUDED.addr, seen = now()",
                &[&i16::from(id), &addr],
            )
            .await?;
        let rows = client
            .query(
                "SELECT id, addr FROM pgtenant_catalog.instances
                  WHERE id <> $1 AND seen > now() - make_interval(secs => $2)",
                &[&i16::from(id), &f64::from(INSTANCE_TTL_SECONDS)],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((u8::try_from(r.get::<_, i16>(0)).ok()?, r.get(1))))
            .collect())
    })
    .await
}

/// Frees this instance's id (at shutdown).
pub async fn release_instance(pool: &Pool, id: u8) -> Result<(), CatalogError> {
    within(async {
        let client = pool.get().await?;
        client
            .execute(
                "DELETE FROM pgtenant_catalog.instances WHERE id = $1",
                &[&i16::from(id)],
            )
            .await?;
        Ok(())
    })
    .await
}
