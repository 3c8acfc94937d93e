//! The slot-table router: O(1) lookups from a table that is a pure function of the
//! membership.
//!
//! # The idea
//!
//! A key's [hash](super::key_hash) picks one of `S` slots (its top bits; `S` a power of
//! two), and a table maps each slot to an instance: a lookup is one hash, one shift and
//! two array reads. Everything interesting happens when the table is built:
//!
//! 1. **Scores.** Every (slot, instance) pair has a weighted rendezvous score (see
//!    [`hash`](super::hash)): a fixed pseudo-random number in which an instance of
//!    weight `w` beats the others with probability `w / W`. Left alone, each slot would
//!    go to its best-scoring instance, and adding or removing an instance would move
//!    exactly the slots it wins or held: the ideal movement. But the counts would be
//!    binomial, not balanced.
//! 2. **Caps.** So each instance may hold at most `⌈(1 + ε) · S · w / W⌉` slots
//!    (ε = [`SlotRouterOptions::table_epsilon`], 0.02 by default), and slots are assigned
//!    by the unique *stable matching* under the common scores: slots propose to
//!    instances in score order, and a full instance keeps the slots it scores best. It is
//!    what a global greedy pass by descending score would give, so it depends on the
//!    membership alone, never on the order instances joined in; and a cap only ever
//!    pushes an instance's weakest slots to their next choice, so movement stays close
//!    to the ideal.
//! 3. **Incremental.** Scoring every pair is `S × n` hashes and matching all slots is a
//!    pass with a heap operation per slot: too slow for a change at 1,000 instances. The
//!    builder keeps the matching and repairs it: a join scores the newcomer against
//!    every slot and lets it take the slots that prefer it, a leave frees the leaver's
//!    slots, and caps that shrank release their weakest slots. Because the stable
//!    matching is unique, the repaired table equals a build from scratch (the tests
//!    check it); `matching.rs` explains the repair.
//!
//! The table is published as an immutable [`SlotTable`] snapshot through `arc-swap`:
//! readers never lock, never wait for a rebuild and never see a half-built table.
//!
//! # The number of slots
//!
//! `S` is fixed for the life of a router by its [`SlotRouterOptions`], because changing
//! it would re-route almost every key. What it buys is slack: an instance's share of
//! slots under pure rendezvous scoring is binomial, with a spread of `√(S/n)` slots, and
//! the cap sits `ε · S/n` above the mean; when the cap is within a fraction of a spread
//! many instances sit at it, and every change shifts caps by one slot or so for all of
//! them, which cascades. Measured at 100 instances and ε = 0.02, keys moved when a
//! 101st joins, over the ideal 1/101: 1.01–1.20 with 2^16 slots, 1.00–1.11 with 2^17,
//! 0.98–1.07 with 2^18 (median 1.01 over twelve). So
//! [`SlotRouterOptions::for_instances`] picks 2,560 slots per instance, within
//! 2^16..=2^18 (past that, a change costs more than 5 ms at 1,000 instances). The
//! default, 2^16 slots, is for up to about 25 instances at that quality (and balanced
//! within ε, rounded up to a whole slot, at any size): its builder takes 6 MiB where 2^18 takes 24 MiB, and a change
//! costs a quarter as much, which matters most in unoptimized test builds. The bound is
//! rounded up to a whole slot: `⌈(1 + ε) · S · w / W⌉`, so with few slots per instance
//! one slot more than ε allows (3 slots where the mean is 2.56, with 256 slots and 100
//! instances; 34 where it is 32.8, with the default table and 2,000 instances).
//!
//! ```
//! use cauce::router::{InstanceId, Router, SlotRouter, key_hash};
//!
//! let router = SlotRouter::new();
//! for id in 1..=4 {
//!     router.add(InstanceId(id), 1).unwrap();
//! }
//! let owner = router.owner_of(b"alice").unwrap();
//! // The fast path: hash once, look up as often as needed.
//! assert_eq!(router.owner_of_hash(key_hash(b"alice")), Some(owner));
//!
//! // The same membership, joined in another order, routes every key the same way.
//! let other = SlotRouter::new();
//! for id in [3, 1, 4, 2] {
//!     other.add(InstanceId(id), 1).unwrap();
//! }
//! assert_eq!(other.owner_of(b"alice"), Some(owner));
//! assert!(router.table().same_assignment(&other.table()));
//!
//! // Replicas: the owner first, then the instances that would take over.
//! let mut replicas = Vec::new();
//! router.preference_list(b"alice", 3, &mut replicas);
//! assert_eq!(replicas[0], owner);
//! assert_eq!(replicas.len(), 3);
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::{ArcSwap, Cache};
use parking_lot::Mutex;

use super::hash::{key_hash, slot_of, slot_rank};
use super::matching::{NO_SEAT, RANKED_PER_SLOT, SeatInfo, TableBuilder, candidate};
use super::{Epoch, InstanceId, Member, Router};
use crate::error::{Error, Result};

/// The most instances a slot router can hold (table entries are 16-bit seat numbers).
pub const MAX_INSTANCES: usize = u16::MAX as usize - 1;

/// The table ε is kept in parts per million, so caps are computed in exact integers.
const PPM: u128 = 1_000_000;

/// How a [`SlotRouter`] builds its table. Two routers agree on every key only if they
/// have the same slot count and ε (and the same membership).
///
/// ```
/// use cauce::router::SlotRouterOptions;
///
/// assert_eq!(SlotRouterOptions::default().slot_count(), 1 << 16);
/// assert_eq!(SlotRouterOptions::for_instances(100).slot_count(), 1 << 18);
/// let tight = SlotRouterOptions::default().table_epsilon(0.01).unwrap();
/// assert_eq!(tight.epsilon(), 0.01);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRouterOptions {
    slot_bits: u32,
    epsilon_ppm: u32,
    candidates: usize,
}

impl Default for SlotRouterOptions {
    /// 2^16 slots, a table ε of 0.02 and 8 cached candidates per slot: balanced within
    /// 2% (rounded up to a whole slot) at any size, moving within a few percent of the ideal up to about 25
    /// instances (use [`for_instances`](Self::for_instances) for more).
    fn default() -> Self {
        SlotRouterOptions {
            slot_bits: 16,
            epsilon_ppm: 20_000,
            candidates: 8,
        }
    }
}

impl SlotRouterOptions {
    /// The smallest slot count, 2^8.
    pub const MIN_SLOTS: usize = 1 << 8;
    /// The largest slot count, 2^24.
    pub const MAX_SLOTS: usize = 1 << 24;

    /// Options sized for up to `instances` instances: `S` is the power of two at or
    /// above `2,560 × instances`, within 2^16..=2^18 (see the [module docs](self)).
    pub fn for_instances(instances: usize) -> Self {
        let wanted = instances.saturating_mul(2_560).clamp(1 << 16, 1 << 18);
        SlotRouterOptions {
            slot_bits: wanted.next_power_of_two().trailing_zeros(),
            ..SlotRouterOptions::default()
        }
    }

    /// Sets the number of slots: a power of two in
    /// [`MIN_SLOTS`](Self::MIN_SLOTS)..=[`MAX_SLOTS`](Self::MAX_SLOTS).
    pub fn slots(mut self, slots: usize) -> Result<Self> {
        if !slots.is_power_of_two() || !(Self::MIN_SLOTS..=Self::MAX_SLOTS).contains(&slots) {
            return Err(Error::Config(format!(
                "slot count {slots} must be a power of two in {}..={}",
                Self::MIN_SLOTS,
                Self::MAX_SLOTS
            )));
        }
        self.slot_bits = slots.trailing_zeros();
        Ok(self)
    }

    /// Sets the table ε: each instance holds at most `⌈(1 + ε) · S · w / W⌉` slots.
    /// Smaller is better balanced but moves more slots on a change; in `0.001..=1.0`.
    pub fn table_epsilon(mut self, epsilon: f64) -> Result<Self> {
        if !(0.001..=1.0).contains(&epsilon) {
            return Err(Error::Config(format!(
                "table epsilon {epsilon} must be in 0.001..=1.0"
            )));
        }
        self.epsilon_ppm = (epsilon * PPM as f64).round() as u32;
        Ok(self)
    }

    /// Sets how many ranked candidates the builder caches per slot (4..=64). More means
    /// fewer slots re-ranked after a leave, at 8 bytes per slot each. It never changes
    /// the table.
    pub fn cached_candidates(mut self, candidates: usize) -> Result<Self> {
        if !(RANKED_PER_SLOT..=64).contains(&candidates) {
            return Err(Error::Config(format!(
                "cached candidates {candidates} must be in {RANKED_PER_SLOT}..=64"
            )));
        }
        self.candidates = candidates;
        Ok(self)
    }

    /// The number of slots `S`.
    pub fn slot_count(&self) -> usize {
        1 << self.slot_bits
    }

    /// The table ε.
    pub fn epsilon(&self) -> f64 {
        f64::from(self.epsilon_ppm) / PPM as f64
    }

    pub(super) fn cached_candidates_len(&self) -> usize {
        self.candidates
    }

    /// The most slots an instance of weight `weight` may hold when the weights sum to
    /// `total_weight`: `⌈(1 + ε) · S · w / W⌉`, in exact integer arithmetic.
    pub(super) fn cap(&self, weight: u32, total_weight: u64) -> u32 {
        let numerator =
            (PPM + u128::from(self.epsilon_ppm)) * self.slot_count() as u128 * u128::from(weight);
        let denominator = PPM * u128::from(total_weight.max(1));
        numerator.div_ceil(denominator).min(u128::from(u32::MAX)) as u32
    }
}

/// One immutable routing table: what every lookup reads.
///
/// Get one with [`SlotRouter::table`] and keep it for a batch of lookups, or use a
/// [`TableReader`], which follows new tables as they are published. A table never
/// changes; a membership change publishes a new one with a new [`epoch`](Self::epoch).
#[derive(Debug)]
pub struct SlotTable {
    epoch: Epoch,
    bits: u32,
    epsilon_ppm: u32,
    /// The members, sorted by id, and each one's seat.
    members: Box<[Member]>,
    member_seats: Box<[u16]>,
    /// Seat → instance (the builder's numbering; vacant seats have weight 0).
    seats: Box<[SeatInfo]>,
    /// Seat → id alone, 4 bytes a seat, for lookups.
    seat_ids: Box<[InstanceId]>,
    /// Slot → seat of its owner; empty when there is no member.
    owners: Box<[u16]>,
    /// Slot → its best-ranked seats, [`RANKED_PER_SLOT`] per slot, best first.
    ranked: Box<[u16]>,
}

impl SlotTable {
    fn empty(epoch: Epoch, options: SlotRouterOptions) -> Self {
        SlotTable {
            epoch,
            bits: options.slot_bits,
            epsilon_ppm: options.epsilon_ppm,
            members: Box::new([]),
            member_seats: Box::new([]),
            seats: Box::new([]),
            seat_ids: Box::new([]),
            owners: Box::new([]),
            ranked: Box::new([]),
        }
    }

    fn from_builder(builder: &TableBuilder) -> Self {
        let options = builder.options();
        if builder.len() == 0 {
            return SlotTable::empty(builder.epoch, options);
        }
        let rows = builder.rows();
        let seats = builder.seat_infos();
        SlotTable {
            epoch: builder.epoch,
            bits: options.slot_bits,
            epsilon_ppm: options.epsilon_ppm,
            members: rows
                .iter()
                .map(|m| Member {
                    id: m.id,
                    weight: m.weight,
                })
                .collect(),
            member_seats: rows.iter().map(|m| m.seat).collect(),
            seats: seats.clone().into_boxed_slice(),
            seat_ids: seats.iter().map(|s| s.id).collect(),
            owners: builder.owners().into(),
            ranked: builder.ranked().into(),
        }
    }

    /// The epoch of the membership this table was built from.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The members and their weights, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The number of slots `S`.
    pub fn slot_count(&self) -> usize {
        1 << self.bits
    }

    /// The instance that owns a key, by its [`key_hash`]; `None` without members.
    #[inline]
    pub fn owner_of_hash(&self, hash: u64) -> Option<InstanceId> {
        let seat = *self.owners.get(slot_of(hash, self.bits))?;
        self.seat_ids.get(usize::from(seat)).copied()
    }

    /// The instance that owns `key`; `None` without members.
    #[inline]
    pub fn owner_of(&self, key: &[u8]) -> Option<InstanceId> {
        self.owner_of_hash(key_hash(key))
    }

    /// The owner of one slot (`None` without members or past the last slot).
    pub fn slot_owner(&self, slot: usize) -> Option<InstanceId> {
        let seat = *self.owners.get(slot)?;
        self.seats.get(usize::from(seat)).map(|s| s.id)
    }

    /// How many slots each member holds, sorted by id.
    pub fn slot_counts(&self) -> Vec<(InstanceId, usize)> {
        let mut by_seat = vec![0usize; self.seats.len()];
        for &seat in self.owners.iter() {
            by_seat[usize::from(seat)] += 1;
        }
        self.members
            .iter()
            .zip(self.member_seats.iter())
            .map(|(m, &seat)| (m.id, by_seat[usize::from(seat)]))
            .collect()
    }

    /// The most slots an instance of weight `weight` may hold in this table:
    /// `⌈(1 + ε) · S · w / W⌉`.
    pub fn slot_cap(&self, weight: u32) -> usize {
        let total: u64 = self.members.iter().map(|m| u64::from(m.weight)).sum();
        let options = SlotRouterOptions {
            slot_bits: self.bits,
            epsilon_ppm: self.epsilon_ppm,
            ..SlotRouterOptions::default()
        };
        options.cap(weight, total) as usize
    }

    /// True when both tables map every slot to the same instance.
    pub fn same_assignment(&self, other: &SlotTable) -> bool {
        self.bits == other.bits
            && self.owners.len() == other.owners.len()
            && (0..self.owners.len()).all(|s| self.slot_owner(s) == other.slot_owner(s))
    }

    /// The preference list of a key, by its [`key_hash`]: see
    /// [`Router::preference_list`].
    pub fn preference_list_of_hash(&self, hash: u64, n: usize, out: &mut Vec<InstanceId>) {
        out.clear();
        if n == 0 {
            return;
        }
        self.walk_preference(hash, |seat| {
            out.push(self.seats[seat].id);
            out.len() >= n
        });
    }

    /// The preference list of `key`: see [`Router::preference_list`].
    pub fn preference_list(&self, key: &[u8], n: usize, out: &mut Vec<InstanceId>) {
        self.preference_list_of_hash(key_hash(key), n, out);
    }

    /// The number of seats (member numbers, some possibly vacant): seat numbers given to
    /// `walk_preference`'s visitor are below this.
    pub(crate) fn seat_count(&self) -> usize {
        self.seats.len()
    }

    /// The member in `seat`.
    pub(crate) fn seat_member(&self, seat: usize) -> Member {
        let info = self.seats[seat];
        Member {
            id: info.id,
            weight: info.weight,
        }
    }

    /// The seat of member `id`, if it is one.
    pub(crate) fn seat_of(&self, id: InstanceId) -> Option<usize> {
        let at = self.members.binary_search_by_key(&id, |m| m.id).ok()?;
        Some(usize::from(self.member_seats[at]))
    }

    /// Visits the members of a key's preference list, by seat, until `visit` returns
    /// true; returns that seat. The owner comes first, then the best ranked for its
    /// slot, then (rarely needed) every other member by rank.
    pub(crate) fn walk_preference(
        &self,
        hash: u64,
        mut visit: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        let slot = slot_of(hash, self.bits);
        let owner = *self.owners.get(slot)?;
        if visit(usize::from(owner)) {
            return Some(usize::from(owner));
        }
        let ranked = self
            .ranked
            .get(slot * RANKED_PER_SLOT..(slot + 1) * RANKED_PER_SLOT)
            .unwrap_or_default();
        for &seat in ranked {
            if seat != owner && seat != NO_SEAT && visit(usize::from(seat)) {
                return Some(usize::from(seat));
            }
        }
        if ranked.contains(&NO_SEAT) {
            return None; // the ranking held every member
        }
        // Past the ranked few: rank the slot against every member (rare: spills that
        // walked far, or long replica lists).
        let mut all: Vec<(u64, u16)> = self
            .members
            .iter()
            .zip(self.member_seats.iter())
            .map(|(m, &seat)| {
                let hash = self.seats[usize::from(seat)].hash;
                (
                    candidate(slot_rank(slot as u32, hash, m.weight), m.id),
                    seat,
                )
            })
            .collect();
        all.sort_unstable();
        for (_, seat) in all {
            if seat != owner && !ranked.contains(&seat) && visit(usize::from(seat)) {
                return Some(usize::from(seat));
            }
        }
        None
    }
}

/// Follows a [`SlotRouter`]'s tables with the cost of one atomic load per lookup: it
/// keeps the last table it saw and checks for a newer one with a single pointer
/// comparison. One per reading thread (it needs `&mut self`).
///
/// ```
/// use cauce::router::{InstanceId, Router, SlotRouter};
///
/// let router = SlotRouter::new();
/// router.add(InstanceId(1), 1).unwrap();
/// let mut reader = router.reader();
/// assert_eq!(reader.owner_of(b"k"), Some(InstanceId(1)));
/// router.add(InstanceId(2), 1).unwrap();
/// assert_eq!(reader.table().members().len(), 2);
/// ```
pub struct TableReader<'a> {
    cache: Cache<&'a ArcSwap<SlotTable>, Arc<SlotTable>>,
}

impl TableReader<'_> {
    /// The newest table.
    #[inline]
    pub fn table(&mut self) -> &SlotTable {
        self.cache.load()
    }

    /// The owner of a key by its [`key_hash`], in the newest table.
    #[inline]
    pub fn owner_of_hash(&mut self, hash: u64) -> Option<InstanceId> {
        self.cache.load().owner_of_hash(hash)
    }

    /// The owner of `key` in the newest table.
    #[inline]
    pub fn owner_of(&mut self, key: &[u8]) -> Option<InstanceId> {
        self.owner_of_hash(key_hash(key))
    }
}

/// The default [`Router`]: a slot table built by stable matching under rendezvous
/// scores, with capped slot counts (see the [module docs](self)).
///
/// Lookups are lock-free reads of the current [`SlotTable`]; `add` and `remove`
/// serialize on a builder lock, repair the matching off the hot path and publish the new
/// table.
pub struct SlotRouter {
    table: ArcSwap<SlotTable>,
    /// The current table's epoch, readable without loading the table.
    epoch: AtomicU64,
    builder: Mutex<TableBuilder>,
}

impl Default for SlotRouter {
    fn default() -> Self {
        SlotRouter::new()
    }
}

impl std::fmt::Debug for SlotRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table.load();
        f.debug_struct("SlotRouter")
            .field("epoch", &table.epoch)
            .field("slots", &table.slot_count())
            .field("members", &table.members)
            .finish()
    }
}

impl SlotRouter {
    /// An empty router with the default options.
    pub fn new() -> Self {
        SlotRouter::with_options(SlotRouterOptions::default())
    }

    /// An empty router with these options.
    pub fn with_options(options: SlotRouterOptions) -> Self {
        SlotRouter {
            table: ArcSwap::from_pointee(SlotTable::empty(0, options)),
            epoch: AtomicU64::new(0),
            builder: Mutex::new(TableBuilder::new(options)),
        }
    }

    /// A router holding `members`, built from scratch: every slot ranked against every
    /// member, then matched from nothing. It gives the same table as adding them one by
    /// one in any order, at epoch 1. Fails on a zero weight, a repeated id, or more than
    /// [`MAX_INSTANCES`].
    pub fn from_members(options: SlotRouterOptions, members: &[Member]) -> Result<Self> {
        if members.len() > MAX_INSTANCES {
            return Err(Error::TooManyInstances {
                instance: members[MAX_INSTANCES].id,
                limit: MAX_INSTANCES,
            });
        }
        let mut ids: Vec<InstanceId> = Vec::with_capacity(members.len());
        for m in members {
            check_member(m.id, m.weight)?;
            ids.push(m.id);
        }
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(Error::Config(format!(
                "instance {} is listed twice",
                pair[0]
            )));
        }
        let builder = TableBuilder::from_members(options, members);
        let table = SlotTable::from_builder(&builder);
        Ok(SlotRouter {
            epoch: AtomicU64::new(table.epoch),
            table: ArcSwap::from_pointee(table),
            builder: Mutex::new(builder),
        })
    }

    /// The options this router was made with.
    pub fn options(&self) -> SlotRouterOptions {
        self.builder.lock().options()
    }

    /// The current table. Holding it keeps that table (10 bytes per slot: the owners and
    /// the ranked candidates) alive until dropped.
    pub fn table(&self) -> Arc<SlotTable> {
        self.table.load_full()
    }

    /// The current table without touching its reference count (which every thread
    /// would contend on): for per-request paths inside the crate.
    pub(crate) fn current(&self) -> arc_swap::Guard<Arc<SlotTable>> {
        self.table.load()
    }

    /// A reader that follows new tables for the cost of one atomic load per lookup.
    pub fn reader(&self) -> TableReader<'_> {
        TableReader {
            cache: Cache::new(&self.table),
        }
    }

    /// The owner of a key by its [`key_hash`]: the hot path for callers that hash once.
    #[inline]
    pub fn owner_of_hash(&self, hash: u64) -> Option<InstanceId> {
        self.table.load().owner_of_hash(hash)
    }

    /// The preference list of a key by its [`key_hash`] (see
    /// [`Router::preference_list`]).
    pub fn preference_list_of_hash(&self, hash: u64, n: usize, out: &mut Vec<InstanceId>) {
        self.table.load().preference_list_of_hash(hash, n, out);
    }

    /// A copy of the membership and matching, to change off this router's lock.
    pub(crate) fn draft(&self) -> Draft {
        let builder = self.builder.lock();
        Draft {
            base: builder.epoch,
            builder: builder.clone(),
        }
    }

    /// Publishes `prepared`'s table if the router has not changed since its draft was
    /// taken: the very builder and table that the draft's `add`s and `remove`s would
    /// have left here (the draft copied this builder, and the builder is deterministic).
    /// Otherwise leaves the router as it is and returns `None`: make the change anew.
    pub(crate) fn apply(&self, prepared: Prepared) -> Option<Epoch> {
        let mut builder = self.builder.lock();
        if builder.epoch != prepared.base {
            return None;
        }
        let old = std::mem::replace(&mut *builder, prepared.builder);
        self.table.store(prepared.table);
        // After the table, as in `publish`.
        self.epoch.store(builder.epoch, Ordering::Release);
        let epoch = builder.epoch;
        drop(builder);
        drop(old);
        Some(epoch)
    }

    fn publish(&self, builder: &mut TableBuilder) -> Epoch {
        builder.epoch += 1;
        self.table.store(Arc::new(SlotTable::from_builder(builder)));
        // After the table: whoever sees the new epoch finds its table.
        self.epoch.store(builder.epoch, Ordering::Release);
        builder.epoch
    }
}

impl Router for SlotRouter {
    fn owner_of(&self, key: &[u8]) -> Option<InstanceId> {
        self.owner_of_hash(key_hash(key))
    }

    fn preference_list(&self, key: &[u8], n: usize, out: &mut Vec<InstanceId>) {
        self.preference_list_of_hash(key_hash(key), n, out);
    }

    fn add(&self, id: InstanceId, weight: u32) -> Result<Epoch> {
        let mut builder = self.builder.lock();
        add_to(&mut builder, id, weight)?;
        Ok(self.publish(&mut builder))
    }

    fn remove(&self, id: InstanceId) -> Result<Epoch> {
        let mut builder = self.builder.lock();
        remove_from(&mut builder, id)?;
        Ok(self.publish(&mut builder))
    }

    fn epoch(&self) -> Epoch {
        // One plain load: `Sticky` asks on every request.
        self.epoch.load(Ordering::Acquire)
    }

    fn members(&self) -> Vec<Member> {
        self.table.load().members.to_vec()
    }
}

/// Adds `id` (or changes its weight) in `builder`; checks as [`Router::add`] does.
fn add_to(builder: &mut TableBuilder, id: InstanceId, weight: u32) -> Result<()> {
    check_member(id, weight)?;
    match builder.weight_of(id) {
        Some(old) if old == weight => {}
        None if builder.len() >= MAX_INSTANCES => {
            return Err(Error::TooManyInstances {
                instance: id,
                limit: MAX_INSTANCES,
            });
        }
        _ => builder.add(id, weight),
    }
    Ok(())
}

/// Removes `id` from `builder`; checks as [`Router::remove`] does.
fn remove_from(builder: &mut TableBuilder, id: InstanceId) -> Result<()> {
    if builder.weight_of(id).is_none() {
        return Err(Error::UnknownInstance(id));
    }
    builder.remove(id);
    Ok(())
}

/// A membership change worked out on a copy of a router's builder, away from every lock
/// the router's users wait on (a join repairs the matching of every slot: tens of
/// milliseconds on 2^16 slots), to be published later by [`SlotRouter::apply`].
pub(crate) struct Draft {
    /// The epoch of the table the copy was taken from.
    base: Epoch,
    builder: TableBuilder,
}

impl Draft {
    /// Adds `id` (or changes its weight), as [`Router::add`] would.
    pub(crate) fn add(&mut self, id: InstanceId, weight: u32) -> Result<()> {
        add_to(&mut self.builder, id, weight)
    }

    /// Removes `id`, as [`Router::remove`] would.
    pub(crate) fn remove(&mut self, id: InstanceId) -> Result<()> {
        remove_from(&mut self.builder, id)
    }

    /// The changes made, with the table they give (built here, too).
    pub(crate) fn finish(mut self) -> Prepared {
        self.builder.epoch = self.base + 1;
        let table = Arc::new(SlotTable::from_builder(&self.builder));
        Prepared {
            base: self.base,
            builder: self.builder,
            table,
        }
    }
}

/// A [`Draft`]'s changes and their table, ready to publish.
pub(crate) struct Prepared {
    base: Epoch,
    builder: TableBuilder,
    table: Arc<SlotTable>,
}

fn check_member(id: InstanceId, weight: u32) -> Result<()> {
    if id == InstanceId::REPLAY {
        return Err(Error::ReservedInstance(id));
    }
    if weight == 0 {
        return Err(Error::InvalidWeight {
            instance: Some(id),
            weight,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same members, slots and preference lists (epochs aside).
    fn same_tables(a: &SlotTable, b: &SlotTable) {
        assert_eq!(a.members(), b.members());
        assert!(a.same_assignment(b));
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        for i in 0..2_000u64 {
            let hash = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            a.preference_list_of_hash(hash, 4, &mut pa);
            b.preference_list_of_hash(hash, 4, &mut pb);
            assert_eq!(pa, pb, "preference lists of hash {hash:#x}");
        }
    }

    fn router(ids: &[u32]) -> SlotRouter {
        let router = SlotRouter::with_options(SlotRouterOptions::default().slots(1 << 12).unwrap());
        for &id in ids {
            router.add(InstanceId(id), 1 + id % 3).unwrap();
        }
        router
    }

    #[test]
    fn an_applied_draft_publishes_what_its_changes_would_have() {
        let (direct, drafted) = (router(&[1, 2, 3, 4]), router(&[1, 2, 3, 4]));
        direct.add(InstanceId(9), 2).unwrap();
        direct.remove(InstanceId(2)).unwrap();
        let mut draft = drafted.draft();
        draft.add(InstanceId(9), 2).unwrap();
        draft.remove(InstanceId(2)).unwrap();
        let prepared = draft.finish();
        // Nothing is published before `apply`.
        assert_eq!(drafted.epoch(), 4);
        assert_eq!(drafted.table().members().len(), 4);
        assert_eq!(drafted.apply(prepared), Some(5));
        assert_eq!(drafted.epoch(), 5);
        // One epoch for the draft's two changes; the same slots and preference lists.
        same_tables(&direct.table(), &drafted.table());
        // The builders agree too: a further change gives the same table on both.
        direct.add(InstanceId(12), 1).unwrap();
        drafted.add(InstanceId(12), 1).unwrap();
        same_tables(&direct.table(), &drafted.table());
    }

    #[test]
    fn a_draft_of_a_router_that_changed_since_is_not_applied() {
        let router = router(&[1, 2, 3]);
        let mut draft = router.draft();
        draft.add(InstanceId(7), 1).unwrap();
        let prepared = draft.finish();
        router.remove(InstanceId(3)).unwrap();
        let before = router.table();
        assert_eq!(router.apply(prepared), None);
        same_tables(&before, &router.table());
        assert_eq!(router.epoch(), before.epoch());
    }

    #[test]
    fn a_draft_refuses_what_the_router_refuses() {
        let router = router(&[1]);
        let mut draft = router.draft();
        assert!(matches!(
            draft.remove(InstanceId(5)),
            Err(Error::UnknownInstance(InstanceId(5)))
        ));
        assert!(matches!(
            draft.add(InstanceId(5), 0),
            Err(Error::InvalidWeight { .. })
        ));
    }
}
