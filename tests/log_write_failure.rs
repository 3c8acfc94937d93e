//! Writes that fail: what the failing call returns, what readers see, and that a store
//! whose write or fdatasync failed writes and syncs nothing again.

use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use cauce::{Entry, Error};

fn record(i: u64) -> Vec<u8> {
    format!("record {i:06} {}", "z".repeat(40)).into_bytes()
}

/// Every record in `log` from 0 must be `record(offset)`, and there must be `n` of them.
fn assert_reads_exactly(log: &LogStore, n: u64) {
    let mut read = 0;
    for r in log.read_from(0).unwrap() {
        let r = r.unwrap();
        assert_eq!((r.offset, &r.payload[..]), (read, &record(read)[..]));
        read += 1;
    }
    assert_eq!(read, n, "records read");
}

/// A segment is created only where no file is: one with bytes in it (here planted by
/// hand, as a bug that rolled twice to the same base once left one) is a typed error
/// and stays as it was, and the store stops there with every acknowledged record kept.
#[test]
fn a_roll_never_truncates_a_file_already_at_the_new_segments_path() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = || {
        LogOptions::new()
            .sync(SyncPolicy::Always)
            .preallocate(false)
            .segment_bytes(1024)
    };
    let log = LogStore::open(tmp.path(), opts()).unwrap();
    let planted = b"not a segment, but someone's bytes";
    let planted_path = |base: u64| tmp.path().join(format!("{base:020}.log"));
    for base in 1..100 {
        std::fs::write(planted_path(base), planted).unwrap();
    }
    let mut acked = 0;
    let err = loop {
        match log.append(&[Entry::new(b"k", &record(acked))]) {
            Ok(r) => acked = r.end,
            Err(e) => break e,
        }
        assert!(acked < 100, "no roll within 100 records");
    };
    match &err {
        Error::Io { op, path, source } => {
            assert_eq!(*op, "create segment");
            assert_eq!(*path, planted_path(acked));
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        other => panic!("expected an Io error naming the file, got {other}"),
    }
    assert_eq!(std::fs::read(planted_path(acked)).unwrap(), planted);
    // The store is poisoned: no write goes ahead on a log in this state.
    assert!(matches!(
        log.append(&[Entry::new(b"k", b"later")]),
        Err(Error::ReadOnly(_))
    ));
    assert_eq!(log.next_offset(), acked);
    assert_reads_exactly(&log, acked);
    drop(log);
    for base in 1..100 {
        std::fs::remove_file(planted_path(base)).unwrap();
    }
    let log = LogStore::open(tmp.path(), opts()).unwrap();
    assert_eq!(log.next_offset(), acked);
    assert_reads_exactly(&log, acked);
}
