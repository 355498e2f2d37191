//! The adapters are Send / Sync / Unpin when their parts are.

use futures::stream::{self, Iter};
use stream_dedup::{DedupByKey, SharedWindow, Stats, TryDedupByKey, Window, WindowSet};

fn send<T: Send>() {}
fn sync<T: Sync>() {}
fn unpin<T: Unpin>() {}

type Keys = Iter<std::vec::IntoIter<u64>>;
type KeyFn = fn(&u64) -> u64;
type TryKeys = Iter<std::vec::IntoIter<Result<u64, String>>>;

#[test]
fn auto_traits() {
    send::<DedupByKey<Keys, KeyFn, u64>>();
    sync::<DedupByKey<Keys, KeyFn, u64>>();
    unpin::<DedupByKey<Keys, KeyFn, u64>>();
    send::<TryDedupByKey<TryKeys, KeyFn, u64>>();
    sync::<TryDedupByKey<TryKeys, KeyFn, u64>>();
    unpin::<TryDedupByKey<TryKeys, KeyFn, u64>>();
    send::<SharedWindow<String>>();
    sync::<SharedWindow<String>>();
    send::<WindowSet<String>>();
    sync::<WindowSet<String>>();
    send::<Stats>();
    sync::<Stats>();
    send::<Window>();
    sync::<Window>();
    let _ = stream::iter(Vec::<u64>::new());
}
