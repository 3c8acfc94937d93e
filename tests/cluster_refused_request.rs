//! A request that is logged but does not decode (serde attributes bincode cannot read
//! back, the documented `skip_serializing_if` case) is refused live and set aside. It
//! must not make the log unopenable (the open refuses a changed `Request` type, where
//! no request after the checkpoint decodes), nor keys unavailable after a restart, nor
//! `Replay` fail: each folds around it, as the live instance did.

use std::sync::Arc;

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::{MemoryStore, Store};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Req {
    add: u64,
    panic: bool,
    /// Skipped when `None`: bincode cannot read that request back (documented).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    note: Option<String>,
}

fn req(add: u64, note: Option<&str>) -> Req {
    Req {
        add,
        panic: false,
        note: note.map(str::to_string),
    }
}

struct Sum;

impl Handler for Sum {
    type State = u64;
    type Request = Req;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], s: &mut u64, r: Req) -> u64 {
        if r.panic {
            panic!("asked to panic");
        }
        *s += r.add;
        *s
    }
}

fn open(store: &Arc<MemoryStore>) -> cauce::Result<Cluster<Sum>> {
    Cluster::builder(Sum)
        .stores(store.clone() as Arc<dyn Store>, None)
        .instances(1)
        .checkpoint_every(u64::MAX)
        .build()
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
    assert_eq!(
        client
            .submit("a", req(1, Some("z")))
            .unwrap()
            .wait()
            .unwrap(),
        4
    );
}

/// A handler panic on another key of the same instance restarts it: its keys are
/// rebuilt from the log, around the refused request.
#[test]
fn a_request_refused_live_does_not_make_keys_unavailable_after_a_restart() {
    let store = Arc::new(MemoryStore::new());
    let cluster = open(&store).unwrap();
    let client = cluster.client();
    assert_eq!(
        client
            .submit("a", req(1, Some("x")))
            .unwrap()
            .wait()
            .unwrap(),
        1
    );
    assert_eq!(
        client
            .submit("b", req(10, Some("x")))
            .unwrap()
            .wait()
            .unwrap(),
        10
    );
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
        cauce::cluster::Replay::from_stores(store.clone() as Arc<dyn Store>, None, Sum).unwrap();
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
