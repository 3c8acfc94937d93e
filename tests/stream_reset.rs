//! `OffsetReset` (Kafka's `auto.offset.reset`) for `LogStream` subscriptions whose
//! position retention dropped: at subscribe (from a cursor or an offset) and in a
//! running subscriber that retention overtakes (through `recv`, `try_recv` and
//! `poll_recv`), with each policy, over a `MemoryStore` and an on-disk `LogStore`.
//! `Fail` is the default and behaves as before; `skipped` counts exactly the offsets
//! the resets jumped over; a commit after a reset saves where it went.

#[path = "support/forward.rs"]
mod forward;
#[path = "support/retention_first.rs"]
mod retention_first;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::stream::{LogStream, LogSubscriber, OffsetReset, Position, Publish, Stream, Subscribe};
use cauce::{Entry, Error, Offset};
use retention_first::RetentionFirst;

/// How many records every test's store holds before retention.
const HELD: Offset = 20;
/// Where retention moves the start.
const START: Offset = 10;
/// Where a committed cursor, an offset asked for, or an overtaken subscriber stands:
/// before `START`.
const BEHIND: Offset = 3;

fn log_store(dir: &tempfile::TempDir) -> LogStore {
    // Small segments: retention deletes the files the readers were reading.
    let options = LogOptions::new()
        .sync(SyncPolicy::Never)
        .segment_bytes(256)
        .preallocate(false);
    LogStore::open(dir.path(), options).expect("open")
}

/// Each test runs against a `MemoryStore` and against a `LogStore` in a temporary
/// directory: `name::memory_store` and `name::log_store`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn memory_store() {
                super::$name(cauce::store::MemoryStore::new());
            }
            #[test]
            fn log_store() {
                let dir = tempfile::tempdir().expect("temporary directory");
                super::$name(super::log_store(&dir));
            }
        }
    )*};
}

on_both_stores!(
    subscribing_behind_the_start_fails_by_default,
    earliest_subscription_behind_the_start_goes_on_from_the_start,
    latest_subscription_behind_the_start_goes_on_from_the_end,
    an_offset_past_the_end_is_reset_by_the_policy_too,
    an_overtaken_subscriber_fails_by_default_on_every_call,
    an_overtaken_earliest_subscriber_goes_on_from_the_start_in_the_same_call,
    an_overtaken_latest_subscriber_goes_on_from_the_end,
    an_overtaken_subscriber_resets_through_poll_recv,
    a_commit_after_a_reset_saves_where_it_went,
    skipped_counts_exactly_the_offsets_jumped_over,
    a_reset_that_races_retention_goes_on_from_the_newest_start,
    a_cursor_never_committed_starts_where_the_policy_says,
    seek_moves_a_subscriber_and_an_error_leaves_it_where_it_was,
);

/// A stream over `store` holding offsets `0..HELD`, the cursor "mailer" committed at
/// `BEHIND`.
fn stream_of<S: Store>(store: S) -> LogStream<S> {
    let entries: Vec<_> = (0..HELD).map(|_| Entry::new(b"k", b"v")).collect();
    assert_eq!(store.append(&entries).expect("append"), 0..HELD);
    store
        .commit_cursor("mailer", BEHIND)
        .expect("commit_cursor");
    LogStream::new(store)
}

fn mailer() -> Position {
    Position::Cursor("mailer".into())
}

/// A subscriber for each policy of `resets`, from `Beginning`, each having received
/// offsets `0..BEHIND`; then retention dropped everything before `START`.
fn overtaken<S: Store, const N: usize>(
    stream: &LogStream<S>,
    resets: [OffsetReset; N],
) -> [LogSubscriber<S>; N] {
    let subscribers = resets.map(|reset| {
        let mut subscriber = stream
            .subscribe_with(Position::Beginning, reset)
            .expect("subscribe");
        for i in 0..BEHIND {
            assert_eq!(subscriber.recv().expect("recv").offset, i);
        }
        subscriber
    });
    stream.store().truncate_before(START).expect("retention");
    subscribers
}

/// `result` is `OffsetOutOfRange` for `requested`, the start being `START`.
fn assert_out_of_range<T: std::fmt::Debug>(result: cauce::Result<T>, requested: Offset) {
    assert_out_of_range_from(result, requested, START);
}

fn assert_out_of_range_from<T: std::fmt::Debug>(
    result: cauce::Result<T>,
    requested: Offset,
    start: Offset,
) {
    assert!(
        matches!(
            result,
            Err(Error::OffsetOutOfRange { requested: r, start: s, .. }) if (r, s) == (requested, start)
        ),
        "expected OffsetOutOfRange {{ requested: {requested}, start: {start} }}, got {result:?}"
    );
}

fn subscribing_behind_the_start_fails_by_default<S: Store>(store: S) {
    let stream = stream_of(store);
    stream.store().truncate_before(START).expect("retention");
    assert_out_of_range(stream.subscribe(mailer()), BEHIND);
    assert_out_of_range(stream.subscribe(Position::Offset(BEHIND)), BEHIND);
    assert_out_of_range(stream.subscribe_with(mailer(), OffsetReset::Fail), BEHIND);
    assert_out_of_range(
        stream.subscribe_with(Position::Offset(BEHIND), OffsetReset::default()),
        BEHIND,
    );
    assert_eq!(
        stream.store().cursor("mailer").expect("cursor"),
        Some(BEHIND),
        "a failed subscribe moves no cursor"
    );
}

fn earliest_subscription_behind_the_start_goes_on_from_the_start<S: Store>(store: S) {
    let stream = stream_of(store);
    stream.store().truncate_before(START).expect("retention");
    for from in [mailer(), Position::Offset(BEHIND)] {
        let mut subscriber = stream
            .subscribe_with(from.clone(), OffsetReset::Earliest)
            .unwrap_or_else(|e| panic!("subscribe from {from:?}: {e}"));
        assert_eq!(subscriber.reset_policy(), OffsetReset::Earliest);
        assert_eq!(subscriber.position(), START);
        assert_eq!(subscriber.skipped(), START - BEHIND);
        let offsets: Vec<_> = (START..HELD)
            .map(|_| subscriber.recv().expect("recv").offset)
            .collect();
        assert_eq!(offsets, (START..HELD).collect::<Vec<_>>(), "from {from:?}");
        assert!(subscriber.try_recv().expect("try_recv").is_none());
    }
    let subscriber = stream
        .subscribe_with(mailer(), OffsetReset::Earliest)
        .expect("subscribe");
    assert_eq!(
        subscriber.cursor(),
        Some("mailer"),
        "a reset keeps the cursor"
    );
}

fn latest_subscription_behind_the_start_goes_on_from_the_end<S: Store>(store: S) {
    let stream = stream_of(store);
    stream.store().truncate_before(START).expect("retention");
    for from in [mailer(), Position::Offset(BEHIND)] {
        let mut subscriber = stream
            .subscribe_with(from.clone(), OffsetReset::Latest)
            .unwrap_or_else(|e| panic!("subscribe from {from:?}: {e}"));
        let end = stream.store().next_offset();
        assert_eq!(subscriber.position(), end);
        assert_eq!(subscriber.skipped(), end - BEHIND);
        assert!(
            subscriber.try_recv().expect("try_recv").is_none(),
            "from {from:?}"
        );
        let published = stream
            .publisher()
            .publish(Entry::new(b"k", b"new"))
            .expect("publish");
        assert_eq!(subscriber.recv().expect("recv").offset, published);
    }
}

/// The choice documented on `OffsetReset`: an offset past the end is reset as Kafka
/// resets it, `Earliest` to the start and `Latest` to the end, and that jump back skips
/// nothing; `Fail` is the error it always was.
fn an_offset_past_the_end_is_reset_by_the_policy_too<S: Store>(store: S) {
    let stream = stream_of(store);
    stream.store().truncate_before(START).expect("retention");
    let past = HELD + 5;
    assert!(matches!(
        stream.subscribe(Position::Offset(past)),
        Err(Error::OffsetOutOfRange {
            requested,
            end: HELD,
            ..
        }) if requested == past
    ));
    let mut earliest = stream
        .subscribe_with(Position::Offset(past), OffsetReset::Earliest)
        .expect("subscribe, earliest");
    assert_eq!((earliest.position(), earliest.skipped()), (START, 0));
    assert_eq!(earliest.recv().expect("recv").offset, START);
    let mut latest = stream
        .subscribe_with(Position::Offset(past), OffsetReset::Latest)
        .expect("subscribe, latest");
    assert_eq!((latest.position(), latest.skipped()), (HELD, 0));
    assert!(latest.try_recv().expect("try_recv").is_none());
}

/// `Fail`, the default, is the behaviour from before resets: the error on every call,
/// the position where it was.
fn an_overtaken_subscriber_fails_by_default_on_every_call<S: Store>(store: S) {
    let stream = stream_of(store);
    let [mut subscriber] = overtaken(&stream, [OffsetReset::Fail]);
    assert_out_of_range(subscriber.recv(), BEHIND);
    assert_out_of_range(subscriber.try_recv(), BEHIND);
    assert_out_of_range(subscriber.recv_timeout(Duration::from_millis(10)), BEHIND);
    assert_out_of_range(subscriber.recv(), BEHIND);
    assert_eq!((subscriber.position(), subscriber.skipped()), (BEHIND, 0));
    let mut subscriber = stream
        .subscribe(Position::Offset(START))
        .expect("subscribe");
    assert_eq!(subscriber.reset_policy(), OffsetReset::Fail);
    stream
        .store()
        .truncate_before(START + 2)
        .expect("retention");
    assert_out_of_range_from(subscriber.recv(), START, START + 2);
}

fn an_overtaken_earliest_subscriber_goes_on_from_the_start_in_the_same_call<S: Store>(store: S) {
    let stream = stream_of(store);
    let [mut by_recv, mut by_try_recv] =
        overtaken(&stream, [OffsetReset::Earliest, OffsetReset::Earliest]);
    assert_eq!(by_recv.recv().expect("recv").offset, START);
    assert_eq!(by_recv.skipped(), START - BEHIND);
    let record = by_try_recv.try_recv().expect("try_recv");
    assert_eq!(record.map(|r| r.offset), Some(START));
    assert_eq!(by_try_recv.skipped(), START - BEHIND);
    // And on from there, in order, once.
    for subscriber in [&mut by_recv, &mut by_try_recv] {
        for i in START + 1..HELD {
            assert_eq!(subscriber.recv().expect("recv").offset, i);
        }
        assert!(subscriber.try_recv().expect("try_recv").is_none());
        assert_eq!(subscriber.skipped(), START - BEHIND);
    }
}

fn an_overtaken_latest_subscriber_goes_on_from_the_end<S: Store>(store: S) {
    let stream = stream_of(store);
    let [mut by_try_recv, mut by_recv] =
        overtaken(&stream, [OffsetReset::Latest, OffsetReset::Latest]);
    assert!(by_try_recv.try_recv().expect("try_recv").is_none());
    assert_eq!(
        (by_try_recv.position(), by_try_recv.skipped()),
        (HELD, HELD - BEHIND)
    );
    let published = stream
        .publisher()
        .publish(Entry::new(b"k", b"new"))
        .expect("publish");
    assert_eq!(
        by_try_recv.try_recv().expect("try_recv").map(|r| r.offset),
        Some(published)
    );

    // `recv` resets and then waits at the end: it gets the first record published after
    // the reset. A publisher keeps publishing until then, so a slow start of `recv`
    // cannot leave it waiting for nothing; what was published before the reset is
    // skipped, and counted.
    let reset_from = by_recv.position();
    let received = Arc::new(AtomicBool::new(false));
    let publisher = stream.publisher();
    let writer = thread::spawn({
        let received = received.clone();
        move || {
            let started = Instant::now();
            while !received.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
                thread::sleep(Duration::from_millis(50));
                publisher
                    .publish(Entry::new(b"k", b"new"))
                    .expect("publish");
            }
        }
    });
    let record = by_recv.recv().expect("recv");
    received.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    assert!(record.offset > HELD, "a record published after the reset");
    assert_eq!(by_recv.skipped(), record.offset - reset_from);
    assert_eq!(by_recv.position(), record.offset + 1);
}

/// Wakes nobody; counts nothing. Enough to poll by hand.
struct NoWake;

impl Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

fn an_overtaken_subscriber_resets_through_poll_recv<S: Store>(store: S) {
    let stream = stream_of(store);
    let waker = Waker::from(Arc::new(NoWake));
    let mut cx = Context::from_waker(&waker);

    let [mut earliest, mut latest, mut fail] = overtaken(
        &stream,
        [
            OffsetReset::Earliest,
            OffsetReset::Latest,
            OffsetReset::Fail,
        ],
    );
    match earliest.poll_recv(&mut cx) {
        Poll::Ready(Ok(record)) => assert_eq!(record.offset, START),
        other => panic!("expected record {START}, got {other:?}"),
    }
    assert_eq!(earliest.skipped(), START - BEHIND);

    assert!(
        latest.poll_recv(&mut cx).is_pending(),
        "nothing past the end yet"
    );
    assert_eq!((latest.position(), latest.skipped()), (HELD, HELD - BEHIND));
    let published = stream
        .publisher()
        .publish(Entry::new(b"k", b"new"))
        .expect("publish");
    match latest.poll_recv(&mut cx) {
        Poll::Ready(Ok(record)) => assert_eq!(record.offset, published),
        other => panic!("expected record {published}, got {other:?}"),
    }

    match fail.poll_recv(&mut cx) {
        Poll::Ready(result) => assert_out_of_range(result, BEHIND),
        Poll::Pending => panic!("an overtaken Fail subscriber is Pending, not the error"),
    }
}

fn a_commit_after_a_reset_saves_where_it_went<S: Store>(store: S) {
    let stream = stream_of(store);
    stream.store().truncate_before(START).expect("retention");

    // Reset at subscribe, committed before receiving anything: the reset position.
    let mut subscriber = stream
        .subscribe_with(mailer(), OffsetReset::Earliest)
        .expect("subscribe");
    subscriber.commit().expect("commit");
    drop(subscriber);
    assert_eq!(
        stream.store().cursor("mailer").expect("cursor"),
        Some(START)
    );
    let mut resumed = stream
        .subscribe(mailer())
        .expect("resubscribe, no reset needed");
    assert_eq!(resumed.recv().expect("recv").offset, START);
    drop(resumed);

    // Latest: the end.
    stream
        .store()
        .commit_cursor("mailer", BEHIND)
        .expect("rewind");
    let mut subscriber = stream
        .subscribe_with(mailer(), OffsetReset::Latest)
        .expect("subscribe");
    subscriber.commit().expect("commit");
    assert_eq!(stream.store().cursor("mailer").expect("cursor"), Some(HELD));
    assert_eq!(
        stream.subscribe(mailer()).expect("resubscribe").position(),
        HELD
    );

    // Reset in a running subscriber, then a record received: after it.
    stream
        .store()
        .commit_cursor("mailer", START)
        .expect("rewind");
    let mut subscriber = stream
        .subscribe_with(mailer(), OffsetReset::Earliest)
        .expect("subscribe");
    assert_eq!(subscriber.recv().expect("recv").offset, START);
    stream
        .store()
        .truncate_before(START + 5)
        .expect("retention");
    assert_eq!(subscriber.recv().expect("recv").offset, START + 5);
    subscriber.commit().expect("commit");
    assert_eq!(
        stream.store().cursor("mailer").expect("cursor"),
        Some(START + 6)
    );
    let mut resumed = stream.subscribe(mailer()).expect("resubscribe");
    assert_eq!(resumed.recv().expect("recv").offset, START + 6);
}

fn skipped_counts_exactly_the_offsets_jumped_over<S: Store>(store: S) {
    let stream = stream_of(store);
    let mut subscriber = stream
        .subscribe_with(mailer(), OffsetReset::Earliest)
        .expect("subscribe");
    assert_eq!(subscriber.skipped(), 0, "nothing lost, nothing counted");
    assert_eq!(
        subscriber.lag(),
        HELD - BEHIND,
        "behind the end by what it has to read"
    );
    stream
        .store()
        .truncate_before(BEHIND + 2)
        .expect("retention");
    assert_eq!(subscriber.recv().expect("recv").offset, BEHIND + 2);
    assert_eq!(subscriber.skipped(), 2, "offsets 3 and 4");
    assert_eq!(subscriber.lag(), HELD - (BEHIND + 3));
    // Retention up to exactly the position drops nothing this subscriber still needs.
    stream
        .store()
        .truncate_before(BEHIND + 3)
        .expect("retention");
    assert_eq!(subscriber.recv().expect("recv").offset, BEHIND + 3);
    assert_eq!(subscriber.skipped(), 2);
    // A second reset adds to the first.
    stream
        .store()
        .truncate_before(START + 4)
        .expect("retention");
    assert_eq!(subscriber.recv().expect("recv").offset, START + 4);
    assert_eq!(subscriber.skipped(), 2 + (START + 4) - (BEHIND + 4));
    // Resubscribing at the same cursor with the same loss counts it at subscribe.
    stream
        .store()
        .commit_cursor("mailer", BEHIND)
        .expect("rewind");
    let subscriber = stream
        .subscribe_with(mailer(), OffsetReset::Earliest)
        .expect("subscribe");
    assert_eq!(subscriber.skipped(), (START + 4) - BEHIND);
}

/// Retention that moves the start again while a reset opens its reader (between reading
/// the start and opening there) has the reset go on from the newest start, at subscribe
/// and in a running subscriber, and count every offset up to there.
fn a_reset_that_races_retention_goes_on_from_the_newest_start<S: Store>(store: S) {
    let stream = stream_of(RetentionFirst {
        store,
        // Each reader opened at one of these first drops the records before the next.
        retain_from: |from: Offset| match from {
            BEHIND => START,
            START => 15,
            16 => 18,
            18 => 19,
            _ => 0,
        },
    });
    let subscriber = stream
        .subscribe_with(Position::Offset(BEHIND), OffsetReset::Earliest)
        .expect("subscribe");
    assert_eq!(
        (subscriber.position(), subscriber.skipped()),
        (15, 15 - BEHIND)
    );

    let mut subscriber = stream
        .subscribe_with(Position::Offset(15), OffsetReset::Earliest)
        .expect("subscribe");
    assert_eq!(subscriber.recv().expect("recv").offset, 15);
    stream.store().truncate_before(17).expect("retention");
    assert_eq!(subscriber.recv().expect("recv").offset, 19);
    assert_eq!(subscriber.skipped(), 19 - 16);
}

#[test]
fn the_default_policy_is_fail() {
    assert_eq!(OffsetReset::default(), OffsetReset::Fail);
    let stream = LogStream::new(MemoryStore::new());
    let subscriber = stream.subscribe(Position::End).expect("subscribe");
    assert_eq!(subscriber.reset_policy(), OffsetReset::Fail);
    assert_eq!(subscriber.skipped(), 0);
}

/// As Kafka's `auto.offset.reset` for a group with no committed offset: `Latest` starts
/// a new cursor at the end, `Earliest` and `Fail` at the first record still stored;
/// none of them is a reset (nothing skipped). A commit then saves where it started.
fn a_cursor_never_committed_starts_where_the_policy_says<S: Store>(store: S) {
    let stream = stream_of(store);
    stream.store().truncate_before(START).expect("retention");
    for (reset, at) in [
        (OffsetReset::Fail, START),
        (OffsetReset::Earliest, START),
        (OffsetReset::Latest, HELD),
    ] {
        // A cursor of its own for each policy: each is new when first subscribed.
        let cursor = || Position::Cursor(format!("new-{reset:?}"));
        let mut subscriber = stream.subscribe_with(cursor(), reset).expect("subscribe");
        assert_eq!(
            (subscriber.position(), subscriber.skipped()),
            (at, 0),
            "{reset:?}"
        );
        let next = if at < HELD {
            assert_eq!(subscriber.recv().expect("recv").offset, at, "{reset:?}");
            at + 1
        } else {
            assert_eq!(subscriber.try_recv().expect("try_recv"), None, "{reset:?}");
            HELD
        };
        subscriber.commit().expect("commit");
        let resumed = stream.subscribe(cursor()).expect("resubscribe");
        assert_eq!(resumed.position(), next, "{reset:?}: the commit saved it");
    }
}

/// `seek` to each kind of position: the next record is the one there; a commit saves
/// where it moved; a seek the store cannot serve (under `Fail`) leaves the subscriber
/// where it was, reading on; under `Earliest` the same seek resets, counted in
/// `skipped`.
fn seek_moves_a_subscriber_and_an_error_leaves_it_where_it_was<S: Store>(store: S) {
    let stream = stream_of(store);
    let mut subscriber = stream.subscribe(mailer()).expect("subscribe");
    assert_eq!(subscriber.recv().expect("recv").offset, BEHIND);
    let next_is = |subscriber: &mut LogSubscriber<S>, offset: Offset, what: &str| {
        assert_eq!(subscriber.position(), offset, "{what}: position");
        assert_eq!(
            subscriber.recv().expect("recv").offset,
            offset,
            "{what}: next"
        );
    };
    subscriber.seek(Position::Offset(12)).expect("seek");
    next_is(&mut subscriber, 12, "an offset");
    subscriber.seek(Position::Beginning).expect("seek");
    next_is(&mut subscriber, 0, "the beginning, back");
    subscriber.seek(Position::End).expect("seek");
    assert_eq!(subscriber.position(), HELD, "the end");
    assert_eq!(subscriber.try_recv().expect("try_recv"), None);
    stream
        .store()
        .commit_cursor("other", 7)
        .expect("commit_cursor");
    subscriber
        .seek(Position::Cursor("other".into()))
        .expect("seek");
    next_is(&mut subscriber, 7, "another cursor's position");
    subscriber.commit().expect("commit");
    assert_eq!(
        stream.store().cursor("mailer").expect("cursor"),
        Some(8),
        "the subscriber's own cursor saves where it moved"
    );
    assert_eq!(stream.store().cursor("other").expect("cursor"), Some(7));
    stream.store().truncate_before(START).expect("retention");
    assert_out_of_range(subscriber.seek(Position::Offset(2)), 2);
    assert_eq!(subscriber.position(), 8, "where it was");
    // Its own reader, from before, was overtaken by the retention meanwhile.
    assert_out_of_range(subscriber.recv(), 8);
    subscriber.seek(Position::Offset(START)).expect("seek");
    next_is(&mut subscriber, START, "past the retention");
    let mut earliest = stream
        .subscribe_with(Position::End, OffsetReset::Earliest)
        .expect("subscribe");
    earliest
        .seek(Position::Offset(2))
        .expect("a seek that resets");
    assert_eq!(
        (earliest.position(), earliest.skipped()),
        (START, START - 2)
    );
}
