//! What a transaction-pooled server connection carries from one client to the next: the
//! prepared statements pgtenant created on it (bounded, oldest evicted first), whose settings
//! are applied, and whether anyone has used it since it was opened or reset.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// Server-side prepared statements on one connection, by pgtenant's names.
///
/// Looked up for every transaction of a shared tenant (its binding's statement) and every
/// Parse or Bind of a named statement, so the set hashes with foldhash (seeded per process)
/// rather than SipHash: about 30 instructions a short name instead of about 200. The names
/// are pgtenant's (a client chooses at most a suffix), and a set holds one connection's
/// statements, at most the cache's limit, so colliding names would slow only that client's
/// own lookups, by a bounded amount.
#[derive(Debug)]
pub struct PreparedCache {
    names: HashSet<String, foldhash::fast::RandomState>,
    order: VecDeque<String>,
    limit: usize,
}

impl Default for PreparedCache {
    fn default() -> Self {
        PreparedCache::with_limit(256)
    }
}

impl PreparedCache {
    /// A cache holding at most `limit` statements.
    pub fn with_limit(limit: usize) -> Self {
        PreparedCache {
            names: HashSet::default(),
            order: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    /// Whether `name` exists on the connection.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Records `name`.
    pub fn insert(&mut self, name: &str) {
        if self.names.insert(name.to_owned()) {
            self.order.push_back(name.to_owned());
        }
    }

    /// The oldest statements beyond the limit, forgotten here: the caller deallocates them
    /// (at a point where the server runs no extended-protocol batch).
    pub fn overflow(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while self.names.len() > self.limit {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.names.remove(&oldest);
            out.push(oldest);
        }
        out
    }

    /// Forgets `name` (it was deallocated or its creation failed).
    pub fn remove(&mut self, name: &str) {
        if self.names.remove(name) {
            self.order.retain(|n| n != name);
        }
    }

    /// Forgets everything (DISCARD ALL / DEALLOCATE ALL ran).
    pub fn clear(&mut self) {
        self.names.clear();
        self.order.clear();
    }

    /// Number of statements.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The identity of a client's session state: its setup statement (tenant binding, role and
/// startup settings) and the settings it made since, length-prefixed so that no two
/// different states spell the same key.
pub fn settings_key<'a>(setup_sql: &str, settings: impl IntoIterator<Item = &'a str>) -> Arc<str> {
    let mut key = format!("{}:{setup_sql}", setup_sql.len());
    for s in settings {
        key.push_str(&format!("|{}:{s}", s.len()));
    }
    Arc::from(key)
}

/// Transaction-pooling state of one server connection.
#[derive(Debug, Default)]
pub struct PooledState {
    pub prepared: PreparedCache,
    /// The session state applied on it, as [`settings_key`] spells it: a client whose key
    /// is the same needs nothing replayed.
    pub settings_of: Option<Arc<str>>,
    /// The client whose transaction ran on it last (the shard's listening connection is told
    /// when that changes).
    pub last_client: Option<u64>,
    /// Something ran on it since it was opened or last reset.
    pub used: bool,
    /// The verified-context token made for it: `(tenant id, token)` (shards with a context
    /// key).
    pub context_token: Option<(String, String)>,
    /// Whose unnamed prepared statement the connection holds: `(client, generation)`
    /// (transaction pooling follows each client's unnamed statement across connections).
    pub unnamed: Option<(u64, u64)>,
}

impl PooledState {
    /// The token for `tenant_id`; none when the connection's token is another tenant's, so
    /// a binding can only ever carry the bound tenant's token (or none: no rows).
    pub fn token_for(&self, tenant_id: &str) -> Option<&str> {
        match &self.context_token {
            Some((tenant, token)) if tenant == tenant_id => Some(token),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_evicts_oldest_first() {
        let mut c = PreparedCache::with_limit(2);
        c.insert("a");
        c.insert("b");
        c.insert("a");
        assert!(c.overflow().is_empty(), "a was already there");
        c.insert("c");
        assert_eq!(c.overflow(), vec!["a".to_owned()]);
        assert!(!c.contains("a") && c.contains("b") && c.contains("c"));
        c.remove("b");
        assert_eq!(c.len(), 1);
        c.clear();
        assert!(c.is_empty());
    }
}
