//! A stall is pinned on the request the supervisor saw running, not on whatever the
//! instance is on when the stall is acted on (later, once every stripe lock is taken):
//! an instance that finished the stalled request meanwhile and moved on to the next one
//! does not get that next one counted as stalled, and set aside after one slow replay.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::{MemoryStore, Store};

mod common;

// The timeline, at a stall timeout of 1 s (scaled up from 250 ms, where a descheduled
// thread stretched request 2's live run past the timeout, and it was then set aside for
// stalling twice): request 1 runs 0-1.15 s and is declared stalled at about 1 s; the
// submit of "z" holds a stripe 0.75-1.35 s, so the loss takes the stripes at about
// 1.35 s, while the instance runs request 2 (1.15-1.55 s, 0.6 s under the timeout).
const STALL: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
struct Svc {
    runs_of_2: Arc<AtomicU64>,
}

impl Handler for Svc {
    type State = u64;
    type Request = u64;
    type Response = u64;
    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        // 1: slow live (a stall), fast on replay.
        if add == 1 && !ctx.is_replay() {
            std::thread::sleep(Duration::from_millis(1_150));
        }
        // 2: 400 ms live (under the timeout), 2 s on its first replay (a stall), then
        // fast.
        if add == 2 {
            match self.runs_of_2.fetch_add(1, Ordering::SeqCst) {
                0 => std::thread::sleep(Duration::from_millis(400)),
                1 => std::thread::sleep(STALL * 2),
                _ => {}
            }
        }
        *total += add;
        *total
    }
}

struct SlowAppend {
    live: MemoryStore,
}

impl Store for SlowAppend {
    fn append(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        if batch.iter().any(|e| e.key == b"z") {
            // A slow disk, under the submitter's stripe lock.
            std::thread::sleep(Duration::from_millis(600));
        }
        self.live.append(batch)
    }
    common::forward_store_but_append!(live);
}

#[test]
fn a_request_that_never_stalled_live_is_not_counted_as_stalled() {
    let input = Arc::new(SlowAppend {
        live: MemoryStore::new(),
    });
    let cluster = Cluster::builder(Svc::default())
        .stores(input.clone(), None)
        .instances(2)
        .stall_timeout(STALL)
        .build()
        .unwrap();
    let client = cluster.client();
    let one = client.submit("k", 1).unwrap();
    let two = client.submit("k", 2).unwrap();
    std::thread::sleep(Duration::from_millis(750));
    // A submit of another key, slow to append, holds a stripe while the stall is seen.
    let c2 = client.clone();
    let z = std::thread::spawn(move || c2.submit("z", 0).unwrap().wait());
    let r1 = one.wait_timeout(Duration::from_secs(20));
    let r2 = two.wait_timeout(Duration::from_secs(20));
    eprintln!(
        "answers: 1 -> {r1:?}, 2 -> {r2:?}; stalls {}",
        cluster.metrics().stalls
    );
    z.join().unwrap().unwrap();
    cluster.shutdown().unwrap();
    assert!(
        r2.is_ok(),
        "request 2 never stalled live (400 ms, timeout 1 s) and stalled once on replay: handled again, not set aside"
    );
}
