//! The store suite against [`MemoryStore`].

mod support;

use std::time::Duration;

use stream_dedup::store::MemoryStore;

/// Namespaces are separate instances for the memory store.
async fn make(_namespace: String) -> Option<MemoryStore> {
    Some(MemoryStore::new())
}

store_suite!(make, expiry = Duration::from_millis(1));
claim_suite!(make, expiry = Duration::from_millis(1));
