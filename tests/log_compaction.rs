//! Compaction while readers and appenders run, and the cursor journal's rewrite.

use std::fs;

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};

fn options() -> LogOptions {
    LogOptions::new()
        .sync(SyncPolicy::Never)
        .segment_bytes(2048)
        .index_interval_bytes(128)
}

fn payload(i: u64) -> Vec<u8> {
    format!("value-{i}-{}", "x".repeat((i % 17) as usize)).into_bytes()
}

fn key(i: u64) -> Vec<u8> {
    format!("k{}", i % 10).into_bytes()
}

fn append(log: &LogStore, range: std::ops::Range<u64>) {
    for i in range {
        log.append(&[Entry::with_timestamp(i, &key(i), &payload(i))])
            .expect("append");
    }
}

/// The offsets of every record from 0, each checked whole.
fn checked_offsets(log: &LogStore) -> Vec<u64> {
    log.read_from(0)
        .expect("read")
        .map(|r| {
            let r = r.expect("record");
            assert_eq!(
                (r.key.to_vec(), r.payload.to_vec()),
                (key(r.offset), payload(r.offset))
            );
            r.offset
        })
        .collect()
}

#[test]
fn a_reader_opened_before_compaction_keeps_reading_correct_records() {
    for keep_mapped in [false, true] {
        read_across_compaction(options().keep_mapped(keep_mapped));
    }
    // With one sealed file open at a time, the reader's segment is closed while it
    // reads: it opens it again by its path, and keeps the old file once compaction
    // renames the rewrite over that path.
    read_across_compaction(options().max_open_segments(1));
}

fn read_across_compaction(options: LogOptions) {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options).expect("open");
    append(&log, 0..500);
    let mut reader = log.read_from(0).expect("read");
    for expected in 0..100 {
        assert_eq!(reader.next().expect("some").expect("ok").offset, expected);
    }
    let report = log.compact().expect("compact");
    assert_eq!((report.kept, report.dropped), (10, 490));
    let mut last = 99;
    for r in reader {
        let r = r.expect("a reader across a compaction reads on");
        assert!(r.offset > last, "offsets keep increasing");
        assert_eq!(
            (r.key.to_vec(), r.payload.to_vec()),
            (key(r.offset), payload(r.offset))
        );
        last = r.offset;
    }
    assert_eq!(last, 499);
    let after: Vec<u64> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.expect("ok").offset)
        .collect();
    assert_eq!(after, (490..500).collect::<Vec<_>>());
}

#[test]
fn appends_during_compaction_are_kept_and_later_compactions_see_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    append(&log, 0..300);
    std::thread::scope(|s| {
        s.spawn(|| append(&log, 300..600));
        log.compact().expect("compact");
    });
    assert_eq!(log.next_offset(), 600);
    let held: Vec<u64> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.expect("ok").offset)
        .collect();
    assert!(held.ends_with(&(590..600).collect::<Vec<_>>()));
    log.compact().expect("compact again");
    drop(log);
    let log = LogStore::open(tmp.path(), options()).expect("reopen");
    let held: Vec<u64> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.expect("ok").offset)
        .collect();
    assert_eq!(held, (590..600).collect::<Vec<_>>());
    log.verify().expect("verify");
}

#[test]
fn cursor_journal_is_rewritten_when_it_grows_and_keeps_every_cursor() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    // Records for the cursors to stand after (a cursor past the end is refused).
    let entries: Vec<Entry<'_>> = (0..5000).map(|_| Entry::new(b"k", b"v")).collect();
    log.append(&entries).expect("append");
    for i in 0..5000u64 {
        log.commit_cursor(&format!("c{}", i % 3), i)
            .expect("commit");
    }
    let journal = tmp.path().join("cursors.journal");
    let len = fs::metadata(&journal).expect("stat").len();
    assert!(len < 64 << 10, "journal rewritten (now {len} bytes)");
    drop(log);
    let ro = LogStore::open_read_only(tmp.path(), options()).expect("read-only");
    assert!(
        ro.corruption().is_none(),
        "the rewritten journal is whole entries"
    );
    drop(ro);
    let log = LogStore::open(tmp.path(), options()).expect("reopen");
    for (name, last) in [("c0", 4998), ("c1", 4999), ("c2", 4997)] {
        assert_eq!(log.cursor(name).expect("cursor"), Some(last), "{name}");
    }
    // Appends go on after the rewritten entries, and a later reopen reads both.
    log.commit_cursor("c1", 5000).expect("commit after reopen");
    drop(log);
    assert_eq!(
        fs::metadata(&journal).expect("stat").len(),
        len + 13 + 2,
        "one entry appended"
    );
    let log = LogStore::open(tmp.path(), options()).expect("reopen");
    for (name, last) in [("c0", 4998), ("c1", 5000), ("c2", 4997)] {
        assert_eq!(log.cursor(name).expect("cursor"), Some(last), "{name}");
    }
}

/// Rule 9 within one process: a compaction whose swap failed leaves its commit marker
/// on disk; the next compaction first rolls that one forward, so no stale marker is on
/// disk while it writes new `.log.compact` files (after a crash there, the marker would
/// roll a half-written file over a good segment).
#[test]
fn a_compaction_after_a_failed_swap_first_finishes_the_committed_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    // One sealed file open at a time: the segments the failed swap touched are read
    // again by their paths, which by then name their rewrites.
    let log = LogStore::open(dir, options().max_open_segments(1)).expect("open");
    append(&log, 0..300);
    let marker = dir.join("compact.commit");
    let compacted = |ext: &str| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.to_str().is_some_and(|p| p.ends_with(ext)))
            .collect();
        v.sort();
        v
    };
    // The swap fails after renaming the first segment's rewrite over it: the index of
    // the segment holding offset 290, the first of the latest records (rewritten: it
    // holds older ones too), which the swap deletes before its rename, is a directory
    // with a file in it. (The segments between lose every record: they are deleted
    // after the swap, not rewritten.)
    let bases: Vec<u64> = compacted(".log")
        .iter()
        .map(|p| {
            let stem = p.file_stem().expect("name").to_string_lossy().into_owned();
            stem.parse().expect("a base")
        })
        .collect();
    let holder = bases.iter().rposition(|&b| b <= 290).expect("a segment");
    assert!(bases[holder] < 290 && holder > 0, "{bases:?}");
    let index = compacted(".log")[holder].with_extension("index");
    let _ = fs::remove_file(&index);
    fs::create_dir(&index).expect("obstacle");
    fs::write(index.join("inside"), b"x").expect("obstacle");
    assert!(log.compact().is_err(), "the swap fails");
    assert!(marker.exists(), "the failed swap leaves its marker");
    assert!(
        !compacted(".log.compact").is_empty(),
        "rewrites not swapped in yet"
    );
    let expected: Vec<u64> = (290..300).collect();
    let held = |log: &LogStore| -> Vec<u64> {
        log.read_from(0)
            .expect("read")
            .map(|r| r.expect("ok").offset)
            .collect()
    };
    assert!(held(&log).ends_with(&expected), "reads go on");
    // What failed is cleared (as a transient error passes).
    fs::remove_dir_all(&index).expect("remove the obstacle");

    let report = log
        .compact()
        .expect("the next compaction finishes the first one");
    assert!(!marker.exists(), "marker gone");
    assert!(
        compacted(".log.compact").is_empty(),
        "every rewrite swapped in"
    );
    // The rewrites are in; what it drops is the segments the first one emptied and had
    // not deleted yet.
    assert_eq!(report.kept, 10);
    assert_eq!(held(&log), expected);
    log.verify().expect("verify");
    // Compaction goes on as usual after it.
    append(&log, 300..400);
    log.compact().expect("compact");
    assert_eq!(held(&log), (390..400).collect::<Vec<_>>());
    drop(log);
    let log = LogStore::open(dir, options()).expect("reopen");
    assert_eq!(held(&log), (390..400).collect::<Vec<_>>());
    log.verify().expect("verify");
}

/// Under `SyncPolicy::Never`, a roll leaves the sealed segment to the kernel's
/// writeback. Compaction must make the sealed segments durable before a rewrite: the
/// rewrite drops a durable record superseded by one that is not, and a power loss
/// could otherwise keep the rewrite and lose the newer record, so the key. A power loss
/// cannot be simulated here; the fdatasyncs are counted.
#[test]
fn compaction_syncs_the_sealed_segments_before_it_rewrites_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    log.append(&[Entry::new(b"k", b"old")]).expect("append");
    log.sync().expect("the old record is durable");
    // The newer record of the same key, and enough after it to seal segments, none of
    // them synced.
    log.append(&[Entry::new(b"k", b"new")]).expect("append");
    append(&log, 2..200);
    let before = log.stats().syncs;
    let report = log.compact().expect("compact");
    assert!(report.dropped > 0, "the old record is dropped");
    let sealed = fs::read_dir(tmp.path())
        .expect("list")
        .filter(|e| {
            e.as_ref()
                .expect("entry")
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".log"))
        })
        .count() as u64
        - 1;
    assert!(sealed >= 2, "several sealed segments: {sealed}");
    assert!(
        log.stats().syncs - before >= sealed,
        "each of the {sealed} sealed segments fdatasync'd, {} fdatasyncs",
        log.stats().syncs - before
    );
    let k: Vec<_> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.expect("ok"))
        .filter(|r| &r.key[..] == b"k")
        .map(|r| r.payload.to_vec())
        .collect();
    assert_eq!(k, [b"new".to_vec()]);
}

/// A segment that compaction leaves without a record is deleted, not kept as an empty
/// file (but for the first, where the log starts): a log compacted again and again keeps
/// a file per segment with live records, not one per compaction, and reads and reopens
/// with the latest record of every key.
#[test]
fn segments_emptied_by_compaction_are_deleted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    let files = || {
        fs::read_dir(tmp.path())
            .expect("list")
            .filter(|e| {
                let name = e.as_ref().expect("entry").file_name();
                name.to_string_lossy().ends_with(".log")
            })
            .count()
    };
    let mut next = 0;
    for _ in 0..60 {
        // Every key written again: everything sealed before is superseded.
        append(&log, next..next + 10);
        next += 10;
        let report = log.compact().expect("compact");
        assert_eq!(report.kept, 10);
    }
    // The first segment, the one or two holding the last ten records, the active one.
    assert!(files() <= 4, "{} segment files", files());
    let latest: Vec<u64> = (next - 10..next).collect();
    assert_eq!(checked_offsets(&log), latest);
    assert_eq!(log.start_offset(), 0);
    log.verify().expect("verify");
    drop(log);
    let log = LogStore::open(tmp.path(), options()).expect("reopen");
    assert_eq!(checked_offsets(&log), latest);
    assert_eq!(log.next_offset(), next);
    append(&log, next..next + 5);
    assert_eq!(log.next_offset(), next + 5);
}

/// A compaction that fails after its swap (deleting an emptied segment, here) leaves the
/// store reading the files as they are: the rewrites swapped in, the emptied segments
/// still there; the next compaction finishes the job.
#[test]
fn a_compaction_that_fails_after_its_swap_leaves_the_log_readable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let log =
        LogStore::open(dir, options().segment_bytes(1024).max_open_segments(1)).expect("open");
    append(&log, 0..300);
    let mut bases: Vec<u64> = fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| {
            let name = e.expect("entry").file_name();
            let name = name.to_str()?.strip_suffix(".log")?.to_owned();
            name.parse().ok()
        })
        .collect();
    bases.sort_unstable();
    // The second segment is emptied, so deleted after the swap: its index path is a
    // directory with a file in it, which the deletion cannot remove.
    let index = dir.join(format!("{:020}.index", bases[1]));
    let _ = fs::remove_file(&index);
    fs::create_dir(&index).expect("obstacle");
    fs::write(index.join("inside"), b"x").expect("obstacle");
    assert!(log.compact().is_err(), "the deletion fails");
    assert!(!dir.join("compact.commit").exists(), "the swap is done");
    fs::remove_dir_all(&index).expect("remove the obstacle");
    let read = checked_offsets(&log);
    assert!(read.ends_with(&(290..300).collect::<Vec<_>>()), "{read:?}");
    let report = log.compact().expect("the next compaction");
    assert_eq!(report.kept, 10);
    assert_eq!(checked_offsets(&log), (290..300).collect::<Vec<_>>());
    log.verify().expect("verify");
    drop(log);
    let log = LogStore::open(dir, options()).expect("reopen");
    assert_eq!(checked_offsets(&log), (290..300).collect::<Vec<_>>());
}

/// A read-only store's view is the log as it was when opened, whatever a writer beside
/// it compacts or trims meanwhile: it keeps its files open, whatever the limit of open
/// files says (a file opened again by its path could be a rewrite, shorter than the
/// view's mapping of it).
#[test]
fn a_read_only_view_keeps_its_files_while_a_writer_compacts_and_trims() {
    for trim in [false, true] {
        let tmp = tempfile::tempdir().expect("tmp");
        let options = LogOptions::new()
            .sync(SyncPolicy::Never)
            .preallocate(false)
            .segment_bytes(64 << 10);
        let writer = LogStore::open(tmp.path(), options.clone()).expect("open");
        let big = vec![b'x'; 200];
        writer
            .append(&[Entry::new(b"unique", &big)])
            .expect("append");
        for _ in 0..1500 {
            writer.append(&[Entry::new(b"dup", &big)]).expect("append");
        }
        writer.sync().expect("sync");
        let end = writer.next_offset();
        let view = LogStore::open_read_only(tmp.path(), options.max_open_segments(1))
            .expect("read-only open");
        if trim {
            writer.truncate_before(end - 1).expect("retention");
        } else {
            writer.compact().expect("compact");
        }
        // Into the middle of the first segment, then every record of the view.
        let at = view.read_from(250).expect("read").next().expect("a record");
        assert_eq!(at.expect("record").offset, 250);
        let mut count = 0;
        for r in view.read_from(0).expect("read") {
            let r = r.expect("the view reads on");
            assert_eq!(r.offset, count);
            count += 1;
        }
        assert_eq!(count, end);
    }
}

/// Recovery rule 16 beside a running writer: a read-only open takes no lock, and reads
/// the segment manifest and the start while the writer rolls (listing segments before
/// creating them), compacts (unlisting the ones it empties before deleting them) and
/// trims. It lists the directory before and after, so it takes none of those for a
/// missing file. (The window between a listing and a read is too short for this test
/// to catch an open that lists once; it does catch, within a second, a compaction that
/// deletes the segments it empties before it unlists them.)
#[test]
fn read_only_opens_beside_a_writer_that_rolls_compacts_and_trims_find_no_file_missing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().expect("tmp");
    // Durable rolls write the manifest at each roll.
    let options = options().sync(SyncPolicy::Always).preallocate(false);
    let writer = LogStore::open(tmp.path(), options.clone()).expect("open");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let from = writer.next_offset();
                let batch: Vec<(Vec<u8>, Vec<u8>)> =
                    (from..from + 40).map(|i| (key(i), payload(i))).collect();
                for chunk in batch.chunks(8) {
                    let entries: Vec<Entry<'_>> =
                        chunk.iter().map(|(k, p)| Entry::new(k, p)).collect();
                    writer.append(&entries).expect("append");
                }
                writer.compact().expect("compact");
                round += 1;
                if round.is_multiple_of(4) {
                    writer
                        .truncate_before(writer.next_offset() - 20)
                        .expect("retention");
                }
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut opened = 0;
        // Not a panic here: the writer must stop before the scope can end.
        let mut failure = None;
        while failure.is_none() && std::time::Instant::now() < deadline {
            match LogStore::open_read_only(tmp.path(), options.clone()) {
                Ok(view) => match view.corruption() {
                    None => opened += 1,
                    Some(e) => failure = Some(e.to_string()),
                },
                // A file deleted between the listing and its open: the view is the log
                // as it was listed, and that file is gone.
                Err(cauce::Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failure = Some(e.to_string()),
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(failure, None, "read-only open beside a writer");
        assert!(opened > 0);
    });
}
