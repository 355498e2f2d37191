//! The window's heap stops growing once it is full, however long the stream.

use std::alloc::System;
use std::time::Duration;

use cap::Cap;
use futures::task::noop_waker_ref;
use futures::{Stream, stream};
use std::pin::pin;
use std::task::{Context, Poll};
use stream_dedup::{DedupStreamExt, Window};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

/// Polls `n` items through the operator (all distinct keys), with no allocation of our own.
fn drive(s: &mut std::pin::Pin<&mut impl Stream<Item = u64>>, n: usize) -> usize {
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut got = 0;
    for _ in 0..n {
        match s.as_mut().poll_next(&mut cx) {
            Poll::Ready(Some(_)) => got += 1,
            Poll::Ready(None) => break,
            Poll::Pending => unreachable!("stream::iter is always ready"),
        }
    }
    got
}

#[test]
fn heap_does_not_grow_after_the_window_fills() {
    let window = Window::max_keys(100_000).ttl(Duration::from_secs(3600));
    // Keys from a multiplicative hash of a counter: distinct, spread over the table.
    let keys = (0u64..).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut unique = pin!(stream::iter(keys).dedup_by_key(|k| *k, window));

    assert_eq!(drive(&mut unique, 200_000), 200_000);
    let full = ALLOC.allocated();
    // Three million more distinct keys: evictions all the way, and no growth.
    assert_eq!(drive(&mut unique, 3_000_000), 3_000_000);
    let after = ALLOC.allocated();
    assert!(
        after <= full,
        "heap grew from {full} to {after} bytes after the window was full"
    );
    // 100,000 u64 keys with a ttl: 28 B of slots + ~10.5 B of table a key.
    let per_key = full as f64 / 100_000.0;
    assert!(per_key < 45.0, "{per_key} bytes a key");
}
