//! fjall and I/O errors as [`StoreError`]s, with [`OpenError`] as their source.

use std::io;
use std::path::{Path, PathBuf};

use super::format::MAX_NAMESPACE_LEN;
use crate::store::{BoxError, StoreError};

/// What went wrong, as the source of a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    #[error(
        "invalid namespace {0:?}: use 1 to {MAX_NAMESPACE_LEN} ASCII letters, digits, '-', '_' or '.'"
    )]
    Namespace(String),
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} is neither empty nor a stream-dedup store", .0.display())]
    Foreign(PathBuf),
    #[error("{} holds a fjall database that stream-dedup did not write", .0.display())]
    ForeignDatabase(PathBuf),
    #[error("{} is a stream-dedup store of another format: {found:?}", path.display())]
    Format { path: PathBuf, found: String },
    #[error("{} has lost its format marker (its journal is damaged)", .0.display())]
    LostMarker(PathBuf),
    #[error("a value of {0} bytes is not a stream-dedup record")]
    Value(usize),
    #[error("fjall failed on {}", path.display())]
    Fjall {
        path: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error("fjall panicked on {}: {message}", path.display())]
    Panicked { path: PathBuf, message: String },
}

// The variants that wrap a backend error are built here only; `.into()` also fits a variant
// that holds the error shared rather than boxed.
#[allow(clippy::useless_conversion, reason = "see above")]
pub(super) fn corrupt(e: impl Into<BoxError>) -> StoreError {
    let e: BoxError = e.into();
    StoreError::Corrupt(e.into())
}

#[allow(clippy::useless_conversion, reason = "see `corrupt`")]
pub(super) fn locked(e: impl Into<BoxError>) -> StoreError {
    let e: BoxError = e.into();
    StoreError::Locked(e.into())
}

#[allow(clippy::useless_conversion, reason = "see `corrupt`")]
pub(super) fn unavailable(e: impl Into<BoxError>) -> StoreError {
    let e: BoxError = e.into();
    StoreError::Unavailable(e.into())
}

/// Sorts a fjall error into the [`StoreError`] it is.
pub(super) fn fjall_error(operation: &'static str, path: &Path, e: fjall::Error) -> StoreError {
    use fjall::Error as F;
    let io = match &e {
        F::Io(io) | F::Storage(fjall::LsmError::Io(io)) => Some(io.kind()),
        _ => None,
    };
    let kind = match (&e, io) {
        (F::Locked, _) => Kind::Locked,
        (_, Some(io::ErrorKind::PermissionDenied)) => Kind::Unavailable,
        // A file that the database refers to is gone: damaged, whenever it is found.
        (
            _,
            Some(
                io::ErrorKind::NotFound | io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof,
            ),
        ) => Kind::Corrupt,
        (_, Some(_)) | (F::Poisoned | F::KeyspaceDeleted, None) => Kind::Backend,
        // Decoding, checksums, versions, journal recovery: the files are not what fjall wrote.
        (_, None) => Kind::Corrupt,
    };
    let e = OpenError::Fjall {
        path: path.to_owned(),
        source: e,
    };
    match kind {
        Kind::Locked => locked(e),
        Kind::Corrupt => corrupt(e),
        Kind::Unavailable => unavailable(e),
        Kind::Backend => StoreError::backend(operation, e),
    }
}

enum Kind {
    Locked,
    Corrupt,
    Unavailable,
    Backend,
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}
