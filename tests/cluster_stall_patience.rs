//! A replay given longer than the stall timeout (see `ClusterBuilder::stall_timeout`)
//! that ends while the supervisor is still deciding (here: its log sink is slow) leaves
//! the instance alone: the supervisor waits on the unit of work it declared stalled, not
//! on whatever the instance runs by the time it looks again. One test in this file, since
//! it installs a global `tracing` subscriber.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler};
use serde::{Deserialize, Serialize};

static DELAY: AtomicBool = AtomicBool::new(false);

struct Log;
struct Fields(String);
impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0 += &format!("{}={:?} ", f.name(), v);
    }
}
impl tracing::Subscriber for Log {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut v = Fields(String::new());
        e.record(&mut v);
        eprintln!(
            "[{:?}] {} {}",
            thread::current().name(),
            e.metadata().level(),
            v.0
        );
        // The supervisor's log sink is slow on the event that gives a replay longer:
        // the replay (500 ms) ends meanwhile, and the instance goes idle.
        if e.metadata().fields().field("allowance").is_some() && DELAY.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(400));
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    SlowReplays,
    Panic,
    Get,
}

#[derive(Clone, Default)]
struct Sum {
    replay_ms: Arc<AtomicU64>,
}

impl Handler for Sum {
    type State = u64;
    type Request = Req;
    type Response = u64;
    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], sum: &mut u64, req: Req) -> u64 {
        match req {
            Req::SlowReplays => {
                if ctx.is_replay() {
                    thread::sleep(Duration::from_millis(self.replay_ms.load(Ordering::SeqCst)));
                }
                *sum += 10;
            }
            Req::Panic => panic!("asked to"),
            Req::Get => {}
        }
        *sum
    }
}

#[test]
fn a_replay_that_ends_while_it_is_given_longer_leaves_its_instance_alone() {
    let delay = true;
    let _ = tracing::subscriber::set_global_default(Log);
    DELAY.store(delay, Ordering::SeqCst);
    let tmp = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let replay_ms = handler.replay_ms.clone();
    let cluster = Cluster::builder(handler)
        .dir(tmp.path())
        .instances(2)
        .stall_timeout(Duration::from_millis(300))
        .supervise_every(Duration::from_millis(5))
        .build()
        .unwrap();
    let client = cluster.client();
    assert_eq!(
        client
            .submit("slow", Req::SlowReplays)
            .unwrap()
            .wait()
            .unwrap(),
        10
    );
    replay_ms.store(500, Ordering::SeqCst);
    let p = client.submit("slow", Req::Panic).unwrap().wait();
    assert!(matches!(p, Err(Error::HandlerPanicked { .. })), "{p:?}");
    let since = Instant::now();
    let state = client
        .submit("slow", Req::Get)
        .unwrap()
        .wait_timeout(Duration::from_secs(20))
        .expect("the key is served again");
    assert_eq!(state, 10);
    // Let the replay end and the instance go idle.
    thread::sleep(Duration::from_millis(300));
    let owner = client.owner_of("slow");
    let stalls = cluster.metrics().stalls;
    eprintln!(
        "served after {:?}; owner {owner:?}; stalls {stalls}",
        since.elapsed()
    );
    thread::sleep(Duration::from_millis(1_500));
    let after = cluster.metrics().stalls;
    eprintln!("owner now {:?}; stalls {after}", client.owner_of("slow"));
    assert_eq!(after, stalls, "an idle, healthy instance was replaced");
    assert_eq!(client.owner_of("slow"), owner);
    cluster.shutdown().unwrap();
}
