//! Queries (`Client::query`): a read of one key's state, run by the instance that holds
//! it between the key's requests, logged nowhere. What a query sees is the fold of the
//! key's requests before its `Pending::offset()`; a panicking query changes nothing; a
//! query that stalls is answered `QueryStalled` and the queries queued behind it are run
//! by the keys' new owners; scaling, restarts and full queues behave as for requests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::MemoryStore;

mod common;
use common::{Unreadable, wait_for};

/// Each key's state is the list of the requests it was sent, in order. A request of
/// `u64::MAX` breaks `input` (when given), then waits until `release` is set (at most a
/// minute), the first time only.
#[derive(Clone, Default)]
struct Lists {
    release: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    /// Broken by the handler as it begins to hang: the log is then unreadable before
    /// the stall can be declared (a test thread that breaks it after its submit can be
    /// descheduled past the stall timeout first).
    input: Option<Arc<Unreadable>>,
}

impl Handler for Lists {
    type State = Vec<u64>;
    type Request = u64;
    type Response = usize;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], list: &mut Vec<u64>, v: u64) -> usize {
        if v == u64::MAX && !self.held.swap(true, Ordering::SeqCst) {
            if let Some(input) = &self.input {
                input.broken.store(true, Ordering::SeqCst);
            }
            wait_for(&self.release, Duration::from_secs(60));
        }
        list.push(v);
        list.len()
    }
}

const PROMPTLY: Duration = Duration::from_secs(10);

/// The stall timeout of the tests that stall an instance on purpose and then count
/// stalls, or expect the replacement to answer: a unit of work descheduled for a few
/// hundred ms on a loaded machine must not be a stall of its own (a second stall of an
/// unanswered request sets it aside).
const STALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Submitters and readers race on a few keys while instances join and leave: every
/// query returns exactly the requests of its key logged before its offset, in order.
#[test]
fn a_query_sees_exactly_the_requests_before_its_offset_while_keys_move() {
    let cluster = Cluster::builder(Lists::default())
        .in_memory()
        .instances(2)
        .build()
        .unwrap();
    let keys: Vec<String> = (0..6).map(|i| format!("key-{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let client = cluster.client();
        let keys = keys.clone();
        writers.push(std::thread::spawn(move || {
            // (key, offset, value) of every request submitted.
            let mut sent = Vec::new();
            for i in 0..3_000u64 {
                let key = &keys[(i as usize * 7 + w as usize) % keys.len()];
                let v = w * 1_000_000 + i;
                let p = client.submit(key, v).unwrap();
                sent.push((key.clone(), p.offset(), v));
                if i % 64 == 0 {
                    p.wait().unwrap();
                }
            }
            sent
        }));
    }
    let reader = {
        let client = cluster.client();
        let keys = keys.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let key = &keys[i % keys.len()];
                let p = client.query(key, |list: &Vec<u64>| list.clone()).unwrap();
                let at = p.offset();
                seen.push((key.clone(), at, p.wait_timeout(PROMPTLY).unwrap()));
                i += 1;
            }
            seen
        })
    };
    let mut added = Vec::new();
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(15));
        if round % 2 == 0 {
            added.push(cluster.add_instance(1).unwrap());
        } else if let Some(id) = added.pop() {
            cluster.remove_instance(id).unwrap();
        }
    }
    let mut sent: Vec<(String, u64, u64)> = Vec::new();
    for w in writers {
        sent.extend(w.join().unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let seen = reader.join().unwrap();
    assert!(seen.len() > 10, "only {} queries ran", seen.len());
    assert!(cluster.metrics().moved_keys > 0, "no key moved");
    let mut by_key: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for (key, offset, v) in &sent {
        by_key.entry(key).or_default().push((*offset, *v));
    }
    by_key.values_mut().for_each(|l| l.sort());
    for (key, at, list) in &seen {
        let expected: Vec<u64> = by_key
            .get(key.as_str())
            .map(|l| l.iter().filter(|(o, _)| o < at).map(|(_, v)| *v).collect())
            .unwrap_or_default();
        assert_eq!(
            list, &expected,
            "query of {key} at offset {at} saw another state"
        );
    }
    // And at the end each key holds every request.
    let client = cluster.client();
    for (key, expected) in &by_key {
        let list = client
            .query(key, |l: &Vec<u64>| l.clone())
            .unwrap()
            .wait()
            .unwrap();
        let expected: Vec<u64> = expected.iter().map(|(_, v)| *v).collect();
        assert_eq!(list, expected, "final state of {key}");
    }
    cluster.shutdown().unwrap();
}

#[test]
fn a_query_logs_nothing_and_an_unknown_key_reads_the_default_state() {
    let cluster = Cluster::builder(Lists::default())
        .in_memory()
        .instances(2)
        .build()
        .unwrap();
    let client = cluster.client();
    client.submit("a", 1).unwrap().wait().unwrap();
    let before = cluster.metrics().next_offset;
    for _ in 0..100 {
        assert_eq!(
            client
                .query("a", |l: &Vec<u64>| l.len())
                .unwrap()
                .wait()
                .unwrap(),
            1
        );
    }
    let unknown = client.query("never", |l: &Vec<u64>| l.clone()).unwrap();
    assert!(
        unknown.is_ready(),
        "an unknown key is read on the calling thread"
    );
    assert_eq!(unknown.wait().unwrap(), Vec::<u64>::new());
    let m = cluster.metrics();
    assert_eq!(m.next_offset, before, "a query appended to the log");
    // The 100 ran on an instance; the unknown key's on this thread.
    assert_eq!(m.instances.iter().map(|i| i.queries).sum::<u64>(), 100);
    assert_eq!(m.instances.iter().map(|i| i.requests).sum::<u64>(), 1);
    // The unknown key was not placed: its first request is placed as usual.
    assert_eq!(client.submit("never", 5).unwrap().wait().unwrap(), 1);
    cluster.shutdown().unwrap();
}

#[test]
fn a_panicking_query_is_answered_and_changes_nothing() {
    let cluster = Cluster::builder(Lists::default())
        .in_memory()
        .instances(2)
        .build()
        .unwrap();
    let client = cluster.client();
    drop(client.submit("a", 1).unwrap());
    let owner = client.owner_of("a").unwrap();
    let panicked = client
        .query("a", |_: &Vec<u64>| -> usize { panic!("no such field") })
        .unwrap()
        .wait();
    match panicked {
        Err(Error::QueryPanicked {
            instance,
            key,
            message,
        }) => {
            assert_eq!(instance, Some(owner));
            assert_eq!(key, "a");
            assert!(message.contains("no such field"), "{message}");
        }
        other => panic!("expected QueryPanicked, got {other:?}"),
    }
    // Panics on the calling thread (a key with no state) are answered the same way.
    match client
        .query("b", |_: &Vec<u64>| -> usize { panic!("here") })
        .unwrap()
        .wait()
    {
        Err(Error::QueryPanicked { instance: None, .. }) => {}
        other => panic!("expected QueryPanicked on the caller's thread, got {other:?}"),
    }
    assert_eq!(client.submit("a", 2).unwrap().wait().unwrap(), 2);
    let m = cluster.metrics();
    assert!(m.instances.iter().all(|i| i.restarts == 0), "{m:?}");
    assert_eq!(
        client
            .query("a", |l: &Vec<u64>| l.clone())
            .unwrap()
            .wait()
            .unwrap(),
        [1, 2]
    );
    cluster.shutdown().unwrap();
}

/// A query that runs past the stall timeout is answered `QueryStalled`; the queries and
/// requests queued behind it are answered by the key's new owner, from its rebuilt state.
#[test]
fn a_stalled_query_is_answered_and_what_queued_behind_it_runs_on_the_new_owner() {
    let cluster = Cluster::builder(Lists::default())
        .in_memory()
        .instances(2)
        .stall_timeout(STALL_TIMEOUT)
        .build()
        .unwrap();
    let client = cluster.client();
    client.submit("k", 1).unwrap().wait().unwrap();
    let owner = client.owner_of("k").unwrap();
    let release = Arc::new(AtomicBool::new(false));
    let stuck = {
        let release = release.clone();
        client
            .query("k", move |l: &Vec<u64>| {
                wait_for(&release, Duration::from_secs(60));
                l.len()
            })
            .unwrap()
    };
    let request = client.submit("k", 2).unwrap();
    let behind = client.query("k", |l: &Vec<u64>| l.clone()).unwrap();
    let last = client.submit("k", 3).unwrap();
    match stuck.wait_timeout(PROMPTLY) {
        Err(Error::QueryStalled { instance, key, .. }) => {
            assert_eq!(instance, owner);
            assert_eq!(key, "k");
        }
        other => panic!("expected QueryStalled, got {other:?}"),
    }
    assert_eq!(request.wait_timeout(PROMPTLY).unwrap(), 2);
    // Queued behind the request: it sees it (and, run on the new owner after the
    // rebuild, possibly the later one too).
    let list = behind.wait_timeout(PROMPTLY).unwrap();
    assert!(list == [1, 2] || list == [1, 2, 3], "{list:?}");
    assert_eq!(last.wait_timeout(PROMPTLY).unwrap(), 3);
    assert_eq!(cluster.metrics().stalls, 1);
    assert!(!cluster.members().contains(&owner));
    // The stalled one wakes up: its answer is dropped, nothing changes.
    release.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        client
            .query("k", |l: &Vec<u64>| l.clone())
            .unwrap()
            .wait()
            .unwrap(),
        [1, 2, 3]
    );
    cluster.shutdown().unwrap();
}

/// Queries queued behind a request that stalls its instance are run by the key's new
/// owner once the key is rebuilt, not lost, and not answered with the stall.
#[test]
fn queries_queued_on_a_lost_instance_run_on_the_new_owner() {
    let svc = Lists::default();
    let release = svc.release.clone();
    let cluster = Cluster::builder(svc)
        .in_memory()
        .instances(2)
        .stall_timeout(STALL_TIMEOUT)
        .build()
        .unwrap();
    let client = cluster.client();
    client.submit("k", 1).unwrap().wait().unwrap();
    let owner = client.owner_of("k").unwrap();
    let stuck = client.submit("k", u64::MAX).unwrap();
    let queries: Vec<_> = (0..20)
        .map(|_| client.query("k", |l: &Vec<u64>| l.clone()).unwrap())
        .collect();
    for q in queries {
        assert_eq!(q.wait_timeout(PROMPTLY).unwrap(), [1, u64::MAX]);
    }
    // The request itself stalled once: its new owner applied it.
    assert_eq!(stuck.wait_timeout(PROMPTLY).unwrap(), 2);
    assert!(!cluster.members().contains(&owner));
    release.store(true, Ordering::SeqCst);
    cluster.shutdown().unwrap();
}

#[test]
fn a_full_queue_refuses_try_query_and_holds_query_until_there_is_room() {
    let svc = Lists::default();
    let release = svc.release.clone();
    let cluster = Cluster::builder(svc)
        .in_memory()
        .instances(1)
        .queue_capacity(4)
        .stall_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let client = cluster.client();
    let mut pending = vec![client.submit("k", u64::MAX).unwrap()];
    // The instance is on the first one; fill the queue behind it.
    while let Ok(p) = client.try_submit("k", 1) {
        pending.push(p);
    }
    match client.try_query("k", |l: &Vec<u64>| l.len()) {
        Err(Error::Busy { capacity: 4, .. }) => {}
        other => panic!("expected Busy, got {:?}", other.map(|_| ())),
    }
    let waiting = {
        let client = cluster.client();
        std::thread::spawn(move || client.query("k", |l: &Vec<u64>| l.len()).unwrap().wait())
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiting.is_finished(), "a query found room in a full queue");
    release.store(true, Ordering::SeqCst);
    let n = pending.len();
    assert_eq!(waiting.join().unwrap().unwrap(), n);
    cluster.shutdown().unwrap();
}

#[test]
fn query_async_waits_for_room_without_blocking_and_resolves_to_the_answer() {
    let cluster = Cluster::builder(Lists::default())
        .in_memory()
        .instances(2)
        .build()
        .unwrap();
    let client = cluster.client();
    drop(client.submit("a", 4).unwrap());
    let list = common::block_on(async {
        client
            .query_async("a", |l: &Vec<u64>| l.clone())
            .await?
            .await
    })
    .unwrap();
    assert_eq!(list, [4]);
    cluster.shutdown().unwrap();
}

#[test]
fn a_query_after_a_restart_reads_the_recovered_state_and_after_shutdown_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Lists::default())
        .dir(dir.path())
        .instances(3)
        .build()
        .unwrap();
    let client = cluster.client();
    for v in 0..50 {
        drop(client.submit(format!("k{}", v % 5), v).unwrap());
    }
    let stale = cluster.client();
    cluster.shutdown().unwrap();
    assert!(matches!(
        stale.query("k0", |l: &Vec<u64>| l.len()),
        Err(Error::Closed)
    ));
    let cluster = Cluster::builder(Lists::default())
        .dir(dir.path())
        .instances(2)
        .build()
        .unwrap();
    let client = cluster.client();
    for k in 0..5u64 {
        let list = client
            .query(format!("k{k}"), |l: &Vec<u64>| l.clone())
            .unwrap()
            .wait()
            .unwrap();
        let expected: Vec<u64> = (0..50).filter(|v| v % 5 == k).collect();
        assert_eq!(list, expected);
    }
    cluster.shutdown().unwrap();
}

/// A key whose rebuild failed: a query of it is refused `StateUnavailable` (its state
/// is not guessed), and once the log reads again it is rebuilt and read.
#[test]
fn a_query_of_a_key_whose_rebuild_failed_is_refused_then_served_once_it_rebuilds() {
    let input = Arc::new(Unreadable {
        live: MemoryStore::new(),
        broken: AtomicBool::new(false),
    });
    let svc = Lists {
        input: Some(input.clone()),
        ..Lists::default()
    };
    let release = svc.release.clone();
    let cluster = Cluster::builder(svc)
        .stores(input.clone(), None)
        .instances(2)
        .stall_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let client = cluster.client();
    client.submit("k", 1).unwrap().wait().unwrap();
    // Its handler breaks the log as it begins to hang.
    let stuck = client.submit("k", u64::MAX).unwrap();
    assert!(matches!(
        stuck.wait_timeout(PROMPTLY),
        Err(Error::StateUnavailable { .. })
    ));
    match client
        .query("k", |l: &Vec<u64>| l.clone())
        .unwrap()
        .wait_timeout(PROMPTLY)
    {
        Err(Error::StateUnavailable { reason, .. }) => {
            assert!(reason.contains("injected read failure"), "{reason}")
        }
        other => panic!("expected StateUnavailable, got {other:?}"),
    }
    input.broken.store(false, Ordering::SeqCst);
    release.store(true, Ordering::SeqCst);
    // Rebuilt again on a later use (at most every 100 ms), from the whole log.
    let since = Instant::now();
    loop {
        match client
            .query("k", |l: &Vec<u64>| l.clone())
            .unwrap()
            .wait_timeout(PROMPTLY)
        {
            Ok(list) => {
                assert_eq!(list, [1, u64::MAX]);
                break;
            }
            Err(Error::StateUnavailable { .. }) if since.elapsed() < PROMPTLY => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => panic!("expected the rebuilt state, got {other:?}"),
        }
    }
    cluster.shutdown().unwrap();
}

/// A query's offset names the state it read: `Replay::state_before(key, offset)`
/// rebuilds the same state from the logs, beside the running service.
#[test]
fn replay_rebuilds_the_state_a_query_read_from_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Lists::default())
        .dir(dir.path())
        .instances(2)
        .checkpoint_every(7)
        .build()
        .unwrap();
    let client = cluster.client();
    let mut read = Vec::new();
    for v in 0..60u64 {
        drop(client.submit(format!("k{}", v % 3), v).unwrap());
        if v % 10 == 4 {
            let key = format!("k{}", v % 3);
            let p = client.query(&key, |l: &Vec<u64>| l.clone()).unwrap();
            read.push((key, p.offset(), p.wait().unwrap()));
        }
    }
    let replay = cauce::cluster::Replay::open(dir.path(), Lists::default()).unwrap();
    for (key, at, list) in &read {
        assert_eq!(
            &replay.state_before(key, *at).unwrap(),
            list,
            "{key} at {at}"
        );
    }
    drop(replay);
    cluster.shutdown().unwrap();
}

/// The async calls' futures own what they need: they can be spawned (here on a thread
/// of their own) after the client that made them is gone.
#[test]
fn async_futures_are_send_and_static_and_read_awaits_the_answer() {
    fn spawn<F>(fut: F) -> std::thread::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        std::thread::spawn(move || common::block_on(fut))
    }
    let cluster = Cluster::builder(Lists::default())
        .in_memory()
        .instances(2)
        .build()
        .unwrap();
    let client = cluster.client();
    let wrote = spawn(client.request("a", 7));
    let batch = spawn(client.submit_batch_async([("b", 1), ("b", 2)]));
    let submitted = spawn(client.submit_async("c", 3));
    drop(client);
    assert_eq!(wrote.join().unwrap().unwrap(), 1);
    let answers: Vec<usize> = batch
        .join()
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|p| p.wait().unwrap())
        .collect();
    assert_eq!(answers, [1, 2]);
    assert_eq!(submitted.join().unwrap().unwrap().wait().unwrap(), 1);
    let client = cluster.client();
    let read = spawn(client.read("b", |l: &Vec<u64>| l.clone()));
    let queried = spawn(client.query_async("a", |l: &Vec<u64>| l.len()));
    assert_eq!(read.join().unwrap().unwrap(), [1, 2]);
    assert_eq!(queried.join().unwrap().unwrap().wait().unwrap(), 1);
    cluster.shutdown().unwrap();
}
