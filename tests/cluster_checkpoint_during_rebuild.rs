//! A checkpoint that completes while an instance rebuilds its keys from the checkpoint
//! before it forgets nothing that rebuild still needs: the journal's answers of outside
//! calls (the rebuild would call out again and fold a different state from the one it
//! acknowledged) and, with truncation on, the log it reads.
//!
//! The race, made wide: instance A gives its part of a checkpoint round at once, the
//! other instance is busy in a request, so the round waits for it; meanwhile A's handler
//! panics, and A's restart folds its keys from the checkpoint before (a request there
//! is slow to replay); the round completes before the fold reaches a request that
//! called out.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use cauce::cluster::{Cluster, Context, EffectId, Handler};
use cauce::router::InstanceId;
use cauce::store::{MemoryStore, Store};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    /// Sleeps this many ms when live; does nothing on a replay.
    Busy(u64),
    /// Sleeps this many ms on a replay; does nothing live.
    SlowToReplay(u64),
    /// Calls out once and adds the answer.
    Call,
    /// Calls out once, then panics.
    CallThenPanic,
}

#[derive(Clone, Default)]
struct Calls {
    /// How many times each outside call ran.
    made: Arc<Mutex<HashMap<EffectId, u32>>>,
    next: Arc<AtomicU64>,
}

impl Calls {
    fn call(&self, ctx: &mut Context<'_>) -> u64 {
        let (made, next) = (self.made.clone(), self.next.clone());
        ctx.call("number", move |id| {
            *made.lock().entry(id).or_default() += 1;
            1000 + next.fetch_add(1, Ordering::SeqCst)
        })
        .expect("the call's answer")
    }
}

impl Handler for Calls {
    type State = u64;
    type Request = Req;
    type Response = u64;
    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, req: Req) -> u64 {
        match req {
            Req::Busy(ms) if !ctx.is_replay() => thread::sleep(Duration::from_millis(ms)),
            Req::SlowToReplay(ms) if ctx.is_replay() => thread::sleep(Duration::from_millis(ms)),
            Req::Busy(_) | Req::SlowToReplay(_) => {}
            Req::Call => *total += self.call(ctx),
            Req::CallThenPanic => {
                self.call(ctx);
                panic!("panics after its call");
            }
        }
        *total
    }
}

/// Keys placed on their first request: the first `on_a` keys placed on one instance,
/// and one key placed on another.
fn place(cluster: &Cluster<Calls>, on_a: usize) -> (InstanceId, Vec<String>, String) {
    let client = cluster.client();
    let (mut a, mut same, mut other) = (None, Vec::new(), None);
    for i in 0.. {
        let key = format!("key-{i}");
        client.submit(&key, Req::Busy(0)).unwrap().wait().unwrap();
        let owner = client.owner_of(&key).unwrap();
        match a {
            None => {
                a = Some(owner);
                same.push(key);
            }
            Some(a) if owner == a => same.push(key),
            Some(_) => other = other.or(Some(key)),
        }
        if same.len() >= on_a && other.is_some() {
            break;
        }
    }
    (a.unwrap(), same, other.unwrap())
}

fn a_checkpoint_during_a_restart_rebuild_keeps_what_it_folds(truncate: bool) {
    let calls = Calls::default();
    let made = calls.made.clone();
    let cluster = Arc::new(
        Cluster::builder(calls)
            .in_memory()
            .instances(2)
            .checkpoint_every(u64::MAX)
            .truncate_after_checkpoint(truncate)
            .retry_window(0)
            .stall_timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    );
    let client = cluster.client();
    let (a, keys, elsewhere) = place(&cluster, 2);
    let (slow, panicking) = (&keys[0], &keys[1]);
    client
        .submit(slow, Req::SlowToReplay(600))
        .unwrap()
        .wait()
        .unwrap();
    let answered = client.submit(slow, Req::Call).unwrap().wait().unwrap();
    // The other instance is busy: the round waits for its part, A gives its own.
    let busy = client.submit(&elsewhere, Req::Busy(300)).unwrap();
    thread::sleep(Duration::from_millis(50));
    let round = {
        let cluster = cluster.clone();
        thread::spawn(move || cluster.checkpoint())
    };
    thread::sleep(Duration::from_millis(50));
    // A restarts and folds its keys from the checkpoint before the round's, for 600 ms
    // before it reaches the call; the round completes meanwhile.
    assert!(
        client
            .submit(panicking, Req::CallThenPanic)
            .unwrap()
            .wait()
            .is_err()
    );
    busy.wait().unwrap();
    round.join().unwrap().unwrap();
    let now = client.query(slow, |s: &u64| *s).unwrap().wait().unwrap();
    assert_eq!(client.owner_of(slow), Some(a));
    let made = made.lock().clone();
    assert!(
        made.values().all(|&n| n == 1),
        "an outside call ran again in a rebuild: {made:?}"
    );
    assert_eq!(
        now, answered,
        "the rebuilt state is not the one its last request was answered with"
    );
    let metrics = cluster.metrics();
    assert!(metrics.checkpoint_offset.is_some(), "the round completed");
    assert_eq!(
        metrics
            .instances
            .iter()
            .map(|i| u64::from(i.restarts))
            .sum::<u64>(),
        1
    );
    Arc::try_unwrap(cluster)
        .ok()
        .expect("the only handle")
        .shutdown()
        .unwrap();
}

#[test]
fn a_checkpoint_during_a_restart_rebuild_keeps_the_journals_answers() {
    a_checkpoint_during_a_restart_rebuild_keeps_what_it_folds(false);
}

#[test]
fn a_checkpoint_during_a_restart_rebuild_keeps_the_log_it_reads() {
    a_checkpoint_during_a_restart_rebuild_keeps_what_it_folds(true);
}

/// What a checkpoint keeps for a rebuild folding from an older one, it keeps only while
/// that rebuild's instance is live: a rebuild stuck in a replayed request (its instance
/// declared stalled and replaced, its thread never coming back) held everything back
/// for good, and no later checkpoint truncated the log or forgot a journaled answer.
#[test]
fn a_rebuild_stuck_for_good_holds_nothing_back_once_its_instance_is_replaced() {
    #[derive(Clone, Copy, Debug, Serialize, Deserialize)]
    enum Hang {
        Add(u64),
        /// Hangs on its first replay once `armed`, until `release`.
        OnReplay,
        /// Panics live.
        Panic,
    }

    #[derive(Clone, Default)]
    struct Hanging {
        armed: Arc<std::sync::atomic::AtomicBool>,
        hung: Arc<std::sync::atomic::AtomicBool>,
        release: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Handler for Hanging {
        type State = u64;
        type Request = Hang;
        type Response = u64;
        fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, req: Hang) -> u64 {
            match req {
                Hang::Add(n) => *total += n,
                Hang::OnReplay => {
                    if ctx.is_replay()
                        && self.armed.load(Ordering::SeqCst)
                        && !self.hung.swap(true, Ordering::SeqCst)
                    {
                        while !self.release.load(Ordering::SeqCst) {
                            thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                Hang::Panic if !ctx.is_replay() => panic!("panics live"),
                Hang::Panic => {}
            }
            *total
        }
    }

    let handler = Hanging::default();
    let input = Arc::new(MemoryStore::new());
    let cluster = Cluster::builder(handler.clone())
        .stores(input.clone(), Some(Arc::new(MemoryStore::new())))
        .instances(1)
        .checkpoint_every(u64::MAX)
        .truncate_after_checkpoint(true)
        .retry_window(0)
        // One stall is meant: the rebuild's hang, which lasts until the test releases it.
        // The panic below is a unit of work too, and with RUST_BACKTRACE=1 the first
        // panic of a debug test process takes over 200 ms to print its backtrace on a
        // loaded machine; 3 s keeps it (and a descheduled thread) from counting as a
        // second stall.
        .stall_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let client = cluster.client();
    client.submit("k", Hang::Add(1)).unwrap().wait().unwrap();
    let first = cluster.checkpoint().unwrap();
    // After the checkpoint: replayed by the restart below, and hanging there.
    client.submit("k", Hang::OnReplay).unwrap().wait().unwrap();
    handler.armed.store(true, Ordering::SeqCst);
    assert!(client.submit("k", Hang::Panic).unwrap().wait().is_err());
    let hung = std::time::Instant::now();
    while !handler.hung.load(Ordering::SeqCst) {
        assert!(
            hung.elapsed() < Duration::from_secs(10),
            "the rebuild never hung"
        );
        thread::sleep(Duration::from_millis(5));
    }
    // Its replacement serves the key; checkpoints go on, and truncate the log.
    let served = client.query("k", |t: &u64| *t).unwrap();
    assert_eq!(served.wait_timeout(Duration::from_secs(20)).unwrap(), 1);
    assert_eq!(cluster.metrics().stalls, 1);
    let mut last = first;
    for _ in 0..3 {
        client.submit("k", Hang::Add(10)).unwrap().wait().unwrap();
        last = cluster.checkpoint().unwrap();
    }
    let start = input.start_offset();
    handler.release.store(true, Ordering::SeqCst);
    assert_eq!(
        start, last,
        "the log was not truncated past the stuck rebuild's checkpoint at {first}"
    );
    cluster.shutdown().unwrap();
}
