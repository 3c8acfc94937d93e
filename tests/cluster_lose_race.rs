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
use serde::{Deserialize, Serialize};

mod common;

/// "instance stalled" events seen.
static STALLS_SEEN: AtomicU64 = AtomicU64::new(0);
/// Errors the crate logged.
static ERRORS: AtomicU64 = AtomicU64::new(0);

fn log(meta: &tracing::Metadata<'_>, fields: &str) {
    if *meta.level() <= tracing::Level::WARN {
        eprintln!("[{:?}] {} {fields}", thread::current().name(), meta.level());
    }
    if fields.contains("message=instance stalled ") {
        STALLS_SEEN.fetch_add(1, Ordering::SeqCst);
    }
    if *meta.level() == tracing::Level::ERROR {
        ERRORS.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    Add(u64),
    /// Sleeps past the stall timeout the first time it runs; adds nothing.
    StallOnce,
    Get,
}

#[derive(Clone, Default)]
struct Sum {
    stalled: Arc<AtomicBool>,
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
                    thread::sleep(Duration::from_millis(800));
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
    let cluster = Cluster::builder(Sum::default())
        .dir(tmp.path())
        .instances(3)
        .stall_timeout(Duration::from_millis(100))
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
    let stalled_owner = cluster.owner_of("stall").expect("an owner");
    let stall = cluster.client().submit("stall", Req::StallOnce).unwrap();
    let since = Instant::now();
    while STALLS_SEEN.load(Ordering::SeqCst) == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "no stall declared"
        );
        thread::sleep(Duration::from_millis(1));
    }
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
