//! [`MySqlStore`] against a real server.
#![cfg(feature = "mysql")]

mod support;

use std::time::Duration;

use stream_dedup::store::MySqlStore;

async fn make(namespace: String) -> Option<MySqlStore> {
    let url = std::env::var("STREAM_DEDUP_MYSQL_URL").ok()?;
    let store = MySqlStore::builder(&namespace)
        .timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .expect("connect to STREAM_DEDUP_MYSQL_URL");
    Some(store)
}

store_suite!(make, expiry = Duration::from_millis(50));
claim_suite!(make, expiry = Duration::from_millis(50));
