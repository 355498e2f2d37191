//! How keys reach a store: as bytes, through [`StoreKey`].

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

use crate::fingerprint::Fingerprint;

/// A key that a [`Store`](super::Store) can keep: written as bytes.
///
/// The encoding is part of this crate's stable format: stores written by one version or
/// process are read by every other, so it never changes (a golden test pins it).
///
/// | key | bytes |
/// |---|---|
/// | `u8`…`u128`, `i8`…`i128` | big-endian, fixed width (two's complement for signed) |
/// | `str`, `String` | UTF-8 |
/// | `[u8]`, `Vec<u8>`, `[u8; N]` | as they are |
/// | [`Fingerprint`] | its 16 bytes, big-endian |
/// | `uuid::Uuid` (feature `uuid`) | its 16 bytes |
/// | tuples of up to 4 | each part as a 4-byte big-endian length, then its bytes |
/// | `&T`, `Box<T>`, `Rc<T>`, `Arc<T>`, `Cow<T>` | as `T` |
///
/// Keys may be empty. A store may refuse a key longer than its limit
/// ([`StoreError::KeyTooLong`](super::StoreError::KeyTooLong)); a long key can be replaced by
/// its [`Fingerprint`].
///
/// # Examples
///
/// ```
/// use stream_dedup::store::StoreKey;
///
/// assert_eq!(258u16.key_bytes(), [1, 2]);
/// assert_eq!("12345/payment".key_bytes(), b"12345/payment");
/// assert_eq!((1u8, "ab").key_bytes(), [0, 0, 0, 1, 1, 0, 0, 0, 2, b'a', b'b']);
/// ```
pub trait StoreKey {
    /// Appends this key's bytes to `out`.
    fn write_key(&self, out: &mut Vec<u8>);

    /// This key's bytes.
    fn key_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_key(&mut out);
        out
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl StoreKey for $t {
            #[inline]
            fn write_key(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
        }
    )*};
}
int_keys!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128);

impl StoreKey for str {
    fn write_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl StoreKey for String {
    fn write_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl StoreKey for [u8] {
    fn write_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

impl StoreKey for Vec<u8> {
    fn write_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

impl<const N: usize> StoreKey for [u8; N] {
    fn write_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

impl StoreKey for Fingerprint {
    fn write_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }
}

#[cfg(feature = "uuid")]
impl StoreKey for uuid::Uuid {
    fn write_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

macro_rules! deref_keys {
    ($($t:ty),*) => {$(
        impl<T: StoreKey + ?Sized> StoreKey for $t {
            fn write_key(&self, out: &mut Vec<u8>) {
                (**self).write_key(out);
            }
        }
    )*};
}
deref_keys!(&T, Box<T>, Rc<T>, Arc<T>);

impl<T: StoreKey + ToOwned + ?Sized> StoreKey for Cow<'_, T> {
    fn write_key(&self, out: &mut Vec<u8>) {
        (**self).write_key(out);
    }
}

/// Writes one tuple part: a 4-byte big-endian length, then the bytes.
fn write_part<T: StoreKey + ?Sized>(part: &T, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    part.write_key(out);
    // A part longer than 4 GiB cannot be a key; its length saturates (and no store takes it).
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

macro_rules! tuple_keys {
    ($(($($name:ident),+))*) => {$(
        impl<$($name: StoreKey),+> StoreKey for ($($name,)+) {
            #[allow(non_snake_case, reason = "the names are the type parameters")]
            fn write_key(&self, out: &mut Vec<u8>) {
                let ($($name,)+) = self;
                $(write_part($name, out);)+
            }
        }
    )*};
}
tuple_keys!((A)(A, B)(A, B, C)(A, B, C, D));

#[cfg(test)]
mod tests {
    use super::*;

    /// The stable format: these bytes must never change.
    #[test]
    fn golden_encoding() {
        assert_eq!(0x0102_0304u32.key_bytes(), [1, 2, 3, 4]);
        assert_eq!((-2i16).key_bytes(), [0xff, 0xfe]);
        assert_eq!(7u64.key_bytes(), [0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(String::from("é").key_bytes(), [0xc3, 0xa9]);
        assert_eq!(b"\xff\x00".key_bytes(), [0xff, 0]);
        assert_eq!(vec![9u8].key_bytes(), [9]);
        assert_eq!("".key_bytes(), b"");
        assert_eq!(
            (12345u32, "payment").key_bytes(),
            [
                0, 0, 0, 4, 0, 0, 0x30, 0x39, 0, 0, 0, 7, b'p', b'a', b'y', b'm', b'e', b'n', b't'
            ]
        );
        assert_eq!(
            Fingerprint::of("").key_bytes(),
            0x99aa06d3014798d86001c324468d497fu128.to_be_bytes()
        );
        assert_eq!(Arc::<str>::from("k").key_bytes(), b"k");
        assert_eq!(Cow::Borrowed("k").key_bytes(), b"k");
    }

    #[test]
    fn tuples_are_unambiguous() {
        assert_ne!(("ab", "c").key_bytes(), ("a", "bc").key_bytes());
    }
}
