//! How a [`LogStore`](super::LogStore) is configured: [`LogOptions`] and [`SyncPolicy`].

use std::time::Duration;

use crate::error::{Error, Result};

use super::segment::{BATCH_HEADER_LEN, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

/// When appended records are made durable with `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every append returns only after its records are on disk. Concurrent appenders share
    /// one write and one `fdatasync` (group commit).
    Always,
    /// `fdatasync` once `records` records were appended since the last one, or once
    /// `interval` passed since the oldest unsynced record, whichever comes first; a
    /// background thread keeps the interval even when appends stop. An append returns as
    /// soon as its records are buffered in this process's memory, except the one that
    /// reaches `records`, which runs that `fdatasync` (use `u64::MAX` for syncs on the
    /// interval alone, by the background thread), and one that rolls to a new segment,
    /// which syncs the segment it seals. Records are written to the file when they are
    /// synced or when the buffer fills
    /// ([`write_buffer_bytes`](LogOptions::write_buffer_bytes)), so a crash of the
    /// process (a `kill -9`, an abort), not only of the machine, loses the records
    /// appended since the last sync: up to `interval`'s worth, acknowledged ones
    /// included (a cluster can have answered them already).
    Every {
        /// Sync after this many unsynced records (0 is taken as 1).
        records: u64,
        /// Sync at the latest this long after the oldest unsynced record was appended.
        interval: Duration,
    },
    /// Never sync on its own: only [`Store::sync`](crate::store::Store::sync) makes records
    /// durable (a clean close writes them to the files without syncing). For tests and for
    /// logs that can be rebuilt. Appended records stay in this process's memory until
    /// the buffer fills ([`write_buffer_bytes`](LogOptions::write_buffer_bytes)), a
    /// sync, or a clean close: a crash of the process loses those (the records written
    /// to the files survive it); a power failure can lose any unsynced tail, and may
    /// leave a sealed segment without its end, which reading then reports as
    /// [`Error::Corrupt`].
    Never,
}

/// Options of a [`LogStore`](super::LogStore), as a builder with documented defaults.
///
/// ```
/// use std::time::Duration;
/// use cauce::store::{LogOptions, SyncPolicy};
///
/// let options = LogOptions::new()
///     .sync(SyncPolicy::Every { records: 1000, interval: Duration::from_millis(10) })
///     .segment_bytes(16 << 20);
/// assert_eq!(options.segment_bytes_value(), 16 << 20);
/// ```
#[derive(Clone, Debug)]
pub struct LogOptions {
    pub(crate) sync: SyncPolicy,
    pub(crate) segment_bytes: u64,
    pub(crate) max_record_bytes: usize,
    pub(crate) index_interval_bytes: u64,
    pub(crate) preallocate: bool,
    pub(crate) write_buffer_bytes: usize,
    pub(crate) keep_mapped: bool,
    pub(crate) max_open_segments: usize,
    pub(crate) retain_for: Option<Duration>,
    pub(crate) retain_bytes: Option<u64>,
    pub(crate) segment_age: Option<Duration>,
    pub(crate) max_timestamp_ahead: Option<Duration>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            sync: SyncPolicy::Always,
            segment_bytes: 64 << 20,
            max_record_bytes: crate::store::DEFAULT_MAX_RECORD_BYTES,
            index_interval_bytes: 4096,
            preallocate: true,
            write_buffer_bytes: 512 << 10,
            keep_mapped: false,
            max_open_segments: 128,
            retain_for: None,
            retain_bytes: None,
            segment_age: None,
            max_timestamp_ahead: None,
        }
    }
}

impl LogOptions {
    /// The largest [`index_interval_bytes`](Self::index_interval_bytes) accepted
    /// (4 GiB - 1): far more than any segment needs, and small enough that no file
    /// position plus it can overflow.
    pub const MAX_INDEX_INTERVAL_BYTES: u64 = u32::MAX as u64;

    /// The largest [`write_buffer_bytes`](Self::write_buffer_bytes) accepted (1 GiB).
    pub const MAX_WRITE_BUFFER_BYTES: usize = 1 << 30;

    /// The defaults: [`SyncPolicy::Always`], 64 MiB segments (preallocated), records up
    /// to 8 MiB, an index entry every 4 KiB, a 512 KiB write buffer, no mapping kept
    /// between reads, at most 128 sealed segment files open, every record kept until
    /// [`Store::truncate_before`](crate::store::Store::truncate_before) drops it (no
    /// [retention by age](Self::retain_for) or [by size](Self::retain_bytes)).
    pub fn new() -> Self {
        LogOptions::default()
    }

    /// When appends are made durable (default [`SyncPolicy::Always`]).
    pub fn sync(mut self, policy: SyncPolicy) -> Self {
        self.sync = policy;
        self
    }

    /// A segment is sealed and a new one started once it would grow past this many bytes
    /// (default 64 MiB). A batch larger than this gets a segment of its own.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// A segment is also sealed once it has been the active one this long, at the next
    /// append (Kafka's `segment.ms`; default: no limit, only
    /// [`segment_bytes`](Self::segment_bytes) seals). With
    /// [retention by age](Self::retain_for), this bounds how long past `age` a slow
    /// log keeps a record: a segment that fills in weeks would otherwise hold its
    /// oldest records for weeks after they expired. The time counts from the segment's
    /// creation, or from the open for the segment a store opens on.
    pub fn segment_age(mut self, age: Duration) -> Self {
        self.segment_age = Some(age);
        self
    }

    /// The largest record accepted, key, payload and 20 bytes of framing included (see
    /// [`record_size`](crate::store::record_size); default 8 MiB,
    /// [`DEFAULT_MAX_RECORD_BYTES`](crate::store::DEFAULT_MAX_RECORD_BYTES)). A batch
    /// with a larger one is refused whole with [`Error::RecordTooLarge`].
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// One sparse index entry is kept per this many bytes of a segment (default 4 KiB):
    /// a read from an offset scans at most about this much before its first record.
    /// Between 1 and [`MAX_INDEX_INTERVAL_BYTES`](Self::MAX_INDEX_INTERVAL_BYTES).
    pub fn index_interval_bytes(mut self, bytes: u64) -> Self {
        self.index_interval_bytes = bytes;
        self
    }

    /// Reserve each new segment's full size on disk (`fallocate`) when it is created
    /// (default on): an `fdatasync` then has no file size to update, which the log bench
    /// measured at about 1.5x the durable appends per second
    /// (`log.durable.100b.one.preallocated.vs_not`). Under [`SyncPolicy::Always`], small
    /// writes also get zeros written 1 MiB ahead of them, so that their `fdatasync`
    /// converts no unwritten extent either. The unwritten part reads
    /// as zeros, which the recovery scan takes as the end; a sealed segment is cut to its
    /// data.
    pub fn preallocate(mut self, on: bool) -> Self {
        self.preallocate = on;
        self
    }

    /// With [`SyncPolicy::Never`] and [`SyncPolicy::Every`], appends are gathered in
    /// memory up to this many bytes before one `write` (default 512 KiB). Readers see
    /// buffered records at once. Under `Every` the background thread does the write, so
    /// an append never waits for it unless eight buffers' worth is waiting. At least 1
    /// and at most [`MAX_WRITE_BUFFER_BYTES`](Self::MAX_WRITE_BUFFER_BYTES); anything
    /// else is refused by the open.
    pub fn write_buffer_bytes(mut self, bytes: usize) -> Self {
        self.write_buffer_bytes = bytes;
        self
    }

    /// Keep each sealed segment mapped into memory once it has been read (default off):
    /// later reads of it, by any reader of this log, find its pages already mapped. Off,
    /// every reader maps a segment a window of a few MiB at a time and unmaps each window
    /// behind it, which costs page-table work on every read. For a log replayed again
    /// and again (state rebuilt from it, re-runs), on pays: borrowed replay of a hot log
    /// of 1,000,000 records of 100 B ran at 0.79-0.86 of a bare `read` of its files with
    /// this off, and at 0.88-0.94 with it on (`log.replay.100b.borrowed.vs_raw_read`).
    ///
    /// A kept mapping costs address space, not memory: its pages are the kernel's page
    /// cache, shared and reclaimable. But the process's resident size (RSS) counts the
    /// pages it has read through its mappings, so with this on it grows by every sealed
    /// segment read, up to the whole log, where it otherwise stays within a few MiB. A
    /// segment's mapping is let go when retention or compaction removes the segment and no
    /// reader or [`Record`](crate::Record) holds it any more, or when the log is dropped.
    pub fn keep_mapped(mut self, on: bool) -> Self {
        self.keep_mapped = on;
        self
    }

    /// How many sealed segment files stay open between reads (default 128; at least 1).
    /// A log holds a file per segment (64 MiB by default, fewer bytes when compacted or
    /// with a smaller [`segment_bytes`](Self::segment_bytes)); past this many, the least
    /// recently opened is closed, and opened again when next read. So a long log opens,
    /// and is read end to end, within the usual limit of 1,024 open files (`ulimit -n`),
    /// whatever its length. The active segment stays open, and so does one a reader is
    /// reading; a mapped window or a [kept mapping](Self::keep_mapped) needs no open file.
    /// A [read-only](super::LogStore::open_read_only) store keeps every file open instead.
    pub fn max_open_segments(mut self, files: usize) -> Self {
        self.max_open_segments = files;
        self
    }

    /// Deletes the oldest sealed segments once every record in them is older than
    /// `age` (Kafka's `retention.ms`): a segment goes when the newest
    /// [`timestamp`](crate::Record::timestamp) in it is more than `age` before now
    /// ([`now`](crate::record::now), milliseconds of the wall clock), and only with every
    /// segment before it, so the log keeps a contiguous range of offsets. Default: no
    /// limit.
    ///
    /// Retention works a whole segment at a time. The active segment (the one being
    /// appended to) is sealed and deleted only once every record in it is older than
    /// `age` and every segment before it went too (a log that went quiet), and only by
    /// `apply_retention` or at the open (never by the retention after an append, which
    /// would drop that append's own record if it was backfilled past `age`); otherwise
    /// records older than `age` stay until their segment is sealed, which
    /// [`segment_bytes`](Self::segment_bytes) and [`segment_age`](Self::segment_age)
    /// bound. It is applied
    /// when the store opens (read-write), after each append that sealed a segment,
    /// and by [`LogStore::apply_retention`](super::LogStore::apply_retention), which a
    /// host whose log can go quiet calls on a timer (no thread of the store's wakes for
    /// it). What it deletes is dropped as by
    /// [`Store::truncate_before`](crate::store::Store::truncate_before) of the first
    /// offset kept: the start moves past it, and a reader or cursor behind it gets
    /// [`Error::OffsetOutOfRange`]. Timestamps are the ones appended: records backfilled
    /// with an [`Entry::with_timestamp`](crate::Entry::with_timestamp) older than `age`
    /// are deleted at the next seal or `apply_retention`, maybe before anybody read
    /// them, and one record stamped in the future keeps its segment, and every later
    /// one, until that time has passed
    /// ([`max_timestamp_ahead`](Self::max_timestamp_ahead) refuses such records). A
    /// clock set back makes segments look younger, never older.
    ///
    /// A [`Cluster`](crate::cluster::Cluster) refuses logs with retention: it drops the
    /// head of its own log only past a checkpoint
    /// ([`truncate_after_checkpoint`](crate::cluster::ClusterBuilder::truncate_after_checkpoint)),
    /// since every key's state is rebuilt from there.
    ///
    /// ```
    /// use std::time::Duration;
    /// use cauce::store::LogOptions;
    ///
    /// // Kafka's default: a week.
    /// let options = LogOptions::new().retain_for(Duration::from_secs(7 * 24 * 3600));
    /// assert_eq!(options.retention(), (Some(Duration::from_secs(604_800)), None));
    /// ```
    pub fn retain_for(mut self, age: Duration) -> Self {
        self.retain_for = Some(age);
        self
    }

    /// Deletes the oldest sealed segments while the log would still hold at least
    /// `bytes` without them (Kafka's `retention.bytes`), counting the segment files,
    /// headers included, the active one too. Applied as [`retain_for`](Self::retain_for)
    /// is (at open, after each append that sealed a segment, and by
    /// [`LogStore::apply_retention`](super::LogStore::apply_retention)), a whole sealed
    /// segment at a time; with both set, a segment goes when either says so. Right after
    /// it is applied the log holds less than `bytes` plus its oldest segment; until the
    /// next seal the active segment grows on, so the log stays under `bytes` plus two
    /// segments ([`segment_bytes`](Self::segment_bytes)). Default: no limit.
    pub fn retain_bytes(mut self, bytes: u64) -> Self {
        self.retain_bytes = Some(bytes);
        self
    }

    /// Refuses a batch holding a record stamped more than `ahead` after the store's
    /// clock ([`now`](crate::record::now) when the append is called): the append is
    /// [`Error::TimestampAhead`](crate::Error::TimestampAhead), naming the record, and
    /// nothing of the batch is appended (Kafka's `message.timestamp.after.max.ms`). A
    /// record stamped in the future would hold [retention by age](Self::retain_for)
    /// back for its whole segment, and come after later records in a lookup by time.
    /// Records stamped in the past are always accepted. The limit reads the wall clock:
    /// a clock stepped back by more than `ahead` refuses, for as long as the step,
    /// records stamped just before it (or by a clock that was not stepped), so keep
    /// `ahead` well above the clock's steps (Kafka's default is an hour). Default: no
    /// limit (every timestamp is accepted).
    ///
    /// ```
    /// use std::time::Duration;
    /// use cauce::store::{LogOptions, LogStore, Store};
    /// use cauce::{Entry, Error};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let options = LogOptions::new().max_timestamp_ahead(Duration::from_secs(3600));
    /// let log = LogStore::open(dir.path(), options)?;
    /// let tomorrow = cauce::record::now() + 24 * 3600 * 1000;
    /// let refused = log.append(&[
    ///     Entry::new(b"k", b"now"),
    ///     Entry::with_timestamp(tomorrow, b"k", b"later"),
    /// ]);
    /// assert!(matches!(refused, Err(Error::TimestampAhead { index: 1, .. })));
    /// assert_eq!(log.next_offset(), 0); // nothing of the batch
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn max_timestamp_ahead(mut self, ahead: Duration) -> Self {
        self.max_timestamp_ahead = Some(ahead);
        self
    }

    /// The limit set by [`max_timestamp_ahead`](Self::max_timestamp_ahead), if any.
    pub fn max_timestamp_ahead_value(&self) -> Option<Duration> {
        self.max_timestamp_ahead
    }

    /// The retention set: by age ([`retain_for`](Self::retain_for)) and by size
    /// ([`retain_bytes`](Self::retain_bytes)); `None` for no limit.
    pub fn retention(&self) -> (Option<Duration>, Option<u64>) {
        (self.retain_for, self.retain_bytes)
    }

    /// Whether any retention is set.
    pub(crate) fn retains(&self) -> bool {
        self.retain_for.is_some() || self.retain_bytes.is_some()
    }

    /// The segment age set by [`segment_age`](Self::segment_age), if any.
    pub fn segment_age_value(&self) -> Option<Duration> {
        self.segment_age
    }

    /// The sync policy set.
    pub fn sync_policy(&self) -> SyncPolicy {
        self.sync
    }

    /// The segment size set.
    pub fn segment_bytes_value(&self) -> u64 {
        self.segment_bytes
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let min_segment = (SEGMENT_HEADER_LEN + BATCH_HEADER_LEN + RECORD_HEADER_LEN) as u64;
        if self.segment_bytes < min_segment {
            return Err(Error::Config(format!(
                "segment_bytes is {}, it must be at least {min_segment}",
                self.segment_bytes
            )));
        }
        if self.max_record_bytes < RECORD_HEADER_LEN || self.max_record_bytes > u32::MAX as usize {
            return Err(Error::Config(format!(
                "max_record_bytes is {}, it must be between {RECORD_HEADER_LEN} and {}",
                self.max_record_bytes,
                u32::MAX
            )));
        }
        if !(1..=LogOptions::MAX_WRITE_BUFFER_BYTES).contains(&self.write_buffer_bytes) {
            return Err(Error::Config(format!(
                "write_buffer_bytes is {}, it must be between 1 and {}",
                self.write_buffer_bytes,
                LogOptions::MAX_WRITE_BUFFER_BYTES
            )));
        }
        if self.max_open_segments == 0 {
            return Err(Error::Config(
                "max_open_segments is 0, it must be at least 1".into(),
            ));
        }
        if self.index_interval_bytes == 0
            || self.index_interval_bytes > LogOptions::MAX_INDEX_INTERVAL_BYTES
        {
            return Err(Error::Config(format!(
                "index_interval_bytes is {}, it must be between 1 and {}",
                self.index_interval_bytes,
                LogOptions::MAX_INDEX_INTERVAL_BYTES
            )));
        }
        if let SyncPolicy::Every { interval, .. } = self.sync
            && interval.is_zero()
        {
            return Err(Error::Config(
                "SyncPolicy::Every needs an interval above zero".into(),
            ));
        }
        Ok(())
    }
}
