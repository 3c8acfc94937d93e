//! Bounded loads: consistent hashing that no hot key can overload.
//!
//! Real keys are skewed: under a Zipf law the busiest user alone can send more requests
//! than a hundred quiet ones, and the instance that owns it drowns while the rest idle.
//! Consistent hashing *with bounded loads* keeps every instance within a cap of
//! `⌈(1 + ε) · mean⌉` (weighted: `⌈(1 + ε) · L · w / W⌉` for a load `L` in place, and at
//! least 1; the caps add up to more than `L`, so some instance always has room): a
//! request or key whose owner is at its cap walks on to the next instance of its
//! preference list. With ε = 0.25 (the default) no instance carries more than a quarter
//! above the mean.
//!
//! Two modes, for two kinds of work:
//!
//! - [`BoundedLoads`], **per request**, for work any instance may serve (caches,
//!   stateless calls): live per-instance counters of requests in flight; each request
//!   goes to the first instance under the cap and holds a [`LoadGuard`] until it is done.
//! - [`Sticky`], for **keys that own state**: a key is placed once, on first sight, on
//!   the first instance of its preference list whose recent load is under the cap, and
//!   stays there (its state lives there) until membership changes, the key goes idle,
//!   or its instance is over the cap and another has room for it (keys change: one
//!   placed while quiet can turn hot).
//!   Load is the number of the last `window` routed requests each instance got, and time
//!   is the events' own timestamps, so the placements are a pure function of the calls:
//!   two `Sticky` fed the same log agree on every key without talking to each other.
//!
//! ```
//! use cauce::router::{InstanceId, Sticky, StickyOptions};
//!
//! let mut sticky = Sticky::new(StickyOptions::default());
//! for id in 1..=4 {
//!     sticky.add(InstanceId(id), 1).unwrap();
//! }
//! let home = sticky.route(b"alice", 1_000).unwrap();
//! assert_eq!(sticky.route(b"alice", 1_001), Some(home)); // it stays
//!
//! // Removing its instance moves it, and says so.
//! let moves = sticky.remove(home).unwrap();
//! let moved = moves.iter().find(|m| &m.key[..] == b"alice").unwrap();
//! assert_eq!(moved.from, home);
//! assert_eq!(sticky.placement(b"alice"), Some(moved.to));
//! ```

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::Mutex;

use super::hash::key_hash;
use super::table::{Prepared, SlotRouter, SlotRouterOptions, SlotTable};
use super::{Epoch, InstanceId, Router};
use crate::error::{Error, Result};
use crate::record::Timestamp;
use crate::small::Key;

const PPM: u128 = 1_000_000;

/// The default ε of both modes.
pub const DEFAULT_EPSILON: f64 = 0.25;

/// ε in parts per million; ε must be positive (at 0 the caps could add up to exactly
/// the load, leaving no room anywhere) and at most 100.
fn epsilon_ppm(epsilon: f64) -> Result<u32> {
    let ppm = (epsilon * PPM as f64).round();
    if !(1.0..=100.0 * PPM as f64).contains(&ppm) {
        return Err(Error::Config(format!(
            "load epsilon {epsilon} must be in 0.000001..=100"
        )));
    }
    Ok(ppm as u32)
}

/// `max(1, ⌈(1 + ε) · load · w / W⌉)` in exact integers: the most an instance of weight
/// `weight` may carry when `load` (the load in place, before the request at hand) is
/// spread over a total weight `total_weight`. The caps add up to more than `load`, so
/// some instance always has room for one more.
fn load_cap(epsilon_ppm: u32, load: u64, weight: u32, total_weight: u64) -> u64 {
    let numerator = (PPM + u128::from(epsilon_ppm)) * u128::from(load) * u128::from(weight);
    let denominator = PPM * u128::from(total_weight.max(1));
    numerator
        .div_ceil(denominator)
        .clamp(1, u128::from(u64::MAX)) as u64
}

/// Whether `load` is over [`load_cap`] (the same arguments), without its division: the
/// test a routed request of a placed key makes (see [`StickyOptions::shed_when_over`]).
fn over_cap(epsilon_ppm: u32, load: u64, in_place: u64, weight: u32, total_weight: u64) -> bool {
    // load > max(1, ⌈n / d⌉)  ⟺  load ≥ 2 and load - 1 ≥ n / d  ⟺  (load - 1) · d ≥ n.
    let numerator = (PPM + u128::from(epsilon_ppm)) * u128::from(in_place) * u128::from(weight);
    let denominator = PPM * u128::from(total_weight.max(1));
    load >= 2 && u128::from(load - 1) * denominator >= numerator
}

/// Takes one unit of `load` if it is below `cap`. Racing claims never take it past
/// `cap` (a compare-and-swap loop; the loom test below checks every interleaving).
fn claim(load: &AtomicU64, cap: u64) -> bool {
    load.fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
        (l < cap).then_some(l + 1)
    })
    .is_ok()
}

/// Live in-flight counters aligned with one table's seats.
struct Counters {
    epoch: Epoch,
    total_weight: u64,
    loads: Box<[Arc<AtomicU64>]>,
}

/// Per-request bounded loads over a [`SlotRouter`]: each request goes to the first
/// instance of its key's preference list that is under `⌈(1 + ε) · mean⌉` requests in
/// flight, and counts against it until its [`LoadGuard`] is dropped.
///
/// Single-threaded, the cap is exact: no instance ever holds more. Under concurrent use
/// the mean a cap is computed from may be a few requests stale, and a request that then
/// finds every instance of its list at its cap is served by its key's owner, over the
/// cap, rather than refused.
///
/// ```
/// use std::sync::Arc;
/// use cauce::router::{BoundedLoads, InstanceId, Router, SlotRouter};
///
/// let router = Arc::new(SlotRouter::new());
/// router.add(InstanceId(1), 1).unwrap();
/// router.add(InstanceId(2), 1).unwrap();
/// let balancer = BoundedLoads::new(Arc::clone(&router));
/// // The same hot key, two requests in flight: the second finds the owner at its cap
/// // (⌈1.25 · 1 / 2⌉ = 1) and spills to the next instance of the key's list.
/// let a = balancer.begin(b"hot").unwrap();
/// let b = balancer.begin(b"hot").unwrap();
/// assert_eq!(Some(a.instance()), router.owner_of(b"hot"));
/// assert_ne!(a.instance(), b.instance());
/// drop((a, b)); // done: the loads go back to zero
/// assert!(balancer.loads().iter().all(|&(_, load)| load == 0));
/// ```
pub struct BoundedLoads {
    router: Arc<SlotRouter>,
    epsilon_ppm: u32,
    total: Arc<AtomicU64>,
    counters: ArcSwap<Counters>,
    /// Every counter ever made, by instance, so an instance's count survives a table
    /// change (and a guard of a removed instance still has something to decrement).
    registry: Mutex<HashMap<InstanceId, Arc<AtomicU64>>>,
}

/// One request in flight on an instance; dropping it (or calling
/// [`finish`](Self::finish)) ends the request and lowers the instance's load.
#[derive(Debug)]
#[must_use = "the request counts as in flight until the guard is dropped"]
pub struct LoadGuard {
    instance: InstanceId,
    load: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

impl LoadGuard {
    /// The instance serving the request.
    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// Ends the request (the same as dropping the guard).
    pub fn finish(self) {}
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::AcqRel);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BoundedLoads {
    /// Bounded loads over `router` with ε = 0.25.
    pub fn new(router: Arc<SlotRouter>) -> Self {
        BoundedLoads {
            router,
            epsilon_ppm: (DEFAULT_EPSILON * PPM as f64) as u32,
            total: Arc::new(AtomicU64::new(0)),
            counters: ArcSwap::from_pointee(Counters {
                epoch: Epoch::MAX,
                total_weight: 0,
                loads: Box::new([]),
            }),
            registry: Mutex::new(HashMap::new()),
        }
    }

    /// Bounded loads over `router` with this ε (`0.000001..=100`).
    pub fn with_epsilon(router: Arc<SlotRouter>, epsilon: f64) -> Result<Self> {
        let mut balancer = BoundedLoads::new(router);
        balancer.epsilon_ppm = epsilon_ppm(epsilon)?;
        Ok(balancer)
    }

    /// The router underneath, shared with whoever made this balancer. Changing its
    /// membership (here or through that `Arc`) is how the balancer's membership changes:
    /// it follows at the next request and keeps the loads in flight. Nothing is left
    /// unreported by that: unlike a [`Sticky`], which owns its router and changes it
    /// only through its own `add` and `remove`, a balancer has no placements to move.
    pub fn router(&self) -> &SlotRouter {
        &self.router
    }

    /// Starts a request for `key`; `None` when the router has no member.
    pub fn begin(&self, key: &[u8]) -> Option<LoadGuard> {
        self.begin_hash(key_hash(key))
    }

    /// Starts a request for a key by its [`key_hash`].
    pub fn begin_hash(&self, hash: u64) -> Option<LoadGuard> {
        let table = self.router.current();
        let counters = self.counters_for(&table);
        let demand = self.total.load(Ordering::Acquire);
        let claim = |index: usize| {
            let cap = load_cap(
                self.epsilon_ppm,
                demand,
                table.seat_member(index).weight,
                counters.total_weight,
            );
            claim(&counters.loads[index], cap)
        };
        let index = match table.walk_preference(hash, claim) {
            Some(index) => index,
            None => {
                // Only under concurrent use (a stale mean): everyone looked full. Serve
                // at the owner rather than refuse.
                let owner = table.walk_preference(hash, |_| true)?;
                counters.loads[owner].fetch_add(1, Ordering::AcqRel);
                owner
            }
        };
        self.total.fetch_add(1, Ordering::AcqRel);
        Some(LoadGuard {
            instance: table.seat_member(index).id,
            load: Arc::clone(&counters.loads[index]),
            total: Arc::clone(&self.total),
        })
    }

    /// The requests in flight on each current member, sorted by id.
    pub fn loads(&self) -> Vec<(InstanceId, u64)> {
        let table = self.router.current();
        let counters = self.counters_for(&table);
        table
            .members()
            .iter()
            .filter_map(|m| {
                let load = counters.loads.get(table.seat_of(m.id)?)?;
                Some((m.id, load.load(Ordering::Acquire)))
            })
            .collect()
    }

    /// The counters aligned with `table`, made on the first request of a new epoch.
    fn counters_for(&self, table: &SlotTable) -> arc_swap::Guard<Arc<Counters>> {
        let current = self.counters.load();
        if current.epoch == table.epoch() {
            return current;
        }
        drop(current);
        let mut registry = self.registry.lock();
        let current = self.counters.load();
        if current.epoch == table.epoch() {
            return current;
        }
        let members = table.members();
        let counters = Arc::new(Counters {
            epoch: table.epoch(),
            total_weight: members.iter().map(|m| u64::from(m.weight)).sum(),
            loads: (0..table.seat_count())
                .map(|seat| match table.seat_member(seat) {
                    m if m.weight > 0 => Arc::clone(registry.entry(m.id).or_default()),
                    _ => Arc::default(), // a vacant seat: no key is routed there
                })
                .collect(),
        });
        // Forget idle counters of instances that left (a busy one keeps its counter for
        // the guards still holding it, and for its return).
        registry.retain(|id, load| {
            members.binary_search_by_key(id, |m| m.id).is_ok() || Arc::strong_count(load) > 1
        });
        self.counters.store(counters);
        self.counters.load()
    }
}

/// How a [`Sticky`] router places keys.
///
/// ```
/// use cauce::router::StickyOptions;
///
/// let options = StickyOptions::default()
///     .epsilon(0.1)
///     .unwrap()
///     .idle_after(60_000)
///     .window(10_000)
///     .unwrap();
/// assert_eq!(options.window_len(), 10_000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StickyOptions {
    epsilon_ppm: u32,
    idle_after: Timestamp,
    window: usize,
    shed: bool,
    router: SlotRouterOptions,
}

impl Default for StickyOptions {
    /// ε = 0.25, keys idle after 10 minutes of event time, load over the last 65,536
    /// requests, keys shed by instances over their cap, and the default
    /// [`SlotRouterOptions`].
    fn default() -> Self {
        StickyOptions {
            epsilon_ppm: (DEFAULT_EPSILON * PPM as f64) as u32,
            idle_after: 10 * 60 * 1000,
            window: 1 << 16,
            shed: true,
            router: SlotRouterOptions::default(),
        }
    }
}

impl StickyOptions {
    /// Sets ε: a key is placed only on an instance under `⌈(1 + ε) · mean⌉` recent
    /// requests (`0.000001..=100`).
    pub fn epsilon(mut self, epsilon: f64) -> Result<Self> {
        self.epsilon_ppm = epsilon_ppm(epsilon)?;
        Ok(self)
    }

    /// Sets how long (in event time, milliseconds) a key may go unseen before it is
    /// forgotten and placed afresh at its next request. `Timestamp::MAX`: never.
    pub fn idle_after(mut self, idle_after: Timestamp) -> Self {
        self.idle_after = idle_after.max(1);
        self
    }

    /// Sets the load window: an instance's load is how many of the last `window` routed
    /// requests it got (`1..=2^28`).
    pub fn window(mut self, window: usize) -> Result<Self> {
        if !(1..=1 << 28).contains(&window) {
            return Err(Error::Config(format!(
                "load window {window} must be in 1..=268435456"
            )));
        }
        self.window = window;
        Ok(self)
    }

    /// Sets whether an instance over its cap sheds keys (default: yes).
    ///
    /// A key is placed where there is room, but keys change: one placed while it was
    /// quiet can turn hot, and two hot keys can end up on one instance, which then
    /// carries far more than `⌈(1 + ε) · mean⌉` while others idle. When shedding is on,
    /// a request of a placed key whose instance is over its cap moves that key to the
    /// first instance of its preference list with room for the key's recent load (its
    /// requests in the window), if there is one; the key's load moves with it. A key
    /// that alone exceeds every cap stays, and its neighbours leave it instead.
    ///
    /// Against moving back and forth: a key moves only from an instance over its cap to
    /// one that stays within its own, and not again before `window` more requests have
    /// been routed since it was placed. A key that found no instance with room is not
    /// looked at again for a window either (the search costs more than a route).
    /// Placements stay a function of the calls. A small `window` counts few requests,
    /// and its noise alone pushes instances over their caps: under a steady Zipf(1.1)
    /// load over 200 keys on 4 instances, a window of 64 moved keys 12,209 times in
    /// 400,000 routes (one key 801 times), one of 1,000 over 1,000 keys 26 times. Keep
    /// the window at thousands of requests at least (the default is 65,536).
    ///
    /// Off, a placed key stays where it is until membership changes or it goes idle.
    pub fn shed_when_over(mut self, shed: bool) -> Self {
        self.shed = shed;
        self
    }

    /// Sets the options of the underlying [`SlotRouter`].
    pub fn router(mut self, router: SlotRouterOptions) -> Self {
        self.router = router;
        self
    }

    /// The load window, in requests.
    pub fn window_len(&self) -> usize {
        self.window
    }
}

/// A key whose placement changed with the membership: its state must go from `from` to
/// `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Move {
    /// The key.
    pub key: Bytes,
    /// Where it was placed.
    pub from: InstanceId,
    /// Where it is placed now.
    pub to: InstanceId,
}

/// A request routed by [`Sticky::pick`], not counted yet.
pub(crate) struct Pick {
    seat: PickedSeat,
    to: InstanceId,
    now: Timestamp,
    /// It moves its key off an instance over its cap.
    shed: bool,
}

impl Pick {
    /// The instance the request goes to.
    pub(crate) fn instance(&self) -> InstanceId {
        self.to
    }

    /// Whether it moves a known key (placed anew after going idle or without an
    /// instance, or shed by an instance over its cap).
    pub(crate) fn moves_known_key(&self) -> bool {
        matches!(self.seat, PickedSeat::Moves(..))
    }

    /// Whether it moves its key off an instance over its cap.
    pub(crate) fn sheds(&self) -> bool {
        self.shed
    }
}

/// Where a picked request's key is, by index in [`Sticky`]'s states.
enum PickedSeat {
    /// Known and placed: it stays there (true: its instance is over its cap, and no
    /// other had room for it).
    Stays(u32, bool),
    /// Known, but idle, with no instance, or shed by an instance over its cap: placed
    /// anew, on this instance and seat.
    Moves(u32, (InstanceId, usize)),
    /// Not known: placed on this instance and seat.
    New((InstanceId, usize)),
}

/// What [`Sticky::shed`] decides for a placed key.
enum Shed {
    Stays,
    Moves((InstanceId, usize)),
    /// Its instance is over its cap, and no other has room for it.
    NoRoom,
}

/// What a [`Sticky`] knows about one key.
struct KeyState {
    key: Key,
    hash: u64,
    /// Its instance and that instance's seat in the current table ([`DEPARTED`] while
    /// a change is being reconciled); `None` when its instance left while the key was
    /// forgotten, or when nobody was left to move it to.
    placed: Option<(InstanceId, usize)>,
    last_seen: Timestamp,
    /// Its requests among the last `window` routed.
    in_window: u32,
    /// How many requests the router had routed when the key was last placed, or last
    /// found no instance with room when its own was over its cap: it is not considered
    /// for shedding again before `window` more.
    settled_at: u64,
    /// Still known (not forgotten): reachable through the index.
    known: bool,
    /// The next known key with the same 64-bit hash ([`END`] at the end).
    next: u32,
}

/// A known key (by index) and the changed instance (with its seat) that now owns its
/// slot.
type Offer = (u32, (InstanceId, usize));

/// The end of a chain of keys with the same hash.
const END: u32 = u32::MAX;

/// The seat of an instance that is no longer in the table.
const DEPARTED: usize = usize::MAX;

/// Known keys by their [`key_hash`]: the hash is computed once per request and serves
/// both this index and the placement. Keys whose 64-bit hashes collide chain.
type KeyIndex = HashMap<u64, u32, BuildHasherDefault<HashIsKey>>;

/// The identity hasher for [`KeyIndex`]: its keys are already xxh3 hashes.
#[derive(Default)]
struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// Sticky bounded-load placement for keys that own state, fed by one dispatcher in log
/// order (see the [module docs](self)).
///
/// A key is placed on first sight (or its first request after going idle) on the first
/// instance of its preference list with room under `max(1, ⌈(1 + ε) · L · w / W⌉)`,
/// where `L` is the number of requests in the window (the last `window` routed) and an
/// instance's load is how many of them went to it. It stays there until its instance
/// leaves, a joining instance takes its slot (if the newcomer has room for the key's
/// recent load), it goes idle, or its instance is over the cap when one of its requests
/// is routed and another instance has room for the key's recent load (see
/// [`StickyOptions::shed_when_over`]). Every answer is a function of the sequence of
/// calls, their arguments included; nothing reads a clock.
///
/// Change the membership through [`add`](Self::add) and [`remove`](Self::remove), which
/// report the moves. They are the only way: [`table`](Self::table) reads the current
/// routing table, which cannot change anything, so no change goes unreported. The
/// [`SlotRouter`] underneath is not handed out:
///
/// ```compile_fail
/// use cauce::router::{InstanceId, Router, Sticky, StickyOptions};
///
/// let sticky = Sticky::new(StickyOptions::default());
/// // A membership change behind the sticky router's back: its moves would go unreported.
/// sticky.router().add(InstanceId(1), 1).unwrap();
/// ```
pub struct Sticky {
    options: StickyOptions,
    /// Shared only with the crate's cluster, which drafts membership changes on it (see
    /// [`slot_router`](Self::slot_router)).
    router: Arc<SlotRouter>,
    table: Arc<SlotTable>,
    index: KeyIndex,
    states: Vec<KeyState>,
    free: Vec<u32>,
    known: usize,
    window: VecDeque<u32>,
    /// Recent requests per current member, by seat in `table`.
    loads: Vec<u64>,
    total_weight: u64,
    latest: Timestamp,
    /// Requests routed since the router was made.
    routed: u64,
    routed_since_sweep: usize,
    next_sweep: Timestamp,
}

impl Sticky {
    /// An empty sticky router.
    pub fn new(options: StickyOptions) -> Self {
        let router = Arc::new(SlotRouter::with_options(options.router));
        let table = router.table();
        Sticky {
            options,
            router,
            table,
            index: KeyIndex::default(),
            states: Vec::new(),
            free: Vec::new(),
            known: 0,
            window: VecDeque::with_capacity(options.window.min(1 << 20)),
            loads: Vec::new(),
            total_weight: 0,
            latest: 0,
            routed: 0,
            routed_since_sweep: 0,
            next_sweep: 0,
        }
    }

    /// The routing table of the current membership, read-only: each key's home
    /// (`owner_of`, its first choice before loads), preference lists, the members and
    /// their weights, the epoch, slot counts. Placements can differ from the homes (a
    /// key placed while its home was full stays where it was put): ask
    /// [`placement`](Self::placement) for those. Membership changes only through
    /// [`add`](Self::add) and [`remove`](Self::remove), so this is always the table the
    /// placements were made against.
    pub fn table(&self) -> &SlotTable {
        &self.table
    }

    /// Where `key` goes: its current placement, or (first sight, or after idle) the
    /// first instance of its preference list whose load is under the cap. Counts this
    /// request toward that instance's load. `now` is the record's timestamp, so idleness
    /// is a function of the events, not of the wall clock. `None` without members.
    ///
    /// With [shedding](StickyOptions::shed_when_over) on (the default), the answer for
    /// a placed key can be another instance than its placement before the call: its
    /// instance was over its cap, and the key moved. A caller that keeps per-key state
    /// itself compares it with [`placement`](Self::placement) before the call, or turns
    /// shedding off; moves of membership changes are reported by
    /// [`add`](Self::add) and [`remove`](Self::remove).
    pub fn route(&mut self, key: &[u8], now: Timestamp) -> Option<InstanceId> {
        self.route_hash(key, key_hash(key), now)
    }

    /// [`route`](Self::route) for a caller that has hashed the key already (to pick a
    /// shard or a lock by it, say): `hash` must be the key's [`key_hash`], which this
    /// does not compute again, as [`BoundedLoads::begin_hash`] and
    /// [`SlotRouter::owner_of_hash`](super::SlotRouter::owner_of_hash) take it.
    ///
    /// Another hash is not detected. It breaks nothing but that key's routing: the key
    /// is placed as a key with that hash would be and remembered under that hash, so
    /// [`placement`](Self::placement) and [`route`](Self::route) (which hash it
    /// properly) do not find it there, and know it as another key.
    ///
    /// ```
    /// use cauce::router::{key_hash, InstanceId, Sticky, StickyOptions};
    ///
    /// let mut sticky = Sticky::new(StickyOptions::default());
    /// sticky.add(InstanceId(1), 1).unwrap();
    /// let hash = key_hash(b"alice");
    /// let to = sticky.route_hash(b"alice", hash, 1_000);
    /// assert_eq!(to, sticky.route(b"alice", 1_001));
    /// ```
    pub fn route_hash(&mut self, key: &[u8], hash: u64, now: Timestamp) -> Option<InstanceId> {
        let pick = self.pick(key, hash, now)?;
        Some(self.count(pick, key, hash))
    }

    /// Where a request for `key` stamped `now` would go, as [`route`](Self::route)
    /// decides it, without counting it or placing the key: [`count`](Self::count) does
    /// that, given the pick and nothing else called on this router in between. A
    /// caller that may still refuse the request (its instance has no room) picks first
    /// and counts only what it accepts, so that the placements stay a function of the
    /// requests accepted. `hash` is the key's [`key_hash`](super::key_hash).
    pub(crate) fn pick(&mut self, key: &[u8], hash: u64, now: Timestamp) -> Option<Pick> {
        // The router's clock never goes back: a route stamped before the latest one
        // counts as made now, so that a key it places is not idle at once.
        let now = self.latest.max(now);
        let mut shed = false;
        let (seat, to) = match self.find(key, hash) {
            Some(index) => {
                let state = &self.states[index as usize];
                match state.placed {
                    Some((id, seat)) if !self.is_idle(state.last_seen, now) => {
                        match self.shed(state, seat) {
                            Shed::Moves(to) => {
                                shed = true;
                                (PickedSeat::Moves(index, to), to.0)
                            }
                            Shed::Stays => (PickedSeat::Stays(index, false), id),
                            Shed::NoRoom => (PickedSeat::Stays(index, true), id),
                        }
                    }
                    _ => {
                        let to = self.place(hash, 1)?;
                        (PickedSeat::Moves(index, to), to.0)
                    }
                }
            }
            None => {
                let to = self.place(hash, 1)?;
                (PickedSeat::New(to), to.0)
            }
        };
        Some(Pick {
            seat,
            to,
            now,
            shed,
        })
    }

    /// The request of `pick` kept where its key is placed now, if the pick moved a
    /// known key (to count it without the move); otherwise the pick itself.
    pub(crate) fn keep_in_place(&self, pick: Pick) -> Pick {
        let PickedSeat::Moves(index, _) = pick.seat else {
            return pick;
        };
        match self.states[index as usize].placed {
            Some((id, seat)) if seat != DEPARTED => Pick {
                seat: PickedSeat::Stays(index, false),
                to: id,
                now: pick.now,
                shed: false,
            },
            _ => pick,
        }
    }

    /// Counts the request [`pick`](Self::pick) routed (placing its key if the pick
    /// places it) and returns its instance.
    pub(crate) fn count(&mut self, pick: Pick, key: &[u8], hash: u64) -> InstanceId {
        let Pick { seat, to, now, .. } = pick;
        self.latest = self.latest.max(now);
        let index = match seat {
            PickedSeat::Stays(index, no_room) => {
                if no_room {
                    // Not looked at again for a window: the walk it took costs far
                    // more than a route, and a key too hot for any other instance
                    // would take it at every request.
                    self.states[index as usize].settled_at = self.routed;
                }
                index
            }
            PickedSeat::Moves(index, to) => {
                self.shift_load(index, to);
                index
            }
            PickedSeat::New(to) => self.insert(Key::copy_from(key), hash, to, now),
        };
        let state = &mut self.states[index as usize];
        state.last_seen = state.last_seen.max(now);
        self.count_request(index);
        // After the request, which its key's `last_seen` keeps from being forgotten:
        // the pick's key index stays valid up to here.
        self.routed_since_sweep += 1;
        if self.latest >= self.next_sweep && self.routed_since_sweep >= self.known / 2 {
            self.sweep();
        }
        to
    }

    /// Where `key` is placed now, if it is known and not idle.
    pub fn placement(&self, key: &[u8]) -> Option<InstanceId> {
        let state = &self.states[self.find(key, key_hash(key))? as usize];
        if self.is_idle(state.last_seen, self.latest) {
            return None;
        }
        state.placed.map(|(id, _)| id)
    }

    /// Adds an instance (or changes its weight) and returns every key whose placement
    /// changed: the keys whose slot the instance now owns, hottest first, while it has
    /// room for their recent load.
    pub fn add(&mut self, id: InstanceId, weight: u32) -> Result<Vec<Move>> {
        self.router.add(id, weight)?;
        Ok(self.reconcile())
    }

    /// Removes an instance and returns every key whose placement changed: exactly the
    /// keys it held, each re-placed as on first sight (hottest first), its recent load
    /// moving with it.
    pub fn remove(&mut self, id: InstanceId) -> Result<Vec<Move>> {
        self.router.remove(id)?;
        Ok(self.reconcile())
    }

    /// The router whose tables this follows, to [`draft`](SlotRouter::draft) membership
    /// changes on without holding this `Sticky` (drafting takes only the router's
    /// builder lock); [`apply`](Self::apply) publishes them. Nothing else may change it.
    pub(crate) fn slot_router(&self) -> Arc<SlotRouter> {
        self.router.clone()
    }

    /// Applies a membership change prepared on a [`draft`](SlotRouter::draft), as the `add`s
    /// and `remove`s made on the draft would have, with the same moves; `None`, changing
    /// nothing, if the membership changed since the draft was taken.
    pub(crate) fn apply(&mut self, prepared: Prepared) -> Option<Vec<Move>> {
        self.router.apply(prepared)?;
        Some(self.reconcile())
    }

    /// The current load of each member: its share of the last `window` routed requests
    /// (counted where their keys are placed now), sorted by id.
    pub fn loads(&self) -> Vec<(InstanceId, f64)> {
        self.table
            .members()
            .iter()
            .map(|m| {
                let load = self.table.seat_of(m.id).map_or(0, |seat| self.loads[seat]);
                (m.id, load as f64)
            })
            .collect()
    }

    /// How many keys are placed (known and not yet forgotten).
    pub fn known_keys(&self) -> usize {
        self.known
    }

    fn is_idle(&self, last_seen: Timestamp, now: Timestamp) -> bool {
        now.saturating_sub(last_seen) >= self.options.idle_after
    }

    /// Where a placed key on `seat` goes instead, if that instance is over its cap and
    /// another of the key's preference list has room for the key's recent load (see
    /// [`StickyOptions::shed_when_over`]).
    fn shed(&self, state: &KeyState, seat: usize) -> Shed {
        if !self.options.shed
            || self.routed.saturating_sub(state.settled_at) < self.options.window as u64
        {
            return Shed::Stays;
        }
        let in_window = self.window.len() as u64;
        let Some(&load) = self.loads.get(seat) else {
            return Shed::Stays;
        };
        let weight = self.table.seat_member(seat).weight;
        let eps = self.options.epsilon_ppm;
        if !over_cap(eps, load, in_window, weight, self.total_weight) {
            return Shed::Stays;
        }
        // Its recent requests move with it, and this one is counted there too.
        let moving = u64::from(state.in_window) + 1;
        let to = self.table.walk_preference(state.hash, |at| {
            at != seat && self.loads[at] + moving <= self.cap(at, in_window)
        });
        match to {
            Some(to) => Shed::Moves((self.table.seat_member(to).id, to)),
            None => Shed::NoRoom,
        }
    }

    fn find(&self, key: &[u8], hash: u64) -> Option<u32> {
        let mut at = *self.index.get(&hash)?;
        while at != END {
            let state = &self.states[at as usize];
            if state.key.as_slice() == key {
                return Some(at);
            }
            at = state.next;
        }
        None
    }

    fn insert(&mut self, key: Key, hash: u64, to: (InstanceId, usize), now: Timestamp) -> u32 {
        let mut state = KeyState {
            key,
            hash,
            placed: Some(to),
            last_seen: now,
            in_window: 0,
            settled_at: self.routed,
            known: true,
            next: END,
        };
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.states.push(KeyState {
                    key: Key::copy_from(b""),
                    hash: 0,
                    placed: None,
                    last_seen: 0,
                    in_window: 0,
                    settled_at: 0,
                    known: false,
                    next: END,
                });
                (self.states.len() - 1) as u32
            }
        };
        state.next = self.index.insert(hash, index).unwrap_or(END);
        self.states[index as usize] = state;
        self.known += 1;
        index
    }

    /// Forgets key `index`: out of the index; its slot is reused once its requests have
    /// left the window.
    fn forget(&mut self, index: u32) {
        let (hash, next) = {
            let state = &mut self.states[index as usize];
            state.known = false;
            (state.hash, state.next)
        };
        self.known -= 1;
        match self.index.get(&hash).copied() {
            Some(head) if head == index => {
                if next == END {
                    self.index.remove(&hash);
                } else {
                    self.index.insert(hash, next);
                }
            }
            Some(mut at) => {
                while at != END {
                    let after = self.states[at as usize].next;
                    if after == index {
                        self.states[at as usize].next = next;
                        break;
                    }
                    at = after;
                }
            }
            None => {}
        }
        if self.states[index as usize].in_window == 0 {
            self.release(index);
        }
    }

    fn release(&mut self, index: u32) {
        let state = &mut self.states[index as usize];
        state.key = Key::copy_from(b"");
        state.placed = None;
        self.free.push(index);
    }

    fn cap(&self, seat: usize, load: u64) -> u64 {
        load_cap(
            self.options.epsilon_ppm,
            load,
            self.table.seat_member(seat).weight,
            self.total_weight,
        )
    }

    /// The first instance of the preference list with room for `load` more requests
    /// (the owner, for a key hotter than any cap), with its seat.
    fn place(&self, hash: u64, load: u64) -> Option<(InstanceId, usize)> {
        let in_window = self.window.len() as u64;
        let seat = self
            .table
            .walk_preference(hash, |seat| {
                self.loads[seat] + load <= self.cap(seat, in_window)
            })
            .or_else(|| self.table.walk_preference(hash, |_| true))?;
        Some((self.table.seat_member(seat).id, seat))
    }

    /// Places key `index` on `to`, its recent requests moving with it.
    fn shift_load(&mut self, index: u32, to: (InstanceId, usize)) {
        let state = &mut self.states[index as usize];
        let load = u64::from(state.in_window);
        state.settled_at = self.routed;
        if let Some((_, from)) = state.placed.replace(to)
            && let Some(from) = self.loads.get_mut(from)
        {
            *from -= load;
        }
        self.loads[to.1] += load;
    }

    /// Counts a request of key `index`, retiring the oldest one past the window.
    fn count_request(&mut self, index: u32) {
        if self.window.len() >= self.options.window
            && let Some(old) = self.window.pop_front()
        {
            let state = &mut self.states[old as usize];
            state.in_window -= 1;
            let gone = state.in_window == 0 && !state.known;
            if let Some((_, seat)) = state.placed
                && let Some(load) = self.loads.get_mut(seat)
            {
                *load -= 1;
            }
            if gone {
                self.release(old);
            }
        }
        self.window.push_back(index);
        self.routed += 1;
        let state = &mut self.states[index as usize];
        state.in_window += 1;
        if let Some((_, seat)) = state.placed {
            self.loads[seat] += 1;
        }
    }

    /// Forgets the keys idle as of the latest event time.
    fn sweep(&mut self) {
        self.routed_since_sweep = 0;
        self.next_sweep = self
            .latest
            .saturating_add((self.options.idle_after / 2).max(1));
        for index in 0..self.states.len() as u32 {
            let state = &self.states[index as usize];
            if state.known && self.is_idle(state.last_seen, self.latest) {
                self.forget(index);
            }
        }
    }

    /// Brings placements and loads in line with the router's current table; returns the
    /// moves of the keys that are still live.
    fn reconcile(&mut self) -> Vec<Move> {
        self.sweep();
        let old_table = std::mem::replace(&mut self.table, self.router.table());
        let old_loads = std::mem::take(&mut self.loads);
        let members = self.table.members();
        self.total_weight = members.iter().map(|m| u64::from(m.weight)).sum();
        self.loads = vec![0; self.table.seat_count()];
        for m in members {
            if let (Some(seat), Some(old)) = (self.table.seat_of(m.id), old_table.seat_of(m.id)) {
                self.loads[seat] = old_loads[old];
            }
        }
        let changed: Vec<InstanceId> = members
            .iter()
            .filter(|m| !old_table.members().contains(m))
            .map(|m| m.id)
            .collect();
        let (orphans, offered) = self.reseat(&changed);
        let mut moves = Vec::with_capacity(orphans.len() + offered.len());
        for index in orphans {
            let load = u64::from(self.states[index as usize].in_window);
            match self.place(self.states[index as usize].hash, load.max(1)) {
                Some(to) => self.record_move(index, to, &mut moves),
                // Nobody left to move it to.
                None => self.states[index as usize].placed = None,
            }
        }
        let in_window = self.window.len() as u64;
        for (index, (owner, seat)) in offered {
            let load = u64::from(self.states[index as usize].in_window);
            if self.loads[seat] + load <= self.cap(seat, in_window) {
                self.record_move(index, (owner, seat), &mut moves);
            }
        }
        moves
    }

    /// Points every key at its instance's seat in the new table, and returns the known
    /// keys whose instance left (to re-place) and those whose slot a changed instance
    /// now owns (to offer it), each hottest first, then by key: the order is part of
    /// the result, so it must not depend on where keys sit in memory.
    fn reseat(&mut self, changed: &[InstanceId]) -> (Vec<u32>, Vec<Offer>) {
        let mut orphans = Vec::new();
        let mut offered = Vec::new();
        for (index, state) in self.states.iter_mut().enumerate() {
            let Some((id, _)) = state.placed else {
                continue;
            };
            let Some(seat) = self.table.seat_of(id) else {
                // Departed: a live key moves; a forgotten key's requests count nowhere.
                state.placed = state.known.then_some((id, DEPARTED));
                if state.known {
                    orphans.push(index as u32);
                }
                continue;
            };
            state.placed = Some((id, seat));
            if !state.known {
                continue;
            }
            if let Some(owner) = self.table.owner_of_hash(state.hash)
                && owner != id
                && changed.contains(&owner)
            {
                let owner_seat = self.table.seat_of(owner).unwrap_or(DEPARTED);
                offered.push((index as u32, (owner, owner_seat)));
            }
        }
        let states = &self.states;
        let hottest_first = |a: u32, b: u32| {
            let (a, b) = (&states[a as usize], &states[b as usize]);
            b.in_window
                .cmp(&a.in_window)
                .then_with(|| a.key.as_slice().cmp(b.key.as_slice()))
        };
        orphans.sort_unstable_by(|&a, &b| hottest_first(a, b));
        offered.sort_unstable_by(|&(a, _), &(b, _)| hottest_first(a, b));
        (orphans, offered)
    }

    fn record_move(&mut self, index: u32, to: (InstanceId, usize), moves: &mut Vec<Move>) {
        let Some((from, _)) = self.states[index as usize].placed else {
            return;
        };
        if from != to.0 {
            self.shift_load(index, to);
            moves.push(Move {
                key: Bytes::copy_from_slice(self.states[index as usize].key.as_slice()),
                from,
                to: to.0,
            });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Two keys whose 64-bit hashes collide (forced here; xxh3 makes it astronomically
    /// rare) are still told apart, and forgetting one keeps the other.
    #[test]
    fn keys_with_colliding_hashes_are_told_apart() {
        let mut sticky = Sticky::new(StickyOptions::default());
        sticky.add(InstanceId(1), 1).unwrap();
        sticky.add(InstanceId(2), 1).unwrap();
        let to = sticky.place(7, 1).unwrap();
        let a = sticky.insert(Key::copy_from(b"a"), 7, to, 0);
        let b = sticky.insert(Key::copy_from(b"b"), 7, to, 0);
        let c = sticky.insert(Key::copy_from(b"c"), 7, to, 0);
        assert_eq!(sticky.find(b"a", 7), Some(a));
        assert_eq!(sticky.find(b"b", 7), Some(b));
        assert_eq!(sticky.find(b"c", 7), Some(c));
        assert_eq!(sticky.find(b"d", 7), None);
        sticky.forget(b);
        assert_eq!(sticky.find(b"b", 7), None);
        assert_eq!(sticky.find(b"a", 7), Some(a));
        assert_eq!(sticky.find(b"c", 7), Some(c));
        sticky.forget(c);
        assert_eq!(sticky.find(b"a", 7), Some(a));
        sticky.forget(a);
        assert_eq!(sticky.find(b"a", 7), None);
        assert_eq!(sticky.known_keys(), 0);
        assert!(sticky.index.is_empty());
    }

    /// A join and a leave prepared on drafts (as the cluster does, off its locks) move
    /// the same keys to the same places as `add` and `remove`, and a draft taken before
    /// another change is refused without changing anything.
    #[test]
    fn a_change_applied_from_a_draft_moves_keys_as_add_and_remove_do() {
        let sticky = || {
            let mut sticky = Sticky::new(StickyOptions::default());
            for id in 1..=3 {
                sticky.add(InstanceId(id), 1).unwrap();
            }
            for i in 0..5_000u64 {
                sticky.route(format!("key-{}", i % 700).as_bytes(), i);
            }
            sticky
        };
        let (mut direct, mut drafted) = (sticky(), sticky());
        let mut draft = drafted.slot_router().draft();
        draft.add(InstanceId(4), 2).unwrap();
        let joined = drafted.apply(draft.finish()).unwrap();
        assert!(!joined.is_empty());
        assert_eq!(joined, direct.add(InstanceId(4), 2).unwrap());
        let mut draft = drafted.slot_router().draft();
        draft.remove(InstanceId(2)).unwrap();
        let left = drafted.apply(draft.finish()).unwrap();
        assert_eq!(left, direct.remove(InstanceId(2)).unwrap());
        for i in 0..700 {
            let key = format!("key-{i}");
            assert_eq!(
                drafted.placement(key.as_bytes()),
                direct.placement(key.as_bytes())
            );
        }
        let stale = drafted.slot_router().draft().finish();
        drafted.add(InstanceId(5), 1).unwrap();
        let epoch = drafted.table().epoch();
        assert_eq!(drafted.apply(stale), None);
        assert_eq!(drafted.table().epoch(), epoch);
    }

    /// A lost instance's replacement is drafted as one remove and one add on one copy:
    /// applied, it leaves every key where the two changes made in place leave it.
    #[test]
    fn a_replacement_drafted_as_one_change_places_keys_as_two_changes_do() {
        let sticky = || {
            let mut sticky = Sticky::new(StickyOptions::default());
            for id in 1..=4 {
                sticky.add(InstanceId(id), 1).unwrap();
            }
            for i in 0..8_000u64 {
                sticky.route(format!("key-{}", i % 900).as_bytes(), i);
            }
            sticky
        };
        let (mut direct, mut drafted) = (sticky(), sticky());
        let mut draft = drafted.slot_router().draft();
        draft.remove(InstanceId(3)).unwrap();
        draft.add(InstanceId(5), 1).unwrap();
        let moves = drafted.apply(draft.finish()).unwrap();
        assert!(moves.iter().all(|m| m.to != InstanceId(3)));
        direct.remove(InstanceId(3)).unwrap();
        direct.add(InstanceId(5), 1).unwrap();
        assert_eq!(drafted.table().members(), direct.table().members());
        let mut moved_to_new = 0;
        for i in 0..900 {
            let key = format!("key-{i}");
            let placed = drafted.placement(key.as_bytes());
            assert_eq!(placed, direct.placement(key.as_bytes()), "{key}");
            assert_ne!(placed, Some(InstanceId(3)), "{key}");
            assert_eq!(
                drafted.table().owner_of(key.as_bytes()),
                direct.table().owner_of(key.as_bytes())
            );
            moved_to_new += usize::from(placed == Some(InstanceId(5)));
        }
        assert!(moved_to_new > 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Two requests race for an instance with room for one, each finishing when
    /// served, while the instance already serves nothing: in no interleaving does the
    /// count pass the cap, and it is back to zero after.
    #[test]
    fn racing_claims_never_pass_the_cap() {
        loom::model(|| {
            let load = Arc::new(AtomicU64::new(0));
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let load = Arc::clone(&load);
                    thread::spawn(move || {
                        let served = claim(&load, 1);
                        if served {
                            assert_eq!(load.load(Ordering::Acquire), 1);
                            load.fetch_sub(1, Ordering::AcqRel);
                        }
                        served
                    })
                })
                .collect();
            let served = racers
                .into_iter()
                .map(|r| r.join().unwrap())
                .filter(|&s| s)
                .count();
            assert!(served >= 1, "one always fits");
            assert_eq!(load.load(Ordering::Acquire), 0);
        });
    }
}
