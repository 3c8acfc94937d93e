//! An index file built from another file of a segment (the one a compaction replaced)
//! passes the spot checks an open makes (its first, middle and last entries point at
//! batch headers with their offsets) and is wrong in between: a read that seeks through
//! it started at a later batch and skipped records without a word, or failed on a
//! healthy log as corrupt. Readers now check the entry they seek to, and a compaction's
//! swap removes the old index before the rename, also when an open finishes a swap a
//! crash interrupted.
//!
//! Segment 0 is laid out so that the compacted file matches the old one byte for byte
//! at the index's first, middle and last entries: dropping two small records shrinks it
//! by 48 bytes, and two batches of two 256 KiB records, which the rewrite splits, grow
//! it back by 24 bytes each.

use std::fs;

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store};

const BIG_PAYLOAD: usize = 262_144 - 20 - 3; // record_len = 256 KiB exactly (key of 3 bytes)

fn big(i: u64) -> (Vec<u8>, Vec<u8>) {
    (format!("k{i:02}").into_bytes(), vec![i as u8; BIG_PAYLOAD])
}

#[test]
fn a_stale_index_left_by_a_crash_mid_swap_does_not_make_a_read_skip_a_record() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let log = LogStore::open(dir, options()).expect("open");
    let old_index = build(&log, dir);

    let report = log.compact().expect("compact");
    assert_eq!(report.dropped, 2, "{report:?}");
    let expected: Vec<u64> = log
        .read_from(0)
        .unwrap()
        .map(|r| r.unwrap().offset)
        .collect();
    assert_eq!(
        expected,
        [0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    );
    drop(log);

    // The state a crash between the rename and the index's removal leaves: the marker
    // listing base 0, the rewrite renamed over 0.log, the old index still there.
    fs::write(dir.join(format!("{:020}.index", 0)), &old_index).unwrap();
    let mut marker = Vec::new();
    marker.extend_from_slice(b"CAUCECMP");
    marker.extend_from_slice(&1u64.to_le_bytes());
    marker.extend_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&marker);
    marker.extend_from_slice(&crc.to_le_bytes());
    fs::write(dir.join("compact.commit"), &marker).unwrap();

    let log = LogStore::open(dir, options()).expect("reopen rolls the swap forward");
    assert!(!dir.join("compact.commit").exists());
    log.verify().expect("verify finds nothing wrong");
    let from_3: Vec<(u64, Vec<u8>)> = log
        .read_from(3)
        .unwrap()
        .map(|r| r.unwrap())
        .map(|r| (r.offset, r.key.to_vec()))
        .take(2)
        .collect();
    assert_eq!(
        from_3,
        [(3, b"y".to_vec()), (4, b"k04".to_vec())],
        "read_from(3) must start at the record at offset 3"
    );
}

/// Segment 0 (3,146,168 bytes): [b0, x, z] [y] [b4] [b5 b6] [b7 b8] [b9]..[b14] [x' z'];
/// the append after it rolls. Returns segment 0's index file as the roll wrote it.
fn build(log: &LogStore, dir: &std::path::Path) -> Vec<u8> {
    let (k, p) = big(0);
    assert_eq!(
        log.append(&[
            Entry::new(&k, &p),
            Entry::new(b"x", b"old"),
            Entry::new(b"z", b"old")
        ])
        .unwrap(),
        0..3
    );
    assert_eq!(log.append(&[Entry::new(b"y", b"yyy")]).unwrap(), 3..4);
    let (k, p) = big(4);
    assert_eq!(log.append(&[Entry::new(&k, &p)]).unwrap(), 4..5);
    for first in [5u64, 7] {
        let (k1, p1) = big(first);
        let (k2, p2) = big(first + 1);
        log.append(&[Entry::new(&k1, &p1), Entry::new(&k2, &p2)])
            .unwrap();
    }
    for i in 9..15 {
        let (k, p) = big(i);
        assert_eq!(log.append(&[Entry::new(&k, &p)]).unwrap(), i..i + 1);
    }
    assert_eq!(
        log.append(&[Entry::new(b"x", b"new"), Entry::new(b"z", b"new")])
            .unwrap(),
        15..17
    );
    let (k, p) = big(17);
    assert_eq!(log.append(&[Entry::new(&k, &p)]).unwrap(), 17..18);
    assert!(dir.join(format!("{:020}.log", 17)).exists(), "rolled");
    fs::read(dir.join(format!("{:020}.index", 0))).expect("the roll wrote segment 0's index")
}

fn options() -> LogOptions {
    LogOptions::new().segment_bytes(3_146_168 + 64)
}

#[test]
fn a_stale_index_does_not_make_a_read_from_a_healthy_log_fail() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let log = LogStore::open(dir, options()).expect("open");
    let old_index = build(&log, dir);
    log.compact().expect("compact");
    drop(log);
    fs::write(dir.join(format!("{:020}.index", 0)), &old_index).unwrap();
    let log = LogStore::open(dir, options()).expect("reopen");
    log.verify().expect("verify finds nothing wrong");
    let r = log.read_from(5).unwrap().next().unwrap();
    assert_eq!(r.expect("record 5 of a healthy log").offset, 5);
}
