//! A submit appends its request under its key's stripe lock without waiting for the disk
//! (`Store::append_deferred`), and waits for the request to be durable once the lock is
//! released (`Store::wait_appended`); the instance it is queued to waits for the same
//! before it handles it. So the requests of one key share a group commit, instead of
//! one fdatasync each, and nothing is handled before it is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::{Entry, Error, Offset};

mod common;

/// A counter that notes every offset it handles live.
#[derive(Default)]
struct Noting {
    handled: Arc<parking_lot::Mutex<Vec<Offset>>>,
}

impl Handler for Noting {
    type State = u64;
    type Request = u64;
    type Response = u64;
    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        self.handled.lock().push(ctx.offset());
        *total += add;
        *total
    }
}

#[test]
fn the_durable_requests_of_one_hot_key_share_fdatasyncs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = Arc::new(
        LogStore::open(dir.path(), LogOptions::new().sync(SyncPolicy::Always)).expect("log"),
    );
    let cluster = Cluster::builder(Noting::default())
        .stores(input.clone(), None)
        .instances(2)
        .build()
        .expect("cluster");
    const THREADS: u64 = 16;
    const EACH: u64 = 40;
    let syncs_before = input.stats().syncs;
    let mut answers: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let client = cluster.client();
                s.spawn(move || {
                    (0..EACH)
                        .map(|_| {
                            client
                                .submit("hot", 1)
                                .expect("submit")
                                .wait()
                                .expect("answer")
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("submitter"))
            .collect()
    });
    let syncs = input.stats().syncs - syncs_before;
    answers.sort_unstable();
    assert_eq!(
        answers,
        (1..=THREADS * EACH).collect::<Vec<_>>(),
        "every request applied once, in an order"
    );
    let requests = THREADS * EACH;
    // Synced one by one under the key's lock, this took one fdatasync a request.
    assert!(
        syncs * 2 < requests,
        "{requests} durable requests of one key from {THREADS} threads took {syncs} fdatasyncs"
    );
    cluster.shutdown().expect("shutdown");
}

/// An input log whose `wait_appended` waits at a gate while `held`, or fails while
/// `failing`; its appends are a memory store's.
#[derive(Default)]
struct Deferred {
    live: MemoryStore,
    held: AtomicBool,
    failing: AtomicBool,
    /// Callers waiting at the gate now.
    waiting: AtomicUsize,
}

impl Store for Deferred {
    fn append(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn defers_appends(&self) -> bool {
        true
    }
    fn wait_appended(&self, _end: Offset) -> cauce::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::ReadOnly("the test's fdatasync failed".into()));
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let since = Instant::now();
        while self.held.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    common::forward_store_but_append!(live);
}

#[test]
fn a_request_is_handled_only_once_it_is_durable() {
    let input = Arc::new(Deferred::default());
    let handler = Noting::default();
    let handled = handler.handled.clone();
    let cluster = Cluster::builder(handler)
        .stores(input.clone(), None)
        .instances(1)
        .build()
        .expect("cluster");
    let client = cluster.client();
    let first = client.submit("k", 2).unwrap();
    let first_offset = first.offset();
    assert_eq!(first.wait().unwrap(), 2);
    input.held.store(true, Ordering::SeqCst);
    let submitter =
        std::thread::spawn(move || client.submit("k", 5).map(|p| (p.offset(), p.wait())));
    // The submit waits for its request to be durable, and so does the instance it was
    // queued to: two callers at the gate, and the handler has not seen the request.
    let since = Instant::now();
    while input.waiting.load(Ordering::SeqCst) < 2 {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{} callers wait for the request to be durable, expected the submit and its instance",
            input.waiting.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        input.next_offset(),
        first_offset + 2,
        "the request is appended"
    );
    assert_eq!(
        *handled.lock(),
        vec![first_offset],
        "handled before it was durable"
    );
    input.held.store(false, Ordering::SeqCst);
    let (offset, answer) = submitter.join().expect("submitter").expect("submit");
    assert_eq!(answer.expect("answer"), 7);
    assert_eq!(*handled.lock(), vec![first_offset, offset]);
    cluster.shutdown().expect("shutdown");
}

#[test]
fn a_request_the_log_cannot_make_durable_is_refused_and_not_applied() {
    let input = Arc::new(Deferred::default());
    let handler = Noting::default();
    let handled = handler.handled.clone();
    let cluster = Cluster::builder(handler)
        .stores(input.clone(), None)
        .instances(1)
        .build()
        .expect("cluster");
    let client = cluster.client();
    let first = client.submit("k", 2).unwrap();
    let first_offset = first.offset();
    assert_eq!(first.wait().unwrap(), 2);
    // As a log whose write or fdatasync failed: it fails every wait from then on.
    input.failing.store(true, Ordering::SeqCst);
    match client.submit("k", 5) {
        Err(Error::ReadOnly(message)) => assert!(message.contains("fdatasync failed")),
        Err(other) => panic!("refused with {other}, expected the log's error"),
        Ok(_) => panic!("a request the log could not make durable was accepted"),
    }
    // Its instance refused it too: a read of the key, queued behind it, does not see it.
    assert_eq!(client.query("k", |t: &u64| *t).unwrap().wait().unwrap(), 2);
    assert_eq!(
        *handled.lock(),
        vec![first_offset],
        "the refused request was handled"
    );
    cluster.shutdown().expect("shutdown");
}
