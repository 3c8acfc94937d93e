//! A request that does not decode (serde attributes bincode cannot read back, the
//! documented `skip_serializing_if` case) and is refused by a fold, not by the live
//! loop: after a crash between its logging and its handling, or queued behind a request
//! that stalled, so that its instance's replacement folds it. It is set aside as the
//! live loop sets it aside, so that a checkpoint taken over it does not make later folds
//! (a `rebuild_from_log` open, a `Replay` of a state before the checkpoint) take it
//! for a request of a changed `Request` type and fail.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cauce::cluster::{Cluster, ClusterBuilder, Context, Handler, Replay};
use cauce::store::{MemoryStore, Store};
use cauce::{Bincode, Codec, Entry, Error};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Req {
    add: u64,
    slow: bool,
    /// Skipped when `None`: bincode cannot read that request back (documented).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    note: Option<String>,
}

fn req(add: u64, note: Option<&str>) -> Req {
    Req {
        add,
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
        if r.slow && self.slow_runs.fetch_add(1, Ordering::SeqCst) == 0 {
            // Its first run only: past the stall timeout.
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
        assert_eq!(
            client
                .submit("a", req(1, Some("x")))
                .unwrap()
                .wait()
                .unwrap(),
            1
        );
        // Dropped: a crash, no checkpoint.
    }
    // The request the crashed process logged before its instance handled it.
    let mut payload = vec![0u8];
    Bincode.encode_into(&req(5, None), &mut payload).unwrap();
    let refused = store.append(&[Entry::new(b"a", &payload)]).unwrap().start;
    {
        let cluster = builder(&store).build().unwrap();
        let client = cluster.client();
        assert_eq!(
            client
                .submit("a", req(2, Some("y")))
                .unwrap()
                .wait()
                .unwrap(),
            3
        );
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
        assert_eq!(
            client
                .submit("a", req(1, Some("x")))
                .unwrap()
                .wait()
                .unwrap(),
            1
        );
        let mut slow = req(10, Some("x"));
        slow.slow = true;
        let slow = client.submit("a", slow).unwrap();
        let bad = client.submit("a", req(5, None)).unwrap();
        refused = bad.offset();
        assert_eq!(slow.wait_timeout(Duration::from_secs(30)).unwrap(), 11);
        let bad = bad.wait_timeout(Duration::from_secs(30));
        assert!(matches!(bad, Err(Error::Codec { .. })), "{bad:?}");
        assert_eq!(
            client
                .submit("a", req(2, Some("y")))
                .unwrap()
                .wait()
                .unwrap(),
            13
        );
        drop(client);
        cluster.shutdown().unwrap();
    }
    folds_around(&store, refused, 13);
}
