//! The cluster's life around its edges: a build that fails half way, a member that
//! cannot start, an instance removed while it drains, and stops that meet panicking,
//! stuck or rebuilding instances. Whatever happens, every accepted request is answered,
//! no thread runs on after the cluster is gone, and the counts add up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler, Pending};
use cauce::launcher::{Launcher, Running, ThreadLauncher};
use cauce::router::InstanceId;

/// Adds the request to the key's total. Requests of 7 wait until `release` is set (at
/// most a minute); requests of 99 panic; every request first sleeps `pause`.
#[derive(Clone, Default)]
struct Svc {
    pause: Duration,
    release: Arc<AtomicBool>,
    /// Whether only the first request of 7 waits (the others are handled at once).
    stall_once: bool,
    stalled: Arc<AtomicBool>,
    handled: Arc<AtomicU64>,
}

impl Handler for Svc {
    type State = u64;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        self.handled.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.pause);
        let wait = add == 7 && !(self.stall_once && self.stalled.swap(true, Ordering::SeqCst));
        let since = Instant::now();
        while wait
            && !self.release.load(Ordering::SeqCst)
            && since.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(add, 99, "asked to panic");
        *total += add;
        *total
    }
}

/// Starts instances on threads, but refuses the launch numbered `fail_at` (from 0);
/// counts the instance loops it started that still run.
struct Flaky {
    launches: AtomicUsize,
    fail_at: usize,
    running: Arc<AtomicUsize>,
}

impl Flaky {
    fn failing_at(fail_at: usize) -> Self {
        Flaky {
            launches: AtomicUsize::new(0),
            fail_at,
            running: Arc::default(),
        }
    }
}

impl Launcher for Flaky {
    fn launch(
        &self,
        id: InstanceId,
        body: Box<dyn FnOnce() + Send>,
    ) -> cauce::Result<Box<dyn Running>> {
        if self.launches.fetch_add(1, Ordering::SeqCst) == self.fail_at {
            return Err(Error::Config("launch refused by the test".into()));
        }
        let running = self.running.clone();
        running.fetch_add(1, Ordering::SeqCst);
        ThreadLauncher::new().launch(
            id,
            Box::new(move || {
                body();
                running.fetch_sub(1, Ordering::SeqCst);
            }),
        )
    }
}

/// Waits for every pending answer (at most `limit` each), counting them by outcome.
fn outcomes(
    pendings: Vec<Pending<u64>>,
    limit: Duration,
) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for p in pendings {
        let what = match p.wait_timeout(limit) {
            Ok(_) => "ok".to_string(),
            Err(Error::Timeout(_)) => "never answered".to_string(),
            Err(e) => format!("{e:?}")
                .split([' ', '(', '{'])
                .next()
                .unwrap()
                .to_string(),
        };
        *seen.entry(what).or_default() += 1;
    }
    seen
}

/// Two instances in memory, one declared stalled after 300 ms in one request.
fn two_instances_stalled_after_300ms(svc: Svc) -> Cluster<Svc> {
    Cluster::builder(svc)
        .in_memory()
        .instances(2)
        .stall_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

#[test]
fn a_build_that_fails_half_way_stops_what_it_started_and_frees_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = Flaky::failing_at(2);
    let running = flaky.running.clone();
    let built = Cluster::builder(Svc::default())
        .dir(dir.path())
        .instances(3)
        .launcher(flaky)
        .build();
    assert!(matches!(built, Err(Error::Config(_))));
    // The two instances that started have stopped by the time build returns.
    assert_eq!(running.load(Ordering::SeqCst), 0);
    let again = Cluster::builder(Svc::default())
        .dir(dir.path())
        .instances(1)
        .build()
        .expect("the directory of a failed build opens again");
    assert_eq!(again.client().submit("k", 2).unwrap().wait().unwrap(), 2);
    again.shutdown().unwrap();
}

#[test]
fn an_instance_that_cannot_start_is_not_left_as_a_member() {
    let cluster = Cluster::builder(Svc::default())
        .in_memory()
        .instances(2)
        .launcher(Flaky::failing_at(2))
        .build()
        .unwrap();
    let client = cluster.client();
    assert_eq!(client.submit("a", 1).unwrap().wait().unwrap(), 1);
    assert!(cluster.add_instance(1).is_err());
    assert_eq!(cluster.members(), vec![InstanceId(0), InstanceId(1)]);
    assert_eq!(cluster.metrics().instances.len(), 2);
    // Checkpoints wait for no phantom part.
    cluster.checkpoint().expect("a checkpoint");
    assert_eq!(client.submit("a", 1).unwrap().wait().unwrap(), 2);
    cluster.shutdown().unwrap();
}

#[test]
fn requests_a_removed_instance_drains_are_counted_once() {
    let svc = Svc {
        pause: Duration::from_millis(2),
        ..Svc::default()
    };
    let cluster = Cluster::builder(svc)
        .in_memory()
        .instances(2)
        .build()
        .unwrap();
    let client = cluster.client();
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("k{i}"))
        .filter(|k| client.owner_of(k) == Some(InstanceId(0)))
        .take(20)
        .collect();
    let pendings: Vec<_> = (0..200)
        .map(|i| client.submit(&keys[i % keys.len()], 1).unwrap())
        .collect();
    cluster.remove_instance(InstanceId(0)).unwrap();
    let counted = |m: cauce::cluster::Metrics| m.requests();
    // While the removed instance drains, and after its loop ended.
    assert!(counted(cluster.metrics()) <= 200);
    assert_eq!(
        outcomes(pendings, Duration::from_secs(30)).get("ok"),
        Some(&200)
    );
    assert_eq!(counted(cluster.metrics()), 200);
    // The supervisor's tick sees the removed loop end, and counts it as gone.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counted(cluster.metrics()), 200);
    cluster.shutdown().unwrap();
}

#[test]
fn no_instance_runs_on_after_a_dropped_cluster_when_a_handler_panics_as_it_drains() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Svc {
        pause: Duration::from_millis(3),
        ..Svc::default()
    };
    let handled = svc.handled.clone();
    let cluster = Cluster::builder(svc.clone())
        .dir(dir.path())
        .instances(1)
        // A stop gives its instances the stall timeout to drain (the default 5 s). The
        // drain here is 100 requests of 3 ms and two panics, each printing a backtrace
        // (the first one slow, over 200 ms on a loaded machine): a descheduled instance
        // could outlast 5 s and be left behind. 30 s keeps the drain well inside it.
        .stall_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let client = cluster.client();
    let pendings: Vec<_> = (0..100)
        .map(|i| {
            client
                .submit("k", if i == 60 || i == 90 { 99 } else { 1 })
                .unwrap()
        })
        .collect();
    drop(cluster);
    let after_drop = handled.load(Ordering::SeqCst);
    let seen = outcomes(pendings, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        handled.load(Ordering::SeqCst),
        after_drop,
        "a handler ran after drop returned"
    );
    // Both panics were met while draining (each restarting the instance), and every
    // other request was handled: none was cut off by a closed log.
    assert_eq!(seen.get("ok"), Some(&98), "{seen:?}");
    assert_eq!(seen.get("HandlerPanicked"), Some(&2), "{seen:?}");
    let again = Cluster::builder(svc)
        .dir(dir.path())
        .instances(1)
        .build()
        .unwrap();
    assert_eq!(again.client().submit("k", 0).unwrap().wait().unwrap(), 98);
    again.shutdown().unwrap();
}

#[test]
fn requests_of_a_lost_instance_are_answered_when_the_cluster_stops_before_their_rebuild() {
    let svc = Svc {
        pause: Duration::from_millis(20),
        stall_once: true,
        ..Svc::default()
    };
    let release = svc.release.clone();
    let cluster = two_instances_stalled_after_300ms(svc);
    let client = cluster.client();
    let mut pendings = vec![client.submit("k", 7).unwrap()];
    pendings.extend((0..300).map(|_| client.submit("k", 1).unwrap()));
    let since = Instant::now();
    while cluster.metrics().stalls == 0 && since.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        cluster.metrics().stalls,
        1,
        "the instance was declared stalled"
    );
    // The new owner rebuilds the key request by request (20 ms each): cut it short.
    std::thread::sleep(Duration::from_millis(100));
    drop(cluster);
    // Only a bound against a hang: the promise is that each is answered at all (and some
    // `Closed`, checked below, which a stop that waited out the whole 6 s rebuild would
    // not give).
    let seen = outcomes(pendings, Duration::from_secs(30));
    release.store(true, Ordering::SeqCst);
    assert_eq!(seen.get("never answered"), None, "{seen:?}");
    assert!(seen.get("Closed").is_some_and(|&n| n > 0), "{seen:?}");
}

#[test]
fn a_stop_waits_for_a_stuck_instance_about_the_stall_timeout_not_the_checkpoint_timeout() {
    let svc = Svc::default();
    let release = svc.release.clone();
    let cluster = two_instances_stalled_after_300ms(svc);
    let client = cluster.client();
    let stuck = client.submit("k", 7).unwrap();
    let other: Vec<_> = (0..50)
        .map(|i| client.submit(format!("other{i}"), 1).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let since = Instant::now();
    let stopped = cluster.shutdown();
    let took = since.elapsed();
    release.store(true, Ordering::SeqCst);
    // The checkpoint gives up on the stuck instance after the stall timeout (the
    // supervisor no longer runs), and so does the stop: well under the 10 s that a
    // checkpoint waits for a part while the cluster runs.
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(
        matches!(stopped, Err(Error::CheckpointAbandoned { .. })),
        "{stopped:?}"
    );
    assert!(matches!(stuck.wait(), Err(Error::Closed)));
    let seen = outcomes(other, Duration::from_secs(1));
    assert_eq!(seen.get("never answered"), None, "{seen:?}");
}

#[test]
fn metrics_after_shutdown_keep_the_log_position() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Svc::default())
        .dir(dir.path())
        .build()
        .unwrap();
    let client = cluster.client();
    for _ in 0..10 {
        client.submit("k", 1).unwrap().wait().unwrap();
    }
    let before = client.metrics().next_offset;
    assert!(before >= 10);
    cluster.shutdown().unwrap();
    assert_eq!(client.metrics().next_offset, before);
    assert!(matches!(client.submit("k", 1), Err(Error::Closed)));
}

/// A cluster shared in an `Arc` with a thread that scales it is shut down through the
/// `Arc`: the scaling thread's next change is refused `Closed`, a second shutdown from
/// another thread waits for the first and returns `Ok`, nothing starts again afterwards,
/// the metrics still answer, and the directory is free for a new open at once.
#[test]
fn a_shared_cluster_is_shut_down_through_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(
        Cluster::builder(Svc::default())
            .dir(dir.path())
            .instances(2)
            .build()
            .unwrap(),
    );
    let client = cluster.client();
    for k in 0..20u64 {
        assert_eq!(client.submit(k.to_string(), 1).unwrap().wait().unwrap(), 1);
    }
    let scaler = {
        let cluster = cluster.clone();
        std::thread::spawn(move || {
            loop {
                match cluster.add_instance(1) {
                    Ok(id) => {
                        if let Err(e) = cluster.remove_instance(id) {
                            return e;
                        }
                    }
                    Err(e) => return e,
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    // Two at once: each returns once the cluster is stopped, its directory released.
    let second = {
        let (cluster, dir) = (cluster.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let result = cluster.shutdown();
            let free = Cluster::builder(Svc::default()).dir(&dir).build();
            (result, free.map(|c| c.shutdown()))
        })
    };
    cluster.shutdown().unwrap();
    let (result, free) = second.join().unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        matches!(free, Ok(Ok(()))),
        "the directory after the second shutdown: {free:?}"
    );
    assert!(matches!(scaler.join().unwrap(), Error::Closed));
    assert!(matches!(cluster.add_instance(1), Err(Error::Closed)));
    let member = cluster.members()[0];
    assert!(matches!(
        cluster.remove_instance(member),
        Err(Error::Closed)
    ));
    assert!(matches!(cluster.checkpoint(), Err(Error::Closed)));
    assert!(matches!(client.submit("k", 1), Err(Error::Closed)));
    assert!(cluster.metrics().requests() >= 20);
    // Still referenced here, and the directory opens again.
    let reopened = Cluster::builder(Svc::default())
        .dir(dir.path())
        .build()
        .unwrap();
    assert_eq!(
        reopened
            .client()
            .query("19", |t: &u64| *t)
            .unwrap()
            .wait()
            .unwrap(),
        1
    );
    reopened.shutdown().unwrap();
    drop(cluster);
}

/// A request that stalls twice (live, then in its new owner's replay) is set aside while
/// that replay is still in the handler. A shutdown then releases the directory at once:
/// the cluster opens there again though the left-behind replay has not returned.
#[test]
fn a_shutdown_releases_the_directory_while_a_left_behind_replay_is_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Svc::default();
    let release = svc.release.clone();
    let cluster = Cluster::builder(svc)
        .dir(dir.path())
        .instances(1)
        .stall_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let client = cluster.client();
    client.submit("k", 1).unwrap().wait().unwrap();
    let stuck = client.submit("k", 7).unwrap();
    let outcome = stuck.wait_timeout(Duration::from_secs(30));
    assert!(
        matches!(outcome, Err(Error::HandlerStalled { .. })),
        "{outcome:?}"
    );
    drop(client);
    let _ = cluster.shutdown();
    drop(cluster);
    let again = Cluster::builder(Svc::default()).dir(dir.path()).build();
    let still_stuck = !release.load(Ordering::SeqCst);
    release.store(true, Ordering::SeqCst);
    let again = again.expect("the directory opens again at once");
    assert!(still_stuck);
    let client = again.client();
    assert_eq!(client.query("k", |t: &u64| *t).unwrap().wait().unwrap(), 1);
    assert_eq!(client.submit("k", 2).unwrap().wait().unwrap(), 3);
    drop(client);
    again.shutdown().unwrap();
}
