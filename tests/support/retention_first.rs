//! A store wrapper that makes retention race every reader it opens.

use cauce::store::{RecordIter, Store};
use cauce::{Offset, Result};

use crate::forward_store;

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
    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        let retain_from = (self.retain_from)(from).min(self.store.next_offset());
        if retain_from > self.store.start_offset() {
            self.store.truncate_before(retain_from)?;
        }
        self.store.read_from(from)
    }
    forward_store!(
        store;
        append,
        all_but_appends_and_reads
    );
}
