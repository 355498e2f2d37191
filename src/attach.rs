//! The attach step: how a window argument — a [`Window`], a [`WindowSet`], a [`SharedWindow`]
//! or a [`StoreWindow`] — becomes the parts of an operator (its gate, and the store path if
//! there is a store).
//!
//! What each argument offers is known by its type: [`IntoWindow`] for every window,
//! [`IntoClaimWindow`] for a `Window` and for a `StoreWindow<S>` whose `S` is a
//! [`ClaimStore`]. Both traits are sealed.

use std::any::Any;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use crate::claim::{ClaimCore, ClaimGate, Committer};
use crate::logging::{Log, Origin};
use crate::pipeline::call::Backend;
use crate::pipeline::driver::{ReleaseFn, StoreParts};
use crate::pipeline::{Settings, StoreWindow};
use crate::store::{ClaimStore, Store, StoreError, StoreKey};
use crate::window::{Handle, SharedWindow, Window, WindowSet};

/// What a mark-on-emit operator gets from its window argument: the in-memory window, and the
/// store behind it if there is one. (Public in a private module: it cannot be named outside
/// this crate.)
pub struct Attached<K, E> {
    pub(crate) handle: Handle<K>,
    pub(crate) store: Option<StoreParts<K, E>>,
}

impl<K, E> fmt::Debug for Attached<K, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.handle, f)
    }
}

impl<K, E> From<Handle<K>> for Attached<K, E> {
    fn from(handle: Handle<K>) -> Self {
        Attached {
            handle,
            store: None,
        }
    }
}

/// What a claim operator gets from its window argument: its gate (the claims' shared core),
/// and the store path if there is a store, with what frees the keys it never handed out.
pub struct ClaimAttached<K, E> {
    pub(crate) gate: ClaimGate<K>,
    pub(crate) store: Option<(StoreParts<K, E>, ReleaseFn<K>)>,
}

impl<K, E> fmt::Debug for ClaimAttached<K, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimAttached").finish_non_exhaustive()
    }
}

mod seal {
    /// The attach step of [`IntoWindow`](super::IntoWindow); private, so the trait is sealed.
    pub trait Attach<K, E> {
        fn attach(self) -> super::Attached<K, E>;
    }

    /// The attach step of [`IntoClaimWindow`](super::IntoClaimWindow).
    pub trait AttachClaims<K, E> {
        fn attach_claims(self) -> super::ClaimAttached<K, E>;
    }
}

/// What an operator accepts as its window: a [`Window`] (a window of the stream's own), a
/// [`SharedWindow`] (or a reference to one), a [`WindowSet`] built earlier, or a
/// [`StoreWindow`] (a window with a store behind it).
///
/// `E` is the error type that a store failure becomes under
/// [`FailurePolicy::fail_closed`](crate::FailurePolicy::fail_closed): the stream's error type
/// for [`try_dedup_by_key`](crate::TryDedupStreamExt::try_dedup_by_key), which must implement
/// `From<StoreError>` to take a `StoreWindow`.
///
/// This trait is sealed; it cannot be implemented outside this crate.
pub trait IntoWindow<K, E = StoreError>: seal::Attach<K, E> {}

impl<K, E, W: seal::Attach<K, E>> IntoWindow<K, E> for W {}

/// What [`claim_by_key`](crate::DedupStreamExt::claim_by_key) accepts as its window: a
/// [`Window`] (claims in this process's memory), or a [`StoreWindow`] whose store offers claims
/// (its type implements [`ClaimStore`]), so that consumers in many processes share the states.
/// A store without claims does not compile here:
///
/// ```compile_fail
/// use std::time::Duration;
/// use stream_dedup::store::{HeldKey, InsertBatch, Inserted, MemoryStore, Store, StoreFuture};
/// use stream_dedup::{DedupStreamExt, Window};
///
/// #[derive(Debug)]
/// struct InsertOnly(MemoryStore);
///
/// impl Store for InsertOnly {
///     fn insert(&self, batch: InsertBatch) -> StoreFuture<Vec<Inserted>> {
///         self.0.insert(batch)
///     }
///     fn remove(&self, keys: Vec<Vec<u8>>) -> StoreFuture<()> {
///         self.0.remove(keys)
///     }
///     fn take_back(&self, keys: Vec<HeldKey>) -> StoreFuture<()> {
///         self.0.take_back(keys)
///     }
/// }
///
/// let window = Window::max_keys(10).store(InsertOnly(MemoryStore::new()));
/// // error: the trait `ClaimStore` is not implemented for `InsertOnly`
/// let claims = futures::stream::iter([1u8]).claim_by_key(|k| *k, window);
/// ```
///
/// This trait is sealed; it cannot be implemented outside this crate.
pub trait IntoClaimWindow<K, E = StoreError>: seal::AttachClaims<K, E> {}

impl<K, E, W: seal::AttachClaims<K, E>> IntoClaimWindow<K, E> for W {}

impl<K: Hash + Eq, E> seal::Attach<K, E> for Window {
    fn attach(self) -> Attached<K, E> {
        Handle::Local(WindowSet::new(self)).into()
    }
}

impl<K: Hash + Eq, E> seal::Attach<K, E> for WindowSet<K> {
    fn attach(self) -> Attached<K, E> {
        Handle::Local(self).into()
    }
}

impl<K: Hash + Eq, E> seal::Attach<K, E> for SharedWindow<K> {
    fn attach(self) -> Attached<K, E> {
        Handle::Shared(self).into()
    }
}

impl<K: Hash + Eq, E> seal::Attach<K, E> for &SharedWindow<K> {
    fn attach(self) -> Attached<K, E> {
        Handle::Shared(self.clone()).into()
    }
}

impl<S, K, E> seal::Attach<K, E> for StoreWindow<S>
where
    S: Store,
    K: Hash + Eq + Clone + StoreKey,
    E: From<StoreError>,
{
    fn attach(self) -> Attached<K, E> {
        let StoreWindow {
            window,
            store,
            settings,
        } = self;
        let log = log_of(&window, &*store);
        Attached {
            handle: Handle::Local(WindowSet::new(window)),
            store: Some(parts(Backend::Insert(store), settings, log)),
        }
    }
}

impl<K, E> seal::AttachClaims<K, E> for Window
where
    K: Hash + Eq + Clone + Send + 'static,
{
    fn attach_claims(self) -> ClaimAttached<K, E> {
        ClaimAttached {
            gate: ClaimGate {
                core: Arc::new(ClaimCore::new(WindowSet::new(self), None, K::clone)),
                clone_key: K::clone,
                seen: 0,
            },
            store: None,
        }
    }
}

impl<S, K, E> seal::AttachClaims<K, E> for StoreWindow<S>
where
    S: ClaimStore,
    K: Hash + Eq + Clone + StoreKey + Send + 'static,
    E: From<StoreError>,
{
    fn attach_claims(self) -> ClaimAttached<K, E> {
        let StoreWindow {
            window,
            store,
            settings,
        } = self;
        let lease = window.policy().lease();
        let log = log_of(&window, &*store);
        let any: Arc<dyn Any + Send + Sync> = Arc::clone(&store) as _;
        let store: Arc<dyn ClaimStore> = store;
        let committer = Committer::new(
            Arc::clone(&store),
            any,
            settings.ttl,
            settings.timeout,
            <K as StoreKey>::write_key,
            Arc::clone(&log),
        );
        let core = Arc::new(ClaimCore::new(
            WindowSet::new(window),
            Some(committer),
            K::clone,
        ));
        let owner = Arc::clone(&core);
        let release: ReleaseFn<K> = Box::new(move |held| {
            for h in held {
                owner.release_unhanded(&h.key, h.bytes, h.token);
            }
        });
        ClaimAttached {
            gate: ClaimGate {
                core,
                clone_key: K::clone,
                seen: 0,
            },
            store: Some((
                parts(Backend::Claim { store, lease }, settings, log),
                release,
            )),
        }
    }
}

/// The log of an operator of `window` on `store`.
fn log_of<S: Store>(window: &Window, store: &S) -> Arc<Log> {
    Arc::new(Log::new(Origin::new(
        window.policy().name(),
        std::any::type_name::<S>(),
        store.namespace(),
    )))
}

/// The store path's parts for keys of type `K` and errors of type `E`.
fn parts<K, E>(backend: Backend, settings: Settings, log: Arc<Log>) -> StoreParts<K, E>
where
    K: Clone + StoreKey,
    E: From<StoreError>,
{
    StoreParts {
        backend,
        settings,
        encode: <K as StoreKey>::write_key,
        clone_key: <K as Clone>::clone,
        convert: E::from,
        log,
    }
}
