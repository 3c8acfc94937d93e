//! Closing a stream while publishers publish: every publish that was accepted reaches a
//! subscriber that reads until the stream ends, and nothing is accepted after the close
//! returned.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::stream::{LogStream, MemoryStream, Position, Publish, Stream, Subscribe};
use cauce::{Entry, Error};

/// Publishers on `threads` threads publish into a `LogStream` over `store` until
/// refused; the stream is closed while they run.
fn close_while_publishing<S: Store + 'static>(store: S, threads: usize) {
    close_stream_while_publishing(LogStream::new(store), threads);
}

/// Publishers on `threads` threads publish until refused; the stream is closed while
/// they run. Panics if an accepted record is not received.
fn close_stream_while_publishing<S: Stream>(stream: S, threads: usize)
where
    S::Publisher: Send + 'static,
{
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let closed = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..threads)
        .map(|t| {
            let publisher = stream.publisher();
            let closed = closed.clone();
            let published = published.clone();
            thread::spawn(move || {
                let mut accepted = Vec::new();
                let payload = format!("from {t}");
                loop {
                    let after_close = closed.load(Ordering::SeqCst);
                    match publisher.publish(Entry::new(b"k", payload.as_bytes())) {
                        Ok(offset) => {
                            assert!(
                                !after_close,
                                "publish {offset}, begun after close returned, was accepted"
                            );
                            accepted.push(offset);
                            published.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(Error::Closed) => return accepted,
                        Err(e) => panic!("publish failed: {e}"),
                    }
                }
            })
        })
        .collect();
    let closer = stream.publisher();
    // Close while every publisher is in its loop: once each had time to publish (on a
    // loaded machine a fixed sleep could end before any thread ran), and a little more.
    while published.load(Ordering::SeqCst) < threads {
        thread::yield_now();
    }
    thread::sleep(Duration::from_millis(1));
    closer.close();
    closed.store(true, Ordering::SeqCst);
    let accepted: BTreeSet<u64> = publishers
        .into_iter()
        .flat_map(|p| p.join().expect("publisher"))
        .collect();
    let mut received = BTreeSet::new();
    loop {
        match subscriber.recv_timeout(Duration::from_secs(10)) {
            Ok(record) => {
                received.insert(record.offset);
            }
            Err(Error::Closed) => break,
            Err(e) => panic!("subscriber: {e}"),
        }
    }
    assert!(
        !accepted.is_empty(),
        "nothing was published before the close"
    );
    let lost: Vec<_> = accepted.difference(&received).take(5).collect();
    assert!(lost.is_empty(), "accepted but never received: {lost:?}");
}

#[test]
fn close_racing_publishers_over_a_memory_store_loses_nothing_accepted() {
    for _ in 0..20 {
        close_while_publishing(MemoryStore::new(), 4);
    }
}

#[test]
fn close_racing_publishers_over_a_log_store_loses_nothing_accepted() {
    for sync in [SyncPolicy::Never, SyncPolicy::Always] {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = LogStore::open(dir.path(), LogOptions::new().sync(sync)).expect("open");
            close_while_publishing(Arc::new(log), 4);
        }
    }
}

#[test]
fn close_racing_publishers_of_a_memory_stream_loses_nothing_accepted() {
    // The subscriber reads only after the close: publishers fill the queue, block, and
    // are woken by the close; what they got in must still be received.
    for _ in 0..20 {
        close_stream_while_publishing(MemoryStream::bounded(1024).expect("stream"), 4);
        close_stream_while_publishing(MemoryStream::fan_out(1024).expect("stream"), 4);
    }
}

/// A closed `LogStream` ends where its store ended when it closed: what is appended to
/// the store after that (by a new `LogStream` over it, or directly) is not the closed
/// stream's. A subscriber that had returned `Closed` went on to return such records,
/// and one that had not drained yet returned them ahead of `Closed`.
#[test]
fn a_closed_log_stream_ends_where_its_store_ended_when_it_closed() {
    let store = MemoryStore::new();
    let stream = LogStream::new(store.clone());
    let mut drained = stream.subscribe(Position::Beginning).expect("subscribe");
    let mut behind = stream.subscribe(Position::Beginning).expect("subscribe");
    let publisher = stream.publisher();
    publisher.publish(Entry::new(b"k", b"1")).expect("publish");
    publisher.close();
    assert_eq!(
        drained.recv().expect("the record before the close").offset,
        0
    );
    assert!(matches!(drained.recv(), Err(Error::Closed)));
    // A new stream over the same store, and the store itself, go on.
    let next = LogStream::new(store.clone());
    next.publisher()
        .publish(Entry::new(b"k", b"2"))
        .expect("a new stream is open");
    store.append(&[Entry::new(b"k", b"3")]).expect("append");
    for subscriber in [&mut drained, &mut behind] {
        let mut got = Vec::new();
        loop {
            match subscriber.recv_timeout(Duration::from_millis(100)) {
                Ok(record) => got.push(record.offset),
                Err(Error::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(got.iter().all(|&o| o < 1), "past the close: {got:?}");
        assert!(matches!(subscriber.try_recv(), Err(Error::Closed)));
    }
    assert_eq!(behind.position(), 1);
    // A subscriber of the closed stream replays up to the close; one of the new stream
    // sees everything the store holds.
    let mut late = stream.subscribe(Position::Beginning).expect("subscribe");
    assert_eq!(late.recv().expect("replay").offset, 0);
    assert!(matches!(late.recv(), Err(Error::Closed)));
    let mut fresh = next.subscribe(Position::Beginning).expect("subscribe");
    let offsets: Vec<_> = (0..3)
        .map(|_| fresh.recv().expect("record").offset)
        .collect();
    assert_eq!(offsets, vec![0, 1, 2]);
}
