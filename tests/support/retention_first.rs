//! A store wrapper that makes retention race every reader it opens.

use std::ops::Range;
use std::time::Duration;

use cauce::store::{Compaction, RecordIter, Snapshot, Store};
use cauce::{Entry, Offset, Result};

/// A store whose retention runs at the worst moment: every `read_from` first drops the
/// records before `retain_from(requested)` (when that moves the start), then opens the
/// reader. This is the race between reading the start offset and opening a reader
/// there, made to happen every time.
pub struct RetentionFirst<S, F> {
    pub store: S,
    pub retain_from: F,
}

impl<S, F> Store for RetentionFirst<S, F>
where
    S: Store,
    F: Fn(Offset) -> Offset + Send + Sync + 'static,
{
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        self.store.append(batch)
    }
    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        let retain_from = (self.retain_from)(from).min(self.store.next_offset());
        if retain_from > self.store.start_offset() {
            self.store.truncate_before(retain_from)?;
        }
        self.store.read_from(from)
    }
    fn start_offset(&self) -> Offset {
        self.store.start_offset()
    }
    fn next_offset(&self) -> Offset {
        self.store.next_offset()
    }
    fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
        self.store.wait_for(offset, timeout)
    }
    fn wake_waiters(&self) {
        self.store.wake_waiters()
    }
    fn sync(&self) -> Result<()> {
        self.store.sync()
    }
    fn truncate_before(&self, offset: Offset) -> Result<()> {
        self.store.truncate_before(offset)
    }
    fn compact_with(&self, options: cauce::store::CompactOptions) -> Result<Compaction> {
        self.store.compact_with(options)
    }
    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
        self.store.commit_cursor(name, offset)
    }
    fn cursor(&self, name: &str) -> Result<Option<Offset>> {
        self.store.cursor(name)
    }
    fn save_snapshot(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()> {
        self.store.save_snapshot(name, offset, blob)
    }
    fn latest_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        self.store.latest_snapshot(name)
    }
}
