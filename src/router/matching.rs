//! The builder behind [`SlotRouter`](super::SlotRouter): the stable matching of slots to
//! instances, kept up to date incrementally.
//!
//! # The matching
//!
//! Every (slot, instance) pair is an *edge* with a rank from [`SlotScorer`] (lower is
//! better). Edges are totally ordered by `(rank, instance id, slot)`; a slot prefers its
//! edges in that order, an instance its edges in that order too, so preferences come
//! from one global order, and the stable matching with capacities (instance `j` holds at
//! most `cap_j` slots) is *unique*: it is what a greedy pass taking edges best first
//! would give. So any procedure that ends in a stable matching ends in *the* matching,
//! whatever the order of its steps, and whatever the history of joins and leaves.
//!
//! # Keeping it stable
//!
//! The state is the matching itself plus, per instance, a lazy heap of the slots it holds
//! (worst on top) and a lazy heap of the slots it turned away (best on top). Entries are
//! never removed eagerly: an entry is checked against the slot's current assignment when
//! it surfaces, and dropped if stale. Three moves restore stability after a change:
//!
//! - a **free** slot proposes down its ranking, from just below where it last was: an
//!   instance with room accepts; a full one accepts only if it ranks the slot better
//!   than its worst, which it then releases (that slot is free in turn); otherwise it
//!   turns the slot away. A slot released by an instance that a newcomer now outranks
//!   may find nobody below: it waits, free, for one above to pull it;
//! - an instance that gained room (a slot it held was pulled away, or its cap grew)
//!   **pulls** the best slot it turned away that still prefers it to where it is now,
//!   taking it from its holder (which now has room, and pulls in turn), and keeps doing
//!   so while it has room or ranks such a slot above its worst;
//! - after a change of caps, an instance over its cap **releases** its worst slots.
//!
//! Each move replaces matched edges by a better one in the global order, so the process
//! ends; when it ends no slot and instance would both rather be together, which is the
//! definition of stable. A join scores the newcomer against every slot and lets it pull
//! the slots that prefer it; a leave frees the slots of the leaver. Both touch about
//! `S / n` slots beyond that scoring, so a rebuild costs one pass over the slots, not a
//! full matching.
//!
//! # Ranked candidates
//!
//! A slot proposes from its ranking, which is `n` scores away; the builder caches a true
//! prefix of it (the best few candidates) per slot. A join offers the newcomer's
//! candidate to each list, where it goes in only if the list stays a true prefix; a leave
//! deletes the leaver from the lists, which leaves a shorter true prefix. A slot that
//! needs a candidate past its list is ranked in full.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use super::hash::{SlotScorer, instance_hash};
use super::table::SlotRouterOptions;
use super::{Epoch, InstanceId, Member};

/// How many ranked instances per slot the published table keeps, for preference lists.
pub(super) const RANKED_PER_SLOT: usize = 4;

/// A `ranked` entry with no instance (fewer members than [`RANKED_PER_SLOT`]).
pub(super) const NO_SEAT: u16 = u16::MAX;

/// A candidate of a slot, packed so that integer order is the slot's preference order:
/// the rank bits (lower is better) above the instance id (the tie-break). Ranks are
/// never 0 (the variate is positive), so 0 is below every candidate: "from the top".
pub(super) type Candidate = u64;

/// An instance's edge to a slot, packed so that integer order is the instance's
/// preference order: the rank above the slot number.
type Edge = u64;

pub(super) fn candidate(rank: u32, id: InstanceId) -> Candidate {
    (u64::from(rank) << 32) | u64::from(id.0)
}

pub(super) fn candidate_id(c: Candidate) -> InstanceId {
    InstanceId(c as u32)
}

fn candidate_rank(c: Candidate) -> u32 {
    (c >> 32) as u32
}

fn edge(c: Candidate, slot: u32) -> Edge {
    (c & !0xffff_ffff) | u64::from(slot)
}

fn edge_slot(e: Edge) -> usize {
    (e as u32) as usize
}

fn edge_candidate(e: Edge, id: InstanceId) -> Candidate {
    (e & !0xffff_ffff) | u64::from(id.0)
}

/// What the published table needs to know about a seat (an instance's place in the
/// builder's arrays; a vacant seat has weight 0).
#[derive(Clone, Copy, Debug)]
pub(super) struct SeatInfo {
    pub id: InstanceId,
    pub weight: u32,
    pub hash: u64,
}

impl SeatInfo {
    const VACANT: SeatInfo = SeatInfo {
        id: InstanceId(u32::MAX),
        weight: 0,
        hash: 0,
    };
}

/// A member as the builder scores it.
#[derive(Clone, Copy, Debug)]
pub(super) struct MemberRow {
    pub id: InstanceId,
    pub weight: u32,
    pub seat: u16,
    pub scorer: SlotScorer,
}

/// The best `len` candidates of `slot` among `members`, best first (all of them if
/// fewer): scored, selected, then the few selected sorted.
pub(super) fn ranking_head(slot: u32, members: &[MemberRow], len: usize) -> Vec<Candidate> {
    let mut all: Vec<Candidate> = members
        .iter()
        .map(|m| candidate(m.scorer.rank(slot), m.id))
        .collect();
    if len < all.len() {
        all.select_nth_unstable(len);
        all.truncate(len);
    }
    all.sort_unstable();
    all
}

/// One member's side of the matching.
#[derive(Clone)]
struct Seat {
    info: SeatInfo,
    cap: u32,
    /// Slots held (exact); `held` may also carry stale entries.
    count: u32,
    /// Edges held, worst on top; lazy.
    held: BinaryHeap<Edge>,
    /// Edges turned away, best on top; lazy.
    turned_away: BinaryHeap<Reverse<Edge>>,
    /// Compact `turned_away` when it grows past this.
    compact_at: usize,
}

/// The membership, the matching and the candidate cache.
#[derive(Clone)]
pub(super) struct TableBuilder {
    options: SlotRouterOptions,
    pub(super) epoch: Epoch,
    seats: Vec<Option<Seat>>,
    vacant: Vec<u16>,
    by_id: BTreeMap<InstanceId, u16>,
    /// The members sorted by id, with their seats (refreshed on every change).
    rows: Vec<MemberRow>,
    index: IndexMap,
    cache: CandidateCache,
    /// Per slot: the candidate it is matched to, or, while free, the one it last tried
    /// (it proposes below it); 0 for a slot that has never been placed.
    assigned: Vec<Candidate>,
    free: Vec<bool>,
    owners: Vec<u16>,
    ranked: Vec<u16>,
    /// Slots whose `ranked` row must be rewritten.
    stale_rows: Vec<u32>,
    queue: Vec<u32>,
    dirty: Vec<u16>,
    is_dirty: Vec<bool>,
    /// Rankings past the cache, computed during one settle: per slot, the candidates
    /// ranked below a bound (the `after` they were computed for), the first few of them.
    extended: HashMap<u32, (Candidate, Vec<Candidate>)>,
}

impl TableBuilder {
    pub(super) fn new(options: SlotRouterOptions) -> Self {
        let slots = options.slot_count();
        TableBuilder {
            options,
            epoch: 0,
            seats: Vec::new(),
            vacant: Vec::new(),
            by_id: BTreeMap::new(),
            rows: Vec::new(),
            index: IndexMap::new(&[]),
            cache: CandidateCache::new(slots, options.cached_candidates_len()),
            assigned: vec![0; slots],
            free: vec![true; slots],
            owners: vec![NO_SEAT; slots],
            ranked: vec![NO_SEAT; slots * RANKED_PER_SLOT],
            stale_rows: Vec::new(),
            queue: Vec::new(),
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            extended: HashMap::new(),
        }
    }

    /// A builder holding `members` (valid, distinct ids), built from scratch: every slot
    /// ranked against every member, then matched from nothing.
    pub(super) fn from_members(options: SlotRouterOptions, members: &[Member]) -> Self {
        let mut builder = TableBuilder::new(options);
        for m in members {
            builder.seat(m.id, m.weight);
        }
        builder.refresh_rows();
        let rows = builder.rows.clone();
        for slot in 0..options.slot_count() {
            let head = ranking_head(slot as u32, &rows, options.cached_candidates_len());
            builder.cache.set(slot, &head);
            builder.stale_rows.push(slot as u32);
        }
        builder.queue = (0..options.slot_count() as u32).rev().collect();
        builder.settle();
        builder.epoch = 1;
        builder
    }

    pub(super) fn options(&self) -> SlotRouterOptions {
        self.options
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The weight of member `id`, if it is one.
    pub(super) fn weight_of(&self, id: InstanceId) -> Option<u32> {
        let seat = *self.by_id.get(&id)?;
        self.seats[usize::from(seat)]
            .as_ref()
            .map(|s| s.info.weight)
    }

    /// Adds a member, or changes its weight (a leave and a join in one settle).
    pub(super) fn add(&mut self, id: InstanceId, weight: u32) {
        if self.by_id.contains_key(&id) {
            self.vacate(id);
        }
        let was_empty = self.by_id.is_empty();
        let members_before = self.by_id.len();
        let seat = self.seat(id, weight);
        self.refresh_rows();
        if was_empty {
            // Nothing was placed: every slot proposes from the top.
            self.assigned.fill(0);
            self.free.fill(true);
            self.queue = (0..self.options.slot_count() as u32).rev().collect();
        }
        let scorer = SlotScorer::new(instance_hash(id), weight);
        let mut wanted = Vec::new();
        for slot in 0..self.options.slot_count() {
            // The newcomer matters to a slot only if it ranks above the slot's last
            // cached candidate (or anywhere, in a complete list) or above its owner.
            let bound = if self.free[slot] || self.cache.len(slot) == members_before {
                u32::MAX
            } else {
                self.cache
                    .last_rank(slot)
                    .max(candidate_rank(self.assigned[slot]))
            };
            let Some(rank) = scorer.rank_within(slot as u32, bound) else {
                continue;
            };
            let c = candidate(rank, id);
            if let Some(at) = self.cache.offer(slot, c, members_before)
                && at < RANKED_PER_SLOT
            {
                self.stale_rows.push(slot as u32);
            }
            if !was_empty && self.prefers(slot, c) {
                wanted.push(Reverse(edge(c, slot as u32)));
            }
        }
        let joined = self.seats[usize::from(seat)].as_mut().map(|s| {
            s.compact_at = 2 * wanted.len() + 64;
            s.turned_away = BinaryHeap::from(wanted);
        });
        debug_assert!(joined.is_some());
        self.settle();
    }

    /// Removes a member (which must be one).
    pub(super) fn remove(&mut self, id: InstanceId) {
        self.vacate(id);
        self.refresh_rows();
        self.settle();
    }

    /// Takes `id` out of the matching: its slots are freed (they propose on from below
    /// it), its candidates purged, and slots whose lists ran short re-ranked.
    fn vacate(&mut self, id: InstanceId) {
        let Some(seat) = self.by_id.remove(&id) else {
            return;
        };
        let mut leaver_scorer = SlotScorer::new(instance_hash(id), 1);
        if let Some(leaver) = self.seats[usize::from(seat)].take() {
            leaver_scorer = SlotScorer::new(leaver.info.hash, leaver.info.weight);
            for e in leaver.held {
                let slot = edge_slot(e);
                if !self.free[slot] && self.assigned[slot] == edge_candidate(e, id) {
                    self.free[slot] = true;
                    self.queue.push(slot as u32);
                }
            }
        }
        self.vacant.push(seat);
        let members = self.by_id.len();
        let needed = RANKED_PER_SLOT.min(members);
        let mut short = Vec::new();
        self.cache.purge(id, leaver_scorer, |slot, at, len| {
            if at < RANKED_PER_SLOT {
                short.push((slot, len < needed));
            }
        });
        let rows: Vec<MemberRow> = self.live_rows();
        for (slot, rescore) in short {
            if rescore {
                let head = ranking_head(slot, &rows, self.options.cached_candidates_len());
                self.cache.set(slot as usize, &head);
            }
            self.stale_rows.push(slot);
        }
    }

    /// Gives `id` a seat (reusing a vacant one) with an empty matching side.
    fn seat(&mut self, id: InstanceId, weight: u32) -> u16 {
        let seat = self.vacant.pop().unwrap_or_else(|| {
            self.seats.push(None);
            self.is_dirty.push(false);
            (self.seats.len() - 1) as u16
        });
        self.seats[usize::from(seat)] = Some(Seat {
            info: SeatInfo {
                id,
                weight,
                hash: instance_hash(id),
            },
            cap: 0,
            count: 0,
            held: BinaryHeap::new(),
            turned_away: BinaryHeap::new(),
            compact_at: 64,
        });
        self.by_id.insert(id, seat);
        seat
    }

    fn live_rows(&self) -> Vec<MemberRow> {
        self.by_id
            .iter()
            .filter_map(|(_, &seat)| {
                self.seats[usize::from(seat)].as_ref().map(|s| MemberRow {
                    id: s.info.id,
                    weight: s.info.weight,
                    seat,
                    scorer: SlotScorer::new(s.info.hash, s.info.weight),
                })
            })
            .collect()
    }

    fn refresh_rows(&mut self) {
        self.rows = self.live_rows();
        self.index = IndexMap::new(&self.rows);
    }

    /// Restores the stable matching after a change of membership.
    fn settle(&mut self) {
        if self.by_id.is_empty() {
            self.assigned.fill(0);
            self.free.fill(true);
            self.owners.fill(NO_SEAT);
            self.ranked.fill(NO_SEAT);
            self.queue.clear();
            self.stale_rows.clear();
            return;
        }
        self.recap();
        loop {
            if let Some(slot) = self.queue.pop() {
                if self.free[slot as usize] {
                    self.propose(slot);
                }
            } else if let Some(seat) = self.dirty.pop() {
                self.is_dirty[usize::from(seat)] = false;
                self.pull(seat);
            } else {
                break;
            }
        }
        self.extended.clear();
        self.rewrite_rows();
        self.compact();
    }

    /// Panics unless the matching is whole and consistent: every slot held, by an
    /// occupied seat, counted once, within caps; and stable.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut counts = vec![0u32; self.seats.len()];
        for s in 0..self.owners.len() {
            assert!(!self.free[s], "slot {s} free");
            let seat = self.owners[s];
            let st = self.seats[usize::from(seat)]
                .as_ref()
                .unwrap_or_else(|| panic!("slot {s} owned by vacant seat {seat}"));
            assert_eq!(
                candidate_id(self.assigned[s]),
                st.info.id,
                "slot {s} assigned mismatch"
            );
            counts[usize::from(seat)] += 1;
        }
        for (i, st) in self.seats.iter().enumerate() {
            if let Some(st) = st {
                assert_eq!(counts[i], st.count, "seat {i} count");
                assert!(st.count <= st.cap, "seat {i} over cap");
            }
        }
        // Stable: no slot and member would both rather be together.
        let mut worst = vec![0u64; self.seats.len()];
        for s in 0..self.owners.len() {
            let seat = usize::from(self.owners[s]);
            worst[seat] = worst[seat].max(edge(self.assigned[s], s as u32));
        }
        for s in 0..self.owners.len() {
            for c in ranking_head(s as u32, &self.rows, self.rows.len()) {
                if c >= self.assigned[s] {
                    break;
                }
                let seat = usize::from(self.index.get(candidate_id(c)).expect("a member"));
                let st = self.seats[seat].as_ref().expect("occupied");
                assert!(
                    st.count == st.cap && worst[seat] < edge(c, s as u32),
                    "slot {s} and {} would rather be together",
                    st.info.id
                );
            }
        }
    }

    /// Sets every cap from the weights; an instance over its cap releases its worst.
    fn recap(&mut self) {
        let total: u64 = self.rows.iter().map(|m| u64::from(m.weight)).sum();
        for i in 0..self.rows.len() {
            let seat = self.rows[i].seat;
            let cap = self.options.cap(self.rows[i].weight, total);
            if let Some(s) = self.seats[usize::from(seat)].as_mut() {
                s.cap = cap;
            }
            while self.seat_ref(seat).count > cap && self.release_worst(seat) {}
            self.mark_dirty(seat);
        }
    }

    fn seat_ref(&self, seat: u16) -> &Seat {
        // Invariant: seats reached through `rows`, `index` or an owner are occupied.
        self.seats[usize::from(seat)]
            .as_ref()
            .expect("a seat in use is occupied")
    }

    fn seat_mut(&mut self, seat: u16) -> &mut Seat {
        self.seats[usize::from(seat)]
            .as_mut()
            .expect("a seat in use is occupied")
    }

    fn mark_dirty(&mut self, seat: u16) {
        if !self.is_dirty[usize::from(seat)] {
            self.is_dirty[usize::from(seat)] = true;
            self.dirty.push(seat);
        }
    }

    /// The first candidate of `slot` ranked below `after`, if any member is.
    fn next_candidate(&mut self, slot: u32, after: Candidate) -> Option<Candidate> {
        let list = self.cache.list(slot as usize);
        let at = list.partition_point(|&c| c <= after);
        if let Some(&c) = list.get(at) {
            return Some(c);
        }
        if list.len() == self.rows.len() {
            return None; // the list holds every member
        }
        // An extension holds the candidates ranked just below its bound, so it answers
        // only for an `after` at or below the bound in the ranking (`after >= bound`). A
        // slot that moved up since (pulled by a better instance, then released by it)
        // proposes from above the bound, and is ranked anew: reading the extension would
        // skip the candidates between.
        if let Some((bound, ext)) = self.extended.get(&slot)
            && after >= *bound
        {
            let at = ext.partition_point(|&c| c <= after);
            if let Some(&c) = ext.get(at) {
                return Some(c);
            }
        }
        // Past what is known: rank the slot in full, refresh its cached head, and keep
        // the next few after `after` for the rest of this settle.
        let mut all: Vec<Candidate> = self
            .rows
            .iter()
            .map(|m| candidate(m.scorer.rank(slot), m.id))
            .collect();
        let width = self.options.cached_candidates_len().min(all.len());
        all.select_nth_unstable(width.saturating_sub(1));
        let mut head = all[..width].to_vec();
        head.sort_unstable();
        self.cache.set(slot as usize, &head);
        let mut next: Vec<Candidate> = all.into_iter().filter(|&c| c > after).collect();
        const EXTENSION: usize = 32;
        if next.len() > EXTENSION {
            next.select_nth_unstable(EXTENSION - 1);
            next.truncate(EXTENSION);
        }
        next.sort_unstable();
        let first = next.first().copied();
        self.extended.insert(slot, (after, next));
        first
    }

    /// A free slot proposes down its ranking until an instance takes it.
    fn propose(&mut self, slot: u32) {
        let s = slot as usize;
        loop {
            let Some(c) = self.next_candidate(slot, self.assigned[s]) else {
                // Nobody below: the slot was released by an instance that a newcomer
                // now outranks. It waits, free, in the newcomer's (or another better
                // instance's) turned-away heap: the caps add up to more than the
                // slots, so one of them has room for it by the end, and pulls it.
                return;
            };
            self.assigned[s] = c;
            let Some(seat) = self.index.get(candidate_id(c)) else {
                continue; // not a member (cannot happen: lists hold members only)
            };
            let e = edge(c, slot);
            let (count, cap) = (self.seat_ref(seat).count, self.seat_ref(seat).cap);
            if count < cap {
                self.accept(seat, slot, c);
                return;
            }
            if self.worst_held(seat).is_some_and(|worst| e < worst) {
                self.release_worst(seat);
                self.accept(seat, slot, c);
                return;
            }
            self.seat_mut(seat).turned_away.push(Reverse(e));
        }
    }

    /// Member `seat` takes the slots it turned away that still prefer it, while it has
    /// room or ranks them above its worst.
    fn pull(&mut self, seat: u16) {
        while let Some(best) = self.best_turned_away(seat) {
            let (count, cap) = (self.seat_ref(seat).count, self.seat_ref(seat).cap);
            if count >= cap {
                if self.worst_held(seat).is_none_or(|worst| best >= worst) {
                    return;
                }
                self.release_worst(seat);
            }
            self.seat_mut(seat).turned_away.pop();
            let slot = edge_slot(best);
            if !self.free[slot] {
                let from = self.owners[slot];
                self.seat_mut(from).count -= 1;
                self.mark_dirty(from);
            }
            let id = self.seat_ref(seat).info.id;
            self.accept(seat, slot as u32, edge_candidate(best, id));
        }
    }

    fn accept(&mut self, seat: u16, slot: u32, c: Candidate) {
        let s = slot as usize;
        self.assigned[s] = c;
        self.free[s] = false;
        self.owners[s] = seat;
        let taker = self.seat_mut(seat);
        taker.held.push(edge(c, slot));
        taker.count += 1;
    }

    /// The worst slot `seat` holds, dropping stale entries on the way.
    fn worst_held(&mut self, seat: u16) -> Option<Edge> {
        let id = self.seat_ref(seat).info.id;
        loop {
            let top = *self.seat_ref(seat).held.peek()?;
            let slot = edge_slot(top);
            if !self.free[slot] && self.assigned[slot] == edge_candidate(top, id) {
                return Some(top);
            }
            self.seat_mut(seat).held.pop();
        }
    }

    /// True when `slot` would rather have candidate `c` than what it has: it is free (a
    /// free slot takes any offer), or it holds a worse candidate.
    fn prefers(&self, slot: usize, c: Candidate) -> bool {
        self.free[slot] || c < self.assigned[slot]
    }

    /// The best slot `seat` turned away that still prefers it to where it is now.
    fn best_turned_away(&mut self, seat: u16) -> Option<Edge> {
        let id = self.seat_ref(seat).info.id;
        loop {
            let Reverse(top) = *self.seat_ref(seat).turned_away.peek()?;
            if self.prefers(edge_slot(top), edge_candidate(top, id)) {
                return Some(top);
            }
            self.seat_mut(seat).turned_away.pop();
        }
    }

    /// `seat` lets go of its worst slot, which proposes on below it; false if it holds
    /// none.
    fn release_worst(&mut self, seat: u16) -> bool {
        let Some(worst) = self.worst_held(seat) else {
            return false;
        };
        let leaver = self.seat_mut(seat);
        leaver.held.pop();
        leaver.count -= 1;
        leaver.turned_away.push(Reverse(worst));
        let slot = edge_slot(worst);
        self.free[slot] = true;
        self.queue.push(slot as u32);
        true
    }

    /// Rewrites the published ranking of the slots whose head changed.
    fn rewrite_rows(&mut self) {
        let mut stale = std::mem::take(&mut self.stale_rows);
        stale.sort_unstable();
        stale.dedup();
        for &slot in &stale {
            let s = slot as usize;
            let row = &mut self.ranked[s * RANKED_PER_SLOT..(s + 1) * RANKED_PER_SLOT];
            row.fill(NO_SEAT);
            for (entry, &c) in row.iter_mut().zip(self.cache.list(s)) {
                *entry = self.index.get(candidate_id(c)).unwrap_or(NO_SEAT);
            }
        }
        stale.clear();
        self.stale_rows = stale;
    }

    /// Drops stale heap entries where they have piled up.
    fn compact(&mut self) {
        let (assigned, free) = (&self.assigned, &self.free);
        for seat in self.seats.iter_mut().flatten() {
            let id = seat.info.id;
            if seat.held.len() > 2 * seat.count as usize + 64 {
                let mut live: Vec<Edge> = std::mem::take(&mut seat.held)
                    .into_iter()
                    .filter(|&e| {
                        !free[edge_slot(e)] && assigned[edge_slot(e)] == edge_candidate(e, id)
                    })
                    .collect();
                live.sort_unstable();
                live.dedup();
                seat.held = BinaryHeap::from(live);
            }
            if seat.turned_away.len() > seat.compact_at {
                let mut live: Vec<Reverse<Edge>> = std::mem::take(&mut seat.turned_away)
                    .into_iter()
                    .filter(|&Reverse(e)| {
                        let slot = edge_slot(e);
                        free[slot] || edge_candidate(e, id) < assigned[slot]
                    })
                    .collect();
                live.sort_unstable();
                live.dedup();
                seat.compact_at = 2 * live.len() + 64;
                seat.turned_away = BinaryHeap::from(live);
            }
        }
    }

    /// The members sorted by id, with their seats.
    pub(super) fn rows(&self) -> &[MemberRow] {
        &self.rows
    }

    /// Each seat's published facts (vacant seats included, with weight 0).
    pub(super) fn seat_infos(&self) -> Vec<SeatInfo> {
        self.seats
            .iter()
            .map(|s| s.as_ref().map_or(SeatInfo::VACANT, |s| s.info))
            .collect()
    }

    /// Slot → seat of its owner.
    pub(super) fn owners(&self) -> &[u16] {
        &self.owners
    }

    /// Slot → the best-ranked seats, [`RANKED_PER_SLOT`] per slot, [`NO_SEAT`]-padded.
    pub(super) fn ranked(&self) -> &[u16] {
        &self.ranked
    }
}

/// Instance id → seat, for the builder's hot loops: open addressing on a
/// multiplicative hash, a few nanoseconds where a binary search over 1,000 ids takes
/// tens.
#[derive(Clone)]
struct IndexMap {
    shift: u32,
    /// `(id, seat + 1)`; 0 marks an empty entry.
    entries: Vec<(u32, u32)>,
}

impl IndexMap {
    fn new(rows: &[MemberRow]) -> Self {
        let size = (rows.len() * 4).next_power_of_two().max(8);
        let mut map = IndexMap {
            shift: 64 - size.trailing_zeros(),
            entries: vec![(0, 0); size],
        };
        for row in rows {
            let mut at = map.home(row.id.0);
            while map.entries[at].1 != 0 {
                at = (at + 1) & (size - 1);
            }
            map.entries[at] = (row.id.0, u32::from(row.seat) + 1);
        }
        map
    }

    #[inline]
    fn home(&self, id: u32) -> usize {
        (u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn get(&self, id: InstanceId) -> Option<u16> {
        let mask = self.entries.len() - 1;
        let mut at = self.home(id.0);
        loop {
            let (key, seat) = self.entries[at];
            if seat == 0 {
                return None;
            }
            if key == id.0 {
                return Some((seat - 1) as u16);
            }
            at = (at + 1) & mask;
        }
    }
}

/// For each slot, a true prefix of its full ranking: the best `len` candidates, best
/// first. A prefix may be shorter than the cache width after leaves; it is never wrong.
#[derive(Clone)]
struct CandidateCache {
    width: usize,
    lists: Vec<Candidate>,
    lens: Vec<u8>,
    /// The rank of each list's last candidate (0 for an empty list), apart from the
    /// lists so that a pass over all slots reads 4 bytes per slot, not a cache line.
    last_ranks: Vec<u32>,
}

impl CandidateCache {
    fn new(slots: usize, width: usize) -> Self {
        CandidateCache {
            width,
            lists: vec![0; slots * width],
            lens: vec![0; slots],
            last_ranks: vec![0; slots],
        }
    }

    fn len(&self, slot: usize) -> usize {
        usize::from(self.lens[slot])
    }

    fn last_rank(&self, slot: usize) -> u32 {
        self.last_ranks[slot]
    }

    fn list(&self, slot: usize) -> &[Candidate] {
        let start = slot * self.width;
        &self.lists[start..start + usize::from(self.lens[slot])]
    }

    fn set_len(&mut self, slot: usize, len: usize) {
        self.lens[slot] = len as u8;
        self.last_ranks[slot] = match len {
            0 => 0,
            _ => candidate_rank(self.lists[slot * self.width + len - 1]),
        };
    }

    /// Replaces the list of `slot` with the head of a true ranking.
    fn set(&mut self, slot: usize, ranking: &[Candidate]) {
        let n = ranking.len().min(self.width);
        let start = slot * self.width;
        self.lists[start..start + n].copy_from_slice(&ranking[..n]);
        self.set_len(slot, n);
    }

    /// Offers the candidate of a member joining a membership of `members_before`; returns
    /// where it went in. It goes in only where the list stays a true prefix: anywhere in
    /// a complete list (one that holds every member), or ahead of its last candidate.
    fn offer(&mut self, slot: usize, c: Candidate, members_before: usize) -> Option<usize> {
        let len = self.len(slot);
        let start = slot * self.width;
        let list = &mut self.lists[start..start + self.width];
        let complete = len == members_before;
        if !complete && (len == 0 || c > list[len - 1]) {
            return None;
        }
        let at = list[..len].partition_point(|&x| x < c);
        if at >= self.width {
            return None; // ranks past the cache width: the list stays a true prefix
        }
        let new_len = (len + 1).min(self.width);
        list.copy_within(at..new_len - 1, at + 1);
        list[at] = c;
        self.set_len(slot, new_len);
        Some(at)
    }

    /// Removes `id`, scored by `scorer`, from every list; calls `removed(slot, position,
    /// new length)` for each list it was in. Lists whose last rank is below the leaver's
    /// (told cheaply by [`SlotScorer::rank_within`]) are not read.
    fn purge(
        &mut self,
        id: InstanceId,
        scorer: SlotScorer,
        mut removed: impl FnMut(u32, usize, usize),
    ) {
        for slot in 0..self.lens.len() {
            if scorer
                .rank_within(slot as u32, self.last_ranks[slot])
                .is_none()
            {
                continue;
            }
            let len = self.len(slot);
            let start = slot * self.width;
            let list = &mut self.lists[start..start + len];
            if let Some(at) = list.iter().position(|&c| candidate_id(c) == id) {
                list.copy_within(at + 1.., at);
                self.set_len(slot, len - 1);
                removed(slot as u32, at, len - 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small xorshift: the churn below must be the same on every run.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    impl TableBuilder {
        fn owners_by_id(&self) -> Vec<InstanceId> {
            self.owners
                .iter()
                .map(|&seat| self.seat_ref(seat).info.id)
                .collect()
        }
    }

    /// Panics unless `builder`, repaired through a history that left `members`, is
    /// stable and owns every slot as a build from scratch of `members` does.
    fn assert_equals_a_fresh_build(
        builder: &TableBuilder,
        members: &BTreeMap<InstanceId, u32>,
        options: SlotRouterOptions,
    ) {
        builder.check_invariants();
        let all: Vec<Member> = members
            .iter()
            .map(|(&id, &weight)| Member { id, weight })
            .collect();
        let fresh = TableBuilder::from_members(options, &all);
        fresh.check_invariants();
        assert_eq!(
            builder.owners_by_id(),
            fresh.owners_by_id(),
            "the repaired table differs from a build from scratch"
        );
    }

    fn churn(seed: u64, slots: usize, epsilon: f64, steps: usize) {
        let options = SlotRouterOptions::default()
            .slots(slots)
            .unwrap()
            .table_epsilon(epsilon)
            .unwrap();
        let mut builder = TableBuilder::new(options);
        let mut members: BTreeMap<InstanceId, u32> = BTreeMap::new();
        let mut state = seed;
        for _ in 0..steps {
            let roll = next(&mut state);
            if roll.is_multiple_of(3) && !members.is_empty() {
                let at = (next(&mut state) % members.len() as u64) as usize;
                let id = *members.keys().nth(at).unwrap();
                members.remove(&id);
                builder.remove(id);
            } else {
                let id = InstanceId((next(&mut state) % 24) as u32);
                let weight = 1 + (next(&mut state) % 3) as u32;
                members.insert(id, weight);
                builder.add(id, weight);
            }
            if members.is_empty() {
                assert!(builder.owners.iter().all(|&o| o == NO_SEAT));
                continue;
            }
            assert_equals_a_fresh_build(&builder, &members, options);
        }
    }

    #[test]
    fn repaired_matching_stays_stable_and_equals_a_fresh_build() {
        for seed in 1..=6 {
            churn(seed * 7919, 256, 0.02, 40);
        }
    }

    /// A history proptest found (`tests/router_table.proptest-regressions`): in the last
    /// change (instance 6's weight from 3 to 1), slot 275 ran past its cached ranking, was
    /// then pulled up by a better instance and released again, and read the extension
    /// computed for its first fall, skipping an instance with room.
    #[test]
    fn a_slot_that_falls_twice_in_one_settle_proposes_to_every_candidate() {
        enum Change {
            Add(u32, u32),
            Remove(usize),
        }
        use Change::{Add, Remove};
        let options = SlotRouterOptions::default()
            .slots(1 << 10)
            .unwrap()
            .table_epsilon(0.001)
            .unwrap();
        let changes = [
            Add(14, 1),
            Add(14, 2),
            Add(0, 1),
            Add(9, 1),
            Remove(3),
            Add(3, 1),
            Add(8, 2),
            Add(10, 3),
            Add(13, 4),
            Add(6, 3),
            Remove(3),
            Add(21, 2),
            Remove(3),
            Add(5, 4),
            Add(16, 2),
            Add(18, 3),
            Add(19, 2),
            Add(23, 2),
            Add(6, 1),
        ];
        let mut builder = TableBuilder::new(options);
        let mut members: BTreeMap<InstanceId, u32> = BTreeMap::new();
        for change in changes {
            match change {
                Add(id, weight) => {
                    members.insert(InstanceId(id), weight);
                    builder.add(InstanceId(id), weight);
                }
                Remove(at) => {
                    let id = *members.keys().nth(at % members.len()).unwrap();
                    members.remove(&id);
                    builder.remove(id);
                }
            }
            assert_equals_a_fresh_build(&builder, &members, options);
        }
    }

    /// Tight caps make instances full, so slots fall through long rankings and past
    /// the cached candidates: many histories, to reach the rare paths. History 347 is
    /// the one of 800 that met the slot falling twice in one settle (see above).
    #[test]
    fn repair_holds_over_many_histories_with_tight_caps() {
        for seed in (1..=40u64).chain([347]) {
            churn(seed * 104_729, 256, 0.001, 60);
        }
    }

    #[test]
    fn repair_holds_with_tight_and_loose_caps() {
        churn(99, 512, 0.001, 30);
        churn(1234, 512, 1.0, 30);
    }
}
