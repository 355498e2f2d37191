//! The README's Rust snippets compile. Each ```` ```rust ```` block of `README.md` is copied here,
//! line for line, into a function that gives it the names it assumes (`deliveries`, `Msg`, a
//! pool); `readme_snippets_are_here` fails when a block is edited in one place only. Blocks
//! marked `rust,ignore` are sketches against a broker's API and are not checked.

#![allow(dead_code, unused_variables, clippy::unused_async)]

use futures::Stream;

/// The `rust` blocks of the README, each as its lines with the indentation taken off.
fn readme_blocks() -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut block: Option<Vec<String>> = None;
    for line in include_str!("../README.md").lines() {
        match &mut block {
            None if line.trim_end() == "```rust" => block = Some(Vec::new()),
            Some(_) if line.starts_with("```") => blocks.extend(block.take()),
            Some(lines) => lines.push(line.trim().to_owned()),
            None => {}
        }
    }
    blocks
}

#[test]
fn readme_snippets_are_here() {
    let here: Vec<&str> = include_str!("readme.rs").lines().map(str::trim).collect();
    let blocks = readme_blocks();
    assert!(
        blocks.len() >= 2,
        "the README's rust blocks: {}",
        blocks.len()
    );
    for block in blocks {
        let found = here
            .windows(block.len())
            .any(|w| w.iter().zip(&block).all(|(a, b)| a == b));
        assert!(
            found,
            "this README block is not in tests/readme.rs (edit both):\n{}",
            block.join("\n")
        );
    }
}

/// "Use": mark on emit over a consumer's deliveries.
mod quick {
    use super::Stream;

    pub struct Msg(u64);

    impl Msg {
        pub fn business_key(&self) -> u64 {
            self.0
        }
        pub fn ack(self) {}
    }

    async fn process(_: Msg) {}

    #[rustfmt::skip]
    pub async fn snippet(deliveries: impl Stream<Item = Msg> + Unpin) {
        use std::time::Duration;
        use futures::StreamExt;
        use stream_dedup::{DedupStreamExt, Window};

        let window = Window::max_keys(100_000).ttl(Duration::from_secs(300));
        let mut unique = deliveries
            .dedup_by_key(|m: &Msg| m.business_key(), window)   // e.g. "12345/payment"
            .on_duplicate(|m: Msg| m.ack());                     // ack repeats, or they come back
        while let Some(msg) = unique.next().await {
            process(msg).await;
        }
    }

    #[tokio::test]
    async fn runs() {
        snippet(futures::stream::iter([1, 2, 1].map(Msg))).await;
    }
}

/// "Exactly-once effects": `commit_with` on PostgreSQL (compiled only; the same flow runs
/// against a server in `tests/exactly_once.rs` and `examples/postgres_inbox.rs`).
#[cfg(feature = "postgres")]
mod exactly_once {
    use super::Stream;
    use futures::StreamExt;
    use stream_dedup::sqlx::{self, PgPool};

    pub struct Msg(i64);

    impl Msg {
        fn order_id(&self) -> i64 {
            self.0
        }
        fn amount_cents(&self) -> i64 {
            100
        }
        async fn ack(self) -> Result<(), Box<dyn std::error::Error>> {
            Ok(())
        }
        async fn nack(self) -> Result<(), Box<dyn std::error::Error>> {
            Ok(())
        }
    }

    #[rustfmt::skip]
    pub async fn snippet(
        pool: PgPool,
        deliveries: impl Stream<Item = Msg> + Unpin,
    ) -> Result<(), Box<dyn std::error::Error>> {
        use stream_dedup::store::PostgresStore;
        use stream_dedup::{DedupStreamExt, Window};

        let store = PostgresStore::from_pool(pool.clone(), "payments").await?;   // your sqlx PgPool
        let mut claims = deliveries.claim_by_key(|m: &Msg| m.order_id(), Window::max_keys(100_000).store(store));
        while let Some(claim) = claims.next().await {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO payments (order_id, amount_cents) VALUES ($1, $2)")
                .bind(claim.order_id())
                .bind(claim.amount_cents())
                .execute(&mut *tx)
                .await?;
            match claim.commit_with(tx).await {
                Ok(msg) => msg.ack().await?,                  // the payment and the key are committed
                Err(e) => e.into_item().nack().await?,        // rolled back, key released: redelivered
            }
        }
        Ok(())
    }
}
