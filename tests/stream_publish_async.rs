//! `LogPublisher::publish_async`: a publish awaited on an executor's thread never waits
//! for the disk there (a store whose durability wait is held shut leaves the future
//! pending, and the thread free), resolves once the store says the records are durable,
//! gets the store's error when they are not, and is refused once the stream closed.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use cauce::store::{Deferred, LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::stream::{LogStream, Position, Publish, Stream, Subscribe};
use cauce::{Entry, Error, Offset, Result};
use parking_lot::{Condvar, Mutex};

#[path = "support/forward.rs"]
mod forward;

/// A `MemoryStore` whose appends say they wait for the disk: an append is deferred
/// (pending), and `wait_appended` blocks while `shut`, then answers `Ok` or, once
/// `fail` is set, an I/O error, as a store whose fdatasync failed does.
struct HeldDisk {
    store: MemoryStore,
    shut: Mutex<bool>,
    opened: Condvar,
    fail: AtomicBool,
    waits: AtomicUsize,
    /// The threads that called `wait_appended`.
    waiters: Mutex<Vec<thread::ThreadId>>,
}

impl HeldDisk {
    fn new() -> Arc<HeldDisk> {
        Arc::new(HeldDisk {
            store: MemoryStore::new(),
            shut: Mutex::new(true),
            opened: Condvar::new(),
            fail: AtomicBool::new(false),
            waits: AtomicUsize::new(0),
            waiters: Mutex::new(Vec::new()),
        })
    }

    fn open(&self) {
        *self.shut.lock() = false;
        self.opened.notify_all();
    }
}

impl Store for HeldDisk {
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        let deferred = self.append_deferred(batch)?;
        self.wait_appended(deferred.offsets.end)?;
        Ok(deferred.offsets)
    }
    fn append_waits_for_disk(&self) -> bool {
        true
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> Result<Deferred> {
        Ok(Deferred {
            offsets: self.store.append(batch)?,
            pending: true,
        })
    }
    fn wait_appended(&self, _end: Offset) -> Result<()> {
        self.waits.fetch_add(1, Ordering::SeqCst);
        self.waiters.lock().push(thread::current().id());
        // Held at most 30 s: a wait on the test's own thread fails the test, not hangs it.
        let mut shut = self.shut.lock();
        let deadline = Instant::now() + Duration::from_secs(30);
        while *shut {
            if self.opened.wait_until(&mut shut, deadline).timed_out() {
                return Err(Error::Timeout(Duration::from_secs(30)));
            }
        }
        match self.fail.load(Ordering::SeqCst) {
            false => Ok(()),
            true => Err(Error::Io {
                op: "fdatasync",
                path: "held-disk".into(),
                source: std::io::Error::other("the disk failed"),
            }),
        }
    }
    forward_store!(
        store;
        read_from,
        all_but_appends_and_reads
    );
}

/// Unparks the executor's thread.
struct Unpark(thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls every future of `futures` on this thread until all are ready (30 s at most);
/// returns their outputs in order.
fn run_all<F: Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let started = Instant::now();
    while outputs.iter().any(Option::is_none) {
        for (future, output) in futures.iter_mut().zip(&mut outputs) {
            if output.is_none()
                && let Poll::Ready(out) = std::pin::Pin::new(future).poll(&mut cx)
            {
                *output = Some(out);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not every future was woken in 30 s"
        );
        thread::park_timeout(Duration::from_millis(100));
    }
    outputs.into_iter().flatten().collect()
}

#[test]
fn an_async_publish_waits_for_the_disk_on_another_thread_and_resolves_once_durable() {
    let store = HeldDisk::new();
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    let mut futures: Vec<_> = (0..20u64)
        .map(|i| Box::pin(publisher.publish_async(Entry::new(b"k", &i.to_le_bytes()))))
        .collect();
    // The disk is held: every future stays pending, and this thread is free.
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    for future in &mut futures {
        assert!(future.as_mut().poll(&mut cx).is_pending());
    }
    let waited_since = Instant::now();
    while store.waits.load(Ordering::SeqCst) == 0 {
        assert!(
            waited_since.elapsed() < Duration::from_secs(30),
            "nobody waits"
        );
        thread::sleep(Duration::from_millis(1));
    }
    assert!(
        futures
            .iter_mut()
            .all(|f| f.as_mut().poll(&mut cx).is_pending())
    );
    store.open();
    let offsets: Vec<Offset> = run_all(futures)
        .into_iter()
        .map(|r| r.expect("published"))
        .collect();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>(), "in the order made");
    let here = thread::current().id();
    assert!(
        store.waiters.lock().iter().all(|&t| t != here),
        "the wait for the disk ran on the executor's thread"
    );
    let mut subscriber = stream.subscribe(Position::Beginning).expect("subscribe");
    for i in 0..20u64 {
        let record = subscriber.recv().expect("recv");
        assert_eq!(record.payload.to_vec(), i.to_le_bytes());
    }
}

#[test]
fn an_async_publish_gets_the_stores_error_when_its_records_are_not_durable() {
    let store = HeldDisk::new();
    store.fail.store(true, Ordering::SeqCst);
    store.open();
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    let batch = [Entry::new(b"a", b"1"), Entry::new(b"b", b"2")];
    let results = run_all(vec![
        Box::pin(publisher.publish_batch_async(&batch)),
        Box::pin(publisher.publish_batch_async(&batch)),
    ]);
    for result in results {
        assert!(
            matches!(
                &result,
                Err(Error::Io {
                    op: "fdatasync",
                    ..
                })
            ),
            "{result:?}"
        );
    }
}

#[test]
fn an_async_publish_after_the_close_is_refused() {
    let store = HeldDisk::new();
    store.open();
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    let first = run_all(vec![Box::pin(
        publisher.publish_async(Entry::new(b"k", b"v")),
    )]);
    assert_eq!(first.into_iter().next().map(|r| r.ok()), Some(Some(0)));
    publisher.close();
    let refused = run_all(vec![Box::pin(
        publisher.publish_async(Entry::new(b"k", b"v")),
    )]);
    assert!(
        matches!(refused.as_slice(), [Err(Error::Closed)]),
        "{refused:?}"
    );
    assert_eq!(store.next_offset(), 1, "nothing appended after the close");
}

/// On the embedded default (`SyncPolicy::Always`), 8 tasks on one thread each publish
/// 50 entries in turn: every publish resolves, every record is on disk after a reopen.
#[test]
fn async_publishes_on_a_synced_log_are_all_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LogOptions::new().sync(SyncPolicy::Always);
    let log = Arc::new(LogStore::open(dir.path(), options.clone()).expect("open"));
    let stream = LogStream::new(log.clone());
    let tasks: Vec<_> = (0..8u8)
        .map(|task| {
            let publisher = stream.publisher();
            Box::pin(async move {
                let mut offsets = Vec::new();
                for i in 0..50u8 {
                    let published = publisher.publish_async(Entry::new(&[task], &[i]));
                    offsets.push(published.await?);
                }
                Ok::<_, Error>(offsets)
            })
        })
        .collect();
    let mut all: Vec<Offset> = run_all(tasks)
        .into_iter()
        .flat_map(|r| r.expect("published"))
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..400).collect::<Vec<_>>());
    drop(stream);
    drop(log);
    let log = LogStore::open(dir.path(), options).expect("reopen");
    let mut seen = vec![0u8; 8];
    for record in log.read_from(0).expect("read") {
        let record = record.expect("record");
        let task = record.key[0] as usize;
        assert_eq!(
            record.payload[0], seen[task],
            "task {task}'s records in order"
        );
        seen[task] += 1;
    }
    assert_eq!(seen, vec![50u8; 8]);
}

/// A store whose appends do not wait for the disk is appended in the call: the future
/// is ready at its first poll.
#[test]
fn an_async_publish_to_a_memory_store_is_ready_at_once() {
    let stream = LogStream::new(MemoryStore::new());
    let publisher = stream.publisher();
    let mut published = Box::pin(publisher.publish_async(Entry::new(b"k", b"v")));
    assert_eq!(stream.store().next_offset(), 1, "appended in the call");
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(matches!(
        published.as_mut().poll(&mut cx),
        Poll::Ready(Ok(0))
    ));
    drop(publisher.publish(Entry::new(b"k", b"w")));
}

/// `commit_async` runs off the executor's thread, after the async publishes queued
/// before it: held with them while the disk is, then the cursor stands where the
/// subscriber was when it asked, and a new subscription resumes there.
#[test]
fn an_async_commit_runs_after_the_publishes_queued_before_it() {
    let store = HeldDisk::new();
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    store
        .store
        .append(&[Entry::new(b"k", b"0"), Entry::new(b"k", b"1")])
        .expect("append");
    let mut subscriber = stream
        .subscribe(Position::Cursor("mailer".into()))
        .expect("subscribe");
    assert_eq!(subscriber.recv().expect("recv").offset, 0);
    let published = Box::pin(publisher.publish_async(Entry::new(b"k", b"2")));
    let mut committed = Box::pin(subscriber.commit_async());
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(
        committed.as_mut().poll(&mut cx).is_pending(),
        "held behind the publish"
    );
    assert_eq!(store.cursor("mailer").expect("cursor"), None);
    assert_eq!(
        subscriber.recv().expect("recv").offset,
        1,
        "the subscriber goes on"
    );
    store.open();
    let results = run_all(vec![
        Box::pin(async move { published.await.map(|_| ()) })
            as std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>,
        Box::pin(committed),
    ]);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        store.cursor("mailer").expect("cursor"),
        Some(1),
        "where it was asked"
    );
    let resumed = stream
        .subscribe(Position::Cursor("mailer".into()))
        .expect("resubscribe");
    assert_eq!(resumed.position(), 1);
    // After the close, on a thread of its own.
    publisher.close();
    let after = run_all(vec![Box::pin(subscriber.commit_async())]);
    assert!(matches!(after.as_slice(), [Ok(())]), "{after:?}");
    assert_eq!(store.cursor("mailer").expect("cursor"), Some(2));
    // Without a cursor there is nothing to commit.
    let plain = stream.subscribe(Position::Beginning).expect("subscribe");
    let refused = run_all(vec![Box::pin(plain.commit_async())]);
    assert!(
        matches!(refused.as_slice(), [Err(Error::CannotCommit(_))]),
        "{refused:?}"
    );
}

/// On the embedded default, a cursor committed with `commit_async` is there after a
/// reopen.
#[test]
fn an_async_commit_on_a_synced_log_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LogOptions::new().sync(SyncPolicy::Always);
    let log = Arc::new(LogStore::open(dir.path(), options.clone()).expect("open"));
    let stream = LogStream::new(log.clone());
    let publisher = stream.publisher();
    for i in 0..5u8 {
        publisher.publish(Entry::new(b"k", &[i])).expect("publish");
    }
    let mut subscriber = stream
        .subscribe(Position::Cursor("billing".into()))
        .expect("subscribe");
    for _ in 0..3 {
        subscriber.recv().expect("recv");
    }
    let committed = run_all(vec![Box::pin(subscriber.commit_async())]);
    assert!(matches!(committed.as_slice(), [Ok(())]), "{committed:?}");
    drop((subscriber, publisher, stream, log));
    let log = LogStore::open(dir.path(), options).expect("reopen");
    assert_eq!(log.cursor("billing").expect("cursor"), Some(3));
}

/// A `LogStore` (which shows a deferred record only once it is durable) wrapper:
/// forwards everything; `wait_appended` sleeps `wait_delay` first,
/// `commit_cursor` sleeps `slow_commit_ms` when committing offset `slow_commit_at`.
struct Slow {
    inner: Arc<LogStore>,
    wait_delay: Duration,
    slow_commit_at: AtomicU64,
    /// Set when a `wait_appended` starts.
    waiting: AtomicBool,
}

impl Store for Slow {
    fn wait_appended(&self, end: Offset) -> Result<()> {
        self.waiting.store(true, Ordering::SeqCst);
        thread::sleep(self.wait_delay);
        self.inner.wait_appended(end)
    }
    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
        if offset == self.slow_commit_at.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(300));
        }
        self.inner.commit_cursor(name, offset)
    }
    forward_store!(
        inner;
        append,
        append_waits_for_disk,
        append_deferred,
        read_from,
        start_offset,
        next_offset,
        wait_for,
        poll_committed,
        wake_waiters,
        sync,
        truncate_before,
        compact_with,
        cursor,
        save_snapshot,
        latest_snapshot
    );
}

fn slow(log: &Arc<LogStore>, wait_delay: Duration, slow_commit_at: Offset) -> Arc<Slow> {
    Arc::new(Slow {
        inner: log.clone(),
        wait_delay,
        slow_commit_at: AtomicU64::new(slow_commit_at),
        waiting: AtomicBool::new(false),
    })
}

fn synced(dir: &std::path::Path) -> Arc<LogStore> {
    Arc::new(LogStore::open(dir, LogOptions::new().sync(SyncPolicy::Always)).expect("open"))
}

/// A close that comes while the appender thread waits for a publish to be durable
/// waits for it: the publish answered `Ok` is the closed stream's, which its followers
/// and a new subscriber receive. (Waited for outside the stream's gate, the close set
/// the stream's end below the record, and nobody received it.)
#[test]
fn a_close_during_an_async_publishs_wait_keeps_the_record_in_the_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = synced(dir.path());
    let store = slow(&log, Duration::from_millis(300), u64::MAX);
    let stream = LogStream::new(store.clone());
    let mut follower = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    let published = publisher.publish_async(Entry::new(b"k", b"v"));
    let since = Instant::now();
    while !store.waiting.load(Ordering::SeqCst) {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the appender never waits"
        );
        thread::sleep(Duration::from_millis(1));
    }
    publisher.close();
    let offset = run_all(vec![Box::pin(published)]).remove(0);
    assert_eq!(offset.as_ref().ok(), Some(&0), "{offset:?}");
    let got = follower
        .recv_timeout(Duration::from_secs(30))
        .expect("the follower gets it");
    assert_eq!(got.offset, 0);
    let mut fresh = stream.subscribe(Position::Beginning).expect("subscribe");
    assert_eq!(fresh.recv().expect("a new subscriber gets it").offset, 0);
}

/// A cursor's commits take effect in the order they were made: a blocking `commit`
/// after a `commit_async` queued behind a publish waits for it (else the queued one
/// moved the cursor back), and after the close, commits are made in the call.
#[test]
fn commits_of_a_cursor_take_effect_in_the_order_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = synced(dir.path());
    log.append(&[
        Entry::new(b"k", b"0"),
        Entry::new(b"k", b"1"),
        Entry::new(b"k", b"2"),
    ])
    .expect("append");
    let store = slow(&log, Duration::from_millis(200), 1);
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    let mut subscriber = stream
        .subscribe(Position::Cursor("c".into()))
        .expect("subscribe");
    assert_eq!(subscriber.recv().expect("recv").offset, 0);
    let published = publisher.publish_async(Entry::new(b"k", b"3"));
    let first = subscriber.commit_async(); // at 1, queued behind the publish
    assert_eq!(subscriber.recv().expect("recv").offset, 1);
    subscriber.commit().expect("commit"); // at 2
    assert_eq!(log.cursor("c").expect("cursor"), Some(2));
    let answers = run_all(vec![
        Box::pin(async move { published.await.map(drop) })
            as std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>,
        Box::pin(first),
    ]);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(
        log.cursor("c").expect("cursor"),
        Some(2),
        "the cursor went back"
    );
    // Closed: each commit in its call, in order (the first slowed down).
    drop(publisher);
    drop(stream);
    subscriber.seek(Position::Offset(1)).expect("seek");
    let slowed = subscriber.commit_async(); // at 1
    subscriber.seek(Position::Offset(3)).expect("seek");
    let later = subscriber.commit_async(); // at 3
    let answers = run_all(vec![Box::pin(later), Box::pin(slowed)]);
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(
        log.cursor("c").expect("cursor"),
        Some(3),
        "the cursor went back"
    );
}

/// After a `commit_async` on a closed stream, its future dropped, and every handle
/// dropped, the store is let go of: it reopens at once.
#[test]
fn the_store_is_let_go_of_after_an_async_commit_on_a_closed_stream() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = synced(dir.path());
        log.append(&[Entry::new(b"k", b"0"), Entry::new(b"k", b"1")])
            .expect("append");
        let stream = LogStream::new(log.clone());
        let mut subscriber = stream
            .subscribe(Position::Cursor("c".into()))
            .expect("subscribe");
        drop(stream);
        subscriber.recv().expect("recv");
        drop(subscriber.commit_async());
        drop(subscriber);
        drop(log);
        let log = LogStore::open(dir.path(), LogOptions::new()).expect("reopen at once");
        assert_eq!(log.cursor("c").expect("cursor"), Some(1));
    }
}
