//! [`MemoryStore`]: a [`Store`] held in memory, for tests, caches and as the model that
//! other stores are checked against.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use super::tail::Tail;
use super::{
    CompactOptions, Compaction, DEFAULT_MAX_RECORD_BYTES, RecordIter, Snapshot, Store, check_name,
    check_not_past_end, check_read_range, check_record_sizes,
};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record, Timestamp};

/// A [`Store`] in memory: every operation is immediate and "durable" for the life of
/// the value. Cloning gives another handle to the same store.
///
/// # Following the tail
/// A follower reads each record right after it is appended, so what an append and a read
/// share decides how closely it keeps up. They share the committed end and the start
/// (atomics) and, briefly, one lock, and nothing else:
///
/// - A reader that has caught up learns it from the committed end, without the lock. An
///   append moves the end before it lets go of the lock, so every record a reader finds
///   under the lock is below the end: none is returned before `next_offset()` covers it.
/// - Otherwise it copies a batch of records (up to 256 records or 32 KiB) into a buffer
///   of its own under the read lock, and hands them out as [`Bytes`] slices of that
///   buffer. The reference counts it then touches are its own: sharing the stored bytes
///   instead would allocate a shared header per key and payload and bounce their counts
///   between threads, which costs more than copying a small record. Once the records
///   handed out are dropped, the next batch reuses the buffer; a record kept longer
///   keeps its batch's buffer alive (copy its bytes to keep a few records for long).
///   Records over 1 KiB are shared, not copied.
/// - Finding where to read is one index computation while offsets are dense (until a
///   compaction leaves gaps), not a search.
/// - Each record is checked against the start as it is returned: once
///   [`truncate_before`](Store::truncate_before) has returned, a reader that copied
///   records before it returns [`Error::OffsetOutOfRange`] instead of one it dropped.
///
/// # Record limit
/// A record over [`DEFAULT_MAX_RECORD_BYTES`] (8 MiB, counted as
/// [`record_size`](super::record_size) counts it, as a [`LogStore`](super::LogStore)
/// does) is refused with [`Error::RecordTooLarge`], and nothing of its batch is appended;
/// [`with_max_record_bytes`](MemoryStore::with_max_record_bytes) sets another limit.
///
/// ```
/// use cauce::store::{MemoryStore, Store};
/// use cauce::Entry;
///
/// let store = MemoryStore::new();
/// let mut follower = store.read_from(0)?;
/// assert!(follower.next().is_none()); // caught up: nothing is committed yet
/// store.append(&[Entry::new(b"k", b"v1")])?;
/// assert_eq!(follower.next().unwrap()?.payload, "v1"); // appended since
/// # Ok::<(), cauce::Error>(())
/// ```
///
/// Compaction keeps the latest record of each key:
///
/// ```
/// use cauce::store::{MemoryStore, Store};
/// use cauce::Entry;
///
/// let store = MemoryStore::new();
/// store.append(&[Entry::new(b"k", b"v1"), Entry::new(b"k", b"v2")]).unwrap();
/// store.compact().unwrap();
/// let left: Vec<_> = store.read_from(0).unwrap().map(|r| r.unwrap().offset).collect();
/// assert_eq!(left, [1]);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    data: RwLock<Data>,
    tail: Tail,
    /// The first offset held. Written under the write lock; read without it by readers,
    /// for every record they return (they may hold records taken before a truncation).
    start: AtomicU64,
    /// The largest record accepted, as [`record_size`](super::record_size) counts it.
    max_record_bytes: usize,
}

#[derive(Debug, Default)]
struct Data {
    /// Held records in offset order (compaction may leave gaps in offsets).
    records: VecDeque<Record>,
    next: Offset,
    cursors: HashMap<String, Offset>,
    snapshots: HashMap<String, Snapshot>,
}

impl Data {
    /// Index in `records` of the first record with offset `>= offset`.
    fn index_of(&self, offset: Offset) -> usize {
        // Offsets are dense until a compaction: try where `offset` is if they are.
        if let Some(first) = self.records.front() {
            let dense = usize::try_from(offset.saturating_sub(first.offset)).unwrap_or(usize::MAX);
            if self.records.get(dense).is_some_and(|r| r.offset == offset) {
                return dense;
            }
        }
        self.records.partition_point(|r| r.offset < offset)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store that accepts records up to [`DEFAULT_MAX_RECORD_BYTES`].
    pub fn new() -> Self {
        MemoryStore::with_max_record_bytes(DEFAULT_MAX_RECORD_BYTES)
    }

    /// An empty store that accepts records up to `bytes`, key, payload and 20 bytes of
    /// framing included (see [`record_size`](super::record_size)); a batch with a larger
    /// record is refused whole with [`Error::RecordTooLarge`]. Below 20, every record is
    /// refused.
    ///
    /// ```
    /// use cauce::store::{MemoryStore, Store};
    /// use cauce::{Entry, Error};
    ///
    /// let store = MemoryStore::with_max_record_bytes(64);
    /// let big = [0u8; 64];
    /// let refused = store.append(&[Entry::new(b"k", b"fits"), Entry::new(b"k", &big)]);
    /// assert!(matches!(refused, Err(Error::RecordTooLarge { index: 1, size: 85, limit: 64 })));
    /// assert_eq!(store.next_offset(), 0); // nothing of the batch was appended
    /// ```
    pub fn with_max_record_bytes(bytes: usize) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                data: RwLock::new(Data::default()),
                tail: Tail::default(),
                start: AtomicU64::new(0),
                max_record_bytes: bytes,
            }),
        }
    }

    /// How many records the store holds.
    pub fn len(&self) -> usize {
        self.shared.data.read().records.len()
    }

    /// True when the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most records a reader takes under one hold of the lock.
const READ_RECORDS: usize = 256;

/// The most bytes a reader copies under one hold of the lock (a batch takes at least one
/// record), so an appender never waits long for a reader.
const READ_BYTES: usize = 32 << 10;

/// Records whose key and payload together are at most this many bytes are copied into
/// the reader's buffer; larger ones are shared with the store (no copy).
const COPY_LIMIT: usize = 1 << 10;

/// A record a reader took and has not returned yet.
enum Taken {
    /// Copied into the reader's buffer, at `span`.
    Copied {
        offset: Offset,
        timestamp: Timestamp,
        span: Span,
    },
    /// Larger than [`COPY_LIMIT`]: the stored record itself.
    Shared(Record),
}

impl Taken {
    fn offset(&self) -> Offset {
        match self {
            Taken::Copied { offset, .. } | Taken::Shared(Record { offset, .. }) => *offset,
        }
    }
}

/// Where a copied record is in the reader's buffer: its key at `at`, its payload right
/// after.
#[derive(Clone, Copy)]
struct Span {
    at: usize,
    key_len: usize,
    payload_len: usize,
}

impl Span {
    fn key(self) -> Range<usize> {
        self.at..self.at + self.key_len
    }

    fn payload(self) -> Range<usize> {
        self.at + self.key_len..self.at + self.key_len + self.payload_len
    }
}

struct Reader {
    shared: Arc<Shared>,
    /// The offset after the last record taken.
    position: Offset,
    /// The bytes of the records copied by the last batch.
    buffer: Bytes,
    /// The records of the last batch not yet returned, in order.
    taken: VecDeque<Taken>,
    failed: bool,
}

impl Reader {
    fn new(shared: Arc<Shared>, from: Offset) -> Reader {
        Reader {
            shared,
            position: from,
            buffer: Bytes::new(),
            taken: VecDeque::new(),
            failed: false,
        }
    }

    /// Takes the next batch of committed records into `taken` (and `buffer`); false when
    /// there is none yet.
    fn take_batch(&mut self) -> Result<bool> {
        // Caught up: the committed end says so without the lock.
        if self.position >= self.shared.tail.get() {
            return Ok(false);
        }
        let data = self.shared.data.read();
        let start = self.shared.start.load(Ordering::Acquire);
        if self.position < start {
            return Err(Error::OffsetOutOfRange {
                requested: self.position,
                start,
                end: data.next,
            });
        }
        let batch = data.records.range(data.index_of(self.position)..);
        let (mut count, mut copy_bytes) = (0, 0);
        for r in batch.clone().take(READ_RECORDS) {
            let len = if is_copied(r) {
                r.key.len() + r.payload.len()
            } else {
                0
            };
            if count > 0 && copy_bytes + len > READ_BYTES {
                break;
            }
            count += 1;
            copy_bytes += len;
        }
        let mut buffer = reuse(&mut self.buffer, copy_bytes);
        for r in batch.take(count) {
            if !is_copied(r) {
                self.taken.push_back(Taken::Shared(r.clone()));
                continue;
            }
            let span = Span {
                at: buffer.len(),
                key_len: r.key.len(),
                payload_len: r.payload.len(),
            };
            self.taken.push_back(Taken::Copied {
                offset: r.offset,
                timestamp: r.timestamp,
                span,
            });
            buffer.extend_from_slice(&r.key);
            buffer.extend_from_slice(&r.payload);
        }
        drop(data);
        self.buffer = buffer.freeze();
        match self.taken.back() {
            Some(taken) => {
                self.position = taken.offset() + 1;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Refuses a taken record that retention dropped after it was taken: records before
    /// the start are never returned again.
    fn check_held(&self, offset: Offset) -> Result<()> {
        let start = self.shared.start.load(Ordering::Acquire);
        if offset < start {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                start,
                end: self.shared.tail.get(),
            });
        }
        Ok(())
    }

    /// A taken record as an entry: borrowed from the buffer or the shared record.
    fn entry<'a>(&'a self, taken: &'a Taken) -> (Offset, Entry<'a>) {
        match taken {
            Taken::Copied {
                offset,
                timestamp,
                span,
            } => {
                let (key, payload) = (&self.buffer[span.key()], &self.buffer[span.payload()]);
                (*offset, Entry::with_timestamp(*timestamp, key, payload))
            }
            Taken::Shared(record) => (record.offset, record.as_entry()),
        }
    }

    /// A taken record as a [`Record`]: slices of the buffer, or the shared record.
    fn record(&self, taken: Taken) -> Record {
        match taken {
            Taken::Copied {
                offset,
                timestamp,
                span,
            } => Record {
                offset,
                timestamp,
                key: self.buffer.slice(span.key()),
                payload: self.buffer.slice(span.payload()),
            },
            Taken::Shared(record) => record,
        }
    }

    /// Calls `f` with every committed record from the position on, borrowed, up to
    /// `until` (not included); returns the offset after the last one.
    fn replay(&mut self, until: Offset, f: &mut dyn FnMut(Offset, Entry<'_>)) -> Result<Offset> {
        let mut next = self.position;
        while next < until && self.take_batch()? {
            for taken in std::mem::take(&mut self.taken) {
                let (offset, entry) = self.entry(&taken);
                if offset >= until {
                    return Ok(next);
                }
                self.check_held(offset)?;
                f(offset, entry);
                next = offset + 1;
            }
        }
        Ok(next)
    }
}

/// Whether a reader copies `record` (else it shares it).
fn is_copied(record: &Record) -> bool {
    record.key.len() + record.payload.len() <= COPY_LIMIT
}

/// An empty buffer for `bytes` bytes: the last one when no record still holds a slice
/// of it and it is not larger than it need be, else a new one.
fn reuse(last: &mut Bytes, bytes: usize) -> BytesMut {
    match std::mem::take(last).try_into_mut() {
        Ok(mut buffer) if (bytes..=bytes.max(READ_BYTES)).contains(&buffer.capacity()) => {
            buffer.clear();
            buffer
        }
        _ => BytesMut::with_capacity(bytes),
    }
}

impl Iterator for Reader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        if self.taken.is_empty() {
            match self.take_batch() {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        let taken = self.taken.pop_front()?;
        if let Err(e) = self.check_held(taken.offset()) {
            self.failed = true;
            self.taken.clear();
            return Some(Err(e));
        }
        Some(Ok(self.record(taken)))
    }
}

impl MemoryStore {
    /// A reader at `from`, once `from` is checked against the held range.
    fn reader(&self, from: Offset) -> Result<Reader> {
        let data = self.shared.data.read();
        let start = self.shared.start.load(Ordering::Acquire);
        check_read_range(from, start, data.next)?;
        Ok(Reader::new(self.shared.clone(), from))
    }
}

impl Store for MemoryStore {
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        check_record_sizes(batch, self.shared.max_record_bytes)?;
        let mut data = self.shared.data.write();
        let first = data.next;
        for (i, entry) in batch.iter().enumerate() {
            data.records.push_back(entry.to_record(first + i as Offset));
        }
        data.next = first + batch.len() as Offset;
        let next = data.next;
        // Published under the lock: a reader, which takes records under it, then never
        // finds one the end does not cover yet. Its waiters are woken after it.
        let waiting = self.shared.tail.advance(next);
        drop(data);
        if waiting {
            self.shared.tail.wake_waiting();
        }
        Ok(first..next)
    }

    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        Ok(Box::new(self.reader(from)?))
    }

    /// Lends each record from the reader's buffer: nothing is reference-counted per
    /// record. (`replay_from` is this to the end.)
    fn replay_range(
        &self,
        from: Offset,
        until: Offset,
        f: &mut dyn FnMut(Offset, Entry<'_>),
    ) -> Result<Offset> {
        self.reader(from)?.replay(until, f)
    }

    fn start_offset(&self) -> Offset {
        self.shared.start.load(Ordering::Acquire)
    }

    fn next_offset(&self) -> Offset {
        self.shared.tail.get()
    }

    fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
        self.shared.tail.wait_for(offset, timeout)
    }

    fn poll_committed(&self, offset: Offset, cx: &mut std::task::Context<'_>) -> Poll<Offset> {
        self.shared.tail.poll_wait(offset, cx)
    }

    fn wake_waiters(&self) {
        self.shared.tail.wake();
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn truncate_before(&self, offset: Offset) -> Result<()> {
        let mut data = self.shared.data.write();
        let start = self.shared.start.load(Ordering::Acquire);
        if offset > data.next {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                start,
                end: data.next,
            });
        }
        if offset > start {
            let drop_count = data.index_of(offset);
            data.records.drain(..drop_count);
            // Readers holding records taken before now check each against it.
            self.shared.start.store(offset, Ordering::Release);
        }
        Ok(())
    }

    fn compact_with(&self, options: CompactOptions) -> Result<Compaction> {
        let options = options.resolved();
        let mut data = self.shared.data.write();
        let limit = options.limit(data.next);
        let mut latest: HashMap<&[u8], Offset> = HashMap::new();
        for r in data.records.iter().take_while(|r| r.offset < limit) {
            latest.insert(&r.key, r.offset);
        }
        let keep: Vec<bool> = data
            .records
            .iter()
            .map(|r| options.keeps(r, limit, latest.get(&r.key[..]).copied()))
            .collect();
        drop(latest);
        let before = data.records.len() as u64;
        let mut flags = keep.into_iter();
        data.records.retain(|_| flags.next().unwrap_or(true));
        let kept = data.records.iter().filter(|r| r.offset < limit).count() as u64;
        Ok(Compaction {
            until: limit,
            kept,
            dropped: before - data.records.len() as u64,
        })
    }

    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
        check_name(name)?;
        check_not_past_end(offset, self.start_offset(), self.next_offset())?;
        self.shared
            .data
            .write()
            .cursors
            .insert(name.to_string(), offset);
        Ok(())
    }

    fn cursor(&self, name: &str) -> Result<Option<Offset>> {
        check_name(name)?;
        Ok(self.shared.data.read().cursors.get(name).copied())
    }

    fn save_snapshot(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()> {
        check_name(name)?;
        check_not_past_end(offset, self.start_offset(), self.next_offset())?;
        let mut data = self.shared.data.write();
        let newer = data.snapshots.get(name).is_none_or(|s| s.offset <= offset);
        if newer {
            let snapshot = Snapshot {
                offset,
                blob: Bytes::copy_from_slice(blob),
            };
            data.snapshots.insert(name.to_string(), snapshot);
        }
        Ok(())
    }

    fn latest_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        check_name(name)?;
        Ok(self.shared.data.read().snapshots.get(name).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{self, Fixture};

    struct Memory;

    impl Fixture for Memory {
        type Store = MemoryStore;
        fn create(&mut self) -> MemoryStore {
            MemoryStore::new()
        }
        fn reopen(&mut self, store: MemoryStore) -> MemoryStore {
            store
        }
    }

    #[test]
    fn memory_store_conforms() {
        conformance::run_all(&mut Memory);
    }

    /// A store that writes only what it must: `replay_from`, `replay_range` and the
    /// other defaults of the trait are what it runs.
    struct Minimal(MemoryStore);

    impl Store for Minimal {
        fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
            self.0.append(batch)
        }
        fn read_from(&self, from: Offset) -> Result<RecordIter> {
            self.0.read_from(from)
        }
        fn start_offset(&self) -> Offset {
            self.0.start_offset()
        }
        fn next_offset(&self) -> Offset {
            self.0.next_offset()
        }
        fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
            self.0.wait_for(offset, timeout)
        }
        fn wake_waiters(&self) {
            self.0.wake_waiters()
        }
        fn sync(&self) -> Result<()> {
            self.0.sync()
        }
        fn truncate_before(&self, offset: Offset) -> Result<()> {
            self.0.truncate_before(offset)
        }
        fn compact_with(&self, options: CompactOptions) -> Result<Compaction> {
            self.0.compact_with(options)
        }
        fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
            self.0.commit_cursor(name, offset)
        }
        fn cursor(&self, name: &str) -> Result<Option<Offset>> {
            self.0.cursor(name)
        }
        fn save_snapshot(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()> {
            self.0.save_snapshot(name, offset, blob)
        }
        fn latest_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
            self.0.latest_snapshot(name)
        }
    }

    struct MinimalFixture;

    impl Fixture for MinimalFixture {
        type Store = Minimal;
        fn create(&mut self) -> Minimal {
            Minimal(MemoryStore::new())
        }
        fn reopen(&mut self, store: Minimal) -> Minimal {
            store
        }
    }

    #[test]
    fn the_store_traits_defaults_conform() {
        conformance::run_all(&mut MinimalFixture);
    }

    /// Record `i`: a payload of a length that crosses the copy limit and, now and then,
    /// the batch byte limit, with bytes that depend on `i`.
    fn numbered(i: u64) -> (Vec<u8>, Vec<u8>) {
        let len = match i % 7 {
            0 => 0,
            1 => COPY_LIMIT,
            2 => COPY_LIMIT + 1,
            3 if i.is_multiple_of(5) => READ_BYTES + 3,
            _ => (i % 300) as usize,
        };
        let payload = (0..len).map(|b| (b as u64 * 31 + i) as u8).collect();
        (i.to_be_bytes().to_vec(), payload)
    }

    fn append_numbered(store: &MemoryStore, range: Range<u64>) {
        let records: Vec<_> = range.map(numbered).collect();
        let batch: Vec<_> = records
            .iter()
            .map(|(k, p)| Entry::with_timestamp(7, k, p))
            .collect();
        store.append(&batch).expect("append");
    }

    fn assert_numbered(record: &Record) {
        let (key, payload) = numbered(record.offset);
        assert_eq!(record.key, key, "key of {}", record.offset);
        assert_eq!(record.payload, payload, "payload of {}", record.offset);
    }

    #[test]
    fn records_keep_their_bytes_while_the_reader_reads_on() {
        let store = MemoryStore::new();
        let mut held = Vec::new();
        let mut follower = store.read_from(0).expect("read_from");
        let mut dropping = store.read_from(0).expect("read_from");
        for round in 0..40 {
            append_numbered(&store, round * 50..(round + 1) * 50);
            // One follower keeps every record (its buffers must not be reused), the
            // other drops each at once (its buffer is reused batch after batch).
            held.extend(follower.by_ref().map(|r| r.expect("record")));
            for r in dropping.by_ref() {
                assert_numbered(&r.expect("record"));
            }
        }
        assert_eq!(held.len(), 2000);
        for (i, r) in held.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_numbered(r);
        }
    }

    #[test]
    fn reads_after_compaction_start_at_the_next_held_record() {
        let store = MemoryStore::new();
        let keys: Vec<[u8; 1]> = (0..200u8)
            .map(|i| [i % 3 + u8::from(i % 10 == 0) * 9])
            .collect();
        let batch: Vec<_> = keys
            .iter()
            .map(|k| Entry::with_timestamp(1, k, k))
            .collect();
        store.append(&batch).expect("append");
        store.truncate_before(5).expect("truncate");
        store.compact().expect("compact");
        let held: Vec<Offset> = store
            .read_from(5)
            .expect("read")
            .map(|r| r.expect("r").offset)
            .collect();
        assert!(held.len() < 195, "compaction left gaps");
        for from in 5..=200 {
            let expected: Vec<Offset> = held.iter().copied().filter(|&o| o >= from).collect();
            let read: Vec<Offset> = store
                .read_from(from)
                .expect("read")
                .map(|r| r.expect("r").offset)
                .collect();
            assert_eq!(read, expected, "read from {from}");
            let mut replayed = Vec::new();
            let next = store
                .replay_from(from, &mut |o, _| replayed.push(o))
                .expect("replay");
            assert_eq!(replayed, expected, "replay from {from}");
            assert_eq!(next, expected.last().map_or(from, |o| o + 1));
        }
    }
}
