//! A request that is logged but does not decode (serde attributes bincode cannot read
//! back, the documented `skip_serializing_if` case) is refused live and set aside. It
//! must not make the log unopenable (the open refuses a changed `Request` type, where
//! no request after the checkpoint decodes), nor keys unavailable after a restart, nor
//! `Replay` fail: each folds around it, as the live instance did.
//!
//! A fold that refuses one (after a crash between its logging and its handling, or
//! queued behind a request that stalled, so that its instance's replacement folds it)
//! sets it aside as the live loop does, so that a checkpoint taken over it does not
//! make later folds (a `rebuild_from_log` open, a `Replay` of a state before the
//! checkpoint) take it for a request of a changed `Request` type and fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cauce::cluster::{Client, Cluster, ClusterBuilder, Context, Handler, Replay};
use cauce::store::{MemoryStore, Store};
use cauce::{Bincode, Codec, Entry, Error};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Req {
    add: u64,
    panic: bool,
    /// Sleeps past the stall timeout, on its first run only.
    slow: bool,
    /// Skipped when `None`: bincode cannot read that request back (documented).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    note: Option<String>,
}

fn req(add: u64, note: Option<&str>) -> Req {
    Req {
        add,
        panic: false,
        slow: false,
        note: note.map(str::to_string),
    }
}

#[derive(Clone, Default)]
struct Sum {
    slow_runs: Arc<AtomicU64>,
}

impl Handler for Sum {
    type State = u64;
    type Request = Req;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], s: &mut u64, r: Req) -> u64 {
        if r.panic {
            panic!("asked to panic");
        }
        if r.slow && self.slow_runs.fetch_add(1, Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1500));
        }
        *s += r.add;
        *s
    }
}

fn builder(store: &Arc<MemoryStore>) -> ClusterBuilder<Sum> {
    Cluster::builder(Sum::default())
        .stores(store.clone() as Arc<dyn Store>, None)
        .instances(1)
        .checkpoint_every(u64::MAX)
}

fn open(store: &Arc<MemoryStore>) -> cauce::Result<Cluster<Sum>> {
    builder(store).build()
}

/// Submits `r` for `key` and waits for its answer, which must be a success.
fn answer(client: &Client<Sum>, key: &str, r: Req) -> u64 {
    client.submit(key, r).unwrap().wait().unwrap()
}

/// Key `a` gets 1, a request refused live (5, undecodable), and 2; then the cluster is
/// dropped (a crash: no checkpoint).
fn write_around_a_refused_request(store: &Arc<MemoryStore>) {
    let cluster = open(store).unwrap();
    let client = cluster.client();
    let add = |v, note| client.submit("a", req(v, note)).unwrap().wait();
    assert_eq!(add(1, Some("x")).unwrap(), 1);
    let refused = add(5, None);
    assert!(matches!(refused, Err(Error::Codec { .. })), "{refused:?}");
    assert_eq!(add(2, Some("y")).unwrap(), 3);
}

/// The cluster is reopened after a crash (a drop, which takes no checkpoint): the
/// request refused live is among the first requests after the checkpoint.
#[test]
fn a_request_refused_live_does_not_make_the_log_unopenable() {
    let store = Arc::new(MemoryStore::new());
    write_around_a_refused_request(&store);
    let reopened = open(&store);
    let cluster = match reopened {
        Ok(c) => c,
        Err(e) => panic!("reopening a log the live cluster wrote was refused: {e}"),
    };
    let client = cluster.client();
    assert_eq!(answer(&client, "a", req(1, Some("z"))), 4);
}

/// A handler panic on another key of the same instance restarts it: its keys are
/// rebuilt from the log, around the refused request.
#[test]
fn a_request_refused_live_does_not_make_keys_unavailable_after_a_restart() {
    let store = Arc::new(MemoryStore::new());
    let cluster = open(&store).unwrap();
    let client = cluster.client();
    assert_eq!(answer(&client, "a", req(1, Some("x"))), 1);
    assert_eq!(answer(&client, "b", req(10, Some("x"))), 10);
    let refused = client.submit("a", req(5, None)).unwrap().wait();
    assert!(matches!(refused, Err(Error::Codec { .. })), "{refused:?}");
    let mut boom = req(0, Some("x"));
    boom.panic = true;
    let panicked = client.submit("c", boom).unwrap().wait();
    assert!(
        matches!(panicked, Err(Error::HandlerPanicked { .. })),
        "{panicked:?}"
    );
    let b = client.submit("b", req(1, Some("y"))).unwrap().wait();
    let a = client.submit("a", req(1, Some("y"))).unwrap().wait();
    assert!(
        matches!((&a, &b), (Ok(2), Ok(11))),
        "after the restart: a {a:?} (expected 2), b {b:?} (expected 11)"
    );
}

/// `Replay::history` lists the refused request with its error; `state_before` folds
/// the others, as the live service did.
#[test]
fn replay_state_before_folds_around_a_request_refused_live() {
    let store = Arc::new(MemoryStore::new());
    write_around_a_refused_request(&store);
    let replay =
        Replay::from_stores(store.clone() as Arc<dyn Store>, None, Sum::default()).unwrap();
    let history = replay.history("a").unwrap();
    assert!(
        history[1].1.is_err(),
        "listed with its error, as documented"
    );
    let state = replay.state_before("a", replay.next_offset());
    assert!(
        matches!(state, Ok(3)),
        "the live service's state is 3: {state:?}"
    );
}

/// After a checkpoint over the refused request at `refused`: it is set aside, a
/// `rebuild_from_log` open folds around it to `total`, and so does a replay of every
/// state before the checkpoint.
fn folds_around(store: &Arc<MemoryStore>, refused: u64, total: u64) {
    let replay =
        Replay::from_stores(store.clone() as Arc<dyn Store>, None, Sum::default()).expect("replay");
    assert!(
        replay.panicked(refused),
        "the refused request was not set aside"
    );
    let checkpoint = replay
        .checkpoint_offset()
        .expect("the shutdown checkpointed");
    assert!(refused < checkpoint);
    for offset in 0..=replay.next_offset() {
        replay
            .state_before("a", offset)
            .unwrap_or_else(|e| panic!("a replay of the state before {offset} failed: {e}"));
    }
    assert_eq!(
        replay.state_before("a", replay.next_offset()).unwrap(),
        total
    );
    drop(replay);
    let cluster = builder(store)
        .rebuild_from_log(true)
        .build()
        .expect("a rebuild_from_log open of a log whose Request type never changed");
    let client = cluster.client();
    assert_eq!(
        client.query("a", |s: &u64| *s).unwrap().wait().unwrap(),
        total
    );
    drop(client);
    cluster.shutdown().unwrap();
}

/// A crash between logging a request and handling it: the next open's rebuild refuses
/// it; a clean shutdown then checkpoints over it.
#[test]
fn a_request_refused_by_the_rebuild_at_open_is_set_aside() {
    let store = Arc::new(MemoryStore::new());
    {
        let cluster = builder(&store).build().unwrap();
        let client = cluster.client();
        assert_eq!(answer(&client, "a", req(1, Some("x"))), 1);
        // Dropped: a crash, no checkpoint.
    }
    // The request the crashed process logged before its instance handled it.
    let mut payload = vec![0u8];
    Bincode.encode_into(&req(5, None), &mut payload).unwrap();
    let refused = store.append(&[Entry::new(b"a", &payload)]).unwrap().start;
    {
        let cluster = builder(&store).build().unwrap();
        let client = cluster.client();
        assert_eq!(answer(&client, "a", req(2, Some("y"))), 3);
        drop(client);
        cluster.shutdown().unwrap();
    }
    folds_around(&store, refused, 3);
}

/// In one process: a request stalls once, and its instance's replacement folds the
/// undecodable request queued behind it, refuses it and answers it. A clean shutdown
/// then checkpoints over it.
#[test]
fn a_request_refused_by_a_replacements_rebuild_is_set_aside() {
    let store = Arc::new(MemoryStore::new());
    let refused;
    {
        let cluster = builder(&store)
            .stall_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let client = cluster.client();
        assert_eq!(answer(&client, "a", req(1, Some("x"))), 1);
        let mut slow = req(10, Some("x"));
        slow.slow = true;
        let slow = client.submit("a", slow).unwrap();
        let bad = client.submit("a", req(5, None)).unwrap();
        refused = bad.offset();
        assert_eq!(slow.wait_timeout(Duration::from_secs(30)).unwrap(), 11);
        let bad = bad.wait_timeout(Duration::from_secs(30));
        assert!(matches!(bad, Err(Error::Codec { .. })), "{bad:?}");
        assert_eq!(answer(&client, "a", req(2, Some("y"))), 13);
        drop(client);
        cluster.shutdown().unwrap();
    }
    folds_around(&store, refused, 13);
}
