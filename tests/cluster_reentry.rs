//! A handler (or a query function) that calls its own cluster is refused at once with
//! `Error::InsideHandler`, whichever way it calls: waiting there could wait for its own
//! instance (a stall, then the request run again, submitting again). Another cluster is
//! not its own: a handler may call it through `Context::call`.

use std::sync::{Arc, Barrier, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Client, Cluster, Context, Handler};

mod common;
use common::block_on;

/// Adds to a key; a request of `u64::MAX` tries every way to call its own cluster, and
/// answers how each went.
struct Calls {
    me: Arc<OnceLock<Client<Calls>>>,
    other: Option<Client<Plain>>,
}

/// How each call from inside the handler went: `true` if it was refused as a call from
/// inside a handler (with the instance and the offset), `false` otherwise.
#[derive(Debug, Default)]
struct Refusals(Vec<(&'static str, bool)>);

fn refused<T>(what: &'static str, outcome: cauce::Result<T>, at: u64, out: &mut Refusals) {
    let inside = matches!(
        outcome,
        Err(Error::InsideHandler { instance: Some(_), offset }) if offset == Some(at)
    );
    out.0.push((what, inside));
}

impl Handler for Calls {
    type State = u64;
    type Request = u64;
    type Response = (u64, Refusals);

    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> Self::Response {
        let mut out = Refusals::default();
        if add != u64::MAX {
            *total += add;
            return (*total, out);
        }
        let at = ctx.offset();
        let client = self.me.get().expect("client set");
        refused("submit", client.submit("b", 1), at, &mut out);
        refused("try_submit", client.try_submit("b", 1), at, &mut out);
        refused(
            "submit_batch",
            client.submit_batch([("b", 1)]),
            at,
            &mut out,
        );
        refused("request", block_on(client.request("b", 1)), at, &mut out);
        let batch = block_on(client.submit_batch_async([("b", 1), ("c", 2)]));
        refused("submit_batch_async", batch, at, &mut out);
        refused("query", client.query("b", |t: &u64| *t), at, &mut out);
        refused(
            "read",
            block_on(client.read("b", |t: &u64| *t)),
            at,
            &mut out,
        );
        if let Some(other) = &self.other {
            // Another cluster, through a journaled outside call: allowed.
            let other = other.clone();
            let answer = ctx.call("other", move |_| {
                other.submit("x", 5).and_then(|p| p.wait()).ok()
            });
            out.0.push(("other cluster", matches!(answer, Ok(Some(5)))));
        }
        (*total, out)
    }
}

/// A plain counter, the other cluster.
struct Plain;

impl Handler for Plain {
    type State = u64;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        *total += add;
        *total
    }
}

#[test]
fn a_handler_that_calls_its_own_cluster_is_refused_at_once() {
    let other = Cluster::builder(Plain).in_memory().build().unwrap();
    let me = Arc::new(OnceLock::new());
    let cluster = Cluster::builder(Calls {
        me: me.clone(),
        other: Some(other.client()),
    })
    .in_memory()
    .instances(1)
    .build()
    .unwrap();
    let client = cluster.client();
    assert!(me.set(client.clone()).is_ok());
    assert_eq!(client.submit("a", 3).unwrap().wait().unwrap().0, 3);
    let (total, refusals) = client.submit("a", u64::MAX).unwrap().wait().unwrap();
    assert_eq!(total, 3);
    for (what, inside) in &refusals.0 {
        if *what == "other cluster" {
            assert!(inside, "the other cluster's submit went through");
        } else {
            assert!(
                inside,
                "{what} was not refused as a call from inside a handler"
            );
        }
    }
    assert_eq!(refusals.0.len(), 8);
    // Nothing the handler tried was logged: the log holds the two requests only.
    let metrics = cluster.metrics();
    assert_eq!(metrics.requests(), 2);
    assert_eq!(metrics.stalls, 0);
    assert_eq!(client.query("b", |t: &u64| *t).unwrap().wait().unwrap(), 0);
    cluster.shutdown().unwrap();
    assert_eq!(
        other
            .client()
            .query("x", |t: &u64| *t)
            .unwrap()
            .wait()
            .unwrap(),
        5
    );
    other.shutdown().unwrap();
}

/// A query function that submits to its own cluster is refused too, whether it runs on
/// the key's instance or, for a key with no holder, on the caller's thread.
#[test]
fn a_query_function_that_calls_its_own_cluster_is_refused() {
    let me = Arc::new(OnceLock::new());
    let cluster = Cluster::builder(Calls {
        me: me.clone(),
        other: None,
    })
    .in_memory()
    .build()
    .unwrap();
    let client = cluster.client();
    assert!(me.set(client.clone()).is_ok());
    client.submit("held", 1).unwrap().wait().unwrap();
    for key in ["held", "never-seen"] {
        let inner = client.clone();
        let answer = client
            .query(key, move |_: &u64| inner.submit("b", 1).map(drop))
            .unwrap()
            .wait()
            .unwrap();
        assert!(
            matches!(answer, Err(Error::InsideHandler { offset: None, .. })),
            "{key}: {answer:?}"
        );
    }
    // Outside any handler the same client submits.
    assert_eq!(client.submit("b", 1).unwrap().wait().unwrap().0, 1);
    cluster.shutdown().unwrap();
}

#[test]
fn the_refusal_says_what_to_do() {
    let e = Error::InsideHandler {
        instance: Some(cauce::router::InstanceId(2)),
        offset: Some(41),
    };
    let message = e.to_string();
    assert!(
        message.contains("instance #2") && message.contains("offset 41"),
        "{message}"
    );
    assert!(message.contains("from outside the handler"), "{message}");
}

/// Holds a way to its own cluster and shuts it down from inside a request of 0.
struct Stops {
    me: Arc<OnceLock<Weak<Cluster<Stops>>>>,
    answer: Arc<Mutex<Option<cauce::Result<()>>>>,
}

impl Handler for Stops {
    type State = u64;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        if add == 0
            && let Some(cluster) = self.me.get().and_then(|c| c.upgrade())
        {
            *self.answer.lock().unwrap() = Some(cluster.shutdown());
        }
        *total += add;
        *total
    }
}

/// A handler that shuts its own cluster down would wait for its own instance to stop:
/// refused at once, and the cluster runs on (a shutdown from outside then stops it
/// promptly, not after stall timeouts).
#[test]
fn a_handler_that_shuts_its_own_cluster_down_is_refused() {
    let me = Arc::new(OnceLock::new());
    let answer = Arc::new(Mutex::new(None));
    let cluster = Arc::new(
        Cluster::builder(Stops {
            me: me.clone(),
            answer: answer.clone(),
        })
        .in_memory()
        .instances(1)
        // A stop that waited out the stall timeout would take 30 s; a prompt one takes
        // milliseconds. The 10 s limit below sits far from both, so a loaded machine
        // cannot make a prompt stop look slow.
        .stall_timeout(Duration::from_secs(30))
        .build()
        .unwrap(),
    );
    assert!(me.set(Arc::downgrade(&cluster)).is_ok());
    let client = cluster.client();
    assert_eq!(client.submit("a", 1).unwrap().wait().unwrap(), 1);
    assert_eq!(client.submit("a", 0).unwrap().wait().unwrap(), 1);
    let refused = answer.lock().unwrap().take();
    assert!(
        matches!(refused, Some(Err(Error::InsideHandler { .. }))),
        "{refused:?}"
    );
    assert_eq!(client.submit("a", 2).unwrap().wait().unwrap(), 3);
    let since = Instant::now();
    cluster.shutdown().unwrap();
    let took = since.elapsed();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
}

/// On a request of 0, upgrades its weak reference to its own cluster, lets the test drop
/// the other handles (`upgraded`, then `outside_dropped`), and drops the last one itself,
/// timing that drop.
struct Drops {
    me: Arc<OnceLock<Weak<Cluster<Drops>>>>,
    upgraded: Arc<Barrier>,
    outside_dropped: Arc<Barrier>,
    took: Arc<Mutex<Option<Duration>>>,
}

impl Drops {
    /// One whose barriers the test meets too.
    fn new() -> Drops {
        Drops {
            me: Arc::new(OnceLock::new()),
            upgraded: Arc::new(Barrier::new(2)),
            outside_dropped: Arc::new(Barrier::new(2)),
            took: Arc::new(Mutex::new(None)),
        }
    }

    fn handles(&self) -> Drops {
        Drops {
            me: self.me.clone(),
            upgraded: self.upgraded.clone(),
            outside_dropped: self.outside_dropped.clone(),
            took: self.took.clone(),
        }
    }

    /// Drops `cluster`, this handler's only handle outside, while the request `pending`
    /// holds the last one inside the handler; returns once the handler has dropped it.
    fn drop_inside(&self, cluster: Arc<Cluster<Drops>>, pending: cauce::client::Pending<u64>) {
        self.upgraded.wait();
        drop(cluster);
        self.outside_dropped.wait();
        // Its own instance was left behind by the stop it ran in: answered or not.
        drop(pending.wait());
    }
}

impl Handler for Drops {
    type State = u64;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        // (A cluster opened again replays this request with no reference to take.)
        if let Some(cluster) = self.me.get().and_then(|c| c.upgrade()).filter(|_| add == 0) {
            self.upgraded.wait();
            self.outside_dropped.wait();
            // The last handle: its drop runs here.
            let since = Instant::now();
            drop(cluster);
            *self.took.lock().unwrap() = Some(since.elapsed());
        }
        *total += add;
        *total
    }
}

/// The last handle of a cluster dropped inside one of its handlers (it upgraded a weak
/// reference, and the outside dropped its own meanwhile) still stops the cluster: the
/// drop is not refused as a shutdown is, it waits for its own instance a grace period,
/// leaves it behind, and releases the directory.
#[test]
fn the_last_handle_dropped_inside_a_handler_still_stops_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let drops = Drops::new();
    let cluster = Arc::new(
        Cluster::builder(drops.handles())
            .dir(dir.path())
            .instances(1)
            .stall_timeout(Duration::from_secs(2))
            .build()
            .unwrap(),
    );
    assert!(drops.me.set(Arc::downgrade(&cluster)).is_ok());
    let client = cluster.client();
    assert_eq!(client.submit("a", 1).unwrap().wait().unwrap(), 1);
    let pending = client.submit("a", 0).unwrap();
    drops.drop_inside(cluster, pending);
    drop(client);
    // The directory is released once the cluster stopped: open it again.
    let since = Instant::now();
    let reopened = loop {
        let r = Cluster::builder(Drops::new())
            .dir(dir.path())
            .instances(1)
            .build();
        match r {
            Ok(c) => break Ok(c),
            Err(e) if since.elapsed() > Duration::from_secs(10) => break Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let reopened = reopened.unwrap_or_else(|e| {
        panic!("the cluster dropped inside its handler never stopped: the directory is still held after 10 s: {e}")
    });
    let total = reopened
        .client()
        .query("a", |t: &u64| *t)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(total, 1);
    reopened.shutdown().unwrap();
}

/// The same drop while a checkpoint round waits for the handler's instance: leaving the
/// instance behind gives the round up, so the drop (which joins the round's thread)
/// returns after about one grace period; it waited for the round's timeout (9.7 s with
/// a 2 s stall timeout) before.
#[test]
fn a_drop_inside_a_handler_during_a_checkpoint_round_returns_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let drops = Drops::new();
    let cluster = Arc::new(
        Cluster::builder(drops.handles())
            .dir(dir.path())
            .instances(2)
            .stall_timeout(Duration::from_secs(2))
            .checkpoint_every(1)
            .supervise_every(Duration::from_millis(10))
            .build()
            .unwrap(),
    );
    assert!(drops.me.set(Arc::downgrade(&cluster)).is_ok());
    let client = cluster.client();
    assert_eq!(client.submit("a", 1).unwrap().wait().unwrap(), 1);
    std::thread::sleep(Duration::from_millis(200));
    let home = cluster.owner_of("a").unwrap();
    let other = (0..1000)
        .map(|i| format!("b{i}"))
        .find(|k| cluster.owner_of(k).is_some_and(|o| o != home))
        .unwrap();
    let pending = client.submit("a", 0).unwrap();
    drops.upgraded.wait();
    // Handled elsewhere: a checkpoint falls due, its round waits for "a"'s instance.
    client.submit(&other, 1).unwrap().wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(cluster);
    drops.outside_dropped.wait();
    drop(pending.wait());
    drop(client);
    let since = Instant::now();
    while drops.took.lock().unwrap().is_none() && since.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = drops
        .took
        .lock()
        .unwrap()
        .expect("the drop never returned within 60 s");
    assert!(
        took < Duration::from_secs(5),
        "the drop inside the handler took {took:?} (grace 2 s): it waited out the checkpoint round"
    );
}
