//! The conformance suite for [`Stream`] implementations.
//!
//! Every rule of the [`Publish`], [`Subscribe`] and [`Stream`] contracts has a check
//! here, and every stream in the crate runs them all. A [`Fixture`] says how the stream
//! under test delivers (a shared queue, to every subscriber, or stored), and the checks
//! that depend on it check that behaviour. An implementation outside the crate runs them
//! from its own tests:
//!
//! ```
//! use cauce::stream::conformance::{self, Delivery, Fixture};
//! use cauce::stream::MemoryStream;
//!
//! struct FanOut;
//! impl Fixture for FanOut {
//!     type Stream = MemoryStream;
//!     fn create(&mut self) -> MemoryStream { MemoryStream::fan_out(4).unwrap() }
//!     fn delivery(&self) -> Delivery { Delivery::EverySubscriber }
//!     fn capacity(&self) -> Option<usize> { Some(4) }
//!     fn reopen(&mut self, stream: MemoryStream) -> MemoryStream { stream }
//! }
//! conformance::run_all(&mut FanOut);
//! ```
//!
//! The checks panic with a message naming the broken rule, as test assertions do. A
//! check that would otherwise hang waits at most [`PATIENCE`] and then fails.

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use super::{Position, Publish, Stream, Subscribe};
use crate::error::Error;
use crate::record::{Entry, Offset, Record};

/// The longest a check waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How the stream under test hands out its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Each record goes to exactly one subscriber (a shared queue); not stored.
    Shared,
    /// Every subscriber gets every record published after it subscribed; not stored.
    EverySubscriber,
    /// Stored: every subscriber gets every record from the position it starts at, and
    /// stored positions and cursors work.
    Stored,
}

/// Makes streams for the suite.
pub trait Fixture {
    /// The stream under test.
    type Stream: Stream;

    /// A new stream with nothing published.
    fn create(&mut self) -> Self::Stream;

    /// How the stream delivers.
    fn delivery(&self) -> Delivery;

    /// How many records a subscriber that does not read lets the stream hold before it
    /// is full (`None`: never full). At least 4.
    fn capacity(&self) -> Option<usize>;

    /// Stored streams: drops `stream` and opens the same storage again, as a restarted
    /// process would. Others return `stream`.
    fn reopen(&mut self, stream: Self::Stream) -> Self::Stream;
}

/// Runs every check of the suite.
pub fn run_all<F: Fixture>(fixture: &mut F) {
    records_arrive_in_order_with_their_bytes(fixture);
    publish_batch_gives_consecutive_offsets(fixture);
    empty_stream_times_out_and_try_recv_is_none(fixture);
    waiting_subscriber_wakes_on_publish(fixture);
    dropping_every_publisher_closes_after_the_rest_is_received(fixture);
    close_ends_the_stream_for_every_half(fixture);
    close_wakes_a_waiting_subscriber(fixture);
    concurrent_publishers_keep_their_order(fixture);
    full_stream_pushes_back(fixture);
    positions_and_cursors(fixture);
    replay_hands_over_to_tail_under_concurrent_publishing(fixture);
}

/// The entry numbered `i`: its key, payload and timestamp all derive from `i`.
fn numbered(i: u64) -> (Vec<u8>, Vec<u8>, u64) {
    let key = format!("key-{}", i % 7).into_bytes();
    let mut payload = i.to_le_bytes().to_vec();
    payload.extend((0..(i % 13) * 7).map(|j| (i * 31 + j) as u8));
    (key, payload, 1_000 + i)
}

fn publish_numbered<P: Publish>(publisher: &P, i: u64) -> Offset {
    let (key, payload, timestamp) = numbered(i);
    publisher
        .publish(Entry::with_timestamp(timestamp, &key, &payload))
        .expect("publish")
}

/// The number of a record made by `numbered`, checking its bytes.
fn number_of(record: &Record) -> u64 {
    let mut head = [0; 8];
    head.copy_from_slice(&record.payload[..8]);
    let i = u64::from_le_bytes(head);
    let (key, payload, timestamp) = numbered(i);
    assert_eq!(record.key, key, "key of record {i}");
    assert_eq!(record.payload, payload, "payload of record {i}");
    assert_eq!(record.timestamp, timestamp, "timestamp of record {i}");
    i
}

fn recv<S: Subscribe>(subscriber: &mut S, what: &str) -> Record {
    match subscriber.recv_timeout(PATIENCE) {
        Ok(record) => record,
        Err(e) => panic!("{what}: expected a record, got {e}"),
    }
}

fn expect_closed<S: Subscribe>(subscriber: &mut S, what: &str) {
    match subscriber.recv_timeout(PATIENCE) {
        Err(Error::Closed) => {}
        other => panic!("{what}: expected Closed, got {other:?}"),
    }
}

/// Publishes `count` numbered records from a thread of its own (so a bounded stream can
/// be read meanwhile); returns the offsets `publish` gave.
fn publish_in_background<P: Publish>(
    publisher: P,
    numbers: std::ops::Range<u64>,
) -> thread::JoinHandle<Vec<Offset>> {
    thread::spawn(move || numbers.map(|i| publish_numbered(&publisher, i)).collect())
}

/// Records come out in offset order, byte for byte, with the offsets publish returned.
pub fn records_arrive_in_order_with_their_bytes<F: Fixture>(fixture: &mut F) {
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let publishing = publish_in_background(stream.publisher(), 0..200);
    let mut offsets = Vec::new();
    for expected in 0..200 {
        let record = recv(&mut subscriber, "in order");
        assert_eq!(
            number_of(&record),
            expected,
            "records must keep their order"
        );
        offsets.push(record.offset);
    }
    let published = publishing.join().expect("publisher thread");
    assert_eq!(
        offsets, published,
        "a record has the offset publish returned"
    );
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "one publisher's records get consecutive offsets"
    );
}

/// A batch gets consecutive offsets, in order.
pub fn publish_batch_gives_consecutive_offsets<F: Fixture>(fixture: &mut F) {
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    publish_numbered(&publisher, 0);
    let numbered: Vec<_> = (1..4).map(numbered).collect();
    let batch: Vec<_> = numbered
        .iter()
        .map(|(k, p, t)| Entry::with_timestamp(*t, k, p))
        .collect();
    let range = publisher.publish_batch(&batch).expect("publish_batch");
    let first = recv(&mut subscriber, "before the batch").offset;
    assert_eq!(range, first + 1..first + 4, "the batch's offsets follow");
    for i in 1..4 {
        let record = recv(&mut subscriber, "batch");
        assert_eq!((number_of(&record), record.offset), (i, first + i));
    }
    let empty = publisher.publish_batch(&[]).expect("empty batch");
    assert_eq!(
        empty,
        first + 4..first + 4,
        "an empty batch is the empty range at the next offset"
    );
    empty_batch_is_an_empty_range_at_the_next_offset(&publisher);
    let record = recv(&mut subscriber, "published after the empty batches");
    assert_eq!(
        (number_of(&record), record.offset),
        (0, first + 4),
        "the empty batches published nothing"
    );
}

/// An empty batch publishes nothing and returns `next..next`, where `next` is the offset
/// the next record published gets. Publishes one record (numbered 0) to find out, so
/// the stream needs room for one, and nobody else may publish into it meanwhile.
///
/// [`run_all`] runs this on the publishers of the stream under test; run it on any
/// other publisher (a wrapper, a combinator) to hold it to the same rule.
pub fn empty_batch_is_an_empty_range_at_the_next_offset<P: Publish>(publisher: &P) {
    let empty = publisher.publish_batch(&[]).expect("empty batch");
    assert!(empty.is_empty(), "an empty batch publishes nothing");
    assert_eq!(
        publisher.publish_batch(&[]).expect("empty batch"),
        empty,
        "an empty batch does not move the next offset"
    );
    let next = publish_numbered(publisher, 0);
    assert_eq!(
        empty,
        next..next,
        "an empty batch is the empty range at the offset the next record gets"
    );
    assert_eq!(
        publisher.publish_batch(&[]).expect("empty batch"),
        next + 1..next + 1,
        "an empty batch follows the last record published"
    );
}

/// `recv_timeout` gives up after its timeout; `try_recv` says "nothing now".
pub fn empty_stream_times_out_and_try_recv_is_none<F: Fixture>(fixture: &mut F) {
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let _publisher = stream.publisher();
    assert!(
        matches!(subscriber.try_recv(), Ok(None)),
        "try_recv: nothing"
    );
    let started = Instant::now();
    let timeout = Duration::from_millis(30);
    match subscriber.recv_timeout(timeout) {
        Err(Error::Timeout(t)) => assert_eq!(t, timeout, "Timeout names the timeout"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(started.elapsed() >= timeout, "the timeout is honoured");
}

/// A subscriber blocked in `recv` gets a record published later.
pub fn waiting_subscriber_wakes_on_publish<F: Fixture>(fixture: &mut F) {
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let waiting = thread::spawn(move || subscriber.recv().map(|r| number_of(&r)));
    thread::sleep(Duration::from_millis(20));
    publish_numbered(&stream.publisher(), 42);
    assert_eq!(waiting.join().expect("waiting thread").expect("recv"), 42);
}

/// When every publisher and the stream value are gone, subscribers receive what was
/// published, then `Closed` on every call.
pub fn dropping_every_publisher_closes_after_the_rest_is_received<F: Fixture>(fixture: &mut F) {
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let (first, second) = (stream.publisher(), stream.publisher());
    publish_numbered(&first, 0);
    publish_numbered(&second, 1);
    drop(first);
    publish_numbered(&second, 2);
    drop(stream);
    assert_eq!(number_of(&recv(&mut subscriber, "open")), 0);
    drop(second);
    for i in 1..3 {
        let record = recv(&mut subscriber, "published before closing");
        assert_eq!(number_of(&record), i);
    }
    expect_closed(&mut subscriber, "after the last record");
    expect_closed(&mut subscriber, "closed stays closed");
    assert!(matches!(subscriber.try_recv(), Err(Error::Closed)));
    assert!(matches!(subscriber.recv(), Err(Error::Closed)));
}

/// `close` from any publisher: publishing is `Closed`, subscribers drain and end.
pub fn close_ends_the_stream_for_every_half<F: Fixture>(fixture: &mut F) {
    let delivery = fixture.delivery();
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let (first, second) = (stream.publisher(), stream.publisher());
    publish_numbered(&first, 0);
    publish_numbered(&first, 1);
    second.close();
    second.close();
    let (key, payload, timestamp) = numbered(2);
    let entry = Entry::with_timestamp(timestamp, &key, &payload);
    assert!(matches!(first.publish(entry), Err(Error::Closed)));
    assert!(matches!(first.try_publish(entry), Err(Error::Closed)));
    assert!(matches!(first.publish_batch(&[entry]), Err(Error::Closed)));
    assert!(
        matches!(first.publish_batch(&[]), Err(Error::Closed)),
        "an empty batch into a closed stream is Closed too"
    );
    assert!(matches!(
        stream.publisher().publish(entry),
        Err(Error::Closed)
    ));
    for i in 0..2 {
        assert_eq!(number_of(&recv(&mut subscriber, "before close")), i);
    }
    expect_closed(&mut subscriber, "after close");
    let mut late = stream
        .subscribe(Position::End)
        .expect("subscribe after close");
    expect_closed(&mut late, "subscribed at the end after close");
    if delivery == Delivery::Stored {
        let mut replay = stream
            .subscribe(Position::Beginning)
            .expect("replay after close");
        for i in 0..2 {
            assert_eq!(number_of(&recv(&mut replay, "stored before close")), i);
        }
        expect_closed(&mut replay, "replay after close");
    }
}

/// `close` wakes a subscriber blocked in `recv`.
pub fn close_wakes_a_waiting_subscriber<F: Fixture>(fixture: &mut F) {
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let waiting = thread::spawn(move || {
        let started = Instant::now();
        (subscriber.recv().err(), started.elapsed())
    });
    thread::sleep(Duration::from_millis(20));
    stream.publisher().close();
    let (error, waited) = waiting.join().expect("waiting thread");
    assert!(matches!(error, Some(Error::Closed)), "got {error:?}");
    assert!(waited < PATIENCE, "close must wake the subscriber");
}

/// Several publishers at once: every record is delivered once per subscriber (once in
/// all for a shared queue), offsets increase, and each publisher's records keep their
/// order.
pub fn concurrent_publishers_keep_their_order<F: Fixture>(fixture: &mut F) {
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 500;
    let delivery = fixture.delivery();
    let stream = fixture.create();
    let subscribers: Vec<_> = (0..2)
        .map(|_| stream.subscribe(Position::End).expect("subscribe"))
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| publish_in_background(stream.publisher(), p * EACH..(p + 1) * EACH))
        .collect();
    drop(stream);
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut subscriber| {
            thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    match subscriber.recv_timeout(PATIENCE) {
                        Ok(record) => got.push((record.offset, number_of(&record))),
                        Err(Error::Closed) => return got,
                        Err(e) => panic!("reading from concurrent publishers: {e}"),
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher thread");
    }
    let mut all = Vec::new();
    for reader in readers {
        let got = reader.join().expect("reader thread");
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "offsets increase for each subscriber"
        );
        let mut last: HashMap<u64, u64> = HashMap::new();
        for &(_, number) in &got {
            let publisher = number / EACH;
            if let Some(&before) = last.get(&publisher) {
                assert!(before < number, "publisher {publisher}'s order is kept");
            }
            last.insert(publisher, number);
        }
        if delivery == Delivery::Shared {
            all.extend(got.into_iter().map(|(_, n)| n));
        } else {
            let numbers: Vec<_> = got.iter().map(|&(_, n)| n).collect();
            let mut sorted = numbers.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..PUBLISHERS * EACH).collect::<Vec<_>>(),
                "every subscriber gets every record once"
            );
        }
    }
    if delivery == Delivery::Shared {
        all.sort_unstable();
        assert_eq!(
            all,
            (0..PUBLISHERS * EACH).collect::<Vec<_>>(),
            "a shared queue delivers each record to exactly one subscriber"
        );
    }
}

/// A full stream makes `try_publish` refuse with `Full` (publishing nothing) and
/// `publish` wait until the subscriber reads; a stream that is never full takes all.
pub fn full_stream_pushes_back<F: Fixture>(fixture: &mut F) {
    let capacity = fixture.capacity();
    let stream = fixture.create();
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    let Some(capacity) = capacity else {
        for i in 0..1_000 {
            let (key, payload, timestamp) = numbered(i);
            publisher
                .try_publish(Entry::with_timestamp(timestamp, &key, &payload))
                .expect("a stream that is never full takes every try_publish");
        }
        assert_eq!(number_of(&recv(&mut subscriber, "first")), 0);
        return;
    };
    let try_numbered = |i| {
        let (key, payload, timestamp) = numbered(i);
        publisher.try_publish(Entry::with_timestamp(timestamp, &key, &payload))
    };
    for i in 0..capacity as u64 {
        try_numbered(i).expect("room for `capacity` records");
    }
    assert!(
        matches!(try_numbered(capacity as u64), Err(Error::Full)),
        "try_publish into a full stream is Full"
    );
    let blocked = publish_in_background(stream.publisher(), 1_000..1_001);
    thread::sleep(Duration::from_millis(30));
    assert!(
        !blocked.is_finished(),
        "publish waits while the stream is full"
    );
    assert_eq!(number_of(&recv(&mut subscriber, "first")), 0);
    blocked
        .join()
        .expect("the publish completes once there is room");
    for i in 1..capacity as u64 {
        assert_eq!(number_of(&recv(&mut subscriber, "queued")), i);
    }
    assert_eq!(
        number_of(&recv(&mut subscriber, "after the wait")),
        1_000,
        "the refused record was not published, the waiting one was"
    );
}

/// Stored streams start at any position and resume from committed cursors, also after a
/// reopen; others refuse stored positions with `NotStored` and cannot commit.
pub fn positions_and_cursors<F: Fixture>(fixture: &mut F) {
    let stream = fixture.create();
    if fixture.delivery() != Delivery::Stored {
        for from in [
            Position::Beginning,
            Position::Offset(0),
            Position::Timestamp(0),
            Position::Cursor("reader".into()),
        ] {
            assert!(
                matches!(stream.subscribe(from.clone()), Err(Error::NotStored)),
                "{from:?} on a notified stream is NotStored"
            );
        }
        let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
        assert!(matches!(subscriber.commit(), Err(Error::CannotCommit(_))));
        return;
    }
    let publisher = stream.publisher();
    for i in 0..10 {
        assert_eq!(publish_numbered(&publisher, i), i, "offsets start at 0");
    }
    let first_of = |from: Position| {
        let mut subscriber = stream.subscribe(from.clone()).expect("subscribe");
        number_of(&recv(&mut subscriber, &format!("{from:?}")))
    };
    assert_eq!(first_of(Position::Beginning), 0);
    assert_eq!(first_of(Position::Offset(7)), 7);
    // Record i is stamped 1_000 + i.
    assert_eq!(first_of(Position::Timestamp(1_007)), 7);
    assert_eq!(first_of(Position::Timestamp(0)), 0);
    let mut at_end = stream.subscribe(Position::End).expect("subscribe");
    assert!(
        matches!(at_end.try_recv(), Ok(None)),
        "End starts after the last"
    );
    let mut after_last = stream
        .subscribe(Position::Timestamp(1_010))
        .expect("subscribe");
    assert!(
        matches!(after_last.try_recv(), Ok(None)),
        "a time after every record starts at the end"
    );
    assert!(matches!(
        stream.subscribe(Position::Offset(11)),
        Err(Error::OffsetOutOfRange { requested: 11, .. })
    ));
    assert!(matches!(
        stream.subscribe(Position::Cursor("no/slash".into())),
        Err(Error::InvalidName { .. })
    ));
    let mut plain = stream.subscribe(Position::Offset(0)).expect("subscribe");
    recv(&mut plain, "plain");
    assert!(
        matches!(plain.commit(), Err(Error::CannotCommit(_))),
        "only cursor subscriptions commit"
    );

    let mut cursor = stream
        .subscribe(Position::Cursor("mailer".into()))
        .expect("subscribe");
    for i in 0..3 {
        assert_eq!(
            number_of(&recv(&mut cursor, "new cursor")),
            i,
            "from the start"
        );
    }
    cursor.commit().expect("commit");
    recv(&mut cursor, "read past the commit");
    drop(cursor);
    let resumed = |stream: &F::Stream| {
        let mut cursor = stream
            .subscribe(Position::Cursor("mailer".into()))
            .expect("subscribe");
        number_of(&recv(&mut cursor, "resumed"))
    };
    assert_eq!(resumed(&stream), 3, "a cursor resumes after its commit");
    drop((publisher, plain, at_end, after_last));
    let stream = fixture.reopen(stream);
    assert_eq!(resumed(&stream), 3, "a cursor resumes after a reopen");
    assert_eq!(
        publish_numbered(&stream.publisher(), 10),
        10,
        "offsets go on after a reopen"
    );
}

/// Stored streams: subscribers that start at different positions while many threads
/// publish see every record from their start once, in order, across the hand-over from
/// replay to tail.
pub fn replay_hands_over_to_tail_under_concurrent_publishing<F: Fixture>(fixture: &mut F) {
    if fixture.delivery() != Delivery::Stored {
        return;
    }
    const STORED: u64 = 300;
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 600;
    const TOTAL: u64 = STORED + PUBLISHERS * EACH;
    let stream = fixture.create();
    let publisher = stream.publisher();
    let stored: Vec<_> = (0..STORED).map(numbered).collect();
    let batch: Vec<_> = stored
        .iter()
        .map(|(k, p, t)| Entry::with_timestamp(*t, k, p))
        .collect();
    publisher.publish_batch(&batch).expect("publish_batch");
    let publishing: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let publisher = stream.publisher();
            thread::spawn(move || {
                for i in STORED + p * EACH..STORED + (p + 1) * EACH {
                    publish_numbered(&publisher, i);
                    if i % 64 == 0 {
                        thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let starts = [
        Position::Beginning,
        Position::Offset(STORED / 2),
        Position::Offset(STORED),
        Position::Cursor("late-joiner".into()),
        Position::End,
    ];
    let mut readers = Vec::new();
    for from in starts {
        // Stagger the starts so that some begin deep in replay and some at the tail.
        thread::sleep(Duration::from_millis(2));
        let mut subscriber = stream.subscribe(from.clone()).expect("subscribe");
        readers.push(thread::spawn(move || {
            let mut got = Vec::new();
            loop {
                match subscriber.recv_timeout(PATIENCE) {
                    Ok(record) => got.push((record.offset, number_of(&record))),
                    Err(Error::Closed) => return (from, got),
                    Err(e) => panic!("subscriber from {from:?}: {e}"),
                }
            }
        }));
    }
    for p in publishing {
        p.join().expect("publisher thread");
    }
    drop((publisher, stream));
    for reader in readers {
        let (from, got) = reader.join().expect("reader thread");
        let first = got.first().map_or(TOTAL, |r| r.0);
        let expected_first = match from {
            Position::Beginning | Position::Cursor(_) => Some(0),
            Position::Offset(o) => Some(o),
            _ => None,
        };
        if let Some(expected) = expected_first {
            assert_eq!(first, expected, "{from:?} starts where asked");
        }
        let offsets: Vec<_> = got.iter().map(|r| r.0).collect();
        assert_eq!(
            offsets,
            (first..TOTAL).collect::<Vec<_>>(),
            "{from:?}: every record from the start, once, in order, up to the end"
        );
        let mut last: HashMap<u64, u64> = HashMap::new();
        for &(_, number) in got.iter().filter(|r| r.1 >= STORED) {
            let p = (number - STORED) / EACH;
            if let Some(&before) = last.get(&p) {
                assert_eq!(number, before + 1, "{from:?}: publisher {p} without gap");
            }
            last.insert(p, number);
        }
    }
}
