//! Appending numbered records whose keys and payloads are functions of their offsets, so
//! a test can check every byte it reads back.

use cauce::Entry;
use cauce::store::{LogStore, Store};

/// Appends records `range` (record `o` has timestamp `o`, key `key(o)` and payload
/// `payload(o)`) in batches, a batch starting at `o` holding `batch_len(o)` records, and
/// checks the offsets each append returns.
pub fn append_records(
    log: &LogStore,
    range: std::ops::Range<u64>,
    batch_len: impl Fn(u64) -> u64,
    key: impl Fn(u64) -> Vec<u8>,
    payload: impl Fn(u64) -> Vec<u8>,
) {
    let mut i = range.start;
    while i < range.end {
        let end = (i + batch_len(i).max(1)).min(range.end);
        let keys: Vec<_> = (i..end).map(&key).collect();
        let payloads: Vec<_> = (i..end).map(&payload).collect();
        let batch: Vec<_> = (i..end)
            .map(|o| {
                let n = (o - i) as usize;
                Entry::with_timestamp(o, &keys[n], &payloads[n])
            })
            .collect();
        assert_eq!(log.append(&batch).expect("append"), i..end);
        i = end;
    }
}
