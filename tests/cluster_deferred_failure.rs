//! A request's submitter and its instance both wait for it to be durable
//! (`Store::wait_appended`), and must agree: a store that keeps the contract answers
//! alike for the same records (`Ok` if and only if they are durable). The cluster once
//! remembered the first failure and refused every later wait with it, durable records
//! included: a submit returned Ok and its instance refused the request, or a durable
//! request was refused and then applied by a reopened log (a review's tests; each
//! failed 4 of 4 runs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::{Deferred, MemoryStore, Store};
use cauce::{Entry, Error, Offset};

mod common;

/// Adds; an add of 0 first waits until `release` is set (at most 30 s): a slow request
/// keeps the instance busy until the test lets it go (a fixed sleep let a test thread
/// descheduled that long find the instance already past it).
#[derive(Default)]
struct SlowSum {
    release: Arc<AtomicBool>,
}
impl Handler for SlowSum {
    type State = u64;
    type Request = u64;
    type Response = u64;
    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        if add == 0 {
            common::wait_for(&self.release, Duration::from_secs(30));
        }
        *total += add;
        *total
    }
}

/// A store that keeps the contract of `wait_appended`: every record before
/// `durable_until` is durable (Ok), anything past it fails for good. A wait for exactly
/// `gate_end` is slow (waits while `held`) before it answers, as a follower woken late;
/// an append of key "b" returns late (waits while `block_b`) after it appended, as a
/// submitter preempted between its append and its wait.
struct Decided {
    live: MemoryStore,
    durable_until: AtomicU64,
    gate_end: AtomicU64,
    held: AtomicBool,
    at_gate: AtomicUsize,
    block_b: AtomicBool,
    b_appended: AtomicBool,
}

impl Decided {
    fn new() -> Self {
        Decided {
            live: MemoryStore::new(),
            durable_until: AtomicU64::new(u64::MAX),
            gate_end: AtomicU64::new(u64::MAX),
            held: AtomicBool::new(false),
            at_gate: AtomicUsize::new(0),
            block_b: AtomicBool::new(false),
            b_appended: AtomicBool::new(false),
        }
    }
}

impl Store for Decided {
    fn append(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> cauce::Result<Deferred> {
        let offsets = self.live.append(batch)?;
        if batch.iter().any(|e| e.key == b"b") && self.block_b.load(Ordering::SeqCst) {
            self.b_appended.store(true, Ordering::SeqCst);
            let since = Instant::now();
            while self.block_b.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(Deferred {
            offsets,
            pending: true,
        })
    }
    fn wait_appended(&self, end: Offset) -> cauce::Result<()> {
        if end == self.gate_end.load(Ordering::SeqCst) {
            self.at_gate.fetch_add(1, Ordering::SeqCst);
            let since = Instant::now();
            while self.held.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if end <= self.durable_until.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Error::ReadOnly("the test's fdatasync failed".into()))
        }
    }
    common::forward_store_but_append!(live);
}

/// Waits until `done()` holds, at most 10 s.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    common::wait_until(what, Duration::from_secs(10), done);
}

/// The submitter's wait for B is answered Ok by the store (B is durable), but returns
/// after another request's wait failed: B's instance, which asks in between, must not
/// refuse B.
#[test]
fn a_durable_request_acknowledged_after_another_failed_is_applied() {
    let input = Arc::new(Decided::new());
    let handler = SlowSum::default();
    let release = handler.release.clone();
    let cluster = Cluster::builder(handler)
        .stores(input.clone(), None)
        .instances(1)
        .stall_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let client = cluster.client();
    assert_eq!(client.submit("k", 1).unwrap().wait().unwrap(), 1);
    // The instance is busy until released.
    let before_slow = input.next_offset();
    let c0 = client.clone();
    let slow = std::thread::spawn(move || c0.submit("k", 0).unwrap().wait());
    // B must be appended after the slow request: wait until that one is in the log.
    wait_until("the slow request appended", || {
        input.next_offset() > before_slow
    });
    // B: its submitter's wait is slow to return (B is durable).
    let b_end = input.next_offset() + 1;
    input.gate_end.store(b_end, Ordering::SeqCst);
    input.held.store(true, Ordering::SeqCst);
    let c1 = client.clone();
    let b = std::thread::spawn(move || c1.submit("k", 5).map(|p| (p.offset(), p.wait())));
    wait_until("B's submitter waits", || {
        input.at_gate.load(Ordering::SeqCst) == 1
    });
    // C, after B: the disk fails for it (and everything after B).
    input.durable_until.store(b_end, Ordering::SeqCst);
    let c = client.submit("k", 7);
    assert!(c.is_err(), "C is refused");
    // The instance finishes the slow request and comes to B: it asks the store about B
    // while B's submitter still waits at the gate. (It waits at the same gate, as the
    // store answers alike for the same records; a cluster that asked nothing would be
    // given up on after a while, and the test goes on.)
    release.store(true, Ordering::SeqCst);
    slow.join().unwrap().unwrap();
    let since = Instant::now();
    while input.at_gate.load(Ordering::SeqCst) < 2 && since.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    input.held.store(false, Ordering::SeqCst);
    let (b_offset, b_answer) = b.join().unwrap().expect("B's submit returned Ok");
    assert_eq!(b_offset + 1, b_end);
    assert!(
        input.wait_appended(b_end).is_ok(),
        "the store says B is durable"
    );
    let state = client.query("k", |t: &u64| *t).unwrap().wait().unwrap();
    match b_answer {
        Ok(v) => assert_eq!(v, 6),
        Err(e) => panic!(
            "B's submit returned Ok (durable) but its instance refused it: {e}; state {state}"
        ),
    }
    let _ = cluster.shutdown();
}

/// B is durable (the store says so), but its submitter and its instance ask only after
/// C's wait failed: B must not be refused ("not logged, will not be handled") when an
/// open of the log as it is durable applies it.
#[test]
fn a_durable_request_waited_for_after_another_failed_is_not_refused() {
    let input = Arc::new(Decided::new());
    let cluster = Cluster::builder(SlowSum::default())
        .stores(input.clone(), None)
        .instances(1)
        .build()
        .unwrap();
    let client = cluster.client();
    assert_eq!(client.submit("b", 1).unwrap().wait().unwrap(), 1);
    assert_eq!(client.submit("c", 1).unwrap().wait().unwrap(), 1);
    input.block_b.store(true, Ordering::SeqCst);
    let c1 = client.clone();
    let b = std::thread::spawn(move || c1.submit("b", 5).map(|p| p.offset()));
    wait_until("B appended", || input.b_appended.load(Ordering::SeqCst));
    let b_end = input.next_offset(); // B is the last record
    // Everything through B is durable; C's fdatasync fails.
    input.durable_until.store(b_end, Ordering::SeqCst);
    let c = client.submit("c", 7);
    assert!(c.is_err(), "C refused");
    input.block_b.store(false, Ordering::SeqCst);
    let b_submit = b.join().unwrap();
    assert!(
        input.wait_appended(b_end).is_ok(),
        "the store says B is durable"
    );
    let in_memory = client.query("b", |t: &u64| *t).unwrap().wait().unwrap();
    drop(client);
    drop(cluster);
    // The log as it is durable (through B), opened again.
    let reopened = Arc::new(MemoryStore::new());
    for r in input.live.read_from(0).unwrap() {
        let r = r.unwrap();
        if r.offset >= b_end {
            break;
        }
        reopened
            .append(&[Entry::with_timestamp(r.timestamp, &r.key, &r.payload)])
            .unwrap();
    }
    let cluster = Cluster::builder(SlowSum::default())
        .stores(reopened, None)
        .instances(1)
        .build()
        .unwrap();
    let after = cluster
        .client()
        .query("b", |t: &u64| *t)
        .unwrap()
        .wait()
        .unwrap();
    let _ = cluster.shutdown();
    match b_submit {
        Ok(_) => {}
        Err(e) => assert_eq!(
            after, in_memory,
            "B's submit returned Err ({e}: 'not logged, will not be handled'), the store \
             called B durable, and the reopened log applied it ({in_memory} before, {after} after)"
        ),
    }
}
