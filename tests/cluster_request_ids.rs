//! Requests submitted with an id (`Client::submit_with_id`): a retry of one already
//! logged is refused as `Error::Duplicate` and applied once, across threads, restarts
//! and SIGKILLs, within the retry window.

mod common;
#[path = "support/kill.rs"]
mod kill;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, ClusterBuilder, RequestId};
use cauce::store::{LogOptions, Store, SyncPolicy};
use common::{Gated, Req, Resp, Service, Tally};
use rand::{RngExt, SeedableRng};

fn state(cluster: &Cluster<Service>, key: &str) -> Tally {
    match cluster
        .client()
        .submit(key, Req::Get)
        .expect("submit")
        .wait()
    {
        Ok(Resp::State(t)) => t,
        other => panic!("state of {key}: {other:?}"),
    }
}

fn in_memory(instances: usize) -> ClusterBuilder<Service> {
    Cluster::builder(Service::default())
        .in_memory()
        .instances(instances)
}

fn on_disk(dir: &Path) -> ClusterBuilder<Service> {
    Cluster::builder(Service::default())
        .dir(dir)
        .log_options(LogOptions::new().sync(SyncPolicy::Always))
        .instances(3)
}

#[test]
fn a_retry_is_refused_with_the_first_offset_and_applied_once() {
    let cluster = in_memory(2).build().expect("build");
    let client = cluster.client();
    let first = client
        .submit_with_id("alice", RequestId(1), Req::Add(5))
        .expect("submit");
    let offset = first.offset();
    assert_eq!(first.wait().expect("answer"), Resp::Sum(5));
    for _ in 0..3 {
        match client.submit_with_id("alice", RequestId(1), Req::Add(5)) {
            Err(Error::Duplicate { id, offset: at }) => {
                assert_eq!(id, RequestId(1));
                assert_eq!(at, offset);
            }
            other => panic!("a retry was not refused: {other:?}"),
        }
    }
    // Another id of the same key, and the same id of another key, are new requests.
    let other_id = client
        .submit_with_id("alice", RequestId(2), Req::Add(7))
        .expect("submit");
    assert_eq!(other_id.wait().expect("answer"), Resp::Sum(12));
    let other_key = client
        .submit_with_id("bob", RequestId(1), Req::Add(3))
        .expect("submit");
    assert_eq!(other_key.wait().expect("answer"), Resp::Sum(3));
    // Requests without ids are never refused.
    client
        .submit("alice", Req::Add(1))
        .expect("submit")
        .wait()
        .expect("answer");
    client
        .submit("alice", Req::Add(1))
        .expect("submit")
        .wait()
        .expect("answer");
    assert_eq!(state(&cluster, "alice").sum, 14);
    assert_eq!(state(&cluster, "alice").count, 4);
    assert_eq!(cluster.metrics().duplicates, 3);
    cluster.shutdown().expect("shutdown");
}

#[test]
fn concurrent_submits_of_one_id_apply_it_once() {
    let cluster = in_memory(3).build().expect("build");
    const THREADS: usize = 6;
    const IDS: u128 = 300;
    let barrier = Barrier::new(THREADS);
    let accepted: Vec<u128> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let client = cluster.client();
                let barrier = &barrier;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for id in 0..IDS {
                        if id % 50 == 0 {
                            barrier.wait();
                        }
                        let key = format!("k{}", id % 4);
                        match client.submit_with_id(&key, RequestId(id), Req::Add(1)) {
                            Ok(p) => {
                                p.wait().expect("answer");
                                mine.push(id);
                            }
                            Err(Error::Duplicate { .. }) => {}
                            Err(e) => panic!("submit {id}: {e}"),
                        }
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut seen = accepted.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), accepted.len(), "an id was accepted twice");
    assert_eq!(seen.len() as u128, IDS, "every id was accepted once");
    let total: u64 = (0..4)
        .map(|k| state(&cluster, &format!("k{k}")).count)
        .sum();
    assert_eq!(total, IDS as u64);
    assert_eq!(
        cluster.metrics().duplicates,
        (THREADS as u64 - 1) * IDS as u64
    );
    cluster.shutdown().expect("shutdown");
}

#[test]
fn ids_are_remembered_across_a_restart() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    // Checkpoints every 10 requests: the ids read back at open lie before the last
    // checkpoint as well as after it.
    let builder = || on_disk(&dir).checkpoint_every(10);
    let mut offsets = HashMap::new();
    {
        let cluster = builder().build().expect("build");
        let client = cluster.client();
        for id in 0..40u128 {
            let key = format!("k{}", id % 3);
            let p = client
                .submit_with_id(&key, RequestId(id), Req::Add(1))
                .expect("submit");
            offsets.insert(id, p.offset());
            p.wait().expect("answer");
        }
        cluster.shutdown().expect("shutdown");
    }
    let cluster = builder().build().expect("reopen");
    let client = cluster.client();
    for id in 0..40u128 {
        let key = format!("k{}", id % 3);
        match client.submit_with_id(&key, RequestId(id), Req::Add(1)) {
            Err(Error::Duplicate { offset, .. }) => assert_eq!(offset, offsets[&id]),
            other => panic!("retry of {id} after the restart: {other:?}"),
        }
    }
    let total: u64 = (0..3)
        .map(|k| state(&cluster, &format!("k{k}")).count)
        .sum();
    assert_eq!(total, 40);
    cluster.shutdown().expect("shutdown");
}

#[test]
fn a_retry_older_than_the_window_is_a_new_request() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let builder = || on_disk(&dir).retry_window(8);
    {
        let cluster = builder().build().expect("build");
        let client = cluster.client();
        let first = client
            .submit_with_id("a", RequestId(1), Req::Add(1))
            .expect("submit");
        let first_offset = first.offset();
        first.wait().expect("answer");
        // Within the window: refused.
        assert!(matches!(
            client.submit_with_id("a", RequestId(1), Req::Add(1)),
            Err(Error::Duplicate { .. })
        ));
        // Remembered for at least the window, at most twice it.
        for i in 0..16u128 {
            client
                .submit_with_id("b", RequestId(100 + i), Req::Add(1))
                .expect("submit")
                .wait()
                .expect("answer");
            if i < 7 {
                assert!(matches!(
                    client.submit_with_id("a", RequestId(1), Req::Add(1)),
                    Err(Error::Duplicate { offset, .. }) if offset == first_offset
                ));
            }
        }
        // Sixteen records later, id 1 is forgotten: applied again, as documented.
        client
            .submit_with_id("a", RequestId(1), Req::Add(1))
            .expect("submit")
            .wait()
            .expect("answer");
        assert_eq!(state(&cluster, "a").count, 2);
        cluster.shutdown().expect("shutdown");
    }
    // After a restart, the ids among the last 8 records are remembered, and no older
    // (the log's first records are not read).
    let cluster = builder().build().expect("reopen");
    let client = cluster.client();
    assert!(matches!(
        client.submit_with_id("a", RequestId(1), Req::Add(1)),
        Err(Error::Duplicate { .. })
    ));
    assert!(matches!(
        client.submit_with_id("b", RequestId(115), Req::Add(1)),
        Err(Error::Duplicate { .. })
    ));
    client
        .submit_with_id("b", RequestId(100), Req::Add(1))
        .expect("an id older than the window after a restart")
        .wait()
        .expect("answer");
    assert_eq!(state(&cluster, "b").count, 17);
    cluster.shutdown().expect("shutdown");
}

#[test]
fn an_id_refused_for_room_can_be_submitted_again() {
    let cluster = in_memory(1)
        .queue_capacity(2)
        .stall_timeout(Duration::from_secs(60))
        .build()
        .expect("build");
    let client = cluster.client();
    // Holds its room until it is answered: two seconds, far longer than the submits
    // below take on a loaded machine (at 300 ms its room once came back before them).
    let stuck = client.submit("k", Req::Stall(2_000)).expect("submit");
    let queued = client
        .try_submit_with_id("k", RequestId(1), Req::Add(1))
        .expect("room for one more");
    match client.try_submit_with_id("k", RequestId(2), Req::Add(2)) {
        Err(Error::Busy { .. }) => {}
        other => panic!("a full queue should refuse: {other:?}"),
    }
    // Refused for room, id 2 was never logged: its retry is a new request. A retry of
    // id 1, queued and logged, is a duplicate even before it is handled.
    assert!(matches!(
        client.try_submit_with_id("k", RequestId(1), Req::Add(1)),
        Err(Error::Duplicate { .. })
    ));
    stuck.wait().expect("answer");
    queued.wait().expect("answer");
    client
        .submit_with_id("k", RequestId(2), Req::Add(2))
        .expect("the id refused for room")
        .wait()
        .expect("answer");
    assert_eq!(state(&cluster, "k").sum, 1 + 1 + 2);
    cluster.shutdown().expect("shutdown");
}

#[test]
fn a_batch_logs_its_new_requests_and_resolves_its_duplicates() {
    let cluster = in_memory(3).build().expect("build");
    let client = cluster.client();
    let first = client
        .submit_with_id("a", RequestId(1), Req::Add(1))
        .expect("submit");
    let first_at = first.offset();
    first.wait().expect("answer");
    let before = cluster.metrics().next_offset;
    // id 1 of a: logged before; id 2 of b: new, then again in this batch; id 1 of c:
    // new (ids are per key).
    let batch = [
        ("a", RequestId(1), Req::Add(10)),
        ("b", RequestId(2), Req::Add(20)),
        ("b", RequestId(2), Req::Add(20)),
        ("c", RequestId(1), Req::Add(30)),
    ];
    let pendings = client.submit_batch_with_ids(batch).expect("batch");
    assert_eq!(
        cluster.metrics().next_offset,
        before + 2,
        "two records logged"
    );
    let offsets: Vec<u64> = pendings.iter().map(|p| p.offset()).collect();
    assert_eq!(
        offsets[0], first_at,
        "a duplicate's pending names the first"
    );
    assert_eq!(
        offsets[2], offsets[1],
        "the second of the batch names the first"
    );
    let answers: Vec<_> = pendings.into_iter().map(|p| p.wait()).collect();
    assert!(
        matches!(answers[0], Err(Error::Duplicate { id: RequestId(1), offset }) if offset == first_at)
    );
    assert_eq!(answers[1].as_ref().ok(), Some(&Resp::Sum(20)));
    assert!(
        matches!(answers[2], Err(Error::Duplicate { id: RequestId(2), offset }) if offset == offsets[1])
    );
    assert_eq!(answers[3].as_ref().ok(), Some(&Resp::Sum(30)));
    assert_eq!(cluster.metrics().duplicates, 2);
    // A batch of duplicates only logs nothing; a batch of one with an id, too.
    let again = client
        .submit_batch_with_ids([
            ("b", RequestId(2), Req::Add(20)),
            ("c", RequestId(1), Req::Add(30)),
        ])
        .expect("batch");
    let one = client
        .submit_batch_with_ids([("a", RequestId(1), Req::Add(10))])
        .expect("batch of one");
    assert_eq!(
        cluster.metrics().next_offset,
        before + 2,
        "nothing more logged"
    );
    for p in again.into_iter().chain(one) {
        assert!(matches!(p.wait(), Err(Error::Duplicate { .. })));
    }
    // A single retry of a batch's request is refused too.
    assert!(matches!(
        client.submit_with_id("c", RequestId(1), Req::Add(30)),
        Err(Error::Duplicate { .. })
    ));
    for (key, sum) in [("a", 1), ("b", 20), ("c", 30)] {
        assert_eq!(state(&cluster, key).sum, sum, "{key}");
    }
    cluster.shutdown().expect("shutdown");
}

#[test]
fn a_redelivered_batch_larger_than_a_queue_takes_no_room() {
    let cluster = in_memory(1).queue_capacity(2).build().expect("build");
    let client = cluster.client();
    for id in 0..3u64 {
        client
            .submit_with_id("k", RequestId::from(id), Req::Add(1))
            .expect("submit")
            .wait()
            .expect("answer");
    }
    let load = cluster.metrics().instances[0].requests;
    let again = || (0..3u64).map(|id| ("k", RequestId::from(id), Req::Add(1)));
    let pendings = client
        .submit_batch_with_ids(again())
        .expect("a batch of duplicates is not too large");
    let async_pendings =
        block_on(client.submit_batch_with_ids_async(again())).expect("nor as a future");
    for p in pendings.into_iter().chain(async_pendings) {
        assert!(matches!(p.wait(), Err(Error::Duplicate { .. })));
    }
    // Mixed with a new request, only that one takes room.
    let mixed = client
        .submit_batch_with_ids(again().chain([("k", RequestId(9), Req::Add(1))]))
        .expect("batch");
    let answers: Vec<_> = mixed.into_iter().map(|p| p.wait()).collect();
    assert!(
        answers[..3]
            .iter()
            .all(|a| matches!(a, Err(Error::Duplicate { .. })))
    );
    assert_eq!(answers[3].as_ref().ok(), Some(&Resp::Sum(4)));
    assert_eq!(state(&cluster, "k").count, 4);
    assert_eq!(
        cluster.metrics().instances[0].requests,
        load + 2,
        "the new one and a Get"
    );
    assert_eq!(cluster.metrics().duplicates, 9);
    cluster.shutdown().expect("shutdown");
}

#[test]
fn batches_and_single_submits_of_the_same_ids_apply_each_once() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // On disk under `Always` (async batches append on appender threads), and in memory.
    let clusters = [
        on_disk(&tmp.path().join("cluster")).build().expect("build"),
        in_memory(3).build().expect("build"),
    ];
    for cluster in clusters {
        const IDS: u128 = 200;
        std::thread::scope(|s| {
            for t in 0..4u128 {
                let client = cluster.client();
                s.spawn(move || {
                    let mut id = t % 3;
                    while id < IDS {
                        let n = 1 + (id % 4) as usize;
                        let items: Vec<_> = (0..n as u128)
                            .map(|k| id + k)
                            .filter(|&i| i < IDS)
                            .map(|i| (format!("k{}", i % 5), RequestId(i), Req::Add(1)))
                            .collect();
                        let pendings = match t {
                            0 => items
                                .into_iter()
                                .filter_map(|(k, i, r)| match client.submit_with_id(k, i, r) {
                                    Ok(p) => Some(p),
                                    Err(Error::Duplicate { .. }) => None,
                                    Err(e) => panic!("{e}"),
                                })
                                .collect(),
                            1 => {
                                block_on(client.submit_batch_with_ids_async(items)).expect("batch")
                            }
                            _ => client.submit_batch_with_ids(items).expect("batch"),
                        };
                        for p in pendings {
                            match p.wait() {
                                Ok(_) | Err(Error::Duplicate { .. }) => {}
                                Err(e) => panic!("{e}"),
                            }
                        }
                        id += n as u128;
                    }
                });
            }
        });
        let total: u64 = (0..5)
            .map(|k| state(&cluster, &format!("k{k}")).count)
            .sum();
        assert_eq!(total, IDS as u64, "each id applied once");
        cluster.shutdown().expect("shutdown");
    }
}

#[test]
fn a_retry_of_a_request_set_aside_is_a_new_request() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let cluster = on_disk(&dir).build().expect("build");
    let client = cluster.client();
    // Its handler panics: the request is set aside, changes nothing, and its id is free.
    let first = client
        .submit_with_id("k", RequestId(1), Req::Panic)
        .expect("submit");
    assert!(matches!(first.wait(), Err(Error::HandlerPanicked { .. })));
    client
        .submit_with_id("k", RequestId(1), Req::Add(5))
        .expect("a retry of a request set aside is logged")
        .wait()
        .expect("answer");
    assert!(matches!(
        client.submit_with_id("k", RequestId(1), Req::Add(5)),
        Err(Error::Duplicate { .. })
    ));
    cluster.shutdown().expect("shutdown");
    // After a restart too: the open reads the set-aside mark and the retry's id.
    let cluster = on_disk(&dir).build().expect("reopen");
    assert!(matches!(
        cluster
            .client()
            .submit_with_id("k", RequestId(1), Req::Add(5)),
        Err(Error::Duplicate { .. })
    ));
    assert_eq!(state(&cluster, "k").sum, 5);
    cluster.shutdown().expect("shutdown");
}

#[test]
fn a_clean_restart_with_truncation_remembers_the_window() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let builder = || {
        on_disk(&dir)
            .truncate_after_checkpoint(true)
            .checkpoint_every(20)
    };
    {
        let cluster = builder().build().expect("build");
        let client = cluster.client();
        for id in 0..100u128 {
            client
                .submit_with_id("k", RequestId(id), Req::Add(1))
                .expect("submit")
                .wait()
                .expect("answer");
        }
        // The shutdown checkpoints, and truncates before that checkpoint but for the
        // last `retry_window` records.
        cluster.shutdown().expect("shutdown");
    }
    let cluster = builder().build().expect("reopen");
    for id in 0..100u128 {
        assert!(
            matches!(
                cluster
                    .client()
                    .submit_with_id("k", RequestId(id), Req::Add(1)),
                Err(Error::Duplicate { .. })
            ),
            "id {id}"
        );
    }
    assert_eq!(state(&cluster, "k").count, 100);
    cluster.shutdown().expect("shutdown");
}

/// Counts its outside calls, and adds what it is asked to.
#[derive(Default, Clone)]
struct Calling {
    calls: Arc<std::sync::atomic::AtomicU64>,
}

impl cauce::cluster::Handler for Calling {
    type State = u64;
    type Request = u64;
    type Response = u64;

    fn handle(
        &self,
        ctx: &mut cauce::cluster::Context<'_>,
        _: &[u8],
        total: &mut u64,
        add: u64,
    ) -> u64 {
        let calls = self.calls.clone();
        let _: u64 = ctx
            .call("count", move |_| calls.fetch_add(1, Ordering::SeqCst))
            .expect("journal");
        *total += add;
        *total
    }
}

/// Truncation keeps the head of a log shorter than the retry window, and with it the
/// journal of its outside calls: a rebuild from the log, or a replay, of the requests
/// before the checkpoint gets their recorded answers, and calls nothing again.
#[test]
fn what_truncation_keeps_of_the_log_keeps_its_outside_calls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = Calling::default();
    let cluster = Cluster::builder(first.clone())
        .dir(dir.path())
        .checkpoint_every(u64::MAX)
        .truncate_after_checkpoint(true)
        .build()
        .expect("build");
    let mut offsets = Vec::new();
    for i in 1..=5 {
        let p = cluster.client().submit("k", i).expect("submit");
        offsets.push(p.offset());
        p.wait().expect("answer");
    }
    cluster.checkpoint().expect("checkpoint");
    cluster.shutdown().expect("shutdown");
    assert_eq!(first.calls.load(Ordering::SeqCst), 5);

    let replay = cauce::cluster::Replay::open(dir.path(), Calling::default()).expect("replay");
    assert_eq!(
        replay.state_before(b"k", offsets[3]).expect("state"),
        1 + 2 + 3
    );

    let second = Calling::default();
    let cluster = Cluster::builder(second.clone())
        .dir(dir.path())
        .rebuild_from_log(true)
        .build()
        .expect("a log that still starts at 0 rebuilds from it");
    let total = cluster.client().submit("k", 10).expect("submit").wait();
    assert_eq!(total.expect("answer"), 25);
    assert_eq!(
        second.calls.load(Ordering::SeqCst),
        1,
        "only the new request called out"
    );
    cluster.shutdown().expect("shutdown");
}

struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark()
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park_timeout(Duration::from_millis(10)),
        }
    }
}

#[test]
fn async_retries_are_refused_on_both_append_paths() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // On disk under `Always`, appends run on appender threads; in memory, in the poll.
    let clusters = [
        on_disk(&tmp.path().join("cluster")).build().expect("build"),
        Cluster::builder(Service::default())
            .in_memory()
            .build()
            .expect("build"),
    ];
    for cluster in clusters {
        let client = cluster.client();
        let first =
            block_on(client.submit_with_id_async("k", RequestId(9), Req::Add(4))).expect("submit");
        let offset = first.offset();
        assert_eq!(block_on(first).expect("answer"), Resp::Sum(4));
        match block_on(client.submit_with_id_async("k", RequestId(9), Req::Add(4))) {
            Err(Error::Duplicate { offset: at, .. }) => assert_eq!(at, offset),
            other => panic!("an async retry was not refused: {other:?}"),
        }
        // The blocking and async forms share the ids.
        assert!(matches!(
            client.submit_with_id("k", RequestId(9), Req::Add(4)),
            Err(Error::Duplicate { .. })
        ));
        // `request_with_id`: the submit and the answer in one future.
        assert!(matches!(
            block_on(client.request_with_id("k", RequestId(9), Req::Add(4))),
            Err(Error::Duplicate { offset: at, .. }) if at == offset
        ));
        assert_eq!(
            block_on(client.request_with_id("k", RequestId(10), Req::Add(1))).expect("answer"),
            Resp::Sum(5)
        );
        assert_eq!(state(&cluster, "k").sum, 5);
        cluster.shutdown().expect("shutdown");
    }
}

const CHILD_ENV: &str = "CAUCE_REQUEST_IDS_CHILD_DIR";
const ROUNDS: usize = 8;
const KEYS: u64 = 12;

fn crash_builder(dir: &Path) -> ClusterBuilder<Service> {
    on_disk(dir)
        .log_options(
            LogOptions::new()
                .sync(SyncPolicy::Always)
                .segment_bytes(64 << 10),
        )
        .checkpoint_every(200)
        .retry_window(1 << 20)
        .supervise_every(Duration::from_millis(5))
}

/// The child: three threads submitting with fresh ids (one of them in batches),
/// printing `ack try <id> <key> <value>` before each submit and `ack done <id>
/// <offset>` once it is answered.
fn run_child(dir: &Path) {
    let cluster = match crash_builder(dir).build() {
        Ok(c) => c,
        Err(e) => {
            println!("error {e}");
            return;
        }
    };
    // The test harness has printed `test <name> ... ` without a newline: end that line,
    // or the first `try` would be lost in it.
    println!();
    let pid = u128::from(std::process::id());
    std::thread::scope(|s| {
        for t in 0..3u128 {
            let client = cluster.client();
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64((pid * 7 + t) as u64);
                let mut seq = 0u128;
                loop {
                    // The first thread submits batches of 1 to 5, the others one at a time.
                    let n = if t == 0 { rng.random_range(1..6) } else { 1 };
                    let items: Vec<(u128, String, u64)> = (0..n)
                        .map(|_| {
                            seq += 1;
                            let id = (pid << 64) | (t << 48) | seq;
                            let key = format!("k{}", rng.random_range(0..KEYS));
                            (id, key, rng.random_range(1..1000u64))
                        })
                        .collect();
                    {
                        let mut out = std::io::stdout().lock();
                        for (id, key, value) in &items {
                            writeln!(out, "ack try {id} {key} {value}").expect("stdout");
                        }
                        out.flush().expect("stdout");
                    }
                    let requests = items
                        .iter()
                        .map(|(id, key, value)| (key.clone(), RequestId(*id), Req::Add(*value)));
                    let pendings = if t == 0 {
                        client.submit_batch_with_ids(requests).expect("submit")
                    } else {
                        requests
                            .map(|(k, id, r)| client.submit_with_id(k, id, r).expect("submit"))
                            .collect()
                    };
                    for ((id, _, _), pending) in items.iter().zip(pendings) {
                        let offset = pending.offset();
                        pending.wait().expect("answer");
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ack done {id} {offset}").expect("stdout");
                        out.flush().expect("stdout");
                    }
                }
            });
        }
    });
}

/// The client's side of exactly-once: after each SIGKILL, the parent submits again every
/// request the child tried (answered or not) with the same id. Each answered one must be
/// refused as a duplicate at the offset it was answered from; each unanswered one is
/// refused if it reached the log, applied now if not; and every key's state must then
/// be the sum of every request tried for it, each counted once.
#[test]
fn retrying_everything_after_sigkill_applies_each_request_exactly_once() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        run_child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1d5);
    let mut expected: HashMap<String, (u64, u64)> = HashMap::new();
    let mut retried_new = 0;
    let mut retried_duplicate = 0;
    for round in 0..ROUNDS {
        let after = Duration::from_millis(rng.random_range(0..100));
        let lines = kill::run_and_kill(
            "retrying_everything_after_sigkill_applies_each_request_exactly_once",
            CHILD_ENV,
            &dir,
            "ack done ",
            Duration::from_secs(30),
            after,
        );
        let mut tried: Vec<(u128, String, u64)> = Vec::new();
        let mut done: HashMap<u128, u64> = HashMap::new();
        for line in &lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts[..] {
                ["ack", "try", id, key, value] => {
                    if let (Ok(id), Ok(value)) = (id.parse(), value.parse()) {
                        tried.push((id, key.to_string(), value));
                    }
                }
                ["ack", "done", id, offset] => {
                    if let (Ok(id), Ok(offset)) = (id.parse(), offset.parse()) {
                        done.insert(id, offset);
                    }
                }
                _ => {} // a line cut by the kill
            }
        }
        assert!(
            !done.is_empty(),
            "round {round}: the child answered requests"
        );
        let cluster = crash_builder(&dir)
            .build()
            .unwrap_or_else(|e| panic!("round {round}: recovery failed: {e}"));
        let client = cluster.client();
        // Odd rounds retry in batches of 7, even rounds one at a time.
        let outcomes: Vec<cauce::Result<Resp>> = if round % 2 == 1 {
            tried
                .chunks(7)
                .flat_map(|chunk| {
                    let requests = chunk
                        .iter()
                        .map(|(id, key, value)| (key.clone(), RequestId(*id), Req::Add(*value)));
                    let pendings = client.submit_batch_with_ids(requests).expect("batch");
                    pendings.into_iter().map(|p| {
                        let offset = p.offset();
                        p.wait().map_err(|e| match e {
                            // The pending names the first request's offset too.
                            Error::Duplicate { id, offset: at } if at == offset => {
                                Error::Duplicate { id, offset }
                            }
                            e => panic!("round {round}: {e}, pending at {offset}"),
                        })
                    })
                })
                .collect()
        } else {
            tried
                .iter()
                .map(|(id, key, value)| {
                    client
                        .submit_with_id(key, RequestId(*id), Req::Add(*value))
                        .and_then(|p| p.wait())
                })
                .collect()
        };
        for ((id, key, value), outcome) in tried.iter().zip(outcomes) {
            match outcome {
                Err(Error::Duplicate { offset, .. }) => {
                    if let Some(&answered) = done.get(id) {
                        assert_eq!(offset, answered, "round {round}: id {id}'s first offset");
                    }
                    retried_duplicate += 1;
                }
                Ok(_) => {
                    assert!(
                        !done.contains_key(id),
                        "round {round}: id {id} was answered before the kill, and applied again"
                    );
                    retried_new += 1;
                }
                Err(e) => panic!("round {round}: retry of {id}: {e}"),
            }
            let want = expected.entry(key.clone()).or_default();
            want.0 += value;
            want.1 += 1;
        }
        for (key, (sum, count)) in &expected {
            let got = state(&cluster, key);
            if (got.sum, got.count) != (*sum, *count) {
                for (id, k, v) in &tried {
                    if k == key {
                        eprintln!("tried {id} {k} {v}, answered at {:?}", done.get(id));
                    }
                }
            }
            assert_eq!(
                (got.sum, got.count),
                (*sum, *count),
                "round {round}: {key} holds each request tried once"
            );
        }
        cluster.shutdown().expect("shutdown");
    }
    assert!(
        retried_duplicate > 0,
        "the retries met requests already logged"
    );
    eprintln!("retries: {retried_duplicate} refused as duplicates, {retried_new} new");
}

/// Waits until `done()` holds, at most 30 s.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    common::wait_until(what, Duration::from_secs(30), done);
}

/// A retry waiting for its first's fdatasync holds no lock the other submits need: a
/// submit with an id of another key appends meanwhile.
#[test]
fn a_retry_waiting_for_the_disk_holds_up_no_other_submit() {
    let input = Arc::new(Gated {
        disk: true,
        ..Gated::default()
    });
    let cluster = Cluster::builder(Service::default())
        .stores(input.clone(), None)
        .instances(1)
        .build()
        .expect("cluster");
    input.held.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let c1 = cluster.client();
        let before = input.live.next_offset();
        s.spawn(move || {
            c1.submit_with_id("a", RequestId(1), Req::Add(1))
                .map(|_| ())
        });
        wait_until("first appended", || input.live.next_offset() == before + 1);
        wait_until("first waiting", || {
            input.waiting.load(Ordering::SeqCst) >= 1
        });
        let w = input.waiting.load(Ordering::SeqCst);
        let c2 = cluster.client();
        let dup = s.spawn(move || c2.submit_with_id("a", RequestId(1), Req::Add(1)).err());
        wait_until("retry waiting", || input.waiting.load(Ordering::SeqCst) > w);
        let c3 = cluster.client();
        let other = s.spawn(move || {
            c3.submit_with_id("b", RequestId(2), Req::Add(1))
                .map(|_| ())
        });
        // Waits for b's append (at most 10 s), then opens the gate either way, so that
        // a failure is an assertion below and not a test that hangs.
        let since = Instant::now();
        while input.live.next_offset() - before < 2 && since.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let appended = input.live.next_offset() - before;
        input.held.store(false, Ordering::SeqCst);
        assert!(matches!(dup.join().unwrap(), Some(Error::Duplicate { .. })));
        other.join().unwrap().expect("other key");
        assert_eq!(
            appended, 2,
            "the submit of key b (another id) appended while a retry of a waited"
        );
    });
    cluster.shutdown().expect("shutdown");
}

/// A store that defers (pending: true) but does not say its appends wait for the disk
/// (the default of `append_waits_for_disk`): the first's fdatasync fails, it is refused
/// and its instance applies nothing; its retry gets the store's error, not `Duplicate`.
#[test]
fn a_retry_of_a_request_whose_fdatasync_failed_is_not_a_duplicate() {
    let input = Arc::new(Gated::default());
    let cluster = Cluster::builder(Service::default())
        .stores(input.clone(), None)
        .instances(1)
        .build()
        .expect("cluster");
    input.held.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let c1 = cluster.client();
        let before = input.live.next_offset();
        let first = s.spawn(move || {
            c1.submit_with_id("a", RequestId(1), Req::Add(1))
                .map(|_| ())
        });
        wait_until("first appended", || input.live.next_offset() == before + 1);
        input.failing.store(true, Ordering::SeqCst);
        let first = first.join().unwrap();
        assert!(first.is_err(), "the first is refused: {first:?}");
        let retry = cluster
            .client()
            .submit_with_id("a", RequestId(1), Req::Add(1));
        assert!(
            !matches!(retry, Err(Error::Duplicate { .. })),
            "a retry of a refused request is refused as Duplicate: {retry:?}"
        );
    });
}

/// Damage in a sealed segment before the checkpoint, which an open does not need, costs
/// the ids read from there, not the open.
#[test]
fn damage_before_the_checkpoint_does_not_fail_the_open() {
    let tmp = tempfile::tempdir().expect("tmp");
    let build = |window: u64| {
        Cluster::builder(Service::default())
            .dir(tmp.path())
            .log_options(LogOptions::new().segment_bytes(4096))
            .instances(1)
            .retry_window(window)
            .build()
    };
    let cluster = build(1 << 16).expect("cluster");
    let client = cluster.client();
    for i in 0..600u64 {
        client
            .submit(format!("k{}", i % 5), Req::Add(1))
            .unwrap()
            .wait()
            .unwrap();
    }
    cluster.checkpoint().expect("checkpoint");
    for _ in 0..5 {
        client.submit("k0", Req::Add(1)).unwrap().wait().unwrap();
    }
    drop(client);
    cluster.shutdown().expect("shutdown");
    let mut files: Vec<_> = std::fs::read_dir(tmp.path().join("input"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[32 + 24 + 5] ^= 0xff;
    std::fs::write(&files[0], bytes).unwrap();
    // Without the id scan (window 0) it opens, as every open did before the commit.
    let c = build(0).expect("opens with retry_window(0)");
    match c.client().submit("k0", Req::Get).unwrap().wait().unwrap() {
        Resp::State(t) => assert_eq!(t.sum, 125),
        other => panic!("{other:?}"),
    }
    c.shutdown().unwrap();
    let opened = build(1 << 16).expect("opens with the default window");
    match opened
        .client()
        .submit("k0", Req::Get)
        .unwrap()
        .wait()
        .unwrap()
    {
        Resp::State(t) => assert_eq!(t.sum, 125),
        other => panic!("{other:?}"),
    }
    opened.shutdown().unwrap();
}

/// `was_applied` tells a retrier refused as a duplicate whether the first request took
/// effect: it waits for a first still queued, and reads the log for one before the
/// checkpoint, across a restart too.
#[test]
fn was_applied_tells_whether_a_duplicates_first_took_effect() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("cluster");
    let builder = || on_disk(&dir).checkpoint_every(u64::MAX);
    let cluster = builder().build().expect("build");
    let client = cluster.client();
    let first = client
        .submit_with_id("k", RequestId(1), Req::Add(2))
        .expect("submit");
    let applied = first.offset();
    first.wait().expect("answer");
    assert!(matches!(
        client.submit_with_id("k", RequestId(1), Req::Add(2)),
        Err(Error::Duplicate { offset, .. }) if offset == applied
    ));
    assert!(client.was_applied("k", applied).expect("was_applied"));
    // A first request still queued (behind one that sleeps) when its retry comes, and
    // set aside later: its handler panics.
    // Two seconds (the default stall timeout is five): the retry below must come while
    // the first is still queued, however slowly this thread gets there.
    let sleeper = client.submit("k", Req::Stall(2_000)).expect("submit");
    let panicking = client
        .submit_with_id("k", RequestId(2), Req::Panic)
        .expect("submit");
    let aside = panicking.offset();
    assert!(matches!(
        client.submit_with_id("k", RequestId(2), Req::Panic),
        Err(Error::Duplicate { offset, .. }) if offset == aside
    ));
    assert!(!client.was_applied("k", aside).expect("was_applied"));
    assert!(matches!(
        panicking.wait(),
        Err(Error::HandlerPanicked { .. })
    ));
    sleeper.wait().expect("answer");
    // Before the checkpoint: read from the log.
    cluster.checkpoint().expect("checkpoint");
    assert!(client.was_applied("k", applied).expect("was_applied"));
    assert!(!client.was_applied("k", aside).expect("was_applied"));
    assert!(matches!(
        client.was_applied("other", applied),
        Err(Error::NotARequest { .. })
    ));
    assert!(matches!(
        client.was_applied("k", 1 << 40),
        Err(Error::OffsetOutOfRange { .. })
    ));
    drop(client);
    cluster.shutdown().expect("shutdown");
    let cluster = builder().build().expect("reopen");
    let client = cluster.client();
    assert!(client.was_applied("k", applied).expect("was_applied"));
    assert!(!client.was_applied("k", aside).expect("was_applied"));
    assert_eq!(state(&cluster, "k").sum, 3);
    drop(client);
    cluster.shutdown().expect("shutdown");
}
