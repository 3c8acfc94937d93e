//! A call into the input store that does not return within the stall timeout is seen
//! by the supervisor: counted in `Metrics::store_stalls` (once per stall), shown in
//! `Metrics::store_stalled_for` while it lasts, and no instance is replaced for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler, Metrics};
use cauce::store::{Deferred, MemoryStore, Store};
use cauce::{Entry, Offset};

mod common;

/// Sums what it is asked to add.
struct Sum;

impl Handler for Sum {
    type State = u64;
    type Request = u64;
    type Response = u64;
    fn handle(&self, _: &mut Context<'_>, _: &[u8], sum: &mut u64, n: u64) -> u64 {
        *sum += n;
        *sum
    }
}

/// A `MemoryStore` whose appends (or, deferring, whose waits for appended records)
/// hang while `held` is set (at most 30 s): the test ends a hang when it has seen what
/// it looks for, rather than racing a hang of fixed length.
#[derive(Default)]
struct Hangs {
    live: MemoryStore,
    /// Appends are deferred: `wait_appended` is where it hangs.
    defer: bool,
    held: AtomicBool,
}

impl Hangs {
    fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    fn hang_if_asked(&self) {
        let since = Instant::now();
        while self.held.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(30) {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Store for Hangs {
    fn append(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<Offset>> {
        if !self.defer {
            self.hang_if_asked();
        }
        self.live.append(batch)
    }
    fn append_waits_for_disk(&self) -> bool {
        self.defer
    }
    fn append_deferred(&self, batch: &[Entry<'_>]) -> cauce::Result<Deferred> {
        let offsets = self.append(batch)?;
        Ok(Deferred {
            offsets,
            pending: self.defer,
        })
    }
    fn wait_appended(&self, _end: Offset) -> cauce::Result<()> {
        if self.defer {
            self.hang_if_asked();
        }
        Ok(())
    }
    common::forward_store_but_append!(live);
}

/// Polls `metrics` until `done` says so; panics after 20 s.
fn until(cluster: &Cluster<Sum>, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let since = Instant::now();
    loop {
        let m = cluster.metrics();
        if done(&m) {
            return m;
        }
        assert!(since.elapsed() < Duration::from_secs(20), "{what}: {m:?}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// The stall timeout: a store call or a unit of work descheduled on a loaded machine
/// (0.5-2 s seen) must not count as a stall, since the tests count stalls exactly.
const STALL_TIMEOUT: Duration = Duration::from_secs(2);

fn cluster(defer: bool) -> (Arc<Hangs>, Cluster<Sum>) {
    let store = Arc::new(Hangs {
        defer,
        ..Hangs::default()
    });
    let cluster = Cluster::builder(Sum)
        .stores(store.clone(), None)
        .instances(2)
        .stall_timeout(STALL_TIMEOUT)
        .supervise_every(Duration::from_millis(5))
        .build()
        .unwrap();
    (store, cluster)
}

fn a_hang_is_seen(defer: bool) {
    let (store, cluster) = cluster(defer);
    let client = cluster.client();
    assert_eq!(client.submit("k", 1).unwrap().wait().unwrap(), 1);
    let quiet = cluster.metrics();
    assert_eq!(quiet.store_stalls, 0);
    assert_eq!(quiet.store_stalled_for, None);

    store.hold();
    let hang_began = Instant::now();
    let hung = {
        let client = cluster.client();
        thread::spawn(move || client.submit("k", 2).and_then(|p| p.wait()))
    };
    let seen = until(&cluster, "the stall is seen", |m| {
        m.store_stalled_for.is_some()
    });
    // Read before anything else: the stall cannot have lasted longer than this.
    let hung_at_most = hang_began.elapsed();
    assert_eq!(seen.store_stalls, 1, "{seen:?}");
    let stalled_for = seen.store_stalled_for.unwrap();
    assert!(stalled_for >= STALL_TIMEOUT, "{seen:?}");
    assert!(
        stalled_for <= hung_at_most,
        "stalled for {stalled_for:?}, but the store hangs since {hung_at_most:?}: {seen:?}"
    );
    // Still one stall while it lasts (the store still hangs: the test holds it), and
    // longer.
    thread::sleep(Duration::from_millis(150));
    let later = cluster.metrics();
    assert_eq!(later.store_stalls, 1, "{later:?}");
    assert!(
        later.store_stalled_for.is_some_and(|d| d > stalled_for),
        "{later:?}"
    );
    store.release();

    assert_eq!(
        hung.join().unwrap().unwrap(),
        3,
        "answered once the store answers"
    );
    let after = until(&cluster, "the stall ends", |m| {
        m.store_stalled_for.is_none()
    });
    assert_eq!(after.store_stalls, 1, "{after:?}");
    assert_eq!(
        after.stalls, 0,
        "no instance replaced for a store: {after:?}"
    );
    assert_eq!(client.submit("k", 4).unwrap().wait().unwrap(), 7);
    cluster.shutdown().unwrap();
}

#[test]
fn an_append_that_hangs_is_a_store_stall() {
    a_hang_is_seen(false);
}

#[test]
fn a_wait_for_appended_records_that_hangs_is_a_store_stall() {
    a_hang_is_seen(true);
}

/// A shutdown whose checkpoint waits for an instance that waits for the store says the
/// store had not answered.
#[test]
fn a_checkpoint_held_up_by_the_store_says_so() {
    let (store, cluster) = cluster(true);
    let client = cluster.client();
    assert_eq!(client.submit("k", 1).unwrap().wait().unwrap(), 1);
    // Held until the shutdown returned: the shutdown gives up on the instance waiting
    // for the store (after the stall timeout, at least 1 s) while the store still hangs.
    store.hold();
    let hung = thread::spawn(move || client.submit("k", 2).and_then(|p| p.wait()));
    until(&cluster, "the stall is seen", |m| {
        m.store_stalled_for.is_some()
    });
    let shutdown = cluster.shutdown();
    store.release();
    match shutdown {
        Err(Error::CheckpointAbandoned { reason, .. }) => {
            assert!(reason.contains("input store"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Logged before the shutdown began, and left behind by it (`Closed`: the log keeps
    // it for the next open) unless the store answered before the shutdown gave up on
    // the instance waiting for it.
    let answer = hung.join().unwrap();
    assert!(matches!(answer, Ok(3) | Err(Error::Closed)), "{answer:?}");
}
