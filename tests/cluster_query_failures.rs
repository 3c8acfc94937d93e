//! Queries where things go wrong around them, each found by a review of the query path
//! and each failing before its fix: a query still running at shutdown, a query whose
//! key's rebuild stalls its instance, a query routed again from a lost instance to a
//! holder where its key must be rebuilt, and a query begun after a stall was declared
//! on the work before it.

mod common;

mod shutdown {
    //! A query whose function is still running when the cluster shuts down is answered
    //! `Closed` once shutdown gives up on its instance, as a request in the same spot
    //! is (before the fix, not until the function returned).

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use cauce::Error;
    use cauce::cluster::{Cluster, Context, Handler};

    use crate::common::wait_for;

    #[derive(Clone, Default)]
    struct Lists {
        release: Arc<AtomicBool>,
    }

    impl Handler for Lists {
        type State = Vec<u64>;
        type Request = u64;
        type Response = usize;
        fn handle(&self, _: &mut Context<'_>, _: &[u8], l: &mut Vec<u64>, v: u64) -> usize {
            if v == u64::MAX {
                wait_for(&self.release, Duration::from_secs(30));
            }
            l.push(v);
            l.len()
        }
    }

    /// Control: a request whose handler is still running at shutdown is answered Closed
    /// once shutdown gives up on its instance.
    #[test]
    fn control_a_request_running_at_shutdown_is_answered_closed() {
        let svc = Lists::default();
        let release = svc.release.clone();
        let cluster = Cluster::builder(svc)
            .in_memory()
            .instances(1)
            .stall_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let client = cluster.client();
        let stuck = client.submit("k", u64::MAX).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        cluster.shutdown().ok();
        eprintln!("shutdown took {:?}", t.elapsed());
        let got = stuck.wait_timeout(Duration::from_secs(3));
        release.store(true, Ordering::SeqCst);
        assert!(matches!(got, Err(Error::Closed)), "{got:?}");
    }

    /// The same for a query: shutdown returns, but the query's Pending is not answered
    /// until its function returns (here 30 s later), although a stall timeout applies.
    #[test]
    fn a_query_running_at_shutdown_is_answered_closed() {
        let cluster = Cluster::builder(Lists::default())
            .in_memory()
            .instances(1)
            .stall_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let client = cluster.client();
        client.submit("k", 1).unwrap().wait().unwrap();
        let release = Arc::new(AtomicBool::new(false));
        let stuck = {
            let release = release.clone();
            client
                .query("k", move |l: &Vec<u64>| {
                    wait_for(&release, Duration::from_secs(30));
                    l.len()
                })
                .unwrap()
        };
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        cluster.shutdown().ok();
        eprintln!("shutdown took {:?}", t.elapsed());
        let got = stuck.wait_timeout(Duration::from_secs(3));
        release.store(true, Ordering::SeqCst);
        assert!(
            matches!(got, Err(Error::Closed) | Err(Error::QueryStalled { .. })),
            "query still unanswered 3 s after shutdown returned: {got:?}"
        );
    }
}

mod rebuild_stall {
    //! A query whose key's rebuild failed rebuilds the key before it runs. If that
    //! replay stalls and the instance is lost, the query goes to the key's new owner and
    //! is answered there (before the fix, it hung as long as the replay, then was
    //! refused `StateUnavailable` with a stale reason).

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use cauce::Error;
    use cauce::cluster::{Cluster, Context, Handler};

    use crate::common::wait_for;
    use cauce::store::MemoryStore;

    use crate::common::Unreadable;

    const HANG: u64 = u64::MAX;

    #[derive(Clone, Default)]
    struct Lists {
        release: Arc<AtomicBool>,
        held: Arc<AtomicBool>,
        /// The next replay (or run) of a request of value 1 hangs.
        hang_one: Arc<AtomicBool>,
        /// Broken by the handler itself as HANG begins to hang: the log must be
        /// unreadable before the stall is declared, and a test thread that sets it
        /// after its submit can be descheduled past the stall timeout first.
        input: Option<Arc<Unreadable>>,
    }

    impl Handler for Lists {
        type State = Vec<u64>;
        type Request = u64;
        type Response = usize;
        fn handle(&self, _: &mut Context<'_>, _: &[u8], l: &mut Vec<u64>, v: u64) -> usize {
            // The hangs last far longer than the test waits for any answer (20 s), so
            // that an answer that waited out a hang cannot pass for a prompt one.
            if v == HANG && !self.held.swap(true, Ordering::SeqCst) {
                if let Some(input) = &self.input {
                    input.broken.store(true, Ordering::SeqCst);
                }
                wait_for(&self.release, Duration::from_secs(60));
            }
            if v == 1 && self.hang_one.swap(false, Ordering::SeqCst) {
                wait_for(&self.release, Duration::from_secs(60));
            }
            l.push(v);
            l.len()
        }
    }

    #[test]
    fn a_query_whose_rebuild_stalls_is_run_by_the_new_owner() {
        let input = Arc::new(Unreadable {
            live: MemoryStore::new(),
            broken: AtomicBool::new(false),
        });
        let svc = Lists {
            input: Some(input.clone()),
            ..Lists::default()
        };
        let release = svc.release.clone();
        let hang_one = svc.hang_one.clone();
        // 1 s: a thread descheduled for a few hundred ms on a loaded machine does not
        // add stalls of its own to the two deliberate ones (HANG, then the replay of k:1).
        let cluster = Cluster::builder(svc)
            .stores(input.clone(), None)
            .instances(2)
            .stall_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let client = cluster.client();
        client.submit("k", 1).unwrap().wait().unwrap();
        // k's holder stalls while the log cannot be read (its handler breaks the log as
        // it begins to hang): k is unavailable on its new owner.
        let hang = client.submit("k", HANG).unwrap();
        let r = hang.wait_timeout(Duration::from_secs(10));
        assert!(matches!(r, Err(Error::StateUnavailable { .. })), "{r:?}");
        // Wait until k is unavailable on its new owner (a query refused while broken).
        let since = Instant::now();
        loop {
            let r = client.query("k", |l: &Vec<u64>| l.clone()).unwrap().wait();
            eprintln!("while broken: {r:?}");
            if matches!(r, Err(Error::StateUnavailable { .. })) {
                break;
            }
            assert!(since.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(20));
        }
        input.broken.store(false, Ordering::SeqCst);
        // Past REBUILD_RETRY_AFTER: the query rebuilds k, and that replay hangs on k:1.
        std::thread::sleep(Duration::from_millis(150));
        hang_one.store(true, Ordering::SeqCst);
        let stalls = cluster.metrics().stalls;
        let q = client.query("k", |l: &Vec<u64>| l.clone()).unwrap();
        let t = Instant::now();
        // 20 s: far above a stall timeout and a rebuild, far below the 60 s hang.
        let got = q.wait_timeout(Duration::from_secs(20));
        eprintln!(
            "after {:?}: {got:?}; stalls {} -> {}",
            t.elapsed(),
            stalls,
            cluster.metrics().stalls
        );
        let after_release = if got.is_err() {
            release.store(true, Ordering::SeqCst);
            let later = q.wait_timeout(Duration::from_secs(5));
            eprintln!("once the replay's hang ends: {later:?}");
            Some(later)
        } else {
            None
        };
        release.store(true, Ordering::SeqCst);
        // The new owner rebuilt k (its replay does not hang): the query should run there.
        let now = client.query("k", |l: &Vec<u64>| l.clone()).unwrap().wait();
        eprintln!("a fresh query now: {now:?}");
        cluster.shutdown().ok();
        assert_eq!(
            got.as_ref().ok(),
            Some(&vec![1, HANG]),
            "query not answered by k's new owner within 20 s (instance was replaced): {got:?}, then {after_release:?}"
        );
    }
}

mod stale_rebuild {
    //! A query routed again from a lost instance, to a holder where its key must be
    //! rebuilt (a rebuild failed), rebuilds the key up to the log's end when it was
    //! routed again, not to the offset it was made at: before the fix, requests of the
    //! key logged after that offset and refused meanwhile went missing from the live
    //! state for good.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use cauce::Error;
    use cauce::cluster::{Cluster, Context, Handler};

    use crate::common::wait_for;
    use cauce::router::{SlotRouterOptions, StickyOptions};
    use cauce::store::{MemoryStore, Store};

    use crate::common::Unreadable;

    /// The stall timeout. Between HANG's start and the test breaking the log, the test
    /// thread removes an instance and submits twice: that must take less than this,
    /// even descheduled on a loaded machine. SLOW (300 ms) stays well under it.
    const STALL_TIMEOUT: Duration = Duration::from_secs(2);

    const HANG: u64 = u64::MAX;
    const SLOW: u64 = u64::MAX - 1;

    #[derive(Clone, Default)]
    struct Lists {
        release: Arc<AtomicBool>,
        held: Arc<AtomicBool>,
    }

    impl Handler for Lists {
        type State = Vec<u64>;
        type Request = u64;
        type Response = usize;
        fn handle(&self, ctx: &mut Context<'_>, _: &[u8], l: &mut Vec<u64>, v: u64) -> usize {
            if v == HANG && !self.held.swap(true, Ordering::SeqCst) {
                wait_for(&self.release, Duration::from_secs(30));
            }
            if v == SLOW && !ctx.is_replay() {
                std::thread::sleep(Duration::from_millis(300));
            }
            l.push(v);
            l.len()
        }
    }

    fn scenario(with_query: bool) -> (Vec<u64>, Vec<u64>) {
        let svc = Lists::default();
        let release = svc.release.clone();
        let input = Arc::new(Unreadable {
            live: MemoryStore::new(),
            broken: AtomicBool::new(false),
        });
        // A small placement table: `remove_instance` below walks every slot, and the
        // default 2^16 slots take 0.1-0.3 s in a debug build, inside the window above.
        let slots = SlotRouterOptions::default().slots(1 << 10).unwrap();
        let cluster = Cluster::builder(svc)
            .stores(input.clone(), None)
            .instances(2)
            .stall_timeout(STALL_TIMEOUT)
            .placement(StickyOptions::default().epsilon(0.2).unwrap().router(slots))
            .build()
            .unwrap();
        let client = cluster.client();
        client.submit("k", 1).unwrap().wait().unwrap();
        let a = client.owner_of("k").unwrap();
        // A hangs on HANG; a query of k queues behind it.
        let hang = client.submit("k", HANG).unwrap();
        let q1 = with_query.then(|| client.query("k", |l: &Vec<u64>| l.clone()).unwrap());
        // A leaves (retiring, still hung); k moves to B.
        cluster.remove_instance(a).unwrap();
        let r4 = client.submit("k", 4).unwrap();
        // Keeps B busy past REBUILD_RETRY_AFTER (100 ms) after it fails to rebuild k, and
        // well under the stall timeout, so that B itself is not declared stalled.
        let slow = client.submit("j", SLOW).unwrap();
        input.broken.store(true, Ordering::SeqCst);
        // A is declared stalled: its handoff of k is abandoned, B's rebuild of k fails, and
        // k:4 is refused at once on B.
        let r4 = r4.wait_timeout(Duration::from_secs(10));
        assert!(matches!(r4, Err(Error::StateUnavailable { .. })), "{r4:?}");
        input.broken.store(false, Ordering::SeqCst);
        let _ = hang.wait_timeout(Duration::from_secs(10));
        slow.wait_timeout(Duration::from_secs(10)).unwrap();
        if let Some(q1) = q1 {
            eprintln!(
                "rerouted query saw {:?}",
                q1.wait_timeout(Duration::from_secs(10))
            );
        }
        // Let any retry window pass, then a normal request and a normal query.
        std::thread::sleep(Duration::from_millis(150));
        let r5 = client
            .submit("k", 5)
            .unwrap()
            .wait_timeout(Duration::from_secs(10));
        eprintln!("k:5 answered {r5:?}");
        let q2 = client.query("k", |l: &Vec<u64>| l.clone()).unwrap();
        let at = q2.offset();
        let seen = q2.wait_timeout(Duration::from_secs(10)).unwrap();
        // The fold of k's logged requests before `at` (nothing is set aside here: HANG
        // stalled once only).
        let logged: Vec<u64> = input
            .live
            .read_from(0)
            .unwrap()
            .map(|r| r.unwrap())
            .filter(|r| &r.key[..] == b"k" && r.offset < at && r.payload.first() == Some(&0))
            .map(|r| bincode::deserialize::<u64>(&r.payload[1..]).unwrap())
            .collect();
        release.store(true, Ordering::SeqCst);
        cluster.shutdown().ok();
        (seen, logged)
    }

    /// Control: without the rerouted query, k:5 rebuilds k up to its own offset, and the
    /// later query sees the fold of the log.
    #[test]
    fn control_without_a_rerouted_query_the_state_is_the_fold_of_the_log() {
        let (seen, logged) = scenario(false);
        assert_eq!(seen, logged);
    }

    #[test]
    fn a_rerouted_query_does_not_rebuild_its_key_to_a_stale_offset() {
        let (seen, logged) = scenario(true);
        assert_eq!(
            seen, logged,
            "a plain query after a rerouted one saw a state missing logged requests"
        );
    }
}

mod late_stall {
    //! A stall is declared on a request's unit of work; before the cluster acts on it (here
    //! it waits for a stripe lock held by a submit whose log append is slow), the request
    //! finishes and the loop begins the query queued behind it. The lost instance has left
    //! the supervisor's watch, so the cluster watches that query itself: one that runs past
    //! the stall timeout is answered `QueryStalled` (before the fix: not at all until its
    //! function returned), and at shutdown `Closed`.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use cauce::Error;
    use cauce::cluster::{Cluster, Context, Handler};

    use crate::common::wait_for;
    use cauce::store::{MemoryStore, Store};

    const HANG: u64 = u64::MAX;

    #[derive(Clone, Default)]
    struct Lists {
        release: Arc<AtomicBool>,
    }

    impl Handler for Lists {
        type State = Vec<u64>;
        type Request = u64;
        type Response = usize;
        fn handle(&self, ctx: &mut Context<'_>, _: &[u8], l: &mut Vec<u64>, v: u64) -> usize {
            if v == HANG && !ctx.is_replay() {
                wait_for(&self.release, Duration::from_secs(30));
            }
            l.push(v);
            l.len()
        }
    }

    /// A log whose appends of key "gate" block while `closed` is set: the submit holds its
    /// key's stripe lock meanwhile, so `lose` (which takes every stripe) waits.
    struct Gated {
        live: MemoryStore,
        closed: AtomicBool,
    }

    impl Store for Gated {
        fn append(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
            if batch.iter().any(|e| e.key == b"gate") {
                let since = Instant::now();
                while self.closed.load(Ordering::SeqCst)
                    && since.elapsed() < Duration::from_secs(30)
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            self.live.append(batch)
        }
        crate::common::forward_store_but_append!(live);
    }

    /// Returns the query's answer within 10x the stall timeout, and (if `then_shutdown`)
    /// its answer within 2 s of a shutdown after that.
    fn scenario(then_shutdown: bool) -> (cauce::Result<Vec<u64>>, Option<cauce::Result<Vec<u64>>>) {
        let svc = Lists::default();
        let release = svc.release.clone();
        let input = Arc::new(Gated {
            live: MemoryStore::new(),
            closed: AtomicBool::new(false),
        });
        let stall_timeout = Duration::from_millis(200);
        let cluster = Cluster::builder(svc)
            .stores(input.clone(), None)
            .instances(1)
            .stall_timeout(stall_timeout)
            .supervise_every(Duration::from_millis(10))
            .build()
            .unwrap();
        let client = cluster.client();
        client.submit("k", 1).unwrap().wait().unwrap();
        // The instance hangs on k:HANG; a slow query of k queues behind it.
        let hang = client.submit("k", HANG).unwrap();
        let query_done = Arc::new(AtomicBool::new(false));
        let qd = query_done.clone();
        let q = client
            .query("k", move |l: &Vec<u64>| {
                // Runs far past the stall timeout (10 s stands for "hangs").
                wait_for(&qd, Duration::from_secs(10));
                l.clone()
            })
            .unwrap();
        // A submit of another key holds its stripe lock in a slow append (as an fdatasync
        // under SyncPolicy::Always on a slow disk would): `lose` waits for it.
        input.closed.store(true, Ordering::SeqCst);
        let c2 = cluster.client();
        let gate = std::thread::spawn(move || c2.submit("gate", 7).map(|p| p.offset()));
        // The supervisor declares the stall on k:HANG and blocks in `lose`.
        std::thread::sleep(stall_timeout * 3);
        let stalls_before = cluster.metrics().stalls;
        // k:HANG returns; the loop begins the query (in a later unit).
        release.store(true, Ordering::SeqCst);
        let _ = hang.wait_timeout(Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(50));
        // `lose` goes on: it takes the running query, fences, drops its stall answer.
        input.closed.store(false, Ordering::SeqCst);
        gate.join().unwrap().unwrap();
        let t = Instant::now();
        let got = q.wait_timeout(stall_timeout * 10);
        eprintln!(
            "stalls {} -> {}; query after {:?}: {got:?}",
            stalls_before,
            cluster.metrics().stalls,
            t.elapsed()
        );
        let after_shutdown = then_shutdown.then(|| {
            let t = Instant::now();
            let sd = cluster.shutdown();
            eprintln!("shutdown: {sd:?}");
            let r = q.wait_timeout(Duration::from_secs(2));
            eprintln!("shutdown took {:?}; query 2 s after it: {r:?}", t.elapsed());
            r
        });
        query_done.store(true, Ordering::SeqCst);
        let later = q.wait_timeout(Duration::from_secs(5));
        eprintln!("once its function returns: {later:?}");
        (got, after_shutdown)
    }

    /// Promise: a query that runs past the stall timeout is answered QueryStalled.
    #[test]
    fn a_query_begun_after_a_stall_was_declared_on_an_earlier_unit_is_answered_query_stalled() {
        let (got, _) = scenario(false);
        assert!(
            matches!(got, Err(Error::QueryStalled { .. })),
            "a query that ran 10x the stall timeout on a lost instance was not answered: {got:?}"
        );
    }

    /// Promise: Closed at/after shutdown rather than a hang.
    #[test]
    fn that_query_is_answered_closed_at_shutdown() {
        let (_, after) = scenario(true);
        let after = after.unwrap();
        assert!(
            matches!(after, Err(Error::Closed) | Err(Error::QueryStalled { .. })),
            "a query running on a lost instance was not answered at shutdown: {after:?}"
        );
    }
}
