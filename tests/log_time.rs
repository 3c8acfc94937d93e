//! A log's records in time: retention by age and by size ([`LogOptions::retain_for`],
//! [`LogOptions::retain_bytes`]): which segments go, when, and that every record kept
//! reads back whole; and the lookup of an offset by timestamp
//! ([`LogStore::offset_for_timestamp`]); compaction keeping tombstones for a while.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use cauce::record::now;
use cauce::store::{CompactOptions, LogOptions, LogStore, Store, SyncPolicy};
use cauce::{Entry, Error, Offset};

const SEGMENT: u64 = 4096;
const HOUR_MS: u64 = 3600 * 1000;

fn options() -> LogOptions {
    LogOptions::new()
        .sync(SyncPolicy::Never)
        .segment_bytes(SEGMENT)
        .index_interval_bytes(256)
}

fn payload(i: u64) -> Vec<u8> {
    format!("value-{i}-{}", "x".repeat(80 + (i % 13) as usize)).into_bytes()
}

/// Appends records `range` one at a time, record `i` stamped `stamp(i)`.
fn append(log: &LogStore, range: std::ops::Range<u64>, stamp: impl Fn(u64) -> u64) {
    for i in range {
        let at = log
            .append(&[Entry::with_timestamp(stamp(i), b"k", &payload(i))])
            .expect("append");
        assert_eq!(at, i..i + 1);
    }
}

/// The segment files in `dir`: base offset to length.
fn segment_files(dir: &Path) -> BTreeMap<Offset, u64> {
    std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| {
            let e = e.expect("entry");
            let name = e.file_name().into_string().ok()?;
            let base = name.strip_suffix(".log")?.parse().ok()?;
            Some((base, e.metadata().expect("stat").len()))
        })
        .collect()
}

/// Every record from the start to the end reads back whole, at its offset.
fn check_kept(log: &LogStore, end: u64) {
    let start = log.start_offset();
    let offsets: Vec<u64> = log
        .read_from(start)
        .expect("read")
        .map(|r| {
            let r = r.expect("record");
            assert_eq!(r.payload.to_vec(), payload(r.offset), "offset {}", r.offset);
            r.offset
        })
        .collect();
    assert_eq!(offsets, (start..end).collect::<Vec<_>>());
}

#[test]
fn retention_by_size_keeps_between_the_limit_and_one_segment_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 5 * SEGMENT;
    let log = LogStore::open(dir.path(), options().retain_bytes(limit)).expect("open");
    let mut sealed_checks = 0;
    let mut active_before = 0;
    for i in 0..600u64 {
        append(&log, i..i + 1, |_| now());
        let stats = log.stats();
        let files = segment_files(dir.path());
        let active = files.keys().last().copied().expect("a segment");
        if active != active_before {
            // A seal happened in this append, and retention ran after it: dropping
            // the oldest segment left would go below the limit.
            assert_eq!(files.len() as u64, stats.segments);
            let sealed: Vec<u64> = files.values().copied().collect();
            let total = stats.bytes;
            if stats.segments > 1 {
                assert!(
                    total - sealed[0] < limit,
                    "after append {i}: {total} bytes, the oldest {} could go",
                    sealed[0]
                );
            }
            assert!(
                total <= limit + 2 * SEGMENT,
                "{total} bytes after append {i}"
            );
            sealed_checks += 1;
        }
        active_before = active;
    }
    assert!(sealed_checks > 10, "only {sealed_checks} seals seen");
    assert!(log.start_offset() > 0, "nothing was dropped");
    assert!(log.stats().bytes >= limit - SEGMENT, "{:?}", log.stats());
    check_kept(&log, 600);
    // Retention applied again now (the active segment grew since the last seal) is
    // what a reopen with the same options finds.
    let start = log.apply_retention().expect("retention");
    assert!(log.stats().bytes - segment_files(dir.path())[&start] < limit);
    drop(log);
    let log = LogStore::open(dir.path(), options().retain_bytes(limit)).expect("reopen");
    assert_eq!(log.start_offset(), start);
    check_kept(&log, 600);
}

#[test]
fn retention_by_age_drops_the_segments_whose_newest_record_is_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log =
        LogStore::open(dir.path(), options().retain_for(Duration::from_secs(3600))).expect("open");
    let old = now() - 2 * HOUR_MS;
    // Old records over several segments; one recent record among old ones (the
    // newest of its segment counts, not the last); then old ones again, and recent.
    let fresh = 150;
    append(&log, 0..300, |i| if i == fresh { now() } else { old });
    append(&log, 300..400, |_| now());
    let start = log.start_offset();
    assert!(start > 0, "no old segment went");
    assert!(
        start <= fresh,
        "the segment of the recent record {fresh} went (start {start})"
    );
    // Every segment left starts at or after the start, and the first one holds the
    // recent record: the one before it held only old records and went.
    let files = segment_files(dir.path());
    assert_eq!(files.keys().next(), Some(&start));
    let second = files.keys().nth(1).copied().expect("two segments");
    assert!(second > fresh, "segments {files:?}");
    check_kept(&log, 400);
}

#[test]
fn the_active_segment_goes_by_age_once_every_record_in_it_expired() {
    // By size, the active segment stays whatever the limit.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(dir.path(), options().retain_bytes(0)).expect("open");
    append(&log, 0..200, |_| now());
    let start = log.apply_retention().expect("retention");
    assert!(start > 0);
    assert_eq!(log.stats().segments, 1);
    assert_eq!(segment_files(dir.path()).len(), 1);
    check_kept(&log, 200);

    // By age, a log that went quiet loses its last records too, once they expired: the
    // active segment is sealed, then goes. Appends go on at the next offset.
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || options().retain_for(Duration::from_secs(3600));
    let log = LogStore::open(dir.path(), opts()).expect("open");
    let old = now() - 2 * HOUR_MS;
    append(&log, 0..5, |_| old);
    assert_eq!(log.apply_retention().expect("retention"), 5);
    assert_eq!(segment_files(dir.path()).keys().collect::<Vec<_>>(), [&5]);
    check_kept(&log, 5);
    append(&log, 5..6, |_| now());
    check_kept(&log, 6);
    // One recent record keeps the active segment, and the old records after it.
    append(&log, 6..10, |_| old);
    assert_eq!(log.apply_retention().expect("retention"), 5);
    check_kept(&log, 10);
    // Expired records of the segment a store opens on are found by reading it.
    drop(log);
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = LogStore::open(dir.path(), options()).expect("open");
        append(&log, 0..7, |_| old);
    }
    let log = LogStore::open(dir.path(), opts()).expect("reopen");
    assert_eq!(log.start_offset(), 7);
    append(&log, 7..8, |_| now());
    check_kept(&log, 8);
}

#[test]
fn a_segment_older_than_segment_age_is_sealed_at_the_next_append() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log =
        LogStore::open(dir.path(), options().segment_age(Duration::from_secs(1))).expect("open");
    append(&log, 0..3, |_| now());
    std::thread::sleep(Duration::from_millis(1100));
    append(&log, 3..4, |_| now());
    // The append after the segment's age sealed it and started the next one.
    assert_eq!(segment_files(dir.path()).keys().last(), Some(&3));
    append(&log, 4..5, |_| now());
    check_kept(&log, 5);
    // Reopened, the files are the same segments.
    drop(log);
    let log = LogStore::open(dir.path(), options()).expect("reopen");
    check_kept(&log, 5);
    assert_eq!(segment_files(dir.path()).keys().last(), Some(&3));
}

#[test]
fn retention_applies_when_the_store_opens_reading_the_segments_it_finds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = now() - 2 * HOUR_MS;
    let fresh = 120;
    {
        let log = LogStore::open(dir.path(), options()).expect("open");
        append(&log, 0..200, |i| if i == fresh { now() } else { old });
        append(&log, 200..260, |_| now());
        assert_eq!(log.start_offset(), 0);
    }
    let before = segment_files(dir.path());
    assert!(before.len() > 5, "{before:?}");
    // Opened read-only, nothing changes, and retention is refused.
    {
        let view =
            LogStore::open_read_only(dir.path(), options().retain_for(Duration::from_secs(3600)))
                .expect("open read-only");
        assert_eq!(view.start_offset(), 0);
        assert!(matches!(view.apply_retention(), Err(Error::ReadOnly(_))));
        assert_eq!(segment_files(dir.path()), before);
    }
    let log = LogStore::open(dir.path(), options().retain_for(Duration::from_secs(3600)))
        .expect("reopen");
    let start = log.start_offset();
    assert!(start > 0 && start <= fresh, "start {start}");
    assert_eq!(segment_files(dir.path()).keys().next(), Some(&start));
    check_kept(&log, 260);
    // Without retention, a reopen keeps what is there.
    drop(log);
    let log = LogStore::open(dir.path(), options()).expect("reopen");
    assert_eq!(log.start_offset(), start);
    assert_eq!(log.apply_retention().expect("no retention"), start);
    check_kept(&log, 260);
}

#[test]
fn retention_after_compaction_reads_the_rewritten_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log =
        LogStore::open(dir.path(), options().retain_for(Duration::from_secs(3600))).expect("open");
    let old = now() - 2 * HOUR_MS;
    // Distinct keys, so compaction keeps every record and only rewrites the files.
    for i in 0..200u64 {
        let stamp = if i < 100 { old } else { now() };
        log.append(&[Entry::with_timestamp(
            stamp,
            format!("k{i}").as_bytes(),
            &payload(i),
        )])
        .expect("append");
    }
    // The appends sealed segments and retention ran after them.
    let start = log.start_offset();
    assert!(start > 0 && start <= 100, "start {start}");
    log.compact().expect("compact");
    assert_eq!(log.apply_retention().expect("retention"), start);
    check_kept(&log, 200);
}

/// Timestamps that mostly grow, with jitter that puts some out of order, and runs of
/// equal ones.
fn jittered_stamps(n: u64) -> Vec<u64> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let jitter = (state >> 33) % 40;
            1_000_000 + (i / 3) * 10 + jitter
        })
        .collect()
}

/// `offset_for_timestamp` against the model (the first offset from `start` whose own
/// timestamp is at or after it) at every timestamp held, one past each, and the edges.
fn check_lookups(log: &LogStore, stamps: &[u64], start: u64) {
    let mut probes: Vec<u64> = stamps.iter().flat_map(|&s| [s, s + 1]).collect();
    probes.extend([0, u64::MAX]);
    for at in probes {
        let expected = (start..stamps.len() as u64).find(|&o| stamps[o as usize] >= at);
        assert_eq!(
            log.offset_for_timestamp(at).expect("lookup"),
            expected,
            "timestamp {at}"
        );
    }
}

#[test]
fn offset_for_timestamp_is_the_first_record_at_or_after_it() {
    let stamps = jittered_stamps(400);
    // The newest timestamps of sealed segments read from them (no retention), and
    // noted by the writer (retention by an age that keeps everything).
    for options in [
        options(),
        options().retain_for(Duration::from_secs(u64::from(u32::MAX))),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(dir.path(), options.clone()).expect("open");
        append(&log, 0..400, |i| stamps[i as usize]);
        assert_eq!(log.start_offset(), 0);
        assert!(segment_files(dir.path()).len() > 10);
        check_lookups(&log, &stamps, 0);
        // Records before the start do not count.
        log.truncate_before(123).expect("truncate");
        check_lookups(&log, &stamps, 123);
        log.sync().expect("sync");
        // A read-only view answers the same, reading the segments it opened.
        let view = LogStore::open_read_only(dir.path(), options).expect("read-only");
        check_lookups(&view, &stamps, 123);
    }
}

#[test]
fn retention_runs_while_appenders_and_readers_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 6 * SEGMENT;
    let log = LogStore::open(
        dir.path(),
        options().sync(SyncPolicy::Always).retain_bytes(limit),
    )
    .expect("open");
    // Each record's payload is its key repeated: a reader can check it whole without
    // knowing its offset.
    let record = |t: u64, i: u64| {
        let key = format!("t{t}-{i}");
        let payload = key.repeat(100 / key.len() + 1);
        (key, payload)
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let read = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..3u64)
            .map(|t| {
                let log = &log;
                s.spawn(move || {
                    for i in 0..600 {
                        let (key, payload) = record(t, i);
                        log.append(&[Entry::new(key.as_bytes(), payload.as_bytes())])
                            .expect("append");
                    }
                })
            })
            .collect();
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let reader = match log.read_from(log.start_offset()) {
                        Ok(reader) => reader,
                        // Retention moved the start between the two calls.
                        Err(Error::OffsetOutOfRange { .. }) => continue,
                        Err(e) => panic!("read: {e}"),
                    };
                    for r in reader {
                        match r {
                            Ok(r) => {
                                let key = std::str::from_utf8(&r.key).expect("key");
                                assert!(r.payload.starts_with(key.as_bytes()), "{r:?}");
                                assert_eq!(r.payload.len() % key.len(), 0, "{r:?}");
                                read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            // Retention passed the reader: start again from the start.
                            Err(Error::OffsetOutOfRange { .. }) => break,
                            Err(e) => panic!("read: {e}"),
                        }
                    }
                }
            });
        }
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, std::sync::atomic::Ordering::Release);
    });
    assert!(read.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let start = log.apply_retention().expect("retention");
    assert!(start > 0, "nothing was dropped");
    let stats = log.stats();
    assert!(
        stats.bytes >= limit - SEGMENT && stats.bytes <= limit + SEGMENT,
        "{stats:?}"
    );
    assert_eq!(segment_files(dir.path()).len() as u64, stats.segments);
    // What is kept reads back whole, every offset from the start to the end.
    let kept: Vec<u64> = log
        .read_from(start)
        .expect("read")
        .map(|r| {
            let r = r.expect("record");
            let key = std::str::from_utf8(&r.key).expect("key").to_owned();
            assert!(r.payload.starts_with(key.as_bytes()));
            r.offset
        })
        .collect();
    assert_eq!(kept, (start..1800).collect::<Vec<_>>());
}

#[test]
fn a_damaged_sealed_segment_does_not_stop_an_open_with_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = LogStore::open(dir.path(), options()).expect("open");
        append(&log, 0..200, |_| now());
    }
    // One byte flipped in the middle of the first segment's records.
    let first = dir.path().join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&first).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&first, &bytes).expect("write");
    // Without retention the open succeeds and the read reports the damage; with
    // retention by age (which reads the segment for its newest timestamp) the same.
    for options in [options(), options().retain_for(Duration::from_secs(3600))] {
        let log = LogStore::open(dir.path(), options).expect("open");
        assert_eq!(log.start_offset(), 0);
        let read: Result<Vec<_>, _> = log.read_from(0).expect("read").collect();
        assert!(matches!(read, Err(Error::Corrupt { .. })), "{read:?}");
        // Appends go on, and retention after them reports the damage, not a panic.
        let next = log.next_offset();
        append(&log, next..next + 1, |_| now());
        assert!(matches!(
            log.apply_retention(),
            Err(Error::Corrupt { .. }) | Ok(0)
        ));
    }
}

#[test]
fn tombstones_kept_for_a_while_go_only_once_that_long_has_passed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(dir.path(), options()).expect("open");
    let now = now();
    let day = 24 * HOUR_MS;
    log.append(&[
        Entry::with_timestamp(now - 3 * day, b"old", b"v1"),
        Entry::with_timestamp(now - 2 * day, b"old", b""),
        Entry::with_timestamp(now - 2 * day, b"recent", b"v1"),
        Entry::with_timestamp(now - HOUR_MS, b"recent", b""),
        Entry::with_timestamp(now - HOUR_MS, b"kept", b"v1"),
    ])
    .expect("append");
    let options = CompactOptions::new().tombstones_kept_for(Duration::from_secs(86_400));
    let done = log.compact_with(options).expect("compact");
    // "old": its value and its tombstone, two days old, go; "recent": its value goes,
    // its tombstone (an hour old) stays for consumers still to see it.
    assert_eq!((done.kept, done.dropped), (2, 3));
    let left: Vec<(Offset, Vec<u8>)> = log
        .read_from(log.start_offset())
        .expect("read")
        .map(|r| r.map(|r| (r.offset, r.key.to_vec())))
        .collect::<Result<_, _>>()
        .expect("records");
    assert_eq!(left, [(3, b"recent".to_vec()), (4, b"kept".to_vec())]);
    // The options hold the duration: built once, each use reads the clock again.
    let first = options.tombstones_expired_before().expect("tombstones");
    let waited = std::time::Instant::now();
    while cauce::record::now() <= first + 24 * HOUR_MS {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the clock stands still"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(options.tombstones_expired_before().expect("tombstones") > first);
    assert_eq!(
        cauce::record::timestamp_of(
            log.read_from(4)
                .expect("read")
                .next()
                .unwrap()
                .unwrap()
                .time()
        ),
        now - HOUR_MS,
        "a record's time is its timestamp"
    );
}

#[test]
fn a_batch_stamped_too_far_ahead_is_refused_whole_and_names_its_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ahead = Duration::from_secs(3600);
    let log = LogStore::open(dir.path(), options().max_timestamp_ahead(ahead)).expect("open");
    let now = now();
    log.append(&[Entry::with_timestamp(now - HOUR_MS, b"k", b"past")])
        .expect("a past timestamp is accepted");
    log.append(&[Entry::with_timestamp(now + HOUR_MS / 2, b"k", b"soon")])
        .expect("a timestamp within the limit is accepted");
    let refused = log.append(&[
        Entry::with_timestamp(now, b"k", b"a"),
        Entry::with_timestamp(now + 2 * HOUR_MS, b"k", b"b"),
        Entry::with_timestamp(now + 3 * HOUR_MS, b"k", b"c"),
    ]);
    let message = refused.as_ref().map_err(|e| e.to_string()).err();
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.starts_with("record 1 of the batch")
                && m.contains("max_timestamp_ahead")
                && m.contains("at most 3600000 ms")),
        "{message:?}"
    );
    match refused {
        Err(Error::TimestampAhead {
            index,
            timestamp,
            now: clock,
            max_ahead,
        }) => {
            assert_eq!((index, timestamp, max_ahead), (1, now + 2 * HOUR_MS, ahead));
            assert!(
                clock >= now && clock < now + HOUR_MS,
                "the store's clock: {clock}"
            );
        }
        other => panic!("expected TimestampAhead, got {other:?}"),
    }
    assert_eq!(
        log.next_offset(),
        2,
        "nothing of the refused batch is appended"
    );
    log.append(&[Entry::with_timestamp(now, b"k", b"after")])
        .expect("the log goes on");
    drop(log);
    let log = LogStore::open(dir.path(), options()).expect("reopen without the limit");
    let payloads: Vec<Vec<u8>> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.map(|r| r.payload.to_vec()))
        .collect::<Result<_, _>>()
        .expect("records");
    assert_eq!(payloads, [&b"past"[..], b"soon", b"after"]);
    log.append(&[Entry::with_timestamp(u64::MAX, b"k", b"far")])
        .expect("without the limit every timestamp is accepted");
}

/// Retention runs after appends that seal a segment, not after the append that follows
/// `apply_retention`'s seal of a quiet log's active segment: that append's own record
/// (backfilled past the age) was dropped before the append returned, and a follower
/// waiting at the end found its position gone.
#[test]
fn the_append_after_retention_sealed_a_quiet_log_keeps_its_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = options().retain_for(Duration::from_secs(60));
    let log = std::sync::Arc::new(LogStore::open(dir.path(), options).expect("open"));
    let old = now() - 10 * 60 * 1000;
    log.append(&[Entry::with_timestamp(old, b"k", b"expired")])
        .expect("append");
    assert_eq!(
        log.apply_retention().expect("retention"),
        1,
        "the quiet log emptied"
    );
    let stream = cauce::stream::LogStream::new(log.clone());
    let mut follower =
        cauce::stream::Stream::subscribe(&stream, cauce::stream::Position::End).expect("subscribe");
    let at = log
        .append(&[Entry::with_timestamp(old, b"k", b"backfilled")])
        .expect("append");
    assert_eq!(at, 1..2);
    assert_eq!(log.start_offset(), 1, "its own append let the record go");
    let record = cauce::stream::Subscribe::recv_timeout(&mut follower, Duration::from_secs(30))
        .expect("the follower reads it");
    assert_eq!(
        (record.offset, &record.payload[..]),
        (1, &b"backfilled"[..])
    );
}

/// Nor after an append that rolls a segment itself: retention after it lets sealed
/// segments go, but never seals the active one, which holds the append's own record
/// (backfilled past the age here).
#[test]
fn an_append_that_rolls_keeps_its_own_backfilled_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = options().retain_for(Duration::from_secs(60));
    let log = LogStore::open(dir.path(), options).expect("open");
    let old = now() - 10 * 60 * 1000;
    let mut i = 0;
    // Old records fill segments; the first sealed ones go as they seal.
    let last = loop {
        let at = log
            .append(&[Entry::with_timestamp(old, b"k", &payload(i))])
            .expect("append");
        assert_eq!(
            log.start_offset().max(at.start),
            at.start,
            "its own record kept"
        );
        i += 1;
        // Stop at the append that rolled and had the sealed segment go.
        if log.start_offset() > 0 {
            break at.start;
        }
        assert!(i < 10_000, "no segment went");
    };
    let record = log
        .read_from(last)
        .expect("the last append's record is held")
        .next()
        .expect("a record")
        .expect("whole");
    assert_eq!(record.payload, payload(last));
    assert!(
        log.start_offset() > 0,
        "sealed segments of old records went"
    );
}
