//! Fuzzes the segment reader and the recovery scan: arbitrary bytes as the newest
//! segment of a log (either the whole file, or batches behind a valid header).
//!
//! Invariants: nothing panics or hangs; a read-only open never fails on a batch's bytes
//! alone; a writable open either refuses with `Error::Corrupt` or recovers a log that
//! then verifies clean and reads without error.
#![no_main]

use std::fs;

use cauce::Error;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use libfuzzer_sys::fuzz_target;

fn options() -> LogOptions {
    LogOptions::new()
        .sync(SyncPolicy::Never)
        .preallocate(false)
        .max_record_bytes(1 << 16)
        .index_interval_bytes(64)
}

fn read_everything(log: &LogStore) -> Result<usize, Error> {
    let mut n = 0;
    for r in log.read_from(log.start_offset())? {
        r?;
        n += 1;
    }
    Ok(n)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let segment = dir.join(format!("{:020}.log", 0));
    if mode & 1 == 0 {
        fs::write(&segment, rest).expect("write segment");
    } else {
        // A valid, empty segment (its header), then the fuzzer's bytes as batches.
        drop(LogStore::open(dir, options()).expect("create"));
        let mut bytes = fs::read(&segment).expect("read header");
        bytes.truncate(32);
        bytes.extend_from_slice(rest);
        fs::write(&segment, bytes).expect("write segment");
    }
    if let Ok(log) = LogStore::open_read_only(dir, options()) {
        let _ = read_everything(&log);
        let _ = log.verify();
    }
    match LogStore::open(dir, options()) {
        Ok(log) => {
            log.verify().expect("a recovered log verifies clean");
            read_everything(&log).expect("a recovered log reads without error");
        }
        Err(Error::Corrupt { .. }) => {}
        Err(e) => panic!("unexpected error: {e}"),
    }
});
