//! Request ids: what lets a retried request be recognized instead of applied twice.
//!
//! A request submitted with an id ([`Client::submit_with_id`]) carries it in its log
//! record. The cluster remembers the ids of the requests among the last records of the
//! input log ([`ClusterBuilder::retry_window`]); a request whose key and id are
//! remembered is refused as [`Error::Duplicate`] before anything is logged. The check and
//! the append run under the key's stripe lock, so two submits of one key and id never
//! both get in. An open reads the ids back from the last records of the log, so a retry
//! after a restart (or a crash) is recognized too.
//!
//! [`Client::submit_with_id`]: super::Client::submit_with_id
//! [`ClusterBuilder::retry_window`]: super::ClusterBuilder::retry_window
//! [`Error::Duplicate`]: crate::Error::Duplicate

use std::collections::{HashMap, VecDeque};
use std::fmt;

use crate::record::Offset;

/// The id of a request, chosen by its submitter, that makes a retry of it safe: see
/// [`Client::submit_with_id`](super::Client::submit_with_id).
///
/// Ids are compared per key: two keys may use the same id. Anything unique per request
/// of a key does: a UUID's 128 bits, a client's sequence number, a hash of an upstream
/// message's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u128);

impl RequestId {
    /// The id's bytes as stored in the log (little-endian).
    pub(crate) fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    /// The id stored as `bytes` (see [`to_bytes`](Self::to_bytes)).
    pub(crate) fn from_bytes(bytes: [u8; 16]) -> RequestId {
        RequestId(u128::from_le_bytes(bytes))
    }
}

impl From<u128> for RequestId {
    fn from(id: u128) -> Self {
        RequestId(id)
    }
}

impl From<u64> for RequestId {
    fn from(id: u64) -> Self {
        RequestId(u128::from(id))
    }
}

impl From<[u8; 16]> for RequestId {
    /// Big-endian, as a UUID's bytes are written: `Uuid::as_bytes()` converts.
    fn from(bytes: [u8; 16]) -> Self {
        RequestId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// The ids of the requests logged among the last `window` records of the input log,
/// with their offsets, keyed by the key's hash and the id.
///
/// An entry is dropped once a later id's offset is `window` or more past it: an id is
/// remembered at least while its request is among the last `window` records (longer if
/// no request with an id came since), and the set never holds more than `window`
/// entries, since each has its own offset within a span of `window`.
#[derive(Debug)]
pub(crate) struct RecentIds {
    window: u64,
    offsets: HashMap<(u64, u128), Offset, ahash::RandomState>,
    /// The entries in the order they were logged (offsets ascending).
    order: VecDeque<(Offset, u64, u128)>,
}

impl RecentIds {
    /// An empty set remembering ids over `window` records.
    pub(crate) fn new(window: u64) -> RecentIds {
        RecentIds {
            window,
            offsets: HashMap::default(),
            order: VecDeque::new(),
        }
    }

    /// Where the request of key hash `hash` with id `id` was logged, if it is remembered.
    pub(crate) fn find(&self, hash: u64, id: RequestId) -> Option<Offset> {
        self.offsets.get(&(hash, id.0)).copied()
    }

    /// Remembers the request of key hash `hash` with id `id`, logged at `offset`, and
    /// forgets those `window` or more records before it.
    pub(crate) fn insert(&mut self, hash: u64, id: RequestId, offset: Offset) {
        if self.window == 0 {
            return;
        }
        while let Some(&(oldest, h, i)) = self.order.front() {
            if oldest.saturating_add(self.window) > offset {
                break;
            }
            self.order.pop_front();
            // Only the entry this one put there: a later request with the same key and
            // id (logged once this one was forgotten) keeps its own.
            if self.offsets.get(&(h, i)) == Some(&oldest) {
                self.offsets.remove(&(h, i));
            }
        }
        if offset.saturating_add(self.window) <= self.order.back().map_or(0, |b| b.0) {
            return; // older than the window already (an open reading records out of order)
        }
        self.offsets.insert((hash, id.0), offset);
        // Appends of different stripes can reach here out of offset order; keep `order`
        // sorted so that the front is always the oldest.
        let at = self.order.partition_point(|&(o, _, _)| o < offset);
        self.order.insert(at, (offset, hash, id.0));
    }

    /// How many ids are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.offsets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_remembered_for_the_window_and_then_forgotten() {
        let mut recent = RecentIds::new(10);
        recent.insert(1, RequestId(7), 100);
        recent.insert(2, RequestId(7), 101);
        assert_eq!(recent.find(1, RequestId(7)), Some(100));
        assert_eq!(recent.find(2, RequestId(7)), Some(101));
        assert_eq!(recent.find(3, RequestId(7)), None);
        recent.insert(1, RequestId(8), 109);
        assert_eq!(
            recent.find(1, RequestId(7)),
            Some(100),
            "109 is within 10 of 100"
        );
        recent.insert(1, RequestId(9), 110);
        assert_eq!(recent.find(1, RequestId(7)), None, "110 is 10 past 100");
        assert_eq!(recent.find(2, RequestId(7)), Some(101));
        assert_eq!(recent.len(), 3);
    }

    #[test]
    fn the_set_never_holds_more_than_the_window() {
        let mut recent = RecentIds::new(64);
        for offset in 0..10_000u64 {
            recent.insert(offset % 7, RequestId(u128::from(offset)), offset);
            assert!(recent.len() <= 64);
        }
        assert_eq!(recent.len(), 64);
    }

    #[test]
    fn out_of_order_inserts_keep_the_oldest_first() {
        let mut recent = RecentIds::new(5);
        recent.insert(1, RequestId(1), 11);
        recent.insert(1, RequestId(2), 10);
        recent.insert(1, RequestId(3), 15);
        assert_eq!(recent.find(1, RequestId(2)), None, "15 is 5 past 10");
        assert_eq!(recent.find(1, RequestId(1)), Some(11));
        recent.insert(1, RequestId(4), 3);
        assert_eq!(recent.find(1, RequestId(4)), None, "older than the window");
    }

    #[test]
    fn a_zero_window_remembers_nothing() {
        let mut recent = RecentIds::new(0);
        recent.insert(1, RequestId(1), 1);
        assert_eq!(recent.find(1, RequestId(1)), None);
    }

    #[test]
    fn uuid_bytes_read_big_endian() {
        let mut bytes = [0u8; 16];
        bytes[15] = 1;
        assert_eq!(RequestId::from(bytes), RequestId(1));
        assert_eq!(RequestId::from_bytes(RequestId(5).to_bytes()), RequestId(5));
        assert_eq!(RequestId(255).to_string(), "0xff");
    }
}
