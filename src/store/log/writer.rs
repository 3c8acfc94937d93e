//! The append path: encoding into a shared buffer, group commit, rolling segments, and
//! the background flusher of [`SyncPolicy::Every`].
//!
//! Appenders encode their batch into `WriterState::buf` under a short lock and take
//! offsets. Whoever must write (the `Always` appender that completes a group, or the
//! first one of a group that did not fill in time; a `Never` appender that filled the
//! buffer; the flusher thread, for a sync that is due or a buffer an `Every` appender
//! filled) becomes the leader if nobody is writing: it
//! takes the whole buffer, writes it (and fdatasyncs it) outside the lock while others
//! append into the next buffer, then wakes everyone whose records it covered with one
//! call. One write and one fdatasync serve every appender that came in meanwhile.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::MutexGuard;

use super::segment::{self, SEGMENT_HEADER_LEN};
use super::{OpenFiles, Segment, Shared, SyncPolicy, WriterState, index, meta};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Timestamp};

/// With a leader writing, `Never`/`Every` appenders wait once the next buffer holds this
/// many times `write_buffer_bytes` (back-pressure instead of unbounded memory).
const MAX_BUFFERED_FACTOR: usize = 8;

/// The longest the first appender of a group waits for the group to fill before it
/// writes it as it is.
const MAX_GATHER: Duration = Duration::from_micros(500);

/// With preallocation under `SyncPolicy::Always`, zeros are written this far ahead of the
/// data, so that an `fdatasync` finds the blocks it flushes already written and has no
/// extent to convert (an unwritten `fallocate` extent costs a journal commit when a
/// write first lands in it). A plain write+fdatasync loop measured +32% syncs per second
/// at 2.3 KiB per sync; the group commit of 16 threads went from 6.6-6.8x to 7.7-8.1x
/// one thread.
const ZERO_AHEAD: u64 = 1 << 20;
/// Writes larger than this zero nothing ahead: they span many new blocks per sync
/// anyway, and the bench measured durable batches of 1000 records 10% slower with zeros
/// ahead (1.33x -> 1.17x okaywal).
const ZERO_AHEAD_MAX_WRITE: u64 = 32 << 10;
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Creates the segment file starting at `base`: header written, optionally preallocated,
/// and, when `durable`, fdatasync'd with the directory fsync'd before any record goes
/// into it. (Under `SyncPolicy::Never` nothing is promised durable, and an fsync here
/// would also push out the previous segment's dirty pages; a torn header is repaired
/// on open, recovery rule 6.)
///
/// A file already at that path with any bytes in it is an [`Error::Io`] of kind
/// `AlreadyExists`, and is left as it is.
pub(crate) fn create_segment(
    dir: &Path,
    base: Offset,
    preallocate: Option<u64>,
    durable: bool,
    files: &Arc<OpenFiles>,
) -> Result<Segment> {
    let path = segment::segment_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("create segment", &path, e))?;
    let existing = file
        .metadata()
        .map_err(|e| Error::io("stat new segment", &path, e))?
        .len();
    if existing > 0 {
        // No roll or open creates a segment where one is: a file there may hold
        // acknowledged records, and truncating it would lose them without a word.
        return Err(Error::io(
            "create segment",
            &path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("a file of {existing} bytes is already there; it is left as it is"),
            ),
        ));
    }
    file.write_all_at(&segment::encode_segment_header(base), 0)
        .map_err(|e| Error::io("write segment header", &path, e))?;
    if let Some(len) = preallocate {
        preallocate_file(&file, len);
    }
    if durable {
        file.sync_all()
            .map_err(|e| Error::io("fsync new segment", &path, e))?;
        meta::sync_dir(dir)?;
    }
    Ok(Segment::new(
        base,
        path,
        Some(file),
        files,
        SEGMENT_HEADER_LEN as u64,
        false,
        Some(Vec::new()),
    ))
}

/// Reserves `len` bytes for `file`; a file system that cannot is left as it is (the
/// segment then simply grows as it is written).
fn preallocate_file(file: &File, len: u64) {
    let Ok(len) = libc::off_t::try_from(len) else {
        return;
    };
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        tracing::debug!("fallocate failed: {}", std::io::Error::last_os_error());
    }
}

/// Writes zeros over `range` of a segment.
fn write_zeros(seg: &Segment, range: Range<u64>) -> Result<()> {
    let mut at = range.start;
    while at < range.end {
        let n = ZEROS.len().min((range.end - at) as usize);
        seg.file()?
            .write_all_at(&ZEROS[..n], at)
            .map_err(|e| Error::io("write zeros ahead", &seg.path, e))?;
        at += n as u64;
    }
    Ok(())
}

/// Keeps the buffer of a write that ended as the next spare one, unless a reader still
/// holds a part of it.
fn reuse(st: &mut WriterState, written: Bytes) {
    if let Ok(mut reusable) = written.try_into_mut() {
        reusable.clear();
        st.spare = reusable.into();
    }
}

/// Poisons the store with the failure `e`: nothing is written or fdatasync'd again
/// (see [`Shared::lead`]), and every later call that would need it fails with
/// [`poisoned`].
pub(crate) fn poison(st: &mut WriterState, e: &Error) {
    tracing::error!("the log refuses writes from now on: {e}");
    st.poisoned = Some(e.to_string());
}

/// [`Error::TimestampAhead`] for the first record of `batch` stamped more than `ahead`
/// after now.
fn check_timestamps(batch: &[Entry<'_>], ahead: Duration) -> Result<()> {
    let now = crate::record::now();
    let limit = now.saturating_add(crate::record::millis(ahead));
    match batch.iter().position(|e| e.timestamp > limit) {
        Some(index) => Err(Error::TimestampAhead {
            index,
            timestamp: batch[index].timestamp,
            now,
            max_ahead: ahead,
        }),
        None => Ok(()),
    }
}

fn poisoned(message: &str) -> Error {
    Error::ReadOnly(format!(
        "an earlier write or fdatasync failed ({message}); reopen the store to recover"
    ))
}

impl Shared {
    /// Appends a batch under the sync policy; see the module docs.
    pub(crate) fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        self.append_then(batch, true)
    }

    /// [`append`](Self::append), except that under `Always` it returns without waiting
    /// for the records to be durable: [`wait_appended`](Self::wait_appended) does (see
    /// `Store::append_deferred`). The records are not visible to readers before then.
    pub(crate) fn append_deferred(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        self.append_then(batch, false)
    }

    /// Returns once every record before `end` is durable under `Always` (leading a group
    /// commit when it is this caller's turn); at once under the other policies, whose
    /// appends never leave their records to a later wait.
    pub(crate) fn wait_appended(&self, end: Offset) -> Result<()> {
        if !self.writable
            || self.options.sync != SyncPolicy::Always
            || self.durable.load(Ordering::Acquire) >= end
        {
            return Ok(());
        }
        let st = self.writer.lock();
        // Offsets never appended are not waited for.
        let end = end.min(st.next);
        self.wait_durable(st, end)
    }

    fn append_then(&self, batch: &[Entry<'_>], wait: bool) -> Result<Range<Offset>> {
        if !self.writable {
            return Err(Error::ReadOnly(
                "opened read-only: appends are refused".into(),
            ));
        }
        let body_len = segment::check_batch(batch, self.options.max_record_bytes)?;
        if let Some(ahead) = self.options.max_timestamp_ahead {
            check_timestamps(batch, ahead)?;
        }
        let len = segment::batch_len(body_len) as u64;
        let mut st = self.writer.lock();
        // Every append after a failed write reports it, empty or not (a batch refused
        // for itself, above, is refused for that first).
        if let Some(p) = &st.poisoned {
            return Err(poisoned(p));
        }
        if batch.is_empty() {
            return Ok(st.next..st.next);
        }
        let full = |st: &WriterState| {
            let pos = st.buf_pos + st.buf.len() as u64;
            pos > SEGMENT_HEADER_LEN as u64
                && (pos + len > self.options.segment_bytes
                    || self
                        .options
                        .segment_age
                        .is_some_and(|age| st.active_since.elapsed() >= age))
        };
        if full(&st) {
            self.roll_while(&mut st, full)?;
        }
        let pos = st.buf_pos + st.buf.len() as u64;
        let first = st.next;
        // A start offset or segment near `u64::MAX`, read from the files, leaves few
        // offsets; wrapped, they would give a reversed range and a `next` of 0.
        let Some(end) = first.checked_add(batch.len() as Offset) else {
            return Err(Error::OffsetsExhausted {
                next: first,
                records: batch.len(),
            });
        };
        segment::encode_batch(
            &mut st.buf,
            body_len,
            batch
                .iter()
                .enumerate()
                .map(|(i, e)| (first + i as Offset, e)),
        );
        if pos >= st.next_index_pos {
            st.next_index_pos = pos.saturating_add(self.options.index_interval_bytes);
            st.active.add_index_entry(first, pos);
        }
        st.next = end;
        st.buf_appends += 1;
        if self.options.retain_for.is_some()
            && let Some(newest) = &mut st.active_newest
        {
            *newest = batch
                .iter()
                .map(|e| e.timestamp)
                .fold(*newest, Timestamp::max);
        }
        // Under `Every` and `Never` the records are committed from here on, whatever a
        // write this call goes on to run returns: a failed one poisons the store, and
        // the calls after it report it (module docs, "Durability and visibility").
        match self.options.sync {
            SyncPolicy::Always if wait => {
                self.wait_durable(st, end)?;
            }
            // Counted in its group (`buf_appends`): the group waits for this append's
            // caller to come and wait, as for any other appender.
            SyncPolicy::Always => {}
            // The readers waiting for these records are woken once the lock is let go
            // (see `Tail::advance`), or before this append writes or waits.
            SyncPolicy::Never => {
                let mut waiting = self.tail.advance(end);
                let writes = st.buf.len() >= self.options.write_buffer_bytes;
                self.wake_before_writing(&mut st, &mut waiting, writes);
                self.maybe_write(&mut st);
                drop(st);
                if waiting {
                    self.tail.wake_waiting();
                }
            }
            SyncPolicy::Every { records, .. } => {
                let mut waiting = self.tail.advance(end);
                st.unsynced_records += batch.len() as u64;
                if st.unsynced_since.is_none() {
                    st.unsynced_since = Some(Instant::now());
                    self.flusher_wake.notify_one();
                }
                let writes = st.unsynced_records >= records.max(1)
                    || st.buf.len() >= self.options.write_buffer_bytes;
                self.wake_before_writing(&mut st, &mut waiting, writes);
                if st.unsynced_records >= records.max(1) {
                    self.wait_idle(&mut st);
                    if st.unsynced_records >= records.max(1) {
                        let _poisoned_on_error = self.lead(&mut st, true);
                    }
                }
                self.hand_over_write(&mut st);
                drop(st);
                if waiting {
                    self.tail.wake_waiting();
                }
            }
        }
        Ok(first..end)
    }

    /// Wakes the readers waiting for the records an append just committed, if some wait
    /// (`waiting`, then cleared) and the append goes on to write or to wait for a write
    /// (`writes`): letting go of the lock for the wake-up, so that they do not sleep
    /// through a `pwrite` or an fdatasync with their records visible. Otherwise they are
    /// woken after the append lets go of the lock.
    fn wake_before_writing(
        &self,
        st: &mut MutexGuard<'_, WriterState>,
        waiting: &mut bool,
        writes: bool,
    ) {
        if *waiting && writes {
            *waiting = false;
            MutexGuard::unlocked(st, || self.tail.wake_waiting());
        }
    }

    /// Under `Every`, a full buffer is the background thread's to write: an appender
    /// that wrote it itself stalled for the write (a submit to the cluster waited behind
    /// a 512 KiB `pwrite`, milliseconds long when the kernel throttles writeback), and
    /// with it every request queued behind that submit. Appenders go on filling the
    /// buffer meanwhile, up to the same bound as while a write is in flight. Once the
    /// background thread is stopped, appenders write as under `Never`.
    fn hand_over_write(&self, st: &mut MutexGuard<'_, WriterState>) {
        let limit = self.options.write_buffer_bytes;
        if st.buf.len() < limit {
            return;
        }
        if self.shutdown.load(Ordering::Acquire) {
            return self.maybe_write(st);
        }
        if !st.flushing {
            self.flusher_wake.notify_one();
        }
        while st.buf.len() >= limit * MAX_BUFFERED_FACTOR && !self.shutdown.load(Ordering::Acquire)
        {
            if st.poisoned.is_some() {
                return;
            }
            self.flusher_wake.notify_one();
            self.flushed.wait(st);
        }
    }

    /// Writes the buffer once it is full (`Never`, and `Every` once the background thread
    /// has stopped). A write that fails poisons the store; the records it carried were
    /// committed, and stay readable.
    fn maybe_write(&self, st: &mut MutexGuard<'_, WriterState>) {
        let limit = self.options.write_buffer_bytes;
        if st.buf.len() < limit {
            return;
        }
        if !st.flushing {
            let _poisoned_on_error = self.lead(st, false);
            return;
        }
        while st.flushing && st.buf.len() >= limit * MAX_BUFFERED_FACTOR {
            self.flushed.wait(st);
        }
    }

    /// Returns once every record before `end` is durable, leading a group commit when it
    /// is this append's turn.
    ///
    /// A *group* is the appends buffered while no write is in flight. The append that
    /// completes it (as many appends as were active around the last group commit)
    /// writes and fdatasyncs it at once: the thread that is running leads, rather than
    /// a leader that sleeps until its group is complete and must be woken. With N
    /// appenders each fdatasync then carries about N appends instead of N/2 (the
    /// appenders released by a sync otherwise always miss the next one).
    ///
    /// Every other appender sleeps until the write in flight ends. The group's first
    /// appender also sets a deadline, and leads the group as it is if it is not complete
    /// by then (appenders went away). The deadline is a little later than the group
    /// would be durable if it filled as fast as the last one, so that in the steady state
    /// the end of the write wakes it, not its timer: a timer that fires while the
    /// fdatasync runs costs the fdatasync a context switch (16 appenders on 2 cores, in a
    /// profiling loop: fdatasync 141-154 µs -> 117-125 µs, 16 threads 8.0x -> 9.2x one).
    ///
    /// A follower sleeps outside the lock, on the flush epoch, and returns without
    /// taking the lock again when it made its records durable: the leader wakes all its
    /// followers at once instead of handing the lock from one to the next.
    fn wait_durable<'a>(&'a self, mut st: MutexGuard<'a, WriterState>, end: Offset) -> Result<()> {
        loop {
            if st.synced >= end {
                return Ok(());
            }
            if let Some(p) = &st.poisoned {
                return Err(poisoned(p));
            }
            let mut deadline = None;
            if !st.flushing {
                let now = Instant::now();
                let complete = st.buf_appends >= st.concurrency;
                match st.group_started {
                    Some(started) if complete || now >= started + self.gather_window(&st) => {
                        self.lead(&mut st, true)?;
                        continue;
                    }
                    None if complete => {
                        st.group_started = Some(now);
                        self.lead(&mut st, true)?;
                        continue;
                    }
                    Some(_) => {} // the group's first appender keeps the deadline
                    None => {
                        st.group_started = Some(now);
                        deadline = Some(now + self.gather_window(&st));
                    }
                }
            }
            let epoch = self.flush_epoch.current();
            st.sleepers += 1;
            drop(st);
            while self.flush_epoch.current() == epoch && deadline.is_none_or(|d| Instant::now() < d)
            {
                self.flush_epoch.wait(epoch, deadline);
            }
            if self.durable.load(Ordering::Acquire) >= end {
                return Ok(());
            }
            st = self.writer.lock();
        }
    }

    /// How long a group's first appender waits for the group to fill: half again the
    /// time the last group took to fill and be written, at most [`MAX_GATHER`].
    fn gather_window(&self, st: &WriterState) -> Duration {
        ((st.last_fill + st.last_sync) * 3 / 2).min(MAX_GATHER)
    }

    /// Ends a write (or a roll): wakes the followers parked for it, the readers waiting
    /// for the records it made durable, and the threads waiting for the writer to be
    /// idle.
    fn end_flush(&self, st: &mut MutexGuard<'_, WriterState>) {
        self.flush_epoch.advance();
        let followers = std::mem::take(&mut st.sleepers) > 0;
        let readers = std::mem::take(&mut st.tail_waiting);
        if followers || readers {
            MutexGuard::unlocked(st, || {
                if followers {
                    self.flush_epoch.wake_all();
                }
                if readers {
                    self.tail.wake_waiting();
                }
            });
        }
        self.flushed.notify_all();
    }

    /// Waits until no leader is writing.
    fn wait_idle(&self, st: &mut MutexGuard<'_, WriterState>) {
        while st.flushing {
            self.flushed.wait(st);
        }
    }

    /// Takes the buffer and writes it (and fdatasyncs the segment when `sync`) outside
    /// the lock. The caller checked that nobody else is writing.
    ///
    /// A failure poisons the store: from then on nothing is written or fdatasync'd
    /// again (a later write would land past the bytes that did not, and a later
    /// fdatasync would call them durable), the bytes that failed stay in `inflight`
    /// for readers, and this returns the poisoned error without touching the file.
    fn lead(&self, st: &mut MutexGuard<'_, WriterState>, sync: bool) -> Result<()> {
        debug_assert!(!st.flushing);
        if let Some(p) = &st.poisoned {
            return Err(poisoned(p));
        }
        let upto = st.next;
        let seg = st.active.clone();
        let pos = st.buf_pos;
        let spare = std::mem::take(&mut st.spare);
        let buf = std::mem::replace(&mut st.buf, spare);
        let len = buf.len() as u64;
        let bytes = Bytes::from(buf);
        st.buf_pos += len;
        st.inflight = Some((pos, bytes.clone()));
        st.flushing = true;
        let covered = std::mem::take(&mut st.buf_appends);
        let filled = st.group_started.take().map(|t| t.elapsed());
        let zero = self.zero_ahead(st, pos + len, len);
        let started = Instant::now();
        let result: Result<()> = MutexGuard::unlocked(st, || {
            // The active segment's file: always open.
            let file = seg.file()?;
            if len > 0 {
                self.writes.fetch_add(1, Ordering::Relaxed);
                file.write_all_at(&bytes, pos)
                    .map_err(|e| Error::io("write", &seg.path, e))?;
            }
            if let Some(range) = zero {
                write_zeros(&seg, range)?;
            }
            if sync {
                self.syncs.fetch_add(1, Ordering::Relaxed);
                file.sync_data()
                    .map_err(|e| Error::io("fdatasync", &seg.path, e))?;
            }
            Ok(())
        });
        st.flushing = false;
        st.inflight = None;
        match &result {
            Ok(()) => {
                seg.end.store(pos + len, Ordering::Release);
                if sync {
                    st.last_sync = started.elapsed();
                    st.last_fill = filled.unwrap_or(Duration::ZERO);
                    st.concurrency = (covered + st.buf_appends).max(1);
                    self.mark_synced(st, upto, started);
                }
                reuse(st, bytes);
            }
            Err(e) => {
                poison(st, e);
                // Readers keep seeing the committed records that never reached the file.
                st.inflight = Some((pos, bytes));
            }
        }
        self.end_flush(st);
        result
    }

    /// The range to fill with zeros after a write that ends at `data_end`, if the
    /// zeroed region must grow (preallocation under `SyncPolicy::Always`, where appenders
    /// wait for the sync; `Every` syncs in the background); the caller writes
    /// it after its data and before its `fdatasync`. Only the leader writes the file, and
    /// only past the data, so the zeros never land on records.
    fn zero_ahead(&self, st: &mut WriterState, data_end: u64, len: u64) -> Option<Range<u64>> {
        if !self.options.preallocate
            || self.options.sync != SyncPolicy::Always
            || len > ZERO_AHEAD_MAX_WRITE
        {
            return None;
        }
        let limit = self.options.segment_bytes.max(data_end);
        if data_end + ZERO_AHEAD / 2 <= st.zeroed_until || st.zeroed_until >= limit {
            return None;
        }
        let from = st.zeroed_until.max(data_end);
        let to = (data_end + ZERO_AHEAD).min(limit);
        st.zeroed_until = to;
        (from < to).then_some(from..to)
    }

    /// Notes that every record before `upto` is durable.
    fn mark_synced(&self, st: &mut WriterState, upto: Offset, started: Instant) {
        st.synced = st.synced.max(upto);
        if self.options.sync == SyncPolicy::Always {
            // Before `durable`: an appender that sees `durable` cover its records returns
            // without the lock, and its records must be visible to readers by then.
            // Every caller ends with `end_flush`, which wakes the readers waiting.
            st.tail_waiting |= self.tail.advance(st.synced);
        }
        self.durable.store(st.synced, Ordering::Release);
        st.unsynced_records = st.next - st.synced;
        // Records appended while the sync ran are no older than its start.
        st.unsynced_since = (st.next > st.synced).then_some(started);
    }

    /// Seals the active segment (everything written and fdatasync'd, its index written)
    /// and starts a new one at the next offset, for as long as `needed` says the segment
    /// that is active then must be sealed. Returns with the lock held and `needed` false.
    ///
    /// `needed` is asked again after every wait: the lock is let go while a write in
    /// flight ends and while a roll wakes its followers, and another thread may have
    /// rolled meanwhile. (Appenders that decided to roll and all waited for the same
    /// write once each rolled in turn; the second sealed the first one's new, empty
    /// segment and created another at the same base over its file.)
    pub(crate) fn roll_while(
        &self,
        st: &mut MutexGuard<'_, WriterState>,
        needed: impl Fn(&WriterState) -> bool,
    ) -> Result<()> {
        loop {
            self.wait_idle(st);
            if let Some(p) = &st.poisoned {
                return Err(poisoned(p));
            }
            if !needed(st) {
                return Ok(());
            }
            let result = self.roll_idle(st);
            if let Err(e) = &result {
                poison(st, e);
            }
            self.end_flush(st);
            result?;
        }
    }

    /// Seals `seg` and starts a new segment, if `seg` is still the active one and holds
    /// a record (retention by age letting the active segment of a quiet log go).
    pub(crate) fn seal_active(&self, seg: &Arc<Segment>) -> Result<()> {
        let mut st = self.writer.lock();
        if let Some(p) = &st.poisoned {
            return Err(poisoned(p));
        }
        self.roll_while(&mut st, |st| {
            Arc::ptr_eq(&st.active, seg)
                && st.buf_pos + st.buf.len() as u64 > SEGMENT_HEADER_LEN as u64
        })
    }

    /// The roll itself, under the lock. On an error the caller poisons the store; the
    /// records written by then stay readable: those that failed to be written stay in
    /// `buf`, and those written but not yet counted in `seg.end` (a failed truncation or
    /// `fdatasync` after the write) in `inflight`, as after a failed `lead`.
    fn roll_idle(&self, st: &mut WriterState) -> Result<()> {
        let seg = st.active.clone();
        let started = Instant::now();
        if !st.buf.is_empty() {
            self.writes.fetch_add(1, Ordering::Relaxed);
            seg.file()?
                .write_all_at(&st.buf, st.buf_pos)
                .map_err(|e| Error::io("write", &seg.path, e))?;
            let spare = std::mem::take(&mut st.spare);
            let written = Bytes::from(std::mem::replace(&mut st.buf, spare));
            let pos = st.buf_pos;
            st.buf_pos += written.len() as u64;
            st.inflight = Some((pos, written));
            st.buf_appends = 0;
            st.group_started = None;
        }
        let end = st.buf_pos;
        if self.options.preallocate {
            // Cut the reserved (and zeroed) rest: a sealed segment ends at its data.
            seg.file()?
                .set_len(end)
                .map_err(|e| Error::io("truncate sealed segment", &seg.path, e))?;
        }
        if self.options.sync == SyncPolicy::Never {
            // Nothing was promised durable: leave the writeback to the kernel, and to
            // the next `sync()`, which fdatasyncs this segment first.
            // Forget the ones already deleted or replaced, so the list stays as short
            // as the segments it names.
            st.unsynced_sealed.retain(|s| s.strong_count() > 0);
            st.unsynced_sealed.push(Arc::downgrade(&seg));
        } else {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            seg.file()?
                .sync_data()
                .map_err(|e| Error::io("fdatasync", &seg.path, e))?;
            let upto = st.next;
            self.mark_synced(st, upto, started);
            // Woken now, under the lock (a roll is rare): the roll's index, manifest
            // and new segment (two fsyncs more) would otherwise keep them asleep with
            // their records visible.
            if std::mem::take(&mut st.tail_waiting) {
                self.tail.wake_waiting();
            }
        }
        // Written before the segment is sealed: a compaction takes only sealed
        // segments, and the index of its rewrite must not be overwritten by this one.
        if let Some(entries) = seg.index_entries()
            && let Err(e) = index::write(&self.dir, seg.base, &entries)
        {
            // An index is a hint: a missing one is rebuilt on first use.
            tracing::warn!("could not write the index of {}: {e}", seg.path.display());
        }
        seg.end.store(end, Ordering::Release);
        if let Some(newest) = st.active_newest {
            let _ = seg.newest.set(newest);
        }
        seg.sealed.store(true, Ordering::Release);
        seg.sealed_now();
        if self.options.retains() {
            self.retention_due.store(true, Ordering::Release);
        }
        if let Some((_, written)) = st.inflight.take() {
            reuse(st, written);
        }
        let preallocate = self
            .options
            .preallocate
            .then_some(self.options.segment_bytes);
        let durable = self.options.sync != SyncPolicy::Never;
        // Listed before its file exists (rule 16): a segment file the manifest lists is
        // gone only by damage, but for this newest one if the roll goes no further. The
        // fsync of the directory after the file is created makes both durable; under
        // `Never`, the list is written by the next sync, with the directory.
        self.manifest.lock().list(st.next, durable)?;
        let new = Arc::new(create_segment(
            &self.dir,
            st.next,
            preallocate,
            durable,
            &self.files,
        )?);
        st.dir_unsynced |= !durable;
        self.segments.write().push(new.clone());
        st.active = new;
        st.buf_pos = SEGMENT_HEADER_LEN as u64;
        st.zeroed_until = SEGMENT_HEADER_LEN as u64;
        st.next_index_pos = 0;
        // Noted only under retention by age (an append pays for it otherwise).
        st.active_newest = self.options.retain_for.map(|_| 0);
        st.active_since = Instant::now();
        Ok(())
    }

    /// Makes every record appended so far durable.
    pub(crate) fn sync_all(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.writer.lock();
        if let Some(p) = &st.poisoned {
            return Err(poisoned(p));
        }
        let target = st.next;
        loop {
            // Each time round: a roll while this waited for a write (the lock released)
            // can seal the segment holding records before `target` without a sync
            // (under `Never`), and `synced` then passes them as the new segment's
            // fdatasync ends.
            let sealed = std::mem::take(&mut st.unsynced_sealed);
            for (i, seg) in sealed.iter().enumerate() {
                let Some(seg) = seg.upgrade().filter(|s| !s.is_gone()) else {
                    continue; // deleted or replaced since: nothing to make durable
                };
                let file = match seg.file() {
                    Ok(file) => file,
                    Err(_) if seg.is_gone() => continue,
                    Err(e) => {
                        // Opening its file again synced nothing, so lost nothing: those
                        // not synced yet stay listed for the next `sync`.
                        st.unsynced_sealed.extend(sealed[i..].iter().cloned());
                        return Err(e);
                    }
                };
                if let Err(e) = file.sync_data() {
                    if seg.is_gone() {
                        continue; // retired meanwhile, its file with it
                    }
                    // The kernel reports a failed writeback to one fdatasync, then
                    // forgets it: the next one would succeed and call lost bytes durable.
                    let e = Error::io("fdatasync", &seg.path, e);
                    poison(&mut st, &e);
                    return Err(e);
                }
            }
            // The segments rolls listed under `Never`, then their directory entries. A
            // failed fsync of the directory (the manifest's write ends with one) poisons
            // the store as a failed fdatasync does, for the same reason: a later one
            // would call the names of the new segment files durable.
            let owed = self.manifest.lock().write_owed();
            let synced = owed.and_then(|()| match st.dir_unsynced {
                true => meta::sync_dir(&self.dir),
                false => Ok(()),
            });
            if let Err(e) = synced {
                // Only a failed fsync can have lost what it was to make durable; a
                // temporary file or a directory that could not be opened (out of file
                // descriptors, say) lost nothing, and the next `sync` tries again.
                if matches!(
                    e,
                    Error::Io {
                        op: "fsync" | "fsync directory",
                        ..
                    }
                ) {
                    poison(&mut st, &e);
                }
                return Err(e);
            }
            st.dir_unsynced = false;
            if st.synced >= target {
                return Ok(());
            }
            if let Some(p) = &st.poisoned {
                return Err(poisoned(p));
            }
            if st.flushing {
                self.flushed.wait(&mut st);
            } else {
                self.lead(&mut st, true)?;
            }
        }
    }

    /// Writes what is buffered on close (and syncs it unless the policy is `Never`), and
    /// the manifest if rolls under `Never` left it owed: the next open then checks every
    /// segment (rule 16).
    pub(crate) fn close(&self) {
        let mut st = self.writer.lock();
        self.wait_idle(&mut st);
        if st.poisoned.is_some() {
            return;
        }
        if !st.buf.is_empty() || st.synced < st.next {
            let sync = self.options.sync != SyncPolicy::Never;
            // A failure is logged by `lead`; there is no caller left to tell.
            let _poisoned_on_error = self.lead(&mut st, sync);
        }
        if st.poisoned.is_none()
            && let Err(e) = self.manifest.lock().write_owed()
        {
            tracing::warn!("could not write the segment manifest on close: {e}");
        }
    }

    /// The loop of the `Every` policy's background thread: syncs once the oldest
    /// unsynced record is `interval` old, until `shutdown`, or until a write or
    /// fdatasync failed (by this thread or an appender): a poisoned store writes nothing
    /// again, and `lead` logged the failure.
    pub(crate) fn flusher_loop(&self, interval: Duration) {
        let mut st = self.writer.lock();
        while !self.shutdown.load(Ordering::Acquire) && st.poisoned.is_none() {
            if st.buf.len() >= self.options.write_buffer_bytes && !st.flushing {
                // Appenders handed a full buffer over (see `hand_over_write`).
                let _poisoned_on_error = self.lead(&mut st, false);
                continue;
            }
            match st.unsynced_since {
                None => self.flusher_wake.wait(&mut st),
                Some(since) => {
                    // An interval too long to be a point in time never comes: the
                    // record count alone makes appends sync.
                    let Some(deadline) = since.checked_add(interval) else {
                        self.flusher_wake.wait(&mut st);
                        continue;
                    };
                    if Instant::now() < deadline {
                        self.flusher_wake.wait_until(&mut st, deadline);
                    } else if st.flushing {
                        self.flushed.wait_for(&mut st, interval);
                    } else {
                        let _poisoned_on_error = self.lead(&mut st, true);
                    }
                }
            }
        }
    }

    /// Stops the flusher thread.
    pub(crate) fn stop_flusher(&self) {
        let _st = self.writer.lock();
        self.shutdown.store(true, Ordering::Release);
        self.flusher_wake.notify_all();
        // Appenders waiting for it to write a full buffer write it themselves.
        self.flushed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{LogOptions, LogStore, Store};

    /// A roll writes the buffer, then truncates and fdatasyncs the segment before it
    /// counts the bytes in `seg.end`. When that fails, the records it wrote were
    /// committed (under `Every`, readers saw them) and must stay readable: readers once
    /// found them neither in the buffer nor in the file. `/dev/null` as the segment's
    /// file gives a write that succeeds and an `fdatasync` that fails (`EINVAL`, standing
    /// in for an `EIO` no test can cause).
    #[test]
    fn a_roll_whose_fdatasync_fails_keeps_the_records_it_wrote_readable() {
        let dir = tempfile::tempdir().expect("tmp");
        let options = LogOptions::new()
            .sync(SyncPolicy::Every {
                records: u64::MAX,
                interval: Duration::from_secs(60),
            })
            .preallocate(false)
            .write_buffer_bytes(1 << 20);
        let log = LogStore::open(dir.path(), options).expect("open");
        let null = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .expect("open /dev/null");
        {
            let mut st = log.shared.writer.lock();
            let seg = Arc::new(Segment::new(
                st.next,
                "/dev/null".into(),
                Some(null),
                &log.shared.files,
                SEGMENT_HEADER_LEN as u64,
                false,
                Some(Vec::new()),
            ));
            let mut segments = log.shared.segments.write();
            let last = segments.len() - 1;
            segments[last] = seg.clone();
            st.active = seg;
        }
        let payload = |i: u64| format!("record {i}").into_bytes();
        for i in 0..10 {
            log.append(&[Entry::new(b"k", &payload(i))])
                .expect("append");
        }
        let err = {
            let mut st = log.shared.writer.lock();
            log.shared.roll_while(&mut st, |_| true)
        };
        assert!(
            matches!(
                err,
                Err(Error::Io {
                    op: "fdatasync",
                    ..
                })
            ),
            "{err:?}"
        );
        let read: Vec<Vec<u8>> = log
            .read_from(0)
            .expect("read")
            .map(|r| r.expect("record").payload.to_vec())
            .collect();
        assert_eq!(read, (0..10).map(payload).collect::<Vec<_>>());
        assert!(matches!(
            log.append(&[Entry::new(b"k", b"later")]),
            Err(Error::ReadOnly(_))
        ));
    }

    /// A reader waiting for records is woken once they are committed, not once the
    /// append that committed them is done writing: under `Every` an append that reaches
    /// `records` waits for the write in flight (the flusher's fdatasync, here a leader
    /// held in flight by the test) and then leads its own. The reader must return while
    /// that write is still in flight.
    #[test]
    fn a_reader_is_woken_before_the_append_waits_for_a_write() {
        let dir = tempfile::tempdir().expect("tmp");
        let options = LogOptions::new().sync(SyncPolicy::Every {
            records: 1,
            interval: Duration::from_secs(3600),
        });
        let log = Arc::new(LogStore::open(dir.path(), options).expect("open"));
        log.shared.writer.lock().flushing = true; // a write in flight
        let (woken, reader_done) = std::sync::mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || woken.send(log.wait_for(0, None)))
        };
        // Until the reader waits (a wake-up sent before would not be for it).
        let waiting_since = Instant::now();
        while log.shared.tail.waiters() == 0 {
            assert!(
                waiting_since.elapsed() < Duration::from_secs(30),
                "no reader waits"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let appender = {
            let log = log.clone();
            std::thread::spawn(move || log.append(&[Entry::new(b"k", b"v")]))
        };
        // 30 s only bounds a hang: the write stays in flight until the reader returned.
        let end = reader_done.recv_timeout(Duration::from_secs(30));
        {
            let mut st = log.shared.writer.lock();
            st.flushing = false;
            log.shared.flushed.notify_all();
        }
        assert_eq!(
            end,
            Ok(1),
            "the reader slept while the append waited for the write in flight"
        );
        appender.join().expect("appender").expect("append");
        reader.join().expect("reader").expect("report");
    }
}
