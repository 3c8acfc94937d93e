//! [`SmallBytes`]: a byte string stored inline when short.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};

/// A copy of a byte string, inline when it has at most `N` bytes (`N` < 256), on the heap
/// otherwise.
///
/// Keys and payloads are kept this way where a short one is the common case:
/// - A queued request's key and payload. A heap buffer per request, allocated by the
///   submitting thread and freed by the instance's, sent nearly every allocation of the
///   submitter down glibc's slow path (6–7% of the CPU of the cluster bench); sharing
///   the holder's `Bytes` of the key instead bounced its reference count between the two
///   threads.
/// - The keys of the cluster's holders map and of an instance's states, and of
///   `Sticky`'s key table, each looked up once per request: an inline key is compared
///   where the entry is, without following a pointer to the key's bytes.
///
/// It hashes and compares as the `[u8]` it holds, so a map keyed by it is looked up with
/// a `&[u8]`.
#[derive(Clone)]
pub(crate) enum SmallBytes<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Heap(Vec<u8>),
}

impl<const N: usize> SmallBytes<N> {
    /// A copy of `bytes`.
    pub(crate) fn copy_from(bytes: &[u8]) -> Self {
        match u8::try_from(bytes.len()) {
            Ok(len) if bytes.len() <= N => {
                let mut inline = [0; N];
                inline[..bytes.len()].copy_from_slice(bytes);
                SmallBytes::Inline { len, bytes: inline }
            }
            _ => SmallBytes::Heap(bytes.to_vec()),
        }
    }

    /// The bytes held.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            SmallBytes::Inline { len, bytes } => &bytes[..usize::from(*len)],
            SmallBytes::Heap(v) => v,
        }
    }
}

impl<const N: usize> Borrow<[u8]> for SmallBytes<N> {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl<const N: usize> Hash for SmallBytes<N> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, which `Borrow<[u8]>` lookups require.
        self.as_slice().hash(state);
    }
}

impl<const N: usize> PartialEq for SmallBytes<N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<const N: usize> Eq for SmallBytes<N> {}

impl<const N: usize> std::fmt::Debug for SmallBytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SmallBytes").field(&self.as_slice()).finish()
    }
}

/// A key as per-key tables hold it (the holders of a stripe, the states of an
/// instance, `Sticky`'s keys): inline up to 30 bytes, as large as a `Bytes`.
pub(crate) type Key = SmallBytes<30>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn short_and_long_strings_round_trip_and_look_up_as_slices() {
        let short = SmallBytes::<8>::copy_from(b"user-1");
        let edge = SmallBytes::<8>::copy_from(b"12345678");
        let long = SmallBytes::<8>::copy_from(b"123456789");
        assert!(matches!(short, SmallBytes::Inline { .. }));
        assert!(matches!(edge, SmallBytes::Inline { .. }));
        assert!(matches!(long, SmallBytes::Heap(_)));
        assert_eq!(short.as_slice(), b"user-1");
        assert_eq!(edge.as_slice(), b"12345678");
        assert_eq!(long.as_slice(), b"123456789");
        assert_eq!(SmallBytes::<8>::copy_from(b"").as_slice(), b"");
        assert_ne!(short, edge);
        assert_eq!(long, SmallBytes::<8>::copy_from(b"123456789"));
        let mut map: HashMap<SmallBytes<8>, u32, ahash::RandomState> = HashMap::default();
        map.insert(short, 1);
        map.insert(edge, 2);
        map.insert(long, 3);
        assert_eq!(map.get(&b"user-1"[..]), Some(&1));
        assert_eq!(map.get(&b"12345678"[..]), Some(&2));
        assert_eq!(map.get(&b"123456789"[..]), Some(&3));
        assert_eq!(map.get(&b"user-2"[..]), None);
    }
}
