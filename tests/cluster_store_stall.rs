//! A call into the input store that does not return within the stall timeout is seen
//! by the supervisor: counted in `Metrics::store_stalls` (once per stall), shown in
//! `Metrics::store_stalled_for` while it lasts, and no instance is replaced for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

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

/// A `MemoryStore` whose next append (or, deferring, whose next wait for appended
/// records) sleeps `hang_ms` once armed.
#[derive(Default)]
struct Hangs {
    live: MemoryStore,
    /// Appends are deferred: `wait_appended` is where it hangs.
    defer: bool,
    armed: AtomicBool,
    hang_ms: AtomicU64,
}

impl Hangs {
    fn hang_if_armed(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(self.hang_ms.load(Ordering::SeqCst)));
        }
    }
}

impl Store for Hangs {
    fn append(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<Offset>> {
        if !self.defer {
            self.hang_if_armed();
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
            self.hang_if_armed();
        }
        Ok(())
    }
    common::forward_store_but_append!(live);
}

/// Polls `metrics` until `done` says so; panics after 10 s.
fn until(cluster: &Cluster<Sum>, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let since = Instant::now();
    loop {
        let m = cluster.metrics();
        if done(&m) {
            return m;
        }
        assert!(since.elapsed() < Duration::from_secs(10), "{what}: {m:?}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn a_hang_is_seen(defer: bool) {
    let store = Arc::new(Hangs {
        defer,
        ..Hangs::default()
    });
    let cluster = Cluster::builder(Sum)
        .stores(store.clone(), None)
        .instances(2)
        .stall_timeout(Duration::from_millis(100))
        .supervise_every(Duration::from_millis(5))
        .build()
        .unwrap();
    let client = cluster.client();
    assert_eq!(client.submit("k", 1).unwrap().wait().unwrap(), 1);
    let quiet = cluster.metrics();
    assert_eq!(quiet.store_stalls, 0);
    assert_eq!(quiet.store_stalled_for, None);

    store.hang_ms.store(700, Ordering::SeqCst);
    store.armed.store(true, Ordering::SeqCst);
    let hung = {
        let client = cluster.client();
        thread::spawn(move || client.submit("k", 2).and_then(|p| p.wait()))
    };
    let seen = until(&cluster, "the stall is seen", |m| {
        m.store_stalled_for.is_some()
    });
    assert_eq!(seen.store_stalls, 1, "{seen:?}");
    let stalled_for = seen.store_stalled_for.unwrap();
    assert!(stalled_for >= Duration::from_millis(100), "{seen:?}");
    assert!(stalled_for < Duration::from_millis(700), "{seen:?}");
    // Still one stall while it lasts, and longer.
    thread::sleep(Duration::from_millis(150));
    let later = cluster.metrics();
    assert_eq!(later.store_stalls, 1, "{later:?}");
    assert!(
        later.store_stalled_for.is_some_and(|d| d > stalled_for),
        "{later:?}"
    );

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
