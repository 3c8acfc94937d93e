//! A submit that is refused ([`Error::Busy`] from `try_submit`) or abandoned (a
//! `submit_async` future dropped while it waited for room) logs nothing, and leaves
//! nothing in the placement either: no load counted toward its instance, no key placed.
//! Only requests that are logged steer where new keys go.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Waker};
use std::time::{Duration, Instant};

use cauce::Error;
use cauce::cluster::{Cluster, Context, Handler, Pending};
use cauce::router::InstanceId;

/// Adds the request to the key's total; a request of 7 waits until `release` is set (at
/// most a minute).
#[derive(Clone, Default)]
struct Gate {
    release: Arc<AtomicBool>,
}

impl Handler for Gate {
    type State = u64;
    type Request = u64;
    type Response = u64;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
        let since = Instant::now();
        while add == 7
            && !self.release.load(Ordering::SeqCst)
            && since.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        *total += add;
        *total
    }
}

/// Two instances with queues of one request; `x` (whose home is `a`) is placed on `a`
/// and `b` on the other one, which has handled 10 requests. Then `a` is kept busy by a
/// request of 7 to `x`: its queue is full.
struct Full {
    cluster: Cluster<Gate>,
    release: Arc<AtomicBool>,
    a: InstanceId,
    other: InstanceId,
    blocked: Pending<u64>,
}

/// The first of `prefix0`, `prefix1`, ... whose home is `home`, never seen before.
fn key_at_home(cluster: &Cluster<Gate>, prefix: &str, home: InstanceId) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| cluster.owner_of(k) == Some(home))
        .unwrap()
}

fn fill_a() -> Full {
    let gate = Gate::default();
    let release = gate.release.clone();
    let cluster = Cluster::builder(gate)
        .in_memory()
        .instances(2)
        .queue_capacity(1)
        .build()
        .unwrap();
    let client = cluster.client();
    let a = cluster.owner_of("x").unwrap();
    let other = *cluster.members().iter().find(|&&m| m != a).unwrap();
    let b = key_at_home(&cluster, "b", other);
    for _ in 0..10 {
        client.submit(&b, 1).unwrap().wait().unwrap();
    }
    assert_eq!(cluster.owner_of(&b), Some(other));
    let blocked = client.submit("x", 7).unwrap();
    assert_eq!(cluster.owner_of("x"), Some(a));
    Full {
        cluster,
        release,
        a,
        other,
        blocked,
    }
}

impl Full {
    fn unblock(self) -> Cluster<Gate> {
        self.release.store(true, Ordering::SeqCst);
        assert_eq!(self.blocked.wait().unwrap(), 7);
        self.cluster
    }
}

/// After many submits refused or abandoned on `a`, a new key whose home is `a` is
/// placed on `a`: 11 logged requests in the window, 1 of them on `a`, leave `a` well
/// under its cap. (Counted, the refused ones would put `a` far over it, and the key
/// on the other instance.)
fn a_new_key_goes_home(cluster: &Cluster<Gate>, a: InstanceId) {
    let y = key_at_home(cluster, "y", a);
    assert_eq!(cluster.client().submit(&y, 1).unwrap().wait().unwrap(), 1);
    assert_eq!(
        cluster.owner_of(&y),
        Some(a),
        "refused submits counted toward the load of instance {a}"
    );
}

#[test]
fn a_busy_try_submit_counts_no_load() {
    let full = fill_a();
    let client = full.cluster.client();
    for _ in 0..1_000 {
        assert!(matches!(
            client.try_submit("x", 1),
            Err(Error::Busy { instance, .. }) if instance == full.a
        ));
    }
    let a = full.a;
    let cluster = full.unblock();
    a_new_key_goes_home(&cluster, a);
    cluster.shutdown().unwrap();
}

#[test]
fn a_submit_future_dropped_while_waiting_for_room_counts_no_load() {
    let full = fill_a();
    let client = full.cluster.client();
    let mut cx = TaskContext::from_waker(Waker::noop());
    for _ in 0..1_000 {
        let mut submit = std::pin::pin!(client.submit_async("x", 1));
        assert!(submit.as_mut().poll(&mut cx).is_pending());
    }
    let a = full.a;
    let cluster = full.unblock();
    a_new_key_goes_home(&cluster, a);
    cluster.shutdown().unwrap();
}

#[test]
fn a_busy_try_submit_places_no_key() {
    let full = fill_a();
    let client = full.cluster.client();
    // `z` is new and its home is `a`, which has room under its cap but none in its
    // queue: refused. Placed by it, `z` would stick to `a` below.
    let z = key_at_home(&full.cluster, "z", full.a);
    assert!(matches!(client.try_submit(&z, 1), Err(Error::Busy { .. })));
    let (a, other) = (full.a, full.other);
    let cluster = full.unblock();
    // `a` now goes over its cap: 30 more requests of `x`, which stays there.
    for _ in 0..30 {
        client.submit("x", 1).unwrap().wait().unwrap();
    }
    assert_eq!(cluster.owner_of("x"), Some(a));
    // So `z`, placed by its first logged request, goes to the other instance.
    assert_eq!(client.submit(&z, 1).unwrap().wait().unwrap(), 1);
    assert_eq!(
        cluster.owner_of(&z),
        Some(other),
        "a refused submit placed {z} on instance {a}"
    );
    cluster.shutdown().unwrap();
}
