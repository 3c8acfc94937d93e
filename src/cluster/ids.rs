//! Request ids: what lets a retried request be recognized instead of applied twice.
//!
//! A request submitted with an id ([`Client::submit_with_id`]) carries it in its log
//! record. The cluster remembers the ids of the requests among the last records of the
//! input log ([`ClusterBuilder::retry_window`]); a request whose key and id are
//! remembered is refused as [`Error::Duplicate`] before anything is logged. The check and
//! the append run under the key's stripe lock, so two submits of one key and id never
//! both get in. Keys are compared by their bytes, not their hashes: keys chosen to
//! collide cannot make one key's request pass for another's. An open reads the ids back from the last records of the log, so a retry
//! after a restart (or a crash) is recognized too.
//!
//! [`Client::submit_with_id`]: super::Client::submit_with_id
//! [`ClusterBuilder::retry_window`]: super::ClusterBuilder::retry_window
//! [`Error::Duplicate`]: crate::Error::Duplicate

use std::collections::{HashMap, VecDeque};
use std::fmt;

use crate::record::Offset;
use crate::small::Key;

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
/// with their offsets, keyed by the request's key and id.
///
/// An entry is dropped once a later id's offset is `window` or more past it: an id is
/// remembered at least while its request is among the last `window` records (longer if
/// no request with an id came since), and the set never holds more than `window`
/// entries, since each has its own offset within a span of `window`.
#[derive(Debug)]
pub(crate) struct RecentIds {
    window: u64,
    /// Each entry's offset, and whether its record was durable (by the store's sync
    /// policy) once appended: not deferred (`Store::append_deferred`), or read back at
    /// open.
    offsets: HashMap<(Key, u128), (Offset, bool), ahash::RandomState>,
    /// The entries in the order they were logged (offsets ascending).
    order: VecDeque<(Offset, Key, u128)>,
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

    /// Where the request of `key` with id `id` was logged, if it is remembered.
    pub(crate) fn find(&self, key: &[u8], id: RequestId) -> Option<Offset> {
        self.find_settled(key, id).map(|(offset, _)| offset)
    }

    /// [`find`](Self::find), and whether the record was durable once appended (if not,
    /// it may still be on its way to the disk).
    pub(crate) fn find_settled(&self, key: &[u8], id: RequestId) -> Option<(Offset, bool)> {
        if self.offsets.is_empty() {
            return None;
        }
        self.offsets.get(&(Key::copy_from(key), id.0)).copied()
    }

    /// Remembers the request of `key` with id `id`, logged at `offset` (unless one with
    /// the same key and id is remembered already: the first is the one named), and
    /// forgets those `window` or more records before it.
    pub(crate) fn insert(&mut self, key: &[u8], id: RequestId, offset: Offset, settled: bool) {
        if self.window == 0 {
            return;
        }
        while let Some((oldest, ..)) = self.order.front() {
            if oldest.saturating_add(self.window) > offset {
                break;
            }
            let Some((oldest, key, id)) = self.order.pop_front() else {
                break;
            };
            // Only the entry this one put there: a later request with the same key and
            // id (logged once this one was forgotten) keeps its own.
            let entry = (key, id);
            if self.offsets.get(&entry).map(|e| e.0) == Some(oldest) {
                self.offsets.remove(&entry);
            }
        }
        if offset.saturating_add(self.window) <= self.order.back().map_or(0, |b| b.0) {
            return; // older than the window already (an open reading records out of order)
        }
        let key = Key::copy_from(key);
        match self.offsets.entry((key.clone(), id.0)) {
            std::collections::hash_map::Entry::Occupied(_) => return,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((offset, settled));
            }
        }
        // Appends of different stripes can reach here out of offset order; keep `order`
        // sorted so that the front is always the oldest. (Nearly always in order: a
        // search through a deque of thousands of entries, each a cache miss, cost about
        // as much as the rest of the insert.)
        if self.order.back().is_none_or(|b| b.0 < offset) {
            self.order.push_back((offset, key, id.0));
        } else {
            let at = self.order.partition_point(|(o, ..)| *o < offset);
            self.order.insert(at, (offset, key, id.0));
        }
    }

    /// Forgets the id of the request logged at `offset`, if one is remembered: it was set
    /// aside (its handler panicked or stalled twice), changed nothing, and may be
    /// submitted again.
    pub(crate) fn forget(&mut self, offset: Offset) {
        let at = self.order.partition_point(|(o, ..)| *o < offset);
        if let Some((o, key, id)) = self.order.get(at)
            && *o == offset
        {
            let entry = (key.clone(), *id);
            if self.offsets.get(&entry).map(|e| e.0) == Some(offset) {
                self.offsets.remove(&entry);
            }
        }
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
        recent.insert(b"a", RequestId(7), 100, true);
        recent.insert(b"b", RequestId(7), 101, true);
        assert_eq!(recent.find(b"a", RequestId(7)), Some(100));
        assert_eq!(recent.find(b"b", RequestId(7)), Some(101));
        assert_eq!(recent.find(b"c", RequestId(7)), None);
        recent.insert(b"a", RequestId(8), 109, true);
        assert_eq!(
            recent.find(b"a", RequestId(7)),
            Some(100),
            "109 is within 10 of 100"
        );
        recent.insert(b"a", RequestId(9), 110, true);
        assert_eq!(recent.find(b"a", RequestId(7)), None, "110 is 10 past 100");
        assert_eq!(recent.find(b"b", RequestId(7)), Some(101));
        assert_eq!(recent.len(), 3);
    }

    #[test]
    fn the_set_never_holds_more_than_the_window() {
        let mut recent = RecentIds::new(64);
        for offset in 0..10_000u64 {
            recent.insert(
                &[(offset % 7) as u8],
                RequestId(u128::from(offset)),
                offset,
                true,
            );
            assert!(recent.len() <= 64);
        }
        assert_eq!(recent.len(), 64);
    }

    #[test]
    fn out_of_order_inserts_keep_the_oldest_first() {
        let mut recent = RecentIds::new(5);
        recent.insert(b"k", RequestId(1), 11, true);
        recent.insert(b"k", RequestId(2), 10, true);
        recent.insert(b"k", RequestId(3), 15, true);
        assert_eq!(recent.find(b"k", RequestId(2)), None, "15 is 5 past 10");
        assert_eq!(recent.find(b"k", RequestId(1)), Some(11));
        recent.insert(b"k", RequestId(4), 3, true);
        assert_eq!(
            recent.find(b"k", RequestId(4)),
            None,
            "older than the window"
        );
    }

    #[test]
    fn the_first_of_two_with_one_key_and_id_is_the_one_named() {
        let mut recent = RecentIds::new(100);
        recent.insert(b"k", RequestId(1), 10, true);
        recent.insert(b"k", RequestId(1), 20, true);
        assert_eq!(recent.find(b"k", RequestId(1)), Some(10));
        assert_eq!(recent.len(), 1);
        // Keys that differ are told apart whatever their hashes.
        let long = vec![7u8; 100];
        recent.insert(&long, RequestId(1), 30, true);
        assert_eq!(recent.find(&long, RequestId(1)), Some(30));
        assert_eq!(recent.find(&long[..99], RequestId(1)), None);
    }

    #[test]
    fn a_forgotten_id_can_be_remembered_again() {
        let mut recent = RecentIds::new(100);
        recent.insert(b"k", RequestId(1), 10, true);
        recent.insert(b"k", RequestId(2), 11, true);
        recent.forget(10);
        recent.forget(12); // nothing there
        assert_eq!(recent.find(b"k", RequestId(1)), None);
        assert_eq!(recent.find(b"k", RequestId(2)), Some(11));
        recent.insert(b"k", RequestId(1), 13, true);
        assert_eq!(recent.find(b"k", RequestId(1)), Some(13));
        // The old entry's eviction leaves the new one.
        recent.insert(b"k", RequestId(3), 110, true);
        assert_eq!(recent.find(b"k", RequestId(1)), Some(13));
    }

    #[test]
    fn a_zero_window_remembers_nothing() {
        let mut recent = RecentIds::new(0);
        recent.insert(b"k", RequestId(1), 1, true);
        assert_eq!(recent.find(b"k", RequestId(1)), None);
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
