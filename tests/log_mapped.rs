//! Reading segments through memory mappings: sealed segments are mapped whole and kept
//! mapped once read (or, with `keep_mapped(false)`, read through windows of a few MiB,
//! as are written stretches of the active one). These tests cross window and segment
//! boundaries with records of every size, both ways, read the same log before and after
//! a reopen (sealed by a roll, and sealed at open), keep records whose segment retention
//! has deleted, and check that a kept mapping goes with its segment.

use cauce::Record;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};

#[path = "support/records.rs"]
mod records;

/// Record `i`'s payload: mostly small, some of 64 KiB to 1 MiB, one of 5 MiB (larger
/// than a mapped window), each byte a function of `i` and its position.
fn payload(i: u64) -> Vec<u8> {
    let len = match i {
        700 => 5 << 20,
        _ if i.is_multiple_of(97) => 64 << 10 << (i % 5),
        _ => (i * 37 % 300) as usize,
    };
    (0..len).map(|j| (i as usize * 131 + j * 7) as u8).collect()
}

fn key(i: u64) -> Vec<u8> {
    match i % 3 {
        0 => Vec::new(),
        _ => format!("key-{i}").into_bytes(),
    }
}

fn options(keep_mapped: bool) -> LogOptions {
    LogOptions::new()
        .sync(SyncPolicy::Never)
        .segment_bytes(8 << 20)
        .max_record_bytes(6 << 20)
        .keep_mapped(keep_mapped)
}

const RECORDS: u64 = 3000;

fn write(log: &LogStore) {
    records::append_records(log, 0..RECORDS, |i| 1 + i % 7, key, payload);
}

fn check_record(r: &Record) {
    assert_eq!(r.timestamp, r.offset, "timestamp of {}", r.offset);
    assert_eq!(&r.key[..], &key(r.offset)[..], "key of {}", r.offset);
    assert!(
        r.payload[..] == payload(r.offset)[..],
        "payload of {} ({} bytes)",
        r.offset,
        r.payload.len()
    );
}

/// Reads every record from `from` both ways (owned and borrowed) and checks each.
fn check_all(log: &LogStore, from: u64) {
    let mut next = from;
    for r in log.read_from(from).expect("read") {
        let r = r.expect("record");
        assert_eq!(r.offset, next);
        check_record(&r);
        next += 1;
    }
    assert_eq!(next, RECORDS);
    let mut next = from;
    let end = log
        .replay_from(from, |offset, e| {
            assert_eq!(offset, next);
            assert_eq!(e.key, &key(offset)[..], "key of {offset}");
            assert!(e.payload == &payload(offset)[..], "payload of {offset}");
            next += 1;
        })
        .expect("replay");
    assert_eq!((end, next), (RECORDS, RECORDS));
}

#[test]
fn records_read_the_same_across_windows_segments_and_reopen() {
    for keep_mapped in [true, false] {
        read_across_windows_segments_and_reopen(keep_mapped);
    }
}

fn read_across_windows_segments_and_reopen(keep_mapped: bool) {
    let options = || options(keep_mapped);
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = LogStore::open(dir.path(), options()).expect("open");
        write(&log);
        // Sealed by rolls, the active segment partly in the writer's buffer.
        for from in [0, 1, 699, 700, 701, 1500, RECORDS - 1] {
            check_all(&log, from);
        }
        log.sync().expect("sync");
    }
    let segments = std::fs::read_dir(dir.path())
        .expect("list")
        .filter(|e| {
            let path = e.as_ref().expect("entry").path();
            path.extension().is_some_and(|x| x == "log")
        })
        .count();
    assert!(segments >= 3, "the log spans {segments} segments");
    // Sealed at open; read-only too.
    let log = LogStore::open(dir.path(), options()).expect("reopen");
    for from in [0, 700, 2999] {
        check_all(&log, from);
    }
    drop(log);
    let log = LogStore::open_read_only(dir.path(), options()).expect("read-only");
    check_all(&log, 0);
}

#[test]
fn records_outlive_retention_of_their_segments() {
    for keep_mapped in [true, false] {
        keep_records_past_retention(keep_mapped);
    }
}

fn keep_records_past_retention(keep_mapped: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(dir.path(), options(keep_mapped)).expect("open");
    write(&log);
    let kept: Vec<Record> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.expect("record"))
        .collect();
    // Deletes the segments those records were read from, while they still hold them.
    log.truncate_before(RECORDS - 1).expect("retention");
    assert!(log.start_offset() > 700, "retention dropped whole segments");
    for r in &kept {
        check_record(r);
    }
    assert_eq!(kept.len() as u64, RECORDS);
}

/// The segment files of `dir` this process has mapped now, from `/proc/self/maps`, with
/// whether each was deleted since.
#[cfg(target_os = "linux")]
fn mapped_segments(dir: &std::path::Path) -> Vec<(String, bool)> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    let dir = dir.to_str().expect("utf-8 path");
    let mut found: Vec<(String, bool)> = maps
        .lines()
        .filter_map(|line| line.find(dir).map(|at| &line[at..]))
        .filter(|path| path.contains(".log"))
        .map(|path| {
            let deleted = path.ends_with(" (deleted)");
            (path.trim_end_matches(" (deleted)").to_owned(), deleted)
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// A log of `RECORDS` records over several segments, written and synced, nothing read.
#[cfg(target_os = "linux")]
fn written_log(keep_mapped: bool) -> (tempfile::TempDir, LogStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(dir.path(), options(keep_mapped)).expect("open");
    write(&log);
    log.sync().expect("sync");
    (dir, log)
}

#[cfg(target_os = "linux")]
#[test]
fn a_kept_mapping_serves_every_reader_and_goes_with_its_segment() {
    let (dir, log) = written_log(true);
    assert!(mapped_segments(dir.path()).is_empty(), "nothing read yet");
    check_all(&log, 0);
    let sealed = mapped_segments(dir.path());
    assert!(sealed.len() >= 2, "sealed segments mapped: {sealed:?}");
    assert!(sealed.iter().all(|(_, deleted)| !deleted));
    // A second reader finds the same mappings instead of making its own.
    check_all(&log, 0);
    assert_eq!(mapped_segments(dir.path()), sealed);

    // A record read from the first segment keeps its mapping past retention; once it is
    // dropped, no deleted segment stays mapped.
    let first = log
        .read_from(0)
        .expect("read")
        .next()
        .expect("one")
        .expect("record");
    log.truncate_before(RECORDS - 1).expect("retention");
    let after = mapped_segments(dir.path());
    assert!(
        after.iter().any(|(_, deleted)| *deleted),
        "the held segment is still mapped: {after:?}"
    );
    check_record(&first);
    drop(first);
    let after = mapped_segments(dir.path());
    assert!(
        after.iter().all(|(_, deleted)| !deleted),
        "deleted segments are let go: {after:?}"
    );

    // Closing the log lets every mapping go.
    drop(log);
    assert_eq!(mapped_segments(dir.path()), Vec::new());
}

#[cfg(target_os = "linux")]
#[test]
fn without_keep_mapped_a_read_leaves_nothing_mapped() {
    let (dir, log) = written_log(false);
    check_all(&log, 0);
    assert_eq!(mapped_segments(dir.path()), Vec::new());
}
