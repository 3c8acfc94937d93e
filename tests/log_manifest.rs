//! Rule 16's edges (`segments.meta`, the segment files that must exist): the segment that
//! holds the start after retention, every file lost, and the list that rolls under
//! `SyncPolicy::Never` leave to a later write.

use std::fs;
use std::path::{Path, PathBuf};

use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use cauce::{Entry, Error};

fn opts(sync: SyncPolicy) -> LogOptions {
    LogOptions::new()
        .sync(sync)
        .preallocate(false)
        .segment_bytes(1024)
}

fn payload(i: u64) -> Vec<u8> {
    format!("record {i:06} {}", "p".repeat(120)).into_bytes()
}

fn append(log: &LogStore, n: u64, unique_keys: bool) {
    for i in 0..n {
        let key = if unique_keys {
            format!("k{i}")
        } else {
            format!("k{}", i % 3)
        };
        log.append(&[Entry::new(key.as_bytes(), &payload(i))])
            .expect("append");
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(".log"))
        .collect();
    v.sort();
    v
}

fn base_of(p: &Path) -> u64 {
    p.file_name().unwrap().to_str().unwrap()[..20]
        .parse()
        .unwrap()
}

fn offsets(log: &LogStore, from: u64) -> Vec<u64> {
    log.read_from(from)
        .unwrap()
        .map(|r| r.unwrap().offset)
        .collect()
}

/// Retention to an offset inside segment s1 persists start.meta, then deletes s0; a crash
/// (or a failed unlink) leaves s0. Then s1, the segment that holds the start, is lost:
/// records start..s2-1 are gone. Its base is below the start, and s0 is there (rule 15
/// sees nothing), but the manifest lists it: damage.
#[test]
fn a_lost_segment_holding_the_start_is_damage_beside_a_leftover_below_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = LogStore::open(dir, opts(SyncPolicy::Always)).unwrap();
    append(&log, 60, true);
    drop(log);
    let files = segments(dir);
    assert!(files.len() >= 4, "{files:?}");
    let (s0, s1, s2) = (&files[0], base_of(&files[1]), base_of(&files[2]));
    assert!(s2 - s1 >= 2);
    let start = s1 + 1;
    let s0_bytes = fs::read(s0).unwrap();
    let log = LogStore::open(dir, opts(SyncPolicy::Always)).unwrap();
    log.truncate_before(start).unwrap();
    drop(log);
    assert!(!s0.exists());
    // A crash after start.meta was written and before s0 was unlinked.
    fs::write(s0, &s0_bytes).unwrap();
    // Sanity: that state opens clean.
    {
        let log = LogStore::open(dir, opts(SyncPolicy::Always)).unwrap();
        assert_eq!(offsets(&log, start).first(), Some(&start));
    }
    // Damage: the segment holding the start is lost.
    fs::remove_file(&files[1]).unwrap();
    match LogStore::open(dir, opts(SyncPolicy::Always)) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, files[1]),
        Ok(log) => {
            let got = offsets(&log, log.start_offset());
            let verify = log.verify();
            panic!(
                "open Ok over a lost segment {:?}: start {}, first record read {:?} \
                 (records {start}..{} gone), verify {verify:?}",
                files[1],
                log.start_offset(),
                got.first(),
                s2 - 1
            );
        }
        Err(e) => panic!("other error {e:?}"),
    }
}

/// Retention to an offset inside the last sealed segment, then every segment file lost:
/// the manifest lists the segment that holds the start and the active one. Only the
/// newest may be missing (a crashed roll): the other is damage, for both opens.
#[test]
fn every_segment_lost_after_retention_is_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = LogStore::open(dir, opts(SyncPolicy::Always)).unwrap();
    append(&log, 60, true);
    drop(log);
    let files = segments(dir);
    let n = files.len();
    let (sl, active) = (base_of(&files[n - 2]), base_of(&files[n - 1]));
    assert!(active - sl >= 2);
    let start = sl + 1;
    let log = LogStore::open(dir, opts(SyncPolicy::Always)).unwrap();
    log.truncate_before(start).unwrap();
    drop(log);
    for f in segments(dir) {
        fs::remove_file(f).unwrap();
    }
    let holder = dir.join(files[n - 2].file_name().unwrap());
    match LogStore::open_read_only(dir, opts(SyncPolicy::Always)) {
        Ok(ro) => assert!(
            matches!(ro.corruption(), Some(Error::Corrupt { path, .. }) if *path == holder),
            "{:?}",
            ro.corruption()
        ),
        Err(e) => assert!(
            matches!(&e, Error::Corrupt { path, .. } if *path == holder),
            "{e}"
        ),
    }
    match LogStore::open(dir, opts(SyncPolicy::Always)) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, holder),
        Ok(log) => panic!(
            "open Ok with every segment file gone: start {}, next {} (records {start}..{} lost)",
            log.start_offset(),
            log.next_offset(),
            active
        ),
        Err(e) => panic!("other error {e:?}"),
    }
}

/// Under `Never`, rolls list their segments in memory; a compaction writes the list,
/// also one that empties nothing.
#[test]
fn a_compaction_under_never_writes_the_segments_rolls_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let log = LogStore::open(dir, opts(SyncPolicy::Never)).unwrap();
    let before = fs::read(dir.join("segments.meta")).unwrap();
    append(&log, 60, true); // unique keys: compaction drops nothing
    let c = log.compact().unwrap();
    eprintln!("compaction {c:?}");
    let after = fs::read(dir.join("segments.meta")).unwrap();
    let files = segments(dir).len();
    // 12 header + 8 count + 8/base + 4 crc
    let listed = (after.len() - 24) / 8;
    std::mem::forget(log); // a crash: no close
    assert!(
        after != before && listed == files,
        "after a compaction under Never the manifest lists {listed} of {files} segments"
    );
}
