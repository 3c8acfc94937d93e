//! [`MemoryStore`]: a [`Store`] held in memory, for tests, caches and as the model that
//! other stores are checked against.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;

use super::tail::Tail;
use super::{Compaction, RecordIter, Snapshot, Store, check_name, check_read_range};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record};

/// A [`Store`] in memory: every operation is immediate and "durable" for the life of
/// the value. Cloning gives another handle to the same store.
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
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    data: RwLock<Data>,
    tail: Tail,
}

#[derive(Debug, Default)]
struct Data {
    /// Held records in offset order (compaction may leave gaps in offsets).
    records: VecDeque<Record>,
    start: Offset,
    next: Offset,
    cursors: HashMap<String, Offset>,
    snapshots: HashMap<String, Snapshot>,
}

impl Data {
    /// Index in `records` of the first record with offset `>= offset`.
    fn index_of(&self, offset: Offset) -> usize {
        self.records.partition_point(|r| r.offset < offset)
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
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

/// Records are copied out in chunks of this many, to hold the lock briefly.
const READ_CHUNK: usize = 256;

struct Reader {
    shared: Arc<Shared>,
    position: Offset,
    buffered: VecDeque<Record>,
    failed: bool,
}

impl Iterator for Reader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        if let Some(r) = self.buffered.pop_front() {
            return Some(Ok(r));
        }
        let data = self.shared.data.read();
        if self.position < data.start {
            self.failed = true;
            return Some(Err(Error::OffsetOutOfRange {
                requested: self.position,
                start: data.start,
                end: data.next,
            }));
        }
        let from = data.index_of(self.position);
        self.buffered
            .extend(data.records.range(from..).take(READ_CHUNK).cloned());
        drop(data);
        let r = self.buffered.pop_front()?;
        self.position = self.buffered.back().map_or(r.offset, |last| last.offset) + 1;
        Some(Ok(r))
    }
}

impl Store for MemoryStore {
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        let mut data = self.shared.data.write();
        let first = data.next;
        for (i, entry) in batch.iter().enumerate() {
            data.records.push_back(entry.to_record(first + i as Offset));
        }
        data.next = first + batch.len() as Offset;
        let next = data.next;
        drop(data);
        self.shared.tail.publish(next);
        Ok(first..next)
    }

    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        let data = self.shared.data.read();
        check_read_range(from, data.start, data.next)?;
        Ok(Box::new(Reader {
            shared: self.shared.clone(),
            position: from,
            buffered: VecDeque::new(),
            failed: false,
        }))
    }

    fn start_offset(&self) -> Offset {
        self.shared.data.read().start
    }

    fn next_offset(&self) -> Offset {
        self.shared.tail.get()
    }

    fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
        self.shared.tail.wait_for(offset, timeout)
    }

    fn wake_waiters(&self) {
        self.shared.tail.wake();
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn truncate_before(&self, offset: Offset) -> Result<()> {
        let mut data = self.shared.data.write();
        if offset > data.next {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                start: data.start,
                end: data.next,
            });
        }
        if offset > data.start {
            let drop_count = data.index_of(offset);
            data.records.drain(..drop_count);
            data.start = offset;
        }
        Ok(())
    }

    fn compact(&self) -> Result<Compaction> {
        let mut data = self.shared.data.write();
        let mut latest: HashMap<&[u8], Offset> = HashMap::new();
        for r in &data.records {
            latest.insert(&r.key, r.offset);
        }
        let keep: Vec<bool> = data
            .records
            .iter()
            .map(|r| r.key.is_empty() || latest.get(&r.key[..]) == Some(&r.offset))
            .collect();
        drop(latest);
        let before = data.records.len() as u64;
        let mut flags = keep.into_iter();
        data.records.retain(|_| flags.next().unwrap_or(true));
        let kept = data.records.len() as u64;
        Ok(Compaction {
            until: data.next,
            kept,
            dropped: before - kept,
        })
    }

    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
        check_name(name)?;
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
}
