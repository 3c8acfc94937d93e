//! One instance: its queue, its permits, and the loop that pulls from the queue.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use parking_lot::{Condvar, Mutex};

use super::core::Shared;
use super::fold::{self, Checkpoint, FoldSink, Outcome, Slot};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::launcher::{Beat, Heartbeat, Running};
use crate::record::{Offset, Timestamp};
use crate::router::InstanceId;
use crate::small::Key;

use super::metrics::InstanceStats;
use super::query::{Ask, StallAnswer};
use crate::client::Responder;

/// Keys' states on their way from one instance to another.
pub(crate) struct Handoff<S> {
    /// Records of these keys before this offset belong to the releasing side.
    pub(crate) until: Offset,
    state: Mutex<HandoffState<S>>,
    ready: Condvar,
}

/// States on their way to an instance that was lost, by key. Whoever takes over such a
/// key waits for its state there and folds the log from that handoff's offset on.
/// Folding from the checkpoint instead would apply records that the releasing side
/// still handles and answers, and a checkpoint taken meanwhile would hold them: a
/// rebuild on the releasing side, from that checkpoint, would then apply them twice.
pub(crate) type Relays<S> = HashMap<Bytes, Arc<Handoff<S>>, ahash::RandomState>;

enum HandoffState<S> {
    Waiting,
    /// The states handed over, each taken out by the instance that acquires its key.
    Ready(HashMap<Bytes, Option<Slot<S>>, ahash::RandomState>),
    /// The releasing instance is gone: its keys are rebuilt from the log, those of
    /// them with a state still on its way to it from that state (see [`Relays`]).
    Abandoned(Arc<Relays<S>>),
}

/// What taking keys out of a handoff gives.
enum Handed<S> {
    /// Each key's state (`None`: the releasing side had none).
    Ready(Vec<(Bytes, Option<Slot<S>>)>),
    /// The releasing side is gone; these states were on their way to it.
    Abandoned(Arc<Relays<S>>),
}

impl<S> Handoff<S> {
    pub(crate) fn new(until: Offset) -> Self {
        Handoff {
            until,
            state: Mutex::new(HandoffState::Waiting),
            ready: Condvar::new(),
        }
    }

    /// Hands the states over, unless the handoff was abandoned.
    fn complete(&self, states: Vec<(Bytes, Option<Slot<S>>)>) -> bool {
        let mut st = self.state.lock();
        if !matches!(*st, HandoffState::Waiting) {
            return false;
        }
        *st = HandoffState::Ready(states.into_iter().collect());
        self.ready.notify_all();
        true
    }

    /// Gives up on the releasing side (it stalled or died); `relays` are the states
    /// still on their way to it, for these keys.
    pub(crate) fn abandon(&self, relays: Relays<S>) {
        let mut st = self.state.lock();
        if matches!(*st, HandoffState::Waiting) {
            *st = HandoffState::Abandoned(Arc::new(relays));
            self.ready.notify_all();
        }
    }

    /// Waits for the handoff, and takes `keys`' states out of it.
    fn take(&self, keys: &[Bytes]) -> Handed<S> {
        let mut st = self.state.lock();
        loop {
            match &mut *st {
                HandoffState::Waiting => self.ready.wait(&mut st),
                HandoffState::Ready(states) => {
                    return Handed::Ready(
                        keys.iter()
                            .map(|k| (k.clone(), states.remove(k).flatten()))
                            .collect(),
                    );
                }
                HandoffState::Abandoned(relays) => return Handed::Abandoned(relays.clone()),
            }
        }
    }
}

/// Where acquired keys' states come from.
pub(crate) enum Source<S> {
    Handoff(Arc<Handoff<S>>),
    /// Rebuild from the log, up to `until`: from the checkpoint, or for a key in
    /// `relays` from the state on its way to the lost instance that held it.
    Rebuild {
        until: Offset,
        relays: Arc<Relays<S>>,
    },
}

impl<S> Source<S> {
    /// Records of the acquired keys before this offset belong to the instance they come
    /// from.
    fn until(&self) -> Offset {
        match self {
            Source::Handoff(h) => h.until,
            Source::Rebuild { until, .. } => *until,
        }
    }
}

/// One contribution per instance to a checkpoint taken at `offset`.
pub(crate) struct CheckpointRound {
    pub(crate) offset: Offset,
    parts: Mutex<RoundState>,
    done: Condvar,
}

struct RoundState {
    expected: HashSet<InstanceId>,
    states: HashMap<Bytes, Bytes, ahash::RandomState>,
    abandoned: Option<String>,
}

impl CheckpointRound {
    pub(crate) fn new(offset: Offset, expected: HashSet<InstanceId>) -> Self {
        CheckpointRound {
            offset,
            parts: Mutex::new(RoundState {
                expected,
                states: HashMap::default(),
                abandoned: None,
            }),
            done: Condvar::new(),
        }
    }

    fn contribute(&self, id: InstanceId, states: Vec<(Bytes, Bytes)>) {
        let mut p = self.parts.lock();
        if p.expected.remove(&id) {
            p.states.extend(states);
        }
        if p.expected.is_empty() {
            self.done.notify_all();
        }
    }

    fn fail(&self, id: InstanceId, why: String) {
        let mut p = self.parts.lock();
        if p.expected.contains(&id) && p.abandoned.is_none() {
            p.abandoned = Some(why);
            self.done.notify_all();
        }
    }

    /// Abandons the round if `id` still owes its part.
    pub(crate) fn abandon_if_waiting_for(&self, id: InstanceId) {
        self.fail(id, format!("instance {id} left before contributing"));
    }

    /// The instances that still owe their part.
    pub(crate) fn owing(&self) -> Vec<InstanceId> {
        self.parts.lock().expected.iter().copied().collect()
    }

    /// True once the round was given up on.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.parts.lock().abandoned.is_some()
    }

    /// Waits for every part, or for the round to be abandoned or time out.
    pub(crate) fn wait(
        &self,
        timeout: std::time::Duration,
    ) -> std::result::Result<HashMap<Bytes, Bytes, ahash::RandomState>, String> {
        let deadline = Instant::now().checked_add(timeout);
        let mut p = self.parts.lock();
        loop {
            if let Some(why) = &p.abandoned {
                return Err(why.clone());
            }
            if p.expected.is_empty() {
                return Ok(std::mem::take(&mut p.states));
            }
            let Some(deadline) = deadline else {
                self.done.wait(&mut p);
                continue;
            };
            if self.done.wait_until(&mut p, deadline).timed_out() {
                return Err(format!("timed out waiting for {:?}", p.expected));
            }
        }
    }
}

/// A request on its way to the instance that handles it.
pub(crate) struct Queued<R> {
    pub(crate) offset: Offset,
    pub(crate) timestamp: Timestamp,
    pub(crate) key: QueuedBytes,
    /// The record's payload as logged (tag byte, then the encoded request).
    pub(crate) payload: QueuedBytes,
    /// When it was queued, for the latency metrics (a sample of the requests: see
    /// [`sampled`]).
    pub(crate) submitted: Option<Instant>,
    /// Who waits for the answer (taken out by the instance when it starts on it).
    pub(crate) responder: Option<Responder<R>>,
    /// Whether it was durable when queued; if not (`Store::append_deferred`), the
    /// instance waits for that before it handles it.
    pub(crate) durable: bool,
}

/// Whether the request at `offset` has its latency measured for the metrics: one in 8,
/// picked by the top bits of a multiplicative hash of the offset. Every instance gets
/// its share: `offset % 8` left out an instance whose keys alternate with another one's
/// (it only ever had odd offsets), while the hash spreads any arithmetic run of offsets
/// evenly. Decided by the submitter, outside every lock, with one clock read per timed
/// request (two clock reads per request were 3% of the submit path).
pub(crate) fn sampled(offset: Offset) -> bool {
    offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61 == 0
}

/// How many bytes a queued request's key or payload holds without a heap buffer.
const INLINE_PAYLOAD: usize = 46;

/// A queued request's key or payload (see [`crate::small::SmallBytes`]).
pub(crate) type QueuedBytes = crate::small::SmallBytes<INLINE_PAYLOAD>;

/// The batch an instance loop took from its mailbox, and the request or query it is on.
struct Taken<S, R> {
    batch: VecDeque<Message<S, R>>,
    current: Option<(Offset, Responder<R>)>,
    /// The query it is on.
    query: Option<QueryWork<S>>,
}

/// Where the query an instance loop took stands.
enum QueryWork<S> {
    /// Taken from the mailbox and not begun (its key may be rebuilt first): if the
    /// instance is lost now, the query goes to its key's new holder.
    Taken(Box<dyn Ask<S>>),
    /// Running, in the unit of work the heartbeat counted `unit`: if a stall caught
    /// the instance in that unit, the query is answered through `answer`.
    Running {
        key: Key,
        unit: u64,
        answer: StallAnswer,
    },
}

/// What `working_on` holds while an instance runs a query: no request's offset (offsets
/// end before `u64::MAX`), so a stall caught on a query sets no request aside.
const ON_A_QUERY: Offset = Offset::MAX;

/// What an instance's queue carries.
pub(crate) enum Message<S, R> {
    Request(Queued<R>),
    /// A query of one key's state: run between that key's requests, logged nowhere.
    Query(Box<dyn Ask<S>>),
    /// What the loop is given for a query it took: the query itself stays in
    /// [`Taken::query`] until it begins, where a lost instance's queries are found.
    /// Never queued.
    TakenQuery,
    Release {
        keys: Vec<Bytes>,
        handoff: Arc<Handoff<S>>,
    },
    Acquire {
        keys: Vec<Bytes>,
        source: Source<S>,
    },
    Checkpoint(Arc<CheckpointRound>),
    Stop,
}

/// How many times an idle instance that does not linger yields its core before it
/// sleeps. Sleeping makes the next producer pay a futex wake-up: on the
/// 4-instances-on-2-cores bench, no yields gave 0.06× the baseline's throughput and 10 to
/// 200 yields 0.17–0.18× (5 yields: 0.93× the throughput of 50). Spinning with `pause`
/// before yielding gained nothing there.
const YIELDS_BEFORE_SLEEP: usize = 50;

/// Naps in a row that find nothing before a lingering instance sleeps until woken: an
/// idle cluster costs no CPU, and the first request after a quiet spell is handled at
/// once.
const NAPS_BEFORE_SLEEP: u32 = 20;

/// How many batches a lingering instance takes without lingering after a waiter nudged
/// it with at most [`EAGER_AT_MOST_QUEUED`] requests queued: somebody is blocked on it
/// with next to nothing to batch, typically a caller that submits one request and waits
/// for it, whom a nap per request would slow down tenfold (the quickstart's 9,544 reads
/// one at a time took 480 ms lingering, 44 ms without, and 56 ms with this). The
/// instance lingers again after these batches.
const EAGER_BATCHES: u32 = 64;

/// The most requests a nudged instance may have queued for the nudge to stop it
/// lingering. A waiter of a busy stream nudges an instance with a long queue: waking it
/// is enough, and turning it eager too cost a quarter of the windowed bench's
/// throughput (9-run medians 1.51M eager on every nudge, 1.94M with this, 1.72M never
/// eager).
const EAGER_AT_MOST_QUEUED: usize = 2;

/// An instance's queue: producers append under a short lock, the instance takes
/// everything queued at once.
///
/// How an instance with an empty queue waits is the choice between latency and
/// throughput ([`ClusterBuilder::linger`](super::ClusterBuilder::linger)):
/// - lingering (`linger > 0`): it naps for `linger` without asking to be woken, so
///   producers queue requests without a futex wake-up and it wakes to a batch. A producer
///   still wakes it at once for anything but a request (a stop, a hand-over, a
///   checkpoint round) and when half its queue is full. After [`NAPS_BEFORE_SLEEP`]
///   naps that found nothing it sleeps until woken. A waiter's nudge wakes it and stops
///   it lingering for [`EAGER_BATCHES`] batches.
/// - not lingering: it yields its core [`YIELDS_BEFORE_SLEEP`] times, then sleeps until
///   a producer wakes it; a producer wakes a sleeping instance for every request.
///
/// On 2 cores with 4 instances and 2 submitting threads, lingering 50 µs took 0.6–0.9×
/// the CPU per request, and handled 1.25–1.4× the requests per second in short runs but
/// 0.8–1.0× in long ones, where lingering instances fall into phases of small batches
/// (traced: those phases come with the two submitters running on different cores). A producer waking a napping instance once 32 or
/// 64 requests waited (rather than half its queue) lost a quarter of that, and timer
/// slack cut to 1 µs (naps on time) lost half: every wake-up costs more than the wait.
pub(crate) struct Mailbox<M> {
    state: Mutex<MailboxState<M>>,
    ready: Condvar,
    /// Messages queued, readable without the lock by a yielding instance.
    queued: AtomicUsize,
    /// How long to nap with nothing to do; zero: yield, then sleep until woken.
    linger: Duration,
    /// How many queued requests make a producer wake a napping instance.
    wake_at: usize,
    /// Batches left to take without lingering, since somebody blocked waiting on this
    /// instance (see [`EAGER_BATCHES`]).
    eager: AtomicU32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sleep {
    Awake,
    /// Sleeping for `linger` at most; a producer wakes it only for a control message or
    /// `wake_at` requests.
    Napping,
    /// Sleeping until a producer wakes it.
    Waiting,
}

struct MailboxState<M> {
    queue: VecDeque<M>,
    sleep: Sleep,
    /// Naps in a row that found nothing.
    idle_naps: u32,
}

impl<M> Mailbox<M> {
    fn new(linger: Duration, capacity: usize) -> Self {
        Mailbox {
            state: Mutex::new(MailboxState {
                queue: VecDeque::new(),
                sleep: Sleep::Awake,
                idle_naps: 0,
            }),
            ready: Condvar::new(),
            queued: AtomicUsize::new(0),
            linger,
            wake_at: (capacity / 2).max(1),
            eager: AtomicU32::new(0),
        }
    }

    /// Queues a message that must be seen now: wakes the instance however it sleeps.
    fn push(&self, message: M) {
        self.push_many(std::iter::once(message), true);
    }

    /// Queues messages in order. `urgent` wakes a napping instance at once; requests
    /// wake it only when `wake_at` of them wait.
    fn push_many(&self, messages: impl IntoIterator<Item = M>, urgent: bool) {
        let mut state = self.state.lock();
        state.queue.extend(messages);
        self.queued.store(state.queue.len(), Ordering::Release);
        let wake = match state.sleep {
            Sleep::Awake => false,
            Sleep::Waiting => true,
            Sleep::Napping => urgent || state.queue.len() >= self.wake_at,
        };
        if wake {
            state.sleep = Sleep::Awake;
            drop(state);
            self.ready.notify_one();
        }
    }

    /// Somebody blocks waiting on this instance: wakes it if it naps with something
    /// queued, and stops it lingering for [`EAGER_BATCHES`] batches if next to nothing
    /// is queued.
    fn nudge(&self) {
        let mut state = self.state.lock();
        if state.queue.len() <= EAGER_AT_MOST_QUEUED {
            self.eager.store(EAGER_BATCHES, Ordering::Relaxed);
        }
        if state.sleep == Sleep::Napping && !state.queue.is_empty() {
            state.sleep = Sleep::Awake;
            drop(state);
            self.ready.notify_one();
        }
    }

    /// Puts messages taken but not handled back at the front, in their order.
    fn put_back(&self, batch: &mut VecDeque<M>) {
        let mut state = self.state.lock();
        while let Some(m) = batch.pop_back() {
            state.queue.push_front(m);
        }
        self.queued.store(state.queue.len(), Ordering::Release);
    }

    /// Calls `f` with the queue, under the lock, to take messages out of it.
    fn drain(&self, f: impl FnOnce(&mut VecDeque<M>)) {
        let mut state = self.state.lock();
        f(&mut state.queue);
        self.queued.store(state.queue.len(), Ordering::Release);
    }

    /// Waits for at least one message, then hands everything queued to `take` (which
    /// leaves an empty queue in its place), under the lock.
    fn take_all(&self, take: impl FnOnce(&mut VecDeque<M>)) {
        let eager = self.eager.load(Ordering::Relaxed);
        if eager > 0 {
            self.eager.store(eager - 1, Ordering::Relaxed);
        }
        let lingering = !self.linger.is_zero() && eager == 0;
        if !lingering {
            // Yield briefly before sleeping, looking at the count without the lock: a
            // producer that finds us awake skips the futex wake-up.
            let mut yields = 0;
            while self.queued.load(Ordering::Acquire) == 0 && yields < YIELDS_BEFORE_SLEEP {
                std::thread::yield_now();
                yields += 1;
            }
        }
        let mut state = self.state.lock();
        while state.queue.is_empty() {
            if lingering && state.idle_naps < NAPS_BEFORE_SLEEP {
                state.idle_naps += 1;
                state.sleep = Sleep::Napping;
                self.ready.wait_for(&mut state, self.linger);
            } else {
                state.sleep = Sleep::Waiting;
                self.ready.wait(&mut state);
            }
            state.sleep = Sleep::Awake;
        }
        state.idle_naps = 0;
        take(&mut state.queue);
        self.queued.store(state.queue.len(), Ordering::Release);
    }
}

/// Counts queued requests against a capacity; producers block or are refused when full.
pub(crate) struct Permits {
    capacity: usize,
    used: AtomicUsize,
    /// Who waits for room (shared with the [`Registration`]s of asynchronous waiters,
    /// which take their wakers out when dropped).
    waiting: Arc<Waiting>,
    retired: AtomicBool,
}

/// The producers waiting for room in one queue.
struct Waiting {
    /// Producers sleeping in `acquire`, and wakers registered by `poll_acquire`:
    /// `release` takes the lock only when there are some.
    count: AtomicUsize,
    /// Guards the waits: blocked producers wait on `freed` with it; the wakers of
    /// asynchronous submits wait in it, each woken at the next release.
    lock: Mutex<Wakers>,
    freed: Condvar,
}

/// The wakers of asynchronous waiters, each under the key its [`Registration`] holds.
#[derive(Default)]
struct Wakers {
    next_key: u64,
    by_key: HashMap<u64, Waker, ahash::RandomState>,
}

/// Where an asynchronous waiter for room (a submit or query future) has its waker: the
/// future keeps it, and dropping it takes the waker out. A future dropped while it
/// waited (a timeout around a submit, say) left its waker, and with it its task, in the
/// queue's list until the next release: with a stalled or slow instance that list grew
/// by one task per dropped future, and each poll scanned it.
#[derive(Default)]
pub(crate) struct Registration {
    at: Option<(Arc<Waiting>, u64)>,
}

impl Registration {
    /// Takes the waker out, if it is still registered.
    fn cancel(&mut self) {
        if let Some((waiting, key)) = self.at.take() {
            let removed = {
                let mut wakers = waiting.lock.lock();
                let removed = wakers.by_key.remove(&key);
                if removed.is_some() {
                    waiting.count.fetch_sub(1, Ordering::SeqCst);
                }
                removed
            };
            // Dropped without the lock: dropping a waker can run a task's own drop,
            // which may cancel another registration here.
            drop(removed);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Why a permit was not granted.
pub(crate) enum NoPermit {
    Busy,
    Retired,
}

impl Permits {
    fn new(capacity: usize) -> Self {
        Permits {
            capacity,
            used: AtomicUsize::new(0),
            waiting: Arc::new(Waiting {
                count: AtomicUsize::new(0),
                lock: Mutex::new(Wakers::default()),
                freed: Condvar::new(),
            }),
            retired: AtomicBool::new(false),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    fn try_take(&self) -> bool {
        self.try_take_many(1)
    }

    /// Takes `n` permits if all of them are free, none otherwise.
    fn try_take_many(&self, n: usize) -> bool {
        let mut used = self.used.load(Ordering::SeqCst);
        while used.saturating_add(n) <= self.capacity {
            match self.used.compare_exchange_weak(
                used,
                used + n,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
        false
    }

    /// Takes a permit, waiting for one if `block`.
    pub(crate) fn acquire(&self, block: bool) -> std::result::Result<(), NoPermit> {
        if block {
            return self.acquire_many(1);
        }
        if self.retired.load(Ordering::SeqCst) {
            return Err(NoPermit::Retired);
        }
        match self.try_take() {
            true => Ok(()),
            false => Err(NoPermit::Busy),
        }
    }

    /// Takes `n` permits at once, waiting until `n` are free. Taking them one at a time
    /// could leave two batches each holding part of a queue's room while both wait for
    /// the rest of it.
    pub(crate) fn acquire_many(&self, n: usize) -> std::result::Result<(), NoPermit> {
        let waiting = &*self.waiting;
        loop {
            if self.retired.load(Ordering::SeqCst) {
                return Err(NoPermit::Retired);
            }
            if self.try_take_many(n) {
                return Ok(());
            }
            // Announce ourselves, then look again, both under the lock that `release`
            // takes before notifying: either `release` sees us, or we see its release.
            let mut guard = waiting.lock.lock();
            waiting.count.fetch_add(1, Ordering::SeqCst);
            let took = !self.retired.load(Ordering::SeqCst) && self.try_take_many(n);
            if !took && !self.retired.load(Ordering::SeqCst) {
                waiting.freed.wait(&mut guard);
            }
            waiting.count.fetch_sub(1, Ordering::SeqCst);
            if took {
                return Ok(());
            }
        }
    }

    /// Takes a permit if there is one; otherwise registers `cx`'s waker under
    /// `registration`, woken at the next release (or retirement), and returns `Pending`.
    pub(crate) fn poll_acquire(
        &self,
        cx: &mut std::task::Context<'_>,
        registration: &mut Registration,
    ) -> Poll<std::result::Result<(), NoPermit>> {
        self.poll_acquire_many(1, cx, registration)
    }

    /// [`poll_acquire`](Self::poll_acquire) for `n` permits, all at once.
    pub(crate) fn poll_acquire_many(
        &self,
        n: usize,
        cx: &mut std::task::Context<'_>,
        registration: &mut Registration,
    ) -> Poll<std::result::Result<(), NoPermit>> {
        let mine = registration
            .at
            .as_ref()
            .is_some_and(|(w, _)| Arc::ptr_eq(w, &self.waiting));
        if !mine {
            // Registered with another queue's waiters (its instance retired, and the
            // future routed here): out of there first, never holding two of the locks.
            registration.cancel();
        }
        if self.retired.load(Ordering::SeqCst) {
            registration.cancel();
            return Poll::Ready(Err(NoPermit::Retired));
        }
        if self.try_take_many(n) {
            registration.cancel();
            return Poll::Ready(Ok(()));
        }
        // Register, then look again under the lock `release` takes before waking: either
        // `release` sees the waker, or we see its release.
        let mut wakers = self.waiting.lock.lock();
        // Wakers taken out, dropped once the lock is released (see `Registration::cancel`).
        let (mut replaced, mut removed) = (None, None);
        let key = registration.at.as_ref().map(|(_, key)| *key);
        match key.and_then(|key| wakers.by_key.get_mut(&key)) {
            // Polled again before a release (in a `select!` loop, say): registered once.
            Some(waker) => {
                if !waker.will_wake(cx.waker()) {
                    replaced = Some(std::mem::replace(waker, cx.waker().clone()));
                }
            }
            // New, or woken since (a release takes every waker): registered anew.
            None => {
                let key = wakers.next_key;
                wakers.next_key += 1;
                wakers.by_key.insert(key, cx.waker().clone());
                self.waiting.count.fetch_add(1, Ordering::SeqCst);
                registration.at = Some((self.waiting.clone(), key));
            }
        }
        let now = if self.retired.load(Ordering::SeqCst) {
            Some(Err(NoPermit::Retired))
        } else if self.try_take_many(n) {
            Some(Ok(()))
        } else {
            None
        };
        let polled = match now {
            Some(outcome) => {
                if let Some((_, key)) = registration.at.take() {
                    removed = wakers.by_key.remove(&key);
                    if removed.is_some() {
                        self.waiting.count.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                Poll::Ready(outcome)
            }
            None => Poll::Pending,
        };
        drop(wakers);
        drop((replaced, removed));
        polled
    }

    /// Wakes every waiter, holding the lock (`wakers`): blocked producers through
    /// `freed`, asynchronous ones through their wakers, woken once the lock is released.
    /// Their registrations keep keys no longer listed: polled again, they register anew.
    fn wake_all(&self, mut wakers: parking_lot::MutexGuard<'_, Wakers>) {
        self.waiting.freed.notify_all();
        let taken = std::mem::take(&mut wakers.by_key);
        self.waiting.count.fetch_sub(taken.len(), Ordering::SeqCst);
        drop(wakers);
        taken.into_values().for_each(Waker::wake);
    }

    /// Takes a permit even when full: a request of a batch whose key moved between
    /// routing and queueing (a membership change in between). The room moves with it:
    /// the overshoot is bounded by the room the batches in flight held elsewhere (one
    /// batch per blocked submitter; for async batches waiting for an appender thread,
    /// at most every queue's capacity).
    pub(crate) fn force(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn release(&self) {
        self.release_many(1);
    }

    /// Gives back `n` permits at once.
    pub(crate) fn release_many(&self, n: usize) {
        if n == 0 {
            return;
        }
        let _ = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                Some(u.saturating_sub(n))
            });
        if self.waiting.count.load(Ordering::SeqCst) > 0 {
            // All of them: a waiter for several permits woken alone by one freed permit
            // would sleep again, and leave asleep one that the permit would have served.
            // Every asynchronous waiter tries again: one that finds no room registers
            // anew, and none is left waiting on a wake-up that went to a dropped future.
            self.wake_all(self.waiting.lock.lock());
        }
    }

    /// No more permits: wakes every waiter so that it routes elsewhere.
    pub(crate) fn retire(&self) {
        let wakers = self.waiting.lock.lock();
        self.retired.store(true, Ordering::SeqCst);
        self.wake_all(wakers);
    }

    pub(crate) fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl<S, R> crate::client::Nudge for Instance<S, R>
where
    Instance<S, R>: Send + Sync,
{
    fn nudge(&self) {
        self.mailbox.nudge();
    }
}

/// An instance as the cluster sees it.
///
/// The parts written by producers (mailbox, permits) and by the instance (heartbeat,
/// stats) sit on cache lines of their own, so neither side invalidates the other's.
pub(crate) struct Instance<S, R> {
    pub(crate) id: InstanceId,
    pub(crate) weight: u32,
    mailbox: CachePadded<Mailbox<Message<S, R>>>,
    pub(crate) permits: CachePadded<Permits>,
    pub(crate) heartbeat: Arc<Heartbeat>,
    /// The offset of the request its latest unit of work is on (live, or replayed in a
    /// rebuild): written before each unit begins, so that a stall can tell which
    /// request it caught the instance on (see [`Instance::stuck_on`]).
    working_on: CachePadded<AtomicU64>,
    /// Shared with the cluster's list of pins (see [`Shared::checkpoint_for`]): a
    /// fenced instance's rebuild holds back nothing a checkpoint would forget.
    pub(crate) fenced: Arc<AtomicBool>,
    /// The offset of the checkpoint the instance's rebuild folds from, while one runs
    /// (`Offset::MAX`: none): what checkpoints taken meanwhile must not forget.
    pub(crate) pinned: Arc<AtomicU64>,
    /// Set by [`fence`](Instance::fence) once what the instance left was taken: nothing
    /// may be sent to it any more. Until then, an instance whose work is fenced (see
    /// [`fence_work`](Instance::fence_work)) still gets what is routed to it, for the
    /// fence to find.
    retired: AtomicBool,
    pub(crate) stats: CachePadded<InstanceStats>,
    /// Handoffs this instance still has to complete (abandoned if it is fenced).
    pub(crate) releases: Mutex<Vec<Arc<Handoff<S>>>>,
    pub(crate) running: Mutex<Option<Box<dyn Running>>>,
    /// The batch the loop took from the mailbox, and the request it is on. A request
    /// is answered through the responder it is queued with; if the instance is lost,
    /// whoever rebuilds its keys answers the requests it had taken or still has queued.
    /// Locked by the loop alone but when the instance is lost: uncontended.
    taken: Mutex<Taken<S, R>>,
}

impl<S, R> Instance<S, R> {
    pub(crate) fn new(id: InstanceId, weight: u32, capacity: usize, linger: Duration) -> Self {
        Instance {
            id,
            weight,
            mailbox: CachePadded::new(Mailbox::new(linger, capacity)),
            permits: CachePadded::new(Permits::new(capacity)),
            heartbeat: Arc::new(Heartbeat::new()),
            working_on: CachePadded::new(AtomicU64::new(0)),
            fenced: Arc::new(AtomicBool::new(false)),
            pinned: Arc::new(AtomicU64::new(Offset::MAX)),
            retired: AtomicBool::new(false),
            stats: CachePadded::new(InstanceStats::default()),
            releases: Mutex::new(Vec::new()),
            running: Mutex::new(None),
            taken: Mutex::new(Taken {
                batch: VecDeque::new(),
                current: None,
                query: None,
            }),
        }
    }

    /// Queues a message that is not a request: the instance wakes for it at once.
    pub(crate) fn send(&self, message: Message<S, R>) {
        self.mailbox.push(message);
    }

    /// Queues requests, in order; a napping instance is not woken for them alone.
    pub(crate) fn send_requests(&self, messages: impl IntoIterator<Item = Message<S, R>>) {
        self.mailbox.push_many(messages, false);
    }

    /// The first step of [`fence`](Self::fence), taken before the stripes are: from
    /// here on, whatever the instance finishes has no effect (no answer, no poison mark,
    /// no state), and its loop takes no more messages and stops. What it leaves (queued,
    /// or on its way to it until the table changes) is taken, and its handoffs
    /// abandoned, once the stripes are held, by `take_left` and `fence`.
    pub(crate) fn fence_work(&self) {
        // Under the lock the loop takes messages under: a message it takes is either
        // taken before (and its outcome has no effect), or not at all (`next_message`
        // gives `Stop` from here on), so `take_left` still finds every request.
        let _taken = self.taken.lock();
        self.fenced.store(true, Ordering::SeqCst);
    }

    /// Retires the instance for good: its loop stops at its next step and anything it
    /// still had to hand over is rebuilt elsewhere, from what `left` says was on its
    /// way to it (from [`Instance::take_left`]; `None` when nothing is rebuilt).
    pub(crate) fn fence(&self, left: Option<&mut Left<S, R>>) {
        self.fenced.store(true, Ordering::SeqCst);
        self.retired.store(true, Ordering::SeqCst);
        self.permits.retire();
        let mut released = left.map(|l| std::mem::take(&mut l.released));
        for h in self.releases.lock().drain(..) {
            let relays = released
                .as_mut()
                .and_then(|r| {
                    let at = r.iter().position(|(r, _)| Arc::ptr_eq(r, &h))?;
                    Some(r.swap_remove(at).1)
                })
                .unwrap_or_default();
            h.abandon(relays);
        }
    }

    /// Takes everything this fenced instance still has queued or taken: the responders
    /// of its requests (the ones it may never answer), and the keys' states that were on
    /// their way to it. What it held is dropped (its keys are rebuilt elsewhere; a
    /// pending response refers back to the instance that answers it, so a queue left
    /// full would never be freed).
    pub(crate) fn take_left(&self) -> Left<S, R> {
        let mut held = Vec::new();
        let mut current = None;
        let mut query = None;
        // Same lock order as the loop's take: the mailbox, then the taken batch; a
        // request is always in one of the two. The batch was queued first.
        self.mailbox.drain(|queue| {
            let mut taken = self.taken.lock();
            held.extend(taken.batch.drain(..));
            held.extend(queue.drain(..));
            current = taken.current.take();
            query = taken.query.take();
        });
        // A stalled loop that wakes up finds this and stops; an idle one is woken for
        // it (`drain` wakes nobody, and an idle loop would sleep for good).
        self.mailbox.push(Message::Stop);
        let mut left = Left {
            unanswered: Vec::new(),
            released: Vec::new(),
            incoming: Relays::default(),
            queries: Vec::new(),
            stalled_query: None,
        };
        match query {
            Some(QueryWork::Taken(ask)) => left.queries.push(ask),
            Some(QueryWork::Running { key, unit, answer }) => {
                left.stalled_query = Some((key, unit, answer))
            }
            None => {}
        }
        // In queue order: a key's state on its way here is the one to relay for a
        // release of that key that comes after it.
        for message in held {
            match message {
                Message::Request(q) => {
                    let key = Key::copy_from(q.key.as_slice());
                    left.unanswered
                        .extend(q.responder.map(|r| (q.offset, Some(key), r)));
                }
                Message::Query(ask) => left.queries.push(ask),
                Message::Acquire { keys, source } => match source {
                    Source::Handoff(h) => {
                        for k in keys {
                            left.incoming.insert(k, h.clone());
                        }
                    }
                    Source::Rebuild { relays, .. } => {
                        for k in keys {
                            match relays.get(&k) {
                                Some(h) => left.incoming.insert(k, h.clone()),
                                None => left.incoming.remove(&k),
                            };
                        }
                    }
                },
                Message::Release { keys, handoff } => {
                    let relays = keys
                        .iter()
                        .filter_map(|k| left.incoming.remove_entry(k))
                        .collect();
                    left.released.push((handoff, relays));
                }
                Message::Checkpoint(_) | Message::Stop | Message::TakenQuery => {}
            }
        }
        left.unanswered
            .extend(current.map(|(offset, r)| (offset, None, r)));
        left
    }

    /// The next message the loop took, waiting for the mailbox when the batch is done.
    /// A request's responder moves to `current` until it is answered.
    fn next_message(&self, handled: &mut Handled<'_>) -> Message<S, R> {
        loop {
            {
                let mut taken = self.taken.lock();
                if self.is_fenced() {
                    // Fenced before what it left was taken (see `fence_work`): nothing
                    // more comes out of the batch or the mailbox, where the fence
                    // finds it.
                    return Message::Stop;
                }
                if let Some(mut message) = taken.batch.pop_front() {
                    if let Message::Request(q) = &mut message {
                        taken.current = q.responder.take().map(|r| (q.offset, r));
                    }
                    return match message {
                        Message::Query(ask) => {
                            taken.query = Some(QueryWork::Taken(ask));
                            Message::TakenQuery
                        }
                        other => other,
                    };
                }
            }
            // The batch is done: its permits go back before waiting for more.
            handled.release();
            self.mailbox
                .take_all(|queue| std::mem::swap(queue, &mut self.taken.lock().batch));
        }
    }

    /// Answers the request the loop is on; hands the result back if its responder was
    /// taken meanwhile (the instance was declared lost while on it).
    fn answer_current(&self, result: Result<R>) -> Option<Result<R>> {
        let current = self.taken.lock().current.take();
        match current {
            Some((_, responder)) => {
                responder.answer(result);
                None
            }
            None => Some(result),
        }
    }

    /// The offset of the request the loop is on, if any: the one `take_left` leaves
    /// without its key (the log has it).
    pub(crate) fn current_offset(&self) -> Option<Offset> {
        self.taken
            .lock()
            .current
            .as_ref()
            .map(|(offset, _)| *offset)
    }

    /// Puts back a message the loop took just before its work was fenced (see
    /// [`fence_work`](Self::fence_work)), where `take_left` finds it: a request with
    /// its responder, a handoff with the states on their way. A query stays in
    /// `Taken::query`, as `next_message` left it.
    fn put_back_message(&self, message: Message<S, R>) {
        let mut taken = self.taken.lock();
        match message {
            Message::Request(mut q) => {
                if q.responder.is_none() && taken.current.as_ref().is_some_and(|c| c.0 == q.offset)
                {
                    q.responder = taken.current.take().map(|(_, r)| r);
                }
                taken.batch.push_front(Message::Request(q));
            }
            Message::TakenQuery | Message::Stop => {}
            other => taken.batch.push_front(other),
        }
    }

    /// Puts what the loop took but did not start on back in the mailbox.
    fn put_back_taken(&self) {
        let mut batch = std::mem::take(&mut self.taken.lock().batch);
        self.mailbox.put_back(&mut batch);
    }

    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Whether [`fence`](Self::fence) retired it: messages sent to it now would be
    /// found by nobody.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Begins a unit of work on the request at `offset` (live or replayed); it ends when
    /// the guard drops.
    fn begin_on(&self, offset: Offset) -> Beat<'_> {
        // Released before the heartbeat moves: whoever sees the unit begin sees its
        // offset, and whoever sees a later unit's offset sees this unit end.
        self.working_on.store(offset, Ordering::Release);
        self.heartbeat.begin()
    }

    /// The key of the query the loop took, and how far the key must be rebuilt for it
    /// (see [`Ask::until`]); `None` if the instance was lost meanwhile and the query
    /// went to the key's new holder.
    fn taken_query(&self) -> Option<(Key, Offset)> {
        match &self.taken.lock().query {
            Some(QueryWork::Taken(ask)) => Some((Key::copy_from(ask.key()), ask.until())),
            _ => None,
        }
    }

    /// Takes back the query the loop took, if it is still its own.
    fn take_query(&self) -> Option<Box<dyn Ask<S>>> {
        let mut taken = self.taken.lock();
        match taken.query.take() {
            Some(QueryWork::Taken(ask)) => Some(ask),
            other => {
                taken.query = other;
                None
            }
        }
    }

    /// Takes back the query the loop took and begins a unit of work on it, which ends
    /// when the guard drops; `None` if the instance was lost meanwhile (the query went
    /// to the key's new holder). Under the same lock as a lost instance's
    /// [`take_left`](Self::take_left): the query is either routed again, or run here.
    fn begin_query(&self) -> Option<(Box<dyn Ask<S>>, Beat<'_>)> {
        let mut taken = self.taken.lock();
        let ask = match taken.query.take() {
            Some(QueryWork::Taken(ask)) => ask,
            other => {
                taken.query = other;
                return None;
            }
        };
        let beat = self.begin_on(ON_A_QUERY);
        taken.query = Some(QueryWork::Running {
            key: Key::copy_from(ask.key()),
            unit: self.heartbeat.sample(),
            answer: ask.stall_answer(),
        });
        Some((ask, beat))
    }

    /// The query the loop ran is over: a stall can no longer answer it.
    fn end_query(&self) {
        self.taken.lock().query = None;
    }

    /// The request the instance is in a unit of work on, if it is in one: read when it
    /// is declared stalled, to tell which request the stall caught it on.
    pub(crate) fn stuck_on(&self) -> Option<Offset> {
        let before = self.heartbeat.still_stalled();
        let offset = self.working_on.load(Ordering::Acquire);
        // The unit the supervisor declared stalled ran throughout the read (its count
        // never moved), so the offset is the one written before it began. An instance
        // that finished that unit since (a stall is acted on later than it is seen) was
        // not caught on the request it is on now: `None`.
        (before && self.heartbeat.still_stalled() && offset != ON_A_QUERY).then_some(offset)
    }
}

/// What a fenced instance leaves behind (see [`Instance::take_left`]).
pub(crate) struct Left<S, R> {
    /// Its requests not answered yet, with their keys (`None` for the one it was on:
    /// the log has it).
    pub(crate) unanswered: Vec<(Offset, Option<Key>, Responder<R>)>,
    /// The handoffs it had queued to complete, each with the states on their way to it
    /// for the keys it was to release.
    released: Vec<(Arc<Handoff<S>>, Relays<S>)>,
    /// The states on their way to it for the keys it keeps holding.
    pub(crate) incoming: Relays<S>,
    /// The queries it had queued and not started: run again where their keys are.
    pub(crate) queries: Vec<Box<dyn Ask<S>>>,
    /// The query it was running, if any: the key, the heartbeat's count of the unit of
    /// work it runs in, and how to answer it (only if a stall caught the instance in
    /// that unit: see [`Heartbeat::stalled_in`]).
    pub(crate) stalled_query: Option<(Key, u64, StallAnswer)>,
}

/// How an instance loop starts.
pub(crate) enum Start {
    Empty,
    /// After a restart or at open: rebuild these keys up to their limits first, from
    /// `checkpoint` if given (else the latest one in the store). `unavailable`: keys
    /// whose rebuild failed before the restart, still to be rebuilt.
    Restore {
        limits: HashMap<Bytes, Offset, ahash::RandomState>,
        checkpoint: Option<Arc<Checkpoint>>,
        unavailable: Unavailable,
    },
}

/// Why an instance loop returned.
pub(crate) enum Exit {
    /// Told to stop, or fenced.
    Stopped,
    /// The handler panicked: restart with these keys rebuilt up to these limits, and
    /// these keys still unavailable.
    Restart {
        limits: HashMap<Bytes, Offset, ahash::RandomState>,
        unavailable: Unavailable,
    },
}

/// Keys whose state this instance could not rebuild (the store failed to read, say),
/// and why. A request of such a key first rebuilds it again, up to the request (at most
/// once per [`REBUILD_RETRY_AFTER`]: a log damaged for good would otherwise be replayed
/// at every request), and is answered [`Error::StateUnavailable`] if that fails too or
/// is not tried; a checkpoint round rebuilds them all again, and fails while any stays
/// unavailable (a checkpoint without a key's state would lose it). A key that moves away
/// leaves this set: its next owner rebuilds it from the log.
///
/// A key is rebuilt up to one of its own requests, never up to another key's: requests
/// of different keys can reach a queue out of log order, those of one key cannot.
pub(crate) type Unavailable = HashMap<Key, Failed, ahash::RandomState>;

/// How long after a failed rebuild of a key a request of it tries again.
const REBUILD_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Why a key is unavailable.
pub(crate) struct Failed {
    /// When the last rebuild failed.
    at: Instant,
    /// The error of the last rebuild that failed.
    cause: Arc<str>,
    /// The offset that rebuild was to reach.
    until: Offset,
    /// The latest checkpoint a rebuild of the key may start from: the offset it moved
    /// here at. Records of the key before it were handled by the instance it came from,
    /// so a checkpoint past it would hold them, and folding the log from there would
    /// apply them twice (checkpoints never pass a key in transit, as
    /// [`acquire`] checks; this keeps the retries to the same rule).
    checkpoint_at_most: Offset,
}

impl Failed {
    /// The reason of the [`Error::StateUnavailable`] of a request of `key`.
    fn reason(&self, key: &[u8]) -> String {
        rebuild_failed(key, self.until, &self.cause)
    }
}

/// The reason of the [`Error::StateUnavailable`] of a request of `key`, whose rebuild
/// up to `until` failed for `cause`.
pub(crate) fn rebuild_failed(key: &[u8], until: Offset, cause: &str) -> String {
    format!(
        "the state of key {:?} could not be rebuilt up to offset {until}: {cause}",
        String::from_utf8_lossy(key)
    )
}

/// Answers requests met during a fold: those of a lost instance, through the orphaned responders.
struct Answer<'a, H: Handler> {
    shared: &'a Shared<H>,
    me: &'a Instance<H::State, H::Response>,
}

/// A rebuild on an instance that was declared lost meanwhile has no effect: its new
/// owner rebuilds the same keys and answers for them.
impl<H: Handler> FoldSink<H::Response> for Answer<'_, H> {
    fn handled(&mut self, offset: Offset, outcome: std::result::Result<H::Response, Error>) {
        if !self.me.is_fenced() {
            self.shared.completed(offset);
            self.shared.answer(offset, outcome);
        }
    }

    fn poison(&mut self, offset: Offset, message: String) -> Result<()> {
        if self.me.is_fenced() {
            // Not marked: the panic may come from being fenced (a refused call).
            return Err(Error::Fenced {
                instance: self.me.id,
            });
        }
        // Marked durably before the answer: see `Shared::poison`.
        let marked = self.shared.poison(offset);
        self.shared.answer(
            offset,
            Err(Error::HandlerPanicked {
                instance: self.me.id,
                offset,
                message,
            }),
        );
        marked
    }

    fn refused(&mut self, offset: Offset, error: Error) {
        if self.me.is_fenced() {
            return; // its new owner's fold refuses it, and marks it
        }
        // Set aside durably before the answer, as the live loop does (see `handle`).
        if let Err(mark) = self.shared.poison(offset) {
            tracing::error!(instance = %self.me.id, offset, error = %mark, "could not set aside an undecodable request");
        }
        self.shared.completed(offset);
        self.shared.answer(offset, Err(error));
    }
}

type States<S> = HashMap<Key, Slot<S>, ahash::RandomState>;

/// Requests handled whose queue permits are not given back yet: the loop gives them back
/// when its batch is done, every [`RELEASE_EVERY`] requests, and when it returns. One
/// atomic update per request on a line the producers also write was 2–3% of the
/// cluster bench's CPU.
struct Handled<'a> {
    permits: &'a Permits,
    count: usize,
}

/// The most permits an instance loop holds back.
const RELEASE_EVERY: usize = 32;

impl Handled<'_> {
    fn release(&mut self) {
        self.permits.release_many(std::mem::take(&mut self.count));
    }
}

impl Drop for Handled<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// The loop of one instance.
pub(crate) fn run<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    start: Start,
) -> Exit {
    let mut states: States<H::State> = HashMap::default();
    let mut unavailable = Unavailable::default();
    match start {
        Start::Empty => {}
        Start::Restore {
            limits,
            checkpoint,
            unavailable: still,
        } => {
            unavailable = still;
            match rebuild(shared, me, &limits, checkpoint, &HashMap::default()) {
                Ok(rebuilt) => states = rebuilt,
                Err(e) => {
                    tracing::error!(instance = %me.id, error = %e, "could not rebuild the instance's keys");
                    // Its own keys, at open or after a restart: any checkpoint is fine.
                    give_up(shared, me, &mut unavailable, limits, &e, Offset::MAX);
                }
            }
        }
    }
    me.stats.keys.store(states.len(), Ordering::Relaxed);
    let mut handled = Handled {
        permits: &me.permits,
        count: 0,
    };
    loop {
        let message = me.next_message(&mut handled);
        if me.is_fenced() {
            // Taken just before the fence: left where the fence looks.
            me.put_back_message(message);
            if let Some(ask) = me.take_query() {
                // Taken but not found by the fence (a stopping cluster fences first):
                // whoever holds its key now runs it, or it is refused `Closed`.
                shared.route_query_again(ask);
            }
            return Exit::Stopped;
        }
        match message {
            message @ (Message::Query(_) | Message::TakenQuery) => {
                // `next_message` gives queries as `TakenQuery`, the query kept aside.
                if let Message::Query(ask) = message {
                    me.taken.lock().query = Some(QueryWork::Taken(ask));
                }
                me.stats.queries.fetch_add(1, Ordering::Relaxed);
                query(shared, me, &mut states, &mut unavailable);
                handled.count += 1;
                if handled.count == RELEASE_EVERY {
                    handled.release();
                }
                me.stats.keys.store(states.len(), Ordering::Relaxed);
            }
            Message::Request(queued) => {
                me.stats.requests.fetch_add(1, Ordering::Relaxed);
                let submitted = queued.submitted;
                let exit = handle(shared, me, &mut states, &mut unavailable, queued);
                handled.count += 1;
                if handled.count == RELEASE_EVERY {
                    handled.release();
                }
                if let Some(at) = submitted {
                    me.stats.latency.record(at.elapsed());
                }
                me.stats.keys.store(states.len(), Ordering::Relaxed);
                if let Some(exit) = exit {
                    // The restarted loop handles what this one had taken.
                    me.put_back_taken();
                    return exit;
                }
            }
            Message::Release { keys, handoff } => {
                let out = keys
                    .into_iter()
                    .map(|k| {
                        let slot = states.remove(k.as_ref());
                        // An unavailable key goes without a state: its next owner
                        // rebuilds it from the log.
                        unavailable.remove(k.as_ref());
                        (k, slot)
                    })
                    .collect();
                handoff.complete(out);
                me.releases.lock().retain(|h| !Arc::ptr_eq(h, &handoff));
                me.stats.keys.store(states.len(), Ordering::Relaxed);
            }
            Message::Acquire { keys, source } => {
                let until = source.until();
                let wanted = keys.clone();
                match acquire(shared, me, &mut states, keys, source) {
                    Ok(()) => wanted
                        .iter()
                        .for_each(|k| drop(unavailable.remove(k.as_ref()))),
                    Err(e) => {
                        if !me.is_fenced() {
                            // A fenced one's new owner rebuilds the keys (see `give_up`).
                            tracing::error!(instance = %me.id, error = %e, "could not rebuild moved keys");
                        }
                        let failed = wanted
                            .into_iter()
                            .filter(|k| !states.contains_key(k.as_ref()))
                            .map(|k| (k, until))
                            .collect();
                        give_up(shared, me, &mut unavailable, failed, &e, until);
                    }
                }
                me.stats.keys.store(states.len(), Ordering::Relaxed);
            }
            Message::Checkpoint(round) => {
                if !unavailable.is_empty() {
                    // Every request before the round's offset was queued before it.
                    let keys: Vec<Key> = unavailable.keys().cloned().collect();
                    rebuild_again(
                        shared,
                        me,
                        &mut states,
                        &mut unavailable,
                        &keys,
                        round.offset,
                    );
                    me.stats.keys.store(states.len(), Ordering::Relaxed);
                }
                match unavailable.iter().next() {
                    Some((key, failed)) => round.fail(me.id, failed.reason(key.as_slice())),
                    None => match encode_states::<H>(&states) {
                        Ok(parts) => round.contribute(me.id, parts),
                        Err(e) => round.fail(me.id, e.to_string()),
                    },
                }
            }
            Message::Stop => return Exit::Stopped,
        }
    }
}

/// A rebuild of `keys` (each up to its offset) failed with `e`: the requests of lost
/// instances that waited for it are answered now, and the keys are unavailable until a
/// rebuild of them works (see [`Unavailable`]). `checkpoint_at_most`: see
/// [`Failed::checkpoint_at_most`].
fn give_up<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    unavailable: &mut Unavailable,
    keys: HashMap<Bytes, Offset, ahash::RandomState>,
    e: &Error,
    checkpoint_at_most: Offset,
) {
    if me.is_fenced() {
        // Its new owner rebuilds these keys and answers for them.
        return;
    }
    let cause: Arc<str> = e.to_string().into();
    shared.refuse_orphans(me.id, &keys, &cause);
    for (key, until) in keys {
        let at_most = unavailable
            .get(key.as_ref())
            .map_or(checkpoint_at_most, |f| {
                f.checkpoint_at_most.min(checkpoint_at_most)
            });
        unavailable.insert(
            Key::copy_from(&key),
            Failed {
                at: Instant::now(),
                cause: cause.clone(),
                until,
                checkpoint_at_most: at_most,
            },
        );
    }
}

/// Rebuilds the unavailable `keys` again, up to `until`; those it rebuilds are available
/// again. False if it failed (the keys stay unavailable, with this failure's cause).
fn rebuild_again<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    states: &mut States<H::State>,
    unavailable: &mut Unavailable,
    keys: &[Key],
    until: Offset,
) -> bool {
    let at_most = keys
        .iter()
        .filter_map(|k| unavailable.get(k.as_slice()))
        .map(|f| f.checkpoint_at_most)
        .min()
        .unwrap_or(Offset::MAX);
    let limits: HashMap<Bytes, Offset, ahash::RandomState> = keys
        .iter()
        .map(|k| (Bytes::copy_from_slice(k.as_slice()), until))
        .collect();
    let _pinned = Pinned(&me.pinned);
    let rebuilt = shared.checkpoint_for(&me.pinned).and_then(|checkpoint| {
        if checkpoint.offset > at_most {
            return Err(Error::StateUnavailable {
                instance: me.id,
                reason: format!(
                    "the checkpoint at {} is past offset {at_most}, where the key moved here",
                    checkpoint.offset
                ),
            });
        }
        rebuild(shared, me, &limits, Some(checkpoint), &HashMap::default())
    });
    match rebuilt {
        Ok(rebuilt) => {
            keys.iter()
                .for_each(|k| drop(unavailable.remove(k.as_slice())));
            states.extend(rebuilt);
            true
        }
        Err(e) => {
            give_up(shared, me, unavailable, limits, &e, at_most);
            false
        }
    }
}

/// Whether `key`'s state is here to use. A key whose rebuild failed is rebuilt again
/// first, up to `until` (at most every [`REBUILD_RETRY_AFTER`]).
fn available<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    states: &mut States<H::State>,
    unavailable: &mut Unavailable,
    key: &[u8],
    until: Offset,
) -> bool {
    let failed_at = match unavailable.is_empty() || states.contains_key(key) {
        true => None,
        false => unavailable.get(key).map(|f| f.at),
    };
    !failed_at.is_some_and(|at| {
        at.elapsed() < REBUILD_RETRY_AFTER
            || !rebuild_again(
                shared,
                me,
                states,
                unavailable,
                &[Key::copy_from(key)],
                until,
            )
    })
}

/// Runs the query the loop took on its key's state (the default state for a key with
/// none yet). Every request of the key queued before it has been handled, and none
/// after it.
fn query<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    states: &mut States<H::State>,
    unavailable: &mut Unavailable,
) {
    let Some((key, until)) = me.taken_query() else {
        return;
    };
    let key = key.as_slice();
    // Every request of the key before `until` was queued here before the query: a
    // rebuild up to it folds exactly those. The rebuild can stall, and the instance be
    // lost: the query, still in `Taken`, then goes to the key's new holder.
    if !available(shared, me, states, unavailable, key, until) {
        let Some(ask) = me.take_query() else {
            return;
        };
        if me.is_fenced() {
            shared.route_query_again(ask);
            return;
        }
        let reason = unavailable.get(key).map(|f| f.reason(key));
        ask.refuse(Error::StateUnavailable {
            instance: me.id,
            reason: reason.unwrap_or_default(),
        });
        return;
    }
    let Some((ask, beat)) = me.begin_query() else {
        return;
    };
    let running = super::reentry::enter(shared.cluster_id(), Some(me.id), None);
    match states.get(key) {
        Some(slot) => ask.run(&slot.state, Some(me.id)),
        None => ask.run(&H::State::default(), Some(me.id)),
    }
    drop(running);
    drop(beat);
    me.end_query();
}

fn handle<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    states: &mut States<H::State>,
    unavailable: &mut Unavailable,
    queued: Queued<H::Response>,
) -> Option<Exit> {
    let Queued {
        offset,
        timestamp,
        key,
        payload,
        durable,
        ..
    } = queued;
    // An instance declared lost while on this request has had its responder adopted by
    // the cluster: the answer goes there (the first answer wins, and the rebuild of the
    // key on its new owner gives the same one, unless this request is poisoned below).
    let answer = |result: Result<H::Response>| {
        if let Some(result) = me.answer_current(result) {
            shared.answer(offset, result);
        }
    };
    // Queued before it was durable (its submit waits for that after releasing the key's
    // stripe: see `Shared::submit_from`), and not handled before it is. A log that
    // cannot make it durable refuses it here as it refuses its submit.
    if !durable && let Err(e) = shared.wait_logged(offset + 1) {
        answer(Err(e));
        return None;
    }
    let Some(body) = fold::request_body(payload.as_slice()) else {
        // Only the cluster queues requests, always tagged; refuse anything else.
        answer(Err(Error::Codec {
            context: "input log envelope",
            message: format!("record at offset {offset} is not a request"),
        }));
        return None;
    };
    let key = key.as_slice();
    if !available(shared, me, states, unavailable, key, offset) {
        if me.is_fenced() {
            // Declared lost meanwhile (the retry was cut short): the new owner handles
            // this request and answers it.
            return None;
        }
        // Still unavailable: refused, as the requests that waited for the rebuild were.
        let reason = unavailable.get(key).map(|f| f.reason(key));
        answer(Err(Error::StateUnavailable {
            instance: me.id,
            reason: reason.unwrap_or_default(),
        }));
        return None;
    }
    let slot = match states.get_mut(key) {
        Some(slot) => slot,
        None => states.entry(Key::copy_from(key)).or_insert_with(|| Slot {
            state: H::State::default(),
            folded_until: 0,
        }),
    };
    let beat = me.begin_on(offset);
    let request = fold::Request {
        offset,
        timestamp,
        key,
        body,
    };
    let outcome = fold::apply(
        &*shared.handler,
        &shared.effects,
        me.id,
        Some(&*me.fenced),
        false,
        request,
        &mut slot.state,
    );
    drop(beat);
    if me.is_fenced() {
        // Declared lost while on this request: its new owner handles it and answers
        // it, so this outcome has no effect at all (no answer, no poison mark, no
        // state). The loop stops at its next message.
        return None;
    }
    match outcome {
        Outcome::Answered(response) => {
            slot.folded_until = offset + 1;
            answer(Ok(response));
            None
        }
        Outcome::Refused(e) => {
            // Undecodable (serde attributes bincode cannot read back): set aside
            // durably before the answer, so that an open that finds undecodable requests
            // unmarked knows they were not refused here (the `Request` type changed).
            if let Err(mark) = shared.poison(offset) {
                tracing::error!(instance = %me.id, offset, error = %mark, "could not set aside an undecodable request");
            }
            slot.folded_until = offset + 1;
            answer(Err(e));
            None
        }
        // Only a journal-only replay diverges; a live instance calls out instead.
        Outcome::Diverged(e) => {
            slot.folded_until = offset + 1;
            answer(Err(e));
            None
        }
        Outcome::Panicked(message) => {
            tracing::warn!(instance = %me.id, offset, %message, "handler panicked; restarting the instance");
            // Marked durably before the answer: see `Shared::poison`.
            if let Err(e) = shared.poison(offset) {
                tracing::error!(instance = %me.id, offset, error = %e, "could not log the poison mark");
            }
            answer(Err(Error::HandlerPanicked {
                instance: me.id,
                offset,
                message,
            }));
            slot.folded_until = offset + 1;
            let limits = states
                .iter()
                .map(|(k, s)| (Bytes::copy_from_slice(k.as_slice()), s.folded_until))
                .collect();
            Some(Exit::Restart {
                limits,
                unavailable: std::mem::take(unavailable),
            })
        }
    }
}

fn acquire<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    states: &mut States<H::State>,
    keys: Vec<Bytes>,
    source: Source<H::State>,
) -> Result<()> {
    // Handoffs to take keys from, keys to fold from the checkpoint, and keys to fold
    // from a state relayed from further back (encoded, with its offset).
    let mut handoffs: Takes<H::State> = Vec::new();
    let mut from_checkpoint: Vec<Bytes> = Vec::new();
    let mut relayed: HashMap<Bytes, (Offset, Bytes), ahash::RandomState> = HashMap::default();
    let until = match source {
        Source::Handoff(h) => {
            let until = h.until;
            handoffs.push((h, keys));
            until
        }
        Source::Rebuild { until, relays } => {
            split_relayed(keys, &relays, &mut handoffs, &mut from_checkpoint);
            until
        }
    };
    while let Some((h, keys)) = handoffs.pop() {
        match h.take(&keys) {
            Handed::Ready(entries) => {
                for (key, slot) in entries {
                    match slot {
                        // Handed over at the move itself: the state as it is.
                        Some(slot) if h.until >= until => {
                            states.insert(Key::copy_from(&key), slot);
                        }
                        Some(slot) => {
                            let encoded = Bytes::from(fold::CODEC.encode(&slot.state)?);
                            relayed.insert(key, (h.until, encoded));
                        }
                        None => from_checkpoint.push(key),
                    }
                }
            }
            Handed::Abandoned(relays) => {
                split_relayed(keys, &relays, &mut handoffs, &mut from_checkpoint)
            }
        }
    }
    if from_checkpoint.is_empty() && relayed.is_empty() {
        return Ok(());
    }
    let _pinned = Pinned(&me.pinned);
    let checkpoint = shared.checkpoint_for(&me.pinned)?;
    // A checkpoint past the move holds records of these keys that the instance they
    // came from handled (and any newer than a relayed state was taken without it, so
    // poison marks and journaled answers before it may be forgotten): folding from it
    // would apply them twice. Membership changes order handoffs and checkpoints so that
    // this does not happen; if it did, no answer from these keys could be trusted.
    if (!from_checkpoint.is_empty() && checkpoint.offset > until)
        || relayed.values().any(|(from, _)| *from < checkpoint.offset)
    {
        return Err(Error::StateUnavailable {
            instance: me.id,
            reason: format!(
                "moved keys' records before offset {until} are already in the checkpoint at {}",
                checkpoint.offset
            ),
        });
    }
    let limits = from_checkpoint
        .into_iter()
        .chain(relayed.keys().cloned())
        .map(|k| (k, until))
        .collect();
    states.extend(rebuild(shared, me, &limits, Some(checkpoint), &relayed)?);
    Ok(())
}

/// Handoffs to take states out of, each with the keys to take.
type Takes<S> = Vec<(Arc<Handoff<S>>, Vec<Bytes>)>;

/// Sorts `keys` between the handoffs `relays` names for them and the checkpoint.
fn split_relayed<S>(
    keys: Vec<Bytes>,
    relays: &Relays<S>,
    handoffs: &mut Takes<S>,
    from_checkpoint: &mut Vec<Bytes>,
) {
    for key in keys {
        match relays.get(&key) {
            Some(h) => match handoffs.iter_mut().find(|(o, _)| Arc::ptr_eq(o, h)) {
                Some((_, keys)) => keys.push(key),
                None => handoffs.push((h.clone(), vec![key])),
            },
            None => from_checkpoint.push(key),
        }
    }
}

fn rebuild<H: Handler>(
    shared: &Shared<H>,
    me: &Instance<H::State, H::Response>,
    limits: &HashMap<Bytes, Offset, ahash::RandomState>,
    checkpoint: Option<Arc<Checkpoint>>,
    relayed: &HashMap<Bytes, (Offset, Bytes), ahash::RandomState>,
) -> Result<States<H::State>> {
    // Pinned by the caller that took it (`acquire`, `rebuild_again`), or here: the
    // open's checkpoint, which no checkpoint can replace before this instance gives its
    // part, after this rebuild (unless it is fenced, and then its pin counts for
    // nothing).
    let _pinned = Pinned(&me.pinned);
    let checkpoint = match checkpoint {
        Some(cp) => {
            me.pinned.store(cp.offset, Ordering::SeqCst);
            cp
        }
        None => shared.checkpoint_for(&me.pinned)?,
    };
    let mut poisoned: BTreeSet<Offset> = shared.poisoned();
    let mut sink = Answer { shared, me };
    let replay = fold::Replay {
        handler: &*shared.handler,
        effects: &shared.effects,
        instance: me.id,
        fenced: Some(&*me.fenced),
        input: &*shared.input,
        handled_before: shared.handled_before(),
    };
    let rebuilt = fold::rebuild(
        replay,
        &checkpoint,
        relayed,
        &mut poisoned,
        limits,
        &mut sink,
        // Each replayed request is a unit of work: one that hangs is a stall.
        |offset| me.begin_on(offset),
    )?;
    Ok(rebuilt
        .into_iter()
        .map(|(key, slot)| (Key::copy_from(&key), slot))
        .collect())
}

/// Unpins the instance's checkpoint (see [`Instance::pinned`]) when the fold that pinned
/// it ends, however it ends.
struct Pinned<'a>(&'a AtomicU64);

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.0.store(Offset::MAX, Ordering::SeqCst);
    }
}

fn encode_states<H: Handler>(states: &States<H::State>) -> Result<Vec<(Bytes, Bytes)>> {
    states
        .iter()
        .map(|(k, slot)| {
            let key = Bytes::copy_from_slice(k.as_slice());
            Ok((key, Bytes::from(fold::CODEC.encode(&slot.state)?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    type Msg = Message<u64, u64>;

    struct Count(AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Polls for a permit as the future whose waker counts its wake-ups in `count`, and
    /// whose registration is `registration`.
    fn poll_as(
        permits: &Permits,
        count: &Arc<Count>,
        registration: &mut Registration,
    ) -> Poll<bool> {
        let waker = Waker::from(count.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        permits
            .poll_acquire(&mut cx, registration)
            .map(|took| took.is_ok())
    }

    fn waiters(permits: &Permits) -> usize {
        let count = permits.waiting.count.load(Ordering::SeqCst);
        assert_eq!(count, permits.waiting.lock.lock().by_key.len());
        count
    }

    #[test]
    fn a_release_wakes_every_waiting_submit_and_a_retirement_too() {
        let permits = Permits::new(1);
        let (a, b) = (
            Arc::new(Count(AtomicUsize::new(0))),
            Arc::new(Count(AtomicUsize::new(0))),
        );
        let (mut ra, mut rb) = (Registration::default(), Registration::default());
        assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Ready(true));
        // Full: both register. `b` stands for a future not polled again after its
        // wake-up: the wake-up must not be the only one.
        assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Pending);
        assert_eq!(poll_as(&permits, &b, &mut rb), Poll::Pending);
        assert_eq!(waiters(&permits), 2);
        permits.release();
        assert_eq!(a.0.load(Ordering::SeqCst), 1);
        assert_eq!(b.0.load(Ordering::SeqCst), 1);
        assert_eq!(waiters(&permits), 0);
        // The woken one takes the room; polling again while full registers anew.
        assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Ready(true));
        assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Pending);
        permits.retire();
        assert_eq!(a.0.load(Ordering::SeqCst), 2);
        assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Ready(false));
        assert_eq!(waiters(&permits), 0);
    }

    #[test]
    fn a_future_polled_again_before_a_release_is_registered_once() {
        let permits = Permits::new(1);
        let a = Arc::new(Count(AtomicUsize::new(0)));
        let mut ra = Registration::default();
        assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Ready(true));
        for _ in 0..100 {
            assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Pending);
        }
        assert_eq!(waiters(&permits), 1);
        permits.release();
        assert_eq!(a.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll_as(&permits, &a, &mut ra), Poll::Ready(true));
        assert_eq!(waiters(&permits), 0);
    }

    #[test]
    fn a_future_dropped_while_it_waits_leaves_no_waker_behind() {
        let permits = Permits::new(1);
        let holder = Arc::new(Count(AtomicUsize::new(0)));
        assert_eq!(
            poll_as(&permits, &holder, &mut Registration::default()),
            Poll::Ready(true)
        );
        // Ten thousand futures, each polled once on a full queue and dropped (a timeout
        // around each submit): none stays listed, and none keeps its task alive.
        let task = Arc::new(Count(AtomicUsize::new(0)));
        for _ in 0..10_000 {
            let mut registration = Registration::default();
            assert_eq!(poll_as(&permits, &task, &mut registration), Poll::Pending);
        }
        assert_eq!(waiters(&permits), 0);
        assert_eq!(
            Arc::strong_count(&task),
            1,
            "a dropped future's waker is held"
        );
        // One still waiting is woken by the release, as before.
        let waiter = Arc::new(Count(AtomicUsize::new(0)));
        let mut registration = Registration::default();
        assert_eq!(poll_as(&permits, &waiter, &mut registration), Poll::Pending);
        permits.release();
        assert_eq!(waiter.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            poll_as(&permits, &waiter, &mut registration),
            Poll::Ready(true)
        );
        assert_eq!(waiters(&permits), 0);
    }

    #[test]
    fn a_future_that_moves_to_another_queue_leaves_the_first() {
        let (first, second) = (Permits::new(1), Permits::new(1));
        let holder = Arc::new(Count(AtomicUsize::new(0)));
        let mut held = Registration::default();
        assert_eq!(poll_as(&first, &holder, &mut held), Poll::Ready(true));
        assert_eq!(poll_as(&second, &holder, &mut held), Poll::Ready(true));
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let mut registration = Registration::default();
        assert_eq!(poll_as(&first, &task, &mut registration), Poll::Pending);
        assert_eq!(poll_as(&second, &task, &mut registration), Poll::Pending);
        assert_eq!((waiters(&first), waiters(&second)), (0, 1));
        drop(registration);
        assert_eq!(waiters(&second), 0);
    }

    struct Unpark(std::thread::Thread);

    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    #[test]
    fn no_waiting_submit_misses_the_release_it_waits_for() {
        // Three threads share one permit, each taking it as a future would and giving it
        // back at once. A wake-up lost between a failed look and a release would leave a
        // thread parked with the permit free: it would then sit out the whole timeout.
        let permits = Arc::new(Permits::new(1));
        // All three start together, and now and then one holds the permit a while: on a
        // busy machine, threads run one after another otherwise, and nobody waits.
        let start = Arc::new(std::sync::Barrier::new(3));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (permits, start) = (permits.clone(), start.clone());
                std::thread::spawn(move || {
                    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
                    let mut cx = std::task::Context::from_waker(&waker);
                    let mut registration = Registration::default();
                    let (mut waited, mut timed_out) = (0, 0);
                    start.wait();
                    for i in 0..3_000 {
                        loop {
                            match permits.poll_acquire(&mut cx, &mut registration) {
                                Poll::Ready(took) => {
                                    assert!(took.is_ok());
                                    break;
                                }
                                Poll::Pending => {
                                    waited += 1;
                                    let before = Instant::now();
                                    std::thread::park_timeout(Duration::from_secs(2));
                                    if before.elapsed() >= Duration::from_secs(2) {
                                        timed_out += 1;
                                    }
                                }
                            }
                        }
                        // Hold it a moment, so that the others find it taken.
                        match i % 50 {
                            0 => std::thread::sleep(Duration::from_micros(200)),
                            _ => std::thread::yield_now(),
                        }
                        permits.release();
                    }
                    (waited, timed_out)
                })
            })
            .collect();
        let mut waited = 0;
        for t in threads {
            let (w, timed_out) = t.join().unwrap();
            assert_eq!(timed_out, 0, "a waiting submit missed a release");
            waited += w;
        }
        assert!(waited > 0, "no thread ever waited: the test tested nothing");
        assert_eq!(permits.in_use(), 0);
    }

    fn acquire(key: &'static [u8], h: &Arc<Handoff<u64>>) -> Msg {
        Message::Acquire {
            keys: vec![Bytes::from_static(key)],
            source: Source::Handoff(h.clone()),
        }
    }

    fn release(key: &'static [u8], h: &Arc<Handoff<u64>>) -> Msg {
        Message::Release {
            keys: vec![Bytes::from_static(key)],
            handoff: h.clone(),
        }
    }

    /// The relays a lost instance leaves for its release of `b"k"`.
    fn relays_for_release(left: &Left<u64, u64>) -> Vec<Offset> {
        left.released
            .iter()
            .flat_map(|(_, r)| r.values().map(|h| h.until))
            .collect()
    }

    #[test]
    fn a_release_relays_the_state_on_its_way_before_it_in_queue_order() {
        let me: Instance<u64, u64> = Instance::new(InstanceId(0), 1, 16, Duration::ZERO);
        let incoming = Arc::new(Handoff::new(10));
        let outgoing = Arc::new(Handoff::new(20));
        // Taken by the loop first (older), then still in the mailbox (newer).
        me.taken.lock().batch.push_back(acquire(b"k", &incoming));
        me.mailbox.push(release(b"k", &outgoing));
        let left = me.take_left();
        assert_eq!(relays_for_release(&left), vec![10]);
        assert!(left.incoming.is_empty());
    }

    #[test]
    fn a_release_never_relays_a_state_that_comes_after_it() {
        let me: Instance<u64, u64> = Instance::new(InstanceId(0), 1, 16, Duration::ZERO);
        let outgoing = Arc::new(Handoff::new(20));
        let later = Arc::new(Handoff::new(30));
        // The release was taken by the loop; the key's next acquire came in after it.
        // Relaying `later` to the release's taker would make it wait on a state that
        // only exists after the release (on this instance's own release, in the worst
        // case).
        me.taken.lock().batch.push_back(release(b"k", &outgoing));
        me.mailbox.push(acquire(b"k", &later));
        let left = me.take_left();
        assert!(relays_for_release(&left).is_empty());
        let kept: Vec<Offset> = left.incoming.values().map(|h| h.until).collect();
        assert_eq!(kept, vec![30]);
    }

    #[test]
    fn a_relay_is_taken_key_by_key_by_several_owners() {
        let h: Handoff<u64> = Handoff::new(5);
        let slot = |state| {
            Some(Slot {
                state,
                folded_until: 5,
            })
        };
        assert!(h.complete(vec![
            (Bytes::from_static(b"a"), slot(1)),
            (Bytes::from_static(b"b"), slot(2)),
        ]));
        let Handed::Ready(first) = h.take(&[Bytes::from_static(b"b")]) else {
            panic!("handed over");
        };
        let Handed::Ready(second) = h.take(&[Bytes::from_static(b"a")]) else {
            panic!("handed over");
        };
        assert_eq!(first[0].1.as_ref().map(|s| s.state), Some(2));
        assert_eq!(second[0].1.as_ref().map(|s| s.state), Some(1));
        // Abandoning a completed handoff changes nothing.
        h.abandon(Relays::default());
        assert!(
            matches!(h.take(&[Bytes::from_static(b"a")]), Handed::Ready(v) if v[0].1.is_none())
        );
    }
}
