//! A rebuild that cannot read the log. When an instance is lost, the new owner of each
//! of its keys rebuilds the key's state from the checkpoint and the log, then answers the
//! requests the lost instance still held. If the log cannot be read, those requests are
//! answered [`Error::StateUnavailable`] at once (not at shutdown), requests of other keys
//! are handled as usual, and the key is rebuilt again on its next request: once the store
//! reads again, its state is the fold of every logged request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler, Pending};
use cauce::router::InstanceId;
use cauce::store::MemoryStore;

mod common;
use common::Unreadable;

/// Adds the request to the key's total. The first request of 7 breaks `input` (when
/// given), then waits until `release` is set (at most a minute), long enough for its
/// instance to be declared stalled.
#[derive(Clone, Default)]
struct Svc {
    release: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    /// Broken by the handler as it begins to hang, so that the log is unreadable before
    /// the stall can be declared: a test thread that breaks it after its submits can be
    /// descheduled past the stall timeout first.
    input: Option<Arc<Unreadable>>,
}

impl Handler for Svc {
    type State = u64;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        if add == 7 && !self.stalled.swap(true, Ordering::SeqCst) {
            if let Some(input) = &self.input {
                input.broken.store(true, Ordering::SeqCst);
            }
            let since = Instant::now();
            while !self.release.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        *total += add;
        *total
    }
}

/// How long any answer may take: far more than a rebuild of a few records (and than a
/// loaded machine's delays), far less than forever (the stuck request waits a minute).
const PROMPTLY: Duration = Duration::from_secs(20);

/// A cluster of two instances whose instance holding `"k"` is stuck in the first of
/// `queued + 1` requests of `"k"`, with the input log broken before the stall is noticed:
/// the rebuild of `"k"` on its new owner fails.
struct Broken {
    cluster: Cluster<Svc>,
    input: Arc<Unreadable>,
    release: Arc<AtomicBool>,
    /// The requests of `"k"`: the stuck one first, then the ones queued behind it.
    orphans: Vec<Pending<u64>>,
    /// One request of each of some keys of the other instance, submitted with them.
    bystanders: Vec<(String, Pending<u64>)>,
}

fn break_a_rebuild(queued: usize) -> Broken {
    let input = Arc::new(Unreadable {
        live: MemoryStore::new(),
        broken: AtomicBool::new(false),
    });
    let svc = Svc {
        input: Some(input.clone()),
        ..Svc::default()
    };
    let release = svc.release.clone();
    // 1 s: the tests count stalls exactly, and a unit of work descheduled for a few
    // hundred ms on a loaded machine must not be taken for one.
    let cluster = Cluster::builder(svc)
        .stores(input.clone(), None)
        .instances(2)
        .stall_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let client = cluster.client();
    let stuck_on = client.owner_of("k").unwrap();
    let mut orphans = vec![client.submit("k", 7).unwrap()];
    orphans.extend((0..queued).map(|_| client.submit("k", 1).unwrap()));
    let bystanders: Vec<(String, Pending<u64>)> = (0..1_000)
        .map(|i| format!("b{i}"))
        .filter(|k| client.owner_of(k) != Some(stuck_on))
        .take(5)
        .map(|k| {
            let p = client.submit(&k, 1).unwrap();
            (k, p)
        })
        .collect();
    // The handler of 7 broke the log as it began to hang.
    let since = Instant::now();
    while cluster.metrics().stalls == 0 && since.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(cluster.metrics().stalls, 1, "instance {stuck_on} was lost");
    assert!(!cluster.members().contains(&stuck_on));
    Broken {
        cluster,
        input,
        release,
        orphans,
        bystanders,
    }
}

/// The error a request of the key whose rebuild failed must get: typed, naming the
/// store's failure.
fn assert_unavailable(answer: cauce::Result<u64>, what: &str) {
    match answer {
        Err(Error::StateUnavailable { reason, .. }) => assert!(
            reason.contains("injected read failure"),
            "{what}: the reason does not say what failed: {reason}"
        ),
        Err(Error::Timeout(t)) => panic!("{what}: not answered within {t:?}"),
        other => panic!("{what}: expected StateUnavailable, got {other:?}"),
    }
}

#[test]
fn requests_waiting_on_a_failed_rebuild_are_answered_at_once_and_others_handled() {
    let broken = break_a_rebuild(20);
    for (i, p) in broken.orphans.iter().enumerate() {
        assert_unavailable(p.wait_timeout(PROMPTLY), &format!("orphan {i}"));
    }
    for (key, p) in &broken.bystanders {
        assert_eq!(p.wait_timeout(PROMPTLY).unwrap(), 1, "bystander {key}");
    }
    // Keys that were never on the lost instance, wherever they are placed (the owner
    // whose rebuild failed included), are handled as usual while the log is unreadable.
    let client = broken.cluster.client();
    let owners: std::collections::BTreeSet<InstanceId> = (0..40)
        .map(|i| {
            let key = format!("fresh{i}");
            assert_eq!(
                client
                    .submit(&key, 2)
                    .unwrap()
                    .wait_timeout(PROMPTLY)
                    .unwrap(),
                2,
                "{key}"
            );
            client.owner_of(&key).unwrap()
        })
        .collect();
    assert!(owners.contains(&client.owner_of("k").unwrap()));
    broken.release.store(true, Ordering::SeqCst);
    broken.input.broken.store(false, Ordering::SeqCst);
    broken.cluster.shutdown().unwrap();
}

#[test]
fn a_key_whose_rebuild_failed_is_rebuilt_again_by_its_next_request() {
    let broken = break_a_rebuild(20);
    for p in &broken.orphans {
        assert_unavailable(p.wait_timeout(PROMPTLY), "orphan");
    }
    let client = broken.cluster.client();
    // While the log stays unreadable, every try fails the same way, at once.
    assert_unavailable(
        client.submit("k", 1).unwrap().wait_timeout(PROMPTLY),
        "a later request",
    );
    // Once it reads again, the key is rebuilt from the log (tries are spaced a little
    // apart: requests of 0 until one is served): every logged request is in its state,
    // the refused ones included (7, then 20 + 1 ones), and checkpoints work.
    broken.input.broken.store(false, Ordering::SeqCst);
    let since = Instant::now();
    let total = loop {
        match client.submit("k", 0).unwrap().wait_timeout(PROMPTLY) {
            Err(Error::StateUnavailable { .. }) if since.elapsed() < PROMPTLY => {
                std::thread::sleep(Duration::from_millis(10))
            }
            answer => break answer.unwrap(),
        }
    };
    assert_eq!(total, 28);
    broken.cluster.checkpoint().unwrap();
    assert_eq!(
        client
            .submit("k", 2)
            .unwrap()
            .wait_timeout(PROMPTLY)
            .unwrap(),
        30
    );
    broken.release.store(true, Ordering::SeqCst);
    broken.cluster.shutdown().unwrap();
}
