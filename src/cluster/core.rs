//! The shared heart of a cluster: submit, membership changes, stalls, checkpoints.
//!
//! Ordering rules this file keeps (each one is what makes a key's state the fold of its
//! requests in log order):
//! - A request is appended to the input log and put on its instance's queue while the
//!   key's stripe lock is held, so two requests of one key reach queues in log order.
//! - Every change of who holds a key (a membership change, a stall, a key placed anew
//!   after going idle) happens under that key's stripe lock too (membership changes take
//!   every stripe): the old holder gets a `Release` after every request it was sent, and
//!   the new holder gets an `Acquire` before any request it will be sent.
//! - Within one change every `Release` is queued before any `Acquire`, so a chain of
//!   instances waiting for each other's handoffs always ends.
//! - A permit (room in the queue) is taken before the stripe lock, so a full queue never
//!   blocks a membership change, and a stalled instance can always be removed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use parking_lot::{Mutex, MutexGuard};

use super::appenders::{Appenders, Finishes, Job};
use super::fold::{self, CHECKPOINT, Checkpoint, Control, Envelope};
use super::ids::{RecentIds, RequestId};
use super::instance::{
    self, CheckpointRound, Exit, Handoff, Instance, Left, Message, NoPermit, Queued, QueuedBytes,
    Registration, Relays, Source, Start, Unavailable,
};
use super::metrics::{InstanceMetrics, Metrics};
use super::owned::OwnedLog;
use super::placement::{self, Moves, Routing, Stripe};
use super::query::{self, Ask, Asked};
use super::reentry;
use crate::client::{Pending, Responder, pending};
use crate::error::{Error, Result};
use crate::handler::{Effects, Handler};
use crate::launcher::{Heartbeat, Launcher, Supervised};
use crate::record::{Entry, Offset, now};
use crate::router::SlotRouter;
use crate::router::table::{Draft, Prepared};
use crate::router::{InstanceId, key_hash};
use crate::small::Key;
use crate::store::Deferred;
use crate::store::Store;

const STRIPES: usize = 256;
/// How many of the checkpoint's states an open decodes before it starts anything.
const STATES_CHECKED_AT_OPEN: usize = 16;
/// How many of the requests after the checkpoint an open decodes before it starts
/// anything.
const REQUESTS_CHECKED_AT_OPEN: usize = 16;
/// A batch over at most this many instances queues each one's requests with a pass over
/// the whole batch; over more, it groups them by instance first, so that a large batch
/// over many instances costs no pass per instance. Grouping first at any size cost
/// batches of 2 over 4 instances 14% (1.82M -> 1.56M req/s: its two vectors), and
/// grouping by sorting the batch's indices cost batches of 64 7% (3.21M -> 2.98M).
const SCAN_PER_INSTANCE_UP_TO: usize = 8;

/// Runs `append` (a call into the input log's `Store`, which may be the user's); if it
/// panics, runs `undo` (the holder changes and queue room taken for the append are given
/// back, as when it fails) before the panic goes on. A key whose holder changed for a
/// request that never reached the log would otherwise be handled where its state is not.
fn unwinding_undoes<T>(append: impl FnOnce() -> T, undo: impl FnOnce()) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(append)) {
        Ok(done) => done,
        Err(panic) => {
            undo();
            std::panic::resume_unwind(panic)
        }
    }
}

/// What logging a batch gave: its pending responses, `None` if it must be routed
/// again, or why it was not logged.
type BatchLogged<H> = Result<Option<Vec<Pending<<H as Handler>::Response>>>>;

/// A batch logged and queued under its stripes, and whether it is still to be waited for
/// (see [`Submitted::Logged`]).
type LockedBatch<H> = (Vec<Pending<<H as Handler>::Response>>, bool);

/// A request of a batch that repeats one with the same key and id.
#[derive(Clone, Copy, Debug)]
enum BatchDup {
    /// Already logged, at this offset.
    Logged(RequestId, Offset),
    /// Given earlier in the same batch, as the item at this index.
    InBatch(RequestId, usize),
}

/// The stripe locks a batch holds ([`Shared::lock_stripes`]): their indices in
/// ascending order, and the guards in the same order.
struct Stripes<'a> {
    order: Vec<usize>,
    guards: Vec<MutexGuard<'a, Stripe>>,
}

/// A stripe's lock, beside a count of the calls into the input store made under it (odd
/// while one runs): the supervisor's view of a store that stopped answering, at the cost
/// of two plain stores to a line the submit holds already.
#[derive(Default)]
struct StripeSlot {
    lock: Mutex<Stripe>,
    store_calls: AtomicU64,
}

impl std::ops::Deref for StripeSlot {
    type Target = Mutex<Stripe>;
    fn deref(&self) -> &Mutex<Stripe> {
        &self.lock
    }
}

impl std::ops::DerefMut for StripeSlot {
    fn deref_mut(&mut self) -> &mut Mutex<Stripe> {
        &mut self.lock
    }
}

impl StripeSlot {
    /// Runs `call` (into the input store, with this stripe's lock held: one writer),
    /// counted as running until it returns or unwinds.
    fn watch_store<T>(&self, call: impl FnOnce() -> T) -> T {
        let begun = self.store_calls.load(Ordering::Relaxed) + 1;
        self.store_calls.store(begun, Ordering::Release);
        let _ended = Ended(|| self.store_calls.store(begun + 1, Ordering::Release));
        call()
    }

    /// The count of calls, and whether one runs now.
    fn progress(&self) -> (u64, bool) {
        let count = self.store_calls.load(Ordering::Acquire);
        (count, count % 2 == 1)
    }
}

/// Runs its closure when dropped, by a return or an unwind.
struct Ended<F: FnMut()>(F);

impl<F: FnMut()> Drop for Ended<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Waits for deferred appends (`Store::wait_appended`), which run on any thread and
/// outside the stripes: how many began and how many ended.
#[derive(Default)]
struct StoreWaits {
    begun: CachePadded<AtomicU64>,
    ended: CachePadded<AtomicU64>,
}

impl StoreWaits {
    fn watch<T>(&self, wait: impl FnOnce() -> T) -> T {
        self.begun.fetch_add(1, Ordering::AcqRel);
        let _ended = Ended(|| {
            self.ended.fetch_add(1, Ordering::AcqRel);
        });
        wait()
    }

    /// The waits ended, and whether one runs now.
    fn progress(&self) -> (u64, bool) {
        let begun = self.begun.load(Ordering::Acquire);
        let ended = self.ended.load(Ordering::Acquire);
        (ended, begun > ended)
    }
}

/// What the supervisor last saw of the calls into the input store: per stripe, the
/// count it saw and since when; the same for the waits' `ended`; and whether the
/// current stall was reported.
#[derive(Default)]
struct StoreWatch {
    stripes: Vec<(u64, Option<Instant>)>,
    waits_ended: (u64, Option<Instant>),
    reported: bool,
}

/// The checkpoints handed to rebuilds (see [`Shared::checkpoint_for`]): the latest,
/// which every rebuild that starts now shares, and each instance's pin: the offset of
/// the checkpoint its rebuild folds from (`Offset::MAX`: none), and whether it was
/// fenced.
struct HandedCheckpoints {
    newest: Weak<Checkpoint>,
    pins: Vec<(Arc<AtomicU64>, Arc<AtomicBool>)>,
}

/// Membership changes under way, and who waits for them to end.
#[derive(Default)]
struct Changes {
    under_way: AtomicUsize,
    /// Changes ended so far.
    ended: AtomicU64,
    waiting: Mutex<Vec<std::task::Waker>>,
}

/// Every stripe lock, held by a membership change (see [`Shared::exclusive`]). Dropped,
/// it gives them back, then wakes the futures waiting for the change to end.
struct Exclusive<'a> {
    guards: Vec<MutexGuard<'a, Stripe>>,
    changes: &'a Changes,
}

impl<'a> std::ops::Deref for Exclusive<'a> {
    type Target = [MutexGuard<'a, Stripe>];
    fn deref(&self) -> &Self::Target {
        &self.guards
    }
}

impl std::ops::DerefMut for Exclusive<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guards
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        // Counted ended before the stripes go: a batch that finds one taken by the next
        // change then knows a change ended since it began to wait.
        self.changes.ended.fetch_add(1, Ordering::SeqCst);
        self.guards.clear();
        self.changes.under_way.fetch_sub(1, Ordering::SeqCst);
        let waiting = std::mem::take(&mut *self.changes.waiting.lock());
        waiting.into_iter().for_each(std::task::Waker::wake);
    }
}

/// Tunables, set through the builder.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) queue_capacity: usize,
    pub(crate) stall_timeout: Duration,
    pub(crate) checkpoint_every: u64,
    pub(crate) tick: Duration,
    pub(crate) truncate_after_checkpoint: bool,
    pub(crate) linger: Duration,
    /// Ignore the checkpoints in the store at open: see
    /// [`ClusterBuilder::rebuild_from_log`](super::ClusterBuilder::rebuild_from_log).
    pub(crate) rebuild_from_log: bool,
    /// See [`ClusterBuilder::append_threads`](super::ClusterBuilder::append_threads).
    pub(crate) append_threads: usize,
    /// See [`ClusterBuilder::retry_window`](super::ClusterBuilder::retry_window).
    pub(crate) retry_window: u64,
}

/// A batch's routing: each destination instance once, and each item's.
struct Routed<H: Handler> {
    /// The placement's epoch when the batch was routed.
    epoch: crate::router::Epoch,
    dests: Vec<Arc<Inst<H>>>,
    dest_of: Vec<usize>,
}

impl<H: Handler> Routed<H> {
    /// Item `i`'s instance.
    fn dest(&self, i: usize) -> &Arc<Inst<H>> {
        &self.dests[self.dest_of[i]]
    }

    /// The index of `inst` in `dests`, adding it if new.
    fn index_of(&mut self, inst: &Arc<Inst<H>>) -> usize {
        // Ids are never reused, so an id names one instance: comparing pointers does not
        // read each instance's memory.
        match self.dests.iter().position(|d| Arc::ptr_eq(d, inst)) {
            Some(at) => at,
            None => {
                self.dests.push(inst.clone());
                self.dests.len() - 1
            }
        }
    }
}

/// An instance of the cluster of handler `H`.
type Inst<H> = Instance<<H as Handler>::State, <H as Handler>::Response>;

impl<'w> Room<'_, 'w> {
    /// The context of a poll, if this is one.
    fn context(&mut self) -> Option<&mut std::task::Context<'w>> {
        match self {
            Room::Poll(cx, _) => Some(cx),
            Room::Wait | Room::Refuse => None,
        }
    }

    /// Waits, as this submit may, for room in the full queue of `inst`: `Ok(true)` once
    /// it took a permit, `Ok(false)` if the instance retired meanwhile (route again),
    /// [`Error::Busy`] when refusing, `Pending` (holding no permit, the waker woken at
    /// the next release) when polled. Called holding no lock.
    fn wait_in<S, R>(&mut self, inst: &Instance<S, R>) -> Poll<Result<bool>> {
        Poll::Ready(Ok(match self {
            Room::Refuse => {
                return Poll::Ready(Err(Error::Busy {
                    instance: inst.id,
                    capacity: inst.permits.capacity(),
                }));
            }
            Room::Wait => inst.permits.acquire(true).is_ok(),
            Room::Poll(cx, registration) => {
                ready!(inst.permits.poll_acquire(cx, registration)).is_ok()
            }
        }))
    }
}

/// What a batch is stamped with once: each key's hash (for its routing and its
/// stripe, however often it routes) and the batch's timestamp.
struct Stamp {
    hashes: Vec<u64>,
    timestamp: u64,
}

/// How far a batch submit got: see [`Shared::poll_submit_batch`].
pub(crate) struct BatchProgress<H: Handler> {
    /// Taken at the first poll.
    stamp: Option<Stamp>,
    /// Where the batch's future waits for room, as a future.
    registration: Registration,
    /// The placement epoch at which a routing pass last found a key with no live
    /// instance.
    unroutable_at: Option<crate::router::Epoch>,
    held: Option<Held<H>>,
    /// If a poll waited, as a future, for a membership change that held the batch's
    /// stripes: how many changes had ended then (see [`Shared::lock_stripes`]).
    waited_for_change: Option<u64>,
}

impl<H: Handler> Default for BatchProgress<H> {
    fn default() -> Self {
        BatchProgress {
            stamp: None,
            registration: Registration::default(),
            unroutable_at: None,
            held: None,
            waited_for_change: None,
        }
    }
}

/// A routed batch and the room it holds: all of it in the queues of `order[..taken]`.
/// Dropped, it gives that room back.
struct Held<H: Handler> {
    routed: Routed<H>,
    /// Each destination (its index in `routed.dests`) and its number of requests, in
    /// ascending instance order.
    order: Vec<(usize, usize)>,
    taken: usize,
}

impl<H: Handler> Drop for Held<H> {
    fn drop(&mut self) {
        for &(d, requests) in &self.order[..self.taken] {
            self.routed.dests[d].permits.release_many(requests);
        }
    }
}

/// What a submit does when its instance's queue is full.
pub(crate) enum Room<'c, 'w> {
    /// Waits for room, blocking the thread.
    Wait,
    /// Fails with [`Error::Busy`].
    Refuse,
    /// Returns `Pending`; the context's waker, registered under the future's
    /// [`Registration`], is woken when there may be room.
    Poll(&'c mut std::task::Context<'w>, &'c mut Registration),
}

pub(crate) struct Shared<H: Handler> {
    pub(crate) handler: Arc<H>,
    pub(crate) input: Arc<dyn Store>,
    pub(crate) effects: Effects,
    effects_store: Option<Arc<dyn Store>>,
    pub(crate) options: Options,
    routing: Mutex<Routing<H::State, H::Response>>,
    /// The placement's epoch, published by every change of it (see
    /// [`Shared::change_placement`]): read under a stripe lock, it is current, since a
    /// change holds every stripe.
    placement_epoch: AtomicU64,
    /// The placement's router, to draft membership changes on without the routing lock
    /// (see [`Shared::prepare_placement`]).
    slot_router: Arc<SlotRouter>,
    /// The stripe locks, each guarding the holders of its keys. Cache-line padded: two
    /// submitters on different stripes must not share a line.
    stripes: Box<[CachePadded<StripeSlot>]>,
    /// Waits for deferred appends (`Store::wait_appended`) begun and ended, and what the
    /// supervisor saw of the store's calls (see [`Shared::watch_store`]).
    store_waits: StoreWaits,
    store_watch: Mutex<StoreWatch>,
    /// Times a call into the input store ran past the stall timeout.
    store_stalls: AtomicU64,
    /// Submits refused as duplicates (see `recent_ids`).
    duplicates: AtomicU64,
    /// How long the call the supervisor saw stalled has run, in milliseconds, while it
    /// runs past the stall timeout; 0 otherwise.
    store_stalled_ms: AtomicU64,
    /// Membership changes under way (holding or taking every stripe; see
    /// [`Shared::exclusive`]), and the futures to wake when one ends.
    changes: Changes,
    retiring: Mutex<Vec<Arc<Inst<H>>>>,
    /// Offset of the latest checkpoint. Its states are not kept in memory: rebuilds load
    /// them from the store, sharing one decoded copy while any rebuild holds it.
    checkpoint_offset: AtomicU64,
    /// The checkpoints rebuilds hold. What a newer checkpoint lets the cluster forget
    /// (journaled answers, set-aside marks, the log's head) stays while any rebuild folds
    /// from an older one.
    checkpoint_cache: Mutex<HandedCheckpoints>,
    /// Whether the store's latest checkpoint is one to rebuild from. False from an open
    /// that rebuilt every key from the log until this cluster saves its first checkpoint:
    /// the ones before may hold states of an older `State` type, and a rebuild meanwhile
    /// (after a panic, a stall, a move) folds the log from its first record instead.
    checkpoint_in_store: AtomicBool,
    poisoned: Mutex<BTreeSet<Offset>>,
    /// See `Recovered::handled_before`.
    handled_before: Offset,
    /// The ids of requests submitted with one among the last records of the log (see
    /// [`super::ids`]). Taken under a key's stripe lock, never the other way round.
    recent_ids: Mutex<RecentIds>,
    /// Requests a stall caught an instance on, and that no fold has completed since: a
    /// second stall on one of them sets it aside (see
    /// [`Shared::claim_if_stalled_twice`]).
    stalled_once: Mutex<BTreeSet<Offset>>,
    /// Whether `stalled_once` may hold anything: folds skip its lock while it is empty.
    any_stalled_once: AtomicBool,
    /// Requests whose instance was lost, and answers given ahead of such a loss.
    orphans: Mutex<Orphans<H::Response>>,
    /// Whether `orphans.waiting` may hold anything: rebuilds skip its lock while it is
    /// empty and no instance is retiring.
    any_orphans: AtomicBool,
    /// Whether `retiring` holds anything (see [`Orphans::early`]).
    any_retiring: AtomicBool,
    /// How far waits for deferred appends (`Store::wait_appended`) have succeeded: see
    /// [`Shared::wait_logged`].
    logged_ok: AtomicU64,
    accepting: AtomicBool,
    /// Set (and waited for) once a shutdown has ended: a second one waits for the first.
    stopped: (Mutex<bool>, parking_lot::Condvar),
    /// Set when shutdown tells the instances to stop: no checkpoint round starts after
    /// it (the instances would stop before contributing, and the round wait in vain).
    stopping: AtomicBool,
    /// Requests handled by all instances, ever, when the last checkpoint began.
    handled_at_checkpoint: AtomicU64,
    /// Requests handled by instances that are gone.
    handled_by_gone: AtomicU64,
    /// Requests after the checkpoint found at open: they count toward the next one.
    replayed_at_open: u64,
    next_id: AtomicU32,
    launcher: Arc<dyn Launcher>,
    round: Mutex<Option<Arc<CheckpointRound>>>,
    checkpointing: Mutex<()>,
    /// Set when a checkpoint is due; the checkpoint thread waits on it.
    due: (Mutex<bool>, parking_lot::Condvar),
    stalls: AtomicU64,
    moved: AtomicU64,
    /// Keys the placement moved off instances over their cap.
    shed: AtomicU64,
    me: Weak<Shared<H>>,
    owned: Vec<Arc<OwnedLog>>,
    /// Appends of async submits, when the input log's appends wait for the disk.
    appenders: Appenders,
    /// Queries lost instances were running outside the unit of work a stall was
    /// declared on (see [`Shared::left_queries`]).
    watched: Mutex<Vec<WatchedQuery>>,
    /// Instances replaying an answered request past the stall timeout, given longer
    /// (see [`Shared::be_patient`]).
    patient: Mutex<Vec<Patient>>,
    /// How many replacements each answered request's replays have cost.
    replay_stalls: Mutex<HashMap<Offset, u32, ahash::RandomState>>,
}

/// An instance left to run on a replay past the stall timeout (see
/// [`Shared::be_patient`]).
struct Patient {
    instance: InstanceId,
    heartbeat: Arc<Heartbeat>,
    /// The heartbeat's count while the replay runs.
    unit: u64,
    offset: Offset,
    since: Instant,
    allowance: Duration,
}

/// A query a lost instance began after a stall was declared on an earlier unit of its
/// work: the instance has left the supervisor's watch, so the cluster watches the query
/// (every supervisor tick) until it ends, and answers it [`Error::QueryStalled`] if it
/// runs past the stall timeout.
struct WatchedQuery {
    instance: InstanceId,
    key: Key,
    heartbeat: Arc<Heartbeat>,
    /// The heartbeat's count while the query runs.
    unit: u64,
    since: Instant,
    answer: query::StallAnswer,
}

/// What an appender thread did with a single submit (see [`Shared::append_elsewhere`]).
pub(crate) enum Appended<H: Handler> {
    /// Logged and queued.
    Logged(Pending<H::Response>),
    /// Not logged: its key routes to `instance`, whose queue is full. The submit, back
    /// to its future, to wait for room there.
    Busy {
        instance: InstanceId,
        key: Vec<u8>,
        payload: fold::Scratch,
    },
}

/// What an appender thread did with a batch (see [`Shared::append_batch_elsewhere`]).
pub(crate) enum BatchAppended<H: Handler> {
    /// Logged and queued.
    Logged(Vec<Pending<H::Response>>),
    /// To be routed again, its room given back: the batch, back to its future.
    Again(Vec<(Vec<u8>, Range<usize>)>, fold::Scratch),
}

/// What [`Shared::submit_from`] did.
pub(crate) enum Submitted<H: Handler> {
    /// Logged and queued, with the key's stripe released, and not waited for: if the
    /// flag says so the request may not be durable yet (`Store::append_deferred`), and
    /// its submit returns it only through [`Shared::durable`].
    Logged(Pending<H::Response>, bool),
    /// Room taken in this instance's queue, nothing logged.
    Room(Arc<Inst<H>>),
    /// A request with an id already logged with its key, at `offset`; nothing logged.
    /// Its submit returns [`Shared::duplicate`] (which waits for the first to be durable).
    Duplicate(RequestId, Offset),
}

impl<H: Handler> Submitted<H> {
    /// The pending response of a submit that was not asked to reserve room only.
    pub(crate) fn logged(self) -> Result<(Pending<H::Response>, bool)> {
        match self {
            Submitted::Logged(p, waits) => Ok((p, waits)),
            Submitted::Duplicate(id, offset) => {
                debug_assert!(false, "a duplicate handled as logged");
                Err(Error::Duplicate { id, offset })
            }
            Submitted::Room(inst) => {
                // Only `reserve` returns room; give it back rather than leak it.
                inst.permits.release();
                debug_assert!(false, "room returned to a submit that did not reserve");
                Err(Error::Closed)
            }
        }
    }
}

/// Everything `Shared::open` needs.
pub(crate) struct Parts<H: Handler> {
    pub(crate) handler: H,
    pub(crate) input: Arc<dyn Store>,
    pub(crate) effects: Option<Arc<dyn Store>>,
    pub(crate) options: Options,
    pub(crate) placement: Box<dyn super::placement::Placement>,
    pub(crate) launcher: Arc<dyn Launcher>,
    pub(crate) instances: Vec<u32>,
    /// Stores the cluster opened itself: closed at shutdown.
    pub(crate) owned: Vec<Arc<OwnedLog>>,
}

/// What the log holds after the latest checkpoint, read once at open.
struct Recovered {
    checkpoint: Checkpoint,
    /// The latest checkpoint's offset, read even when `from_log` ignores its states:
    /// every request before it was handled live (see `fold::Replay::handled_before`).
    handled_before: Offset,
    poisoned: BTreeSet<Offset>,
    keys: HashSet<Bytes, ahash::RandomState>,
    requests: u64,
    /// The first requests after the checkpoint that are not set aside (offset, key,
    /// body), for an open to check that they decode.
    samples: Vec<(Offset, Bytes, Bytes)>,
    /// The ids of the requests among the last `retry_window` records.
    recent_ids: RecentIds,
}

/// Reads the latest checkpoint and the log after it, and the ids of the requests among
/// the last `retry_window` records; with `from_log`, ignores every checkpoint and reads
/// the log from its first record, which must be offset 0.
fn recover(input: &dyn Store, from_log: bool, retry_window: u64) -> Result<Recovered> {
    let mut handled_before = 0;
    let checkpoint = if from_log {
        // Checked before anything is written: a refused open changes nothing.
        if input.start_offset() > 0 {
            return Err(Error::Config(format!(
                "rebuild_from_log: the input log starts at offset {}, so the states of the \
                 requests before it exist only in the checkpoint and cannot be rebuilt from \
                 the log; open without rebuild_from_log, with the State type that \
                 checkpoint was written with",
                input.start_offset()
            )));
        }
        // Its states may be of an older `State` type; its offset is all that is read.
        if let Some(s) = input.latest_snapshot(CHECKPOINT)? {
            handled_before = s.offset;
        }
        Checkpoint::empty(0)
    } else {
        match input.latest_snapshot(CHECKPOINT)? {
            Some(s) => Checkpoint::decode(s.offset, &s.blob)?,
            None if input.start_offset() > 0 => {
                return Err(Error::Config(format!(
                    "the input log starts at offset {} but holds no checkpoint to start from",
                    input.start_offset()
                )));
            }
            None => Checkpoint::empty(0),
        }
    };
    let mut poisoned = BTreeSet::new();
    let mut keys: HashSet<Bytes, ahash::RandomState> = checkpoint.states.keys().cloned().collect();
    let mut requests = 0;
    let mut damage = None;
    let mut samples = Vec::new();
    // The ids of the last `retry_window` records. Those before the checkpoint are read
    // first, apart: nothing else needs those records, so damage among them (the store
    // checks a sealed segment when it reads it) costs their ids, not the open.
    let mut recent_ids = RecentIds::new(retry_window);
    let ids_from = input
        .next_offset()
        .saturating_sub(retry_window)
        .max(input.start_offset());
    if retry_window > 0 && ids_from < checkpoint.offset {
        read_ids_before(input, ids_from, checkpoint.offset, &mut recent_ids);
    }
    input.replay_from(checkpoint.offset, &mut |offset, entry| {
        if retry_window > 0
            && offset >= ids_from
            && let Some(id) = fold::request_id(entry.payload)
        {
            recent_ids.insert(entry.key, id, offset, true);
        }
        match fold::envelope_of(offset, entry.payload) {
            Ok(Envelope::Request(body)) => {
                requests += 1;
                if samples.len() < 4 * REQUESTS_CHECKED_AT_OPEN {
                    let key = Bytes::copy_from_slice(entry.key);
                    samples.push((offset, key, Bytes::copy_from_slice(body)));
                }
                if !keys.contains(entry.key) {
                    keys.insert(Bytes::copy_from_slice(entry.key));
                }
            }
            Ok(Envelope::Control(Control::Poison { offset })) => {
                poisoned.insert(offset);
                recent_ids.forget(offset);
            }
            Ok(Envelope::Control(_)) => {}
            Err(e) => {
                damage.get_or_insert(e);
            }
        }
    })?;
    if let Some(e) = damage {
        return Err(e);
    }
    // Requests refused live as undecodable are set aside (as panicked ones are).
    samples.retain(|(offset, _, _)| !poisoned.contains(offset));
    samples.truncate(REQUESTS_CHECKED_AT_OPEN);
    Ok(Recovered {
        handled_before: handled_before.max(checkpoint.offset),
        checkpoint,
        poisoned,
        keys,
        requests,
        samples,
        recent_ids,
    })
}

/// Reads into `ids` the ids of the requests in `from..until`; stops at the first record
/// the store cannot read, with a warning (the ids of the records after it are not
/// remembered: their retries would be applied again).
fn read_ids_before(input: &dyn Store, from: Offset, until: Offset, ids: &mut RecentIds) {
    let records = match input.read_from(from) {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, from, until, "cannot read the request ids before the checkpoint");
            return;
        }
    };
    for record in records {
        match record {
            Ok(record) if record.offset >= until => return,
            Ok(record) => {
                if let Some(id) = fold::request_id(&record.payload) {
                    ids.insert(&record.key, id, record.offset, true);
                } else if let Ok(Envelope::Control(Control::Poison { offset })) =
                    fold::envelope(&record)
                {
                    ids.forget(offset);
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    until,
                    "cannot read the request ids before the checkpoint: retries of the \
                     requests from here to the checkpoint will not be recognized"
                );
                return;
            }
        }
    }
}

/// Refuses an open whose `samples` (requests after the checkpoint) all fail to decode
/// as `R`.
fn check_requests<R: serde::de::DeserializeOwned>(
    samples: &[(Offset, Bytes, Bytes)],
) -> Result<()> {
    let mut first = None;
    for (offset, key, body) in samples {
        match fold::decode_request::<R>(*offset, key, body) {
            Ok(_) => return Ok(()),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(Error::Codec { context, message }) => Err(Error::Codec {
            context,
            message: format!(
                "none of the first {} requests after the checkpoint decodes; the first: \
                 {message}",
                samples.len()
            ),
        }),
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl<H: Handler> Shared<H> {
    /// Recovers from the input log and starts the instances.
    pub(crate) fn open(parts: Parts<H>) -> Result<Arc<Self>> {
        let Parts {
            handler,
            input,
            effects,
            options,
            placement,
            launcher,
            instances,
            owned,
        } = parts;
        let mut routing = Routing {
            placement,
            instances: BTreeMap::new(),
        };
        let mut stripes: Vec<CachePadded<StripeSlot>> =
            (0..STRIPES).map(|_| CachePadded::default()).collect();
        let recovered = recover(&*input, options.rebuild_from_log, options.retry_window)?;
        // A `State` type changed since the checkpoint was taken would make every key
        // unavailable once the instances rebuild them: refused here instead, with what
        // to do, before anything starts. A few states tell (they share one type).
        for key in recovered
            .checkpoint
            .states
            .keys()
            .take(STATES_CHECKED_AT_OPEN)
        {
            fold::checkpoint_state::<H::State>(&recovered.checkpoint, key)?;
        }
        // So would a changed `Request` type: the requests after the checkpoint would
        // not decode, and the states would be rebuilt without them (checkpointed so,
        // and the log truncated, they would be lost for good). A few requests tell: if
        // none of them decodes, the type changed. (One request can be undecodable
        // from the start, through serde attributes bincode cannot read back: refused
        // live, and set aside, so it is not among them; or unmarked, if the process
        // stopped before its instance got to it, among others that decode.)
        check_requests::<H::Request>(&recovered.samples)?;
        let journal = Effects::open(
            effects.clone(),
            Some(input.clone()),
            recovered.checkpoint.offset,
        )?;
        // Held until every instance has rebuilt its keys from it.
        let checkpoint = Arc::new(recovered.checkpoint);
        for &id in &instances {
            routing.placement.add(InstanceId(id), 1)?;
        }
        let end = input.next_offset();
        let mut limits: HashMap<InstanceId, HashMap<Bytes, Offset, ahash::RandomState>> =
            HashMap::new();
        for key in &recovered.keys {
            let owner = routing.placement.owner_of(key).ok_or(Error::NoInstance)?;
            stripes[stripe_of(key)]
                .get_mut()
                .insert(Key::copy_from(key), owner);
            limits.entry(owner).or_default().insert(key.clone(), end);
        }
        let next_id = instances.iter().max().map_or(0, |m| m + 1);
        let placement_epoch = AtomicU64::new(routing.placement.epoch());
        let slot_router = routing.placement.slot_router();
        let checkpoint_in_store = !options.rebuild_from_log;
        let options_append_threads = options.append_threads;
        let shared = Arc::new_cyclic(|me| Shared {
            handler: Arc::new(handler),
            input,
            effects: journal,
            effects_store: effects,
            options,
            routing: Mutex::new(routing),
            placement_epoch,
            slot_router,
            stripes: stripes.into_boxed_slice(),
            store_waits: StoreWaits::default(),
            store_watch: Mutex::new(StoreWatch::default()),
            store_stalls: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            store_stalled_ms: AtomicU64::new(0),
            changes: Changes::default(),
            retiring: Mutex::new(Vec::new()),
            checkpoint_offset: AtomicU64::new(checkpoint.offset),
            checkpoint_cache: Mutex::new(HandedCheckpoints {
                newest: Arc::downgrade(&checkpoint),
                pins: Vec::new(),
            }),
            checkpoint_in_store: AtomicBool::new(checkpoint_in_store),
            poisoned: Mutex::new(recovered.poisoned),
            handled_before: recovered.handled_before,
            recent_ids: Mutex::new(recovered.recent_ids),
            stalled_once: Mutex::new(BTreeSet::new()),
            any_stalled_once: AtomicBool::new(false),
            orphans: Mutex::new(Orphans {
                waiting: HashMap::default(),
                early: HashMap::default(),
                failed_early: HashMap::default(),
            }),
            any_orphans: AtomicBool::new(false),
            any_retiring: AtomicBool::new(false),
            logged_ok: AtomicU64::new(0),
            accepting: AtomicBool::new(true),
            stopped: (Mutex::new(false), parking_lot::Condvar::new()),
            stopping: AtomicBool::new(false),
            handled_at_checkpoint: AtomicU64::new(0),
            handled_by_gone: AtomicU64::new(0),
            replayed_at_open: recovered.requests,
            next_id: AtomicU32::new(next_id),
            launcher,
            round: Mutex::new(None),
            checkpointing: Mutex::new(()),
            due: (Mutex::new(false), parking_lot::Condvar::new()),
            stalls: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            me: me.clone(),
            owned,
            appenders: Appenders::new(options_append_threads),
            watched: Mutex::new(Vec::new()),
            patient: Mutex::new(Vec::new()),
            replay_stalls: Mutex::new(HashMap::default()),
        });
        for &id in &instances {
            let id = InstanceId(id);
            let start = match limits.remove(&id) {
                Some(limits) => Start::Restore {
                    limits,
                    checkpoint: Some(checkpoint.clone()),
                    unavailable: Unavailable::default(),
                },
                None => Start::Empty,
            };
            let started = shared.start_instance(id, 1, start).and_then(|_| {
                shared.journal(&Control::Join {
                    id: id.0,
                    weight: 1,
                })
            });
            if let Err(e) = started {
                // The instances started so far stop, and the logs are closed: a failed
                // open leaves no thread behind and the directory free for the next try.
                if let Err(stop) = shared.shutdown(false) {
                    tracing::warn!(error = %stop, "stopping after a failed open");
                }
                return Err(e);
            }
        }
        Ok(shared)
    }

    fn arc(&self) -> Arc<Self> {
        // `self` is only reachable through an Arc built by `open`, so the upgrade holds.
        self.me.upgrade().expect("Shared is always owned by an Arc")
    }

    /// Counts `pick` in the metrics' `shed_keys` if it sheds its key (the caller is
    /// about to count it in the placement).
    fn count_shed(&self, pick: &crate::router::Pick) {
        if pick.sheds() {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// This cluster's identity for [`reentry`].
    pub(crate) fn cluster_id(&self) -> usize {
        reentry::cluster_of(&*self.handler)
    }

    fn stripe(&self, key: &[u8]) -> &Mutex<Stripe> {
        &self.stripes[stripe_of(key)]
    }

    /// Holds every stripe: no request is between its append and its queue (though some
    /// may still wait to be durable: see [`Stripe::appended_end`]). Counted as
    /// a change under way from before the first stripe is taken until after the last
    /// is given back.
    fn exclusive(&self) -> Exclusive<'_> {
        self.changes.under_way.fetch_add(1, Ordering::SeqCst);
        Exclusive {
            guards: self.stripes.iter().map(|s| s.lock()).collect(),
            changes: &self.changes,
        }
    }

    /// `stripe`'s lock, as [`poll_lock`](Self::poll_lock) takes it; with no change under
    /// way the holder is a submit appending, and it is waited for.
    fn poll_stripe<'a>(
        &self,
        stripe: &'a Mutex<Stripe>,
        cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<MutexGuard<'a, Stripe>> {
        self.poll_lock(stripe, cx)
    }

    /// The routing lock, as [`poll_lock`](Self::poll_lock) takes it. For a poll that
    /// holds no stripe (a change holds the routing lock at times while it holds every
    /// stripe: for a placement change, a rebalance over every key, key moves).
    fn poll_routing(
        &self,
        cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<MutexGuard<'_, Routing<H::State, H::Response>>> {
        self.poll_lock(&self.routing, cx)
    }

    /// `lock`, which a membership change holds at times. Without `cx`, waited for. With
    /// one (a future's poll), tried first: where a change is under way, the future waits
    /// for it as a future (`Pending`, `cx` woken when it ends); otherwise the holder
    /// holds it briefly, and it is waited for.
    fn poll_lock<'a, T>(
        &self,
        lock: &'a Mutex<T>,
        cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<MutexGuard<'a, T>> {
        let Some(cx) = cx else {
            return Poll::Ready(lock.lock());
        };
        if let Some(guard) = lock.try_lock() {
            return Poll::Ready(guard);
        }
        ready!(self.poll_changes_over(cx));
        Poll::Ready(lock.lock())
    }

    /// `Ready` when no membership change is under way; otherwise `Pending`, `cx` woken
    /// when one ends. For a future that found its stripe taken (which a change does),
    /// or routing half changed (which only a change shows), and must not wait on a
    /// stripe lock in its poll.
    fn poll_changes_over(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.changes.under_way.load(Ordering::SeqCst) == 0 {
            return Poll::Ready(());
        }
        {
            // Once per task: a future polled again and again (in a `select!`, say)
            // during a long change must not grow the list.
            let mut waiting = self.changes.waiting.lock();
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
        }
        // A change that ended before the waker was in the list woke nobody.
        if self.changes.under_way.load(Ordering::SeqCst) == 0 {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Changes the placement (adds or removes an instance) and publishes its epoch. The
    /// caller holds every stripe (`_all`, from [`exclusive`](Self::exclusive)).
    fn change_placement(
        &self,
        _all: &[MutexGuard<'_, Stripe>],
        change: impl FnOnce(&mut dyn placement::Placement) -> Result<()>,
    ) -> Result<()> {
        let mut routing = self.routing.lock();
        let changed = change(&mut *routing.placement);
        self.placement_epoch
            .store(routing.placement.epoch(), Ordering::Release);
        changed
    }

    /// Works out a membership change on a copy of the placement's table, before the
    /// change takes every stripe: repairing the matching takes tens of milliseconds on
    /// the default 2^16 slots, which submits would otherwise wait out. Drafting
    /// takes none of the locks submits take. `None` if the change is refused (the
    /// change then meets the same refusal under the stripes).
    fn prepare_placement(&self, change: impl FnOnce(&mut Draft) -> Result<()>) -> Option<Prepared> {
        let mut draft = self.slot_router.draft();
        change(&mut draft).ok()?;
        Some(draft.finish())
    }

    /// Drafts [`lose`](Self::lose)'s change for `id`: it leaves, and a replacement of
    /// its `weight` joins under the next id.
    fn prepare_replacement(&self, id: InstanceId, weight: u32) -> Option<DraftedReplacement> {
        let replacement = InstanceId(self.next_id.load(Ordering::SeqCst));
        let prepared = self.prepare_placement(|draft| {
            draft.remove(id)?;
            draft.add(replacement, weight)
        })?;
        Some(DraftedReplacement {
            replacement,
            prepared,
        })
    }

    fn start_instance(&self, id: InstanceId, weight: u32, start: Start) -> Result<Arc<Inst<H>>> {
        let inst = Arc::new(Instance::new(
            id,
            weight,
            self.options.queue_capacity,
            self.options.linger,
        ));
        self.checkpoint_cache
            .lock()
            .pins
            .push((inst.pinned.clone(), inst.fenced.clone()));
        self.routing.lock().instances.insert(id, inst.clone());
        if let Err(e) = self.launch(&inst, start) {
            // No thread runs it: a member left behind would be routed to, and would owe
            // every checkpoint round a part it never gives.
            self.routing.lock().instances.remove(&id);
            return Err(e);
        }
        Ok(inst)
    }

    fn launch(&self, inst: &Arc<Inst<H>>, start: Start) -> Result<()> {
        let shared = self.arc();
        let me = inst.clone();
        // Held across the launch: a new loop that restarts at once must not have its
        // handle overwritten by ours.
        let mut slot = inst.running.lock();
        let running = self.launcher.launch(
            inst.id,
            Box::new(move || {
                if let Exit::Restart {
                    limits,
                    unavailable,
                } = instance::run(&shared, &me, start)
                {
                    shared.restart(&me, limits, unavailable);
                }
            }),
        )?;
        *slot = Some(running);
        Ok(())
    }

    /// Relaunches an instance whose handler panicked, rebuilding its keys first. While
    /// the cluster stops, too: the new loop handles what the old one left, then stops,
    /// and shutdown waits for it (it looks for a newer loop after each one ends).
    fn restart(
        &self,
        inst: &Arc<Inst<H>>,
        limits: HashMap<Bytes, Offset, ahash::RandomState>,
        unavailable: Unavailable,
    ) {
        if inst.is_fenced() {
            return;
        }
        inst.stats.restarts.fetch_add(1, Ordering::Relaxed);
        let start = Start::Restore {
            limits,
            checkpoint: None,
            unavailable,
        };
        if let Err(e) = self.launch(inst, start) {
            tracing::error!(instance = %inst.id, error = %e, "could not restart instance");
            if self.stopping.load(Ordering::SeqCst) {
                // Nobody takes its keys over any more.
                leave_behind(inst);
            } else {
                self.lose(inst.id, "could not be restarted");
            }
        }
    }

    fn journal(&self, control: &Control) -> Result<Offset> {
        let payload = fold::control_payload(control)?;
        Ok(self.input.append(&[Entry::new(b"", &payload)])?.start)
    }

    /// The latest checkpoint, decoded (shared with any rebuild that holds it already),
    /// for a rebuild that folds from it: `pin` (the instance's) is set to its offset
    /// under the lock a checkpoint takes to find the oldest pinned one, so a checkpoint
    /// completing meanwhile either sees the pin or is the one handed out.
    pub(crate) fn checkpoint_for(&self, pin: &AtomicU64) -> Result<Arc<Checkpoint>> {
        let mut cache = self.checkpoint_cache.lock();
        let checkpoint = self.latest_checkpoint(&mut cache)?;
        pin.store(checkpoint.offset, Ordering::SeqCst);
        Ok(checkpoint)
    }

    fn latest_checkpoint(&self, cache: &mut HandedCheckpoints) -> Result<Arc<Checkpoint>> {
        if let Some(cp) = cache.newest.upgrade()
            && cp.offset == self.checkpoint_offset.load(Ordering::SeqCst)
        {
            return Ok(cp);
        }
        let cp = Arc::new(if !self.checkpoint_in_store.load(Ordering::SeqCst) {
            // The log was checked to start at 0 at open: a head dropped since then
            // fails the replay rather than go missing from the states.
            Checkpoint::empty(0)
        } else {
            // The newest snapshot whose checks pass (an older one if the newest is
            // damaged: folding the log from further back gives the same states).
            match self.input.latest_snapshot(CHECKPOINT)? {
                Some(s) => Checkpoint::decode(s.offset, &s.blob)?,
                None => Checkpoint::empty(self.input.start_offset()),
            }
        });
        cache.newest = Arc::downgrade(&cp);
        Ok(cp)
    }

    pub(crate) fn poisoned(&self) -> BTreeSet<Offset> {
        self.poisoned.lock().clone()
    }

    /// Whether the request at `offset` was set aside (marked in the log: its handler
    /// panicked or stalled twice, or it did not decode). Since the last checkpoint the
    /// marks are in memory; before it, the log is read from `offset` on for one.
    pub(crate) fn is_set_aside(&self, offset: Offset) -> Result<bool> {
        {
            // Under the set's lock, which a checkpoint takes to drop the marks before it
            // after it published its offset.
            let poisoned = self.poisoned.lock();
            if poisoned.contains(&offset) {
                return Ok(true);
            }
            if offset >= self.checkpoint_offset.load(Ordering::SeqCst) {
                return Ok(false);
            }
        }
        let mut marked = false;
        let mut damage = None;
        self.input.replay_from(
            offset,
            &mut |at, entry| match fold::envelope_of(at, entry.payload) {
                Ok(Envelope::Control(Control::Poison { offset: o })) if o == offset => {
                    marked = true
                }
                Ok(_) => {}
                Err(e) => {
                    damage.get_or_insert(e);
                }
            },
        )?;
        match damage {
            Some(e) if !marked => Err(e),
            _ => Ok(marked),
        }
    }

    /// The offset before which every request was handled live when the cluster opened
    /// (see `fold::Replay::handled_before`).
    pub(crate) fn handled_before(&self) -> Offset {
        self.handled_before
    }

    /// Marks the request at `offset` as never to be applied again, durably (whatever
    /// the sync policy): call it before answering the request as panicked (or stalled
    /// twice), so that no replay after a crash applies a request its submitter was told
    /// was not applied.
    pub(crate) fn poison(&self, offset: Offset) -> Result<()> {
        self.poisoned.lock().insert(offset);
        let at = self.journal(&Control::Poison { offset })?;
        self.input.sync_until(at + 1)?;
        // It changed no state: a retry of it with its id is a new request (once the mark
        // is durable, so that no open applies the first one after all).
        self.recent_ids.lock().forget(offset);
        Ok(())
    }

    /// Answers the request at `offset` if it belonged to a lost instance and someone
    /// still waits for it.
    pub(crate) fn answer(&self, offset: Offset, result: Result<H::Response>) {
        if !self.any_orphans.load(Ordering::Acquire) && !self.any_retiring.load(Ordering::Acquire) {
            return;
        }
        let mut orphans = self.orphans.lock();
        match orphans.waiting.remove(&offset) {
            Some(o) => {
                drop(orphans);
                o.responder.answer(result);
            }
            None if self.any_retiring.load(Ordering::Acquire) => {
                orphans.early.insert(offset, result);
            }
            None => {}
        }
    }

    /// Keeps the responders of a lost instance's requests for whoever rebuilds them,
    /// and answers at once those a rebuild answered early, or failed ahead of it (see
    /// [`Orphans::early`], [`Orphans::failed_early`]). Returns the rest of what it left,
    /// to fence it with.
    fn adopt_orphans(&self, inst: &Inst<H>) -> Left<H::State, H::Response> {
        let mut left = inst.take_left();
        let unanswered = std::mem::take(&mut left.unanswered);
        if unanswered.is_empty() {
            return left;
        }
        // The request the instance was on is kept without its key (a copy per request
        // would cost the loop): the log says which it is.
        let mut keyed = Vec::with_capacity(unanswered.len());
        let mut refused = Vec::new();
        for (offset, key, responder) in unanswered {
            // The request it was on may be one it waited for to be durable, and the log
            // shows it only once it is.
            let key_at = |offset| {
                self.wait_logged(offset + 1)?;
                self.key_at(offset)
            };
            match key.map_or_else(|| key_at(offset), Ok) {
                Ok(key) => keyed.push((offset, key, responder)),
                // Its key's rebuild replays this very record, so it cannot be rebuilt
                // either while the log cannot be read there.
                Err(e) => refused.push((responder, unreadable(inst.id, offset, &e))),
            }
        }
        let mut answered_early = Vec::new();
        {
            let mut orphans = self.orphans.lock();
            for (offset, key, responder) in keyed {
                if let Some(result) = orphans.early.remove(&offset) {
                    answered_early.push((responder, result));
                } else if let Some(failed) = orphans
                    .failed_early
                    .get(key.as_slice())
                    .filter(|f| offset < f.until)
                {
                    refused.push((responder, failed.error(&key)));
                } else {
                    orphans.waiting.insert(offset, Orphan { key, responder });
                }
            }
            self.any_orphans
                .store(!orphans.waiting.is_empty(), Ordering::Release);
        }
        for (responder, result) in answered_early {
            responder.answer(result);
        }
        for (responder, error) in refused {
            responder.answer(Err(error));
        }
        left
    }

    /// The key of the request at `offset` in the input log.
    fn key_at(&self, offset: Offset) -> Result<Key> {
        fold::record_at(&*self.input, offset).map(|record| Key::copy_from(&record.key))
    }

    /// A rebuild of `keys` (each with the offset it was to rebuild up to) on `instance`
    /// failed for `cause`: the requests of lost instances it was to answer, those of
    /// these keys before their offsets, are answered [`Error::StateUnavailable`] now.
    /// Nothing else would answer them before the cluster stops.
    pub(crate) fn refuse_orphans(
        &self,
        instance: InstanceId,
        keys: &HashMap<Bytes, Offset, ahash::RandomState>,
        cause: &Arc<str>,
    ) {
        if keys.is_empty()
            || (!self.any_orphans.load(Ordering::Acquire)
                && !self.any_retiring.load(Ordering::Acquire))
        {
            return;
        }
        let failed = |key: &[u8]| RebuildFailed {
            instance,
            until: keys.get(key).copied().unwrap_or(0),
            cause: cause.clone(),
        };
        let refused: Vec<_> = {
            let mut orphans = self.orphans.lock();
            let offsets: Vec<Offset> = orphans
                .waiting
                .iter()
                .filter(|&(&offset, o)| keys.get(o.key.as_slice()).is_some_and(|&u| offset < u))
                .map(|(&offset, _)| offset)
                .collect();
            let refused = offsets
                .into_iter()
                .filter_map(|offset| orphans.waiting.remove(&offset))
                .map(|o| {
                    let error = failed(o.key.as_slice()).error(&o.key);
                    (o.responder, error)
                })
                .collect();
            if self.any_retiring.load(Ordering::Acquire) {
                // A retiring instance may still hold requests of these keys: if it is
                // lost in turn, they are refused as they are adopted.
                for key in keys.keys() {
                    orphans
                        .failed_early
                        .insert(Key::copy_from(key), failed(key));
                }
            }
            self.any_orphans
                .store(!orphans.waiting.is_empty(), Ordering::Release);
            refused
        };
        for (responder, error) in refused {
            responder.answer(Err(error));
        }
    }

    /// Notes whether any instance is retiring; with none, no early answer is needed.
    fn retiring_changed(&self, retiring: &[Arc<Inst<H>>]) {
        let any = !retiring.is_empty();
        self.any_retiring.store(any, Ordering::Release);
        if !any {
            let mut orphans = self.orphans.lock();
            orphans.early.clear();
            orphans.failed_early.clear();
        }
    }

    // ---- submit ----------------------------------------------------------------

    pub(crate) fn submit(
        &self,
        key: &[u8],
        request: &H::Request,
        block: bool,
    ) -> Result<Pending<H::Response>> {
        let payload = fold::Scratch::request(request)?;
        self.submit_encoded(key, &payload, block)
    }

    /// [`submit`](Self::submit) of an encoded request.
    pub(crate) fn submit_encoded(
        &self,
        key: &[u8],
        payload: &fold::Scratch,
        block: bool,
    ) -> Result<Pending<H::Response>> {
        let mut room = if block { Room::Wait } else { Room::Refuse };
        match self.submit_payload(key, payload.as_slice(), &mut room) {
            Poll::Ready(submitted) => submitted,
            // Only `Room::Poll` leaves a submit pending.
            Poll::Pending => Err(Error::Closed),
        }
    }

    /// Submits an encoded request; a full queue is handled as `room` says. `Pending`
    /// only with [`Room::Poll`], holding no permit (the waker is woken when there may be
    /// room).
    pub(crate) fn submit_payload(
        &self,
        key: &[u8],
        payload: &[u8],
        room: &mut Room<'_, '_>,
    ) -> Poll<Result<Pending<H::Response>>> {
        let logged = ready!(self.submit_from(key, payload, room, None, false));
        Poll::Ready(match logged {
            Ok(Submitted::Duplicate(id, offset)) => Err(self.duplicate(id, offset)),
            logged => logged
                .and_then(Submitted::logged)
                .and_then(|(p, waits)| self.durable(p, waits)),
        })
    }

    /// What a submit refused as a duplicate of the request logged at `offset` returns:
    /// [`Error::Duplicate`] once that request is durable, or the error that keeps it
    /// from being so (a failed fdatasync, reported to its own submit too). The wait is
    /// the first submit's: `Store::wait_appended`, at once for a store whose appends do
    /// not wait for the disk, and for a request known durable.
    pub(crate) fn duplicate(&self, id: RequestId, offset: Offset) -> Error {
        match self.wait_logged(offset + 1) {
            Ok(()) => Error::Duplicate { id, offset },
            Err(e) => e,
        }
    }

    /// `pending` once its request is durable (see [`Submitted::Logged`]; at once unless
    /// `waits`), or the error that keeps it from being so: a failed write or fdatasync,
    /// for which its instance, waiting for the same, refuses it too and applies nothing.
    pub(crate) fn durable<T>(&self, pending: Pending<T>, waits: bool) -> Result<Pending<T>> {
        if waits {
            self.wait_logged(pending.offset() + 1)?;
        }
        Ok(pending)
    }

    /// Waits until the requests logged before `end` are durable (see
    /// `Store::append_deferred`). A request's submitter and its instance both wait, and
    /// agree as the store answers alike for the same records (its contract: `Ok` if and
    /// only if they are durable). A success is remembered, and covers every offset
    /// before it; a failure is not (a later wait for records that were durable by then
    /// is still `Ok`).
    pub(crate) fn wait_logged(&self, end: Offset) -> Result<()> {
        if end <= self.logged_ok.load(Ordering::Acquire) {
            return Ok(());
        }
        self.store_waits.watch(|| self.input.wait_appended(end))?;
        self.logged_ok.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// [`submit_payload`](Self::submit_payload) in two steps, for a submit whose append
    /// must not run on the calling thread: `reserve` takes room in the queue of the
    /// instance the key routes to and returns it ([`Submitted::Room`]) without logging
    /// anything; a second call given that room (`held`) routes again, and logs and queues
    /// the request (taking room elsewhere if the key moved meanwhile).
    pub(crate) fn submit_from(
        &self,
        key: &[u8],
        payload: &[u8],
        room: &mut Room<'_, '_>,
        held: Option<Arc<Inst<H>>>,
        reserve: bool,
    ) -> Poll<Result<Submitted<H>>> {
        // The instance we hold a queue permit of, if any.
        let mut permit: Option<Arc<Inst<H>>> = held;
        let refused = match self.accepting.load(Ordering::SeqCst) {
            false => Err(Error::Closed),
            true => reentry::refuse_inside(self.cluster_id()),
        };
        if let Err(e) = refused {
            if let Some(p) = permit {
                p.permits.release();
            }
            return Poll::Ready(Err(e));
        }
        let timestamp = now();
        let hash = key_hash(key);
        let id = fold::request_id(payload);
        if reserve {
            if let Some(p) = permit {
                p.permits.release();
            }
            // A retry of a request known durable is refused before it takes room (the
            // check that counts is the appender thread's, under the key's stripe).
            if let Some(id) = id
                && let Some((offset, settled)) = self.recent_ids.lock().find_settled(key, id)
                && (settled || offset < self.logged_ok.load(Ordering::Acquire))
            {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(Ok(Submitted::Duplicate(id, offset)));
            }
            return self.reserve_room(key, hash, timestamp, room);
        }
        let stripe = &self.stripes[stripe_of_hash(hash)];
        loop {
            let Poll::Ready(mut holders) = self.poll_stripe(stripe, room.context()) else {
                if let Some(p) = permit {
                    p.permits.release();
                }
                return Poll::Pending;
            };
            if !self.accepting.load(Ordering::SeqCst) {
                if let Some(p) = permit {
                    p.permits.release();
                }
                return Poll::Ready(Err(Error::Closed));
            }
            // Under the key's stripe lock, which every submit of the key takes through
            // its append: no other submit of this key and id can be between this check
            // and the append below. Checked again after a wait for room.
            let seen = id.and_then(|id| Some((id, self.recent_ids.lock().find(key, id)?)));
            if let Some((id, offset)) = seen {
                drop(holders);
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = permit {
                    p.permits.release();
                }
                // The first may still be on its way to the disk: the caller waits for it
                // after the stripe lock (`Shared::duplicate`), as the first submit does.
                return Poll::Ready(Ok(Submitted::Duplicate(id, offset)));
            }
            let mut routing = self.routing.lock();
            // Routed without counting the request: it is counted (and its key placed)
            // only once it has room in its instance's queue, under this same lock. A
            // submit refused for room, or a future dropped while it waits, leaves no
            // load and no placement behind. After waiting for room it is routed again:
            // membership may have changed meanwhile.
            let pick = routing.placement.pick(key, hash, timestamp);
            let dest = pick
                .as_ref()
                .and_then(|p| routing.instances.get(&p.instance()).cloned());
            let (Some(pick), Some(dest)) = (pick, dest) else {
                if let Some(p) = permit {
                    p.permits.release();
                }
                return Poll::Ready(Err(Error::NoInstance));
            };
            if permit.as_ref().is_none_or(|p| p.id != dest.id) {
                if let Some(p) = permit.take() {
                    p.permits.release();
                }
                match dest.permits.acquire(false) {
                    Ok(()) => {}
                    Err(NoPermit::Retired) => unreachable_retired(),
                    Err(NoPermit::Busy) => {
                        // Wait for room holding no lock, then route again: the key may
                        // have moved meanwhile.
                        drop(routing);
                        drop(holders);
                        let took = ready!(room.wait_in(&dest))?;
                        if took {
                            permit = Some(dest);
                        }
                        continue;
                    }
                }
            }
            // Counted even if the append below fails: the placement cannot take a count
            // back (its window may have dropped an older request for it). A failed
            // append is rare, and a key it placed just stays there.
            self.count_shed(&pick);
            routing.placement.count(pick, key, hash);
            drop(routing);
            // The key's holder before this request: `None` if it had none.
            let before = placement::hold(&mut holders, key, dest.id);
            let moved_from = before.filter(|&h| h != dest.id);
            // Deferred: the wait for the disk (an fdatasync under `SyncPolicy::Always`)
            // comes after the stripe lock is released, so that the submits of one stripe
            // (a hot key's) share a group commit instead of syncing one after another.
            // The request is queued before it is durable; its instance waits for that
            // before handling it (see `instance::handle`).
            let appended = unwinding_undoes(
                || {
                    stripe.watch_store(|| {
                        self.input
                            .append_deferred(&[Entry::with_timestamp(timestamp, key, payload)])
                    })
                },
                || {
                    placement::unhold(&mut holders, key, before);
                    dest.permits.release();
                },
            );
            let (offset, waits) = match appended {
                Ok(appended) => (appended.offsets.start, appended.pending),
                Err(e) => {
                    placement::unhold(&mut holders, key, before);
                    dest.permits.release();
                    return Poll::Ready(Err(e));
                }
            };
            holders.appended_end = offset + 1;
            if let Some(id) = id {
                self.recent_ids.lock().insert(key, id, offset, !waits);
            }
            if let Some(from) = moved_from {
                let key = Bytes::copy_from_slice(key);
                self.move_keys(&Moves::single(from, dest.id, key), offset, None);
            }
            let (pending, responder) = pending(offset);
            dest.send_requests(Some(Message::Request(Queued {
                offset,
                timestamp,
                key: QueuedBytes::copy_from(key),
                payload: QueuedBytes::copy_from(payload),
                submitted: instance::sampled(offset).then(Instant::now),
                responder: Some(responder),
                durable: !waits,
            })));
            // A lingering instance is nudged when the submitter is about to block on the
            // answer; this moves our reference to it. One that does not linger needs no
            // nudge, and the waiter then touches nothing of the instance's.
            if !self.options.linger.is_zero() {
                pending.set_answerer(dest);
            }
            // Logged, and not waited for yet: see `Submitted::Logged`.
            return Poll::Ready(Ok(Submitted::Logged(pending, waits)));
        }
    }

    /// The first step of [`submit_from`](Self::submit_from) with `reserve`: room in the
    /// queue of the instance `key` routes to now. Takes the routing lock only, never the
    /// key's stripe lock, which an appender thread holds through its append (which can
    /// run an fdatasync under `SyncPolicy::Every`): a future polled on an executor's
    /// thread must not wait for that.
    fn reserve_room(
        &self,
        key: &[u8],
        hash: u64,
        timestamp: u64,
        room: &mut Room<'_, '_>,
    ) -> Poll<Result<Submitted<H>>> {
        let route = |routing: &mut Routing<H::State, H::Response>| {
            let pick = routing.placement.pick(key, hash, timestamp);
            pick.and_then(|p| routing.instances.get(&p.instance()).cloned())
        };
        loop {
            if !self.accepting.load(Ordering::SeqCst) {
                return Poll::Ready(Err(Error::Closed));
            }
            // Holding no stripe, this poll can meet a membership change holding the
            // routing lock (for as long as a rebalance over every key takes): it waits
            // for the change as a future.
            let routed = route(&mut *ready!(self.poll_routing(room.context())));
            let dest = match routed {
                Some(dest) => dest,
                None => {
                    // Without a stripe lock, routing can see a membership change half
                    // done (an instance gone from the table and not yet from the
                    // placement, or no instance between a lost one and its
                    // replacement). A change holds every stripe: under the key's, route
                    // again.
                    let stripe = &self.stripes[stripe_of_hash(hash)];
                    let guard = ready!(self.poll_stripe(stripe, room.context()));
                    // Under the stripe no change is under way: the routing lock is
                    // held briefly, by submits.
                    let dest = route(&mut self.routing.lock());
                    drop(guard);
                    match dest {
                        Some(dest) => dest,
                        None => return Poll::Ready(Err(Error::NoInstance)),
                    }
                }
            };
            let took = match dest.permits.acquire(false) {
                Ok(()) => true,
                // Lost since the pick (it leaves the table before it is retired): pick
                // again.
                Err(NoPermit::Retired) => false,
                Err(NoPermit::Busy) => ready!(room.wait_in(&dest))?,
            };
            if took {
                return Poll::Ready(Ok(Submitted::Room(dest)));
            }
        }
    }

    /// Whether a submit's append must not run on an async executor's thread: the input
    /// log's appends wait for the disk.
    pub(crate) fn appends_elsewhere(&self) -> bool {
        self.input.append_waits_for_disk()
    }

    /// Hands the second step of a submit that took room in `dest`'s queue (see
    /// [`submit_from`](Self::submit_from)) to an appender thread. The answer resolves
    /// once the request is logged and queued, or to why it was not. Dropped before the
    /// thread gets to it, nothing is logged.
    ///
    /// The key may route elsewhere by then (the keys counted since moved its pick, or
    /// membership changed). If that queue is full, the room is given back and the
    /// submit comes back ([`Appended::Busy`]) to wait for room there as a future: an
    /// appender thread never waits for room (the futures queued behind it may hold it),
    /// and never takes room beyond a queue's capacity.
    pub(crate) fn append_elsewhere(
        self: &Arc<Self>,
        key: Vec<u8>,
        payload: fold::Scratch,
        range: Range<usize>,
        dest: Arc<Inst<H>>,
    ) -> Pending<Appended<H>> {
        let (answer, responder) = pending::<Appended<H>>(0);
        let shared = self.clone();
        self.run_append(Box::new(move |finishes: &mut Finishes| {
            if responder.is_abandoned() {
                dest.permits.release();
                return;
            }
            let Some(body) = payload.as_slice().get(range.clone()) else {
                dest.permits.release();
                responder.answer(Err(lost_payload()));
                return;
            };
            let logged = catch_store_panic(false, || {
                match shared.submit_from(&key, body, &mut Room::Refuse, Some(dest), false) {
                    Poll::Ready(logged) => logged,
                    // Only `Room::Poll` leaves a submit pending.
                    Poll::Pending => Err(Error::Closed),
                }
            });
            let answer = match logged {
                // As for a logged request, the wait for the disk comes after the
                // thread's other appends.
                Ok(Submitted::Duplicate(id, offset)) => {
                    finishes.push(Box::new(move || {
                        let refused = catch_store_panic(true, || Err(shared.duplicate(id, offset)));
                        responder.answer(refused);
                    }));
                    return;
                }
                Ok(logged) => match logged.logged() {
                    // The wait for the disk comes after the thread's other appends
                    // (see `Finishes`).
                    Ok((pending, waits)) => {
                        finishes.push(Box::new(move || {
                            let durable =
                                catch_store_panic(true, || shared.durable(pending, waits));
                            responder.answer(durable.map(Appended::Logged));
                        }));
                        return;
                    }
                    Err(e) => Err(e),
                },
                Err(Error::Busy { instance, .. }) => Ok(Appended::Busy {
                    instance,
                    key,
                    payload,
                }),
                Err(e) => Err(e),
            };
            responder.answer(answer);
        }));
        answer
    }

    /// Room in the queue of instance `id`, as a future; `Ready(None)` if it is no
    /// longer a member (route again).
    pub(crate) fn poll_room_in(
        &self,
        id: InstanceId,
        cx: &mut std::task::Context<'_>,
        registration: &mut Registration,
    ) -> Poll<Option<Arc<Inst<H>>>> {
        let inst = ready!(self.poll_routing(Some(&mut *cx)))
            .instances
            .get(&id)
            .cloned();
        let Some(inst) = inst else {
            return Poll::Ready(None);
        };
        match inst.permits.poll_acquire(cx, registration) {
            Poll::Ready(Ok(())) => Poll::Ready(Some(inst)),
            Poll::Ready(Err(_)) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// [`append_elsewhere`](Self::append_elsewhere) for a batch whose room `progress`
    /// holds (see [`poll_batch_room`](Self::poll_batch_room)). A batch that must be
    /// routed again (a key with no live instance under the stripe locks) comes back
    /// whole, its room given back, for the future to take room again: an appender
    /// thread never waits for room.
    pub(crate) fn append_batch_elsewhere(
        self: &Arc<Self>,
        items: Vec<(Vec<u8>, Range<usize>)>,
        payloads: fold::Scratch,
        mut progress: BatchProgress<H>,
    ) -> Pending<BatchAppended<H>> {
        let (answer, responder) = pending::<BatchAppended<H>>(0);
        let shared = self.clone();
        self.run_append(Box::new(move |finishes: &mut Finishes| {
            if responder.is_abandoned() {
                // Dropping the progress gives its room back.
                return;
            }
            let payload_bytes = payloads.as_slice();
            let logged = catch_store_panic(false, || {
                match shared.submit_batch_unwaited(&items, payload_bytes, &mut progress, None) {
                    Poll::Ready(logged) => logged,
                    // Only a poll with a context is left pending.
                    Poll::Pending => Err(Error::Closed),
                }
            });
            match logged {
                // The wait for the disk comes after the thread's other appends (see
                // `Finishes`), as a single submit's does.
                Ok(Some((pendings, waits))) => {
                    finishes.push(Box::new(move || {
                        let durable =
                            catch_store_panic(true, || shared.batch_durable(pendings, waits));
                        responder.answer(durable.map(BatchAppended::Logged));
                    }));
                }
                Ok(None) => {
                    responder.answer(Ok(BatchAppended::Again(items, payloads)));
                }
                Err(e) => {
                    responder.answer(Err(e));
                }
            }
        }));
        answer
    }

    /// Answers [`Error::QueryStalled`] for each watched query (see [`WatchedQuery`]) that
    /// runs past the stall timeout; forgets those that ended.
    fn watch_queries(&self) {
        let mut watched = self.watched.lock();
        if watched.is_empty() {
            return;
        }
        for w in std::mem::take(&mut *watched) {
            if w.heartbeat.sample() != w.unit {
                continue;
            }
            if w.since.elapsed() < self.options.stall_timeout {
                watched.push(w);
                continue;
            }
            (w.answer)(Error::QueryStalled {
                instance: w.instance,
                key: query::key_name(w.key.as_slice()),
                stall_timeout: self.options.stall_timeout,
            });
        }
    }

    /// Looks at the calls into the input store: one that has run past the stall
    /// timeout (an append under a stripe, which every submit of that stripe's keys then
    /// waits behind; or a wait for appends to be durable, which the submits and the
    /// instances waiting for those records wait behind) is reported once, as a
    /// warning and in [`Metrics::store_stalls`](super::Metrics::store_stalls), and
    /// [`Metrics::store_stalled_for`](super::Metrics::store_stalled_for) says how long
    /// it has run until it returns. Nothing is replaced: a store is not an instance.
    fn watch_store(&self) {
        let now = Instant::now();
        let mut watch = self.store_watch.lock();
        let watch = &mut *watch;
        watch.stripes.resize(self.stripes.len(), (0, None));
        let mut longest = Duration::ZERO;
        // A count seen odd twice, unchanged: the call that began then still runs.
        let mut look = |seen: &mut (u64, Option<Instant>), count: u64, running: bool| {
            if !running {
                *seen = (count, None);
            } else if seen.0 != count || seen.1.is_none() {
                *seen = (count, Some(now));
            } else if let Some(since) = seen.1 {
                longest = longest.max(now.saturating_duration_since(since));
            }
        };
        for (slot, seen) in self.stripes.iter().zip(watch.stripes.iter_mut()) {
            let (count, running) = slot.progress();
            look(seen, count, running);
        }
        let (ended, running) = self.store_waits.progress();
        look(&mut watch.waits_ended, ended, running);
        if longest >= self.options.stall_timeout {
            let ms = u64::try_from(longest.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            self.store_stalled_ms.store(ms, Ordering::Relaxed);
            if !watch.reported {
                watch.reported = true;
                self.store_stalls.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    busy_for = ?longest,
                    "a call into the input store has not returned within the stall timeout; \
                     the requests behind it wait"
                );
            }
        } else if watch.reported {
            watch.reported = false;
            self.store_stalled_ms.store(0, Ordering::Relaxed);
            tracing::info!("the input store answers again");
        }
    }

    /// Whether a call into the input store runs now (see [`watch_store`](Self::watch_store)).
    fn store_call_running(&self) -> bool {
        self.stripes.iter().any(|slot| slot.progress().1) || self.store_waits.progress().1
    }

    /// Whether to leave instance `id`, caught by a stall `busy_for` into a unit of work,
    /// to run on: yes if the unit replays a request that was answered (so that it keeps
    /// its place in every fold, and cannot be set aside as one stalled twice is) and
    /// whose replays stalled before. Replaced at every stall timeout, the instances
    /// replaying such a request would be replaced for good (a request that ran within
    /// the timeout live can replay slower on a loaded machine), and no checkpoint that
    /// would end the replays could complete. So each replacement it costs doubles the
    /// time the next replay of it is given: twice the stall timeout, then four times,
    /// up to 1,024 times; past that time the instance is replaced (in
    /// [`watch_patients`](Self::watch_patients)).
    fn be_patient(&self, id: InstanceId, busy_for: Duration) -> bool {
        if !self.any_stalled_once.load(Ordering::Acquire) {
            return false;
        }
        let Some(inst) = self.routing.lock().instances.get(&id).cloned() else {
            return false;
        };
        // The unit declared stalled, read before the offset it runs on: if the instance
        // moves on meanwhile, `stuck_on` says so, or the count below does.
        let Some(unit) = inst.heartbeat.stalled_unit() else {
            return false;
        };
        let Some(offset) = inst.stuck_on() else {
            return false;
        };
        let stalled_before = self.stalled_once.lock().contains(&offset);
        if !stalled_before || self.orphans.lock().waiting.contains_key(&offset) {
            return false;
        }
        let replaced = self.replay_stalls.lock().get(&offset).copied().unwrap_or(0);
        let allowance = self
            .options
            .stall_timeout
            .saturating_mul(1 << (replaced + 1).min(10));
        if busy_for >= allowance {
            *self.replay_stalls.lock().entry(offset).or_default() += 1;
            return false;
        }
        if inst.heartbeat.sample() != unit {
            // The replay ended while this looked: nothing to wait for, nobody to replace.
            return true;
        }
        tracing::warn!(
            instance = %id, offset, ?busy_for, ?allowance,
            "replaying an answered request past the stall timeout; given longer"
        );
        self.patient.lock().push(Patient {
            instance: id,
            heartbeat: inst.heartbeat.clone(),
            unit,
            offset,
            since: Instant::now()
                .checked_sub(busy_for)
                .unwrap_or_else(Instant::now),
            allowance,
        });
        true
    }

    /// Replaces the instances [`be_patient`](Self::be_patient) left to run whose replay
    /// outlasted the time it was given; forgets those that moved on.
    fn watch_patients(&self) {
        let due: Vec<(InstanceId, Offset, Duration)> = {
            let mut patient = self.patient.lock();
            if patient.is_empty() {
                return;
            }
            let mut due = Vec::new();
            patient.retain(|p| {
                if p.heartbeat.sample() != p.unit {
                    return false;
                }
                let busy_for = p.since.elapsed();
                if busy_for < p.allowance {
                    return true;
                }
                due.push((p.instance, p.offset, busy_for));
                false
            });
            due
        };
        for (id, offset, busy_for) in due {
            *self.replay_stalls.lock().entry(offset).or_default() += 1;
            tracing::warn!(instance = %id, offset, ?busy_for, "instance stalled replaying an answered request");
            self.lose(id, "stalled");
        }
    }

    /// Runs `job` on an appender thread; here if none can take it (the cluster is
    /// stopping, and the append finds it closed; or no thread could be started).
    fn run_append(&self, job: Job) {
        if let Err((job, e)) = self.appenders.run(job) {
            if !matches!(e, Error::Closed) {
                tracing::warn!(error = %e, "running an async submit's append on the caller's thread");
            }
            let mut finishes = Finishes::new();
            job(&mut finishes);
            finishes.into_iter().for_each(|finish| finish());
        }
    }

    /// Queues a query of `key`'s state behind the key's requests on the instance that
    /// holds it (see [`Client::query`](super::Client::query)); a full queue is handled as
    /// `room` says. `query` is taken once the query is queued (or run); `Pending` only
    /// with [`Room::Poll`], holding no permit and leaving `query` in place.
    pub(crate) fn submit_query<T, F>(
        &self,
        key: &[u8],
        query: &mut Option<F>,
        room: &mut Room<'_, '_>,
    ) -> Poll<Result<Pending<T>>>
    where
        T: Send + 'static,
        F: FnOnce(&H::State) -> T + Send + 'static,
    {
        if !self.accepting.load(Ordering::SeqCst) {
            return Poll::Ready(Err(Error::Closed));
        }
        if let Err(e) = reentry::refuse_inside(self.cluster_id()) {
            return Poll::Ready(Err(e));
        }
        let stripe = self.stripe(key);
        // The instance we hold a queue permit of, if any.
        let mut permit: Option<Arc<Inst<H>>> = None;
        let release = |permit: Option<Arc<Inst<H>>>| {
            if let Some(p) = permit {
                p.permits.release();
            }
        };
        loop {
            // An appender thread (or a blocking submit) holds the key's stripe through
            // its append (a copy into the log's buffer; an fdatasync for the append that
            // reaches `SyncPolicy::Every`'s count): a poll waits for it here. Trying the
            // lock and polling again instead never got in on a key that appends kept
            // busy (the lock passes from one appender to the next). A membership change
            // holding every stripe is waited for as a future.
            let Poll::Ready(holders) = self.poll_stripe(stripe, room.context()) else {
                release(permit);
                return Poll::Pending;
            };
            if !self.accepting.load(Ordering::SeqCst) {
                release(permit);
                return Poll::Ready(Err(Error::Closed));
            }
            // Read under the stripe lock: every request of the key before it is queued
            // to the key's holder already, and every later one will be queued after
            // this query. (Past the log's visible end if submits under this stripe
            // still wait for their records to be durable: see `Stripe::appended_end`.)
            let at = self.input.next_offset().max(holders.appended_end);
            let Some(&holder) = holders.get(key) else {
                // No request of the key was ever logged: its state is the default one,
                // read here rather than on an instance.
                drop(holders);
                release(permit);
                let Some(query) = query.take() else {
                    return Poll::Ready(Err(Error::Closed));
                };
                let (pending, responder) = pending(at);
                let _running = reentry::enter(self.cluster_id(), None, None);
                Box::new(Asked::new(key, at, query, responder)).run(&H::State::default(), None);
                return Poll::Ready(Ok(pending));
            };
            let Some(dest) = self.routing.lock().instances.get(&holder).cloned() else {
                // Only a membership change that failed half-way leaves a key held by an
                // instance that left.
                release(permit);
                return Poll::Ready(Err(Error::NoInstance));
            };
            if permit.as_ref().is_none_or(|p| p.id != dest.id) {
                release(permit.take());
                match dest.permits.acquire(false) {
                    Ok(()) => {}
                    Err(NoPermit::Retired) => {
                        unreachable_retired();
                        return Poll::Ready(Err(Error::NoInstance));
                    }
                    Err(NoPermit::Busy) => {
                        // Wait for room holding no lock, then look again: the key may
                        // have moved meanwhile.
                        drop(holders);
                        let took = ready!(room.wait_in(&dest))?;
                        if took {
                            permit = Some(dest);
                        }
                        continue;
                    }
                }
            }
            let Some(query) = query.take() else {
                dest.permits.release();
                return Poll::Ready(Err(Error::Closed));
            };
            let (pending, responder) = pending(at);
            dest.send_requests(Some(Message::Query(Box::new(Asked::new(
                key, at, query, responder,
            )))));
            drop(holders);
            if !self.options.linger.is_zero() {
                pending.set_answerer(dest);
            }
            return Poll::Ready(Ok(pending));
        }
    }

    /// Queues again a query that an instance lost before running it, to the instance
    /// that holds its key now. It had room in the lost one's queue: it takes room in
    /// the new one's even when full (at most a queue's worth of queries overshoot).
    pub(crate) fn route_query_again(&self, ask: Box<dyn Ask<H::State>>) {
        let holders = self.stripe(ask.key()).lock();
        self.route_query_locked(&holders, ask);
    }

    /// [`route_query_again`](Self::route_query_again), with the key's stripe held.
    fn route_query_locked(&self, holders: &Stripe, mut ask: Box<dyn Ask<H::State>>) {
        if !self.accepting.load(Ordering::SeqCst) {
            return ask.refuse(Error::Closed);
        }
        // Every request of the key logged so far is queued to its holder before this
        // query: a rebuild of the key for it must fold them all, not stop at the offset
        // it was made at (requests refused meanwhile would be lost from the state).
        ask.set_until(self.input.next_offset().max(holders.appended_end));
        let dest = holders
            .get(ask.key())
            .and_then(|h| self.routing.lock().instances.get(h).cloned());
        match dest {
            Some(dest) => {
                dest.permits.force();
                dest.send(Message::Query(ask));
            }
            None => ask.refuse(Error::NoInstance),
        }
    }

    /// Submits several requests as one: one routing pass, one log batch, one hand-off
    /// per instance. `items` are keys and the ranges of their encoded payloads in
    /// `payloads`.
    pub(crate) fn submit_batch<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        payloads: &[u8],
    ) -> Result<Vec<Pending<H::Response>>> {
        let mut progress = BatchProgress::default();
        match self.poll_submit_batch(items, payloads, &mut progress, None) {
            Poll::Ready(submitted) => submitted,
            // Only a poll with a context leaves a batch pending.
            Poll::Pending => Err(Error::Closed),
        }
    }

    /// Routes a batch (`items`: keys, and the ranges of their encoded payloads in
    /// `payloads`), takes its room in the queues and submits it. Without a context it
    /// waits for room, blocking the thread; with one it returns `Pending` when a queue is
    /// full, keeping in `progress` the routing and the room taken so far (a later poll
    /// goes on from there; dropping `progress` gives the room back).
    pub(crate) fn poll_submit_batch<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        payloads: &[u8],
        progress: &mut BatchProgress<H>,
        mut cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<Result<Vec<Pending<H::Response>>>> {
        if items.is_empty() {
            return Poll::Ready(Ok(Vec::new()));
        }
        if let Err(e) = reentry::refuse_inside(self.cluster_id()) {
            return Poll::Ready(Err(e));
        }
        if let [(key, payload)] = items
            && fold::request_id(&payloads[payload.clone()]).is_none()
        {
            // A batch of one is a single request, and the single path is cheaper: it
            // routes under the key's stripe and allocates no batch bookkeeping (a batch
            // of one ran at 0.73 times the rate of `submit`). Not with an id: a batch's
            // duplicate resolves its pending, where a single submit's is refused.
            let mut room = match cx {
                None => Room::Wait,
                Some(cx) => Room::Poll(cx, &mut progress.registration),
            };
            let payload = &payloads[payload.clone()];
            return self
                .submit_payload(key.as_ref(), payload, &mut room)
                .map(|submitted| submitted.map(|pending| vec![pending]));
        }
        loop {
            if let Err(e) = ready!(self.poll_batch_room(items, progress, cx.as_deref_mut())) {
                return Poll::Ready(Err(e));
            }
            match ready!(self.submit_batch_held(items, payloads, progress, cx.as_deref_mut())) {
                Ok(Some(pendings)) => return Poll::Ready(Ok(pendings)),
                Ok(None) => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Logs and queues a batch with the room `progress` holds (see
    /// [`poll_batch_room`](Self::poll_batch_room)); `None` if it must be routed again
    /// (its room was given back).
    ///
    /// With `cx`, the batch's stripes are taken in the poll: where a membership change
    /// holds them, the future waits for it as a future (`Pending`, keeping its room).
    fn submit_batch_held<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        payloads: &[u8],
        progress: &mut BatchProgress<H>,
        cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<BatchLogged<H>> {
        let logged = ready!(self.submit_batch_unwaited(items, payloads, progress, cx));
        // The stripes are released: wait for the batch to be durable (see `submit_from`).
        Poll::Ready(logged.and_then(|logged| match logged {
            Some((pendings, waits)) => self.batch_durable(pendings, waits).map(Some),
            None => Ok(None),
        }))
    }

    /// A batch's `pendings` once its requests are durable (at once unless `waits`): see
    /// [`durable`](Self::durable).
    fn batch_durable(
        &self,
        pendings: Vec<Pending<H::Response>>,
        waits: bool,
    ) -> Result<Vec<Pending<H::Response>>> {
        // The furthest offset: the batch's last record, or a duplicate's first request.
        if let (true, Some(end)) = (waits, pendings.iter().map(Pending::offset).max()) {
            self.wait_logged(end + 1)?;
        }
        Ok(pendings)
    }

    /// [`submit_batch_held`](Self::submit_batch_held) without the wait for the batch to be
    /// durable: the pendings, and whether that wait is still to come.
    fn submit_batch_unwaited<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        payloads: &[u8],
        progress: &mut BatchProgress<H>,
        cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<Result<Option<LockedBatch<H>>>> {
        let BatchProgress {
            stamp,
            held,
            waited_for_change,
            ..
        } = progress;
        let Some(stamp) = stamp.as_ref() else {
            return Poll::Ready(Ok(None));
        };
        let stripes = ready!(self.lock_stripes(&stamp.hashes, cx, waited_for_change));
        let Some(mut full) = held.take() else {
            return Poll::Ready(Ok(None));
        };
        // From here `submit_batch_locked` owns the room: it queues it, or gives it back
        // (also when the store panics in its append, to the instances the batch goes to
        // then), so `full` must not give it back again as it is dropped.
        full.taken = 0;
        Poll::Ready(self.submit_batch_locked(
            items,
            &stamp.hashes,
            payloads,
            &mut full.routed,
            stamp.timestamp,
            stripes,
        ))
    }

    /// Every stripe of the keys with `hashes`, locked in ascending order (the order
    /// every multi-stripe lock takes), with that order. Without `cx` it waits for each;
    /// with one it tries each first, and where a membership change holds one, gives
    /// back those it took and waits for the change as a future (`waited` records how
    /// many changes had ended then). (With no change under way, the holder is a submit
    /// appending: it waits for that.)
    ///
    /// For one change only: a batch over many stripes, woken when a change ends, races
    /// the next change for the same stripes in the same order, and loses while changes
    /// follow each other (a loop of them kept one out for good). So once a change has
    /// ended since it began to wait, the change that holds its stripes then (one that
    /// was queued for them already, or a new one) is waited for in the poll, in the
    /// stripes' queue, as a blocking batch does. (Polled again before the change it
    /// waits for ends, it waits as a future again.)
    fn lock_stripes(
        &self,
        hashes: &[u64],
        cx: Option<&mut std::task::Context<'_>>,
        waited: &mut Option<u64>,
    ) -> Poll<Stripes<'_>> {
        let mut order: Vec<usize> = hashes.iter().map(|&h| stripe_of_hash(h)).collect();
        order.sort_unstable();
        order.dedup();
        let Some(cx) = cx else {
            let guards = order.iter().map(|&i| self.stripes[i].lock()).collect();
            return Poll::Ready(Stripes { order, guards });
        };
        let mut guards = Vec::with_capacity(order.len());
        for &i in &order {
            let guard = match self.stripes[i].try_lock() {
                Some(guard) => guard,
                None => {
                    let ended = self.changes.ended.load(Ordering::SeqCst);
                    match *waited {
                        Some(then) if then != ended => self.stripes[i].lock(),
                        _ => {
                            if self.poll_changes_over(cx).is_pending() {
                                waited.get_or_insert(ended);
                                return Poll::Pending;
                            }
                            self.stripes[i].lock()
                        }
                    }
                }
            };
            guards.push(guard);
        }
        Poll::Ready(Stripes { order, guards })
    }

    /// The first step of a batch submit of several requests: routes the batch and takes
    /// room for all of it, waiting (`cx` `None`: blocking) for room where queues are
    /// full. Once it is `Ready(Ok)`, `progress` holds the room of the whole batch.
    pub(crate) fn poll_batch_room<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        progress: &mut BatchProgress<H>,
        mut cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<Result<()>> {
        if let Err(e) = reentry::refuse_inside(self.cluster_id()) {
            return Poll::Ready(Err(e));
        }
        let BatchProgress {
            stamp,
            unroutable_at,
            held,
            registration,
            ..
        } = progress;
        let stamp = stamp.get_or_insert_with(|| Stamp {
            hashes: items.iter().map(|(k, _)| key_hash(k.as_ref())).collect(),
            timestamp: now(),
        });
        loop {
            if !self.accepting.load(Ordering::SeqCst) {
                *held = None;
                return Poll::Ready(Err(Error::Closed));
            }
            let taking = match held {
                Some(taking) => taking,
                None => {
                    match ready!(self.route_batch(items, stamp, unroutable_at, cx.as_deref_mut())) {
                        Ok(Some(routed)) => held.insert(routed),
                        Ok(None) => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            };
            // Room is taken in ascending instance order, all of an instance's at once: a
            // batch never holds room in one queue while it waits for another's that a
            // second batch holds while waiting for the first's.
            let mut retired = false;
            while taking.taken < taking.order.len() {
                let (d, n) = taking.order[taking.taken];
                let permits = &taking.routed.dests[d].permits;
                let took = match cx.as_deref_mut() {
                    None => permits.acquire_many(n).is_ok(),
                    Some(cx) => match permits.poll_acquire_many(n, cx, registration) {
                        Poll::Ready(took) => took.is_ok(),
                        Poll::Pending => return Poll::Pending,
                    },
                };
                if !took {
                    retired = true;
                    break;
                }
                taking.taken += 1;
            }
            if retired {
                // An instance retired meanwhile: give everything back and route again.
                *held = None;
                continue;
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// Routes every key of a batch (counting the loads). `None`: route again (a
    /// membership change was under way, and is over).
    fn route_batch<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        stamp: &Stamp,
        unroutable_at: &mut Option<crate::router::Epoch>,
        mut cx: Option<&mut std::task::Context<'_>>,
    ) -> Poll<Result<Option<Held<H>>>> {
        // `dests` holds each instance once; `dest_of[i]` is item i's.
        let (complete, routed) = {
            // Holding no stripe: a membership change may hold the routing lock, and a
            // future waits for it as a future.
            let mut routing = ready!(self.poll_routing(cx.as_deref_mut()));
            let mut routed = Routed {
                epoch: routing.placement.epoch(),
                dests: Vec::with_capacity(items.len().min(routing.instances.len())),
                dest_of: Vec::with_capacity(items.len()),
            };
            let mut complete = true;
            // Every key's first item and its destination, made at the first move of a
            // known key, if any.
            let mut seen: Option<HashMap<&[u8], usize, ahash::RandomState>> = None;
            for (i, ((key, _), &hash)) in items.iter().zip(&stamp.hashes).enumerate() {
                let key = key.as_ref();
                let pick = routing.placement.pick(key, hash, stamp.timestamp);
                let Some(pick) = pick.filter(|p| routing.instances.contains_key(&p.instance()))
                else {
                    complete = false;
                    break;
                };
                // A key's items all go where its first one goes: its requests in one
                // batch are handed out by instance after the handoffs are queued, so a
                // key moved between two of them (shed by an instance its first item
                // put over the cap) would be released before its first item is handled.
                // Such an item is counted where the key is (its first item's instance),
                // and the key moves at a later request.
                let earlier = match pick.moves_known_key() {
                    true => seen
                        .get_or_insert_with(|| {
                            let before = items[..i].iter().map(|(k, _)| k.as_ref());
                            before.zip(routed.dest_of.iter().copied()).rev().collect()
                        })
                        .get(key)
                        .copied(),
                    false => None,
                };
                let at = match earlier {
                    Some(at) => {
                        let kept = routing.placement.keep_in_place(pick);
                        if kept.instance() == routed.dests[at].id {
                            routing.placement.count(kept, key, hash);
                        }
                        at
                    }
                    None => {
                        self.count_shed(&pick);
                        let id = routing.placement.count(pick, key, hash);
                        match routing.instances.get(&id) {
                            Some(inst) => routed.index_of(inst),
                            None => {
                                complete = false;
                                break;
                            }
                        }
                    }
                };
                if let Some(seen) = &mut seen {
                    seen.entry(key).or_insert(at);
                }
                routed.dest_of.push(at);
            }
            (complete, routed)
        };
        if !complete {
            // Routing is taken without the stripe locks, so it can see a membership
            // change half done (an instance gone from the table, not yet from the
            // placement, or a lost one's replacement not yet in it). The change holds
            // every stripe lock: wait for it and route again. The same failure twice at
            // one epoch is no change under way.
            if *unroutable_at == Some(routed.epoch) {
                return Poll::Ready(Err(Error::NoInstance));
            }
            drop(ready!(self.poll_stripe(&self.stripes[0], cx)));
            *unroutable_at = Some(routed.epoch);
            return Poll::Ready(Ok(None));
        }
        // Waiting for room that this batch itself would have to free never ends: a
        // batch must fit in each queue.
        let mut order: Vec<(usize, usize)> = (0..routed.dests.len()).map(|d| (d, 0)).collect();
        routed.dest_of.iter().for_each(|&d| order[d].1 += 1);
        for &(d, requests) in &order {
            let inst = &routed.dests[d];
            if requests > inst.permits.capacity() {
                return Poll::Ready(Err(Error::BatchTooLarge {
                    instance: inst.id,
                    requests,
                    capacity: inst.permits.capacity(),
                }));
            }
        }
        order.sort_unstable_by_key(|&(d, _)| routed.dests[d].id);
        Poll::Ready(Ok(Some(Held {
            routed,
            order,
            taken: 0,
        })))
    }

    /// The requests of a batch already logged with their key and id, looked up before
    /// the batch is routed, so that they take no room in the queues and count no load:
    /// each one's id and first offset; empty if there are none. From a poll
    /// (`can_wait` false), only those whose first request is known durable, so that
    /// [`with_duplicates`](Self::with_duplicates) waits for nothing. The batch's own
    /// check, under its stripes, still catches the others.
    pub(crate) fn logged_already<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        payloads: &[u8],
        can_wait: bool,
    ) -> Vec<Option<(RequestId, Offset)>> {
        // A closed cluster refuses the whole batch, in its submit.
        if !self.accepting.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let Some(ids) = batch_ids(items, payloads) else {
            return Vec::new();
        };
        let recent = self.recent_ids.lock();
        let logged_ok = self.logged_ok.load(Ordering::Acquire);
        let known: Vec<Option<(RequestId, Offset)>> = items
            .iter()
            .zip(ids)
            .map(|((key, _), id)| {
                let id = id?;
                let (offset, settled) = recent.find_settled(key.as_ref(), id)?;
                (can_wait || settled || offset < logged_ok).then_some((id, offset))
            })
            .collect();
        let found = known.iter().flatten().count();
        if found == 0 {
            return Vec::new();
        }
        self.duplicates.fetch_add(found as u64, Ordering::Relaxed);
        known
    }

    /// The pendings of a batch whose `known` duplicates ([`logged_already`]) were taken
    /// out before it was submitted: `logged`'s, in order, with one resolved to
    /// [`Error::Duplicate`] in each duplicate's place. Waits first for the duplicates'
    /// first requests to be durable (at once for those known durable).
    ///
    /// [`logged_already`]: Self::logged_already
    pub(crate) fn with_duplicates(
        &self,
        logged: Vec<Pending<H::Response>>,
        known: &[Option<(RequestId, Offset)>],
    ) -> Result<Vec<Pending<H::Response>>> {
        if let Some(end) = known.iter().flatten().map(|&(_, offset)| offset).max() {
            self.wait_logged(end + 1)?;
        }
        let mut logged = logged.into_iter();
        known
            .iter()
            .map(|k| match *k {
                Some((id, offset)) => Ok(resolved_duplicate(id, offset)),
                // As many pendings as requests submitted: not reached.
                None => logged.next().ok_or(Error::Closed),
            })
            .collect()
    }

    /// Which requests of a batch repeat one already logged with the same key and id, or
    /// an earlier one of the batch; empty if no request of the batch has an id. Called
    /// under every stripe of the batch.
    fn batch_duplicates<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        payloads: &[u8],
    ) -> Vec<Option<BatchDup>> {
        let Some(ids) = batch_ids(items, payloads) else {
            return Vec::new();
        };
        let recent = self.recent_ids.lock();
        let mut firsts: HashMap<(&[u8], RequestId), usize, ahash::RandomState> =
            HashMap::with_capacity_and_hasher(items.len(), ahash::RandomState::new());
        items
            .iter()
            .zip(&ids)
            .enumerate()
            .map(|(i, ((key, _), id))| {
                let id = (*id)?;
                let key = key.as_ref();
                match recent.find(key, id) {
                    Some(offset) => Some(BatchDup::Logged(id, offset)),
                    None => match firsts.entry((key, id)) {
                        std::collections::hash_map::Entry::Occupied(first) => {
                            Some(BatchDup::InBatch(id, *first.get()))
                        }
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            slot.insert(i);
                            None
                        }
                    },
                }
            })
            .collect()
    }

    /// The part of `submit_batch` done under the keys' stripe locks (`hashes` are the
    /// items' key hashes); `None` if it must be routed again (the permits were given
    /// back).
    fn submit_batch_locked<K: AsRef<[u8]>>(
        &self,
        items: &[(K, Range<usize>)],
        hashes: &[u64],
        payloads: &[u8],
        batch: &mut Routed<H>,
        timestamp: u64,
        stripes: Stripes<'_>,
    ) -> Result<Option<LockedBatch<H>>> {
        let give_back = |batch: &Routed<H>| {
            (0..items.len()).for_each(|i| batch.dest(i).permits.release());
        };
        // Every stripe the batch touches, locked in ascending order.
        let Stripes { order, mut guards } = stripes;
        let shard_of = |i: usize| {
            order
                .binary_search(&stripe_of_hash(hashes[i]))
                .unwrap_or_default()
        };
        if !self.accepting.load(Ordering::SeqCst) {
            give_back(batch);
            return Err(Error::Closed);
        }
        // Membership may have changed before the stripes were ours; if it did not, every
        // instance routed to above is still live. A change holds every stripe, so under
        // ours the published epoch is current, and the routing lock is needed only if it
        // moved. (A key can still have moved between live instances meanwhile, placed
        // anew or shed by a busy instance: the holder change below moves its state to
        // where this batch sends it, behind the requests it was sent before.)
        if self.placement_epoch.load(Ordering::Acquire) != batch.epoch {
            let routing = self.routing.lock();
            for (i, (key, _)) in items.iter().enumerate() {
                let now = routing.placement.placement(key.as_ref());
                match now.and_then(|id| routing.instances.get(&id)) {
                    Some(inst) if inst.id == batch.dest(i).id => {}
                    Some(inst) => {
                        batch.dest(i).permits.release();
                        inst.permits.force();
                        batch.dest_of[i] = batch.index_of(inst);
                    }
                    None => {
                        drop(routing);
                        drop(guards);
                        give_back(batch);
                        return Ok(None);
                    }
                }
            }
        }
        // Requests with ids already logged, or given twice in this batch, are not logged
        // (under every stripe of the batch, as a single submit's check is under its
        // key's): their room is given back now, and their pendings resolve to
        // `Error::Duplicate`. Empty when no request of the batch has an id.
        let dups = self.batch_duplicates(items, payloads);
        let kept = |i: usize| dups.get(i).is_none_or(Option::is_none);
        for i in (0..items.len()).filter(|&i| !kept(i)) {
            batch.dest(i).permits.release();
        }
        // Each item's holder before it: to know what moves, and to undo.
        let mut previous = Vec::with_capacity(items.len());
        for (i, (key, _)) in items.iter().enumerate() {
            let dest = batch.dest(i).id;
            previous.push(if kept(i) {
                placement::hold(&mut guards[shard_of(i)], key.as_ref(), dest)
            } else {
                None
            });
        }
        let entries: Vec<Entry<'_>> = items
            .iter()
            .enumerate()
            .filter(|&(i, _)| kept(i))
            .map(|(_, (k, p))| Entry::with_timestamp(timestamp, k.as_ref(), &payloads[p.clone()]))
            .collect();
        // Undoes the holder changes, newest first, and gives the room back (to the
        // instances the batch goes to now: a membership change may have moved some of
        // its room since it was taken).
        let mut undo = |batch: &Routed<H>| {
            for (i, (key, _)) in items.iter().enumerate().rev().filter(|&(i, _)| kept(i)) {
                placement::unhold(&mut guards[shard_of(i)], key.as_ref(), previous[i]);
            }
            (0..items.len())
                .filter(|&i| kept(i))
                .for_each(|i| batch.dest(i).permits.release());
        };
        // Deferred, as a single submit's append (see `submit_from`): the caller waits for
        // the records to be durable once the stripes are released.
        // Watched on the first stripe: the supervisor needs one to see a call that hangs.
        let watched = &self.stripes[order.first().copied().unwrap_or_default()];
        let appended = if entries.is_empty() {
            // Every request a duplicate: nothing to log.
            Ok(Deferred {
                offsets: 0..0,
                pending: false,
            })
        } else {
            unwinding_undoes(
                || watched.watch_store(|| self.input.append_deferred(&entries)),
                || undo(batch),
            )
        };
        let range = match appended {
            Ok(range) => range,
            Err(e) => {
                undo(batch);
                return Err(e);
            }
        };
        let Deferred {
            offsets: range,
            pending: waits,
        } = range;
        // Each kept item's offset, in the order they were logged (without duplicates,
        // the batch's offsets in order: nothing to count or allocate).
        let mut offsets = Vec::new();
        if !dups.is_empty() {
            let found = dups.iter().flatten().count();
            self.duplicates.fetch_add(found as u64, Ordering::Relaxed);
            offsets.reserve(items.len());
            let mut next = range.start;
            for i in 0..items.len() {
                offsets.push(next);
                next += u64::from(kept(i));
            }
        }
        let base = range.start;
        let offset_of = |i: usize| offsets.get(i).copied().unwrap_or(base + i as Offset);
        for i in (0..items.len()).filter(|&i| kept(i)) {
            guards[shard_of(i)].appended_end = range.end;
        }
        for (i, before) in previous.iter().enumerate() {
            if let Some(from) = before.filter(|&h| h != batch.dest(i).id) {
                let key = Bytes::copy_from_slice(items[i].0.as_ref());
                let moves = Moves::single(from, batch.dest(i).id, key);
                self.move_keys(&moves, offset_of(i), None);
            }
        }
        if !dups.is_empty() {
            let mut recent = self.recent_ids.lock();
            for (i, (key, payload)) in items.iter().enumerate().filter(|&(i, _)| kept(i)) {
                if let Some(id) = fold::request_id(&payloads[payload.clone()]) {
                    recent.insert(key.as_ref(), id, offset_of(i), !waits);
                }
            }
        }
        let mut pendings = Vec::with_capacity(items.len());
        let mut messages = Vec::with_capacity(items.len());
        let mut answers = crate::client::pendings(range);
        for (i, (key, payload)) in items.iter().enumerate() {
            match dups.get(i).copied().flatten() {
                Some(dup) => {
                    let (id, offset) = match dup {
                        BatchDup::Logged(id, offset) => (id, offset),
                        BatchDup::InBatch(id, first) => (id, offset_of(first)),
                    };
                    pendings.push(resolved_duplicate(id, offset));
                    messages.push(None);
                }
                None => {
                    let Some((pending, responder)) = answers.next() else {
                        // As many answers as kept items: not reached.
                        return Err(Error::Closed);
                    };
                    let offset = pending.offset();
                    if !self.options.linger.is_zero() {
                        pending.set_answerer(batch.dest(i).clone());
                    }
                    pendings.push(pending);
                    messages.push(Some(Message::Request(Queued {
                        offset,
                        timestamp,
                        key: QueuedBytes::copy_from(key.as_ref()),
                        payload: QueuedBytes::copy_from(&payloads[payload.clone()]),
                        submitted: instance::sampled(offset).then(Instant::now),
                        responder: Some(responder),
                        durable: !waits,
                    })));
                }
            }
        }
        // A duplicate's first request may still be on its way to the disk: the batch
        // waits for it (see `batch_durable`), as a single retry does.
        let waits = waits || dups.iter().any(Option::is_some);
        // Each instance's requests are moved into its queue in log order, from the one
        // vector of the batch's messages: a vector per instance, allocated for each
        // batch, cost batches of 2 about 9% of their rate.
        if batch.dests.len() <= SCAN_PER_INSTANCE_UP_TO {
            // A pass over the batch per instance. (A re-placement can leave an instance
            // none.)
            for (d, inst) in batch.dests.iter().enumerate() {
                if !batch.dest_of.contains(&d) {
                    continue;
                }
                let mine = messages.iter_mut().zip(&batch.dest_of);
                inst.send_requests(
                    mine.filter(|&(_, &to)| to == d)
                        .filter_map(|(m, _)| m.take()),
                );
            }
        } else {
            // Items grouped by instance in one pass (a counting sort, which keeps each
            // instance's items in log order): `ends[d]` ends instance d's run.
            let mut ends = vec![0usize; batch.dests.len()];
            batch.dest_of.iter().for_each(|&d| ends[d] += 1);
            let mut at = 0;
            for end in &mut ends {
                at += *end;
                *end = at - *end;
            }
            let mut grouped = vec![0usize; items.len()];
            for (i, &d) in batch.dest_of.iter().enumerate() {
                grouped[ends[d]] = i;
                ends[d] += 1;
            }
            let mut start = 0;
            for (inst, &end) in batch.dests.iter().zip(&ends) {
                if start < end {
                    let run = &grouped[start..end];
                    inst.send_requests(run.iter().filter_map(|&i| messages[i].take()));
                }
                start = end;
            }
        }
        Ok(Some((pendings, waits)))
    }

    /// Queues the handoffs for `moves`: every `Release` first, then every `Acquire`.
    /// Records of the moved keys before `until` belong to the old holder.
    /// Keys whose holder is gone are rebuilt from the log, those in `relays` from the
    /// state on its way to that holder.
    fn move_keys(&self, moves: &Moves, until: Offset, relays: Option<&Arc<Relays<H::State>>>) {
        let routing = self.routing.lock();
        let instances = &routing.instances;
        let retiring = self.retiring.lock();
        let find = |id: InstanceId| {
            instances
                .get(&id)
                .or_else(|| retiring.iter().find(|i| i.id == id))
                // A lost instance whose work is fenced but whose loss waits for the
                // stripes still counts: its loss takes what is sent to it now.
                .filter(|i| !i.is_retired())
                .cloned()
        };
        let mut acquires = Vec::new();
        for (&(from, to), keys) in &moves.by_route {
            let source = match find(from) {
                Some(holder) => {
                    let handoff = Arc::new(Handoff::new(until));
                    holder.releases.lock().push(handoff.clone());
                    holder.send(Message::Release {
                        keys: keys.clone(),
                        handoff: handoff.clone(),
                    });
                    Source::Handoff(handoff)
                }
                None => Source::Rebuild {
                    until,
                    relays: relays.cloned().unwrap_or_default(),
                },
            };
            acquires.push((to, keys.clone(), source));
            self.moved.fetch_add(keys.len() as u64, Ordering::Relaxed);
        }
        for (to, keys, source) in acquires {
            match find(to) {
                Some(dest) => dest.send(Message::Acquire { keys, source }),
                None => tracing::error!(instance = %to, "keys moved to an instance that is gone"),
            }
        }
    }

    // ---- membership ---------------------------------------------------------------

    /// One past the last request logged, with every stripe held (`all`): past the log's
    /// visible end while submits still wait for their records to be durable (see
    /// [`Stripe::appended_end`]).
    fn logged_end(&self, all: &[MutexGuard<'_, Stripe>]) -> Offset {
        all.iter()
            .map(|s| s.appended_end)
            .fold(self.input.next_offset(), Offset::max)
    }

    fn rebalance_and_move(
        &self,
        all: &mut [MutexGuard<'_, Stripe>],
        relays: Relays<H::State>,
    ) -> Result<()> {
        let until = self.logged_end(all);
        let moves = self
            .routing
            .lock()
            .rebalance(all.iter_mut().map(|g| &mut g.holders));
        self.move_keys(&moves, until, Some(&Arc::new(relays)));
        Ok(())
    }

    pub(crate) fn add_instance(&self, weight: u32) -> Result<InstanceId> {
        if weight == 0 {
            // No id is taken, so none is named.
            return Err(Error::InvalidWeight {
                instance: None,
                weight,
            });
        }
        // The id it gets unless another change takes one first (then the prepared
        // table is dropped, and the change made under the stripes).
        let expected = InstanceId(self.next_id.load(Ordering::SeqCst));
        let prepared = self.prepare_placement(|draft| draft.add(expected, weight));
        let mut all = self.exclusive();
        // Refused once a shutdown began. One that begins during this change finds the
        // instance this adds: it takes every stripe, after this change, to list the
        // instances to stop.
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let id = InstanceId(self.next_id.fetch_add(1, Ordering::SeqCst));
        self.start_instance(id, weight, Start::Empty)?;
        let prepared = prepared.filter(|_| id == expected);
        self.change_placement(&all, |p| apply_or(p, prepared, |p| p.add(id, weight)))?;
        self.journal(&Control::Join { id: id.0, weight })?;
        self.rebalance_and_move(&mut all, Relays::default())?;
        Ok(id)
    }

    pub(crate) fn remove_instance(&self, id: InstanceId) -> Result<()> {
        let prepared = self.prepare_placement(|draft| draft.remove(id));
        let mut all = self.exclusive();
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let inst = {
            let mut routing = self.routing.lock();
            if !routing.instances.contains_key(&id) {
                return Err(Error::UnknownInstance(id));
            }
            if routing.instances.len() == 1 {
                return Err(Error::LastInstance(id));
            }
            routing
                .instances
                .remove(&id)
                .ok_or(Error::UnknownInstance(id))?
        };
        // It goes on with what it has queued: its requests count as gone once its loop
        // ends (see `tick`), and as retiring until then.
        {
            let mut retiring = self.retiring.lock();
            retiring.push(inst.clone());
            self.retiring_changed(&retiring);
        }
        inst.permits.retire();
        self.change_placement(&all, |p| apply_or(p, prepared, |p| p.remove(id)))?;
        self.journal(&Control::Leave { id: id.0 })?;
        self.rebalance_and_move(&mut all, Relays::default())?;
        inst.send(Message::Stop);
        Ok(())
    }

    /// Gives up on an instance (stalled, or its loop died): fences it, launches a
    /// replacement, and rebuilds its keys on their new owners.
    pub(crate) fn lose(&self, id: InstanceId, why: &str) {
        // The replacement's table is drafted before the stripes, as `add_instance`
        // drafts (one copy for both changes: tens of milliseconds, a few hundred in a
        // debug build, that every submit would otherwise wait out), for the id the
        // replacement gets unless another change takes one first. None for an instance
        // already retiring or gone, whose loss changes no table. The instance's work
        // is fenced first: should it wake up meanwhile, what it finishes has no effect
        // and it takes nothing more, as once fenced; the rest of the fence waits for
        // the stripes. The request a stall caught it on is read after that: its run can
        // have ended only with no effect (a replay may still have answered an orphan
        // it folded before the fence, which leaves a first stall noted and nothing set
        // aside, its responder gone).
        let early = self.routing.lock().instances.get(&id).cloned();
        let (stuck_early, drafted) = match &early {
            Some(inst) => {
                inst.fence_work();
                let stuck = inst.stuck_on();
                // The request it is on is adopted by its key, read from the log once the
                // record is durable: waited for here, off the stripes (an fdatasync,
                // or a disk that stalls), so that `adopt_orphans` finds it durable. An
                // error is met again there, and answered.
                if let Some(offset) = inst.current_offset() {
                    let _ = self.wait_logged(offset + 1);
                }
                (stuck, self.prepare_replacement(id, inst.weight))
            }
            None => (None, None),
        };
        let mut all = self.exclusive();
        if self.stopping.load(Ordering::SeqCst) {
            // The shutdown listed every instance, this one too, and stops them: it
            // leaves this one behind (its requests answered `Closed`, kept in the log),
            // and a replacement started now would run on unlisted.
            return;
        }
        let stuck_of = |inst: &Arc<Inst<H>>| match &early {
            Some(e) if Arc::ptr_eq(e, inst) => stuck_early,
            _ => inst.stuck_on(),
        };
        let retiring = {
            let mut r = self.retiring.lock();
            r.iter().position(|i| i.id == id).map(|p| r.swap_remove(p))
        };
        if let Some(inst) = retiring {
            // Its keys already moved; only its pending handoffs need rebuilding. Its
            // requests are adopted before fencing abandons the handoffs: an abandoned
            // handoff starts the rebuild that answers them.
            let stuck = stuck_of(&inst);
            let mut left = self.adopt_orphans(&inst);
            let aside = self.claim_if_stalled_twice(stuck);
            inst.fence(Some(&mut left));
            // A round begun while it was a member waits for its part, which it will
            // never give.
            if let Some(round) = self.round.lock().as_ref() {
                round.abandon_if_waiting_for(id);
            }
            self.set_aside(&inst, aside);
            self.left_queries(&all, &inst, &mut left);
            let retiring = self.retiring.lock();
            self.handled_by_gone.fetch_add(
                inst.stats.requests.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            self.retiring_changed(&retiring);
            return;
        }
        let Some(inst) = self.routing.lock().instances.remove(&id) else {
            return;
        };
        self.handled_by_gone.fetch_add(
            inst.stats.requests.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        tracing::warn!(instance = %id, why, "instance lost; moving its keys");
        let stuck = stuck_of(&inst);
        let mut left = self.adopt_orphans(&inst);
        let aside = self.claim_if_stalled_twice(stuck);
        inst.fence(Some(&mut left));
        if let Some(round) = self.round.lock().as_ref() {
            round.abandon_if_waiting_for(id);
        }
        self.stalls.fetch_add(1, Ordering::Relaxed);
        self.set_aside(&inst, aside);
        let replacement = InstanceId(self.next_id.fetch_add(1, Ordering::SeqCst));
        let weight = inst.weight;
        let prepared = drafted
            .filter(|d| d.replacement == replacement)
            .map(|d| d.prepared);
        let result = (|| -> Result<()> {
            let started = self
                .journal(&Control::Stalled { id: id.0 })
                .and_then(|_| self.start_instance(replacement, weight, Start::Empty));
            if let Err(e) = started {
                // The lost instance leaves the table all the same.
                self.change_placement(&all, |p| p.remove(id))?;
                return Err(e);
            }
            // Both changes at once, as drafted (or made here if the draft is stale).
            self.change_placement(&all, |p| {
                apply_or(p, prepared, |p| {
                    p.remove(id)?;
                    p.add(replacement, weight)
                })
            })?;
            self.journal(&Control::Join {
                id: replacement.0,
                weight,
            })?;
            self.rebalance_and_move(&mut all, std::mem::take(&mut left.incoming))
        })();
        if let Err(e) = result {
            tracing::error!(instance = %id, error = %e, "could not replace a lost instance");
        }
        // Behind the new holders' `Acquire`s: each runs on its key's rebuilt state.
        self.left_queries(&all, &inst, &mut left);
    }

    /// The queries a lost instance leaves: the one a stall caught it running is
    /// answered [`Error::QueryStalled`] (run again, it could replace instance after
    /// instance); the others, queued or taken but not begun, go to their keys' holders
    /// now. Called with every stripe held (`all`), after the keys moved.
    fn left_queries(
        &self,
        all: &[MutexGuard<'_, Stripe>],
        inst: &Inst<H>,
        left: &mut Left<H::State, H::Response>,
    ) {
        if let Some((key, unit, answer)) = left.stalled_query.take() {
            if inst.heartbeat.stalled_in(unit) {
                answer(Error::QueryStalled {
                    instance: inst.id,
                    key: query::key_name(key.as_slice()),
                    stall_timeout: self.options.stall_timeout,
                });
            } else if inst.heartbeat.sample() == unit {
                // Begun after a stall was declared on an earlier unit (the instance
                // finished that one while its loss waited for the stripes): watched
                // from here on, since no stall can be declared on a lost instance. Once
                // the cluster stops (it answers the watched ones `Closed`), at once.
                if self.accepting.load(Ordering::SeqCst) {
                    self.watched.lock().push(WatchedQuery {
                        instance: inst.id,
                        key,
                        heartbeat: inst.heartbeat.clone(),
                        unit,
                        since: Instant::now(),
                        answer,
                    });
                } else {
                    answer(Error::Closed);
                }
            }
            // Otherwise it ended, and answered for itself.
        }
        for ask in left.queries.drain(..) {
            let holders = &all[stripe_of(ask.key())];
            self.route_query_locked(holders, ask);
        }
    }

    /// Remembers the request a stall caught an instance on (`stuck`, read when the
    /// stall was acted on: see [`Instance::stuck_on`]); one caught a second time is set
    /// aside like a request whose handler panicked. Called after the instance's requests
    /// were adopted and before it is fenced: fencing lets instances waiting on its
    /// handoffs rebuild at once, and those rebuilds must already skip the request, so it
    /// is marked here, in memory and durably in the log. Its caller's responder is
    /// claimed here too, so that the stalled instance, should it wake before it is
    /// fenced, cannot answer it; [`set_aside`](Self::set_aside) answers it after the
    /// fence.
    ///
    /// A first stall may be passing (a slow outside call): the request is handled again
    /// by its key's new owner. One that hangs every time would otherwise replace an
    /// instance every stall timeout, forever. Only a request whose caller still waits
    /// for its answer is set aside: one that was answered (and so folded into its key's
    /// state, which callers saw) keeps its place whatever its replays do, or acknowledged
    /// state would be lost. After a restart no caller waits any more, so nothing is set
    /// aside there.
    fn claim_if_stalled_twice(
        &self,
        stuck: Option<Offset>,
    ) -> Option<(Offset, Responder<H::Response>)> {
        let offset = stuck?;
        {
            let mut once = self.stalled_once.lock();
            if once.insert(offset) {
                self.any_stalled_once.store(true, Ordering::Release);
                return None;
            }
        }
        let responder = {
            let mut orphans = self.orphans.lock();
            let orphan = orphans.waiting.remove(&offset)?;
            self.any_orphans
                .store(!orphans.waiting.is_empty(), Ordering::Release);
            orphan.responder
        };
        tracing::warn!(offset, "stalled twice on one request; setting it aside");
        // Into the marked set, and durably into the log, before the fence lets any
        // rebuild start: a rebuild skips it, and a crash right after the fence cannot
        // leave a log that a reopen folds it from while live states went on without it.
        if let Err(e) = self.poison(offset) {
            tracing::error!(offset, error = %e, "could not log the poison mark");
        }
        Some((offset, responder))
    }

    /// Answers a request [`claim_if_stalled_twice`](Self::claim_if_stalled_twice) set
    /// aside: [`Error::HandlerStalled`].
    fn set_aside(&self, inst: &Inst<H>, claimed: Option<(Offset, Responder<H::Response>)>) {
        let Some((offset, responder)) = claimed else {
            return;
        };
        responder.answer(Err(Error::HandlerStalled {
            instance: inst.id,
            offset,
            stall_timeout: self.options.stall_timeout,
        }));
    }

    /// The request at `offset` was applied to the end in a rebuild: a stall before was
    /// passing, and one later on it counts as a first again. Two stalls in a row set a
    /// request aside, not two stalls with a completed run between (a request answered
    /// long ago that stalls once in a rebuild, under load say, keeps its place).
    pub(crate) fn completed(&self, offset: Offset) {
        if self.any_stalled_once.load(Ordering::Acquire) {
            let mut once = self.stalled_once.lock();
            once.remove(&offset);
            self.any_stalled_once
                .store(!once.is_empty(), Ordering::Release);
        }
    }

    // ---- checkpoints --------------------------------------------------------------

    /// Takes a checkpoint of every key's state at the current end of the log, waiting
    /// for the instances' parts up to four stall timeouts (at least 10 s).
    pub(crate) fn take_checkpoint(&self) -> Result<Offset> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let wait = (self.options.stall_timeout.saturating_mul(4)).max(Duration::from_secs(10));
        self.checkpoint_within(Patience::Fixed(wait))
    }

    /// Checkpoints the states an open rebuilt from the log alone
    /// ([`rebuild_from_log`](super::ClusterBuilder::rebuild_from_log)), so that no later
    /// rebuild starts from a checkpoint taken before. Waits as long as the instances'
    /// folds of the whole log take: a fold that hangs in a request is a stall, which
    /// the supervisor (already running) declares, and which abandons the checkpoint.
    pub(crate) fn checkpoint_rebuilt_states(&self) -> Result<Offset> {
        self.checkpoint_within(Patience::Fixed(Duration::MAX))
    }

    /// Takes a checkpoint, waiting for the instances' parts as `patience` says.
    fn checkpoint_within(&self, patience: Patience) -> Result<Offset> {
        let _one = self.checkpointing.lock();
        let round = {
            let all = self.exclusive();
            if self.stopping.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            let offset = self.logged_end(&all);
            if offset == self.checkpoint_offset.load(Ordering::SeqCst) {
                return Ok(offset);
            }
            let routing = self.routing.lock();
            let instances = &routing.instances;
            let round = Arc::new(CheckpointRound::new(
                offset,
                instances.keys().copied().collect(),
            ));
            self.handled_at_checkpoint
                .store(self.handled_total(instances), Ordering::Relaxed);
            for inst in instances.values() {
                inst.send(Message::Checkpoint(round.clone()));
            }
            *self.round.lock() = Some(round.clone());
            round
        };
        let result = match patience {
            Patience::Fixed(wait) => round.wait(wait),
            Patience::WhileProgressing(grace) => self.wait_while_progressing(&round, grace),
        };
        *self.round.lock() = None;
        let states = result.map_err(|reason| Error::CheckpointAbandoned {
            offset: round.offset,
            reason,
        })?;
        let checkpoint = Checkpoint {
            offset: round.offset,
            states,
        };
        // Every request the checkpoint folds must be durable before it is: under a sync
        // policy that syncs later, a crash could otherwise keep the checkpoint but lose
        // the log's tail before its offset, and the log would no longer open from it.
        self.input.sync_until(checkpoint.offset)?;
        self.input
            .save_snapshot(CHECKPOINT, checkpoint.offset, &checkpoint.encode())?;
        // Before the offset is published: a rebuild that sees the new offset reads the
        // snapshot just saved.
        self.checkpoint_in_store.store(true, Ordering::SeqCst);
        let offset = checkpoint.offset;
        self.checkpoint_offset.store(offset, Ordering::SeqCst);
        // Requests before the oldest checkpoint a rebuild still folds from are replayed
        // no more: what their replays need is forgotten up to there. A rebuild that
        // began before this checkpoint folds from the one before, and needs the
        // journal's answers, the set-aside marks and the log from there.
        // A fenced instance's rebuild is left out: its outside calls without an answer
        // are refused and its states thrown away, and one stuck for good (a stalled
        // replay) would hold everything back for good.
        let floor = {
            let mut cache = self.checkpoint_cache.lock();
            cache.newest = Weak::new();
            // Pins of instances gone (the list holds the last reference).
            cache.pins.retain(|(pin, _)| Arc::strong_count(pin) > 1);
            cache
                .pins
                .iter()
                .filter(|(_, fenced)| !fenced.load(Ordering::SeqCst))
                .map(|(pin, _)| pin.load(Ordering::SeqCst))
                .fold(offset, Offset::min)
        };
        self.replay_stalls.lock().retain(|&o, _| o >= floor);
        self.effects.forget_before(floor);
        self.poisoned.lock().retain(|&p| p >= floor);
        {
            let mut once = self.stalled_once.lock();
            once.retain(|&p| p >= floor);
            self.any_stalled_once
                .store(!once.is_empty(), Ordering::Release);
        }
        if self.any_orphans.load(Ordering::Acquire) {
            // Forget the orphans answered meanwhile (a rebuild answers what it replays;
            // an adopted request it skips, poisoned by the lost instance that woke up,
            // was answered by that instance).
            let mut orphans = self.orphans.lock();
            orphans.waiting.retain(|_, o| !o.responder.is_answered());
            self.any_orphans
                .store(!orphans.waiting.is_empty(), Ordering::Release);
        }
        if self.options.truncate_after_checkpoint {
            // The last `retry_window` records stay, for an open to read their ids back,
            // and the journal's answers of outside calls with them: a log that still
            // holds a request must hold what its fold needs (a `rebuild_from_log`, or a
            // `Replay`, of a log whose head truncation kept folds from there).
            let keep_from = floor.min(
                self.input
                    .next_offset()
                    .saturating_sub(self.options.retry_window),
            );
            if keep_from > self.input.start_offset() {
                self.input.truncate_before(keep_from)?;
                if let Some(effects) = &self.effects_store {
                    let first_kept = Effects::first_entry_at_or_after(&**effects, keep_from)?;
                    effects.truncate_before(first_kept)?;
                }
            }
        }
        Ok(offset)
    }

    /// Waits for a checkpoint round while every instance that owes its part makes
    /// progress: it gives up on one whose heartbeat has not moved for `grace` (stuck in
    /// a request, at shutdown, when no supervisor runs to notice).
    fn wait_while_progressing(
        &self,
        round: &CheckpointRound,
        grace: Duration,
    ) -> std::result::Result<HashMap<Bytes, Bytes, ahash::RandomState>, String> {
        let slice = (grace / 8).clamp(Duration::from_millis(1), Duration::from_millis(50));
        let mut seen: HashMap<InstanceId, (u64, Instant)> = HashMap::new();
        loop {
            let waited = round.wait(slice);
            if waited.is_ok() || round.is_abandoned() {
                return waited;
            }
            let beats = self.heartbeats();
            let now = Instant::now();
            for id in round.owing() {
                // An instance with no heartbeat any more makes no progress either.
                let sample = beats
                    .iter()
                    .find(|(b, _)| *b == id)
                    .map_or(u64::MAX, |(_, beat)| beat.sample());
                let last = seen.entry(id).or_insert((sample, now));
                if last.0 != sample {
                    *last = (sample, now);
                } else if now.duration_since(last.1) > grace {
                    let store = if self.store_call_running() {
                        "; a call into the input store had not returned either, which it \
                         may be waiting for"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "instance {id} made no progress for {grace:?} while the cluster \
                         stopped{store}"
                    ));
                }
            }
        }
    }

    /// Starts the thread that takes checkpoints when the supervisor finds one due.
    pub(crate) fn start_checkpointer(self: &Arc<Self>) -> Result<std::thread::JoinHandle<()>> {
        let shared = self.clone();
        std::thread::Builder::new()
            .name("cauce-checkpoint".to_string())
            .spawn(move || {
                loop {
                    {
                        let mut due = shared.due.0.lock();
                        while !*due && shared.accepting.load(Ordering::SeqCst) {
                            shared.due.1.wait(&mut due);
                        }
                        if !shared.accepting.load(Ordering::SeqCst) {
                            return;
                        }
                        *due = false;
                    }
                    // The stores are the user's: one that panics fails this checkpoint,
                    // as an error does, not every later one with the thread.
                    let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        shared.take_checkpoint()
                    }));
                    match taken {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "checkpoint failed; will retry");
                        }
                        Err(panic) => tracing::error!(
                            panic = %crate::launcher::thread::panic_message(&*panic),
                            "checkpoint panicked (in a store?); will retry"
                        ),
                    }
                }
            })
            .map_err(|source| Error::Spawn {
                name: "cauce-checkpoint".to_string(),
                source,
            })
    }

    // ---- queries and shutdown -------------------------------------------------------

    pub(crate) fn owner_of(&self, key: &[u8]) -> Option<InstanceId> {
        if let Some(&holder) = self.stripe(key).lock().get(key) {
            return Some(holder);
        }
        let routing = self.routing.lock();
        routing
            .placement
            .placement(key)
            .or_else(|| routing.placement.owner_of(key))
    }

    pub(crate) fn members(&self) -> Vec<InstanceId> {
        self.routing.lock().instances.keys().copied().collect()
    }

    /// Requests handled so far by every instance, live or gone.
    fn handled_total(&self, live: &BTreeMap<InstanceId, Arc<Inst<H>>>) -> u64 {
        let live: u64 = live
            .values()
            .map(|i| i.stats.requests.load(Ordering::Relaxed))
            .sum();
        live + self.handled_elsewhere() + self.replayed_at_open
    }

    /// Requests handled by instances that are no longer members: retiring ones (still
    /// draining their queues) and gone ones.
    fn handled_elsewhere(&self) -> u64 {
        let retiring = self.retiring.lock();
        let draining: u64 = retiring
            .iter()
            .map(|i| i.stats.requests.load(Ordering::Relaxed))
            .sum();
        draining + self.handled_by_gone.load(Ordering::Relaxed)
    }

    pub(crate) fn metrics(&self) -> Metrics {
        let instances = self
            .routing
            .lock()
            .instances
            .values()
            .map(|i| InstanceMetrics {
                id: i.id,
                keys: i.stats.keys.load(Ordering::Relaxed),
                queue_depth: i.permits.in_use(),
                requests: i.stats.requests.load(Ordering::Relaxed),
                queries: i.stats.queries.load(Ordering::Relaxed),
                p50: i.stats.latency.quantile(0.5),
                p99: i.stats.latency.quantile(0.99),
                restarts: i.stats.restarts.load(Ordering::Relaxed),
            })
            .collect();
        Metrics {
            instances,
            next_offset: self.input.next_offset(),
            // No checkpoint is ever taken at 0 (it would hold nothing): 0 is none.
            checkpoint_offset: Some(self.checkpoint_offset.load(Ordering::SeqCst))
                .filter(|&offset| offset > 0),
            stalls: self.stalls.load(Ordering::Relaxed),
            moved_keys: self.moved.load(Ordering::Relaxed),
            shed_keys: self.shed.load(Ordering::Relaxed),
            handled_by_gone: self.handled_elsewhere(),
            store_stalls: self.store_stalls.load(Ordering::Relaxed),
            store_stalled_for: match self.store_stalled_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            duplicates: self.duplicates.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, optionally checkpoints, stops every instance and syncs the logs.
    pub(crate) fn shutdown(&self, checkpoint: bool) -> Result<()> {
        if !self.accepting.swap(false, Ordering::SeqCst) {
            // Another shutdown began first: it has ended once this returns.
            let mut stopped = self.stopped.0.lock();
            while !*stopped {
                self.stopped.1.wait(&mut stopped);
            }
            return Ok(());
        }
        // Set however it ends, a panic of the user's store in a final sync included:
        // a later shutdown or drop must not wait for it forever.
        struct Stopped<'a>(&'a (Mutex<bool>, parking_lot::Condvar));
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                *self.0.0.lock() = true;
                self.0.1.notify_all();
            }
        }
        let _stopped = Stopped(&self.stopped);
        self.stop_everything(checkpoint)
    }

    /// The body of [`shutdown`](Self::shutdown), run once.
    fn stop_everything(&self, checkpoint: bool) -> Result<()> {
        {
            let _due = self.due.0.lock();
            self.due.1.notify_all();
        }
        {
            // Producers waiting for room (blocked, or as futures) look again and find the
            // cluster closed, rather than wait for the queues to drain. Under every stripe
            // lock: no submit is between its `accepting` check and its permit.
            let _all = self.exclusive();
            let routing = self.routing.lock();
            let retiring = self.retiring.lock();
            for inst in routing.instances.values().chain(retiring.iter()) {
                inst.permits.retire();
            }
        }
        // The appends handed to appender threads meanwhile end (`Closed`, or logged and
        // queued ahead of the stop like any submit that got in first).
        self.appenders.stop();
        // Queries still running on instances lost before: not waited for.
        for w in std::mem::take(&mut *self.watched.lock()) {
            (w.answer)(Error::Closed);
        }
        let mut first_error = None;
        // How long an instance may take to finish: to give its part of the checkpoint,
        // then to stop.
        let grace = self.options.stall_timeout.max(Duration::from_secs(1));
        if checkpoint && let Err(e) = self.checkpoint_within(Patience::WhileProgressing(grace)) {
            first_error = Some(e);
        }
        let all: Vec<_> = {
            let _all = self.exclusive();
            let mut all: Vec<_> = self.routing.lock().instances.values().cloned().collect();
            all.extend(self.retiring.lock().iter().cloned());
            self.stopping.store(true, Ordering::SeqCst);
            for inst in &all {
                inst.send(Message::Stop);
            }
            all
        };
        // No deadline if the stall timeout is too long to be a point in time.
        let deadline = Instant::now().checked_add(grace);
        for inst in all {
            // A loop whose handler panicked on the way out is restarted, and its
            // successor is in the slot by the time it ends: wait for that one too.
            loop {
                // Taken out first: the lock must not be held while the loop ends (a
                // restart takes it to store its successor).
                let running = inst.running.lock().take();
                let Some(running) = running else {
                    break;
                };
                while !running.is_finished() && deadline.is_none_or(|d| Instant::now() < d) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if running.is_finished() {
                    let _ = running.join();
                } else {
                    tracing::warn!(instance = %inst.id, "instance did not stop in time; leaving it");
                    leave_behind(&inst);
                    // A checkpoint round still waiting for its part (the drop of the
                    // cluster's last handle inside its handler waits for the round's
                    // thread) gives up now, not at its timeout.
                    if let Some(round) = self.round.lock().as_ref() {
                        round.abandon_if_waiting_for(inst.id);
                    }
                    break;
                }
            }
            if inst.is_fenced() && !inst.is_retired() {
                // Lost as the cluster stopped (see `lose`), its loop ended: what it had
                // queued is answered now.
                leave_behind(&inst);
            }
        }
        // Requests of lost instances whose new owners stopped (or were left behind)
        // before their rebuild answered them: nothing will in this run.
        let orphaned = {
            let mut orphans = self.orphans.lock();
            orphans.early.clear();
            orphans.failed_early.clear();
            std::mem::take(&mut orphans.waiting)
        };
        for (_, orphan) in orphaned {
            orphan.responder.answer(Err(Error::Closed));
        }
        for store in std::iter::once(&self.input).chain(self.effects_store.as_ref()) {
            if let Err(e) = store.sync() {
                first_error.get_or_insert(e);
            }
        }
        // Release the directory now, even if clients of this cluster still exist.
        for log in &self.owned {
            log.close();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<H: Handler> Supervised for Shared<H> {
    fn heartbeats(&self) -> Vec<(InstanceId, Arc<Heartbeat>)> {
        let mut beats: Vec<_> = self
            .routing
            .lock()
            .instances
            .values()
            .map(|i| (i.id, i.heartbeat.clone()))
            .collect();
        beats.extend(
            self.retiring
                .lock()
                .iter()
                .map(|i| (i.id, i.heartbeat.clone())),
        );
        beats
    }

    fn stalled(&self, id: InstanceId, busy_for: Duration) {
        if self.accepting.load(Ordering::SeqCst) && !self.be_patient(id, busy_for) {
            tracing::warn!(instance = %id, ?busy_for, "instance stalled");
            self.lose(id, "stalled");
        }
    }

    fn tick(&self) {
        if !self.accepting.load(Ordering::SeqCst) {
            return;
        }
        self.watch_queries();
        self.watch_patients();
        self.watch_store();
        // Instances whose loop ended without being told to. Looked at without the
        // routing lock, and skipping an instance whose `running` is taken: a launch holds
        // it (a slow one for as long as it takes), and every submit and future that
        // routes needs the routing lock meanwhile.
        let live: Vec<Arc<Inst<H>>> = self.routing.lock().instances.values().cloned().collect();
        let ended = |i: &Inst<H>| {
            i.running
                .try_lock()
                .is_some_and(|r| r.as_ref().is_some_and(|r| r.is_finished()))
        };
        let dead: Vec<InstanceId> = live.iter().filter(|i| ended(i)).map(|i| i.id).collect();
        for id in dead {
            self.lose(id, "its loop ended");
        }
        {
            let mut retiring = self.retiring.lock();
            retiring.retain(|i| {
                let done = ended(i);
                if done {
                    // Counted under the lock that `handled_total` reads it under, so
                    // the requests are counted once, as retiring or as gone.
                    self.handled_by_gone
                        .fetch_add(i.stats.requests.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                !done
            });
            self.retiring_changed(&retiring);
        }
        let handled = self.handled_total(&self.routing.lock().instances);
        let since = handled.saturating_sub(self.handled_at_checkpoint.load(Ordering::Relaxed));
        if since >= self.options.checkpoint_every {
            // Taken on its own thread: waiting for a stalled instance's part must not
            // keep the supervisor from noticing the stall.
            *self.due.0.lock() = true;
            self.due.1.notify_one();
        }
    }
}

/// Fences an instance the stopping cluster will not wait for, and answers the requests
/// it still holds [`Error::Closed`]: they will not be handled in this run, and their
/// waiters are told so now, not left blocked (the log keeps them for the next).
fn leave_behind<S, R>(inst: &Instance<S, R>) {
    inst.fence(None);
    let left = inst.take_left();
    for (_, _, responder) in left.unanswered {
        responder.answer(Err(Error::Closed));
    }
    // The query it runs still holds its answer: answered here, not when (if ever) it
    // returns.
    if let Some((_, _, answer)) = left.stalled_query {
        answer(Error::Closed);
    }
    for ask in left.queries {
        ask.refuse(Error::Closed);
    }
}

/// How long a checkpoint waits for the instances' parts.
enum Patience {
    /// Up to this long (the supervisor gives up on stalled instances meanwhile).
    Fixed(Duration),
    /// As long as every instance that owes its part makes progress within this time.
    WhileProgressing(Duration),
}

/// Requests whose instance was lost, and answers given ahead of such a loss.
struct Orphans<R> {
    /// Requests taken or queued by lost instances, by offset: answered by whoever
    /// rebuilds their keys, or refused if that rebuild fails (see
    /// [`Shared::refuse_orphans`]). Requests are otherwise answered through the
    /// responder they are queued with, so this is empty but after a loss.
    waiting: HashMap<Offset, Orphan<R>, ahash::RandomState>,
    /// Answers a rebuild gave, while some instance was retiring, for requests nobody had
    /// adopted. A rebuild of a key can run ahead of a retiring instance that still holds
    /// requests of the key (when the instance the key was moving to is lost): if that
    /// retiring instance is lost in turn, its adopted requests are answered from here,
    /// since no rebuild will replay them again. Kept while any instance is retiring.
    early: HashMap<Offset, Result<R>, ahash::RandomState>,
    /// The same for a rebuild that failed: its keys, refused as they are adopted.
    failed_early: HashMap<Key, RebuildFailed, ahash::RandomState>,
}

/// A request of a lost instance, waiting for its key's rebuild.
struct Orphan<R> {
    key: Key,
    responder: Responder<R>,
}

/// A rebuild of a key that failed: requests of the key before `until` depended on it.
struct RebuildFailed {
    instance: InstanceId,
    until: Offset,
    /// The store's (or the checkpoint's) error, shared by every request refused for it.
    cause: Arc<str>,
}

impl RebuildFailed {
    fn error(&self, key: &Key) -> Error {
        Error::StateUnavailable {
            instance: self.instance,
            reason: instance::rebuild_failed(key.as_slice(), self.until, &self.cause),
        }
    }
}

/// The error of an orphan whose record could not be read to learn its key.
fn unreadable(instance: InstanceId, offset: Offset, e: &Error) -> Error {
    Error::StateUnavailable {
        instance,
        reason: format!("could not read the request at offset {offset} to rebuild its key: {e}"),
    }
}

/// The request ids of a batch's items (`None` for those without), or `None` if no item
/// has one: a batch without ids pays one look at each payload's first byte.
fn batch_ids<K>(items: &[(K, Range<usize>)], payloads: &[u8]) -> Option<Vec<Option<RequestId>>> {
    let id_of = |p: &Range<usize>| payloads.get(p.clone()).and_then(fold::request_id);
    if items.iter().all(|(_, p)| id_of(p).is_none()) {
        return None;
    }
    Some(items.iter().map(|(_, p)| id_of(p)).collect())
}

/// A pending response already resolved to [`Error::Duplicate`] of the request logged at
/// `offset` (which it names as its own).
fn resolved_duplicate<T>(id: RequestId, offset: Offset) -> Pending<T> {
    let (pending, responder) = crate::client::pending(offset);
    responder.answer(Err(Error::Duplicate { id, offset }));
    pending
}

/// Runs an async submit's append (`logged` false) or its wait for the disk (`logged`
/// true) on an appender thread, a panic of the store in it turned into
/// [`Error::StorePanicked`]: the submit's caller learns what became of its request.
/// What the append undoes as it unwinds is undone as for a panic on the caller's thread
/// (see `unwinding_undoes`).
fn catch_store_panic<T>(logged: bool, run: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        Err(Error::StorePanicked {
            logged,
            message: crate::launcher::thread::panic_message(&*panic),
        })
    })
}

/// [`Shared::lose`]'s table, drafted before it takes the stripes.
struct DraftedReplacement {
    /// The id the replacement was drafted with.
    replacement: InstanceId,
    prepared: Prepared,
}

/// Makes the change `prepared` holds, or, if there is none or the membership changed
/// since it was drafted, the change `make` makes.
fn apply_or(
    placement: &mut dyn placement::Placement,
    prepared: Option<Prepared>,
    make: impl FnOnce(&mut dyn placement::Placement) -> Result<()>,
) -> Result<()> {
    if let Some(prepared) = prepared
        && placement.apply(prepared)
    {
        return Ok(());
    }
    make(placement)
}

/// A key's stripe: the low bits of its [`key_hash`] (the router's slot takes the top
/// ones), so a submit hashes the key once for both.
fn stripe_of(key: &[u8]) -> usize {
    stripe_of_hash(key_hash(key))
}

fn stripe_of_hash(hash: u64) -> usize {
    (hash as usize) & (STRIPES - 1)
}

/// A request whose encoded payload is not where its async submit keeps it: a bug in this
/// crate, refused rather than logged as an empty record.
pub(crate) fn lost_payload() -> Error {
    debug_assert!(false, "an async submit lost its payload");
    Error::Codec {
        context: "async submit",
        message: "the request's encoded payload is missing (a bug in cauce); nothing was logged"
            .into(),
    }
}

/// An instance in the routing table is never retired while submits are accepted:
/// retiring happens under every stripe lock, after the instance left the table or (at
/// shutdown) after `accepting` went false, and submit holds a stripe lock and checks
/// `accepting` under it.
fn unreachable_retired() {
    debug_assert!(false, "a routed instance was retired");
}
