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
/// Kept in two generations, each the entries of one span of `window` offsets (offsets
/// `g * window` up to `(g + 1) * window`): the newest span's, and the one before. The
/// first entry past the newest span starts a new generation and drops the oldest
/// whole, so an id is remembered at least while its request is among the last `window`
/// records (longer if no request with an id came since), at most twice that, and the
/// set never holds more than `2 * window` entries.
///
/// Why not one hash map with the oldest entry forgotten at each insert: every
/// operation on a table of tens of thousands of 64-byte buckets is a cache miss or
/// two, and a submit with an id made five (a lookup, an insert, and the oldest's lookup
/// and removal, plus a deque for the order): the cluster bench's requests with ids ran
/// at 0.45-0.57 of those without. Here a submit probes one small index per generation
/// (8 bytes a slot, the key's hash computed once) and appends its entry where the
/// last one went; dropping a generation is one `clear` per `window` entries.
#[derive(Debug)]
pub(crate) struct RecentIds {
    window: u64,
    /// The newest span's entries: offsets `span * window` up to `(span + 1) * window`.
    current: Generation,
    /// The span before's.
    previous: Generation,
    /// The newest span's number.
    span: u64,
    hasher: ahash::RandomState,
}

/// One remembered request.
#[derive(Debug)]
struct Remembered {
    key: Key,
    /// The id's halves (a `u128` would align the entry to 16 bytes: 80 instead of 72).
    id: [u64; 2],
    offset: Offset,
    /// Whether its record was durable (by the store's sync policy) once appended: not
    /// deferred (`Store::append_deferred`), or read back at open.
    settled: bool,
    /// Forgotten (its request was set aside): no longer found, and its slot in the
    /// index is passed over.
    forgotten: bool,
    hash: u64,
}

/// The bits of an index slot that hold an entry's position plus one (0: an empty slot);
/// the others hold the top bits of its hash.
const POSITION_BITS: u32 = 40;
const POSITION_MASK: u64 = (1 << POSITION_BITS) - 1;

/// One span's entries, in the order they were remembered, with an open-addressed index
/// (linear probing, at most half full) of their hashes.
#[derive(Debug, Default)]
struct Generation {
    entries: Vec<Remembered>,
    index: Vec<u64>,
    /// The largest offset among the entries.
    newest: Offset,
    /// How far an entry's offset was at most below the largest one before it: entries
    /// come nearly in offset order (appends of different stripes reach the set in
    /// another order than their offsets), and `forget` stops its search once it is
    /// this far below the offset it looks for.
    disorder: u64,
}

/// `id` as two `u64`s.
fn halves(id: u128) -> [u64; 2] {
    [id as u64, (id >> 64) as u64]
}

impl Generation {
    fn clear(&mut self) {
        self.entries.clear();
        self.index.fill(0);
        self.newest = 0;
        self.disorder = 0;
    }

    fn tag(hash: u64) -> u64 {
        hash & !POSITION_MASK
    }

    fn find(&self, hash: u64, key: &[u8], id: u128) -> Option<&Remembered> {
        if self.entries.is_empty() {
            return None;
        }
        let mask = self.index.len() - 1;
        let mut at = hash as usize & mask;
        loop {
            let slot = self.index[at];
            if slot == 0 {
                return None;
            }
            if slot & !POSITION_MASK == Self::tag(hash) {
                let entry = &self.entries[(slot & POSITION_MASK) as usize - 1];
                if entry.id == halves(id) && !entry.forgotten && entry.key.as_slice() == key {
                    return Some(entry);
                }
            }
            at = (at + 1) & mask;
        }
    }

    fn insert(&mut self, entry: Remembered) {
        if (self.entries.len() + 1) * 2 > self.index.len() {
            let len = (self.index.len() * 2).max(64);
            self.index = vec![0; len];
            for position in 0..self.entries.len() {
                self.link(position);
            }
        }
        if self.entries.is_empty() || entry.offset > self.newest {
            self.newest = entry.offset;
        } else {
            self.disorder = self.disorder.max(self.newest - entry.offset);
        }
        // Positions fit the index's slots: a generation never holds 2^40 entries (each
        // takes 72 bytes).
        self.entries.push(entry);
        self.link(self.entries.len() - 1);
    }

    /// Marks the entry logged at `offset` forgotten, if there is one. Searched from the
    /// newest entry back, as far as an entry before it could be (see `disorder`): an
    /// entry `disorder` or more below `offset` follows every entry at `offset`, since
    /// each entry is at most `disorder` below the largest offset before it.
    fn forget(&mut self, offset: Offset) {
        let floor = offset.saturating_sub(self.disorder);
        for entry in self.entries.iter_mut().rev() {
            if entry.offset < floor {
                return;
            }
            if entry.offset == offset && !entry.forgotten {
                entry.forgotten = true;
                return;
            }
        }
    }

    /// Puts the entry at `position` in the index.
    fn link(&mut self, position: usize) {
        let hash = self.entries[position].hash;
        let mask = self.index.len() - 1;
        let mut at = hash as usize & mask;
        while self.index[at] != 0 {
            at = (at + 1) & mask;
        }
        self.index[at] = Self::tag(hash) | (position as u64 + 1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.iter().filter(|e| !e.forgotten).count()
    }
}

impl RecentIds {
    /// An empty set remembering ids over `window` records.
    pub(crate) fn new(window: u64) -> RecentIds {
        RecentIds {
            window,
            current: Generation::default(),
            previous: Generation::default(),
            span: 0,
            hasher: ahash::RandomState::new(),
        }
    }

    /// Where the request of `key` with id `id` was logged, if it is remembered.
    pub(crate) fn find(&self, key: &[u8], id: RequestId) -> Option<Offset> {
        self.find_settled(key, id).map(|(offset, _)| offset)
    }

    /// [`find`](Self::find), and whether the record was durable once appended (if not,
    /// it may still be on its way to the disk).
    pub(crate) fn find_settled(&self, key: &[u8], id: RequestId) -> Option<(Offset, bool)> {
        if self.current.entries.is_empty() && self.previous.entries.is_empty() {
            return None;
        }
        self.lookup(self.hash(key, id), key, id.0)
            .map(|e| (e.offset, e.settled))
    }

    fn hash(&self, key: &[u8], id: RequestId) -> u64 {
        self.hasher.hash_one((key, id.0))
    }

    fn lookup(&self, hash: u64, key: &[u8], id: u128) -> Option<&Remembered> {
        self.current
            .find(hash, key, id)
            .or_else(|| self.previous.find(hash, key, id))
    }

    /// Remembers the request of `key` with id `id`, logged at `offset` (unless one with
    /// the same key and id is remembered already: the first is the one named). An entry
    /// past the newest span starts a new one, and the oldest is forgotten.
    pub(crate) fn insert(&mut self, key: &[u8], id: RequestId, offset: Offset, settled: bool) {
        if self.window == 0 {
            return;
        }
        let span = offset / self.window;
        if span > self.span {
            self.previous.clear();
            if span == self.span + 1 {
                // The oldest span goes; its room is kept for the next one.
                std::mem::swap(&mut self.previous, &mut self.current);
            } else {
                self.current.clear();
            }
            self.span = span;
        } else if span + 1 < self.span {
            return; // older than both spans (an open reading records out of order)
        }
        let hash = self.hash(key, id);
        if self.lookup(hash, key, id.0).is_some() {
            return;
        }
        let entry = Remembered {
            key: Key::copy_from(key),
            id: halves(id.0),
            offset,
            settled,
            forgotten: false,
            hash,
        };
        if span == self.span {
            self.current.insert(entry);
        } else {
            self.previous.insert(entry);
        }
    }

    /// Forgets the id of the request logged at `offset`, if one is remembered: it was set
    /// aside (its handler panicked or stalled twice), changed nothing, and may be
    /// submitted again. (A search of the offset's span back from its newest entry, no
    /// further than the span's disorder allows: requests are set aside soon after they
    /// are logged.)
    pub(crate) fn forget(&mut self, offset: Offset) {
        if self.window == 0 {
            return;
        }
        let span = offset / self.window;
        let generation = if span == self.span {
            &mut self.current
        } else if span + 1 == self.span {
            &mut self.previous
        } else {
            return;
        };
        generation.forget(offset);
    }

    /// How many ids are remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
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
        recent.insert(b"a", RequestId(9), 119, true);
        assert_eq!(
            recent.find(b"a", RequestId(7)),
            Some(100),
            "remembered for at least the window: 119 is 19 past 100"
        );
        assert_eq!(recent.find(b"a", RequestId(8)), Some(109));
        recent.insert(b"a", RequestId(10), 120, true);
        assert_eq!(recent.find(b"a", RequestId(7)), None, "120 is 20 past 100");
        assert_eq!(recent.find(b"b", RequestId(7)), None);
        assert_eq!(recent.find(b"a", RequestId(8)), None);
        assert_eq!(recent.find(b"a", RequestId(9)), Some(119));
        assert_eq!(recent.find(b"a", RequestId(10)), Some(120));
        assert_eq!(recent.len(), 2);
    }

    #[test]
    fn every_id_is_remembered_for_at_least_the_window_and_at_most_twice_it() {
        let window = 37;
        let mut recent = RecentIds::new(window);
        for offset in 0..5_000u64 {
            // Offsets with gaps (records without ids between), keys repeating.
            if offset % 3 == 1 {
                continue;
            }
            let key = [(offset % 7) as u8];
            recent.insert(&key, RequestId(u128::from(offset)), offset, true);
            assert!(recent.len() as u64 <= 2 * window);
            for back in 0..3 * window {
                let Some(earlier) = offset.checked_sub(back) else {
                    break;
                };
                if earlier % 3 == 1 {
                    continue;
                }
                let key = [(earlier % 7) as u8];
                let found = recent.find(&key, RequestId(u128::from(earlier)));
                if back < window {
                    assert_eq!(found, Some(earlier), "{earlier} at {offset}");
                } else if back >= 2 * window {
                    assert_eq!(found, None, "{earlier} at {offset}");
                }
            }
        }
    }

    #[test]
    fn the_set_never_holds_more_than_twice_the_window() {
        let mut recent = RecentIds::new(64);
        for offset in 0..10_000u64 {
            recent.insert(
                &[(offset % 7) as u8],
                RequestId(u128::from(offset)),
                offset,
                true,
            );
            assert!(recent.len() <= 128);
        }
        assert_eq!(recent.len(), 64 + 10_000 % 64);
    }

    #[test]
    fn out_of_order_inserts_are_remembered_in_their_span() {
        let mut recent = RecentIds::new(5);
        recent.insert(b"k", RequestId(1), 11, true);
        recent.insert(b"k", RequestId(2), 9, true);
        recent.insert(b"k", RequestId(3), 12, true);
        assert_eq!(recent.find(b"k", RequestId(2)), Some(9));
        recent.insert(b"k", RequestId(4), 15, true);
        assert_eq!(recent.find(b"k", RequestId(2)), None, "15 is 6 past 9");
        assert_eq!(recent.find(b"k", RequestId(1)), Some(11));
        recent.insert(b"k", RequestId(5), 3, true);
        assert_eq!(
            recent.find(b"k", RequestId(5)),
            None,
            "older than the window"
        );
        recent.insert(b"k", RequestId(6), 13, true);
        assert_eq!(recent.find(b"k", RequestId(6)), Some(13));
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
        // Forgetting the first offset again leaves the new one.
        recent.forget(10);
        assert_eq!(recent.find(b"k", RequestId(1)), Some(13));
        // So does the span's end, and a forget in the span before.
        recent.insert(b"k", RequestId(3), 110, true);
        assert_eq!(recent.find(b"k", RequestId(1)), Some(13));
        recent.forget(11);
        assert_eq!(recent.find(b"k", RequestId(2)), None);
        assert_eq!(recent.find(b"k", RequestId(1)), Some(13));
        assert_eq!(recent.find(b"k", RequestId(3)), Some(110));
    }

    #[test]
    fn many_keys_long_and_short_are_told_apart() {
        let window = 20_000;
        let mut recent = RecentIds::new(window);
        let key = |i: u64| -> Vec<u8> {
            let mut key = format!("user-{}", i % 5_000).into_bytes();
            if i.is_multiple_of(2) {
                key.extend_from_slice(&[b'x'; 40]); // past the inline length
            }
            key
        };
        for offset in 0..50_000u64 {
            recent.insert(
                &key(offset),
                RequestId(u128::from(offset / 5_000)),
                offset,
                true,
            );
        }
        for offset in 50_000 - window..50_000 {
            let id = RequestId(u128::from(offset / 5_000));
            assert_eq!(recent.find(&key(offset), id), Some(offset));
            assert_eq!(
                recent.find(
                    &key(offset + 1),
                    RequestId(u128::from(offset / 5_000 + 100))
                ),
                None
            );
        }
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

    /// A plain model of the documented two-generation rules, compared op by op.
    #[derive(Default)]
    struct Model {
        window: u64,
        span: u64,
        started: bool,
        // (key, id, offset, settled, forgotten, span)
        entries: Vec<(Vec<u8>, u128, u64, bool, bool, u64)>,
    }
    impl Model {
        fn live(&self) -> impl Iterator<Item = &(Vec<u8>, u128, u64, bool, bool, u64)> {
            let span = self.span;
            self.entries
                .iter()
                .filter(move |e| e.5 == span || e.5 + 1 == span)
        }
        fn find(&self, key: &[u8], id: u128) -> Option<(u64, bool)> {
            // current generation first, then previous; first inserted wins within one
            let cur = self
                .live()
                .filter(|e| e.5 == self.span)
                .find(|e| !e.4 && e.0 == key && e.1 == id);
            let prev = self
                .live()
                .filter(|e| e.5 != self.span)
                .find(|e| !e.4 && e.0 == key && e.1 == id);
            cur.or(prev).map(|e| (e.2, e.3))
        }
        fn insert(&mut self, key: &[u8], id: u128, offset: u64, settled: bool) {
            if self.window == 0 {
                return;
            }
            let span = offset / self.window;
            if span > self.span {
                self.span = span;
            } else if span + 1 < self.span {
                return;
            }
            let _ = self.started;
            let s = self.span;
            self.entries.retain(|e| e.5 == s || e.5 + 1 == s);
            if self.find(key, id).is_some() {
                return;
            }
            self.entries
                .push((key.to_vec(), id, offset, settled, false, span));
        }
        fn forget(&mut self, offset: u64) {
            if self.window == 0 {
                return;
            }
            let span = offset / self.window;
            if !(span == self.span || span + 1 == self.span) {
                return;
            }
            if let Some(e) = self
                .entries
                .iter_mut()
                .rev()
                .find(|e| e.5 == span && e.2 == offset && !e.4)
            {
                e.4 = true;
            }
        }
    }

    /// One of 40 keys (a third of them too long to be kept inline) and one of 60 ids,
    /// drawn from `next`.
    fn key_and_id(next: &mut impl FnMut() -> u64) -> (Vec<u8>, u128) {
        let k = next() % 40;
        let key = if k.is_multiple_of(3) {
            vec![k as u8; 45]
        } else {
            vec![k as u8]
        };
        let id = u128::from(next() % 30) << (if next().is_multiple_of(2) { 64 } else { 0 });
        (key, id)
    }

    #[test]
    fn the_set_agrees_with_a_model_of_its_rules() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for &window in &[1u64, 2, 3, 7, 64, 100, 1000] {
            let mut recent = RecentIds::new(window);
            let mut model = Model {
                window,
                ..Model::default()
            };
            let mut offset = 0u64;
            for _ in 0..30_000 {
                let r = next();
                match r % 10 {
                    0..=5 => {
                        // mostly ascending, sometimes back a bit (stripes), sometimes a jump
                        offset += 1 + (next() % 3);
                        if next() % 50 == 0 {
                            offset += window * (next() % 4);
                        }
                        let at = if next() % 8 == 0 {
                            offset.saturating_sub(next() % (2 * window + 2))
                        } else {
                            offset
                        };
                        let (key, id) = key_and_id(&mut next);
                        let settled = next() % 2 == 0;
                        recent.insert(&key, RequestId(id), at, settled);
                        model.insert(&key, id, at, settled);
                    }
                    6 => {
                        let at = offset.saturating_sub(next() % (2 * window + 2));
                        recent.forget(at);
                        model.forget(at);
                    }
                    _ => {
                        let (key, id) = key_and_id(&mut next);
                        assert_eq!(
                            recent.find_settled(&key, RequestId(id)),
                            model.find(&key, id),
                            "window {window} key {key:?} id {id} at {offset}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_huge_window_keeps_every_id_within_it() {
        let mut recent = RecentIds::new(u64::MAX);
        recent.insert(b"k", RequestId(1), 0, true);
        recent.insert(b"k", RequestId(2), 1 << 41, true);
        recent.insert(b"k", RequestId(3), u64::MAX - 1, true);
        assert_eq!(recent.find(b"k", RequestId(1)), Some(0));
        assert_eq!(recent.find(b"k", RequestId(3)), Some(u64::MAX - 1));
    }

    #[test]
    fn forget_finds_entries_logged_out_of_order() {
        let mut recent = RecentIds::new(1_000);
        // Stripes reach the set out of offset order, by up to 5.
        for base in (0..900u64).step_by(10) {
            for offset in [base + 5, base + 1, base + 9, base, base + 3] {
                recent.insert(&offset.to_le_bytes(), RequestId(1), offset, true);
            }
        }
        for base in (0..900u64).step_by(10) {
            for offset in [base, base + 3, base + 9] {
                recent.forget(offset);
                assert_eq!(
                    recent.find(&offset.to_le_bytes(), RequestId(1)),
                    None,
                    "{offset}"
                );
            }
            for offset in [base + 1, base + 5] {
                assert_eq!(
                    recent.find(&offset.to_le_bytes(), RequestId(1)),
                    Some(offset)
                );
            }
        }
    }

    #[test]
    fn keys_with_the_same_tag_and_slot_are_told_apart() {
        let mut recent = RecentIds::new(1 << 20);
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0u64..)
            .find_map(|i| {
                let h = recent.hash(&i.to_le_bytes(), RequestId(1));
                seen.insert((Generation::tag(h), h & 63), i).map(|j| (j, i))
            })
            .unwrap();
        recent.insert(&a.to_le_bytes(), RequestId(1), 1, true);
        assert_eq!(recent.find(&b.to_le_bytes(), RequestId(1)), None);
        assert_eq!(recent.find(&a.to_le_bytes(), RequestId(1)), Some(1));
    }
}
