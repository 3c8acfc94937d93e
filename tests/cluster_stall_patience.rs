//! A replay given longer than the stall timeout (see `ClusterBuilder::stall_timeout`)
//! that ends while the supervisor is still deciding (here: its log sink is slow) leaves
//! the instance alone: the supervisor waits on the unit of work it declared stalled, not
//! on whatever the instance runs by the time it looks again. One test in this file, since
//! it installs a global `tracing` subscriber.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler};
use serde::{Deserialize, Serialize};

mod common;

/// The stall timeout: 1 s, so that neither a descheduled thread nor a panic's backtrace
/// (see `warm_up_backtraces`) counts as a stall beside the replay meant to.
const STALL: Duration = Duration::from_secs(1);
/// How long a replay of the slow request takes: past the stall timeout, within twice it.
const REPLAY: Duration = Duration::from_millis(1_300);

/// Prints every event; slow on the one that gives a replay longer: the supervisor's log
/// sink is slow there (given when the replay has run the stall timeout, about 1 s), and
/// the replay (1.3 s) ends meanwhile, the instance going idle.
fn log(meta: &tracing::Metadata<'_>, fields: &str) {
    eprintln!("[{:?}] {} {fields}", thread::current().name(), meta.level());
    if meta.fields().field("allowance").is_some() {
        thread::sleep(Duration::from_millis(800));
    }
}

/// Has this process print its first panic's backtrace now, outside any stall timeout.
/// With RUST_BACKTRACE=1 the first panic of a debug test process loads the debug symbols
/// for its backtrace, which took over 200 ms on a loaded machine: a handler's panic that
/// slow is declared a stall as well.
fn warm_up_backtraces() {
    let _ = std::panic::catch_unwind(|| panic!("warming up backtraces (not a failure)"));
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
    tracing::subscriber::set_global_default(common::OnEvent(log)).expect("the only subscriber");
    warm_up_backtraces();
    let tmp = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let replay_ms = handler.replay_ms.clone();
    let cluster = Cluster::builder(handler)
        .dir(tmp.path())
        .instances(2)
        .stall_timeout(STALL)
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
    replay_ms.store(REPLAY.as_millis() as u64, Ordering::SeqCst);
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
    thread::sleep(STALL);
    let owner = client.owner_of("slow");
    let stalls = cluster.metrics().stalls;
    eprintln!(
        "served after {:?}; owner {owner:?}; stalls {stalls}",
        since.elapsed()
    );
    // Past the twice-the-timeout allowance the replay was given: an idle instance
    // wrongly held to it would be replaced by now.
    thread::sleep(STALL * 5 / 2);
    let after = cluster.metrics().stalls;
    eprintln!("owner now {:?}; stalls {after}", client.owner_of("slow"));
    assert_eq!(after, stalls, "an idle, healthy instance was replaced");
    assert_eq!(client.owner_of("slow"), owner);
    cluster.shutdown().unwrap();
}
