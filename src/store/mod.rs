//! Stores: append-only logs of records, the ground everything else stands on.
//!
//! A [`Store`] keeps records in the order they were appended and gives each one an
//! [`Offset`]. Everything cauce knows is a fold over such a log: a handler's state is
//! the fold of its requests, a consumer's position is a named cursor in it, and a
//! snapshot is a shortcut through the fold that names the offset it was taken at. So a
//! store must never lose what it acknowledged, never return bytes other than those that
//! were written, and say exactly where it found damage.
//!
//! Two implementations come with the crate: [`MemoryStore`] (tests, caches, models) and
//! [`LogStore`] (segmented files on disk with group commit, the embedded default).
//! [`conformance`] holds the test suite that checks any implementation against the
//! contract written on [`Store`].
//!
//! ```
//! use cauce::store::{MemoryStore, Store};
//! use cauce::Entry;
//!
//! let store = MemoryStore::new();
//! let offsets = store
//!     .append(&[Entry::new(b"alice", b"hello"), Entry::new(b"bob", b"hi")])
//!     .unwrap();
//! assert_eq!(offsets, 0..2);
//! let keys: Vec<_> = store
//!     .read_from(0)
//!     .unwrap()
//!     .map(|r| r.unwrap().key)
//!     .collect();
//! assert_eq!(keys, [&b"alice"[..], &b"bob"[..]]);
//! store.commit_cursor("mailer", 2).unwrap();
//! assert_eq!(store.cursor("mailer").unwrap(), Some(2));
//! ```

use std::ops::Range;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record, Timestamp};

pub mod conformance;
pub mod log;
mod memory;
mod tail;

pub use log::{LogOptions, LogStats, LogStore, LogVerification, SyncPolicy};
pub use memory::MemoryStore;

/// An iterator over stored records, as returned by [`Store::read_from`].
///
/// It yields records in offset order. When it has returned every committed record it
/// yields `None`; it is not fused: calling `next` again later yields the records
/// committed since. An `Err` item means the store found damage or could not read; the
/// iterator yields nothing after it.
pub type RecordIter = Box<dyn Iterator<Item = Result<Record>> + Send>;

/// A snapshot: an opaque blob that stands for the fold of every record before `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The records before this offset are folded into the blob.
    pub offset: Offset,
    /// The snapshot's bytes, exactly as saved.
    pub blob: Bytes,
}

/// What [`Store::compact`] (or [`Store::compact_with`]) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Records before this offset are compacted (only the latest per key remains).
    pub until: Offset,
    /// Records kept, of those from the start up to `until`.
    pub kept: u64,
    /// Records dropped because a later record has the same key, or because they were
    /// expired [tombstones](CompactOptions::tombstones).
    pub dropped: u64,
}

/// How [`Store::compact_with`] compacts. The default ([`CompactOptions::new`]) is
/// [`Store::compact`]'s: every committed record that has a later record of its key goes.
///
/// ```
/// use cauce::store::{CompactOptions, MemoryStore, Store};
/// use cauce::Entry;
///
/// let store = MemoryStore::new();
/// store.append(&[
///     Entry::with_timestamp(1_000, b"alice", b"v1"),
///     Entry::with_timestamp(2_000, b"bob", b"v1"),
///     Entry::with_timestamp(3_000, b"alice", b""), // alice deleted
///     Entry::with_timestamp(4_000, b"bob", b"v2"),
/// ])?;
/// // A consumer's cursor stands at 3: what it has not read yet stays as it is.
/// let options = CompactOptions::new().before(3).tombstones(10_000);
/// let done = store.compact_with(options)?;
/// assert_eq!((done.until, done.kept, done.dropped), (3, 1, 2));
/// let left: Vec<_> = store.read_from(0)?.map(|r| r.map(|r| r.offset)).collect::<Result<_, _>>()?;
/// assert_eq!(left, [1, 3]); // bob's v1 (v2 is past `before`), and bob's v2
/// # Ok::<(), cauce::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactOptions {
    before: Option<Offset>,
    tombstones: Option<Tombstones>,
}

/// When tombstones expire: before a time, or once older than a duration at each
/// compaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tombstones {
    Before(Timestamp),
    KeptFor(Duration),
}

impl CompactOptions {
    /// The default: every committed record is compacted, and an empty payload is a
    /// value like any other.
    pub fn new() -> Self {
        CompactOptions::default()
    }

    /// Compacts only the records before `offset` (Kafka's `min.compaction.lag`, by
    /// offset): the ones at or after it stay as they are and do not count as later
    /// records of their keys, so a consumer whose cursor stands at `offset` still reads
    /// every record past it. An offset past the end compacts everything. An offset, not
    /// a time (both are `u64`): to spare the last hour's records, pass
    /// [`Store::offset_for_timestamp`] of an hour ago (the end if `None`).
    pub fn before(mut self, offset: Offset) -> Self {
        self.before = Some(offset);
        self
    }

    /// Treats a record with an empty payload as a tombstone, which deletes its key: once
    /// it is the latest record of its key, the records before it go, as any older
    /// record does; the tombstone itself goes too if its timestamp is before
    /// `expired_before` (Kafka's `delete.retention.ms`: a consumer has had until then
    /// to see the delete; [`tombstones_kept_for`](Self::tombstones_kept_for) takes it
    /// as a duration). Without this, an empty payload is a value, and the key keeps its
    /// latest record forever.
    pub fn tombstones(mut self, expired_before: Timestamp) -> Self {
        self.tombstones = Some(Tombstones::Before(expired_before));
        self
    }

    /// [`tombstones`](Self::tombstones) expiring those stamped more than `kept_for`
    /// before the compaction: each compaction reads the clock as it starts, so options
    /// built once serve a compaction run every hour. A tombstone is kept at least that
    /// long after its timestamp (Kafka's `delete.retention.ms` counts from when its
    /// cleaner first compacted the tombstone's segment instead).
    ///
    /// ```
    /// use std::time::Duration;
    /// use cauce::store::{CompactOptions, MemoryStore, Store};
    /// use cauce::Entry;
    ///
    /// let hour_ago = cauce::record::now() - 3_600_000;
    /// let store = MemoryStore::new();
    /// store.append(&[
    ///     Entry::with_timestamp(hour_ago, b"alice", b"v1"),
    ///     Entry::with_timestamp(hour_ago, b"alice", b""), // deleted an hour ago
    /// ])?;
    /// let day = CompactOptions::new().tombstones_kept_for(Duration::from_secs(86_400));
    /// assert_eq!(store.compact_with(day)?.kept, 1); // the tombstone stays, for a day
    /// let minute = CompactOptions::new().tombstones_kept_for(Duration::from_secs(60));
    /// assert_eq!(store.compact_with(minute)?.kept, 0); // now alice is gone
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn tombstones_kept_for(mut self, kept_for: Duration) -> Self {
        self.tombstones = Some(Tombstones::KeptFor(kept_for));
        self
    }

    /// The offset set by [`before`](Self::before), if any.
    pub fn before_offset(&self) -> Option<Offset> {
        self.before
    }

    /// Before what time tombstones expire, if they are tombstones at all: the time set
    /// by [`tombstones`](Self::tombstones), or now less the duration set by
    /// [`tombstones_kept_for`](Self::tombstones_kept_for) (the clock read by this call).
    /// A `Store` of one's own calls it once as its compaction starts.
    pub fn tombstones_expired_before(&self) -> Option<Timestamp> {
        self.tombstones.map(|t| match t {
            Tombstones::Before(at) => at,
            Tombstones::KeptFor(kept_for) => {
                crate::record::now().saturating_sub(crate::record::millis(kept_for))
            }
        })
    }

    /// These options with the expiry of tombstones fixed at its time now: what one
    /// compaction applies throughout.
    pub(crate) fn resolved(self) -> Self {
        CompactOptions {
            before: self.before,
            tombstones: self.tombstones_expired_before().map(Tombstones::Before),
        }
    }

    /// Whether a compaction up to `limit` keeps `record`, `latest` being the offset of
    /// the latest record of its key before `limit` (the store's rule, in one place):
    /// records past the limit and records with an empty key stay; others stay if they
    /// are the latest of their key, unless that is an expired tombstone. On
    /// [`resolved`](Self::resolved) options (a duration is read here as no expiry).
    pub(crate) fn keeps(&self, record: &Record, limit: Offset, latest: Option<Offset>) -> bool {
        let expiry = match self.tombstones {
            Some(Tombstones::Before(at)) => Some(at),
            Some(Tombstones::KeptFor(_)) => Some(0),
            None => None,
        };
        let expired_tombstone =
            record.payload.is_empty() && expiry.is_some_and(|t| record.timestamp < t);
        record.offset >= limit
            || record.key.is_empty()
            || (latest == Some(record.offset) && !expired_tombstone)
    }

    /// The end of what a compaction of a store whose committed records end at `end`
    /// compacts.
    pub(crate) fn limit(&self, end: Offset) -> Offset {
        self.before.map_or(end, |b| b.min(end))
    }
}

/// What [`Store::append_deferred`] appended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deferred {
    /// The offsets the batch was given.
    pub offsets: Range<Offset>,
    /// Whether the records are not yet as durable as [`Store::append`] leaves them:
    /// [`Store::wait_appended`] with `offsets.end` waits for that.
    pub pending: bool,
}

/// An append-only log of records.
///
/// # Contract
/// - `append` gives a batch consecutive offsets, starting at `next_offset()`, and returns
///   them. A batch is atomic: after a crash it is either all there or not at all. An
///   append that returned `Ok` is durable as the implementation's sync policy promises.
/// - A reader sees only committed records: a record is visible once the append that wrote
///   it has returned, never before, and never a part of one.
/// - `read_from(o)` yields every held record with an offset `>= o`, in order, with its
///   bytes exactly as appended. Reading from `next_offset()` is valid and yields nothing
///   yet. Reading before `start_offset()` or after `next_offset()` is
///   [`Error::OffsetOutOfRange`].
/// - `truncate_before(o)` (retention) sets `start_offset()` to `o` if that is higher;
///   records before it are never returned again. `o > next_offset()` is
///   [`Error::OffsetOutOfRange`].
/// - `compact()` drops every committed record that has a later record with the same key
///   (records with an empty key are kept); offsets of the kept records do not change.
///   `compact_with` does the same up to [`CompactOptions::before`], and with
///   [`CompactOptions::tombstones`] drops the keys whose latest record has an empty
///   payload (that record too once it expired).
/// - Named cursors and snapshots are durable once their call returns, and so is every
///   record before their offset, whatever the sync policy: a crash never keeps a cursor
///   or a snapshot but loses records it stands after. An offset past `next_offset()` is
///   [`Error::OffsetOutOfRange`] (there are no records there to stand after). Any offset
///   up to there is accepted: a cursor can move back (a consumer that rewinds to read
///   again, as with a Kafka offset commit), and can stand below `start_offset()` (a
///   read from it then is `OffsetOutOfRange`, and the consumer chooses where to go on).
///   Names are 1 to 128 characters from `[A-Za-z0-9._-]`, not starting with a dot;
///   others are [`Error::InvalidName`].
/// - A record larger than the store's limit ([`DEFAULT_MAX_RECORD_BYTES`] unless the
///   store is configured otherwise, counted as [`record_size`] counts it) is
///   [`Error::RecordTooLarge`], naming its index in the batch; nothing of that batch is
///   appended.
/// - Bad input or damaged storage is an error, never a panic.
pub trait Store: Send + Sync + 'static {
    /// Appends `batch` in order and returns the offsets it was given.
    ///
    /// An empty batch appends nothing and returns an empty range at `next_offset()`.
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>>;

    /// Reads committed records with offsets `>= from`, in order.
    fn read_from(&self, from: Offset) -> Result<RecordIter>;

    /// Calls `f` with every committed record from `from` on, in order, its key and
    /// payload borrowed: the fastest way to fold a log, since nothing needs to be copied or
    /// reference-counted per record. Returns the offset after the last record replayed
    /// (where to resume). Errors as [`read_from`](Store::read_from) reports them, after
    /// the records before the damage were replayed.
    ///
    /// The default is [`replay_range`](Store::replay_range) to the end: a store that can
    /// lend its buffers overrides that one, and this follows.
    fn replay_from(&self, from: Offset, f: &mut dyn FnMut(Offset, Entry<'_>)) -> Result<Offset> {
        self.replay_range(from, Offset::MAX, f)
    }

    /// [`replay_from`](Store::replay_from), stopping before `until`: calls `f` with the
    /// committed records whose offsets are in `from..until`, and reads no further than it
    /// must to find them (a fold up to an offset in the middle of a long log does not
    /// read the rest). Returns the offset after the last record replayed (`from` if
    /// none). `from` out of range is an error as for `read_from`, whatever `until`.
    ///
    /// The default goes through `read_from`; stores that can lend their buffers override
    /// it.
    fn replay_range(
        &self,
        from: Offset,
        until: Offset,
        f: &mut dyn FnMut(Offset, Entry<'_>),
    ) -> Result<Offset> {
        let mut next = from;
        if until <= from {
            // Only the range check.
            drop(self.read_from(from)?);
            return Ok(next);
        }
        for record in self.read_from(from)? {
            let record = record?;
            if record.offset >= until {
                break; // past a gap that compaction left
            }
            f(record.offset, record.as_entry());
            next = record.offset + 1;
            if next >= until {
                break;
            }
        }
        Ok(next)
    }

    /// The offset of the first record, from the start on, whose timestamp is at or after
    /// `at` (Kafka's `offsetsForTimes`): where to read from to replay what happened since
    /// a moment. `None` if no record held is that recent. Timestamps need not grow with
    /// offsets: the answer is the lowest offset whose own timestamp qualifies, whatever
    /// the records after it carry.
    ///
    /// The default reads the records from the start until it finds one;
    /// [`LogStore`] skips the sealed segments whose newest timestamp is older.
    ///
    /// ```
    /// use cauce::store::{MemoryStore, Store};
    /// use cauce::Entry;
    ///
    /// let store = MemoryStore::new();
    /// for (at, payload) in [(1_000, "a"), (3_000, "b"), (2_000, "c")] {
    ///     store.append(&[Entry::with_timestamp(at, b"k", payload.as_bytes())])?;
    /// }
    /// assert_eq!(store.offset_for_timestamp(1_500)?, Some(1));
    /// assert_eq!(store.offset_for_timestamp(3_000)?, Some(1));
    /// assert_eq!(store.offset_for_timestamp(3_001)?, None);
    /// # Ok::<(), cauce::Error>(())
    /// ```
    fn offset_for_timestamp(&self, at: Timestamp) -> Result<Option<Offset>> {
        let (_, records) = read_from_start(self)?;
        first_stamped_since(records, self.next_offset(), at)
    }

    /// The first offset still held.
    ///
    /// Retention can move it on at any time: to read from it, use [`read_from_start`],
    /// which opens the reader wherever the log begins when it opens.
    fn start_offset(&self) -> Offset;

    /// The offset the next appended record will get: one past the last committed one.
    fn next_offset(&self) -> Offset;

    /// Blocks until `next_offset() > offset`, the timeout passes (`None`: no timeout), or
    /// [`wake_waiters`](Store::wake_waiters) is called; returns `next_offset()`.
    ///
    /// This is how followers of the tail wait without polling: pass the offset after
    /// the last record the reader gave (not a `next_offset()` read after it ran dry,
    /// which a record appended in between would already have passed, and the wait then
    /// sleeps the whole timeout). A [`LogStream`](crate::stream::LogStream) over the
    /// store follows its tail this way, with a blocking `recv`.
    fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset;

    /// [`wait_for`](Store::wait_for) for async code: `Ready` with `next_offset()` once it
    /// is past `offset`; otherwise the task's waker is registered, and woken when a
    /// record is committed or [`wake_waiters`](Store::wake_waiters) is called (the
    /// caller then checks what it waits for again: a closed stream, say). Never blocks.
    /// [`LogSubscriber::recv_async`](crate::stream::LogSubscriber::recv_async) follows
    /// the tail this way.
    ///
    /// The default wakes the task at once and is `Pending`: the executor polls again
    /// soon, a busy loop that costs a core while nothing comes. The stores of this crate
    /// register the waker instead; a store of one's own should too.
    fn poll_committed(&self, offset: Offset, cx: &mut Context<'_>) -> Poll<Offset> {
        let now = self.next_offset();
        if now > offset {
            return Poll::Ready(now);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Wakes every thread blocked in [`wait_for`](Store::wait_for), and every task
    /// registered by [`poll_committed`](Store::poll_committed).
    fn wake_waiters(&self);

    /// Makes every committed record durable, whatever the sync policy.
    fn sync(&self) -> Result<()>;

    /// Makes every committed record before `offset` durable, whatever the sync policy:
    /// what a caller needs before it acts on those records being there after a crash.
    ///
    /// The default syncs everything ([`sync`](Store::sync)); a store that knows how far
    /// it is durable returns at once when that is far enough.
    fn sync_until(&self, offset: Offset) -> Result<()> {
        let _ = offset;
        self.sync()
    }

    /// Whether [`append`](Store::append) may wait for the disk before it returns (an
    /// fdatasync, as [`LogStore`] does under [`SyncPolicy::Always`], and under
    /// [`SyncPolicy::Every`] for the append that reaches the record count or rolls a
    /// segment). A caller that must
    /// not block, such as a future polled on an async executor's thread, hands such
    /// appends to a thread of its own. The default is `false`: appends return about as
    /// soon as the records are in memory.
    ///
    /// A wrapper around another store forwards this, with
    /// [`append_deferred`](Store::append_deferred) and
    /// [`wait_appended`](Store::wait_appended): left to their defaults, a wrapper of a
    /// [`LogStore`] under `Always` has a cluster's futures append (and wait out the
    /// fdatasync) on the executor's thread, and loses the group commit of one key's
    /// requests. Nothing checks that a wrapper forwards them.
    fn append_waits_for_disk(&self) -> bool {
        false
    }

    /// Appends `batch` as [`append`](Store::append) does, but may return before the wait
    /// for the disk that `append` makes under the store's sync policy. When it does, it
    /// says so ([`Deferred::pending`]), and the records are as durable as `append` would
    /// have left them (and, for a store that shows records only once they are durable,
    /// visible to readers) once [`wait_appended`](Store::wait_appended) has returned `Ok`
    /// for an offset past them.
    ///
    /// This is for callers that append under a lock of their own: they append with this
    /// under the lock, release it, then wait. Appends that would all wait in turn under
    /// that lock, one fdatasync each, then share one (group commit). Until the wait, the
    /// records take their offsets and nothing else may be assumed of them; if nobody
    /// waits, a later append's sync or [`sync`](Store::sync) makes them durable.
    ///
    /// The default is [`append`](Store::append), with nothing pending. A wrapper that
    /// forwards this to another store forwards its answer, `pending` included.
    fn append_deferred(&self, batch: &[Entry<'_>]) -> Result<Deferred> {
        Ok(Deferred {
            offsets: self.append(batch)?,
            pending: false,
        })
    }

    /// Returns once every record before `end` that
    /// [`append_deferred`](Store::append_deferred) took is as durable as
    /// [`append`](Store::append) would have made it, or with the error that keeps it from
    /// being so (the write or fdatasync that failed). Offsets never appended are not
    /// waited for. It answers alike for the same records, whoever asks and when: `Ok` if
    /// and only if they are durable. So a failure is for good for the records it failed
    /// for (a log that could not make a record durable never will, as [`LogStore`]
    /// refuses from then on), while a wait for records durable before it stays `Ok`:
    /// every caller that waits for a record agrees on it. A cluster relies on it: the
    /// submitter and the instance each wait for the same record, and must agree whether
    /// it is to be handled. So a wrapper must not put a timeout or a retry of its own on
    /// this wait (one caller would see the timeout, another the record durable), nor
    /// decide a fault per caller; a wrapper that injects failures fails every wait at
    /// or past a record from then on.
    ///
    /// A store whose wait can be for the disk says so in
    /// [`append_waits_for_disk`](Store::append_waits_for_disk): callers that must not
    /// block (a future's poll) call this only when that is `false`, as they call
    /// `append`. The default returns `Ok(())` at once (the default `append_deferred`
    /// leaves nothing pending).
    fn wait_appended(&self, end: Offset) -> Result<()> {
        let _ = end;
        Ok(())
    }

    /// Drops every record before `offset` (retention); see the contract above.
    fn truncate_before(&self, offset: Offset) -> Result<()>;

    /// Keeps only the latest committed record of each key; see the contract above.
    /// [`compact_with`](Store::compact_with) with the default options.
    fn compact(&self) -> Result<Compaction> {
        self.compact_with(CompactOptions::new())
    }

    /// Compacts as `options` say: the records before
    /// [`before`](CompactOptions::before) that have a later record of their key
    /// before it go, and with [`tombstones`](CompactOptions::tombstones) the keys whose
    /// latest such record has an empty payload. Returns how far it compacted and what
    /// it kept and dropped there.
    fn compact_with(&self, options: CompactOptions) -> Result<Compaction>;

    /// Durably records that the consumer `name` has processed everything before `offset`.
    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()>;

    /// The last committed position of the consumer `name`, if it ever committed one.
    fn cursor(&self, name: &str) -> Result<Option<Offset>>;

    /// Durably saves a snapshot `name` taken at `offset` (the fold of every record before
    /// it). A snapshot with a higher offset supersedes those of the same name below it
    /// (and one saved at the same offset, the one saved before).
    ///
    /// A store keeps only the newest of each name: a [`MemoryStore`] the newest one, a
    /// [`LogStore`] the newest two (the second for when the newest is found damaged).
    /// So a snapshot saved below those it keeps returns `Ok` as superseded, and is
    /// dropped at once: `Ok` says the snapshot, or a newer one, is saved.
    fn save_snapshot(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()>;

    /// The snapshot `name` with the highest offset, if any was saved.
    fn latest_snapshot(&self, name: &str) -> Result<Option<Snapshot>>;
}

/// The offset of the first of `records` stamped at or after `at`, looking no further
/// than `until`.
pub(crate) fn first_stamped_since(
    records: impl Iterator<Item = Result<Record>>,
    until: Offset,
    at: Timestamp,
) -> Result<Option<Offset>> {
    for record in records {
        let record = record?;
        if record.offset >= until {
            break;
        }
        if record.timestamp >= at {
            return Ok(Some(record.offset));
        }
    }
    Ok(None)
}

/// How many times [`read_from_start`] opens a reader before it lets retention win.
const START_ATTEMPTS: usize = 8;

/// Opens a reader at the first record still held, and says where that is: what
/// `store.read_from(store.start_offset())` means, without its race. Retention
/// ([`Store::truncate_before`]) that moves the start between the two calls makes
/// `read_from` refuse the start just read with [`Error::OffsetOutOfRange`], although the
/// caller asked for wherever the log begins; this reads the new start and opens the
/// reader there instead. Retention that overtakes it on every one of a few attempts in a
/// row ends in that error.
///
/// Retention after the reader opened is no longer this function's concern: the reader
/// reports it as `read_from`'s readers do.
///
/// ```
/// use cauce::store::{read_from_start, MemoryStore, Store};
/// use cauce::Entry;
///
/// let store = MemoryStore::new();
/// store.append(&[Entry::new(b"a", b"1"), Entry::new(b"b", b"2")])?;
/// store.truncate_before(1)?;
/// let (start, mut reader) = read_from_start(&store)?;
/// assert_eq!(start, 1);
/// assert_eq!(reader.next().transpose()?.map(|r| r.offset), Some(1));
/// # Ok::<(), cauce::Error>(())
/// ```
pub fn read_from_start<S: Store + ?Sized>(store: &S) -> Result<(Offset, RecordIter)> {
    let mut from = store.start_offset();
    let mut attempts = 1;
    loop {
        match store.read_from(from) {
            Ok(reader) => return Ok((from, reader)),
            // Only "before the start" is retention; past the end is not this race.
            Err(Error::OffsetOutOfRange { start, .. })
                if from < start && attempts < START_ATTEMPTS =>
            {
                from = store.start_offset().max(start);
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The largest record a store accepts unless configured otherwise: 8 MiB, counted as
/// [`record_size`] counts it.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 8 << 20;

/// The bytes a [`LogStore`] segment frames each record with (checked against the
/// segment format at compile time).
pub(crate) const RECORD_FRAMING: usize = 20;

/// The size a record counts as against a store's record limit: its key, its payload and
/// the 20 bytes that frame it in a [`LogStore`] segment. Every store counts the same
/// way, so that a record one store accepts, the others accept too.
///
/// ```
/// use cauce::store::record_size;
/// use cauce::Entry;
///
/// assert_eq!(record_size(&Entry::new(b"key", b"payload")), 3 + 7 + 20);
/// ```
pub fn record_size(entry: &Entry<'_>) -> usize {
    RECORD_FRAMING + entry.key.len() + entry.payload.len()
}

/// Checks every record of `batch` against `limit` (see [`record_size`]), before anything
/// of it is appended; returns the sum of their sizes.
pub(crate) fn check_record_sizes(batch: &[Entry<'_>], limit: usize) -> Result<usize> {
    let mut total = 0usize;
    for (index, entry) in batch.iter().enumerate() {
        let size = record_size(entry);
        if size > limit {
            return Err(Error::RecordTooLarge { index, size, limit });
        }
        total = total.saturating_add(size);
    }
    Ok(total)
}

/// Checks a cursor or snapshot name against the rule in the [`Store`] contract.
pub fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 128 {
        Some("longer than 128 bytes")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks the offset of a cursor or snapshot: it names the records before it, and past
/// `end` there are none to name.
pub(crate) fn check_not_past_end(offset: Offset, start: Offset, end: Offset) -> Result<()> {
    if offset > end {
        return Err(Error::OffsetOutOfRange {
            requested: offset,
            start,
            end,
        });
    }
    Ok(())
}

/// Checks `from` against a store's range, as `read_from` must.
pub(crate) fn check_read_range(from: Offset, start: Offset, end: Offset) -> Result<()> {
    if from < start || from > end {
        Err(Error::OffsetOutOfRange {
            requested: from,
            start,
            end,
        })
    } else {
        Ok(())
    }
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        (**self).append(batch)
    }
    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        (**self).read_from(from)
    }
    fn replay_from(&self, from: Offset, f: &mut dyn FnMut(Offset, Entry<'_>)) -> Result<Offset> {
        (**self).replay_from(from, f)
    }
    fn replay_range(
        &self,
        from: Offset,
        until: Offset,
        f: &mut dyn FnMut(Offset, Entry<'_>),
    ) -> Result<Offset> {
        (**self).replay_range(from, until, f)
    }
    fn offset_for_timestamp(&self, at: Timestamp) -> Result<Option<Offset>> {
        (**self).offset_for_timestamp(at)
    }
    fn start_offset(&self) -> Offset {
        (**self).start_offset()
    }
    fn next_offset(&self) -> Offset {
        (**self).next_offset()
    }
    fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
        (**self).wait_for(offset, timeout)
    }
    fn poll_committed(&self, offset: Offset, cx: &mut Context<'_>) -> Poll<Offset> {
        (**self).poll_committed(offset, cx)
    }
    fn wake_waiters(&self) {
        (**self).wake_waiters()
    }
    fn sync(&self) -> Result<()> {
        (**self).sync()
    }
    fn sync_until(&self, offset: Offset) -> Result<()> {
        (**self).sync_until(offset)
    }
    fn append_waits_for_disk(&self) -> bool {
        (**self).append_waits_for_disk()
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> Result<Deferred> {
        (**self).append_deferred(batch)
    }
    fn wait_appended(&self, end: Offset) -> Result<()> {
        (**self).wait_appended(end)
    }
    fn truncate_before(&self, offset: Offset) -> Result<()> {
        (**self).truncate_before(offset)
    }
    fn compact_with(&self, options: CompactOptions) -> Result<Compaction> {
        (**self).compact_with(options)
    }
    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
        (**self).commit_cursor(name, offset)
    }
    fn cursor(&self, name: &str) -> Result<Option<Offset>> {
        (**self).cursor(name)
    }
    fn save_snapshot(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()> {
        (**self).save_snapshot(name, offset, blob)
    }
    fn latest_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        (**self).latest_snapshot(name)
    }
}
