//! The store suite against [`MemoryStore`].
#![cfg(feature = "testing")]

mod support;

use std::time::Duration;

use stream_dedup::store::MemoryStore;

/// Namespaces are separate instances for the memory store.
async fn make(_namespace: String) -> Option<MemoryStore> {
    Some(MemoryStore::new())
}

stream_dedup::store_suite!(make, expiry = Duration::from_millis(1));
stream_dedup::claim_suite!(make, expiry = Duration::from_millis(1));
