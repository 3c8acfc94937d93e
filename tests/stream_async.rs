//! `LogSubscriber::recv_async`: a follower awaited on a minimal executor gets every
//! record in order, is polled only when woken (no busy loop while the stream is quiet),
//! ends with `Closed`, and loses nothing when its future is dropped.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::stream::{LogStream, Position, Publish, Stream, Subscribe};
use cauce::{Entry, Error};

/// Unparks the executor's thread, counting its wakes.
struct Unpark {
    thread: thread::Thread,
    wakes: AtomicUsize,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// Runs `future` on this thread; returns its output and how many times it was polled.
/// Fails the test if it does not finish within 30 s.
fn block_on<F: Future>(future: F) -> (F::Output, usize) {
    let unpark = Arc::new(Unpark {
        thread: thread::current(),
        wakes: AtomicUsize::new(0),
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let started = Instant::now();
    let mut polls = 0;
    loop {
        polls += 1;
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return (out, polls);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the future was not woken in 30 s"
        );
        // Spurious unparks only cost a poll more; a lost wake is caught by the limit.
        thread::park_timeout(Duration::from_secs(5));
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!("record-{i}").into_bytes()
}

fn follows_in_order_without_busy_polling<S: Store + Clone>(store: S) {
    let stream = LogStream::new(store);
    let mut subscriber = stream.subscribe(Position::Beginning).expect("subscribe");
    let publisher = stream.publisher();
    let quiet = Duration::from_millis(300);
    let writer = thread::spawn(move || {
        for i in 0..2_000u64 {
            publisher
                .publish(Entry::new(b"k", &payload(i)))
                .expect("publish");
            if i == 999 {
                // A quiet spell: the follower waits for record 1000 without polling.
                thread::sleep(quiet);
            }
        }
        publisher.close();
    });
    let mut polls_for = Vec::new();
    for i in 0..2_000u64 {
        let (record, polls) = block_on(subscriber.recv_async());
        let record = record.expect("record");
        assert_eq!((record.offset, record.payload.to_vec()), (i, payload(i)));
        polls_for.push(polls);
    }
    // Record 1000 came after the quiet spell: the task was polled when it started
    // waiting and when woken, not in a loop (a busy poll makes thousands in 300 ms).
    assert!(
        polls_for[1000] <= 4,
        "polled {} times while the stream was quiet",
        polls_for[1000]
    );
    let (end, _) = block_on(subscriber.recv_async());
    assert!(matches!(end, Err(Error::Closed)), "{end:?}");
    let (again, _) = block_on(subscriber.recv_async());
    assert!(matches!(again, Err(Error::Closed)), "{again:?}");
    writer.join().expect("writer");
}

#[test]
fn an_async_follower_of_a_memory_store_gets_every_record_and_the_close() {
    follows_in_order_without_busy_polling(MemoryStore::new());
}

#[test]
fn an_async_follower_of_a_log_store_gets_every_record_and_the_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LogOptions::new()
        .sync(SyncPolicy::Never)
        .segment_bytes(16 << 10);
    let log = Arc::new(LogStore::open(dir.path(), options).expect("open"));
    follows_in_order_without_busy_polling(log);
}

#[test]
fn a_close_wakes_a_waiting_async_follower() {
    let stream = LogStream::new(MemoryStore::new());
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    let closer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        publisher.close();
    });
    let (end, _) = block_on(subscriber.recv_async());
    assert!(matches!(end, Err(Error::Closed)), "{end:?}");
    closer.join().expect("closer");
}

#[test]
fn a_dropped_future_loses_no_record() {
    let stream = LogStream::new(MemoryStore::new());
    let mut subscriber = stream.subscribe(Position::Beginning).expect("subscribe");
    let waker = Waker::from(Arc::new(Unpark {
        thread: thread::current(),
        wakes: AtomicUsize::new(0),
    }));
    let mut cx = Context::from_waker(&waker);
    {
        let mut pending = std::pin::pin!(subscriber.recv_async());
        assert!(pending.as_mut().poll(&mut cx).is_pending());
    }
    stream
        .publisher()
        .publish(Entry::new(b"k", b"first"))
        .expect("publish");
    let record = subscriber
        .recv_timeout(Duration::from_secs(30))
        .expect("recv");
    assert_eq!((record.offset, &record.payload[..]), (0, &b"first"[..]));
}

/// A compaction that drops the records at the tail (an expired tombstone and the value
/// before it) leaves the end past a follower's position with nothing to read: the
/// follower waits for the next record (a timeout ends a blocking wait, an async one
/// stays pending without waking itself), then gets it.
fn a_gap_at_the_tail_is_waited_over<S: Store + Clone>(store: S) {
    use cauce::store::CompactOptions;
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    publisher
        .publish(Entry::with_timestamp(1, b"k", b"v"))
        .expect("publish");
    publisher
        .publish(Entry::with_timestamp(2, b"k", b""))
        .expect("publish tombstone");
    let mut blocking = stream.subscribe(Position::Beginning).expect("subscribe");
    let mut waiting = stream.subscribe(Position::Beginning).expect("subscribe");
    let done = store
        .compact_with(CompactOptions::new().tombstones(1_000))
        .expect("compact");
    assert_eq!((done.kept, done.dropped), (0, 2));
    assert_eq!(store.next_offset(), 2);
    let started = Instant::now();
    let timed_out = blocking.recv_timeout(Duration::from_millis(200));
    assert!(matches!(timed_out, Err(Error::Timeout(_))), "{timed_out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the timeout was not kept"
    );
    let unpark = Arc::new(Unpark {
        thread: thread::current(),
        wakes: AtomicUsize::new(0),
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(waiting.poll_recv(&mut cx).is_pending());
    assert_eq!(unpark.wakes.load(Ordering::SeqCst), 0, "it woke itself");
    publisher
        .publish(Entry::new(b"j", b"next"))
        .expect("publish");
    assert!(
        unpark.wakes.load(Ordering::SeqCst) >= 1,
        "the publish did not wake it"
    );
    match waiting.poll_recv(&mut cx) {
        Poll::Ready(Ok(record)) => assert_eq!(record.offset, 2),
        other => panic!("{other:?}"),
    }
    let record = blocking
        .recv_timeout(Duration::from_secs(30))
        .expect("recv");
    assert_eq!(record.offset, 2);
}

#[test]
fn a_gap_at_the_tail_of_a_memory_store_is_waited_over() {
    a_gap_at_the_tail_is_waited_over(MemoryStore::new());
}

#[test]
fn a_gap_at_the_tail_of_a_log_store_is_waited_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(dir.path(), LogOptions::new().sync(SyncPolicy::Never)).expect("open");
    a_gap_at_the_tail_is_waited_over(Arc::new(log));
}

/// As a `futures_core::Stream` (feature `futures`): every record in order from a
/// publisher on another thread, then the end, and the end again.
#[cfg(feature = "futures")]
#[test]
fn a_log_subscriber_is_a_stream_that_ends_at_the_close() {
    use cauce::stream::LogSubscriber;
    use futures_core::Stream as _;

    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(dir.path(), LogOptions::new().sync(SyncPolicy::Never)).expect("open");
    let stream = LogStream::new(Arc::new(log));
    let mut subscriber = stream.subscribe(Position::Beginning).expect("subscribe");
    let publisher = stream.publisher();
    let writer = thread::spawn(move || {
        for i in 0..500u64 {
            publisher
                .publish(Entry::new(b"k", &payload(i)))
                .expect("publish");
            if i % 100 == 99 {
                thread::sleep(Duration::from_millis(5));
            }
        }
        publisher.close();
    });
    let next = |subscriber: &mut LogSubscriber<Arc<LogStore>>| {
        block_on(std::future::poll_fn(|cx| {
            std::pin::Pin::new(&mut *subscriber).poll_next(cx)
        }))
        .0
    };
    for i in 0..500u64 {
        let record = next(&mut subscriber).expect("an item").expect("a record");
        assert_eq!((record.offset, record.payload.to_vec()), (i, payload(i)));
    }
    assert!(
        next(&mut subscriber).is_none(),
        "the stream ends at the close"
    );
    assert!(next(&mut subscriber).is_none(), "and stays ended");
    writer.join().expect("writer");
}

/// As a `futures_core::Stream`, an error is the last item: a subscriber that retention
/// overtook (policy `Fail`) yields its `OffsetOutOfRange` once, then ends, rather than
/// yielding it at every poll.
#[cfg(feature = "futures")]
#[test]
fn an_error_ends_a_log_subscriber_as_a_stream() {
    use futures_core::{FusedStream as _, Stream as _};

    let store = MemoryStore::new();
    let stream = LogStream::new(store.clone());
    let mut subscriber = stream.subscribe(Position::Beginning).expect("subscribe");
    let entries: Vec<_> = (0..4).map(|_| Entry::new(b"k", b"v")).collect();
    store.append(&entries).expect("append");
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut poll = |subscriber: &mut cauce::stream::LogSubscriber<MemoryStore>| {
        std::pin::Pin::new(subscriber).poll_next(&mut cx)
    };
    assert!(matches!(poll(&mut subscriber), Poll::Ready(Some(Ok(r))) if r.offset == 0));
    store.truncate_before(3).expect("retention");
    assert!(
        matches!(
            poll(&mut subscriber),
            Poll::Ready(Some(Err(Error::OffsetOutOfRange {
                requested: 1,
                start: 3,
                ..
            })))
        ),
        "the error is an item"
    );
    assert!(subscriber.is_terminated());
    for _ in 0..3 {
        assert!(
            matches!(poll(&mut subscriber), Poll::Ready(None)),
            "then the end"
        );
    }
    assert_eq!(
        subscriber.position(),
        1,
        "from where a new subscription goes on"
    );
    subscriber.seek(Position::Offset(3)).expect("seek");
    assert!(
        !subscriber.is_terminated(),
        "a seek starts the stream again"
    );
    assert!(matches!(poll(&mut subscriber), Poll::Ready(Some(Ok(r))) if r.offset == 3));
}
