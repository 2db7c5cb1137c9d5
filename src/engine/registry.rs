//! Every queue this node knows, by tenant then task: a lookup is two hash probes, a tenant's
//! queues are listed and counted without touching other tenants' (so a tenant's queue limit
//! is checked in constant time, whatever the number of queues on the node).

use std::collections::HashMap;
use std::sync::Arc;

use super::state::QueueState;
use crate::ids::{TaskId, TenantId};

/// The queues, keyed `(tenant, task)`. Written only by the pipeline, after commits.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    by_tenant: HashMap<TenantId, HashMap<TaskId, Arc<QueueState>>>,
}

impl Queues {
    /// The queue of `key`.
    pub(crate) fn get(&self, key: &(TenantId, TaskId)) -> Option<&Arc<QueueState>> {
        self.by_tenant.get(&key.0)?.get(&key.1)
    }

    /// Adds (or replaces) the queue of `key`.
    pub(crate) fn insert(&mut self, key: (TenantId, TaskId), q: Arc<QueueState>) {
        let (tenant, task) = key;
        self.by_tenant.entry(tenant).or_default().insert(task, q);
    }

    /// Removes the queue of `key`.
    pub(crate) fn remove(&mut self, key: &(TenantId, TaskId)) -> Option<Arc<QueueState>> {
        let tasks = self.by_tenant.get_mut(&key.0)?;
        let q = tasks.remove(&key.1)?;
        if tasks.is_empty() {
            self.by_tenant.remove(&key.0);
        }
        Some(q)
    }

    /// Every queue with its key.
    pub(crate) fn iter(&self) -> impl Iterator<Item = ((&TenantId, &TaskId), &Arc<QueueState>)> {
        self.by_tenant
            .iter()
            .flat_map(|(t, tasks)| tasks.iter().map(move |(k, q)| ((t, k), q)))
    }

    /// The queues of `tenant` (every tenant's when `None`).
    pub(crate) fn of(&self, tenant: Option<&TenantId>) -> Vec<Arc<QueueState>> {
        match tenant {
            Some(t) => self
                .by_tenant
                .get(t)
                .map(|tasks| tasks.values().cloned().collect())
                .unwrap_or_default(),
            None => self.iter().map(|(_, q)| q.clone()).collect(),
        }
    }

    /// How many queues `tenant` has.
    pub(crate) fn count(&self, tenant: &TenantId) -> usize {
        self.by_tenant.get(tenant).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::QueueRecord;

    fn queue(t: &str, k: &str) -> ((TenantId, TaskId), Arc<QueueState>) {
        let (t, k) = (TenantId::new(t).unwrap(), TaskId::new(k).unwrap());
        let rec = QueueRecord {
            id: 1,
            kind: 2,
            created_at_us: 0,
            last_activity_us: 0,
            ttl_ms: 1,
            max_buffer_size: 1,
            first_offset: 0,
            next_offset: 0,
            closed: false,
            finished_at: None,
            cancel: None,
            content_type: None,
            stream: None,
        };
        let q = Arc::new(QueueState::from_record(t.clone(), k.clone(), &rec));
        ((t, k), q)
    }

    #[test]
    fn counts_follow_inserts_replacements_and_removals_per_tenant() {
        let mut qs = Queues::default();
        let (a1, q) = queue("a", "1");
        qs.insert(a1.clone(), q.clone());
        qs.insert(a1.clone(), q);
        let (a2, q) = queue("a", "2");
        qs.insert(a2.clone(), q);
        let (b1, q) = queue("b", "1");
        qs.insert(b1.clone(), q);
        assert_eq!(
            (qs.count(&a1.0), qs.count(&b1.0), qs.iter().count()),
            (2, 1, 3)
        );
        assert!(qs.get(&a2).is_some());
        assert_eq!(qs.of(Some(&a1.0)).len(), 2);
        assert_eq!(qs.of(None).len(), 3);
        assert!(qs.remove(&a1).is_some());
        assert!(qs.remove(&a1).is_none());
        assert_eq!((qs.count(&a1.0), qs.iter().count()), (1, 2));
        assert!(qs.remove(&b1).is_some());
        assert_eq!((qs.count(&b1.0), qs.iter().count()), (0, 1));
    }
}
