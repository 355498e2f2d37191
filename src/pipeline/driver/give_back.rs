//! What a dropped operator gives back: the keys it recorded or claimed for items it never
//! handed out.

use std::sync::Arc;

use super::{Driver, Verdict};
use crate::pipeline::gate::Held;

/// Frees keys held with their tokens.
pub(crate) type ReleaseFn<K> = Box<dyn FnOnce(Vec<Held<K>>) + Send + Sync>;

/// Dropping an operator gives back what it recorded for items it never handed out (read ahead,
/// or in a call still in flight): claims are released, marks taken back by their token. So the
/// broker's redeliveries of those items are processed, without waiting for a lease or a ttl.
impl<T, K, E> Drop for Driver<T, K, E> {
    fn drop(&mut self) {
        let unhanded = self.take_unhanded();
        if unhanded.is_empty() {
            return;
        }
        match self.release.take() {
            Some(release) => release(unhanded),
            None => {
                let encode = self.parts.encode;
                let keys = unhanded
                    .into_iter()
                    .map(|h| (or_encoded(h.bytes, encode, &h.key), h.token))
                    .collect();
                self.parts.backend.take_back(
                    keys,
                    self.parts.settings.timeout,
                    Arc::clone(&self.parts.log),
                );
            }
        }
    }
}

/// `bytes` if they were kept, else `key` encoded now.
fn or_encoded<K>(bytes: Vec<u8>, encode: fn(&K, &mut Vec<u8>), key: &K) -> Vec<u8> {
    if bytes.is_empty() {
        let mut bytes = Vec::new();
        encode(key, &mut bytes);
        bytes
    } else {
        bytes
    }
}

impl<T, K, E> Driver<T, K, E> {
    /// The keys this operator may hold in the store without having handed them out: keys
    /// decided but not yet yielded, and every key of a call still in flight (it may have been
    /// applied: giving it back with its token is safe either way).
    fn take_unhanded(&mut self) -> Vec<Held<K>> {
        let mut keys: Vec<Held<K>> = self
            .queue
            .drain(..)
            .filter_map(|e| match e.verdict {
                Some(Verdict::Accept(held) | Verdict::Unchecked(held)) => held,
                _ => None,
            })
            .collect();
        for r in self.requests.drain(..) {
            let token = r.call.token;
            keys.extend(r.keys.into_iter().zip(r.encoded).map(|(key, bytes)| Held {
                key,
                token,
                bytes,
            }));
        }
        keys
    }
}
