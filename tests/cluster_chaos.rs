//! Chaos against the model: random interleavings of load, handler panics, stalls,
//! instances joining and leaving, and crashes (a cluster dropped without shutdown and
//! opened again on the same logs). Whatever happens, every answer and every final state
//! must equal the single-threaded fold of the input log, and every query (interleaved
//! with the requests) must see its key's state before its offset (or, when the key's
//! instance was lost before running it, a later state of the key).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use cauce::Error;
use cauce::cluster::{Cluster, ClusterBuilder, Pending};
use cauce::router::StickyOptions;
use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use common::{Req, Resp, Service, Tally, block_on};
use rand::{RngExt, SeedableRng, rngs::StdRng};

struct Logs {
    input: Arc<dyn Store>,
    effects: Arc<MemoryStore>,
    placement: StickyOptions,
    /// The input log's directory, when it is a `LogStore`.
    _dir: Option<tempfile::TempDir>,
}

impl Logs {
    fn builder(&self) -> ClusterBuilder<Service> {
        Cluster::builder(Service::default())
            .stores(self.input.clone(), Some(self.effects.clone()))
            .instances(3)
            .stall_timeout(Duration::from_millis(60))
            .checkpoint_every(50)
            .supervise_every(Duration::from_millis(5))
            .placement(self.placement)
    }
}

/// How the load threads submit.
#[derive(Clone, Copy)]
enum Submits {
    /// `submit`, one request at a time.
    One,
    /// The first thread submits its requests in batches of 1 to 8, through
    /// `submit_batch` or `submit_batch_async`; the second submits each through
    /// `submit_async`. The async ones run on a minimal executor.
    BatchesAndAsync,
    /// Every request with a request id: the first thread through `submit_with_id`, the
    /// second in batches through `submit_batch_with_ids` (every other one async). A
    /// quarter of the requests, or of the batches, are submitted again at once with the
    /// same ids (a retry): each must be refused as a duplicate of the first, unless the
    /// first was set aside already (a panicking request), when it is logged again.
    Ids,
}

/// A request id unique to seed, step, thread and request.
fn id_of(seed: u64, step: u64, t: u64, j: usize) -> cauce::cluster::RequestId {
    cauce::cluster::RequestId(
        u128::from(seed) << 64 | u128::from(step) << 32 | u128::from(t) << 16 | j as u128,
    )
}

/// A retry's pendings against its first submit's: one resolved to `Duplicate` naming
/// the first's offset; or, for a request whose first was set aside, a new request
/// (returned, to be answered like any other).
fn check_retry(
    seed: u64,
    first: u64,
    req: &Req,
    retry: cauce::Result<Pending<Resp>>,
) -> Option<Pending<Resp>> {
    match retry {
        Err(Error::Duplicate { offset, .. }) => {
            assert_eq!(offset, first, "seed {seed}: a duplicate names its first");
            None
        }
        Ok(p) if p.offset() == first => {
            match p.wait() {
                Err(Error::Duplicate { offset, .. }) if offset == first => {}
                other => panic!("seed {seed}: a batch's retry of {first}: {other:?}"),
            }
            None
        }
        Ok(p) => {
            assert!(
                matches!(req, Req::Panic),
                "seed {seed}: a retry of {first} ({req:?}) was logged again, at {}",
                p.offset()
            );
            Some(p)
        }
        Err(e) => panic!("seed {seed}: a retry of {first}: {e}"),
    }
}

/// The cluster's default placement.
fn placement() -> StickyOptions {
    StickyOptions::default().epsilon(0.2).unwrap()
}

/// The input log: in memory, or on disk under `SyncPolicy::Always` (its appends
/// deferred: submits and instances wait for the records to be durable, and readers see
/// them only then).
#[derive(Clone, Copy)]
enum Input {
    Memory,
    Durable,
}

fn run(seed: u64, submits: Submits, placement: StickyOptions) {
    run_over(seed, submits, placement, Input::Memory)
}

fn run_over(seed: u64, submits: Submits, placement: StickyOptions, input: Input) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (input, dir): (Arc<dyn Store>, _) = match input {
        Input::Memory => (Arc::new(MemoryStore::new()), None),
        Input::Durable => {
            let dir = tempfile::tempdir().expect("temp dir");
            let options = LogOptions::new()
                .sync(SyncPolicy::Always)
                .segment_bytes(64 << 10);
            let log = LogStore::open(dir.path(), options).expect("log");
            (Arc::new(log), Some(dir))
        }
    };
    let logs = Logs {
        input,
        effects: Arc::new(MemoryStore::new()),
        placement,
        _dir: dir,
    };
    let mut cluster = logs.builder().build().unwrap();
    let mut answers: HashMap<u64, cauce::Result<Resp>> = HashMap::new();
    let mut pending: Vec<Pending<Resp>> = Vec::new();
    // Queries in flight, and the answered ones: (key, offset, answer).
    let mut queries: Vec<(String, Pending<Tally>)> = Vec::new();
    let mut queried: Vec<(String, u64, cauce::Result<Tally>)> = Vec::new();
    // Requests with ids whose handler panics, by offset: once answered as panicked (set
    // aside), each is submitted again with its id, and must be logged again.
    let mut panicked: HashMap<u64, (String, cauce::cluster::RequestId)> = HashMap::new();
    let mut retried_after_panic = 0;
    let settle = |pending: &mut Vec<Pending<Resp>>,
                  answers: &mut HashMap<u64, cauce::Result<Resp>>,
                  queries: &mut Vec<(String, Pending<Tally>)>,
                  queried: &mut Vec<(String, u64, cauce::Result<Tally>)>| {
        for p in pending.drain(..) {
            let offset = p.offset();
            let answer = p.wait_timeout(Duration::from_secs(30));
            assert!(
                !matches!(answer, Err(Error::Timeout(_))),
                "seed {seed}: request {offset} never answered"
            );
            assert!(answers.insert(offset, answer).is_none());
        }
        for (key, q) in queries.drain(..) {
            let at = q.offset();
            let answer = q.wait_timeout(Duration::from_secs(30));
            assert!(
                !matches!(answer, Err(Error::Timeout(_))),
                "seed {seed}: query of {key} at {at} never answered"
            );
            queried.push((key, at, answer));
        }
    };
    for step in 0..60 {
        match rng.random_range(0..100) {
            // Load from two threads at once.
            0..=54 => {
                let handles: Vec<_> = (0..2)
                    .map(|t| {
                        let client = cluster.client();
                        let mut r = StdRng::seed_from_u64(seed * 1000 + step * 2 + t);
                        // Queries draw from their own generator: the requests of a seed
                        // are the same with or without them.
                        let mut q = StdRng::seed_from_u64(!(seed * 1000 + step * 2 + t));
                        thread::spawn(move || {
                            let mut queries = Vec::new();
                            let mut query = |key: &str, asynchronously: bool| {
                                if q.random_range(0..5) == 0 {
                                    let read = |t: &Tally| *t;
                                    let p = match asynchronously {
                                        true => block_on(client.query_async(key, read)),
                                        false => client.query(key, read),
                                    };
                                    queries.push((key.to_string(), p.unwrap()));
                                }
                            };
                            let requests: Vec<(String, Req)> = (0..r.random_range(5..40))
                                .map(|_| {
                                    let k = format!("k{}", r.random_range(0..12));
                                    let req = match r.random_range(0..50) {
                                        0 => Req::Panic,
                                        1 => Req::External,
                                        _ => Req::Add(r.random_range(0..100)),
                                    };
                                    (k, req)
                                })
                                .collect();
                            // The panicking requests with ids (key, id, offset): retried
                            // once set aside.
                            let mut panics = Vec::new();
                            let pending = match (submits, t) {
                                (Submits::One, _) => requests
                                    .into_iter()
                                    .map(|(k, req)| {
                                        query(&k, false);
                                        client.submit(k, req).unwrap()
                                    })
                                    .collect::<Vec<_>>(),
                                (Submits::BatchesAndAsync, 0) => {
                                    let mut out = Vec::new();
                                    let mut rest = &requests[..];
                                    for i in 0.. {
                                        if rest.is_empty() {
                                            break;
                                        }
                                        query(&rest[0].0, false);
                                        let n = r.random_range(1..=8).min(rest.len());
                                        let batch = rest[..n].iter().cloned();
                                        // Every other batch through `submit_batch_async`.
                                        let pending = if i % 2 == 0 {
                                            client.submit_batch(batch)
                                        } else {
                                            block_on(client.submit_batch_async(batch))
                                        };
                                        out.extend(pending.unwrap());
                                        rest = &rest[n..];
                                    }
                                    out
                                }
                                (Submits::BatchesAndAsync, _) => requests
                                    .into_iter()
                                    .map(|(k, req)| {
                                        query(&k, true);
                                        block_on(client.submit_async(k, req)).unwrap()
                                    })
                                    .collect(),
                                (Submits::Ids, 0) => {
                                    let mut out = Vec::new();
                                    for (j, (k, req)) in requests.into_iter().enumerate() {
                                        query(&k, false);
                                        let id = id_of(seed, step, t, j);
                                        let first = client.submit_with_id(&k, id, req.clone());
                                        let first = first.unwrap();
                                        let at = first.offset();
                                        if matches!(req, Req::Panic) {
                                            panics.push((k.clone(), id, at));
                                        }
                                        out.push(first);
                                        if r.random_range(0..4) == 0 {
                                            let retry = client.submit_with_id(&k, id, req.clone());
                                            out.extend(check_retry(seed, at, &req, retry));
                                        }
                                    }
                                    out
                                }
                                (Submits::Ids, _) => {
                                    let mut out = Vec::new();
                                    let with_ids: Vec<_> = requests
                                        .into_iter()
                                        .enumerate()
                                        .map(|(j, (k, req))| (k, id_of(seed, step, t, j), req))
                                        .collect();
                                    let mut rest = &with_ids[..];
                                    for i in 0.. {
                                        if rest.is_empty() {
                                            break;
                                        }
                                        query(&rest[0].0, true);
                                        let n = r.random_range(1..=8).min(rest.len());
                                        let batch = rest[..n].iter().cloned();
                                        let submit = |batch| {
                                            if i % 2 == 0 {
                                                client.submit_batch_with_ids(batch)
                                            } else {
                                                block_on(client.submit_batch_with_ids_async(batch))
                                            }
                                        };
                                        let firsts = submit(batch.clone()).unwrap();
                                        let ats: Vec<u64> =
                                            firsts.iter().map(Pending::offset).collect();
                                        for ((k, id, req), &at) in rest[..n].iter().zip(&ats) {
                                            if matches!(req, Req::Panic) {
                                                panics.push((k.clone(), *id, at));
                                            }
                                        }
                                        out.extend(firsts);
                                        if r.random_range(0..4) == 0 {
                                            let retries = submit(batch).unwrap();
                                            for ((at, retry), (_, _, req)) in
                                                ats.into_iter().zip(retries).zip(&rest[..n])
                                            {
                                                out.extend(check_retry(seed, at, req, Ok(retry)));
                                            }
                                        }
                                        rest = &rest[n..];
                                    }
                                    out
                                }
                            };
                            (pending, queries, panics)
                        })
                    })
                    .collect();
                for h in handles {
                    let (p, q, panics) = h.join().unwrap();
                    pending.extend(p);
                    queries.extend(q);
                    panicked.extend(panics.into_iter().map(|(k, id, at)| (at, (k, id))));
                }
            }
            // A request that stalls its instance past the timeout.
            55..=59 => {
                let k = format!("k{}", rng.random_range(0..12));
                pending.push(cluster.client().submit(k, Req::Stall(150)).unwrap());
            }
            60..=71 => {
                cluster.add_instance(rng.random_range(1..3)).unwrap();
            }
            72..=83 => {
                let members = cluster.members();
                if members.len() > 1 {
                    let id = members[rng.random_range(0..members.len())];
                    // The instance may have been lost (stalled, replaced) since
                    // `members` listed it.
                    match cluster.remove_instance(id) {
                        Ok(()) | Err(cauce::Error::UnknownInstance(_)) => {}
                        Err(e) => panic!("remove {id}: {e}"),
                    }
                }
            }
            84..=91 => {
                // Wait for what is in flight, then crash: drop without shutdown.
                settle(&mut pending, &mut answers, &mut queries, &mut queried);
                drop(cluster);
                cluster = logs.builder().build().unwrap();
            }
            _ => {
                cluster.checkpoint().ok();
            }
        }
        if rng.random_range(0..4) == 0 {
            settle(&mut pending, &mut answers, &mut queries, &mut queried);
        }
        // Set aside either way: a panic, or two stalls in a row (with a 60 ms stall
        // timeout, a panic that builds its backtrace on a loaded machine can be taken for
        // a stall, twice). Both are documented as retryable with the same id.
        panicked.retain(|at, (key, id)| match answers.get(at) {
            Some(Err(Error::HandlerPanicked { .. } | Error::HandlerStalled { .. })) => {
                let retry = cluster.client().submit_with_id(&*key, *id, Req::Add(1));
                match retry {
                    Ok(p) => pending.push(p),
                    Err(e) => panic!("seed {seed}: the retry of {at}, set aside: {e}"),
                }
                retried_after_panic += 1;
                false
            }
            Some(_) => false,
            None => true,
        });
    }
    settle(&mut pending, &mut answers, &mut queries, &mut queried);

    let client = cluster.client();
    let context = format!("seed {seed}");
    common::assert_matches_model(&context, &*logs.input, &*logs.effects, &answers, &client);
    let histories = common::fold(&*logs.input, &common::journal(&*logs.effects)).histories;
    assert!(!queried.is_empty(), "{context}: no query ran");
    for (key, at, answer) in &queried {
        match answer {
            Ok(got) => {
                common::assert_query_answer(&context, &histories, key.as_bytes(), *at, got);
            }
            // A stall caught the instance on the query itself (it is short, but the
            // stall timeout is 60 ms on a busy machine).
            Err(Error::QueryStalled { .. }) => {}
            Err(e) => panic!("{context}: query of {key} at {at}: {e}"),
        }
    }
    if matches!(submits, Submits::Ids) {
        assert!(
            retried_after_panic > 0,
            "{context}: no set-aside request retried"
        );
    }
    // No key and id is logged twice but for a request set aside (which changed nothing).
    let aside = common::set_aside(&*logs.input);
    let mut firsts: HashMap<(Vec<u8>, Vec<u8>), u64> = HashMap::new();
    for r in logs.input.read_from(logs.input.start_offset()).unwrap() {
        let r = r.unwrap();
        if let Some((2, rest)) = r.payload.split_first() {
            let key = (r.key.to_vec(), rest[..16].to_vec());
            if let Some(before) = firsts.insert(key, r.offset) {
                assert!(
                    aside.contains(&before),
                    "{context}: the request at {before} logged again at {}",
                    r.offset
                );
            }
        }
    }
    cluster.shutdown().unwrap();
}

#[test]
fn random_failures_and_membership_changes_keep_every_state_equal_to_the_fold() {
    // Seed 235 removes two instances and then loses the one their keys were moving to,
    // while the first still drains its queue: it once gave a wrong answer (a rebuild
    // folded records that a retiring instance then applied again) and, on the way to
    // the fix, a request never answered.
    for seed in [1, 2, 3, 4, 235] {
        run(seed, Submits::One, placement());
    }
}

#[test]
fn the_same_with_batches_and_async_submits() {
    // Seed 116 routes a batch while a lost instance is out of the table but still in
    // the placement: the batch was refused with `NoInstance` (2 runs in 3).
    for seed in [1, 2, 3, 116] {
        run(seed, Submits::BatchesAndAsync, placement());
    }
}

/// Every request with an id, a quarter of them retried at once, one at a time and in
/// batches, among the failures and membership changes above, in memory and over a log
/// that syncs every request.
#[test]
fn the_same_with_request_ids_and_retries() {
    for seed in [1, 2, 3] {
        run(seed, Submits::Ids, placement());
        run_over(seed, Submits::Ids, placement(), Input::Durable);
    }
}

/// A load window of 24 requests: the instances' loads swing past their caps all the
/// time, so keys are shed between instances among everything else (a key moves at most
/// once per 24 requests).
#[test]
fn the_same_with_keys_shed_by_busy_instances() {
    let shedding = placement().window(24).unwrap();
    for seed in [1, 2, 3] {
        run(seed, Submits::One, shedding);
        run(seed, Submits::BatchesAndAsync, shedding);
    }
}

/// Over a log that fdatasyncs every request (`SyncPolicy::Always`): submits append under
/// their keys' locks and wait for the disk after them, instances wait for the same
/// before they handle a request, and the log shows a record only once it is durable,
/// among the failures and membership changes above.
#[test]
fn the_same_over_a_log_that_syncs_every_request() {
    for seed in [1, 2, 3] {
        run_over(seed, Submits::One, placement(), Input::Durable);
        run_over(seed, Submits::BatchesAndAsync, placement(), Input::Durable);
    }
}
