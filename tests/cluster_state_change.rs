//! A handler's `State` type changes between two opens of one directory. Checkpoints hold
//! states encoded with bincode, which is not self-describing: the old ones do not decode
//! as the new type, and an open is refused, saying what to do. `rebuild_from_log`
//! rebuilds every state from the log instead and
//! checkpoints them in the new type; it refuses a log whose head is gone, since the
//! checkpoint is then the only record of those requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::{LogOptions, LogStore, Store};
use serde::{Deserialize, Serialize};

/// The state as first written.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct V1 {
    balance: i64,
}

/// The state after a field was added: its encoding is longer than `V1`'s.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct V2 {
    balance: i64,
    /// Requests folded into the state.
    opened: u64,
}

/// Adds each request (a deposit, in both versions) to the key's balance.
struct BankV1;

impl Handler for BankV1 {
    type State = V1;
    type Request = i64;
    type Response = V1;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], state: &mut V1, deposit: i64) -> V1 {
        state.balance += deposit;
        state.clone()
    }
}

/// The same service with the new state type, which also counts the requests.
struct BankV2;

impl Handler for BankV2 {
    type State = V2;
    type Request = i64;
    type Response = V2;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], state: &mut V2, deposit: i64) -> V2 {
        state.balance += deposit;
        state.opened += 1;
        state.clone()
    }
}

const KEYS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

/// Each key's balance and request count, as the fold of every request written.
type Expected = BTreeMap<&'static str, (i64, u64)>;

fn log_options() -> LogOptions {
    // Small segments, so that truncation drops whole ones: the log's head really goes.
    LogOptions::new().segment_bytes(4 << 10)
}

/// Writes with `V1`: requests to every key, a checkpoint, more requests, a shutdown
/// (which checkpoints again). Returns what every key's state folds.
fn write_v1(dir: &Path, truncate: bool) -> Expected {
    let cluster = Cluster::builder(BankV1)
        .dir(dir)
        .log_options(log_options())
        .instances(2)
        .checkpoint_every(u64::MAX)
        .truncate_after_checkpoint(truncate)
        // Truncation keeps the last `retry_window` records (65,536 by default, more than
        // this log holds): a small window lets it drop the log's head.
        .retry_window(8)
        .build()
        .expect("open with V1");
    let client = cluster.client();
    let mut expected = Expected::new();
    let mut deposit = |round: i64| {
        for (i, key) in KEYS.iter().enumerate() {
            let amount = round * 10 + i as i64 - 3;
            let answer = client.submit(key, amount).unwrap().wait().unwrap();
            let entry = expected.entry(key).or_default();
            entry.0 += amount;
            entry.1 += 1;
            assert_eq!(answer.balance, entry.0, "key {key}");
        }
    };
    for round in 0..20 {
        deposit(round);
    }
    cluster.checkpoint().expect("checkpoint with V1");
    for round in 20..30 {
        deposit(round);
    }
    cluster.shutdown().expect("shutdown with V1");
    expected
}

/// Deposits 0 to every key with `V2` and checks each answer: the balance folds every
/// request, and the count every request including this one.
fn check_v2(cluster: &Cluster<BankV2>, expected: &mut Expected) {
    let client = cluster.client();
    for key in KEYS {
        let entry = expected.get_mut(key).expect("written key");
        entry.1 += 1;
        let state = client
            .submit(key, 0)
            .unwrap()
            .wait()
            .expect("request with V2");
        assert_eq!(
            state,
            V2 {
                balance: entry.0,
                opened: entry.1
            },
            "key {key}"
        );
    }
}

/// Every key's balance, read with a query, is the one expected.
fn assert_v1_balances<H: Handler<State = V1>>(cluster: &Cluster<H>, expected: &Expected) {
    let client = cluster.client();
    for key in KEYS {
        let state = client
            .query(key, |s: &V1| s.clone())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(state.balance, expected[key].0, "key {key}");
    }
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.insert(path, bytes);
            }
        }
    }
    out
}

#[test]
fn rebuild_from_log_folds_every_request_into_the_new_state_type_and_checkpoints_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut expected = write_v1(tmp.path(), false);

    let cluster = Cluster::builder(BankV2)
        .dir(tmp.path())
        .log_options(log_options())
        .instances(3)
        .rebuild_from_log(true)
        .build()
        .expect("open with V2, rebuilding from the log");
    // The fresh checkpoint is taken before build returns, past the old ones.
    assert!(cluster.metrics().checkpoint_offset.is_some_and(|o| o > 0));
    check_v2(&cluster, &mut expected);
    cluster.shutdown().expect("shutdown with V2");

    // The next open needs the option no more: the latest checkpoint is in V2.
    let cluster = Cluster::builder(BankV2)
        .dir(tmp.path())
        .log_options(log_options())
        .instances(2)
        .build()
        .expect("reopen with V2");
    check_v2(&cluster, &mut expected);
    cluster
        .shutdown()
        .expect("shutdown with V2 after reopening");
}

#[test]
fn without_rebuild_from_log_an_old_checkpoint_is_refused_at_open_and_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    write_v1(tmp.path(), false);

    // The open decodes a few of the checkpoint's states before it starts anything.
    let refused = Cluster::builder(BankV2)
        .dir(tmp.path())
        .log_options(log_options())
        .instances(2)
        .build();
    match refused {
        Err(Error::Codec { message, .. }) => {
            assert!(
                KEYS.iter().any(|k| message.contains(k)),
                "names no key: {message}"
            );
            assert!(message.contains("did the State type change"), "{message}");
            assert!(message.contains("rebuild_from_log(true)"), "{message}");
        }
        Err(e) => panic!("expected a Codec error, got {e}"),
        Ok(_) => panic!("opened with a State type its checkpoint does not decode as"),
    }
    // Nothing changed: the directory opens with the remedy the error names.
    let cluster = Cluster::builder(BankV2)
        .dir(tmp.path())
        .log_options(log_options())
        .instances(2)
        .rebuild_from_log(true)
        .build()
        .expect("open with V2, rebuilding from the log");
    cluster.shutdown().expect("shutdown");
}

#[test]
fn rebuild_from_log_refuses_a_log_whose_head_is_gone_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = write_v1(tmp.path(), true);
    let start = LogStore::open_read_only(tmp.path().join("input"), log_options())
        .unwrap()
        .start_offset();
    assert!(start > 0, "truncation kept the log's head");
    let before = files(tmp.path());

    let refused = Cluster::builder(BankV2)
        .dir(tmp.path())
        .log_options(log_options())
        .rebuild_from_log(true)
        .build();
    match refused {
        Err(Error::Config(message)) => {
            assert!(
                message.contains(&format!("starts at offset {start}"))
                    && message.contains("only in the checkpoint"),
                "{message}"
            );
        }
        Err(e) => panic!("expected Error::Config, got {e:?}"),
        Ok(_) => panic!("expected Error::Config, the open succeeded"),
    }
    assert!(
        before == files(tmp.path()),
        "the refused open changed files"
    );

    // The old type still opens it, from its checkpoint.
    let cluster = Cluster::builder(BankV1)
        .dir(tmp.path())
        .log_options(log_options())
        .build()
        .expect("reopen with V1");
    let client = cluster.client();
    for key in KEYS {
        let state = client
            .submit(key, 0)
            .unwrap()
            .wait()
            .expect("request with V1");
        assert_eq!(state.balance, expected[key].0, "key {key}");
    }
    cluster
        .shutdown()
        .expect("shutdown with V1 after the refusal");
}

/// The same bank whose requests became notes: its `Request` type changed.
struct Notes;

impl Handler for Notes {
    type State = V1;
    type Request = String;
    type Response = V1;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], state: &mut V1, note: String) -> V1 {
        state.balance += note.len() as i64;
        state.clone()
    }
}

/// A changed `Request` type: the requests after the last checkpoint no longer decode.
/// The open is refused, naming the first such request, instead of rebuilding the states
/// without them (and checkpointing that); the old type still opens it with every deposit.
#[test]
fn a_changed_request_type_is_refused_at_open_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut expected = Expected::new();
    {
        let cluster = Cluster::builder(BankV1)
            .dir(tmp.path())
            .log_options(log_options())
            .instances(2)
            .checkpoint_every(u64::MAX)
            .truncate_after_checkpoint(true)
            .build()
            .unwrap();
        let client = cluster.client();
        for round in 0..20 {
            if round == 10 {
                cluster.checkpoint().unwrap();
            }
            for key in KEYS {
                let amount = round * 10 + 7;
                client.submit(key, amount).unwrap().wait().unwrap();
                expected.entry(key).or_default().0 += amount;
            }
        }
        // Dropped without a shutdown: the last requests are only in the log.
    }
    let before = files(tmp.path());
    for rebuild in [false, true] {
        let refused = Cluster::builder(Notes)
            .dir(tmp.path())
            .log_options(log_options())
            .rebuild_from_log(rebuild)
            .build();
        match refused {
            Err(Error::Codec { message, .. }) => assert!(
                message.contains("cannot be decoded as the handler's Request"),
                "{message}"
            ),
            // The head of the log is gone: rebuilding from it is refused first.
            Err(Error::Config(message)) if rebuild => {
                assert!(message.contains("only in the checkpoint"), "{message}")
            }
            Err(e) => panic!("expected Error::Codec, got {e:?}"),
            Ok(_) => panic!("expected Error::Codec, the open succeeded"),
        }
        assert!(
            before == files(tmp.path()),
            "the refused open changed files"
        );
    }
    let cluster = Cluster::builder(BankV1)
        .dir(tmp.path())
        .log_options(log_options())
        .build()
        .unwrap();
    assert_v1_balances(&cluster, &expected);
    cluster.shutdown().unwrap();
}

/// A changed `Request` type after a clean shutdown opens without a word (nothing after
/// the checkpoint to check), and new requests are logged in the new encoding. The old
/// requests, before the checkpoint, were all handled live: a rebuild from the log that
/// meets one it cannot decode fails, naming it, rather than fold the states without it
/// (and checkpoint that), and so does a replay of a state before the checkpoint.
#[test]
fn a_rebuild_or_replay_that_meets_a_request_of_a_changed_type_fails_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut expected = write_v1(tmp.path(), false);
    let end_of_v1 = {
        let input = LogStore::open_read_only(tmp.path().join("input"), log_options()).unwrap();
        input.next_offset()
    };
    {
        let cluster = Cluster::builder(Notes)
            .dir(tmp.path())
            .log_options(log_options())
            .build()
            .expect("a changed Request type after a clean shutdown opens");
        let client = cluster.client();
        client
            .submit("alice", "abc".to_string())
            .unwrap()
            .wait()
            .unwrap();
        expected.get_mut("alice").unwrap().0 += 3;
        drop(client);
        cluster.shutdown().unwrap();
    }
    // The checkpoint, which holds the states with every old request, stays (the open
    // itself may log what any open logs, before its rebuild fails).
    let checkpoint = || {
        let input = LogStore::open_read_only(tmp.path().join("input"), log_options()).unwrap();
        let snapshot = input.latest_snapshot("cluster-state").unwrap().unwrap();
        (snapshot.offset, snapshot.blob)
    };
    let before = checkpoint();
    match Cluster::builder(Notes)
        .dir(tmp.path())
        .log_options(log_options())
        .rebuild_from_log(true)
        .build()
    {
        Ok(_) => panic!("the rebuild skipped the requests it could not decode"),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("cannot be decoded as the handler's Request"),
                "{message}"
            );
        }
    }
    assert!(
        before == checkpoint(),
        "the refused open replaced the checkpoint"
    );

    let replay = cauce::cluster::Replay::open(tmp.path(), Notes).unwrap();
    let end = replay.next_offset();
    assert_eq!(
        replay.state_before("alice", end).unwrap().balance,
        expected["alice"].0
    );
    match replay.state_before("alice", end_of_v1) {
        Err(Error::Codec { message, .. }) => assert!(
            message.contains("cannot be decoded as the handler's Request"),
            "{message}"
        ),
        other => panic!("a replay skipped the requests it could not decode: {other:?}"),
    }
    drop(replay);

    let cluster = Cluster::builder(Notes)
        .dir(tmp.path())
        .log_options(log_options())
        .build()
        .unwrap();
    assert_v1_balances(&cluster, &expected);
    cluster.shutdown().unwrap();
}
