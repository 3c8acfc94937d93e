//! `Replay` against damaged, missing and moving logs: it answers with the state the
//! live service had, or with an error that says why it cannot, never with a guess.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler, Replay};
use cauce::store::{LogOptions, LogStore, MemoryStore, Store};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Req {
    Add(u64),
    /// Adds what an outside call answers (100, 101, ...).
    External,
    /// An outside call under a name too long to journal.
    LongName,
}

/// A service whose handler turns a failed call into an error response, as a handler
/// may: the replay must not take that response for the real one.
#[derive(Default, Clone)]
struct Svc {
    calls: Arc<AtomicU64>,
}

impl Handler for Svc {
    type State = u64;
    type Request = Req;
    type Response = Result<u64, String>;

    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, req: Req) -> Self::Response {
        let add = match req {
            Req::Add(v) => v,
            Req::External | Req::LongName => {
                let name = match req {
                    Req::LongName => "n".repeat(70_000),
                    _ => "ext".to_string(),
                };
                let calls = self.calls.clone();
                ctx.call(&name, move |_| calls.fetch_add(1, Ordering::SeqCst) + 100)
                    .map_err(|e| e.to_string())?
            }
        };
        *total += add;
        Ok(*total)
    }
}

fn service(dir: &Path) -> Cluster<Svc> {
    Cluster::builder(Svc::default())
        .dir(dir)
        .checkpoint_every(u64::MAX)
        .build()
        .unwrap()
}

fn first_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs.remove(0)
}

/// Submits `req` for key `k` and waits for its answer; returns the request's offset.
fn submit(cluster: &Cluster<Svc>, req: Req) -> (u64, u64) {
    let pending = cluster.client().submit("k", req).unwrap();
    let offset = pending.offset();
    (offset, pending.wait().unwrap().unwrap())
}

#[test]
fn a_log_damaged_in_the_middle_is_an_error_not_a_shorter_history() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = service(dir.path());
    let mut last = 0;
    for i in 0..2000 {
        last = submit(&cluster, Req::Add(i)).0;
    }
    cluster.shutdown().unwrap();
    let segment = first_segment(&dir.path().join("input"));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[40_000] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    match Replay::open(dir.path(), Svc::default()) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, segment),
        Err(e) => panic!("damage reported as {e}"),
        Ok(_) => panic!("a replay opened a log damaged in the middle"),
    }
    // What comes before the damage can still be looked at, on purpose.
    let input = LogStore::open_read_only(dir.path().join("input"), LogOptions::new()).unwrap();
    assert!(input.corruption().is_some());
    let end = input.next_offset();
    assert!(end > 10 && end < last, "the view ends at the damage: {end}");
    let replay = Replay::from_stores(Arc::new(input), None, Svc::default()).unwrap();
    let history = replay.history(b"k").unwrap();
    assert!(!history.is_empty() && history.len() < 2000);
    let n = history.len() as u64;
    assert_eq!(replay.state_before(b"k", end).unwrap(), n * (n - 1) / 2);
}

#[test]
fn a_journal_that_cannot_be_read_is_an_error_not_an_empty_journal() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = service(dir.path());
    submit(&cluster, Req::External);
    cluster.shutdown().unwrap();
    // A read error (EISDIR stands in for EIO or EACCES, which root cannot provoke).
    let segment = first_segment(&dir.path().join("effects"));
    std::fs::remove_file(&segment).unwrap();
    std::fs::create_dir(&segment).unwrap();
    match Replay::open(dir.path(), Svc::default()) {
        Err(Error::Io { path, .. }) => assert_eq!(path, segment),
        Err(e) => panic!("reported as {e}"),
        Ok(_) => panic!("a replay opened over a journal it cannot read"),
    }
}

#[test]
fn a_call_without_a_journaled_answer_fails_the_replay_whatever_the_handler_does() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = service(dir.path());
    let (external, _) = submit(&cluster, Req::External);
    let (add, total) = submit(&cluster, Req::Add(1));
    assert_eq!(total, 101);
    cluster.shutdown().unwrap();

    // With the journal, the replay agrees with the service.
    let replay = Replay::open(dir.path(), Svc::default()).unwrap();
    assert_eq!(replay.state_before(b"k", add).unwrap(), 100);

    // Without it, the handler's call fails, and the handler makes an error response
    // of it: the fold must not go on from the state that leaves.
    std::fs::remove_dir_all(dir.path().join("effects")).unwrap();
    let replay = Replay::open(dir.path(), Svc::default()).unwrap();
    assert_eq!(replay.state_before(b"k", external).unwrap(), 0);
    for result in [
        replay.state_before(b"k", add).map(|_| ()),
        replay.rerun(add).map(|_| ()),
        replay.rerun(external).map(|_| ()),
    ] {
        match result {
            Err(Error::Nondeterministic { offset, detail }) => {
                assert_eq!(offset, external);
                assert!(detail.contains("no journaled answer"), "{detail}");
            }
            other => panic!("expected the divergence, got {other:?}"),
        }
    }
}

/// A handler whose outside call waits at a gate, so that a replay can open while the
/// call is in flight.
#[derive(Clone, Default)]
struct Gated {
    /// (the call started, the call may finish)
    gate: Arc<(Mutex<(bool, bool)>, Condvar)>,
}

impl Handler for Gated {
    type State = u64;
    type Request = ();
    type Response = Result<u64, String>;

    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, _: ()) -> Self::Response {
        let gate = self.gate.clone();
        let add: u64 = ctx
            .call("ext", move |_| {
                let (lock, moved) = &*gate;
                let mut state = lock.lock();
                state.0 = true;
                moved.notify_all();
                while !state.1 {
                    moved.wait(&mut state);
                }
                100
            })
            .map_err(|e| e.to_string())?;
        *total += add;
        Ok(*total)
    }
}

#[test]
fn a_replay_opened_while_a_call_is_in_flight_fails_for_that_request() {
    let dir = tempfile::tempdir().unwrap();
    let gated = Gated::default();
    let cluster = Cluster::builder(gated.clone())
        .dir(dir.path())
        .build()
        .unwrap();
    let pending = cluster.client().submit("k", ()).unwrap();
    let offset = pending.offset();
    let (lock, moved) = &*gated.gate;
    {
        let mut state = lock.lock();
        while !state.0 {
            moved.wait(&mut state);
        }
    }
    let replay = Replay::open(dir.path(), Gated::default()).unwrap();
    lock.lock().1 = true;
    moved.notify_all();
    assert_eq!(pending.wait().unwrap().unwrap(), 100);
    cluster.shutdown().unwrap();

    assert_eq!(replay.state_before(b"k", offset).unwrap(), 0);
    assert!(matches!(
        replay.state_before(b"k", offset + 1),
        Err(Error::Nondeterministic { offset: o, .. }) if o == offset
    ));
    // Opened again, it sees the answer.
    let replay = Replay::open(dir.path(), Gated::default()).unwrap();
    assert_eq!(replay.state_before(b"k", offset + 1).unwrap(), 100);
}

#[test]
fn an_effect_name_too_long_to_journal_is_refused_before_the_call_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Svc::default();
    let calls = svc.calls.clone();
    let cluster = Cluster::builder(svc.clone())
        .dir(dir.path())
        .build()
        .unwrap();
    let answer = cluster.client().submit("k", Req::LongName).unwrap();
    let refused = answer.wait().unwrap().unwrap_err();
    assert!(refused.contains("at most 65535 bytes"), "{refused}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    cluster.shutdown().unwrap();
    // Nor is it made when the state is rebuilt.
    let cluster = Cluster::builder(svc).dir(dir.path()).build().unwrap();
    let again = cluster.client().submit("k", Req::Add(1)).unwrap();
    assert_eq!(again.wait().unwrap(), Ok(1));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    cluster.shutdown().unwrap();
}

/// A request type whose value 13 does not decode, as after a change of the type that a
/// logged request no longer fits.
#[derive(Debug, Serialize)]
struct Picky(u32);

impl<'de> Deserialize<'de> for Picky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            13 => Err(serde::de::Error::custom("13 is refused")),
            v => Ok(Picky(v)),
        }
    }
}

struct Sum;

impl Handler for Sum {
    type State = u64;
    type Request = Picky;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, req: Picky) -> u64 {
        *total += u64::from(req.0);
        *total
    }
}

#[test]
fn history_lists_an_undecodable_request_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Sum).dir(dir.path()).build().unwrap();
    let client = cluster.client();
    client.submit("k", Picky(1)).unwrap().wait().unwrap();
    let bad = client.submit("k", Picky(13)).unwrap();
    let bad_offset = bad.offset();
    assert!(matches!(bad.wait(), Err(Error::Codec { .. })));
    let last = client.submit("k", Picky(2)).unwrap();
    let last_offset = last.offset();
    assert_eq!(last.wait().unwrap(), 3);
    cluster.shutdown().unwrap();

    let replay = Replay::open(dir.path(), Sum).unwrap();
    let history = replay.history(b"k").unwrap();
    let shape: Vec<(u64, Option<u32>)> = history
        .iter()
        .map(|(o, r)| (*o, r.as_ref().ok().map(|p| p.0)))
        .collect();
    assert_eq!(shape.len(), 3);
    assert_eq!(shape[1], (bad_offset, None));
    assert_eq!(shape[2], (last_offset, Some(2)));
    for err in [
        history[1].1.as_ref().err().map(ToString::to_string),
        replay.rerun(bad_offset).err().map(|e| e.to_string()),
    ] {
        let err = err.expect("an error");
        assert!(err.contains(&format!("offset {bad_offset}")), "{err}");
        assert!(err.contains("13 is refused"), "{err}");
    }
    // The refused request changed nothing.
    assert_eq!(replay.state_before(b"k", last_offset + 1).unwrap(), 3);
}

#[test]
fn a_checkpoint_the_service_takes_later_does_not_change_an_open_replay() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Svc::default())
        .dir(dir.path())
        .checkpoint_every(u64::MAX)
        .truncate_after_checkpoint(true)
        .build()
        .unwrap();
    for i in 0..10 {
        submit(&cluster, Req::Add(i));
    }
    cluster.checkpoint().unwrap();
    let offsets: Vec<u64> = (0..10).map(|i| submit(&cluster, Req::Add(i)).0).collect();
    let replay = Replay::open(dir.path(), Svc::default()).unwrap();
    let before = replay.state_before(b"k", offsets[5]).unwrap();
    assert_eq!(before, 45 + 10);
    for i in 0..10 {
        submit(&cluster, Req::Add(i));
    }
    cluster.checkpoint().unwrap();
    assert_eq!(replay.state_before(b"k", offsets[5]).unwrap(), before);
    assert_eq!(replay.rerun(offsets[5]).unwrap().after, before + 5);
    cluster.shutdown().unwrap();
    assert_eq!(replay.state_before(b"k", offsets[5]).unwrap(), before);
}

#[test]
fn a_state_past_the_end_of_the_log_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = service(dir.path());
    let (offset, total) = submit(&cluster, Req::Add(7));
    cluster.shutdown().unwrap();
    let replay = Replay::open(dir.path(), Svc::default()).unwrap();
    let input = LogStore::open_read_only(dir.path().join("input"), LogOptions::new()).unwrap();
    let end = input.next_offset();
    assert!(end > offset);
    assert_eq!(replay.state_before(b"k", end).unwrap(), total);
    for past in [end + 1, u64::MAX] {
        assert!(matches!(
            replay.state_before(b"k", past),
            Err(Error::OffsetOutOfRange { requested, end: e, .. }) if requested == past && e == end
        ));
    }
    // A rerun prints with the handler's types alone (`Svc` is not `Debug`).
    let rerun = replay.rerun(offset).unwrap();
    assert!(format!("{rerun:?}").contains("Add(7)"));
}

/// After truncation kept the log's last records before the checkpoint, an offset among
/// them is held by the log, but the requests before it are not: a replay says so, and
/// names the checkpoint, instead of calling a held offset out of range.
#[test]
fn a_state_before_the_checkpoint_of_a_truncated_log_names_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Svc::default())
        .dir(dir.path())
        .log_options(LogOptions::new().segment_bytes(512))
        .checkpoint_every(u64::MAX)
        .retry_window(8)
        .truncate_after_checkpoint(true)
        .build()
        .unwrap();
    for i in 0..200 {
        submit(&cluster, Req::Add(i));
    }
    let checkpoint = cluster.checkpoint().unwrap();
    let (after, _) = submit(&cluster, Req::Add(1));
    // Dropped, not shut down: a shutdown would checkpoint again.
    drop(cluster);
    let input = LogStore::open_read_only(dir.path().join("input"), LogOptions::new()).unwrap();
    let start = input.start_offset();
    assert!(
        start > 0 && start < checkpoint,
        "truncation kept some records before the checkpoint: start {start}, checkpoint {checkpoint}"
    );
    let replay = Replay::open(dir.path(), Svc::default()).unwrap();
    assert_eq!(replay.checkpoint_offset(), Some(checkpoint));
    for offset in start..checkpoint {
        let err = replay.state_before(b"k", offset).unwrap_err();
        assert!(
            matches!(err, Error::BeforeCheckpoint { requested, earliest: Some(c) }
                if requested == offset && c == checkpoint),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&format!("offset {checkpoint}")),
            "{err}"
        );
    }
    assert!(matches!(
        replay.state_before(b"k", start - 1),
        Err(Error::OffsetOutOfRange { requested, start: s, .. }) if requested == start - 1 && s == start
    ));
    let total: u64 = (0..200).sum();
    assert_eq!(replay.state_before(b"k", checkpoint).unwrap(), total);
    assert_eq!(replay.state_before(b"k", after + 1).unwrap(), total + 1);
}

/// Keeps every request of its key in order; panics on 13.
struct Trail;

impl Handler for Trail {
    type State = Vec<u64>;
    type Request = u64;
    type Response = usize;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], trail: &mut Vec<u64>, req: u64) -> usize {
        assert_ne!(req, 13, "13 is refused");
        trail.push(req);
        trail.len()
    }
}

/// A replay folds on from the last state it folded when asked for a later offset of
/// the same key: whatever the order of the questions (forward through a history, back,
/// between keys, across a request set aside, past the checkpoint), every answer equals
/// that of a fresh replay, which folds from the checkpoint.
#[test]
fn stepping_through_histories_gives_what_a_fresh_replay_gives() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::builder(Trail)
        .dir(dir.path())
        .instances(2)
        .checkpoint_every(u64::MAX)
        .build()
        .unwrap();
    let client = cluster.client();
    let mut offsets = Vec::new();
    for i in 0..120u64 {
        if i == 70 {
            cluster.checkpoint().unwrap();
        }
        let key = ["a", "b", "c"][(i % 3) as usize];
        let req = if i == 40 || i == 95 { 13 } else { i };
        let pending = client.submit(key, req).unwrap();
        offsets.push((key, pending.offset()));
        let answer = pending.wait();
        assert_eq!(answer.is_err(), req == 13, "{answer:?}");
    }
    drop(client);
    cluster.shutdown().unwrap();

    let stepping = Replay::open(dir.path(), Trail).unwrap();
    let fresh = || Replay::open(dir.path(), Trail).unwrap();
    let end = stepping.next_offset();
    let mut questions: Vec<(&str, u64)> = Vec::new();
    // Forward through each key's history, then the whole log's offsets for another
    // key, backward, and jumps.
    for key in ["a", "b"] {
        questions.extend(
            offsets
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|&(k, o)| (k, o)),
        );
        questions.push((key, end));
    }
    questions.extend(offsets.iter().rev().step_by(7).map(|&(_, o)| ("c", o)));
    questions.extend([
        ("a", 0),
        ("a", end),
        ("a", offsets[60].1),
        ("b", offsets[60].1),
    ]);
    for (key, offset) in questions {
        assert_eq!(
            stepping.state_before(key, offset).unwrap(),
            fresh().state_before(key, offset).unwrap(),
            "{key} before {offset}"
        );
    }
    // Reruns step the same way.
    let mut afters = Vec::new();
    for &(key, offset) in offsets.iter().filter(|(k, _)| *k == "a") {
        if stepping.panicked(offset) {
            assert!(matches!(
                stepping.rerun(offset),
                Err(Error::HandlerPanicked { .. })
            ));
            continue;
        }
        let rerun = stepping.rerun(offset).unwrap();
        assert_eq!(rerun.before, fresh().state_before(key, offset).unwrap());
        afters.push(rerun.request);
        assert_eq!(rerun.after, afters);
    }
    assert_eq!(stepping.state_before("a", end).unwrap(), afters);
}

/// A service whose outside call is journaled only in memory (a cluster on `stores(input,
/// None)`): past the checkpoint that covers it, a replay cannot fold across it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Outside {
    Add(u64),
    Call,
}

struct OutsideSvc;

impl Handler for OutsideSvc {
    type State = u64;
    type Request = Outside;
    type Response = Result<u64, String>;

    fn handle(
        &self,
        ctx: &mut Context<'_>,
        _: &[u8],
        total: &mut u64,
        req: Outside,
    ) -> Self::Response {
        let add = match req {
            Outside::Add(v) => v,
            Outside::Call => ctx.call("ext", |_| 100u64).map_err(|e| e.to_string())?,
        };
        *total += add;
        Ok(*total)
    }
}

/// The state kept from a step before the checkpoint is not folded across it: a question
/// past the checkpoint folds from there, as a fresh replay does (and needs nothing
/// before it, such as an outside call's answer the journal no longer has).
#[test]
fn a_step_past_the_checkpoint_folds_from_the_checkpoint() {
    let input: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cluster = Cluster::builder(OutsideSvc)
        .stores(input.clone(), None)
        .instances(1)
        .checkpoint_every(u64::MAX)
        .build()
        .unwrap();
    let client = cluster.client();
    let submit = |req| {
        let p = client.submit("k", req).unwrap();
        let offset = p.offset();
        p.wait().unwrap().unwrap();
        offset
    };
    let first = submit(Outside::Add(1));
    submit(Outside::Call);
    submit(Outside::Add(2));
    drop(client);
    cluster.shutdown().unwrap(); // a checkpoint at the end

    let fresh = Replay::from_stores(input.clone(), None, OutsideSvc).unwrap();
    let end = fresh.next_offset();
    assert_eq!(fresh.state_before("k", end).unwrap(), 103);
    let stepping = Replay::from_stores(input.clone(), None, OutsideSvc).unwrap();
    assert_eq!(stepping.rerun(first).unwrap().after, 1);
    assert_eq!(stepping.state_before("k", end).unwrap(), 103);
}

/// A state whose serde attributes bincode writes but cannot read back.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Noted {
    sum: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    note: Option<String>,
}

struct NotedSvc;

impl Handler for NotedSvc {
    type State = Noted;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], state: &mut Noted, add: u64) -> u64 {
        state.sum += add;
        state.sum
    }
}

/// A state that does not decode as it was encoded is not kept for the next step: every
/// answer is a fresh replay's.
#[test]
fn a_state_that_does_not_round_trip_is_folded_afresh_each_step() {
    let input: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let cluster = Cluster::builder(NotedSvc)
        .stores(input.clone(), None)
        .instances(1)
        .checkpoint_every(u64::MAX)
        .build()
        .unwrap();
    let client = cluster.client();
    let offsets: Vec<u64> = (1..=5u64)
        .map(|v| {
            let p = client.submit("k", v).unwrap();
            let offset = p.offset();
            p.wait().unwrap();
            offset
        })
        .collect();
    drop(client);
    drop(cluster); // no checkpoint: it could not be read back either
    let fresh = |offset| {
        Replay::from_stores(input.clone(), None, NotedSvc)
            .unwrap()
            .state_before("k", offset)
            .unwrap()
    };
    let stepping = Replay::from_stores(input.clone(), None, NotedSvc).unwrap();
    for &offset in offsets.iter().chain([&(offsets[4] + 1)]) {
        assert_eq!(
            stepping.state_before("k", offset).unwrap(),
            fresh(offset),
            "before {offset}"
        );
    }
}

/// A replay tells which requests came with an id, and which.
#[test]
fn a_replay_gives_each_requests_id() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = service(dir.path());
    let client = cluster.client();
    let with = client
        .submit_with_id("k", cauce::cluster::RequestId(77), Req::Add(1))
        .unwrap();
    let with_offset = with.offset();
    with.wait().unwrap().unwrap();
    let (without_offset, _) = submit(&cluster, Req::Add(2));
    drop(client);
    cluster.shutdown().unwrap();
    let replay = Replay::open(dir.path(), Svc::default()).unwrap();
    assert_eq!(
        replay.request_id(with_offset).unwrap(),
        Some(cauce::cluster::RequestId(77))
    );
    assert_eq!(replay.request_id(without_offset).unwrap(), None);
    assert!(matches!(
        replay.request_id(replay.next_offset()),
        Err(Error::OffsetOutOfRange { .. })
    ));
    assert_eq!(replay.checkpoint_offset(), Some(replay.next_offset()));
}

#[test]
fn a_replay_of_a_directory_that_is_not_a_clusters_says_so_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let expect_not_found = |at: &std::path::Path, says: &str| match Replay::open(at, Svc::default())
    {
        Err(Error::Io { path, source, .. }) => {
            assert_eq!(path, at);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            let message = Error::Io {
                op: "open a cluster's logs in",
                path,
                source,
            }
            .to_string();
            assert!(message.contains(says), "{message}");
        }
        Err(e) => panic!("reported as {e}"),
        Ok(_) => panic!("a replay opened {}", at.display()),
    };
    // A directory with something else in it: a plain log store, say.
    LogStore::open(dir.path().join("log"), LogOptions::new()).unwrap();
    expect_not_found(&dir.path().join("log"), "not the directory of a cluster");
    expect_not_found(&dir.path().join("missing"), "no such directory");
}
