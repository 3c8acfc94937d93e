//! An instance declared stalled and removed (`remove_instance`) before its loss runs, with
//! a checkpoint round begun while it was a member: the loss, finding it retiring, still
//! gives up the round's wait for its part at once (the instance is fenced and will never
//! give it), rather than let the checkpoint wait out its whole timeout (4 stall timeouts,
//! at least 10 s). One test in this file, since it installs a global `tracing`
//! subscriber.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, Context, Handler};
use cauce::router::{SlotRouterOptions, StickyOptions};
use serde::{Deserialize, Serialize};

static STALLS_SEEN: AtomicU64 = AtomicU64::new(0);
/// The supervisor waits at the first "instance stalled" (just before `lose`) until set.
static GO: AtomicBool = AtomicBool::new(false);

fn log(meta: &tracing::Metadata<'_>, fields: &str) {
    if fields.contains("message=instance stalled ") {
        STALLS_SEEN.fetch_add(1, Ordering::SeqCst);
        let since = Instant::now();
        while !GO.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_micros(100));
        }
    }
    if *meta.level() <= tracing::Level::WARN {
        eprintln!("[{:?}] {} {fields}", thread::current().name(), meta.level());
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    Add(u64),
    StallOnce,
}

#[derive(Clone, Default)]
struct Sum {
    stalled: Arc<AtomicBool>,
    /// The stalled request hangs until this is set (at most 60 s): the lost instance
    /// never finishes its part of the checkpoint on its own while the test measures it.
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
                    common::wait_for(&self.release, Duration::from_secs(60));
                }
            }
        }
        *sum
    }
}

#[test]
fn a_checkpoint_does_not_wait_out_its_timeout_for_a_lost_instance_removed_meanwhile() {
    tracing::subscriber::set_global_default(common::OnEvent(log)).expect("the only subscriber");
    let tmp = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let release = handler.release.clone();
    // A 1 s stall timeout: the checkpoint's timeout is still 10 s (4 stall timeouts, at
    // least 10 s), and no unit of work a loaded machine deschedules for a few hundred ms
    // is taken for the stall. A small placement table: `remove_instance` walks every
    // slot, and the default 2^16 take 0.1-0.3 s in a debug build, inside the time measured.
    let slots = SlotRouterOptions::default().slots(1 << 10).unwrap();
    let cluster = Arc::new(
        Cluster::builder(handler)
            .dir(tmp.path())
            .instances(3)
            .stall_timeout(Duration::from_secs(1))
            .supervise_every(Duration::from_millis(5))
            .checkpoint_every(u64::MAX)
            .placement(StickyOptions::default().epsilon(0.2).unwrap().router(slots))
            .build()
            .unwrap(),
    );
    let client = cluster.client();
    for i in 0..50 {
        client
            .submit(format!("k{i}"), Req::Add(1))
            .unwrap()
            .wait()
            .unwrap();
    }
    let stalled_owner = cluster.owner_of("stall").expect("an owner");
    let stall = client.submit("stall", Req::StallOnce).unwrap();
    let since = Instant::now();
    while STALLS_SEEN.load(Ordering::SeqCst) == 0 {
        assert!(
            since.elapsed() < Duration::from_secs(20),
            "no stall declared"
        );
        thread::sleep(Duration::from_micros(200));
    }
    // The supervisor waits just before `lose`. A checkpoint round starts (the stalled
    // instance is a member: the round expects its part), the stalled instance is removed,
    // and only then does the loss go on, finding it retiring.
    let c = cluster.clone();
    let checkpoint = thread::spawn(move || {
        let since = Instant::now();
        let r = c.checkpoint();
        (since.elapsed(), r)
    });
    thread::sleep(Duration::from_millis(20));
    cluster.remove_instance(stalled_owner).unwrap();
    GO.store(true, Ordering::SeqCst);
    let (took, result) = checkpoint.join().unwrap();
    eprintln!("checkpoint: {result:?} after {took:?}");
    release.store(true, Ordering::SeqCst);
    stall.wait_timeout(Duration::from_secs(30)).unwrap();
    // Half the checkpoint's 10 s timeout: a prompt give-up takes well under a second,
    // with room left for a loaded machine.
    assert!(
        took < Duration::from_secs(5),
        "the checkpoint waited {took:?} for the lost instance's part: {result:?}"
    );
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.shutdown().unwrap(),
        Err(_) => panic!("still shared"),
    }
}
