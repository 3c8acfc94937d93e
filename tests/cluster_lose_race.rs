//! A stalled instance's replacement table is worked out before its loss takes the
//! stripes (tens of milliseconds; a few hundred in a debug build), and the instance's
//! work is fenced first. A membership change made meanwhile moves keys to and from the
//! lost instance like any other: they reach their new owners, every request is answered
//! once, and each key's state is the sum of its acknowledged requests. One test in this
//! file, since it installs a global `tracing` subscriber.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, Context, Handler};
use cauce::router::InstanceId;
use serde::{Deserialize, Serialize};

mod common;

/// "instance stalled" events seen.
static STALLS_SEEN: AtomicU64 = AtomicU64::new(0);
/// The instance the first "instance stalled" event names.
static FIRST_STALLED: AtomicU64 = AtomicU64::new(u64::MAX);
/// Errors the crate logged.
static ERRORS: AtomicU64 = AtomicU64::new(0);

fn log(meta: &tracing::Metadata<'_>, fields: &str) {
    if *meta.level() <= tracing::Level::WARN {
        eprintln!("[{:?}] {} {fields}", thread::current().name(), meta.level());
    }
    if fields.contains("message=instance stalled ") {
        let id = fields
            .split("instance=#")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|id| id.parse().ok())
            .expect("the stalled instance's id");
        let _ = FIRST_STALLED.compare_exchange(u64::MAX, id, Ordering::SeqCst, Ordering::SeqCst);
        STALLS_SEEN.fetch_add(1, Ordering::SeqCst);
    }
    if *meta.level() == tracing::Level::ERROR {
        ERRORS.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    Add(u64),
    /// The first time it runs, waits until the test releases it (past the stall
    /// timeout); adds nothing.
    StallOnce,
    Get,
}

#[derive(Clone, Default)]
struct Sum {
    stalled: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl Handler for Sum {
    type State = u64;
    type Request = Req;
    type Response = u64;
    fn handle(&self, _: &mut Context<'_>, _: &[u8], sum: &mut u64, req: Req) -> u64 {
        match req {
            Req::Add(n) => *sum += n,
            Req::StallOnce => {
                if !self.stalled.swap(true, Ordering::SeqCst) {
                    // Held by the test rather than for a fixed time: the stall must be
                    // declared whatever the machine's load. Bounded against a hang.
                    let since = Instant::now();
                    while !self.release.load(Ordering::SeqCst)
                        && since.elapsed() < Duration::from_secs(60)
                    {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            Req::Get => {}
        }
        *sum
    }
}

#[test]
fn a_membership_change_during_a_loss_moves_keys_to_and_from_the_lost_instance() {
    tracing::subscriber::set_global_default(common::OnEvent(log)).expect("the only subscriber");
    let tmp = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let release = handler.release.clone();
    let cluster = Cluster::builder(handler)
        .dir(tmp.path())
        .instances(3)
        // One stall is meant, the held request's. Every other request must be answered
        // (a request caught by two stalls in a row is set aside): at 100 ms, a
        // submitter's request preempted that long live and again in its replay was.
        // 2 s is past any descheduling this test should meet.
        .stall_timeout(Duration::from_secs(2))
        .supervise_every(Duration::from_millis(5))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let submitters: Vec<_> = (0..2u64)
        .map(|t| {
            let client = cluster.client();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut acked: HashMap<String, u64> = HashMap::new();
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    i += 2;
                    let key = format!("k{}", i % 96);
                    let answer = client
                        .submit(&key, Req::Add(1))
                        .unwrap()
                        .wait_timeout(Duration::from_secs(30));
                    assert!(answer.is_ok(), "{key}: {answer:?}");
                    *acked.entry(key).or_default() += 1;
                }
                acked
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(100));
    let stall = cluster.client().submit("stall", Req::StallOnce).unwrap();
    let since = Instant::now();
    while STALLS_SEEN.load(Ordering::SeqCst) == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "no stall declared"
        );
        thread::sleep(Duration::from_millis(1));
    }
    // The instance declared stalled: the one the held request runs on. (Asking
    // `owner_of("stall")` before the key's first request named its hash's instance, and
    // placement, which bounds every instance's load, put it on another one now and then.)
    let stalled_owner = InstanceId(FIRST_STALLED.load(Ordering::SeqCst) as u32);
    // While the loss drafts its table: a leave, whose keys may go to the lost instance
    // (still in the table), then a join, which takes keys from it.
    let other = cluster
        .members()
        .into_iter()
        .find(|&id| id != stalled_owner)
        .expect("another member");
    cluster.remove_instance(other).unwrap();
    let joined = cluster.add_instance(1).unwrap();
    thread::sleep(Duration::from_millis(500));
    // The lost instance wakes up now; what it finishes has no effect.
    release.store(true, Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let mut acked: HashMap<String, u64> = HashMap::new();
    for s in submitters {
        for (key, n) in s.join().unwrap() {
            *acked.entry(key).or_default() += n;
        }
    }
    assert_eq!(
        stall.wait_timeout(Duration::from_secs(30)).unwrap(),
        0,
        "the stalled request, answered by its key's new owner"
    );
    let metrics = cluster.metrics();
    assert!(metrics.stalls >= 1, "{metrics:?}");
    let members = cluster.members();
    assert!(!members.contains(&stalled_owner), "{members:?}");
    assert!(!members.contains(&other), "{members:?}");
    assert!(members.contains(&joined), "{members:?}");
    let client = cluster.client();
    for (key, n) in &acked {
        let state = client
            .submit(key, Req::Get)
            .unwrap()
            .wait_timeout(Duration::from_secs(30))
            .unwrap();
        assert_eq!(state, *n, "{key}: its acknowledged adds, each once");
    }
    assert_eq!(ERRORS.load(Ordering::SeqCst), 0, "the crate logged errors");
    cluster.shutdown().unwrap();
}
