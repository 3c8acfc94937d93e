//! Where keys go: the cluster's view of the router, and who holds each key's state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;

use super::instance::Instance;
use crate::error::Result;
use crate::record::{Offset, Timestamp};
use crate::router::table::Prepared;
use crate::router::{InstanceId, Pick, SlotRouter, Sticky};
use crate::small::Key;

/// The routing decisions the cluster needs. The router module provides them; this trait
/// keeps the cluster's use of it in one place.
pub(crate) trait Placement: Send {
    /// Where a request for `key` goes now, without counting it or placing the key: for
    /// a request that may still be refused. See [`Sticky::pick`]. `hash` is the key's
    /// [`key_hash`](crate::router::key_hash).
    fn pick(&mut self, key: &[u8], hash: u64, now: Timestamp) -> Option<Pick>;
    /// Counts a request [`pick`](Placement::pick) routed, once it is accepted (places
    /// its key on first sight); nothing else may be called in between.
    fn count(&mut self, pick: Pick, key: &[u8], hash: u64) -> InstanceId;
    /// The request of `pick` kept where its key is placed now (see
    /// [`Sticky::keep_in_place`]), to count it there instead.
    fn keep_in_place(&self, pick: Pick) -> Pick;
    /// The current placement of `key`, if it has one, without counting a request.
    fn placement(&self, key: &[u8]) -> Option<InstanceId>;
    /// The key's home in the table (its first choice), ignoring loads.
    fn owner_of(&self, key: &[u8]) -> Option<InstanceId>;
    /// Adds an instance.
    fn add(&mut self, id: InstanceId, weight: u32) -> Result<()>;
    /// Removes an instance.
    fn remove(&mut self, id: InstanceId) -> Result<()>;
    /// The router to [draft](SlotRouter::draft) membership changes on, away from the
    /// routing lock; only [`apply`](Placement::apply) may publish what it drafts.
    fn slot_router(&self) -> Arc<SlotRouter>;
    /// Makes the change prepared on a draft, as its `add`s and `remove`s would have;
    /// `false`, changing nothing, if the membership changed since the draft.
    fn apply(&mut self, prepared: Prepared) -> bool;
    /// Changes with every membership change: the instances placements point at stay
    /// in the table while it is unchanged (a key can still move between them, placed
    /// anew after going idle or shed by an instance over its cap).
    fn epoch(&self) -> crate::router::Epoch;
}

impl Placement for Sticky {
    fn pick(&mut self, key: &[u8], hash: u64, now: Timestamp) -> Option<Pick> {
        Sticky::pick(self, key, hash, now)
    }
    fn keep_in_place(&self, pick: Pick) -> Pick {
        Sticky::keep_in_place(self, pick)
    }
    fn count(&mut self, pick: Pick, key: &[u8], hash: u64) -> InstanceId {
        Sticky::count(self, pick, key, hash)
    }
    fn placement(&self, key: &[u8]) -> Option<InstanceId> {
        Sticky::placement(self, key)
    }
    fn owner_of(&self, key: &[u8]) -> Option<InstanceId> {
        self.table().owner_of(key)
    }
    // The moves Sticky reports are recomputed from the holders by `Routing::rebalance`,
    // which also covers keys Sticky has forgotten.
    fn add(&mut self, id: InstanceId, weight: u32) -> Result<()> {
        Sticky::add(self, id, weight).map(drop)
    }
    fn remove(&mut self, id: InstanceId) -> Result<()> {
        Sticky::remove(self, id).map(drop)
    }
    fn slot_router(&self) -> Arc<SlotRouter> {
        Sticky::slot_router(self)
    }
    fn apply(&mut self, prepared: Prepared) -> bool {
        Sticky::apply(self, prepared).is_some()
    }
    fn epoch(&self) -> crate::router::Epoch {
        self.table().epoch()
    }
}

/// Who holds each key's state: the instance that has it, or will have it once its queued
/// `Acquire` runs. Sharded by the keys' stripes, each shard guarded by its stripe lock.
pub(crate) type Holders = HashMap<Key, InstanceId, ahash::RandomState>;

/// What a stripe lock guards: the holders of its keys, and how far the submits under it
/// have appended to the input log.
#[derive(Default)]
pub(crate) struct Stripe {
    pub(crate) holders: Holders,
    /// One past the last record appended under this stripe. Submits append with
    /// `Store::append_deferred` under the lock and wait for the records to be durable
    /// after it: up to there, records of these keys may be queued to their holders
    /// without being durable or visible to readers yet.
    pub(crate) appended_end: Offset,
}

impl std::ops::Deref for Stripe {
    type Target = Holders;
    fn deref(&self) -> &Holders {
        &self.holders
    }
}

impl std::ops::DerefMut for Stripe {
    fn deref_mut(&mut self) -> &mut Holders {
        &mut self.holders
    }
}

/// Makes `to` the holder of `key`; returns the holder it had, if any.
pub(crate) fn hold(holders: &mut Holders, key: &[u8], to: InstanceId) -> Option<InstanceId> {
    match holders.get_mut(key) {
        Some(holder) => Some(std::mem::replace(holder, to)),
        None => {
            holders.insert(Key::copy_from(key), to);
            None
        }
    }
}

/// Undoes [`hold`]: gives `key` back the holder it had before (`None`: none).
pub(crate) fn unhold(holders: &mut Holders, key: &[u8], before: Option<InstanceId>) {
    match (before, holders.get_mut(key)) {
        (Some(h), Some(holder)) => *holder = h,
        _ => drop(holders.remove(key)),
    }
}

/// The placement and the live instances, under one lock.
pub(crate) struct Routing<S, R> {
    pub(crate) placement: Box<dyn Placement>,
    pub(crate) instances: BTreeMap<InstanceId, Arc<Instance<S, R>>>,
}

/// A batch of keys moving from one instance to another.
pub(crate) struct Moves {
    pub(crate) by_route: HashMap<(InstanceId, InstanceId), Vec<Bytes>>,
}

impl<S, R> Routing<S, R> {
    /// Where each held key should be now; records and returns the keys that move. A key
    /// the placement has forgotten (idle) stays with its holder while the holder lives, or
    /// goes to its table owner.
    pub(crate) fn rebalance<'a>(&self, shards: impl Iterator<Item = &'a mut Holders>) -> Moves {
        let alive = |id| self.instances.contains_key(&id);
        let mut by_route: HashMap<(InstanceId, InstanceId), Vec<Bytes>> = HashMap::new();
        let placement = &self.placement;
        for (key, holder) in shards.flat_map(|s| s.iter_mut()) {
            let key = key.as_slice();
            let dest = match placement.placement(key) {
                Some(p) => Some(p),
                None if alive(*holder) => Some(*holder),
                None => placement.owner_of(key),
            };
            if let Some(dest) = dest
                && dest != *holder
            {
                by_route
                    .entry((*holder, dest))
                    .or_default()
                    .push(Bytes::copy_from_slice(key));
                *holder = dest;
            }
        }
        Moves { by_route }
    }
}

impl Moves {
    /// One key moving from `from` to `to`.
    pub(crate) fn single(from: InstanceId, to: InstanceId, key: Bytes) -> Self {
        let mut by_route = HashMap::new();
        by_route.insert((from, to), vec![key]);
        Moves { by_route }
    }
}
