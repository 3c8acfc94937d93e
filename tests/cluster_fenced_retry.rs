//! A retried rebuild of an unavailable key that stalls: its instance, fenced, leaves the
//! request it was retrying for to the new owner, which applies and answers it (before,
//! the fenced instance answered it StateUnavailable while the new owner applied it).
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler};
use cauce::store::MemoryStore;

mod common;
use common::Unreadable;

#[derive(Clone, Default)]
struct Svc {
    release: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    hanging: Arc<AtomicBool>,
    replays_of_5: Arc<AtomicU64>,
    /// Broken by the handler of 7 as it begins to hang: the log must be unreadable
    /// before the stall is declared, and a test thread that breaks it once it sees the
    /// hang can be descheduled past the stall timeout first.
    input: Option<Arc<Unreadable>>,
}

/// The stall timeout, and the replays of 5 measured against it. The retry's replay
/// (`RETRY_REPLAY`) is a stall, and ends before the new owner, whose rebuild starts at
/// the stall and takes `NEW_OWNER_REPLAY`, answers: that is when the fenced instance
/// could answer the request wrongly. The new owner's replay stays 500 ms under the
/// stall timeout, so that a loaded machine does not make it a stall too.
const STALL_TIMEOUT: Duration = Duration::from_millis(1000);
const RETRY_REPLAY: Duration = Duration::from_millis(1300);
const NEW_OWNER_REPLAY: Duration = Duration::from_millis(500);

impl Handler for Svc {
    type State = u64;
    type Request = u64;
    type Response = u64;
    fn handle(&self, ctx: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        if add == 7 && !self.stalled.swap(true, Ordering::SeqCst) {
            if let Some(input) = &self.input {
                input.broken.store(true, Ordering::SeqCst);
            }
            self.hanging.store(true, Ordering::SeqCst);
            let since = Instant::now();
            while !self.release.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(60)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if add == 5 && ctx.is_replay() {
            match self.replays_of_5.fetch_add(1, Ordering::SeqCst) {
                // The retry on the instance the key is unavailable on: a stall.
                0 => std::thread::sleep(RETRY_REPLAY),
                // The new owner's rebuild: slow, not a stall.
                1 => std::thread::sleep(NEW_OWNER_REPLAY),
                _ => {}
            }
        }
        *total += add;
        *total
    }
}

static REBUILD_FAILED: AtomicBool = AtomicBool::new(false);

/// Waits until `done()` holds, at most 20 s.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    common::wait_until(what, Duration::from_secs(20), done);
}

#[test]
fn a_fenced_retry_leaves_its_request_to_the_new_owner() {
    tracing::subscriber::set_global_default(common::OnEvent(
        |_: &tracing::Metadata<'_>, fields: &str| {
            if fields.contains("could not rebuild moved keys") {
                REBUILD_FAILED.store(true, Ordering::SeqCst);
            }
        },
    ))
    .unwrap();
    let input = Arc::new(Unreadable {
        live: MemoryStore::new(),
        broken: AtomicBool::new(false),
    });
    let svc = Svc {
        input: Some(input.clone()),
        ..Svc::default()
    };
    let (release, hanging) = (svc.release.clone(), svc.hanging.clone());
    let cluster = Cluster::builder(svc)
        .stores(input.clone(), None)
        .instances(2)
        .stall_timeout(STALL_TIMEOUT)
        .build()
        .unwrap();
    let client = cluster.client();
    assert_eq!(client.submit("k", 5).unwrap().wait().unwrap(), 5);
    let seven = client.submit("k", 7).unwrap();
    wait_until("7 hangs", || hanging.load(Ordering::SeqCst));
    // Its handler broke the log before it began to hang.
    let r7 = seven.wait_timeout(Duration::from_secs(20));
    eprintln!("7 (its rebuild failed): {r7:?}");
    assert!(matches!(r7, Err(Error::StateUnavailable { .. })));
    wait_until("the rebuild failed", || {
        REBUILD_FAILED.load(Ordering::SeqCst)
    });
    input.broken.store(false, Ordering::SeqCst);
    release.store(true, Ordering::SeqCst);
    // Well past REBUILD_RETRY_AFTER (100 ms) since the rebuild failed: the next request
    // of k retries it.
    std::thread::sleep(Duration::from_millis(500));
    let owner = client.owner_of("k").unwrap();
    // Retries the rebuild up to it; the retry stalls on the replay of 5.
    let one = client.submit("k", 1).unwrap();
    let r1 = one.wait_timeout(Duration::from_secs(20));
    let stalls = cluster.metrics().stalls;
    let now = client
        .submit("k", 0)
        .unwrap()
        .wait_timeout(Duration::from_secs(20));
    eprintln!(
        "owner during retry {owner}, stalls {stalls}; answer of +1: {r1:?}; state now: {now:?}"
    );
    cluster.shutdown().unwrap();
    let now = now.unwrap();
    assert_eq!(now, 13, "5 + 7 + 1 all applied");
    assert!(
        r1.is_ok(),
        "+1 was applied (state {now}) but its caller was told {r1:?}"
    );
}
