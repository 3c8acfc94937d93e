//! An instance declared stalled whose unit of work ends before its loss acts on it (here:
//! the supervisor's log sink is slow at the stall) goes to sleep in its mailbox, nothing
//! queued. Its loss still ends its loop: no instance thread outlives the cluster. One
//! test in this file, since it installs a global `tracing` subscriber.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::cluster::{Cluster, Context, Handler};
use serde::{Deserialize, Serialize};

static STALLED: AtomicBool = AtomicBool::new(false);
/// Set by the test once the slow request was answered.
static ANSWERED: AtomicBool = AtomicBool::new(false);

fn log(_: &tracing::Metadata<'_>, fields: &str) {
    if fields.contains("message=instance stalled ") && !STALLED.swap(true, Ordering::SeqCst) {
        // Hold the supervisor until the stalled unit has ended (its request answered),
        // then a little longer for the instance to go to sleep in its mailbox. A fixed
        // hold raced the slow request on a loaded machine: the loss could come first, and
        // the request then stalled again on its replay and was set aside.
        common::wait_for(&ANSWERED, Duration::from_secs(30));
        thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    Add(u64),
    Slow,
}

#[derive(Clone, Default)]
struct Sum;

impl Handler for Sum {
    type State = u64;
    type Request = Req;
    type Response = u64;
    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], sum: &mut u64, req: Req) -> u64 {
        match req {
            Req::Add(n) => *sum += n,
            // Runs until the supervisor has declared the stall (however late a loaded
            // machine runs it), when live (its replays do not wait).
            Req::Slow if !ctx.is_replay() => common::wait_for(&STALLED, Duration::from_secs(30)),
            Req::Slow => {}
        }
        *sum
    }
}

fn instance_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with("cauce-instance"))
        .count()
}

#[test]
fn a_lost_instance_that_idles_when_fenced_still_ends() {
    tracing::subscriber::set_global_default(common::OnEvent(log)).expect("the only subscriber");
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Sum)
        .dir(tmp.path())
        .instances(3)
        // 1 s: no unit of work a loaded machine deschedules for a few hundred ms is
        // taken for a stall before the slow request's.
        .stall_timeout(Duration::from_secs(1))
        .supervise_every(Duration::from_millis(5))
        .build()
        .unwrap();
    let client = cluster.client();
    // A thread names itself once it runs.
    let since = Instant::now();
    while instance_threads() < 3 {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "instances not started"
        );
        thread::sleep(Duration::from_millis(5));
    }
    client.submit("slow", Req::Slow).unwrap().wait().unwrap();
    ANSWERED.store(true, Ordering::SeqCst);
    let since = Instant::now();
    while cluster.metrics().stalls == 0 {
        assert!(since.elapsed() < Duration::from_secs(10), "no loss");
        thread::sleep(Duration::from_millis(5));
    }
    client.submit("slow", Req::Add(1)).unwrap().wait().unwrap();
    // The replacement answered, so it runs (and named itself): from now on the count is
    // at least 3, and it is 3 once the lost loop has ended. Polled, since a loaded
    // machine can take a while to run the lost loop to its end; a loop that never ends
    // keeps it at 4 past the deadline.
    let since = Instant::now();
    let mut live = instance_threads();
    while live != 3 && since.elapsed() < Duration::from_secs(20) {
        thread::sleep(Duration::from_millis(10));
        live = instance_threads();
    }
    cluster.shutdown().unwrap();
    thread::sleep(Duration::from_millis(200));
    let after = instance_threads();
    eprintln!("instance threads: {live} with 3 members, {after} after shutdown");
    assert_eq!(live, 3, "one loop per member, the lost one's ended");
    assert_eq!(after, 0, "an instance loop outlived the cluster");
}
