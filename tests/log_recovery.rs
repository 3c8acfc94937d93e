//! Recovery rules of `cauce::store::log` (one test per rule, named after it), and the
//! damage tests: truncation at every byte of the final records, random byte flips,
//! damaged indexes, a locked directory.

use std::fs;
use std::path::{Path, PathBuf};

use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use cauce::{Entry, Error, Record};
use rand::{RngExt, SeedableRng};

#[path = "support/records.rs"]
mod records;

fn key(i: u64) -> Vec<u8> {
    format!("key-{}", i % 5).into_bytes()
}

fn payload(i: u64) -> Vec<u8> {
    (0..(i * 37 % 200)).map(|j| (i * 131 + j) as u8).collect()
}

/// Appends records `range` in batches of `per_batch`.
fn append(log: &LogStore, range: std::ops::Range<u64>, per_batch: u64) {
    records::append_records(log, range, |_| per_batch, key, payload);
}

/// Segments that are not preallocated, so a file's end is its data's end and the tests
/// can cut and extend it; the crash test and the conformance suite cover preallocation.
fn options() -> LogOptions {
    LogOptions::new()
        .preallocate(false)
        .sync(SyncPolicy::Always)
        .segment_bytes(4096)
        .index_interval_bytes(256)
}

fn write_log(dir: &Path, records: u64, per_batch: u64) {
    let log = LogStore::open(dir, options()).expect("open");
    append(&log, 0..records, per_batch);
}

fn read_all(log: &LogStore) -> Vec<Record> {
    log.read_from(log.start_offset())
        .expect("read_from")
        .collect::<Result<Vec<_>, _>>()
        .expect("records")
}

fn assert_is_original(r: &Record) {
    assert_eq!(r.key, key(r.offset), "key of {}", r.offset);
    assert_eq!(r.payload, payload(r.offset), "payload of {}", r.offset);
    assert_eq!(r.timestamp, r.offset, "timestamp of {}", r.offset);
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

fn with_extension(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// Byte positions where each batch of a segment ends, from the documented format:
/// a 32-byte header, then batches of a 24-byte header, records of 20 bytes plus key
/// and payload, padded to 8.
fn batch_ends(records: &[(u64, u64)]) -> Vec<(u64, u64)> {
    // (first offset, count) per batch -> (end position, one past the last offset)
    let mut pos = 32u64;
    let mut out = Vec::new();
    for &(first, count) in records {
        let body: u64 = (first..first + count)
            .map(|o| 20 + key(o).len() as u64 + payload(o).len() as u64)
            .sum();
        pos += (24 + body).div_ceil(8) * 8;
        out.push((pos, first + count));
    }
    out
}

fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).expect("read");
    bytes[at as usize] ^= 0x5a;
    fs::write(path, bytes).expect("write");
}

#[test]
fn truncating_the_last_segment_at_any_byte_keeps_exactly_the_whole_records_before_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let original = tmp.path().join("original");
    // 3 records per batch; small segments so the last one is short.
    write_log(&original, 60, 3);
    let last = segments(&original).pop().expect("a segment");
    let last_name = last.file_name().expect("name").to_owned();
    let base: u64 = last_name.to_str().expect("utf8")[..20]
        .parse()
        .expect("base");
    let bytes = fs::read(&last).expect("read");
    let batches: Vec<(u64, u64)> = (base..60).step_by(3).map(|f| (f, 3.min(60 - f))).collect();
    let ends = batch_ends(&batches);
    assert_eq!(
        ends.last().map(|e| e.0),
        Some(bytes.len() as u64),
        "format as documented"
    );
    let work = tmp.path().join("work");
    copy_dir(&original, &work);
    for cut in 0..=bytes.len() {
        fs::write(work.join(&last_name), &bytes[..cut]).expect("cut");
        let log = LogStore::open(&work, options())
            .unwrap_or_else(|e| panic!("open after a cut at byte {cut}: {e}"));
        let whole = ends
            .iter()
            .take_while(|(end, _)| *end <= cut as u64)
            .last()
            .map_or(base, |(_, next)| *next);
        let got = read_all(&log);
        assert_eq!(got.len() as u64, whole, "cut at byte {cut}");
        got.iter().for_each(assert_is_original);
        assert_eq!(log.next_offset(), whole, "cut at byte {cut}");
    }
}

#[test]
fn random_byte_flips_give_a_typed_error_or_a_cut_tail_never_a_wrong_record() {
    let tmp = tempfile::tempdir().expect("tmp");
    let original = tmp.path().join("original");
    write_log(&original, 120, 4);
    let files: Vec<PathBuf> = segments(&original);
    assert!(files.len() >= 3, "several segments");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut errors, mut cut, mut intact) = (0, 0, 0);
    for trial in 0..300 {
        let work = tmp.path().join(format!("t{trial}"));
        copy_dir(&original, &work);
        let file = &files[rng.random_range(0..files.len())];
        let target = work.join(file.file_name().expect("name"));
        let len = fs::metadata(&target).expect("stat").len();
        let at = rng.random_range(0..len);
        flip(&target, at);
        for read_only in [false, true] {
            let opened = if read_only {
                LogStore::open_read_only(&work, options())
            } else {
                LogStore::open(&work, options())
            };
            let log = match opened {
                Ok(log) => log,
                Err(Error::Corrupt { .. }) => {
                    errors += 1;
                    continue;
                }
                Err(e) => panic!("trial {trial}: not a typed corruption error: {e}"),
            };
            let mut n = 0;
            let mut failed = false;
            for r in log.read_from(log.start_offset()).expect("read") {
                match r {
                    Ok(r) => {
                        assert!(!failed, "trial {trial}: a record after an error");
                        assert_is_original(&r);
                        n += 1;
                    }
                    Err(Error::Corrupt { .. }) => failed = true,
                    Err(e) => panic!("trial {trial}: not a typed corruption error: {e}"),
                }
            }
            if failed {
                errors += 1;
            } else if n < 120 {
                cut += 1;
            } else {
                intact += 1;
            }
        }
        fs::remove_dir_all(&work).expect("clean");
    }
    eprintln!("{errors} errors, {cut} cut, {intact} intact");
    assert!(
        errors > 0 && cut + intact > 0,
        "{errors} errors, {cut} cut, {intact} intact"
    );
}

/// Rule 1: a batch header's checksum is checked before its length is trusted.
#[test]
fn batch_header_checksum_is_checked_before_its_length_is_trusted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 10, 2);
    let last = segments(&dir).pop().expect("segment");
    // A header claiming a 4 GiB body, once with a bad checksum, once with a good one.
    for good_crc in [false, true] {
        let mut h = [0u8; 24];
        h[4..8].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[16..24].copy_from_slice(&10u64.to_le_bytes());
        let crc = if good_crc {
            crc32c::crc32c(&h[4..24])
        } else {
            0xdead_beef
        };
        h[0..4].copy_from_slice(&crc.to_le_bytes());
        let mut bytes = fs::read(&last).expect("read");
        let before = bytes.len();
        bytes.extend_from_slice(&h);
        fs::write(&last, &bytes).expect("write");
        let log = LogStore::open(&dir, options()).expect("a lying header is a torn tail");
        assert_eq!(read_all(&log).len(), 10);
        drop(log);
        assert_eq!(
            fs::metadata(&last).expect("stat").len(),
            before as u64,
            "cut"
        );
    }
}

/// Rule 2: a torn tail is cut, on disk, and never returned.
#[test]
fn torn_tail_is_cut_not_returned() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 10, 1);
    let last = segments(&dir).pop().expect("segment");
    let bytes = fs::read(&last).expect("read");
    // Keep half of the last batch.
    let cut_len = bytes.len() - 20;
    fs::write(&last, &bytes[..cut_len]).expect("write");
    let log = LogStore::open(&dir, options()).expect("open");
    let got = read_all(&log);
    assert_eq!(got.len(), 9);
    got.iter().for_each(assert_is_original);
    assert!(
        fs::metadata(&last).expect("stat").len() < cut_len as u64,
        "cut on disk"
    );
    append(&log, 9..12, 1);
    drop(log);
    let log = LogStore::open(&dir, options()).expect("reopen");
    assert_eq!(read_all(&log).len(), 12);
}

/// Rule 2: the length of a torn batch whose header checksum holds says where it ends, so
/// a valid batch inside its body (a payload that holds this format's bytes) is its
/// user's data, not a batch after it: the tear is still a torn tail, for a writable open
/// and a read-only one.
#[test]
fn a_torn_batch_whose_payload_holds_a_batch_is_a_torn_tail() {
    let tmp = tempfile::tempdir().expect("tmp");
    let options = || options().segment_bytes(1 << 20);
    // The encoded batch of record 3, taken from a log of its own: the offset a batch
    // after the three records below would start at.
    let scratch = tmp.path().join("scratch");
    LogStore::open(&scratch, options())
        .map(|log| append(&log, 0..4, 1))
        .expect("open scratch");
    let ends = single_record_batch_ends(4);
    let scratch_bytes = fs::read(&segments(&scratch)[0]).expect("read");
    let mut payload = scratch_bytes[ends[2].0 as usize..ends[3].0 as usize].to_vec();
    payload.extend_from_slice(&[0xab; 4096]);

    let dir = tmp.path().join("log");
    let log = LogStore::open(&dir, options()).expect("open");
    append(&log, 0..3, 1);
    // A 4-byte key puts the payload 8-aligned in the file (24 + 20 + 4 bytes of headers
    // and key), where a scan that trusted no length would look for a batch.
    log.append(&[Entry::new(b"four", &payload)])
        .expect("append");
    drop(log);
    let last = segments(&dir).pop().expect("segment");
    assert_eq!(segments(&dir).len(), 1);
    let whole = ends[2].0;
    let bytes = fs::read(&last).expect("read");
    // The crash: only the first 300 bytes of the last batch reached the file.
    fs::write(&last, &bytes[..whole as usize + 300]).expect("cut");

    let ro = LogStore::open_read_only(&dir, options()).expect("read-only open");
    assert!(ro.corruption().is_none(), "{:?}", ro.corruption());
    assert_eq!(read_all(&ro).len(), 3);
    drop(ro);
    let log = LogStore::open(&dir, options()).expect("a torn tail is cut, not damage");
    let got = read_all(&log);
    assert_eq!(got.len(), 3);
    got.iter().for_each(assert_is_original);
    assert_eq!(
        fs::metadata(&last).expect("stat").len(),
        whole,
        "cut on disk"
    );
}

/// Rule 3: a bad batch followed by a valid one is corruption, reported with its file,
/// position and offset; a read-only open gets everything before it.
#[test]
fn corruption_in_the_middle_is_an_error_not_a_cut() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 8, 2);
    let last = segments(&dir).pop().expect("segment");
    assert_eq!(segments(&dir).len(), 1);
    let ends = batch_ends(&[(0, 2), (2, 2), (4, 2), (6, 2)]);
    // Flip a byte inside the body of the second batch.
    flip(&last, ends[0].0 + 30);
    match LogStore::open(&dir, options()) {
        Err(Error::Corrupt {
            path,
            position,
            offset,
            ..
        }) => {
            assert_eq!(path, last);
            assert_eq!(position, ends[0].0);
            assert_eq!(offset, Some(2));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let log = LogStore::open_read_only(&dir, options()).expect("read-only open");
    assert!(matches!(log.corruption(), Some(Error::Corrupt { .. })));
    let got = read_all(&log);
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), [0, 1]);
    assert!(matches!(
        log.append(&[Entry::new(b"k", b"v")]),
        Err(Error::ReadOnly(_))
    ));
    assert_eq!(
        fs::metadata(&last).expect("stat").len(),
        ends[3].0,
        "nothing cut"
    );
}

/// Batch ends (as [`batch_ends`]) of a log of `n` records appended one at a time.
fn single_record_batch_ends(n: u64) -> Vec<(u64, u64)> {
    batch_ends(&(0..n).map(|o| (o, 1)).collect::<Vec<_>>())
}

/// A log of ten records, one a batch, and the cursor `consumer` committed at `at`.
fn ten_records_with_a_cursor_at(dir: &Path, at: u64) {
    write_log(dir, 10, 1);
    LogStore::open(dir, options())
        .expect("open")
        .commit_cursor("consumer", at)
        .expect("cursor");
}

/// Rule 14: a bad tail below a cursor or a snapshot held records that were durable (a
/// commit or a save syncs the log up to its offset first): the writable open refuses
/// with the cursor or snapshot named and cuts nothing; read-only opens up to the damage.
/// Above them, the same tail is torn and cut (rule 2).
#[test]
fn a_bad_tail_below_a_cursor_is_damage_not_a_torn_write() {
    for what in ["cursor", "snapshot"] {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("log");
        write_log(&dir, 10, 1);
        {
            let log = LogStore::open(&dir, options()).expect("open");
            match what {
                "cursor" => log.commit_cursor("consumer", 10).expect("cursor"),
                _ => log.save_snapshot("state", 10, b"folded").expect("snapshot"),
            }
        }
        let last = segments(&dir).pop().expect("segment");
        assert_eq!(segments(&dir).len(), 1);
        let len = fs::metadata(&last).expect("stat").len();
        let ends = single_record_batch_ends(10);
        assert_eq!(ends[9].0, len);
        // Inside the body of the last batch, whose record the cursor or snapshot covers.
        flip(&last, ends[8].0 + 30);
        match LogStore::open(&dir, options()) {
            Err(Error::Corrupt {
                path,
                offset,
                reason,
                ..
            }) => {
                assert_eq!(path, last);
                assert_eq!(offset, Some(9));
                assert!(reason.contains(what), "{what}: {reason}");
                assert!(reason.contains("offset 10"), "{reason}");
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(fs::metadata(&last).expect("stat").len(), len, "nothing cut");
        let log = LogStore::open_read_only(&dir, options()).expect("read-only open");
        assert!(matches!(log.corruption(), Some(Error::Corrupt { .. })));
        let got = read_all(&log);
        assert_eq!(got.len(), 9);
        got.iter().for_each(assert_is_original);
    }
    // A cursor short of the tail: the tail is torn, and cut.
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    ten_records_with_a_cursor_at(&dir, 9);
    let last = segments(&dir).pop().expect("segment");
    let ends = single_record_batch_ends(10);
    flip(&last, ends[8].0 + 30);
    let log = LogStore::open(&dir, options()).expect("a torn tail above the cursor");
    assert_eq!(read_all(&log).len(), 9);
    assert_eq!(log.cursor("consumer").expect("cursor"), Some(9));
}

/// Rule 14 with no segment left at all: the cursor says records were durable.
#[test]
fn a_log_without_segments_below_its_cursor_is_damage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    ten_records_with_a_cursor_at(&dir, 10);
    for file in segments(&dir) {
        fs::remove_file(file).expect("remove");
    }
    match LogStore::open(&dir, options()) {
        Err(Error::Corrupt { reason, .. }) => {
            assert!(reason.contains("cursor \"consumer\""), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Rule 3: a read-only view stops at damage, but `verify` reports the damage (in a
/// sealed segment and in the newest one), not just that the view checks out.
#[test]
fn read_only_verify_reports_the_damage_its_view_stops_at() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let files = segments(&dir);
    assert!(files.len() >= 3);
    let newest = files.last().expect("newest");
    assert!(fs::metadata(newest).expect("stat").len() > 32 + 24 + 5);
    let original = tmp.path().join("original");
    copy_dir(&dir, &original);
    // The body of the first batch of a sealed segment, then of the newest one.
    for damaged in [&files[1], newest] {
        fs::remove_dir_all(&dir).expect("clean");
        copy_dir(&original, &dir);
        flip(damaged, 32 + 24 + 5);
        let ro = LogStore::open_read_only(&dir, options()).expect("read-only");
        let Some(Error::Corrupt { path, position, .. }) = ro.corruption() else {
            panic!("damage in {damaged:?} not found: {:?}", ro.corruption());
        };
        assert_eq!((path, *position), (damaged, 32));
        match ro.verify() {
            Err(Error::Corrupt { path, position, .. }) => {
                assert_eq!((&path, position), (damaged, 32));
            }
            other => panic!("verify of a view stopped at damage in {damaged:?}: {other:?}"),
        }
    }
    // An undamaged read-only view verifies.
    let ro = LogStore::open_read_only(&original, options()).expect("read-only");
    assert!(ro.corruption().is_none());
    assert_eq!(ro.verify().expect("verify").records, 100);
}

/// Rule 4: zeros after the last batch end the data (a preallocated or extended file).
#[test]
fn zeros_after_the_last_batch_end_the_data() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 10, 2);
    let last = segments(&dir).pop().expect("segment");
    let len = fs::metadata(&last).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .and_then(|f| f.set_len(len + 5000))
        .expect("extend with zeros");
    let log = LogStore::open(&dir, options()).expect("open");
    assert_eq!(read_all(&log).len(), 10);
    append(&log, 10..14, 2);
    drop(log);
    let log = LogStore::open(&dir, options().preallocate(true)).expect("reopen");
    let got = read_all(&log);
    assert_eq!(got.len(), 14);
    got.iter().for_each(assert_is_original);
}

/// Rule 5: damage in a sealed segment is found when it is read (and by verify).
#[test]
fn corruption_in_a_sealed_segment_is_found_when_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let files = segments(&dir);
    assert!(files.len() >= 3);
    // The second batch of the second segment.
    flip(&files[1], 32 + 24 + 5);
    let log = LogStore::open(&dir, options()).expect("sealed segments are checked lazily");
    let mut ok = 0;
    let mut err = None;
    for r in log.read_from(0).expect("read") {
        match r {
            Ok(r) => {
                assert!(err.is_none(), "no record after the error");
                assert_is_original(&r);
                ok += 1;
            }
            Err(e) => err = Some(e),
        }
    }
    match err {
        Some(Error::Corrupt { path, position, .. }) => {
            assert_eq!(path, files[1]);
            assert_eq!(position, 32);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(ok > 0);
    let mut replayed = 0;
    let replay = log.replay_from(0, |offset, e| {
        assert_eq!((e.key, e.payload), (&key(offset)[..], &payload(offset)[..]));
        replayed += 1;
    });
    assert!(matches!(replay, Err(Error::Corrupt { .. })));
    assert_eq!(replayed, ok, "replay stops where the reader stops");
    assert!(matches!(log.verify(), Err(Error::Corrupt { .. })));
    let ro = LogStore::open_read_only(&dir, options()).expect("read-only");
    assert!(ro.corruption().is_some());
    assert_eq!(read_all(&ro).len(), ok);
}

/// A batch whose checksums match but whose records do not frame (which no writer of the
/// format produces: its checksums were made to match) is found as its records are
/// decoded: the records before the bad one come back as written, then a typed error at
/// the batch, and nothing after it. Checks for each way framing can be bad.
#[test]
fn checksummed_batch_with_bad_framing_is_an_error_at_the_batch() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 4);
    let files = segments(&dir);
    assert!(files.len() >= 3);
    let base: u64 = files[1]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base offset in the name");
    let pristine = fs::read(&files[1]).expect("read");
    // The first batch of the second segment: header at 32, body after its 24 bytes.
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let body_len = le32(&pristine, 36) as usize;
    let (body, record) = (32 + 24, |i: usize, b: &[u8]| {
        // Byte position in the body of record `i`'s header.
        let mut at = 0;
        for _ in 0..i {
            at += 20 + le32(b, 56 + at + 12) as usize + le32(b, 56 + at + 16) as usize;
        }
        at
    });
    let third = record(2, &pristine);
    let breakages = [
        "offsets not increasing",
        "a length past the end of the batch",
        "bytes left over",
    ];
    for what in breakages {
        let mut bytes = pristine.clone();
        match what {
            "offsets not increasing" => {
                let at = body + third;
                bytes[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
            }
            "a length past the end of the batch" => {
                let at = body + third + 16;
                bytes[at..at + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
            }
            _ => {
                // The batch claims one record fewer: its last record's bytes are left over.
                let count = le32(&bytes, 40) - 1;
                bytes[40..44].copy_from_slice(&count.to_le_bytes());
            }
        }
        let body_crc = crc32c::crc32c(&bytes[body..body + body_len]);
        bytes[44..48].copy_from_slice(&body_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[36..56]);
        bytes[32..36].copy_from_slice(&header_crc.to_le_bytes());
        fs::write(&files[1], &bytes).expect("write");
        let log = LogStore::open(&dir, options()).expect("sealed segments are checked lazily");
        let (mut ok, mut err) = (0, None);
        for r in log.read_from(0).expect("read") {
            match r {
                Ok(r) => {
                    assert!(err.is_none(), "{what}: no record after the error");
                    assert_eq!(r.offset, ok, "{what}");
                    assert_is_original(&r);
                    ok += 1;
                }
                Err(e) => err = Some(e),
            }
        }
        match err {
            Some(Error::Corrupt { path, position, .. }) => {
                assert_eq!((path, position), (files[1].clone(), 32), "{what}");
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        // The batch's first two records, then nothing: the third is bad (the last one,
        // when the batch claims 3 of its 4 records).
        assert_eq!(ok, base + 2, "{what}");
        let mut replayed = 0;
        let replay = log.replay_from(0, |offset, e| {
            assert_eq!(offset, replayed, "{what}");
            assert_eq!((e.key, e.payload), (&key(offset)[..], &payload(offset)[..]));
            replayed += 1;
        });
        assert!(
            matches!(replay, Err(Error::Corrupt { position: 32, .. })),
            "{what}"
        );
        assert_eq!(replayed, ok, "{what}: replay stops where the reader stops");
        assert!(matches!(log.verify(), Err(Error::Corrupt { .. })), "{what}");
        drop(log);
        let ro = LogStore::open_read_only(&dir, options()).expect("read-only");
        assert!(ro.corruption().is_some(), "{what}");
        assert_eq!(
            read_all(&ro).len() as u64,
            base,
            "{what}: read-only stops before it"
        );
    }
}

/// Rule 6: a torn header on the newest segment (a crash during a roll) is rewritten; a
/// bad header that does not continue the previous segment is corruption.
#[test]
fn torn_header_on_the_newest_segment_is_rewritten() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 50, 2);
    let newest = dir.join(format!("{:020}.log", 50));
    for torn in [&b""[..], &b"CAUCELOG\x01\x00"[..], &[0u8; 32][..]] {
        fs::write(&newest, torn).expect("torn segment");
        let log = LogStore::open(&dir, options()).expect("open repairs the header");
        assert_eq!(log.next_offset(), 50);
        assert_eq!(read_all(&log).len(), 50);
        append(&log, 50..52, 2);
        drop(log);
        let log = LogStore::open(&dir, options()).expect("reopen");
        assert_eq!(read_all(&log).len(), 52);
        drop(log);
        fs::remove_file(&newest).expect("undo");
        let log = LogStore::open(&dir, options()).expect("reopen");
        assert_eq!(log.next_offset(), 50);
    }
    // A torn segment whose base does not continue the previous one.
    let wrong = dir.join(format!("{:020}.log", 57));
    fs::write(&wrong, b"CAUCE").expect("write");
    assert!(matches!(
        LogStore::open(&dir, options()),
        Err(Error::Corrupt { .. })
    ));
    fs::remove_file(&wrong).expect("undo");
    // A damaged header in front of valid batches.
    let files = segments(&dir);
    flip(files.last().expect("newest"), 20);
    assert!(matches!(
        LogStore::open(&dir, options()),
        Err(Error::Corrupt { .. })
    ));
}

/// Rules 6 and 3: a damaged header on the newest segment, with valid batches after it,
/// is corruption; read-only, the view is the segments before it, as for damage in a
/// sealed segment.
#[test]
fn read_only_open_views_the_segments_before_a_damaged_newest_header() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let files = segments(&dir);
    assert!(files.len() >= 2);
    let newest = files.last().expect("newest");
    let base: u64 = newest.file_name().expect("name").to_str().expect("utf8")[..20]
        .parse()
        .expect("base");
    assert!(base > 0 && base < 100, "the newest segment holds records");
    flip(newest, 20); // the base offset in the header
    assert!(matches!(
        LogStore::open(&dir, options()),
        Err(Error::Corrupt { .. })
    ));
    let ro = LogStore::open_read_only(&dir, options()).expect("read-only opens");
    match ro.corruption() {
        Some(Error::Corrupt { path, position, .. }) => assert_eq!((path, *position), (newest, 0)),
        other => panic!("expected the header's damage, got {other:?}"),
    }
    assert_eq!((ro.start_offset(), ro.next_offset()), (0, base));
    let got = read_all(&ro);
    assert_eq!(got.len() as u64, base);
    got.iter().for_each(assert_is_original);
    assert!(matches!(ro.verify(), Err(Error::Corrupt { .. })));
    // The only segment: an empty view, still with the damage.
    let only = tmp.path().join("only");
    write_log(&only, 10, 2);
    assert_eq!(segments(&only).len(), 1);
    flip(&segments(&only)[0], 20);
    let ro = LogStore::open_read_only(&only, options()).expect("read-only opens");
    assert!(matches!(ro.corruption(), Some(Error::Corrupt { .. })));
    assert_eq!((ro.start_offset(), ro.next_offset()), (0, 0));
    assert!(read_all(&ro).is_empty());
}

/// Rule 7: the tail is fdatasync'd on open; recovery leaves the file as it reports it.
#[test]
fn tail_is_synced_on_open_and_appends_continue_after_recovery() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 20, 3);
    let last = segments(&dir).pop().expect("segment");
    let mut bytes = fs::read(&last).expect("read");
    bytes.extend_from_slice(&[0x11; 13]);
    fs::write(&last, &bytes).expect("garbage tail");
    let log = LogStore::open(&dir, options()).expect("open");
    assert_eq!(
        fs::metadata(&last).expect("stat").len() as usize,
        bytes.len() - 13
    );
    append(&log, 20..23, 3);
    assert_eq!(read_all(&log).len(), 23);
    log.verify().expect("verify");
}

/// Rule 8: a missing, damaged or lying index is rebuilt and reads stay correct.
#[test]
fn missing_or_wrong_index_is_rebuilt_and_reads_stay_correct() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 200, 1);
    let indexes = with_extension(&dir, "index");
    assert!(indexes.len() >= 3, "sealed segments have index files");
    let check = |dir: &Path| {
        let log = LogStore::open(dir, options()).expect("open");
        for from in [0, 1, 37, 99, 150, 199, 200] {
            let got: Vec<_> = log
                .read_from(from)
                .expect("read")
                .collect::<Result<_, _>>()
                .expect("records");
            assert_eq!(got.len() as u64, 200 - from, "from {from}");
            assert_eq!(got.first().map(|r| r.offset), (from < 200).then_some(from));
            got.iter().for_each(assert_is_original);
        }
    };
    // Missing.
    fs::remove_file(&indexes[1]).expect("remove");
    check(&dir);
    assert!(indexes[1].exists(), "rebuilt index written back");
    // Truncated and garbage.
    let good = fs::read(&indexes[1]).expect("read");
    fs::write(&indexes[1], &good[..good.len() / 2]).expect("truncate");
    fs::write(&indexes[2], b"not an index at all").expect("garbage");
    check(&dir);
    // Well-formed, checksummed, but pointing at the wrong places.
    let base: u64 = indexes[1].file_name().expect("n").to_str().expect("s")[..20]
        .parse()
        .expect("base");
    let mut lying = Vec::new();
    lying.extend_from_slice(b"CAUCEIDX");
    lying.extend_from_slice(&base.to_le_bytes());
    lying.extend_from_slice(&2u64.to_le_bytes());
    for (o, p) in [(base, 40u64), (base + 3, 400)] {
        lying.extend_from_slice(&o.to_le_bytes());
        lying.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32c::crc32c(&lying);
    lying.extend_from_slice(&crc.to_le_bytes());
    fs::write(&indexes[1], &lying).expect("lying index");
    // Another segment's index under this one's name.
    fs::copy(&indexes[0], &indexes[2]).expect("swap");
    check(&dir);
}

/// Rule 8: the index is a hint, so an index file that cannot be read, or a rebuilt
/// one that cannot be written back, fails no read.
#[test]
fn an_index_file_that_cannot_be_read_or_written_fails_no_read() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 200, 1);
    let indexes = with_extension(&dir, "index");
    assert!(indexes.len() >= 3);
    let log = LogStore::open(&dir, options()).expect("open");
    // Something in the way of each write-back (stands in for ENOSPC or EROFS): the
    // temporary file of the first index is a directory; the second index itself is a
    // directory, so it cannot be read either.
    fs::remove_file(&indexes[0]).expect("remove");
    fs::create_dir(indexes[0].with_extension("index.tmp")).expect("obstacle");
    fs::remove_file(&indexes[1]).expect("remove");
    fs::create_dir(&indexes[1]).expect("obstacle");
    let base = |p: &PathBuf| -> u64 {
        p.file_name().expect("name").to_str().expect("utf8")[..20]
            .parse()
            .expect("base")
    };
    // Reads that seek inside each of the two segments, so their index is needed.
    for from in [1, base(&indexes[1]) + 1, 199] {
        let got: Vec<Record> = log
            .read_from(from)
            .expect("read")
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("read from {from}: {e}"));
        assert_eq!(got.first().map(|r| r.offset), Some(from));
        assert_eq!(got.len() as u64, 200 - from);
        got.iter().for_each(assert_is_original);
    }
}

/// Rule 9: a committed compaction rolls forward on open; an uncommitted one is dropped.
#[test]
fn committed_compaction_rolls_forward_and_uncommitted_one_is_dropped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let before = tmp.path().join("before");
    write_log(&before, 100, 2);
    let after = tmp.path().join("after");
    copy_dir(&before, &after);
    let log = LogStore::open(&after, options()).expect("open");
    let report = log.compact().expect("compact");
    assert!(report.dropped > 0);
    let compacted: Vec<u64> = read_all(&log).iter().map(|r| r.offset).collect();
    drop(log);
    // The segments the compaction emptied, which it deletes only after its swap: after a
    // crash mid-swap they are still there, and so are their (superseded) records.
    let base_of = |f: &PathBuf| -> u64 {
        f.file_name().expect("name").to_str().expect("utf8")[..20]
            .parse()
            .expect("base")
    };
    let before_bases: Vec<u64> = segments(&before).iter().map(base_of).collect();
    let after_bases: Vec<u64> = segments(&after).iter().map(base_of).collect();
    let emptied: Vec<std::ops::Range<u64>> = before_bases
        .iter()
        .enumerate()
        .filter(|(_, b)| !after_bases.contains(b))
        .map(|(i, &b)| b..before_bases.get(i + 1).copied().unwrap_or(u64::MAX))
        .collect();
    assert!(
        !emptied.is_empty(),
        "the compaction deleted emptied segments"
    );
    let rolled_forward: Vec<u64> = (0..100)
        .filter(|o| compacted.contains(o) || emptied.iter().any(|r| r.contains(o)))
        .collect();
    // Stage the compacted segments next to the originals, as a crash mid-swap would.
    let stage = |dir: &Path| -> Vec<u64> {
        let mut bases = Vec::new();
        for f in segments(&after) {
            let name = f.file_name().expect("name").to_owned();
            let old = dir.join(&name);
            if old.exists() && fs::read(&old).expect("read") != fs::read(&f).expect("read") {
                let name = name.to_str().expect("utf8");
                fs::copy(&f, dir.join(format!("{name}.compact"))).expect("stage");
                bases.push(name[..20].parse().expect("base"));
            }
        }
        bases
    };
    let uncommitted = tmp.path().join("uncommitted");
    copy_dir(&before, &uncommitted);
    assert!(!stage(&uncommitted).is_empty());
    let log = LogStore::open(&uncommitted, options()).expect("open");
    assert_eq!(read_all(&log).len(), 100, "uncommitted compaction dropped");
    drop(log);
    assert!(
        with_extension(&uncommitted, "compact").is_empty(),
        "leftovers deleted"
    );

    let committed = tmp.path().join("committed");
    copy_dir(&before, &committed);
    let bases = stage(&committed);
    fs::write(committed.join("compact.commit"), marker_of(&bases)).expect("marker");
    let log = LogStore::open(&committed, options()).expect("open");
    let got: Vec<u64> = read_all(&log).iter().map(|r| r.offset).collect();
    assert_eq!(got, rolled_forward, "committed compaction rolled forward");
    assert!(!committed.join("compact.commit").exists());
    drop(log);

    // A listed rewrite whose segment retention deleted after the swap failed is not
    // renamed into a segment of its own.
    let deleted = tmp.path().join("deleted");
    copy_dir(&before, &deleted);
    let bases = stage(&deleted);
    let gone = bases[0];
    fs::remove_file(deleted.join(format!("{gone:020}.log"))).expect("retention");
    fs::write(deleted.join("compact.commit"), marker_of(&bases)).expect("marker");
    fs::write(deleted.join("start.meta"), start_meta(bases[1])).expect("start");
    let log = LogStore::open(&deleted, options()).expect("open");
    assert!(!deleted.join(format!("{gone:020}.log")).exists());
    assert!(with_extension(&deleted, "compact").is_empty());
    let got: Vec<u64> = read_all(&log).iter().map(|r| r.offset).collect();
    let above: Vec<u64> = rolled_forward
        .iter()
        .copied()
        .filter(|&o| o >= bases[1])
        .collect();
    assert_eq!(got, above);
    drop(log);

    // A listed rewrite cut short (damage: each was whole before the marker was written)
    // is not rolled over its good segment.
    let damaged = tmp.path().join("damaged");
    copy_dir(&before, &damaged);
    let bases = stage(&damaged);
    // The largest rewrite, cut inside its batches.
    let rewrite = with_extension(&damaged, "compact")
        .into_iter()
        .max_by_key(|p| fs::metadata(p).expect("stat").len())
        .expect("a rewrite");
    let bytes = fs::read(&rewrite).expect("read");
    assert!(bytes.len() > 32 + 24, "the rewrite holds records");
    fs::write(&rewrite, &bytes[..bytes.len() / 2 + 3]).expect("cut short");
    fs::write(damaged.join("compact.commit"), marker_of(&bases)).expect("marker");
    let log = LogStore::open(&damaged, options()).expect("open");
    let got = read_all(&log);
    got.iter().for_each(assert_is_original);
    let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
    assert!(
        offsets.ends_with(&compacted),
        "the other rewrites rolled forward"
    );
    assert!(
        got.len() > compacted.len(),
        "the damaged one's segment kept whole"
    );
    assert!(with_extension(&damaged, "compact").is_empty());
    log.verify().expect("verify");
}

/// A compaction commit marker listing `bases`, in the documented format.
fn marker_of(bases: &[u64]) -> Vec<u8> {
    let mut marker = b"CAUCECMP".to_vec();
    marker.extend_from_slice(&(bases.len() as u64).to_le_bytes());
    for b in bases {
        marker.extend_from_slice(&b.to_le_bytes());
    }
    let crc = crc32c::crc32c(&marker);
    marker.extend_from_slice(&crc.to_le_bytes());
    marker
}

/// A `start.meta` file holding `start`, in the documented format.
fn start_meta(start: u64) -> Vec<u8> {
    let mut b = b"CAUCESTA".to_vec();
    b.extend_from_slice(&start.to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Rule 10: retention's start offset is exact, also in the middle of a segment.
#[test]
fn retention_start_offset_is_exact_after_reopen() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 1);
    let before = segments(&dir).len();
    let log = LogStore::open(&dir, options()).expect("open");
    log.truncate_before(57).expect("retention");
    assert!(
        segments(&dir).len() < before,
        "whole segments below deleted"
    );
    drop(log);
    let log = LogStore::open(&dir, options()).expect("reopen");
    assert_eq!(log.start_offset(), 57);
    assert_eq!(read_all(&log).first().map(|r| r.offset), Some(57));
    assert!(matches!(
        log.read_from(56),
        Err(Error::OffsetOutOfRange { start: 57, .. })
    ));
}

/// A reader left below the start by retention yields OffsetOutOfRange once.
#[test]
fn reader_overtaken_by_retention_yields_out_of_range_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    append(&log, 0..100, 1);
    let mut reader = log.read_from(0).expect("read");
    assert_eq!(reader.next().expect("one").expect("ok").offset, 0);
    log.truncate_before(80).expect("retention");
    assert!(matches!(
        reader.next(),
        Some(Err(Error::OffsetOutOfRange { start: 80, .. }))
    ));
    assert!(reader.next().is_none());
}

/// Rule 11: the cursor journal's torn tail is cut; the last entry of each name wins.
#[test]
fn cursor_journal_torn_tail_is_cut() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let log = LogStore::open(dir, options()).expect("open");
    append(&log, 0..12, 4);
    log.commit_cursor("a", 5).expect("commit");
    log.commit_cursor("b", 7).expect("commit");
    log.commit_cursor("a", 9).expect("commit");
    drop(log);
    let journal = dir.join("cursors.journal");
    let mut bytes = fs::read(&journal).expect("read");
    bytes.extend_from_slice(&[3, 1, 4, 1, 5, 9, 2]);
    fs::write(&journal, &bytes).expect("torn entry");
    let log = LogStore::open(dir, options()).expect("reopen");
    assert_eq!(log.cursor("a").expect("cursor"), Some(9));
    assert_eq!(log.cursor("b").expect("cursor"), Some(7));
    log.commit_cursor("b", 11).expect("commit after the cut");
    drop(log);
    let log = LogStore::open(dir, options()).expect("reopen");
    assert_eq!(log.cursor("b").expect("cursor"), Some(11));
}

/// The cursors `journal_with_three_cursors` commits, in order, and the byte each entry
/// of the journal starts at (an entry is `crc u32, name_len u8, name, offset u64`).
const THREE_CURSORS: [(&str, u64); 3] = [("a", 1), ("bb", 2), ("ccc", 3)];

fn entry_starts() -> Vec<u64> {
    let mut at = 0;
    THREE_CURSORS
        .iter()
        .map(|(name, _)| {
            let start = at;
            at += 13 + name.len() as u64;
            start
        })
        .collect()
}

/// A log of 12 records whose journal holds `THREE_CURSORS`; returns the journal's path.
fn journal_with_three_cursors(dir: &Path) -> PathBuf {
    let log = LogStore::open(dir, options()).expect("open");
    append(&log, 0..12, 4);
    for (name, offset) in THREE_CURSORS {
        log.commit_cursor(name, offset).expect("commit");
    }
    drop(log);
    let journal = dir.join("cursors.journal");
    assert_eq!(fs::metadata(&journal).expect("stat").len(), 13 * 3 + 6);
    journal
}

fn cursors(log: &LogStore) -> Vec<Option<u64>> {
    THREE_CURSORS
        .iter()
        .map(|(name, _)| log.cursor(name).expect("cursor"))
        .collect()
}

/// Rule 11: a damaged cursor entry followed by a valid one is corruption: a writable
/// open fails naming the journal and the entry's byte position and leaves the file as it
/// is; a read-only open changes nothing and answers from the entries before the damage.
#[test]
fn cursor_journal_damage_in_the_middle_is_an_error_not_a_cut() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let journal = journal_with_three_cursors(dir);
    let second = entry_starts()[1];
    flip(&journal, second + 5); // the name of the second entry
    let damaged = fs::read(&journal).expect("read");
    match LogStore::open(dir, options()) {
        Err(Error::Corrupt {
            path,
            position,
            offset,
            reason,
        }) => {
            assert_eq!(path, journal);
            assert_eq!(position, second);
            assert_eq!(offset, None);
            assert!(reason.contains("not a torn tail"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        fs::read(&journal).expect("read"),
        damaged,
        "nothing was cut"
    );

    let ro = LogStore::open_read_only(dir, options()).expect("read-only open");
    match ro.corruption() {
        Some(Error::Corrupt { path, position, .. }) => {
            assert_eq!((path, *position), (&journal, second));
        }
        other => panic!("expected the journal's damage, got {other:?}"),
    }
    assert_eq!(
        cursors(&ro),
        [Some(1), None, None],
        "entries before the damage"
    );
    assert_eq!(ro.next_offset(), 12, "the segments are whole");
    drop(ro);
    assert_eq!(
        fs::read(&journal).expect("read"),
        damaged,
        "read-only changed nothing"
    );
}

/// Rule 11, exhaustively: a flipped byte in any entry but the last is corruption at that
/// entry; in the last entry (nothing valid after it) it is a torn tail, cut, and the
/// cursors before it are kept. Cutting the file inside the last entry, or zeros after
/// it, is a torn tail too.
#[test]
fn cursor_journal_damage_is_cut_only_when_nothing_valid_follows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let original = tmp.path().join("original");
    let journal = journal_with_three_cursors(&original);
    let whole = fs::read(&journal).expect("read");
    let starts = entry_starts();
    let last = starts[2];
    let work = tmp.path().join("work");
    let reopen = |bytes: &[u8]| {
        fs::remove_dir_all(&work).ok();
        copy_dir(&original, &work);
        fs::write(work.join("cursors.journal"), bytes).expect("write journal");
        LogStore::open(&work, options())
    };
    for at in 0..whole.len() as u64 {
        let mut bytes = whole.clone();
        bytes[at as usize] ^= 0x5a;
        let entry = *starts.iter().rev().find(|&&s| s <= at).expect("an entry");
        match reopen(&bytes) {
            Err(Error::Corrupt { position, .. }) if entry < last => {
                assert_eq!(position, entry, "flip at byte {at}");
            }
            Ok(log) if entry == last => {
                assert_eq!(cursors(&log), [Some(1), Some(2), None], "flip at byte {at}");
                drop(log);
                let len = fs::metadata(work.join("cursors.journal"))
                    .expect("stat")
                    .len();
                assert_eq!(len, last, "flip at byte {at}: the torn entry is cut");
            }
            other => panic!("flip at byte {at} (entry at {entry}): {other:?}"),
        }
    }
    let mut tails: Vec<Vec<u8>> = (last as usize + 1..whole.len())
        .map(|cut| whole[..cut].to_vec())
        .collect();
    tails.push([&whole[..], &[0u8; 40][..]].concat());
    for bytes in tails {
        let log = reopen(&bytes).expect("a torn tail opens");
        let kept = if bytes.len() > whole.len() {
            [Some(1), Some(2), Some(3)]
        } else {
            [Some(1), Some(2), None]
        };
        assert_eq!(cursors(&log), kept, "journal of {} bytes", bytes.len());
        log.commit_cursor("ccc", 11).expect("commit after the cut");
        drop(log);
        let log = LogStore::open(&work, options()).expect("reopen");
        assert_eq!(
            cursors(&log)[..2],
            kept[..2],
            "journal of {} bytes",
            bytes.len()
        );
        assert_eq!(log.cursor("ccc").expect("cursor"), Some(11));
    }
}

/// A read-only open leaves a torn journal tail in place and answers from the whole
/// entries before it.
#[test]
fn read_only_open_leaves_a_torn_cursor_journal_alone() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let journal = journal_with_three_cursors(dir);
    let mut bytes = fs::read(&journal).expect("read");
    bytes.truncate(bytes.len() - 4);
    fs::write(&journal, &bytes).expect("tear the last entry");
    let ro = LogStore::open_read_only(dir, options()).expect("read-only open");
    assert!(ro.corruption().is_none(), "a torn tail is not corruption");
    assert_eq!(cursors(&ro), [Some(1), Some(2), None]);
    drop(ro);
    assert_eq!(fs::read(&journal).expect("read"), bytes, "nothing was cut");
}

/// Rule 12: a damaged newest snapshot falls back to the one before it.
#[test]
fn damaged_newest_snapshot_falls_back_to_the_previous_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let log = LogStore::open(dir, options()).expect("open");
    append(&log, 0..30, 10);
    for (o, blob) in [(10, &b"ten"[..]), (20, b"twenty"), (30, b"thirty")] {
        log.save_snapshot("state", o, blob).expect("save");
    }
    let files = with_extension(&dir.join("snapshots").join("state"), "snap");
    assert_eq!(files.len(), 2, "the newest two are kept");
    flip(&files[1], 34);
    let s = log.latest_snapshot("state").expect("latest").expect("one");
    assert_eq!((s.offset, &s.blob[..]), (20, &b"twenty"[..]));
}

/// A writable open removes the temporary files the log writes (left by a crash before
/// their rename), snapshots' included, and nothing else: not another program's `*.tmp`
/// files, not a directory, not a file whose name only looks alike.
#[test]
fn a_writable_open_removes_only_the_temporary_files_the_log_writes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    let log = LogStore::open(&dir, options()).expect("open");
    append(&log, 0..30, 10);
    log.save_snapshot("state", 10, b"ten").expect("save");
    drop(log);
    let snapshots = dir.join("snapshots").join("state");
    let ours = [
        dir.join("start.meta.tmp"),
        dir.join("segments.meta.tmp"),
        dir.join("cursors.journal.tmp"),
        dir.join("compact.commit.tmp"),
        dir.join(format!("{:020}.index.tmp", 0)),
        snapshots.join(format!("{:020}.snap.tmp", 20)),
        // Named as they are now, `{name}.{pid}.{n}.tmp`, unique to one write.
        dir.join("segments.meta.4242.7.tmp"),
        dir.join("cursors.journal.1.0.tmp"),
        snapshots.join(format!("{:020}.snap.4242.8.tmp", 20)),
    ];
    let theirs = [
        dir.join("notes.tmp"),
        dir.join("7.index.tmp"),
        dir.join("start.meta.tmp.tmp"),
        snapshots.join("draft.tmp"),
        dir.join("notes.4242.7.tmp"),
        dir.join("start.meta.x.7.tmp"),
        dir.join("start.meta.4242..tmp"),
        snapshots.join("draft.1.2.tmp"),
    ];
    for f in ours.iter().chain(&theirs) {
        fs::write(f, b"half written").expect("leftover");
    }
    let dirs = [
        dir.join("backup.tmp"),
        dir.join(format!("{:020}.index.tmp", 1)),
    ];
    for d in &dirs {
        fs::create_dir(d).expect("directory");
        fs::write(d.join("inside"), b"kept").expect("file inside");
    }
    // A read-only open changes nothing.
    drop(LogStore::open_read_only(&dir, options()).expect("read-only"));
    assert!(ours.iter().all(|f| f.exists()));
    let log = LogStore::open(&dir, options()).expect("open with leftovers");
    for f in &ours {
        assert!(!f.exists(), "{f:?} removed");
    }
    for f in &theirs {
        assert_eq!(fs::read(f).expect("kept"), b"half written", "{f:?} kept");
    }
    for d in &dirs {
        assert!(d.join("inside").exists(), "{d:?} kept");
    }
    assert_eq!(read_all(&log).len(), 30);
    let s = log.latest_snapshot("state").expect("latest").expect("one");
    assert_eq!((s.offset, &s.blob[..]), (10, &b"ten"[..]));
}

/// A save writes its snapshot through a temporary file of its own, never through one
/// fixed name: a directory (or anything else) left at `{offset:020}.snap.tmp` is no
/// obstacle. Every save of an offset once wrote `{offset:020}.snap.tmp`, truncating
/// what another save of it was writing there.
#[test]
fn a_snapshot_is_written_through_a_temporary_file_of_its_own() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    append(&log, 0..30, 10);
    log.save_snapshot("state", 10, b"ten").expect("save");
    let sdir = tmp.path().join("snapshots").join("state");
    fs::create_dir(sdir.join(format!("{:020}.snap.tmp", 20))).expect("obstacle");
    log.save_snapshot("state", 20, b"twenty")
        .expect("save past the obstacle");
    let s = log.latest_snapshot("state").expect("latest").expect("one");
    assert_eq!((s.offset, &s.blob[..]), (20, &b"twenty"[..]));
    let mut names: Vec<String> = fs::read_dir(&sdir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [10, 20]
            .map(|o| format!("{o:020}.snap"))
            .into_iter()
            .chain([format!("{:020}.snap.tmp", 20)])
            .collect::<Vec<_>>(),
        "no temporary file left behind"
    );
}

/// A file in `snapshots/` is not a snapshot name (each name is a directory): opening,
/// for writing or read-only, goes on past it. Every open once failed listing it as a
/// directory (`ENOTDIR`).
#[test]
fn a_stray_file_among_the_snapshot_names_does_not_stop_an_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    append(&log, 0..30, 10);
    log.save_snapshot("state", 10, b"ten").expect("save");
    drop(log);
    fs::write(tmp.path().join("snapshots").join("notes.txt"), b"hi").expect("stray file");
    let ro = LogStore::open_read_only(tmp.path(), options()).expect("read-only open");
    assert!(ro.corruption().is_none());
    let log = LogStore::open(tmp.path(), options()).expect("open");
    let s = log.latest_snapshot("state").expect("latest").expect("one");
    assert_eq!((s.offset, &s.blob[..]), (10, &b"ten"[..]));
    assert_eq!(read_all(&log).len(), 30);
}

/// Rule 13: one writer per directory.
#[test]
fn second_writable_open_of_a_directory_is_locked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options()).expect("open");
    assert!(matches!(
        LogStore::open(tmp.path(), options()),
        Err(Error::Locked { .. })
    ));
    let ro = LogStore::open_read_only(tmp.path(), options()).expect("read-only is allowed");
    assert!(ro.corruption().is_none());
    drop(log);
    LogStore::open(tmp.path(), options()).expect("lock released on drop");
}

#[test]
fn oversized_records_and_bad_options_are_typed_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), options().max_record_bytes(100)).expect("open");
    assert!(matches!(
        log.append(&[Entry::new(b"k", b"fits"), Entry::new(b"k", &[0u8; 200])]),
        Err(Error::RecordTooLarge {
            index: 1,
            size: 221,
            limit: 100
        })
    ));
    assert_eq!(log.next_offset(), 0, "nothing appended");
    drop(log);
    assert!(matches!(
        LogStore::open(tmp.path(), options().segment_bytes(10)),
        Err(Error::Config(_))
    ));
    for interval in [0, LogOptions::MAX_INDEX_INTERVAL_BYTES + 1, u64::MAX] {
        assert!(
            matches!(
                LogStore::open(tmp.path(), options().index_interval_bytes(interval)),
                Err(Error::Config(_))
            ),
            "index_interval_bytes {interval}"
        );
    }
    let widest = options().index_interval_bytes(LogOptions::MAX_INDEX_INTERVAL_BYTES);
    let log = LogStore::open(tmp.path(), widest).expect("the widest interval");
    append(&log, 0..20, 2);
    assert_eq!(read_all(&log).len(), 20);
    drop(log);
    // A buffer of 0 bytes once made every append under `Every` wait for good.
    for bytes in [0, LogOptions::MAX_WRITE_BUFFER_BYTES + 1, usize::MAX] {
        assert!(
            matches!(
                LogStore::open(tmp.path(), options().write_buffer_bytes(bytes)),
                Err(Error::Config(_))
            ),
            "write_buffer_bytes {bytes}"
        );
    }
    assert!(matches!(
        LogStore::open(tmp.path(), options().max_open_segments(0)),
        Err(Error::Config(_))
    ));
    let every = SyncPolicy::Every {
        records: 1_000,
        interval: std::time::Duration::from_millis(5),
    };
    let smallest = options().sync(every).write_buffer_bytes(1);
    let log = LogStore::open(tmp.path(), smallest).expect("the smallest buffer");
    append(&log, 20..60, 1);
    assert_eq!(read_all(&log).len(), 60);
}

/// A log whose files start near the end of the offset space (a checksummed
/// `start.meta`, as retention writes it) takes appends up to the last offset, then
/// refuses them with a typed error; nothing acknowledged is lost.
#[test]
fn an_append_past_the_last_offset_is_refused_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    fs::create_dir_all(&dir).expect("mkdir");
    let first = u64::MAX - 2;
    fs::write(dir.join("start.meta"), start_meta(first)).expect("start");
    let log = LogStore::open(&dir, options()).expect("open");
    assert_eq!(log.next_offset(), first);
    let refused = |log: &LogStore, n: usize| {
        let batch = vec![Entry::new(b"k", b"late"); n];
        match log.append(&batch) {
            Err(Error::OffsetsExhausted { next, records }) => assert_eq!(records, n, "{next}"),
            other => panic!("{n} records from {}: {other:?}", log.next_offset()),
        }
    };
    refused(&log, 3);
    assert_eq!(log.next_offset(), first, "nothing of the batch appended");
    let range = log
        .append(&[Entry::new(b"k", b"a"), Entry::new(b"k", b"b")])
        .expect("the last two offsets");
    assert_eq!(range, first..u64::MAX);
    refused(&log, 1);
    assert_eq!(log.next_offset(), u64::MAX);
    drop(log);
    let log = LogStore::open(&dir, options()).expect("reopen");
    assert_eq!(log.next_offset(), u64::MAX);
    let got: Vec<(u64, Vec<u8>)> = read_all(&log)
        .into_iter()
        .map(|r| (r.offset, r.payload.to_vec()))
        .collect();
    assert_eq!(got, [(first, b"a".to_vec()), (first + 1, b"b".to_vec())]);
    refused(&log, 1);
    log.verify().expect("verify");
}

#[test]
fn verify_finds_segments_that_do_not_fit_together() {
    // A log of several small segments, and one of a single large segment holding the
    // same records.
    let small = tempfile::tempdir().expect("tmp");
    write_log(small.path(), 200, 1);
    let large = tempfile::tempdir().expect("tmp");
    {
        let log = LogStore::open(large.path(), options().segment_bytes(1 << 20)).expect("open");
        append(&log, 0..200, 1);
    }
    let parts = segments(small.path());
    assert!(parts.len() >= 3, "{parts:?}");
    let whole = &segments(large.path())[0];

    // The first segment replaced by the whole log: it holds records past the second
    // segment's base.
    let overlapping = tempfile::tempdir().expect("tmp");
    copy_dir(small.path(), overlapping.path());
    for index in with_extension(overlapping.path(), "index") {
        fs::remove_file(index).expect("remove index");
    }
    fs::copy(
        whole,
        overlapping.path().join(parts[0].file_name().expect("name")),
    )
    .expect("copy");
    let log = LogStore::open_read_only(overlapping.path(), options()).expect("open");
    match log.verify() {
        Err(Error::Corrupt { path, reason, .. }) => {
            assert_eq!(path.file_name(), parts[1].file_name());
            assert!(reason.contains("holds records up to 199"), "{reason}");
        }
        other => panic!("overlapping segments verified as {other:?}"),
    }

    // A segment whose bytes were replaced, after the open, by another segment's.
    let log = LogStore::open_read_only(small.path(), options()).expect("open");
    assert!(log.verify().is_ok());
    let mut other = fs::read(&parts[1]).expect("read");
    let len = fs::metadata(&parts[2]).expect("stat").len() as usize;
    other.resize(other.len().max(len), 0);
    fs::write(&parts[2], other).expect("overwrite");
    match log.verify() {
        Err(Error::Corrupt { path, reason, .. }) => {
            assert_eq!(path, parts[2]);
            assert!(
                reason.contains("segment header names base offset"),
                "{reason}"
            );
        }
        other => panic!("a segment under another's name verified as {other:?}"),
    }
}

/// Rule 15: a first segment file past where the log starts means files are missing, with
/// or without retention having run; read-only opens what is there and says so.
#[test]
fn a_missing_first_segment_is_damage() {
    for retention in [false, true] {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("log");
        write_log(&dir, 100, 2);
        if retention {
            let log = LogStore::open(&dir, options()).expect("open");
            log.truncate_before(10).expect("retention");
        }
        let files = segments(&dir);
        assert!(files.len() >= 3);
        fs::remove_file(&files[0]).expect("remove");
        match LogStore::open(&dir, options()) {
            Err(Error::Corrupt { path, reason, .. }) => {
                assert_eq!(path, files[1]);
                assert!(reason.contains("missing"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let log = LogStore::open_read_only(&dir, options()).expect("read-only open");
        assert!(matches!(log.corruption(), Some(Error::Corrupt { .. })));
        let got = read_all(&log);
        assert_eq!(got.last().expect("records").offset, 99);
        got.iter().for_each(assert_is_original);
    }
}

/// The base of a segment file, from its name.
fn base_of(path: &Path) -> u64 {
    path.file_name().expect("name").to_str().expect("utf8")[..20]
        .parse()
        .expect("base")
}

/// The bases of the segment files in `dir`, sorted.
fn bases_on_disk(dir: &Path) -> Vec<u64> {
    segments(dir).iter().map(|f| base_of(f)).collect()
}

/// A `segments.meta` file listing `bases`, in the documented format.
fn manifest_of(bases: &[u64]) -> Vec<u8> {
    let mut b = b"CAUCESEG".to_vec();
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&(bases.len() as u64).to_le_bytes());
    for base in bases {
        b.extend_from_slice(&base.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// The bases `segments.meta` lists, read by the documented format.
fn listed(dir: &Path) -> Vec<u64> {
    let b = fs::read(dir.join("segments.meta")).expect("manifest");
    let n = b.len();
    assert_eq!(&b[..12], b"CAUCESEG\x01\0\0\0", "magic and version");
    let crc = u32::from_le_bytes(b[n - 4..].try_into().expect("4 bytes"));
    assert_eq!(crc, crc32c::crc32c(&b[..n - 4]), "checksum");
    let count = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
    assert_eq!(20 + 8 * count as usize + 4, n, "length");
    b[20..n - 4]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Every file of a directory with its bytes, to prove an open changed nothing.
fn files_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = fs::read(&p).expect("read");
            (p, bytes)
        })
        .collect();
    v.sort();
    v
}

/// Rule 16: a segment file deleted between two others is damage, not a gap compaction
/// left. A writable open fails naming it and the offsets gone, and changes nothing; a
/// read-only open views exactly the records before it and reports it, as does `verify`.
#[test]
fn a_missing_segment_the_manifest_lists_is_damage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let files = segments(&dir);
    assert!(files.len() >= 4);
    assert_eq!(
        listed(&dir),
        files.iter().map(|f| base_of(f)).collect::<Vec<_>>()
    );
    let (gone, next) = (base_of(&files[2]), base_of(&files[3]));
    fs::remove_file(&files[2]).expect("remove");
    let before = files_of(&dir);
    match LogStore::open(&dir, options()) {
        Err(Error::Corrupt {
            path,
            offset,
            reason,
            ..
        }) => {
            assert_eq!((&path, offset), (&files[2], Some(gone)));
            let range = format!("from offset {gone} to {}", next - 1);
            assert!(
                reason.contains("missing") && reason.contains(&range),
                "{reason}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(files_of(&dir), before, "the failed open changed nothing");
    let ro = LogStore::open_read_only(&dir, options()).expect("read-only open");
    let Some(Error::Corrupt { path, .. }) = ro.corruption() else {
        panic!("not reported: {:?}", ro.corruption());
    };
    assert_eq!(path, &files[2]);
    let got = read_all(&ro);
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (0..gone).collect::<Vec<_>>()
    );
    got.iter().for_each(assert_is_original);
    assert_eq!(ro.next_offset(), gone);
    match ro.verify() {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, files[2]),
        other => panic!("verify: {other:?}"),
    }
    drop(ro);
    assert_eq!(files_of(&dir), before, "the read-only open changed nothing");
}

/// Rule 16 at the tail: the newest listed segment may be missing (a roll lists it before
/// creating it), but two missing newest segments are lost records.
#[test]
fn the_newest_segments_missing_past_a_crashed_roll_are_damage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let files = segments(&dir);
    let n = files.len();
    assert!(n >= 4);
    let gone = base_of(&files[n - 2]);
    fs::remove_file(&files[n - 1]).expect("remove");
    fs::remove_file(&files[n - 2]).expect("remove");
    match LogStore::open(&dir, options()) {
        Err(Error::Corrupt { path, reason, .. }) => {
            assert_eq!(path, files[n - 2]);
            assert!(
                reason.contains(&format!("from offset {gone} on")),
                "{reason}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let ro = LogStore::open_read_only(&dir, options()).expect("read-only open");
    assert!(matches!(ro.corruption(), Some(Error::Corrupt { path, .. }) if *path == files[n - 2]));
    assert_eq!(read_all(&ro).len() as u64, gone);
}

/// Rule 16: a manifest listing one segment more than there are files is a roll that
/// crashed before it created its file: the log opens clean, appends go on, and the
/// manifest lists the files again.
#[test]
fn a_listed_newest_segment_never_created_is_a_crashed_roll() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let mut bases: Vec<u64> = bases_on_disk(&dir);
    let files = bases.clone();
    bases.push(100);
    fs::write(dir.join("segments.meta"), manifest_of(&bases)).expect("manifest");
    let log = LogStore::open(&dir, options()).expect("open");
    assert_eq!(log.next_offset(), 100);
    assert_eq!(listed(&dir), files, "the manifest follows the files");
    append(&log, 100..200, 2);
    drop(log);
    let log = LogStore::open(&dir, options()).expect("reopen");
    let got = read_all(&log);
    assert_eq!(got.len(), 200);
    got.iter().for_each(assert_is_original);
    log.verify().expect("verify");
    assert_eq!(listed(&dir), bases_on_disk(&dir));
}

/// Compaction unlists the segments it empties before it deletes them: the log reopens
/// clean with the same records. A crash between the two leaves segment files the
/// manifest does not list, which an open accepts (and lists).
#[test]
fn a_log_whose_compaction_deleted_emptied_segments_reopens_clean() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let uncompacted = tmp.path().join("uncompacted");
    copy_dir(&dir, &uncompacted);
    let before = segments(&dir).len();
    let log = LogStore::open(&dir, options()).expect("open");
    log.compact().expect("compact");
    assert!(segments(&dir).len() < before, "emptied segments deleted");
    let compacted: Vec<Record> = read_all(&log);
    drop(log);
    let bases: Vec<u64> = bases_on_disk(&dir);
    assert_eq!(listed(&dir), bases);
    let log = LogStore::open(&dir, options()).expect("reopen");
    assert_eq!(read_all(&log), compacted);
    log.verify().expect("verify");
    append(&log, 100..200, 2);
    log.compact().expect("compact again");
    let compacted: Vec<Record> = read_all(&log);
    drop(log);
    let log = LogStore::open(&dir, options()).expect("reopen");
    assert_eq!(read_all(&log), compacted);
    log.verify().expect("verify");
    drop(log);

    // The uncompacted files with the compacted manifest: emptied segments not deleted.
    fs::write(uncompacted.join("segments.meta"), manifest_of(&bases)).expect("manifest");
    let log = LogStore::open(&uncompacted, options()).expect("open");
    assert_eq!(read_all(&log).len(), 100);
    assert_eq!(listed(&uncompacted), bases_on_disk(&uncompacted));
}

/// Retention deletes front segments after persisting the start; the manifest may still
/// list them (below the start nothing is checked), and the log reopens clean, with no
/// file changed.
#[test]
fn a_log_whose_retention_deleted_segments_reopens_clean() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let before = segments(&dir).len();
    let log = LogStore::open(&dir, options()).expect("open");
    log.truncate_before(57).expect("retention");
    assert!(segments(&dir).len() < before);
    drop(log);
    let files = files_of(&dir);
    let log = LogStore::open(&dir, options()).expect("reopen");
    assert_eq!(
        files_of(&dir),
        files,
        "the open of a sound log changed nothing"
    );
    assert_eq!(log.start_offset(), 57);
    assert_eq!(read_all(&log).len(), 43);
    log.verify().expect("verify");
    append(&log, 100..200, 2);
    drop(log);
    let log = LogStore::open(&dir, options()).expect("reopen");
    let got = read_all(&log);
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (57..200).collect::<Vec<_>>()
    );
    let bases: Vec<u64> = bases_on_disk(&dir);
    assert_eq!(
        listed(&dir),
        bases,
        "the rolls since left the deleted ones out"
    );
}

/// A log written before the manifest existed opens as it did, and a writable open
/// writes the manifest from the files there (a read-only one does not): from then on a
/// missing file is found.
#[test]
fn a_log_without_a_manifest_opens_and_gets_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    fs::remove_file(dir.join("segments.meta")).expect("remove");
    drop(LogStore::open_read_only(&dir, options()).expect("read-only"));
    assert!(!dir.join("segments.meta").exists());
    let log = LogStore::open(&dir, options()).expect("open");
    assert_eq!(read_all(&log).len(), 100);
    drop(log);
    let files = segments(&dir);
    assert_eq!(
        listed(&dir),
        files.iter().map(|f| base_of(f)).collect::<Vec<_>>()
    );
    fs::remove_file(&files[1]).expect("remove");
    assert!(matches!(
        LogStore::open(&dir, options()),
        Err(Error::Corrupt { path, .. }) if path == files[1]
    ));
}

/// A damaged manifest is damage, not a torn write (it is written whole): both opens fail
/// with `Error::Corrupt` naming it and change nothing, as for `start.meta`. Without the
/// file, the log opens again.
#[test]
fn a_damaged_manifest_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    write_log(&dir, 100, 2);
    let manifest = dir.join("segments.meta");
    let good = fs::read(&manifest).expect("read");
    let mut decreasing = listed(&dir);
    decreasing.swap(1, 2);
    let damaged = [
        {
            let mut b = good.clone();
            b[21] ^= 0x5a;
            b
        },
        good[..good.len() - 1].to_vec(),
        Vec::new(),
        {
            let mut b = good.clone();
            b[8] = 2; // another version
            b
        },
        manifest_of(&decreasing),
    ];
    for bytes in damaged {
        fs::write(&manifest, &bytes).expect("damage");
        let before = files_of(&dir);
        for open in [LogStore::open, LogStore::open_read_only] {
            match open(&dir, options()) {
                Err(Error::Corrupt { path, .. }) => assert_eq!(path, manifest),
                other => panic!("{bytes:?} opened as {other:?}"),
            }
        }
        assert_eq!(files_of(&dir), before);
    }
    fs::remove_file(&manifest).expect("remove");
    assert_eq!(
        read_all(&LogStore::open(&dir, options()).expect("open")).len(),
        100
    );
    assert_eq!(fs::read(&manifest).expect("written anew"), good);
}

/// `verify` on a store open for writing finds a segment file deleted from under it.
#[test]
fn verify_finds_a_segment_file_deleted_while_the_log_is_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    let log = LogStore::open(&dir, options()).expect("open");
    append(&log, 0..100, 2);
    log.verify().expect("verify");
    let files = segments(&dir);
    fs::remove_file(&files[2]).expect("remove");
    match log.verify() {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, files[2]),
        other => panic!("verify: {other:?}"),
    }
}

/// Under `SyncPolicy::Never` a roll lists its segment without writing the manifest; the
/// next `sync`, or closing the store, writes it, so a file missing later is found.
#[test]
fn rolls_under_never_are_listed_by_the_next_sync_or_the_close() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    let never = || options().sync(SyncPolicy::Never);
    let log = LogStore::open(&dir, never()).expect("open");
    append(&log, 0..100, 2);
    let bases = || -> Vec<u64> { bases_on_disk(&dir) };
    assert_eq!(listed(&dir), [0], "written at the open only");
    log.sync().expect("sync");
    assert_eq!(listed(&dir), bases());
    append(&log, 100..200, 2);
    drop(log);
    assert_eq!(listed(&dir), bases(), "written on close");
    let files = segments(&dir);
    fs::remove_file(&files[files.len() - 3]).expect("remove");
    assert!(matches!(
        LogStore::open(&dir, never()),
        Err(Error::Corrupt { path, .. }) if path == files[files.len() - 3]
    ));
}
