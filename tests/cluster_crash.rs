//! Kill-and-restart with real processes: a child runs a cluster on a directory under
//! load and prints every acknowledged request; the parent SIGKILLs it at random moments,
//! round after round, and after each kill checks that every acknowledged request is in
//! the log and reflected in the recovered state exactly once.
//!
//! The test binary is its own child: with `CAUCE_CLUSTER_CHILD_DIR` set, the test runs the
//! loaded cluster instead.

mod common;
#[path = "support/kill.rs"]
mod kill;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use cauce::cluster::{Cluster, ClusterBuilder};
use cauce::store::{LogOptions, LogStore, SyncPolicy};
use common::{Req, Resp, Service};
use rand::{RngExt, SeedableRng};

const CHILD_ENV: &str = "CAUCE_CLUSTER_CHILD_DIR";
const ROUNDS: usize = 16;
const KEYS: u64 = 24;

fn builder(dir: &Path) -> ClusterBuilder<Service> {
    Cluster::builder(Service::default())
        .dir(dir)
        .log_options(
            LogOptions::new()
                .sync(SyncPolicy::Always)
                .segment_bytes(64 << 10),
        )
        .instances(3)
        .checkpoint_every(150)
        .supervise_every(Duration::from_millis(5))
}

/// The child: a cluster under load from three threads (one of them submitting batches),
/// printing each acknowledgement as `ack <offset> <key> <value> <answered sum>`.
fn run_child(dir: &Path) {
    let cluster = match builder(dir).build() {
        Ok(c) => c,
        Err(e) => {
            println!("error {e}");
            return;
        }
    };
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let client = cluster.client();
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id() as u64 * 7 + t);
                loop {
                    // The first thread submits batches of 1 to 5, the others one at a time.
                    let n = if t == 0 { rng.random_range(1..6) } else { 1 };
                    let items: Vec<(u64, u64)> = (0..n)
                        .map(|_| (rng.random_range(0..KEYS), rng.random_range(1..1000u64)))
                        .collect();
                    let requests = items.iter().map(|&(k, v)| (format!("k{k}"), Req::Add(v)));
                    let pendings: Vec<_> = if t == 0 {
                        client.submit_batch(requests).expect("submit")
                    } else {
                        requests
                            .map(|(k, req)| client.submit(k, req).expect("submit"))
                            .collect()
                    };
                    for ((k, v), pending) in items.into_iter().zip(pendings) {
                        let offset = pending.offset();
                        let Ok(Resp::Sum(sum)) = pending.wait() else {
                            panic!("request at {offset} failed");
                        };
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ack {offset} k{k} {v} {sum}").expect("stdout");
                        out.flush().expect("stdout");
                    }
                }
            });
        }
    });
}

struct Ack {
    key: String,
    value: u64,
    sum: u64,
}

#[test]
fn acknowledged_requests_survive_sigkill_exactly_once() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        run_child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("cluster");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut acked: HashMap<u64, Ack> = HashMap::new();
    for round in 0..ROUNDS {
        // Kill while requests are under way, at a random moment after the first answer.
        let after = Duration::from_millis(rng.random_range(0..120));
        let lines = kill::run_and_kill(
            "acknowledged_requests_survive_sigkill_exactly_once",
            CHILD_ENV,
            &dir,
            "ack ",
            Duration::from_secs(30),
            after,
        );
        assert!(
            !lines.is_empty(),
            "round {round}: the child answered requests"
        );
        for line in lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [_, offset, key, value, sum] = parts[..] else {
                continue; // a line cut by the kill
            };
            let (Ok(offset), Ok(value), Ok(sum)) = (offset.parse(), value.parse(), sum.parse())
            else {
                continue;
            };
            acked.insert(
                offset,
                Ack {
                    key: key.to_string(),
                    value,
                    sum,
                },
            );
        }
        check(&dir, &acked, round);
    }
}

/// Every acknowledged request is in the log as sent; folding the log in order gives the
/// sum each one was answered with; and the recovered cluster holds exactly that fold.
fn check(dir: &Path, acked: &HashMap<u64, Ack>, round: usize) {
    let (states, answers, requests) = {
        let input = LogStore::open_read_only(dir.join("input"), LogOptions::new())
            .unwrap_or_else(|e| panic!("round {round}: reopen the input log: {e}"));
        assert!(input.corruption().is_none(), "round {round}: no damage");
        let (states, answers) = common::model(&input, &HashMap::new());
        (states, answers, common::requests(&input))
    };
    for (offset, ack) in acked {
        assert_eq!(
            requests.get(offset),
            Some(&(ack.key.clone().into_bytes(), Req::Add(ack.value))),
            "round {round}: acknowledged request {offset} is in the log as sent"
        );
        assert_eq!(
            answers.get(offset),
            Some(&Some(Resp::Sum(ack.sum))),
            "round {round}: request {offset} ({} += {}) was acknowledged with {} but the log \
             folds to another answer",
            ack.key,
            ack.value,
            ack.sum
        );
    }
    let cluster = builder(dir)
        .build()
        .unwrap_or_else(|e| panic!("round {round}: recovery failed: {e}"));
    let client = cluster.client();
    for (key, want) in &states {
        let got = client
            .submit(key, Req::Get)
            .expect("submit")
            .wait()
            .expect("answer");
        assert_eq!(
            got,
            Resp::State(*want),
            "round {round}: state of {} after recovery",
            String::from_utf8_lossy(key)
        );
    }
    cluster.shutdown().expect("shutdown");
}
