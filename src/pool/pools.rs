//! All pools, by shard and login role, created on first use; and the shards' health.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Pool, PoolError, PoolStats, health, login_for};
use crate::config::{PoolSettings, Shard, Tenant, UserRole};

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    shard: String,
    user: String,
}

/// All pools, created on first use.
pub struct Pools {
    settings: PoolSettings,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    health: Mutex<HashMap<String, Arc<health::Health>>>,
    /// Wakes the health loop (`health::check_shards`).
    checks: Arc<tokio::sync::Notify>,
}

impl Pools {
    /// An empty set of pools using `settings`.
    pub fn new(settings: PoolSettings) -> Self {
        Pools {
            settings,
            pools: Mutex::new(HashMap::new()),
            health: Mutex::default(),
            checks: Arc::default(),
        }
    }

    /// The health of shard `name` (shared by its pools of every login).
    pub fn health(&self, name: &str) -> Arc<health::Health> {
        let mut map = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let health = map
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(health::Health::new(Arc::clone(&self.checks))));
        Arc::clone(health)
    }

    /// What wakes the health loop.
    pub fn checks_wake(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.checks)
    }

    /// Wakes the health loop: the shards or its settings may have changed (a reload).
    pub fn wake_checks(&self) {
        self.checks.notify_one();
    }

    /// Every shard's health, by name.
    pub fn healths(&self) -> Vec<(String, Arc<health::Health>)> {
        let map = self.health.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Arc<Pool>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool for `tenant` on `shard`. A shard whose definition changed gets a new pool;
    /// the old one lives on until its last connection is returned.
    pub fn for_tenant(
        &self,
        shard: &Arc<Shard>,
        tenant: &Tenant,
        role: UserRole,
    ) -> Result<Arc<Pool>, PoolError> {
        let login = login_for(shard, tenant, role);
        let key = PoolKey {
            shard: shard.name.clone(),
            user: login.user.clone(),
        };
        let mut map = self.map();
        if let Some(pool) = map.get(&key)
            && Arc::ptr_eq(&pool.shard, shard)
            && pool.login == login
        {
            return Ok(Arc::clone(pool));
        }
        let pool = Arc::new(Pool::new(
            Arc::clone(shard),
            self.health(&shard.name),
            login,
            self.settings.clone(),
        )?);
        map.insert(key, Arc::clone(&pool));
        Ok(pool)
    }

    /// What each pool holds now (for the metrics and the admin console).
    pub fn stats(&self) -> Vec<PoolStats> {
        let pools: Vec<Arc<Pool>> = self.map().values().cloned().collect();
        pools.iter().map(|p| p.stats()).collect()
    }

    /// Runs [`Pool::reap`] on every pool.
    pub fn reap(&self) {
        let pools: Vec<Arc<Pool>> = self.map().values().cloned().collect();
        for pool in pools {
            pool.reap();
        }
    }
}
