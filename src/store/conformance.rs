//! The conformance suite for [`Store`] implementations.
//!
//! Every rule of the [`Store`] contract has a check here, and every store in the crate
//! runs them all. An implementation outside the crate runs them from its own tests:
//!
//! ```
//! use cauce::store::conformance::{self, Fixture};
//! use cauce::store::MemoryStore;
//!
//! struct Memory;
//! impl Fixture for Memory {
//!     type Store = MemoryStore;
//!     fn create(&mut self) -> MemoryStore { MemoryStore::new() }
//!     fn reopen(&mut self, store: MemoryStore) -> MemoryStore { store }
//! }
//! conformance::run_all(&mut Memory);
//! ```
//!
//! The checks panic with a message naming the broken rule, as test assertions do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{CompactOptions, DEFAULT_MAX_RECORD_BYTES, Snapshot, Store, record_size};
use crate::error::Error;
use crate::record::{Entry, Offset, Record};

/// Makes stores for the suite.
pub trait Fixture {
    /// The store under test.
    type Store: Store;

    /// A new, empty store, with the default record limit
    /// ([`DEFAULT_MAX_RECORD_BYTES`]).
    fn create(&mut self) -> Self::Store;

    /// Closes `store` and opens the same storage again, as a restarted process would
    /// (after a [`Store::sync`]). An in-memory store returns itself.
    fn reopen(&mut self, store: Self::Store) -> Self::Store;
}

/// Runs every check of the suite.
pub fn run_all<F: Fixture>(fixture: &mut F) {
    append_gives_consecutive_offsets(fixture);
    read_returns_exact_bytes_in_order(fixture);
    read_outside_the_range_is_an_error(fixture);
    reader_sees_records_committed_after_it_caught_up(fixture);
    readers_never_see_part_of_a_batch(fixture);
    readers_never_get_ahead_of_the_end(fixture);
    wait_for_wakes_on_append_timeout_and_wake(fixture);
    retention_drops_only_records_before_the_offset(fixture);
    retention_stops_readers_that_read_before_it(fixture);
    compaction_keeps_the_latest_record_per_key(fixture);
    cursors_are_durable_and_names_are_checked(fixture);
    snapshots_are_durable_and_latest_wins(fixture);
    synced_records_survive_reopen(fixture);
    large_and_empty_records_round_trip(fixture);
    oversized_records_are_refused_with_their_batch(fixture);
    replay_gives_the_records_read_gives(fixture);
    replay_range_stops_before_its_end(fixture);
    deferred_appends_are_appends_once_waited_for(fixture);
    offset_for_timestamp_is_the_first_record_at_or_after_it(fixture);
    compact_with_keeps_what_its_options_say(fixture);
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{}", i % 7).into_bytes()
}

fn payload(i: u64) -> Vec<u8> {
    // Varying lengths, including zero, with content that depends on i.
    (0..(i % 13) * 11).map(|j| (i * 31 + j) as u8).collect()
}

fn append_numbered<S: Store>(store: &S, range: std::ops::Range<u64>) {
    let keys: Vec<_> = range.clone().map(key).collect();
    let payloads: Vec<_> = range.clone().map(payload).collect();
    let batch: Vec<_> = keys
        .iter()
        .zip(&payloads)
        .zip(range.clone())
        .map(|((k, p), i)| Entry::with_timestamp(1_000 + i, k, p))
        .collect();
    let got = store.append(&batch).expect("append");
    assert_eq!(got, range, "append must return the offsets it gave");
}

fn read_all<S: Store>(store: &S, from: Offset) -> Vec<Record> {
    store
        .read_from(from)
        .expect("read_from")
        .collect::<Result<Vec<_>, _>>()
        .expect("reading committed records")
}

fn assert_numbered(records: &[Record], range: std::ops::Range<u64>) {
    assert_eq!(
        records.iter().map(|r| r.offset).collect::<Vec<_>>(),
        range.clone().collect::<Vec<_>>(),
        "records must come back in offset order, none missing"
    );
    for r in records {
        assert_eq!(r.key, key(r.offset), "key of offset {}", r.offset);
        assert_eq!(
            r.payload,
            payload(r.offset),
            "payload of offset {}",
            r.offset
        );
        assert_eq!(
            r.timestamp,
            1_000 + r.offset,
            "timestamp of offset {}",
            r.offset
        );
    }
}

/// `append` gives consecutive offsets from `next_offset()`; an empty batch gives none.
pub fn append_gives_consecutive_offsets<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    assert_eq!(store.next_offset(), 0);
    assert_eq!(store.start_offset(), 0);
    assert_eq!(store.append(&[]).expect("empty append"), 0..0);
    append_numbered(&store, 0..1);
    append_numbered(&store, 1..40);
    assert_eq!(store.append(&[]).expect("empty append"), 40..40);
    assert_eq!(store.next_offset(), 40);
}

/// Records come back in order, byte for byte, from any offset.
pub fn read_returns_exact_bytes_in_order<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    for chunk in 0..20 {
        append_numbered(&store, chunk * 50..(chunk + 1) * 50);
    }
    for from in [0, 1, 49, 50, 333, 999, 1000] {
        assert_numbered(&read_all(&store, from), from..1000);
    }
}

/// Reading before the start or after the end is `OffsetOutOfRange`.
pub fn read_outside_the_range_is_an_error<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    append_numbered(&store, 0..10);
    match store.read_from(11) {
        Err(Error::OffsetOutOfRange {
            requested: 11,
            end: 10,
            ..
        }) => {}
        other => panic!(
            "read past the end must be OffsetOutOfRange, got {:?}",
            other.err()
        ),
    }
    store.truncate_before(5).expect("truncate_before");
    match store.read_from(4) {
        Err(Error::OffsetOutOfRange {
            requested: 4,
            start: 5,
            ..
        }) => {}
        other => panic!(
            "read before the start must be OffsetOutOfRange, got {:?}",
            other.err()
        ),
    }
}

/// A reader that returned `None` returns records committed later.
pub fn reader_sees_records_committed_after_it_caught_up<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    append_numbered(&store, 0..3);
    let mut reader = store.read_from(0).expect("read_from");
    for expected in 0..3 {
        let r = reader.next().expect("a record").expect("no error");
        assert_eq!(r.offset, expected);
    }
    assert!(reader.next().is_none(), "caught up");
    append_numbered(&store, 3..5);
    let rest: Vec<_> = reader.by_ref().map(|r| r.expect("no error")).collect();
    assert_numbered(&rest, 3..5);
}

/// Concurrent readers see whole batches only, and every record once, in order.
pub fn readers_never_see_part_of_a_batch<F: Fixture>(fixture: &mut F) {
    const BATCH: u64 = 8;
    const BATCHES: u64 = 300;
    let store = Arc::new(fixture.create());
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let done = done.clone();
            thread::spawn(move || {
                let mut reader = store.read_from(0).expect("read_from");
                let mut expected = 0;
                loop {
                    let finished = done.load(Ordering::SeqCst);
                    for r in reader.by_ref() {
                        let r = r.expect("reading while appending");
                        assert_eq!(r.offset, expected, "no gap, no repeat");
                        assert_eq!(r.key, key(r.offset));
                        assert_eq!(r.payload, payload(r.offset));
                        expected += 1;
                    }
                    assert_eq!(expected % BATCH, 0, "reader stopped inside a batch");
                    if finished {
                        return expected;
                    }
                    store.wait_for(expected, Some(Duration::from_millis(5)));
                }
            })
        })
        .collect();
    for b in 0..BATCHES {
        append_numbered(&*store, b * BATCH..(b + 1) * BATCH);
    }
    done.store(true, Ordering::SeqCst);
    for r in readers {
        assert_eq!(r.join().expect("reader thread"), BATCH * BATCHES);
    }
}

/// While several threads append, a reader returns a record only once `next_offset()`
/// covers it (the append that wrote it has committed): a consumer may commit a cursor
/// past every record it was given.
pub fn readers_never_get_ahead_of_the_end<F: Fixture>(fixture: &mut F) {
    const APPENDERS: usize = 2;
    const APPENDS: u64 = 100_000;
    // Bounds the check under a sync policy that makes every append wait for the disk.
    const LONGEST: Duration = Duration::from_millis(400);
    let store = Arc::new(fixture.create());
    let finished = Arc::new(AtomicUsize::new(0));
    let appenders: Vec<_> = (0..APPENDERS)
        .map(|_| {
            let store = store.clone();
            let finished = finished.clone();
            thread::spawn(move || {
                let started = Instant::now();
                let mut appended = 0;
                while appended < APPENDS && started.elapsed() < LONGEST {
                    store.append(&[Entry::new(b"k", b"v")]).expect("append");
                    appended += 1;
                }
                finished.fetch_add(1, Ordering::SeqCst);
                appended
            })
        })
        .collect();
    // The reader polls instead of waiting, so that it often reads while an append is
    // under way: that is when a record could show before the end covers it.
    let mut reader = store.read_from(0).expect("read_from");
    let mut read = 0;
    loop {
        let all_done = finished.load(Ordering::SeqCst) == APPENDERS;
        for r in reader.by_ref() {
            let offset = r.expect("reading while appending").offset;
            let end = store.next_offset();
            assert!(
                offset < end,
                "record {offset} was returned while next_offset() was {end}"
            );
            assert_eq!(offset, read, "no gap, no repeat");
            read += 1;
        }
        if all_done {
            break;
        }
        thread::yield_now();
    }
    let appended: u64 = appenders
        .into_iter()
        .map(|a| a.join().expect("appender thread"))
        .sum();
    assert_eq!(read, appended, "the reader read every record");
}

/// `wait_for` returns when the end moves, when it times out, and on `wake_waiters`.
pub fn wait_for_wakes_on_append_timeout_and_wake<F: Fixture>(fixture: &mut F) {
    let store = Arc::new(fixture.create());
    append_numbered(&*store, 0..2);
    assert_eq!(store.wait_for(1, None), 2, "already past: returns at once");
    let started = Instant::now();
    assert_eq!(store.wait_for(2, Some(Duration::from_millis(30))), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(25),
        "timeout honoured"
    );

    let s = store.clone();
    let waiter = thread::spawn(move || s.wait_for(2, None));
    thread::sleep(Duration::from_millis(20));
    append_numbered(&*store, 2..3);
    assert_eq!(waiter.join().expect("waiter"), 3);

    // A wake reaches only threads already waiting, and the suite cannot see when the
    // waiter has started to: a single wake sent before it got there (the thread was
    // scheduled late) would leave it waiting forever. So the wake is repeated until
    // the waiter returns; a store whose `wake_waiters` does not end a wait fails here
    // after 30 s, however many wakes it was sent.
    let s = store.clone();
    let (report, done) = std::sync::mpsc::channel();
    thread::spawn(move || report.send(s.wait_for(100, None)));
    thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    let woken = loop {
        store.wake_waiters();
        match done.recv_timeout(Duration::from_millis(20)) {
            Ok(end) => break end,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {}
            Err(_) => panic!("wake_waiters did not end the wait in 30 s"),
        }
    };
    assert_eq!(woken, 3, "wake_waiters ends the wait");
}

/// Retention moves the start exactly and keeps everything after it.
pub fn retention_drops_only_records_before_the_offset<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    for chunk in 0..10 {
        append_numbered(&store, chunk * 100..(chunk + 1) * 100);
    }
    store.truncate_before(250).expect("truncate_before");
    assert_eq!(store.start_offset(), 250);
    assert_numbered(&read_all(&store, 250), 250..1000);
    store.truncate_before(100).expect("lower offset is a no-op");
    assert_eq!(store.start_offset(), 250);
    assert!(matches!(
        store.truncate_before(1001),
        Err(Error::OffsetOutOfRange { .. })
    ));
    let store = fixture.reopen(store);
    assert_eq!(store.start_offset(), 250, "retention survives reopen");
    assert_numbered(&read_all(&store, 250), 250..1000);
    store.truncate_before(1000).expect("truncate everything");
    assert_eq!(read_all(&store, 1000), vec![]);
    append_numbered(&store, 1000..1001);
    assert_numbered(&read_all(&store, 1000), 1000..1001);
}

/// Once `truncate_before` has returned, no reader returns a record before the new start,
/// not even one that had read up to it before (and may hold the records in a buffer): it
/// reports `OffsetOutOfRange` for the first record it can no longer return, and stops.
/// A replay that retention overtakes stops the same way.
pub fn retention_stops_readers_that_read_before_it<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    append_numbered(&store, 0..300);
    let mut reader = store.read_from(0).expect("read_from");
    let first = reader.next().expect("a record").expect("no error");
    assert_eq!(first.offset, 0);
    store.truncate_before(5).expect("truncate_before");
    match reader.next() {
        Some(Err(Error::OffsetOutOfRange {
            requested: 1,
            start: 5,
            end: 300,
        })) => {}
        Some(Ok(r)) => panic!(
            "record {} was returned after retention dropped it",
            r.offset
        ),
        other => panic!("a reader overtaken by retention must be OffsetOutOfRange, got {other:?}"),
    }
    assert!(
        reader.next().is_none(),
        "a reader yields nothing after its error"
    );

    let mut replayed = Vec::new();
    let result = store.replay_from(5, &mut |offset, _| {
        replayed.push(offset);
        if offset == 5 {
            store
                .truncate_before(100)
                .expect("truncate_before during a replay");
        }
    });
    assert!(
        matches!(
            result,
            Err(Error::OffsetOutOfRange {
                requested: 6,
                start: 100,
                ..
            })
        ),
        "a replay overtaken by retention must be OffsetOutOfRange, got {result:?}"
    );
    assert_eq!(replayed, [5], "nothing replayed after retention dropped it");
    assert_numbered(&read_all(&store, 100), 100..300);
}

/// Compaction keeps the latest record of each key (and every keyless record), with its
/// offset, and nothing else.
pub fn compaction_keeps_the_latest_record_per_key<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    let mut expected = Vec::new();
    let keys: [&[u8]; 4] = [b"a", b"b", b"", b"c"];
    for round in 0..50u64 {
        let batch: Vec<_> = keys
            .iter()
            .map(|k| Entry::with_timestamp(round, k, b"value"))
            .collect();
        store.append(&batch).expect("append");
    }
    // Latest of a, b, c are in the last round; every keyless record stays.
    for round in 0..50u64 {
        expected.push(round * 4 + 2);
    }
    expected.extend([196, 197, 199]);
    expected.sort_unstable();
    let report = store.compact().expect("compact");
    assert_eq!(report.until, 200);
    assert_eq!(report.kept, expected.len() as u64);
    assert_eq!(report.dropped, 200 - expected.len() as u64);
    let offsets = |s: &F::Store| {
        read_all(s, s.start_offset())
            .iter()
            .map(|r| r.offset)
            .collect::<Vec<_>>()
    };
    assert_eq!(offsets(&store), expected);
    store.sync().expect("sync");
    let store = fixture.reopen(store);
    assert_eq!(offsets(&store), expected, "compaction survives reopen");
    assert_eq!(store.next_offset(), 200);
    let more = store
        .append(&[Entry::new(b"a", b"new")])
        .expect("append after compaction");
    assert_eq!(more, 200..201);
}

/// Cursors are durable, can move either way, and names are checked.
pub fn cursors_are_durable_and_names_are_checked<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    append_numbered(&store, 0..20);
    assert_eq!(store.cursor("reader").expect("cursor"), None);
    assert!(
        matches!(
            store.commit_cursor("reader", 21),
            Err(Error::OffsetOutOfRange { requested: 21, .. })
        ),
        "a cursor past the end names no records"
    );
    store.commit_cursor("reader", 10).expect("commit");
    store.commit_cursor("other.one_2-x", 3).expect("commit");
    store.commit_cursor("reader", 12).expect("commit");
    for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(129)] {
        assert!(
            matches!(store.commit_cursor(bad, 1), Err(Error::InvalidName { .. })),
            "name {bad:?} must be refused"
        );
    }
    let store = fixture.reopen(store);
    assert_eq!(store.cursor("reader").expect("cursor"), Some(12));
    assert_eq!(store.cursor("other.one_2-x").expect("cursor"), Some(3));
    store
        .commit_cursor("reader", 5)
        .expect("a cursor may move back");
    assert_eq!(store.cursor("reader").expect("cursor"), Some(5));
}

/// Snapshots are durable, and the one with the highest offset is the latest.
pub fn snapshots_are_durable_and_latest_wins<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    append_numbered(&store, 0..30);
    assert_eq!(store.latest_snapshot("state").expect("latest"), None);
    assert!(
        matches!(
            store.save_snapshot("state", 31, b"past"),
            Err(Error::OffsetOutOfRange { requested: 31, .. })
        ),
        "a snapshot past the end folds no records"
    );
    assert_eq!(store.latest_snapshot("state").expect("latest"), None);
    store.save_snapshot("state", 10, b"ten").expect("save");
    store.save_snapshot("state", 30, b"thirty").expect("save");
    store.save_snapshot("state", 20, b"twenty").expect("save");
    store.save_snapshot("other", 5, &[0u8; 0]).expect("save");
    // Below the newest two kept: superseded, `Ok`, and dropped by both kinds of store.
    store.save_snapshot("state", 5, b"five").expect("save");
    let thirty = Snapshot {
        offset: 30,
        blob: bytes::Bytes::from_static(b"thirty"),
    };
    assert_eq!(
        store.latest_snapshot("state").expect("latest"),
        Some(thirty.clone())
    );
    assert!(matches!(
        store.save_snapshot("../x", 1, b""),
        Err(Error::InvalidName { .. })
    ));
    let store = fixture.reopen(store);
    assert_eq!(
        store.latest_snapshot("state").expect("latest"),
        Some(thirty)
    );
    let other = store
        .latest_snapshot("other")
        .expect("latest")
        .expect("saved");
    assert_eq!((other.offset, other.blob.len()), (5, 0));
}

/// Records synced before a reopen (by `sync` or `sync_until`) are all there after it,
/// and appends continue.
pub fn synced_records_survive_reopen<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    for chunk in 0..30 {
        append_numbered(&store, chunk * 10..(chunk + 1) * 10);
    }
    store.sync().expect("sync");
    let store = fixture.reopen(store);
    assert_eq!(store.next_offset(), 300);
    assert_numbered(&read_all(&store, 0), 0..300);
    append_numbered(&store, 300..310);
    store.sync_until(0).expect("sync_until 0");
    store.sync_until(310).expect("sync_until");
    let store = fixture.reopen(store);
    assert_numbered(&read_all(&store, 0), 0..310);
}

/// A 1 MiB payload, an empty key and an empty payload come back as written.
pub fn large_and_empty_records_round_trip<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    store
        .append(&[
            Entry::with_timestamp(1, b"", b""),
            Entry::with_timestamp(2, b"big", &big),
            Entry::with_timestamp(u64::MAX, &[0xff; 300], b"x"),
        ])
        .expect("append");
    let records = read_all(&store, 0);
    assert_eq!(records.len(), 3);
    assert_eq!(
        (&records[0].key[..], &records[0].payload[..]),
        (&b""[..], &b""[..])
    );
    assert_eq!(records[1].payload, big);
    assert_eq!(records[2].timestamp, u64::MAX);
    assert_eq!(records[2].key, vec![0xff; 300]);
}

/// A record over the default limit ([`DEFAULT_MAX_RECORD_BYTES`], as [`record_size`]
/// counts it) is `RecordTooLarge`, naming where it is in its batch, and nothing of the
/// batch is appended; a record of exactly the limit is accepted.
pub fn oversized_records_are_refused_with_their_batch<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    append_numbered(&store, 0..3);
    let limit = DEFAULT_MAX_RECORD_BYTES;
    let at_limit = vec![7u8; limit - record_size(&Entry::new(b"k", b""))];
    let over = vec![9u8; at_limit.len() + 1];
    let refused = store.append(&[
        Entry::new(b"a", b"small"),
        Entry::new(b"b", b""),
        Entry::new(b"k", &over),
        Entry::new(b"c", b"small"),
    ]);
    match refused {
        Err(Error::RecordTooLarge {
            index: 2,
            size,
            limit: reported,
        }) if size == limit + 1 && reported == limit => {}
        other => panic!(
            "a record of {} bytes must be RecordTooLarge at index 2, got {:?}",
            limit + 1,
            other
        ),
    }
    assert_eq!(
        store.next_offset(),
        3,
        "nothing of a refused batch is appended"
    );
    assert_numbered(&read_all(&store, 0), 0..3);
    let fits = store
        .append(&[Entry::new(b"k", &at_limit)])
        .expect("a record of exactly the limit is accepted");
    assert_eq!(fits, 3..4);
    let records = read_all(&store, 3);
    assert_eq!(records.len(), 1);
    assert!(
        records[0].payload == at_limit,
        "the record at the limit comes back whole"
    );
}

/// `replay_from` lends exactly the records `read_from` returns, and says where to resume.
pub fn replay_gives_the_records_read_gives<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    for chunk in 0..8 {
        append_numbered(&store, chunk * 25..(chunk + 1) * 25);
    }
    for from in [0, 1, 99, 200] {
        let mut replayed = Vec::new();
        let next = store
            .replay_from(from, &mut |offset, entry| {
                replayed.push(entry.to_record(offset))
            })
            .expect("replay_from");
        assert_eq!(replayed, read_all(&store, from), "replay from {from}");
        assert_eq!(next, 200, "replay from {from} resumes at the end");
    }
    assert!(matches!(
        store.replay_from(201, &mut |_, _| {}),
        Err(Error::OffsetOutOfRange { .. })
    ));
}

/// `replay_range` lends the records `read_from` returns before its end, and says where
/// to resume.
pub fn replay_range_stops_before_its_end<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    for chunk in 0..8 {
        append_numbered(&store, chunk * 25..(chunk + 1) * 25);
    }
    for (from, until) in [
        (0, 0),
        (0, 1),
        (0, 24),
        (0, 25),
        (0, 26),
        (1, 99),
        (99, 150),
        (150, 200),
        (180, 500),
        (200, 300),
        (120, 60),
        (7, u64::MAX),
    ] {
        let mut replayed = Vec::new();
        let next = store
            .replay_range(from, until, &mut |offset, entry| {
                replayed.push(entry.to_record(offset))
            })
            .expect("replay_range");
        let expected: Vec<Record> = read_all(&store, from)
            .into_iter()
            .filter(|r| r.offset < until)
            .collect();
        assert_eq!(replayed, expected, "replay of {from}..{until}");
        assert_eq!(
            next,
            from.max(until.min(200)),
            "replay of {from}..{until} resumes after its last record"
        );
    }
    for until in [0, 300] {
        assert!(matches!(
            store.replay_range(201, until, &mut |_, _| {}),
            Err(Error::OffsetOutOfRange { .. })
        ));
    }
}

/// `append_deferred` gives offsets as `append` does, from any number of threads at once;
/// once `wait_appended` returned for a batch's end, its records read back as written
/// (and survive a reopen); an offset never appended is not waited for.
pub fn deferred_appends_are_appends_once_waited_for<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    append_numbered(&store, 0..3);
    let ranges: Vec<std::ops::Range<Offset>> = thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let store = &store;
                s.spawn(move || {
                    let mut got = Vec::new();
                    for _ in 0..25 {
                        // One record a batch, the same bytes each time.
                        let range = store
                            .append_deferred(&[Entry::new(b"deferred", b"payload")])
                            .expect("append_deferred")
                            .offsets;
                        assert_eq!(range.end - range.start, 1, "one record, one offset");
                        store.wait_appended(range.end).expect("wait_appended");
                        let first = read_all(store, range.start);
                        assert!(
                            first.first().is_some_and(|r| r.offset == range.start
                                && r.key.as_ref() == b"deferred"
                                && r.payload.as_ref() == b"payload"),
                            "a deferred record is readable once waited for"
                        );
                        got.push(range);
                    }
                    got
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("deferred appender"))
            .collect()
    });
    let mut starts: Vec<Offset> = ranges.iter().map(|r| r.start).collect();
    starts.sort_unstable();
    assert_eq!(
        starts,
        (3..103).collect::<Vec<_>>(),
        "deferred appends take consecutive offsets, none twice"
    );
    assert_eq!(store.next_offset(), 103);
    // Nothing was appended there: nothing to wait for.
    store
        .wait_appended(10_000)
        .expect("wait_appended past the end");
    store.sync().expect("sync");
    let store = fixture.reopen(store);
    let records = read_all(&store, 0);
    assert_eq!(records.len(), 103, "deferred records survive a reopen");
    assert_numbered(&records[..3], 0..3);
    assert!(
        records[3..]
            .iter()
            .all(|r| r.key.as_ref() == b"deferred" && r.payload.as_ref() == b"payload"),
        "deferred records come back as written"
    );
}

/// `offset_for_timestamp` is the lowest offset from the start whose own timestamp is at
/// or after the one asked for, with timestamps that do not grow with offsets; `None`
/// past every one; the same after retention (from the new start), compaction (its
/// gaps) and a reopen.
pub fn offset_for_timestamp_is_the_first_record_at_or_after_it<F: Fixture>(fixture: &mut F) {
    let store = fixture.create();
    assert_eq!(
        store.offset_for_timestamp(0).expect("lookup"),
        None,
        "empty"
    );
    // Runs of three records per step of 10 ms, each shifted by up to 25 ms either way.
    let stamp = |i: u64| 10_000 + (i / 3) * 10 + (i * 7_919) % 51 - 25;
    let keys: Vec<Vec<u8>> = (0..300).map(key).collect();
    for chunk in (0..300).collect::<Vec<u64>>().chunks(30) {
        let batch: Vec<Entry<'_>> = chunk
            .iter()
            .map(|&i| Entry::with_timestamp(stamp(i), &keys[i as usize], b"t"))
            .collect();
        store.append(&batch).expect("append");
    }
    let check = |store: &F::Store, what: &str| {
        let held: Vec<(Offset, u64)> = read_all(store, store.start_offset())
            .iter()
            .map(|r| (r.offset, r.timestamp))
            .collect();
        let mut probes: Vec<u64> = held.iter().flat_map(|&(_, t)| [t - 1, t, t + 1]).collect();
        probes.extend([0, u64::MAX]);
        for at in probes {
            let expected = held.iter().find(|&&(_, t)| t >= at).map(|&(o, _)| o);
            assert_eq!(
                store.offset_for_timestamp(at).expect("lookup"),
                expected,
                "{what}: timestamp {at}"
            );
        }
    };
    check(&store, "appended");
    store.truncate_before(100).expect("truncate");
    check(&store, "after retention");
    store.compact().expect("compact");
    check(&store, "after compaction");
    store.sync().expect("sync");
    let store = fixture.reopen(store);
    check(&store, "after a reopen");
}

/// `compact_with` against a model: only records before `before` are compacted (and only
/// they count as later records of their keys); with tombstones, a key whose latest
/// record has an empty payload loses the records before it, and that record too once
/// it is stamped before the expiry; records with an empty key stay. The same records
/// after a reopen; a second compaction with the same options drops nothing.
pub fn compact_with_keeps_what_its_options_say<F: Fixture>(fixture: &mut F) {
    // Keys key-0..key-4 and the empty key; every fourth payload empty; record i stamped
    // 1_000 + i.
    let key_of = |i: u64| match i % 6 {
        5 => Vec::new(),
        k => format!("key-{k}").into_bytes(),
    };
    let payload_of = |i: u64| match i % 4 {
        3 => Vec::new(),
        _ => format!("value-{i}").into_bytes(),
    };
    let cases: [(Option<Offset>, Option<u64>, Offset); 6] = [
        (None, None, 0),
        (Some(40), None, 0),
        (None, Some(1_056), 0),
        (Some(45), Some(1_100), 10),
        (Some(1_000), Some(u64::MAX), 0),
        (Some(0), Some(u64::MAX), 0),
    ];
    for (before, tombstones, start) in cases {
        let what = format!("before {before:?}, tombstones {tombstones:?}, start {start}");
        let store = fixture.create();
        let (keys, payloads): (Vec<_>, Vec<_>) =
            (0..60).map(|i| (key_of(i), payload_of(i))).unzip();
        let batch: Vec<Entry<'_>> = (0..60u64)
            .map(|i| Entry::with_timestamp(1_000 + i, &keys[i as usize], &payloads[i as usize]))
            .collect();
        store.append(&batch[..35]).expect("append");
        store.append(&batch[35..]).expect("append");
        store.truncate_before(start).expect("truncate");
        let mut options = CompactOptions::new();
        if let Some(b) = before {
            options = options.before(b);
        }
        if let Some(t) = tombstones {
            options = options.tombstones(t);
        }
        // The model.
        let limit = before.map_or(60, |b| b.min(60));
        let mut latest: std::collections::HashMap<Vec<u8>, Offset> = Default::default();
        for i in start..limit {
            if !key_of(i).is_empty() {
                latest.insert(key_of(i), i);
            }
        }
        let expected: Vec<Offset> = (start..60)
            .filter(|&i| {
                i >= limit
                    || key_of(i).is_empty()
                    || (latest.get(&key_of(i)) == Some(&i)
                        && !(payload_of(i).is_empty() && tombstones.is_some_and(|t| 1_000 + i < t)))
            })
            .collect();
        let done = if options == CompactOptions::new() {
            store.compact()
        } else {
            store.compact_with(options)
        }
        .expect("compact");
        let kept_before_limit = expected.iter().filter(|&&o| o < limit).count() as u64;
        assert_eq!(
            (done.until, done.kept, done.dropped),
            (limit, kept_before_limit, 60 - start - expected.len() as u64),
            "{what}: what compaction reports"
        );
        let check = |store: &F::Store, when: &str| {
            let records = read_all(store, store.start_offset());
            let offsets: Vec<Offset> = records.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, expected, "{what}: records kept, {when}");
            for r in &records {
                assert_eq!(
                    (r.key.to_vec(), r.payload.to_vec(), r.timestamp),
                    (key_of(r.offset), payload_of(r.offset), 1_000 + r.offset),
                    "{what}: record {}, {when}",
                    r.offset
                );
            }
        };
        check(&store, "after compaction");
        let again = store.compact_with(options).expect("compact again");
        assert_eq!(again.dropped, 0, "{what}: a second compaction");
        check(&store, "after a second compaction");
        store.sync().expect("sync");
        let store = fixture.reopen(store);
        check(&store, "after a reopen");
        assert_eq!(store.next_offset(), 60, "{what}: offsets go on");
    }
}
