//! The router comparisons: cauce's slot table against `hashring` 0.3.6 with 160 virtual
//! nodes per instance (its usual use) and against a hand-written jump hash (the fastest
//! consistent hash there is, with no membership of its own), side by side in one run.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use cauce::router::{
    BoundedLoads, InstanceId, LoadGuard, Member, Router, SlotRouter, SlotRouterOptions, Sticky,
    StickyOptions, key_hash,
};
use hashring::HashRing;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

use crate::harness::{Bench, Better, Goal, median, rate, time};

/// Virtual nodes per instance on the `hashring` ring.
const VIRTUAL_NODES: u32 = 160;

/// One point of an instance on the `hashring` ring.
#[derive(Clone, Copy, Debug, Hash, PartialEq)]
struct VirtualNode {
    instance: u32,
    replica: u32,
}

fn ring_of(ids: impl IntoIterator<Item = u32>) -> HashRing<VirtualNode> {
    let mut ring = HashRing::new();
    ring.batch_add(ids.into_iter().flat_map(virtual_nodes).collect());
    ring
}

fn virtual_nodes(instance: u32) -> Vec<VirtualNode> {
    (0..VIRTUAL_NODES)
        .map(|replica| VirtualNode { instance, replica })
        .collect()
}

/// Lamping and Veach's jump consistent hash: the bucket of a 64-bit key among `buckets`.
fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// Fixed-size user keys, as a service would route them.
fn keys(count: usize) -> Vec<[u8; 16]> {
    (0..count)
        .map(|i| {
            let mut key = [0u8; 16];
            key.copy_from_slice(format!("user-{i:011}").as_bytes());
            key
        })
        .collect()
}

fn members(count: u32, first: u32) -> Vec<Member> {
    (first..first + count)
        .map(|id| Member {
            id: InstanceId(id),
            weight: 1,
        })
        .collect()
}

/// A router sized for its membership, as a user would make it.
fn router_of(count: u32, first: u32) -> SlotRouter {
    let options = SlotRouterOptions::for_instances(count as usize);
    SlotRouter::from_members(options, &members(count, first)).expect("valid members")
}

/// The largest count over the mean count, of requests per instance.
fn peak_over_mean(counts: &HashMap<u32, u64>, instances: usize) -> f64 {
    let total: u64 = counts.values().sum();
    let peak = counts.values().copied().max().unwrap_or(0);
    peak as f64 * instances as f64 / total as f64
}

/// Zipf(1.1) request keys (ranks into the key set, 0 the hottest).
fn zipf_requests(requests: usize, universe: usize) -> Vec<u32> {
    let zipf = Zipf::new(universe as f64, 1.1).expect("valid Zipf parameters");
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    (0..requests)
        .map(|_| zipf.sample(&mut rng) as u32 - 1)
        .collect()
}

/// Runs the router group.
pub fn run(bench: &mut Bench) {
    if !bench.group("router") {
        return;
    }
    // Balance and movement always count a million keys (cheap, and fewer would measure
    // sampling noise: 2,000 keys per instance spread by ±2%); timed loops use fewer
    // with --quick.
    let keys = keys(1_000_000);
    let timed = &keys[..bench.size(1_000_000, 200_000)];
    let mut big = None;
    for instances in [10u32, 100, 1_000] {
        let router = router_of(instances, 1);
        lookups(bench, &router, instances, timed);
        if instances == 1_000 {
            big = Some(router);
        }
    }
    balance_uniform(bench, &keys);
    movement(bench, &keys);
    zipf(bench, &keys, bench.size(1_000, 200));
    if let Some(router) = big {
        rebuild(bench, &router);
        churn(bench, &router, timed);
    }
}

/// Lookups per second, hash included, against `hashring` and a jump hash. The goal of
/// 5 ns per lookup is 200 M lookups/s.
fn lookups(bench: &mut Bench, router: &SlotRouter, instances: u32, keys: &[[u8; 16]]) {
    let ring = ring_of(1..=instances);
    let ids: Vec<InstanceId> = router.members().iter().map(|m| m.id).collect();
    let ours = || {
        let mut reader = router.reader();
        rate(keys.len(), || {
            for key in keys {
                black_box(reader.owner_of(black_box(key)));
            }
        })
    };
    let ring_lookups = || {
        rate(keys.len(), || {
            for key in keys {
                black_box(ring.get(black_box(key)));
            }
        })
    };
    let jump_lookups = || {
        rate(keys.len(), || {
            for key in keys {
                let bucket = jump(key_hash(black_box(key)), instances);
                black_box(ids[bucket as usize]);
            }
        })
    };
    bench.compare(
        &format!("router.lookup.{instances}.vs_hashring"),
        "lookups/s",
        Better::More,
        Some(Goal::RatioAtLeast(4.0)),
        ours,
        ring_lookups,
    );
    bench.compare(
        &format!("router.lookup.{instances}.vs_jump"),
        "lookups/s",
        Better::More,
        Some(Goal::OursAtLeast(200e6)),
        ours,
        jump_lookups,
    );
    // Through the `Router` trait (one arc-swap load per lookup), for the record.
    bench.compare(
        &format!("router.lookup.{instances}.trait.vs_hashring"),
        "lookups/s",
        Better::More,
        None,
        || {
            rate(keys.len(), || {
                for key in keys {
                    black_box(router.owner_of(black_box(key)));
                }
            })
        },
        ring_lookups,
    );
}

/// Peak over mean keys per instance, uniform keys, 100 instances.
fn balance_uniform(bench: &mut Bench, keys: &[[u8; 16]]) {
    let router = router_of(100, 1);
    let table = router.table();
    let ring = ring_of(1..=100);
    let mut ours = HashMap::new();
    let mut theirs = HashMap::new();
    let mut jumped = HashMap::new();
    for key in keys {
        let owner = table.owner_of(key).expect("members");
        *ours.entry(owner.0).or_insert(0u64) += 1;
        let point = ring.get(key).expect("members");
        *theirs.entry(point.instance).or_insert(0u64) += 1;
        *jumped.entry(jump(key_hash(key), 100)).or_insert(0u64) += 1;
    }
    let ours = peak_over_mean(&ours, 100);
    bench.record(
        "router.balance.uniform.100.vs_hashring",
        "peak/mean",
        Better::Less,
        Some(Goal::OursAtMost(1.05)),
        ours,
        peak_over_mean(&theirs, 100),
    );
    bench.record(
        "router.balance.uniform.100.vs_jump",
        "peak/mean",
        Better::Less,
        None,
        ours,
        peak_over_mean(&jumped, 100),
    );
}

/// Keys moved when a 101st instance joins 100, over the ideal (a 101st of the keys).
fn movement(bench: &mut Bench, keys: &[[u8; 16]]) {
    // Keys moved over the ideal, and slots moved over the ideal (the same without the
    // sampling noise of the keys, about ±1% at a million keys).
    let moved_over_ideal = |first: u32| {
        let router = router_of(100, first);
        let before = router.table();
        router
            .add(InstanceId(first + 100), 1)
            .expect("a new member");
        let after = router.table();
        let moved = keys
            .iter()
            .filter(|key| {
                let hash = key_hash(&key[..]);
                before.owner_of_hash(hash) != after.owner_of_hash(hash)
            })
            .count();
        let slots = before.slot_count();
        let moved_slots = (0..slots)
            .filter(|&s| before.slot_owner(s) != after.slot_owner(s))
            .count();
        (
            moved as f64 / (keys.len() as f64 / 101.0),
            moved_slots as f64 / (slots as f64 / 101.0),
        )
    };
    let ring_before = ring_of(1..=100);
    let ring_after = ring_of(1..=101);
    let ring_moved = keys
        .iter()
        .filter(|key| {
            ring_before.get(key).map(|p| p.instance) != ring_after.get(key).map(|p| p.instance)
        })
        .count();
    let theirs = ring_moved as f64 / (keys.len() as f64 / 101.0);
    let (keys_moved, slots_moved) = moved_over_ideal(1);
    bench.record(
        "router.movement.100to101.vs_hashring",
        "x ideal",
        Better::Less,
        Some(Goal::OursAtMost(1.05)),
        keys_moved,
        theirs,
    );
    bench.record(
        "router.movement.100to101.slots.vs_ideal",
        "x ideal",
        Better::Less,
        Some(Goal::OursAtMost(1.05)),
        slots_moved,
        1.0,
    );
    // The same over other memberships (ids offset by 10,000s): the worst of them.
    let memberships = if bench.quick() { 3 } else { 8 };
    let worst = (1..=memberships)
        .map(|m| moved_over_ideal(m * 10_000 + 1).0)
        .fold(0.0f64, f64::max);
    bench.record(
        &format!("router.movement.100to101.worst_of_{memberships}.vs_hashring"),
        "x ideal",
        Better::Less,
        None,
        worst,
        theirs,
    );
}

/// Zipf(1.1) requests over a million keys and 100 instances: plain, per-request
/// bounded (`per_instance` requests in flight on average), and sticky.
fn zipf(bench: &mut Bench, keys: &[[u8; 16]], per_instance: usize) {
    let instances = 100;
    // Ten lifetimes of a request: one to warm up, nine counted.
    let in_flight = per_instance * instances as usize;
    let requests = zipf_requests(10 * in_flight, keys.len());
    let router = Arc::new(router_of(instances, 1));
    let table = router.table();
    let ring = ring_of(1..=instances);
    let (mut plain, mut ringed) = (HashMap::new(), HashMap::new());
    for &r in &requests {
        let key = &keys[r as usize];
        *plain
            .entry(table.owner_of(key).expect("members").0)
            .or_insert(0u64) += 1;
        *ringed
            .entry(ring.get(key).expect("members").instance)
            .or_insert(0u64) += 1;
    }
    let ring_skew = peak_over_mean(&ringed, instances as usize);
    bench.record(
        "router.balance.zipf.100.unbounded.vs_hashring",
        "peak/mean",
        Better::Less,
        None,
        peak_over_mean(&plain, instances as usize),
        ring_skew,
    );

    // Per request: each request stays in flight while the next `in_flight` arrive, then
    // finishes; requests served are counted over whole lifetimes after the first.
    let balancer = BoundedLoads::new(Arc::clone(&router));
    let mut window: std::collections::VecDeque<LoadGuard> =
        std::collections::VecDeque::with_capacity(in_flight + 1);
    let mut served = HashMap::new();
    for (i, &r) in requests.iter().enumerate() {
        let guard = balancer.begin(&keys[r as usize]).expect("members");
        if i >= in_flight {
            *served.entry(guard.instance().0).or_insert(0u64) += 1;
        }
        window.push_back(guard);
        if window.len() > in_flight {
            window.pop_front();
        }
    }
    bench.record(
        "router.balance.zipf.100.bounded.vs_hashring",
        "peak/mean",
        Better::Less,
        Some(Goal::OursAtMost(1.25)),
        peak_over_mean(&served, instances as usize),
        ring_skew,
    );

    // Sticky: each key placed once; the floor is the hottest key's own share.
    let options = StickyOptions::default().router(SlotRouterOptions::for_instances(100));
    let mut sticky = Sticky::new(options);
    for id in 1..=instances {
        sticky.add(InstanceId(id), 1).expect("a new member");
    }
    let mut placed = HashMap::new();
    let mut hottest = 0u64;
    for (i, &r) in requests.iter().enumerate() {
        let at = sticky.route(&keys[r as usize], i as u64).expect("members");
        *placed.entry(at.0).or_insert(0u64) += 1;
        hottest += u64::from(r == 0);
    }
    let floor = (hottest as f64 * f64::from(instances) / requests.len() as f64).max(1.0);
    bench.record(
        "router.balance.zipf.100.sticky.vs_floor",
        "peak/mean",
        Better::Less,
        Some(Goal::RatioAtLeast(0.8)),
        peak_over_mean(&placed, instances as usize),
        floor,
    );

    // The dispatcher's cost per request, against the least a placement table can do: a
    // hash map from key to its owner, filled on first sight.
    let mut placements: HashMap<bytes::Bytes, InstanceId> = HashMap::new();
    let mut now = requests.len() as u64;
    bench.compare(
        "router.sticky.route.100.vs_hashmap",
        "routes/s",
        Better::More,
        None,
        || {
            rate(requests.len(), || {
                for &r in &requests {
                    now += 1;
                    black_box(sticky.route(black_box(&keys[r as usize]), now));
                }
            })
        },
        || {
            rate(requests.len(), || {
                for &r in &requests {
                    let key = black_box(&keys[r as usize][..]);
                    let at = match placements.get(key) {
                        Some(&at) => at,
                        None => {
                            let at = table.owner_of(key).expect("members");
                            placements.insert(bytes::Bytes::copy_from_slice(key), at);
                            at
                        }
                    };
                    black_box(at);
                }
            })
        },
    );
}

/// Milliseconds to publish a new table after one change at 1,000 instances.
fn rebuild(bench: &mut Bench, router: &SlotRouter) {
    let mut ring = ring_of(1..=1_000);
    let newcomer = InstanceId(1_001);
    let mut ours_add = Vec::new();
    let mut ours_remove = Vec::new();
    let mut theirs_add = Vec::new();
    let mut theirs_remove = Vec::new();
    for _ in 0..bench.size(9, 5) {
        ours_add.push(ms(time(|| {
            router.add(newcomer, 1).expect("a new member");
        })));
        ours_remove.push(ms(time(|| {
            router.remove(newcomer).expect("a member");
        })));
        theirs_add.push(ms(time(|| ring.batch_add(virtual_nodes(newcomer.0)))));
        theirs_remove.push(ms(time(|| {
            for node in virtual_nodes(newcomer.0) {
                ring.remove(&node);
            }
        })));
    }
    bench.record(
        "router.rebuild.1000.add.vs_hashring",
        "ms",
        Better::Less,
        Some(Goal::OursAtMost(5.0)),
        median(&ours_add),
        median(&theirs_add),
    );
    bench.record(
        "router.rebuild.1000.remove.vs_hashring",
        "ms",
        Better::Less,
        Some(Goal::OursAtMost(5.0)),
        median(&ours_remove),
        median(&theirs_remove),
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nanoseconds per lookup for two reading threads while a third changes the membership
/// (a join or a leave every 2 ms), against `hashring` behind a `RwLock`.
fn churn(bench: &mut Bench, router: &SlotRouter, keys: &[[u8; 16]]) {
    let ring = RwLock::new(ring_of(1..=1_000));
    let newcomer = InstanceId(1_001);
    let ours = || {
        read_while_changing(
            keys,
            |keys| {
                let mut reader = router.reader();
                for key in keys {
                    black_box(reader.owner_of(black_box(key)));
                }
            },
            |joined| {
                if joined {
                    router.remove(newcomer).expect("a member");
                } else {
                    router.add(newcomer, 1).expect("a new member");
                }
            },
        )
    };
    let theirs = || {
        read_while_changing(
            keys,
            |keys| {
                for key in keys {
                    let ring = ring.read().expect("not poisoned");
                    black_box(ring.get(black_box(key)).map(|p| p.instance));
                }
            },
            |joined| {
                let mut ring = ring.write().expect("not poisoned");
                if joined {
                    for node in virtual_nodes(newcomer.0) {
                        ring.remove(&node);
                    }
                } else {
                    ring.batch_add(virtual_nodes(newcomer.0));
                }
            },
        )
    };
    bench.compare(
        "router.lookup.churn.1000.vs_hashring_rwlock",
        "ns/lookup",
        Better::Less,
        None,
        ours,
        theirs,
    );
    // Leave the router as it was.
    if router.members().len() > 1_000 {
        router.remove(newcomer).expect("a member");
    }
}

/// Two threads each look up every key while the caller changes the membership every
/// 2 ms; returns the mean nanoseconds per lookup of the readers.
fn read_while_changing(
    keys: &[[u8; 16]],
    read: impl Fn(&[[u8; 16]]) + Sync,
    mut change: impl FnMut(bool),
) -> f64 {
    let done = AtomicBool::new(false);
    let start = Barrier::new(3);
    let mut joined = false;
    let per_thread = thread::scope(|scope| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    let began = Instant::now();
                    read(keys);
                    let took = began.elapsed();
                    done.store(true, Ordering::Release);
                    took
                })
            })
            .collect();
        start.wait();
        while !done.load(Ordering::Acquire) {
            change(joined);
            joined = !joined;
            thread::sleep(Duration::from_millis(2));
        }
        readers
            .into_iter()
            .map(|r| r.join().expect("reader did not panic"))
            .collect::<Vec<_>>()
    });
    if joined {
        change(true); // leave the membership as it was
    }
    let total: f64 = per_thread.iter().map(|d| d.as_nanos() as f64).sum();
    total / (per_thread.len() * keys.len()) as f64
}
