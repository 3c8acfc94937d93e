//! A submit appends its request under its key's stripe lock without waiting for the disk
//! (`Store::append_deferred`), and waits for the request to be durable once the lock is
//! released (`Store::wait_appended`); the instance it is queued to waits for the same
//! before it handles it. So the requests of one key share a group commit, instead of
//! one fdatasync each, and nothing is handled before it is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::{Deferred, LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::{Entry, Error, Offset};
use common::{Gated, Req, Resp, Service, Tally};

mod common;

/// A counter that notes every offset it handles live.
#[derive(Default)]
struct Noting {
    handled: Handled,
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

/// The offsets a `Noting` handler handled.
type Handled = Arc<parking_lot::Mutex<Vec<Offset>>>;

/// A cluster of one instance over a `Gated` log, a first request of "k" (2) answered:
/// the log, what the handler handled, the cluster, and that request's offset.
fn gated_cluster() -> (Arc<Gated>, Handled, Cluster<Noting>, Offset) {
    let input = Arc::new(Gated::default());
    let handler = Noting::default();
    let handled = handler.handled.clone();
    let cluster = Cluster::builder(handler)
        .stores(input.clone(), None)
        .instances(1)
        .build()
        .expect("cluster");
    let first = cluster.client().submit("k", 2).unwrap();
    let first_offset = first.offset();
    assert_eq!(first.wait().unwrap(), 2);
    (input, handled, cluster, first_offset)
}

#[test]
fn a_request_is_handled_only_once_it_is_durable() {
    let (input, handled, cluster, first_offset) = gated_cluster();
    let client = cluster.client();
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
    let (input, handled, cluster, first_offset) = gated_cluster();
    let client = cluster.client();
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

/// An instance declared lost while it waits for the request it took to be durable: the
/// cluster reads that request's key from the log to hand it over, and the log shows it
/// only once it is durable. The read failed, and the submitter (whose submit returned
/// Ok) was answered `StateUnavailable` while the new holder applied the request (a
/// review's test; failed 3 of 3 runs before the fix).
/// A real log under `Always`, whose `wait_appended` for an end past `hold_after` waits
/// while `held` (a slow fdatasync), and whose deferred append of key "z" waits while
/// `block_z` (a submit holding its stripe).
struct Slow {
    live: Arc<LogStore>,
    held: AtomicBool,
    hold_after: AtomicU64,
    block_z: AtomicBool,
    waiting: AtomicU64,
}

impl Store for Slow {
    fn append(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> cauce::Result<Deferred> {
        if batch.iter().any(|e| e.key == b"z") {
            let since = Instant::now();
            while self.block_z.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.live.append_deferred(batch)
    }
    fn append_waits_for_disk(&self) -> bool {
        self.live.append_waits_for_disk()
    }
    fn sync_until(&self, offset: Offset) -> cauce::Result<()> {
        self.live.sync_until(offset)
    }
    fn wait_appended(&self, end: Offset) -> cauce::Result<()> {
        if end > self.hold_after.load(Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let since = Instant::now();
            while self.held.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.live.wait_appended(end)
    }
    common::forward_store_but_append!(live);
}

#[test]
fn a_lost_instance_waiting_for_its_current_request_to_be_durable_hands_it_over() {
    let dir = tempfile::tempdir().unwrap();
    let live =
        Arc::new(LogStore::open(dir.path(), LogOptions::new().sync(SyncPolicy::Always)).unwrap());
    let input = Arc::new(Slow {
        live,
        held: AtomicBool::new(false),
        hold_after: AtomicU64::new(u64::MAX),
        block_z: AtomicBool::new(false),
        waiting: AtomicU64::new(0),
    });
    let cluster = Cluster::builder(Service::default())
        .stores(input.clone(), None)
        .instances(2)
        .stall_timeout(Duration::from_millis(200))
        .supervise_every(Duration::from_millis(10))
        .build()
        .unwrap();
    let client = cluster.client();
    assert_eq!(
        client.submit("k", Req::Add(1)).unwrap().wait().unwrap(),
        Resp::Sum(1)
    );
    // R1: the handler of "k" takes 1 s (a stall is declared at ~200 ms).
    let c1 = client.clone();
    let r1 = std::thread::spawn(move || c1.submit("k", Req::Stall(1000)).unwrap().wait());
    std::thread::sleep(Duration::from_millis(50));
    // From here on the disk is slow.
    input
        .hold_after
        .store(input.live.next_offset(), Ordering::SeqCst);
    input.held.store(true, Ordering::SeqCst);
    // R2: queued behind R1, its submit waits for the disk.
    let c2 = client.clone();
    let r2 = std::thread::spawn(move || {
        let p = c2.submit("k", Req::Add(10))?;
        let offset = p.offset();
        Ok::<_, Error>((offset, p.wait()))
    });
    std::thread::sleep(Duration::from_millis(50));
    // A submit of another key holds its stripe (in its append) until R1 is over, so the
    // loss of R1's instance is acted on after it moved on to R2.
    input.block_z.store(true, Ordering::SeqCst);
    let c3 = client.clone();
    let r3 = std::thread::spawn(move || c3.submit("z", Req::Add(5)).map(|p| p.wait()));
    std::thread::sleep(Duration::from_millis(1300));
    input.block_z.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    // The disk catches up.
    input.held.store(false, Ordering::SeqCst);
    let r1 = r1.join().unwrap();
    let (r2_offset, r2_answer) = r2.join().unwrap().expect("R2's submit returned Ok");
    let r3 = r3.join().unwrap();
    let state = client.query("k", |t: &Tally| *t).unwrap().wait().unwrap();
    let _ = (r1, r3);
    let applied = state.sum >= 11;
    match r2_answer {
        Ok(_) => {}
        Err(e) => panic!(
            "R2 (submit Ok at {r2_offset}, durable) answered {e} while its state {} it",
            if applied {
                "includes"
            } else {
                "does not include"
            }
        ),
    }
    cluster.shutdown().unwrap();
}

/// A store whose `wait_appended` fails from call `fail_call` on, for every end past the
/// last one it answered `Ok` (as a log whose fdatasync failed: what was durable stays
/// so, nothing after it becomes so). A request's submitter and its instance both wait
/// for it, and must agree.
#[derive(Default)]
struct FlakyWait {
    live: MemoryStore,
    calls: AtomicUsize,
    fail_call: AtomicUsize,
    /// The last end answered `Ok`, and whether a wait failed.
    decided: parking_lot::Mutex<(Offset, bool)>,
}

impl Store for FlakyWait {
    fn append(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> cauce::Result<Deferred> {
        Ok(Deferred {
            offsets: self.live.append(batch)?,
            pending: true,
        })
    }
    fn wait_appended(&self, end: Offset) -> cauce::Result<()> {
        let mut decided = self.decided.lock();
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if end <= decided.0 {
            return Ok(());
        }
        if decided.1 || n >= self.fail_call.load(Ordering::SeqCst) {
            decided.1 = true;
            return Err(Error::ReadOnly("the test's fdatasync failed".into()));
        }
        decided.0 = end;
        Ok(())
    }
    common::forward_store_but_append!(live);
}

/// A cluster of one instance over a `FlakyWait` log that has not failed yet, a first
/// request of "k" (1) answered.
fn flaky_cluster() -> (Arc<FlakyWait>, Cluster<Noting>) {
    let input = Arc::new(FlakyWait::default());
    input.fail_call.store(usize::MAX, Ordering::SeqCst);
    let cluster = Cluster::builder(Noting::default())
        .stores(input.clone(), None)
        .instances(1)
        .build()
        .unwrap();
    assert_eq!(cluster.client().submit("k", 1).unwrap().wait().unwrap(), 1);
    (input, cluster)
}

#[test]
fn a_submit_whose_wait_fails_is_refused_and_not_applied() {
    let (input, cluster) = flaky_cluster();
    let client = cluster.client();
    // The next wait fails, the submitter's or its instance's, whichever comes first.
    input
        .fail_call
        .store(input.calls.load(Ordering::SeqCst), Ordering::SeqCst);
    let refused = client.submit("k", 100);
    let state = client.query("k", |t: &u64| *t).unwrap().wait().unwrap();
    assert!(refused.is_err(), "the wait did not fail for the submitter");
    assert_eq!(state, 1, "a submit that returned Err was applied");
    cluster.shutdown().unwrap();
}

#[test]
fn a_request_acknowledged_before_a_failure_is_applied() {
    let (input, cluster) = flaky_cluster();
    let client = cluster.client();
    // The wait after next fails: the instance's, if it asks the store again after the
    // submitter's wait (which answers `Ok` from then on for this request).
    input
        .fail_call
        .store(input.calls.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    let submitted = client
        .submit("k", 100)
        .expect("the submitter's wait succeeds");
    assert_eq!(
        submitted.wait().expect("applied"),
        101,
        "a request whose submit returned Ok was refused by its instance"
    );
    // Whichever later wait meets the failure, every wait after it fails too.
    let later = client.submit("k", 1000).and_then(|p| p.wait());
    let state = client.query("k", |t: &u64| *t).unwrap().wait().unwrap();
    match later {
        Ok(total) => assert_eq!((total, state), (1101, 1101)),
        Err(_) => assert_eq!(state, 101, "a refused request was applied"),
    }
    cluster.shutdown().unwrap();
}
