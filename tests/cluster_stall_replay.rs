//! Stalls during a rebuild: a replayed request that hangs is seen by the supervisor like
//! a live one, and a request that stalls twice is set aside like one whose handler
//! panicked, so that one bad request cannot take a key (and every key of its owner) down
//! for good.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Client, Cluster, Context, Handler};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Req {
    Add(u64),
    /// Hangs (live and on replay alike) until released, then adds 1000.
    Hang,
    /// Adds 100; the first time it is replayed, hangs until released.
    SlowOnFirstReplay,
    /// Adds 100; its first and third runs hang until released, the others take no time.
    SlowFirstAndThird,
    /// Adds 10; each replay takes `replay_ms`.
    SlowReplays,
    Panic,
    Get,
}

/// Sums what it is asked to add; counts the runs of the requests that hang.
#[derive(Clone, Default)]
struct Sum {
    release: Arc<AtomicBool>,
    hang_runs: Arc<AtomicU64>,
    replayed_slow: Arc<AtomicBool>,
    runs: Arc<AtomicU64>,
    replay_ms: Arc<AtomicU64>,
}

impl Sum {
    fn hang_until_released(&self) {
        let since = Instant::now();
        while !self.release.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(60) {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Handler for Sum {
    type State = u64;
    type Request = Req;
    type Response = u64;

    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], sum: &mut u64, req: Req) -> u64 {
        match req {
            Req::Add(n) => *sum += n,
            Req::Hang => {
                self.hang_runs.fetch_add(1, Ordering::SeqCst);
                self.hang_until_released();
                *sum += 1000;
            }
            Req::SlowOnFirstReplay => {
                if ctx.is_replay() && !self.replayed_slow.swap(true, Ordering::SeqCst) {
                    self.hang_runs.fetch_add(1, Ordering::SeqCst);
                    self.hang_until_released();
                }
                *sum += 100;
            }
            Req::SlowFirstAndThird => {
                if matches!(self.runs.fetch_add(1, Ordering::SeqCst), 0 | 2) {
                    // Held, not slept: each of these runs must be declared stalled
                    // however late the supervisor looks.
                    self.hang_until_released();
                }
                *sum += 100;
            }
            Req::SlowReplays => {
                if ctx.is_replay() {
                    let ms = self.replay_ms.load(Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(ms));
                }
                *sum += 10;
            }
            Req::Panic => panic!("asked to"),
            Req::Get => {}
        }
        *sum
    }
}

/// The stall timeout. The stalls these tests mean are requests held until released, or
/// replays slept well past it; what must not stall is everything else: fast requests and
/// replays, which a descheduled thread (0.5 s and more on a loaded machine) stretched
/// past the 300 ms this was, and panics, whose backtrace takes a while to print (see
/// `warm_up_backtraces`).
const STALL: Duration = Duration::from_secs(1);

fn cluster(dir: &std::path::Path, handler: Sum) -> Cluster<Sum> {
    warm_up_backtraces();
    Cluster::builder(handler)
        .dir(dir)
        .instances(2)
        .stall_timeout(STALL)
        .supervise_every(Duration::from_millis(5))
        .build()
        .unwrap()
}

/// Asks for `key`'s state, bounded only to catch a hang.
fn state_of(client: &Client<Sum>, key: &str) -> u64 {
    client
        .submit(key, Req::Get)
        .unwrap()
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("state of {key}: {e}"))
}

const KEYS: u64 = 12;

/// Has this process print its first panic's backtrace now, outside any stall timeout.
/// With RUST_BACKTRACE=1 the first panic of a debug test process loads the debug symbols
/// for its backtrace, which took over 200 ms on a loaded machine: a handler's panic that
/// slow is declared a stall as well, changing the stall and run counts checked here.
fn warm_up_backtraces() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = std::panic::catch_unwind(|| panic!("warming up backtraces (not a failure)"));
    });
}

fn key(i: u64) -> String {
    format!("key-{i}")
}

#[test]
fn a_request_that_hangs_live_and_on_replay_is_set_aside_after_its_second_stall() {
    let dir = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let (release, hang_runs) = (handler.release.clone(), handler.hang_runs.clone());
    let c = cluster(dir.path(), handler);
    let client = c.client();
    // Keys on both instances, each with a state to rebuild.
    let mut expected: Vec<u64> = (0..KEYS).map(|i| i + 1).collect();
    for i in 0..KEYS {
        client
            .submit(key(i), Req::Add(i + 1))
            .unwrap()
            .wait()
            .unwrap();
    }
    let stuck = key(0);
    let hang = client.submit(&stuck, Req::Hang).unwrap();
    // Queued behind it, on its key and on the other keys of its instance.
    let owner = client.owner_of(&stuck).unwrap();
    let mut behind = Vec::new();
    for i in (0..KEYS).filter(|&i| client.owner_of(key(i)) == Some(owner)) {
        expected[i as usize] += 10;
        behind.push((
            i,
            expected[i as usize],
            client.submit(key(i), Req::Add(10)).unwrap(),
        ));
    }
    // Once live, once replayed by the new owner: set aside at the second stall, long
    // before the handler would return.
    let answer = hang.wait_timeout(Duration::from_secs(10));
    assert!(
        matches!(&answer, Err(Error::HandlerStalled { offset, .. }) if *offset == hang.offset()),
        "the request that stalled twice was set aside: {answer:?}"
    );
    assert!(
        c.metrics().stalls >= 2,
        "the stall in the rebuild was reported: {:?}",
        c.metrics()
    );
    for (i, want, pending) in behind {
        assert_eq!(
            pending.wait_timeout(Duration::from_secs(10)).unwrap(),
            want,
            "request queued behind the hanging one on {}",
            key(i)
        );
    }
    // Every key still answers, with the fold of its requests but the one set aside.
    for i in 0..KEYS {
        expected[i as usize] += 1;
        let got = client
            .submit(key(i), Req::Add(1))
            .unwrap()
            .wait_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{} after the stalls: {e}", key(i)));
        assert_eq!(got, expected[i as usize], "{}", key(i));
    }
    assert_eq!(
        hang_runs.load(Ordering::SeqCst),
        2,
        "run live, then once in a replay; never again"
    );
    // The stalled instances wake up at last: they apply and answer nothing.
    release.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(300));
    for i in 0..KEYS {
        assert_eq!(
            state_of(&client, &key(i)),
            expected[i as usize],
            "{}",
            key(i)
        );
    }
    drop(client);
    // Stopped without a checkpoint: the next open replays the whole log, and the mark
    // keeps the request out of it.
    drop(c);
    let handler = Sum::default();
    handler.release.store(true, Ordering::SeqCst);
    let hang_runs = handler.hang_runs.clone();
    let again = cluster(dir.path(), handler);
    let client = again.client();
    for i in 0..KEYS {
        assert_eq!(
            state_of(&client, &key(i)),
            expected[i as usize],
            "{}",
            key(i)
        );
    }
    assert_eq!(hang_runs.load(Ordering::SeqCst), 0, "the mark is durable");
    drop(client);
    again.shutdown().unwrap();
}

#[test]
fn a_replayed_request_that_stalls_once_is_reported_and_folded_once() {
    let dir = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let (release, hang_runs) = (handler.release.clone(), handler.hang_runs.clone());
    let c = cluster(dir.path(), handler);
    let client = c.client();
    client.submit("k", Req::Add(1)).unwrap().wait().unwrap();
    let slow = client.submit("k", Req::SlowOnFirstReplay).unwrap();
    assert_eq!(slow.wait().unwrap(), 101, "live, it is handled at once");
    // The panic restarts the instance, whose rebuild replays the slow request: it hangs
    // there the first time.
    assert!(matches!(
        client.submit("k", Req::Panic).unwrap().wait(),
        Err(Error::HandlerPanicked { .. })
    ));
    let next = client.submit("k", Req::Add(1)).unwrap();
    let answer = next.wait_timeout(Duration::from_secs(10));
    assert_eq!(
        answer.ok(),
        Some(102),
        "answered by the new owner, the slow request folded once; metrics {:?}",
        c.metrics()
    );
    assert!(
        c.metrics().stalls >= 1,
        "the stall in the rebuild was reported"
    );
    assert_eq!(hang_runs.load(Ordering::SeqCst), 1);
    release.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        state_of(&client, "k"),
        102,
        "the stalled rebuild applied nothing"
    );
    drop(client);
    drop(c);
    // A first stall marks nothing: the request is in the state after a restart.
    let handler = Sum::default();
    handler.release.store(true, Ordering::SeqCst);
    let again = cluster(dir.path(), handler);
    assert_eq!(state_of(&again.client(), "k"), 102);
    again.shutdown().unwrap();
}

/// Two stalls with a completed run between are two first stalls: the request that was
/// answered keeps its place in the state.
#[test]
fn stalls_with_a_completed_run_between_set_nothing_aside() {
    let dir = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let (release, runs) = (handler.release.clone(), handler.runs.clone());
    let c = cluster(dir.path(), handler);
    let client = c.client();
    client.submit("k", Req::Add(1)).unwrap().wait().unwrap();
    // Stalls live; its key's new owner replays it at once and answers it.
    let first = client.submit("k", Req::SlowFirstAndThird).unwrap();
    assert_eq!(first.wait_timeout(Duration::from_secs(10)).ok(), Some(101));
    // The panic restarts the key's instance, whose rebuild stalls on it again.
    assert!(matches!(
        client.submit("k", Req::Panic).unwrap().wait(),
        Err(Error::HandlerPanicked { .. })
    ));
    let next = client.submit("k", Req::Add(1)).unwrap();
    assert_eq!(
        next.wait_timeout(Duration::from_secs(10)).ok(),
        Some(102),
        "the answered request is still folded; metrics {:?}",
        c.metrics()
    );
    assert!(c.metrics().stalls >= 2, "both stalls were reported");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        4,
        "run live, then in three rebuilds"
    );
    // Let the stalled runs end: they apply and answer nothing.
    release.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(state_of(&client, "k"), 102);
    drop(client);
    drop(c);
    // Its replays run through at once now: what is checked is that nothing was marked.
    let handler = Sum::default();
    handler.release.store(true, Ordering::SeqCst);
    let again = cluster(dir.path(), handler);
    assert_eq!(state_of(&again.client(), "k"), 102, "nothing was marked");
    again.shutdown().unwrap();
}

/// A request answered live within the stall timeout whose replays run past it (a loaded
/// machine): its answer stands, so it cannot be set aside, and replacing each instance
/// that replays it at every stall timeout would replace instances for good. Each
/// replacement it costs doubles the time its next replay gets: here the second replay,
/// given twice the timeout, ends, and the key is served again.
#[test]
fn an_answered_request_whose_replays_outlast_the_stall_timeout_ends_replaced_twice_at_most() {
    let tmp = tempfile::tempdir().unwrap();
    let handler = Sum::default();
    let replay_ms = handler.replay_ms.clone();
    let cluster = cluster(tmp.path(), handler);
    let client = cluster.client();
    assert_eq!(
        client
            .submit("slow", Req::SlowReplays)
            .unwrap()
            .wait()
            .unwrap(),
        10
    );
    // From now on a replay of it takes 1.3 s, past the 1 s stall timeout and within
    // twice it (0.7 s to spare for a descheduled replay). A panic on the key has its
    // state rebuilt: replayed.
    replay_ms.store(1_300, Ordering::SeqCst);
    let panicked = client.submit("slow", Req::Panic).unwrap().wait();
    assert!(
        matches!(panicked, Err(Error::HandlerPanicked { .. })),
        "{panicked:?}"
    );
    let since = Instant::now();
    let state = client
        .submit("slow", Req::Get)
        .unwrap()
        .wait_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the key was not served again: {e}"));
    assert_eq!(state, 10);
    let stalls = cluster.metrics().stalls;
    // Long enough for two more rounds of replacements at the stall timeout.
    thread::sleep(STALL * 5 / 2);
    assert_eq!(cluster.metrics().stalls, stalls, "replacements went on");
    assert!(stalls <= 2, "{stalls} stalls in {:?}", since.elapsed());
    for i in 0..KEYS {
        client.submit(key(i), Req::Add(1)).unwrap().wait().unwrap();
    }
    assert_eq!(state_of(&client, "slow"), 10);
    cluster.shutdown().unwrap();
}
