//! Settling with `.await`: the verdict adapters yield every delivery, in order, with its
//! verdict; a fail-closed store failure carries its item.

mod support;

use std::time::Duration;

use futures::{StreamExt, stream};
use stream_dedup::store::StoreError;
use stream_dedup::{DedupStreamExt, FailurePolicy, TryDedupStreamExt, Verdict, Window};
use support::faulty::{FaultyStore, Mode};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const TTL: Duration = Duration::from_secs(3600);

/// What a verdict was, with its item.
fn kind<T: Copy, E>(v: &Verdict<T, E>) -> (&'static str, T) {
    match v {
        Verdict::Claimed(c) => ("claimed", **c),
        Verdict::Duplicate(t) => ("duplicate", *t),
        Verdict::HeldBack(t) => ("held back", *t),
        Verdict::Failed(t, _) => ("failed", *t),
    }
}

#[tokio::test]
async fn every_delivery_comes_out_with_its_verdict_in_order() {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut verdicts = UnboundedReceiverStream::new(rx)
        .claim_by_key(|k: &u32| *k, Window::max_keys(100))
        .verdicts();
    for k in [1, 2, 1] {
        tx.send(k).unwrap();
    }
    let a = verdicts.next().await.unwrap();
    let b = verdicts.next().await.unwrap();
    let copy = verdicts.next().await.unwrap();
    assert_eq!(kind(&a), ("claimed", 1));
    assert_eq!(kind(&b), ("claimed", 2));
    // 1 is in flight under the first claim: the copy is held back, handed to the consumer.
    assert_eq!(kind(&copy), ("held back", 1));
    let Verdict::Claimed(a) = a else {
        unreachable!()
    };
    a.commit().await.expect("commit");
    drop(b); // released: its redelivery is new
    tx.send(1).unwrap();
    tx.send(2).unwrap();
    drop(tx);
    let rest: Vec<_> = verdicts.collect().await;
    let rest: Vec<_> = rest.iter().map(kind).collect();
    assert_eq!(rest, [("duplicate", 1), ("claimed", 2)]);
}

/// Under fail closed the item comes back with the store's error, and the stream goes on.
#[tokio::test(start_paused = true)]
async fn a_store_failure_carries_its_item() {
    let store = FaultyStore::new();
    store.set(Mode::Down);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut verdicts = UnboundedReceiverStream::new(rx)
        .claim_by_key(
            |k: &u32| *k,
            Window::max_keys(100)
                .ttl(TTL)
                .store(store.clone())
                .on_failure(FailurePolicy::fail_closed()),
        )
        .verdicts();
    tx.send(7).unwrap();
    match verdicts.next().await.unwrap() {
        Verdict::Failed(item, e) => {
            assert_eq!(item, 7);
            assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    store.set(Mode::Up);
    tx.send(7).unwrap();
    let v = verdicts.next().await.unwrap();
    assert_eq!(kind(&v), ("claimed", 7));
}

#[derive(Debug, PartialEq)]
struct AppError(String);

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        AppError(e.to_string())
    }
}

#[tokio::test]
async fn try_verdicts_pass_errors_and_judge_values() {
    let out: Vec<_> = stream::iter([Ok(1u32), Err(AppError("decode".into())), Ok(1)])
        .try_claim_by_key(|k| *k, Window::max_keys(10))
        .verdicts()
        .collect()
        .await;
    assert_eq!(out.len(), 3);
    assert_eq!(kind(out[0].as_ref().unwrap()), ("claimed", 1));
    assert_eq!(out[1].as_ref().unwrap_err(), &AppError("decode".into()));
    assert_eq!(kind(out[2].as_ref().unwrap()), ("held back", 1));
}
