//! Keys that turn hot after they were placed: an instance over its cap sheds keys, one at
//! each of their requests, to instances with room, while requests flow; a key's state
//! moves with it, so every key's state is still exactly its requests in order. The same
//! holds after an instance joins: the busy instances shed keys to the newcomer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cauce::Result;
use cauce::client::Pending;
use cauce::cluster::{Cluster, Context, Handler};
use cauce::router::{InstanceId, StickyOptions};

/// Each key's state is the list of the values it was sent, in order.
struct Lists;

impl Handler for Lists {
    type State = Vec<u64>;
    type Request = u64;
    type Response = usize;

    fn handle(&self, _: &mut Context<'_>, _: &[u8], list: &mut Vec<u64>, v: u64) -> usize {
        list.push(v);
        list.len()
    }
}

const WINDOW: usize = 1_000;

/// A load of four hot keys (a fifth of the requests each) and 100 cold ones, from two
/// threads, each key always from the same thread, so that each key's values are sent
/// in order: 1, 2, 3, ... (`sent` holds each key's last value).
struct Load {
    hot: Vec<String>,
    cold: Vec<String>,
    sent: BTreeMap<String, u64>,
}

impl Load {
    fn run(&mut self, cluster: &Cluster<Lists>, requests: usize) {
        let mix: Vec<String> = (0..requests)
            .map(|i| match i % 5 {
                4 => self.cold[(i / 5) % self.cold.len()].clone(),
                h => self.hot[h].clone(),
            })
            .collect();
        let hot = self.hot.clone();
        // Thread 0 sends the first two hot keys and half the cold ones.
        let side = |key: &String| -> usize {
            match hot.iter().position(|h| h == key) {
                Some(h) => usize::from(h >= 2),
                None => key.len() % 2,
            }
        };
        let mut plans: [Vec<(String, u64)>; 2] = [Vec::new(), Vec::new()];
        for key in mix {
            let next = self.sent.entry(key.clone()).or_default();
            *next += 1;
            plans[side(&key)].push((key, *next));
        }
        std::thread::scope(|s| {
            for plan in plans {
                let client = cluster.client();
                s.spawn(move || {
                    let mut pending: VecDeque<Pending<usize>> = VecDeque::new();
                    for (key, v) in plan {
                        pending.push_back(client.submit(&key, v).unwrap());
                        if pending.len() >= 256 {
                            pending.pop_front().unwrap().wait().unwrap();
                        }
                    }
                    for p in pending {
                        p.wait().unwrap();
                    }
                });
            }
        });
    }

    /// Every key's state is exactly 1..=its last value.
    fn check(&self, cluster: &Cluster<Lists>) {
        let client = cluster.client();
        for (key, &last) in &self.sent {
            let list = client
                .query(key, |l: &Vec<u64>| l.clone())
                .unwrap()
                .wait()
                .unwrap();
            let expected: Vec<u64> = (1..=last).collect();
            assert!(
                list == expected,
                "{key}: {} values, expected 1..={last}",
                list.len()
            );
        }
    }
}

fn homes(cluster: &Cluster<Lists>, keys: &[String]) -> Vec<InstanceId> {
    keys.iter().map(|k| cluster.owner_of(k).unwrap()).collect()
}

#[test]
fn busy_instances_shed_keys_that_turned_hot_and_states_follow() -> Result<()> {
    let cluster = Cluster::builder(Lists)
        .in_memory()
        .instances(4)
        .placement(
            StickyOptions::default()
                .epsilon(0.2)?
                .window(WINDOW)?
                .idle_after(u64::MAX),
        )
        .build()?;
    // 100 keys placed while quiet, one request each.
    let cold: Vec<String> = (0..100).map(|k| format!("user-{k}")).collect();
    let mut load = Load {
        hot: Vec::new(),
        cold: cold.clone(),
        sent: BTreeMap::new(),
    };
    let client = cluster.client();
    for key in &cold {
        client.submit(key, 1)?.wait()?;
        load.sent.insert(key.clone(), 1);
    }
    // Four turn hot: two of one instance, one each of two others.
    let on = |id: InstanceId| -> Vec<String> {
        let on_it = |k: &&String| cluster.owner_of(k) == Some(id);
        cold.iter().filter(on_it).take(2).cloned().collect()
    };
    let members = cluster.members();
    let (a, b, c) = (on(members[0]), on(members[1]), on(members[2]));
    load.hot = vec![a[0].clone(), a[1].clone(), b[0].clone(), c[0].clone()];
    let before = homes(&cluster, &load.hot);
    assert_eq!(before[0], before[1]);

    let before = cluster.metrics();
    load.run(&cluster, 30 * WINDOW);
    let m1 = cluster.metrics();
    load.run(&cluster, 5 * WINDOW);
    let m2 = cluster.metrics();
    let after = homes(&cluster, &load.hot);
    assert_eq!(
        after.iter().collect::<BTreeSet<_>>().len(),
        4,
        "one hot key per instance: {after:?}"
    );
    assert!(m2.shed_keys > before.shed_keys, "keys were shed");
    assert!(m2.moved_keys >= before.moved_keys + (m2.shed_keys - before.shed_keys));
    let spread = m2.peak_to_mean_since(&m1);
    assert!(spread <= 1.3, "peak/mean {spread:.3} after shedding");
    load.check(&cluster);

    // A fifth instance: the newcomer takes the cold keys of its slots, and the busy
    // instances shed more to it.
    cluster.add_instance(1)?;
    load.run(&cluster, 30 * WINDOW);
    let m3 = cluster.metrics();
    load.run(&cluster, 5 * WINDOW);
    let m4 = cluster.metrics();
    assert_eq!(m4.instances.len(), 5);
    let spread = m4.peak_to_mean_since(&m3);
    assert!(spread <= 1.3, "peak/mean {spread:.3} after a join");
    load.check(&cluster);
    cluster.shutdown()
}

/// Two keys of one instance, sent in turns in one batch, put it over its cap midway: the
/// key it would shed stays with the batch (its items all go where its first went, since
/// they are handed out after the batch's handoffs), and moves at its next request.
#[test]
fn a_key_shed_midway_through_a_batch_keeps_its_items_together() -> Result<()> {
    let cluster = Cluster::builder(Lists)
        .in_memory()
        .instances(2)
        .placement(
            StickyOptions::default()
                .epsilon(0.2)?
                .window(8)?
                .idle_after(u64::MAX),
        )
        .build()?;
    let client = cluster.client();
    let mut placed: BTreeMap<InstanceId, Vec<String>> = BTreeMap::new();
    for k in 0..16 {
        let key = format!("key-{k}");
        client.submit(&key, 1)?.wait()?;
        placed
            .entry(cluster.owner_of(&key).unwrap())
            .or_default()
            .push(key);
    }
    let (a, b) = placed
        .values()
        .find(|keys| keys.len() >= 2)
        .map(|keys| (keys[0].clone(), keys[1].clone()))
        .unwrap();
    let home = cluster.owner_of(&a);
    let items: Vec<(String, u64)> = (2..=41)
        .flat_map(|v| [(a.clone(), v), (b.clone(), v)])
        .collect();
    let pending = client.submit_batch(items)?;
    for p in pending {
        p.wait()?;
    }
    assert_eq!(
        cluster.owner_of(&a),
        home,
        "held together through the batch"
    );
    assert_eq!(cluster.owner_of(&b), home);
    for v in 42..=60 {
        client.submit(&a, v)?.wait()?;
        client.submit(&b, v)?.wait()?;
    }
    assert_ne!(
        cluster.owner_of(&a),
        cluster.owner_of(&b),
        "one was shed after it"
    );
    for key in [&a, &b] {
        let list = client.query(key, |l: &Vec<u64>| l.clone())?.wait()?;
        assert_eq!(list, (1..=60).collect::<Vec<u64>>(), "{key}");
    }
    cluster.shutdown()
}
