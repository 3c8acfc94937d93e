//! [`OwnedLog`]: a log store the cluster opened itself, and releases at shutdown.

use std::ops::Range;
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Timestamp};
use crate::store::{CompactOptions, Compaction, Deferred, LogStore, RecordIter, Snapshot, Store};

/// A [`LogStore`] that can be closed while other handles to it (clients of a shut-down
/// cluster) still exist: closing drops the store, which syncs it and releases the
/// directory's lock, so the directory can be opened again at once. Calls after closing
/// are [`Error::Closed`]; the log's offsets read as they were when it closed.
pub(crate) struct OwnedLog {
    log: ArcSwapOption<LogStore>,
    /// The start and next offsets when it closed.
    closed_at: parking_lot::Mutex<(Offset, Offset)>,
}

impl OwnedLog {
    pub(crate) fn new(log: LogStore) -> Self {
        OwnedLog {
            log: ArcSwapOption::from_pointee(log),
            closed_at: parking_lot::Mutex::new((0, 0)),
        }
    }

    /// Drops the store (once the calls in flight are done with it).
    pub(crate) fn close(&self) {
        let mut closed_at = self.closed_at.lock();
        if let Some(log) = self.log.swap(None) {
            *closed_at = (log.start_offset(), log.next_offset());
        }
    }

    fn with<T>(&self, f: impl FnOnce(&LogStore) -> Result<T>) -> Result<T> {
        match self.log.load().as_deref() {
            Some(log) => f(log),
            None => Err(Error::Closed),
        }
    }

    fn read<T>(&self, closed: T, f: impl FnOnce(&LogStore) -> T) -> T {
        match self.log.load().as_deref() {
            Some(log) => f(log),
            None => closed,
        }
    }
}

impl Store for OwnedLog {
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        self.with(|l| l.append(batch))
    }
    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        self.with(|l| l.read_from(from))
    }
    // A replay calls handlers, which can stall for as long as they like: it runs on a
    // reader taken from the store, not inside `with`, so that closing the store at
    // shutdown releases the directory even while a left-behind instance replays.
    // `replay_from` is this to the end (the trait's default).
    fn replay_range(
        &self,
        from: Offset,
        until: Offset,
        f: &mut dyn FnMut(Offset, Entry<'_>),
    ) -> Result<Offset> {
        self.with(|l| l.reader_at(from))?.replay(until, f)
    }
    fn offset_for_timestamp(&self, at: Timestamp) -> Result<Option<Offset>> {
        self.with(|l| l.offset_for_timestamp(at))
    }
    fn start_offset(&self) -> Offset {
        match self.log.load().as_deref() {
            Some(log) => log.start_offset(),
            None => self.closed_at.lock().0,
        }
    }
    fn next_offset(&self) -> Offset {
        match self.log.load().as_deref() {
            Some(log) => log.next_offset(),
            None => self.closed_at.lock().1,
        }
    }
    fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
        self.read(0, |l| l.wait_for(offset, timeout))
    }
    fn poll_committed(&self, offset: Offset, cx: &mut std::task::Context<'_>) -> Poll<Offset> {
        self.read(Poll::Ready(0), |l| l.poll_committed(offset, cx))
    }
    fn wake_waiters(&self) {
        self.read((), |l| l.wake_waiters())
    }
    fn sync(&self) -> Result<()> {
        self.with(|l| l.sync())
    }
    fn append_waits_for_disk(&self) -> bool {
        self.read(false, |l| l.append_waits_for_disk())
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> Result<Deferred> {
        self.with(|l| l.append_deferred(batch))
    }
    fn wait_appended(&self, end: Offset) -> Result<()> {
        match self.log.load().as_deref() {
            Some(log) => log.wait_appended(end),
            // Closed: what was visible then was durable (the close's own sync of the
            // rest may have failed, unseen here).
            None if end <= self.closed_at.lock().1 => Ok(()),
            None => Err(Error::Closed),
        }
    }
    fn sync_until(&self, offset: Offset) -> Result<()> {
        self.with(|l| l.sync_until(offset))
    }
    fn truncate_before(&self, offset: Offset) -> Result<()> {
        self.with(|l| l.truncate_before(offset))
    }
    fn compact_with(&self, options: CompactOptions) -> Result<Compaction> {
        self.with(|l| l.compact_with(options))
    }
    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
        self.with(|l| l.commit_cursor(name, offset))
    }
    fn cursor(&self, name: &str) -> Result<Option<Offset>> {
        self.with(|l| l.cursor(name))
    }
    fn save_snapshot(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()> {
        self.with(|l| l.save_snapshot(name, offset, blob))
    }
    fn latest_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        self.with(|l| l.latest_snapshot(name))
    }
}
