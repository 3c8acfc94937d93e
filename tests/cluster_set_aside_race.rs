//! A request set aside after its second stall is skipped by every rebuild, including
//! those that start the moment its instance is fenced (instances waiting on a handoff
//! it owed): the live state, the answer and the fold of the log after a reopen agree.
//! A tracing subscriber that sleeps when the set-aside is logged widens the window
//! between the fence and the durable mark, as a preemption would.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, Context, Handler};

mod common;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    Add(u64),
    /// Adds 100; its first two runs take 1.2 s, the later ones none.
    SlowTwice,
    Get,
}

#[derive(Clone, Default)]
struct Sum {
    runs: Arc<AtomicU64>,
    second_started: Arc<AtomicBool>,
}

impl Handler for Sum {
    type State = u64;
    type Request = Req;
    type Response = u64;
    fn handle(&self, _: &mut Context<'_>, _: &[u8], sum: &mut u64, req: Req) -> u64 {
        match req {
            Req::Add(n) => *sum += n,
            Req::SlowTwice => {
                let run = self.runs.fetch_add(1, Ordering::SeqCst);
                if run == 1 {
                    self.second_started.store(true, Ordering::SeqCst);
                }
                if run < 2 {
                    thread::sleep(Duration::from_millis(1200));
                }
                *sum += 100;
            }
            Req::Get => {}
        }
        *sum
    }
}

fn build(dir: &std::path::Path, h: Sum) -> Cluster<Sum> {
    Cluster::builder(h)
        .dir(dir)
        .instances(3)
        .stall_timeout(Duration::from_millis(200))
        .supervise_every(Duration::from_millis(10))
        .build()
        .unwrap()
}

#[test]
fn second_stall_poison_races_the_rebuild_started_by_fence() {
    // Widens the window between the fence (handoffs abandoned) and the durable mark, as
    // a preemption of the supervisor thread would.
    let slow_at_set_aside = |_: &tracing::Metadata<'_>, fields: &str| {
        if fields.contains("message=stalled twice") {
            thread::sleep(Duration::from_millis(300));
        }
    };
    tracing::subscriber::set_global_default(common::OnEvent(slow_at_set_aside)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let h = Sum::default();
    let started = h.second_started.clone();
    let c = build(dir.path(), h);
    let client = c.client();
    assert_eq!(client.submit("k", Req::Add(1)).unwrap().wait().unwrap(), 1);
    let first = client.owner_of("k").unwrap();
    let p = client.submit("k", Req::SlowTwice).unwrap();
    // The first run stalls its owner; the new owner replays it (second run).
    let since = Instant::now();
    while !started.load(Ordering::SeqCst) {
        assert!(since.elapsed() < Duration::from_secs(5), "no replay");
        thread::sleep(Duration::from_millis(1));
    }
    let second = client.owner_of("k").unwrap();
    eprintln!("first owner {first}, replaying on {second}");
    assert_ne!(first, second);
    // While it replays: remove it, so "k" moves on through a handoff it owes.
    c.remove_instance(second).unwrap();
    let answer = p.wait_timeout(Duration::from_secs(10));
    let live = client
        .submit("k", Req::Get)
        .unwrap()
        .wait_timeout(Duration::from_secs(10));
    eprintln!("answer of SlowTwice: {answer:?}; live state of k: {live:?}");
    drop(client);
    // Stopped without a checkpoint: the next open folds the log.
    drop(c);
    thread::sleep(Duration::from_millis(2500));
    let again = build(
        dir.path(),
        Sum {
            runs: Arc::new(AtomicU64::new(10)),
            ..Default::default()
        },
    );
    let client = again.client();
    let reopened = client
        .submit("k", Req::Get)
        .unwrap()
        .wait_timeout(Duration::from_secs(10));
    eprintln!("state of k after reopening: {reopened:?}");
    drop(client);
    again.shutdown().unwrap();
    let live = live.unwrap();
    let reopened = reopened.unwrap();
    let applied = answer.is_ok();
    assert_eq!(live, reopened, "live state and the fold of the log agree");
    assert_eq!(applied, live == 101, "answered Ok iff applied");
}
