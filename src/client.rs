//! Pending responses: what `submit` returns, waited on blocking or awaited as a future.
//!
//! A [`Pending`] is the receiving half of a one-shot slot. The instance that handles the
//! request fills it; the first answer wins and later ones are ignored, which is what lets
//! a supervisor hand a stalled instance's request to another instance without ever
//! answering twice. It needs no async runtime: `wait` blocks the thread, and `Pending`
//! is also a [`Future`] that any executor can poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::record::Offset;

struct Slot<T> {
    state: Mutex<SlotState<T>>,
    ready: Condvar,
    /// Set once answered: lets a waiter spin briefly without taking the lock.
    answered: AtomicBool,
    /// Set once the value was handed out (by `wait`, `wait_timeout` or `poll`), under
    /// the lock; read without it by a dropped [`Pending`], which then has nothing to
    /// free.
    taken: AtomicBool,
    /// Live [`Responder`]s: the last one to go answers [`Error::Closed`] if nobody
    /// answered, so no waiter is left blocked on a request nobody will handle.
    responders: AtomicUsize,
}

/// Whatever will answer a pending response, told when a waiter is about to block: a
/// cluster instance that lingers between batches wakes up for it.
pub(crate) trait Nudge: Send + Sync {
    /// Somebody waits for an answer this will give.
    fn nudge(&self);
}

struct SlotState<T> {
    value: Option<Result<T>>,
    answered: bool,
    /// The [`Pending`] was dropped: an answer is dropped at once, not kept. The slots
    /// of a batch share one allocation, which lives as long as any of them: without
    /// this, one kept pending would hold the answers of all its dropped siblings.
    abandoned: bool,
    waker: Option<Waker>,
    /// Who answers: told when somebody is about to block on the answer.
    answerer: Option<Arc<dyn Nudge>>,
}

/// A response that will arrive: wait for it with [`wait`](Pending::wait) or
/// [`wait_timeout`](Pending::wait_timeout), or `.await` it on any executor.
///
/// ```
/// # use cauce::cluster::{Cluster, Handler, Context};
/// # struct Echo;
/// # impl Handler for Echo {
/// #     type State = ();
/// #     type Request = u32;
/// #     type Response = u32;
/// #     fn handle(&self, _: &mut Context<'_>, _: &[u8], _: &mut (), r: u32) -> u32 { r }
/// # }
/// # let cluster = Cluster::builder(Echo).in_memory().instances(1).build().unwrap();
/// # let client = cluster.client();
/// let pending = client.submit("k", 7).unwrap();
/// // Its offset in the input log is its identity (the log also holds membership records).
/// assert_eq!(pending.offset() + 1, client.metrics().next_offset);
/// assert_eq!(pending.wait().unwrap(), 7);
/// # cluster.shutdown().unwrap();
/// ```
#[must_use = "dropping a pending response drops its answer (a submitted request is handled all the same)"]
pub struct Pending<T> {
    slot: SlotRef<T>,
    offset: Offset,
}

/// The answering half of a [`Pending`]. Cloneable; the first answer wins. Dropping the
/// last one unanswered answers [`Error::Closed`].
pub(crate) struct Responder<T> {
    slot: SlotRef<T>,
}

/// One slot of a block allocated for a whole submit: a batch's slots share one
/// allocation and one reference count. A slot each, allocated by the submitting thread
/// in a burst and freed by two threads, overflowed glibc's per-thread cache: batches of
/// 64 spent a quarter of the submitter's time in `malloc` and `free`.
struct SlotRef<T> {
    block: Arc<[Slot<T>]>,
    index: usize,
}

impl<T> Clone for SlotRef<T> {
    fn clone(&self) -> Self {
        SlotRef {
            block: self.block.clone(),
            index: self.index,
        }
    }
}

impl<T> std::ops::Deref for SlotRef<T> {
    type Target = Slot<T>;

    fn deref(&self) -> &Slot<T> {
        &self.block[self.index]
    }
}

impl<T> Slot<T> {
    fn new() -> Self {
        Slot {
            state: Mutex::new(SlotState {
                value: None,
                answered: false,
                abandoned: false,
                waker: None,
                answerer: None,
            }),
            ready: Condvar::new(),
            answered: AtomicBool::new(false),
            taken: AtomicBool::new(false),
            responders: AtomicUsize::new(1),
        }
    }
}

impl<T> Clone for Responder<T> {
    fn clone(&self) -> Self {
        self.slot.responders.fetch_add(1, Ordering::Relaxed);
        Responder {
            slot: self.slot.clone(),
        }
    }
}

impl<T> Drop for Responder<T> {
    fn drop(&mut self) {
        if self.slot.responders.fetch_sub(1, Ordering::AcqRel) == 1 && !self.is_answered() {
            self.answer(Err(Error::Closed));
        }
    }
}

/// A new pending response for the request at `offset`, and its responder.
pub(crate) fn pending<T>(offset: Offset) -> (Pending<T>, Responder<T>) {
    let block: Arc<[Slot<T>]> = Arc::new([Slot::new()]);
    pair(block, 0, offset)
}

/// Pending responses for the requests at `offsets`, with their responders, their slots
/// in one allocation.
pub(crate) fn pendings<T>(
    offsets: std::ops::Range<Offset>,
) -> impl Iterator<Item = (Pending<T>, Responder<T>)> {
    let block: Arc<[Slot<T>]> = offsets.clone().map(|_| Slot::new()).collect();
    offsets
        .enumerate()
        .map(move |(index, offset)| pair(block.clone(), index, offset))
}

/// The pending response and the responder of slot `index` of `block`.
fn pair<T>(block: Arc<[Slot<T>]>, index: usize, offset: Offset) -> (Pending<T>, Responder<T>) {
    let slot = SlotRef { block, index };
    (
        Pending {
            slot: slot.clone(),
            offset,
        },
        Responder { slot },
    )
}

impl<T> Responder<T> {
    /// Whether the [`Pending`] was dropped: nobody will read an answer.
    pub(crate) fn is_abandoned(&self) -> bool {
        self.slot.state.lock().abandoned
    }

    /// Whether the response was given (by anyone).
    pub(crate) fn is_answered(&self) -> bool {
        self.slot.answered.load(Ordering::Acquire)
    }

    /// Answers, unless someone already did; returns whether this call answered. The
    /// value is dropped at once if the [`Pending`] was dropped.
    pub(crate) fn answer(&self, value: Result<T>) -> bool {
        let mut state = self.slot.state.lock();
        if state.answered {
            return false;
        }
        state.answered = true;
        self.slot.answered.store(true, Ordering::Release);
        if state.abandoned {
            drop(state);
            drop(value);
            return true;
        }
        state.value = Some(value);
        let waker = state.waker.take();
        drop(state);
        self.slot.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
        true
    }
}

impl<T> Pending<T> {
    /// Spins, then yields, for a short while, and not past `deadline`: an answer that is
    /// about to arrive is picked up without the cost of sleeping and being woken.
    fn spin_until_answered(&self, deadline: Option<Instant>) {
        let backoff = crossbeam_utils::Backoff::new();
        while !self.slot.answered.load(Ordering::Acquire)
            && !backoff.is_completed()
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            backoff.snooze();
        }
        self.nudge_unless_answered();
    }

    /// Names who will answer: it is nudged when a waiter is about to block.
    pub(crate) fn set_answerer(&self, answerer: Arc<dyn Nudge>) {
        self.slot.state.lock().answerer = Some(answerer);
    }

    /// Tells the answerer that somebody is about to block on this answer.
    fn nudge_unless_answered(&self) {
        if self.slot.answered.load(Ordering::Acquire) {
            return;
        }
        let answerer = self.slot.state.lock().answerer.clone();
        nudge(answerer);
    }

    /// The offset of the request in the input log: its identity. For a query
    /// (`Client::query`), the input log's next offset when it was made: the state it
    /// reads is the fold of its key's requests before this offset. (Under
    /// `SyncPolicy::Always` that can count requests of other keys still on their way to
    /// the disk: the log shows them, and so reaches this offset, once they are durable.)
    pub fn offset(&self) -> Offset {
        self.offset
    }

    /// True when the response has arrived (waiting will not block).
    pub fn is_ready(&self) -> bool {
        // Set under the lock with the value, and never cleared: no lock to read it.
        self.slot.answered.load(Ordering::Acquire)
    }

    /// Blocks until the response arrives.
    ///
    /// It spins briefly first; before it sleeps, it wakes the cluster instance that owes
    /// the answer if that instance is lingering between batches (see
    /// `ClusterBuilder::linger`), so one request at a time is served without a linger's
    /// delay. `wait_timeout` does the same, and so does a poll as a future that leaves a
    /// new waker (an executor's first poll, or a poll from another task).
    ///
    /// The response is handed out once: after `wait_timeout` or a poll returned it,
    /// waiting again is [`Error::Closed`].
    pub fn wait(self) -> Result<T> {
        self.spin_until_answered(None);
        let mut state = self.slot.state.lock();
        loop {
            if let Some(v) = take(&self.slot, &mut state) {
                return v;
            }
            self.slot.ready.wait(&mut state);
        }
    }

    /// Blocks until the response arrives or `timeout` passes ([`Error::Timeout`]; the
    /// request stays accepted and will still be handled, so waiting again is fine).
    /// Its first spin counts toward `timeout` and ends with it (a yield in it can
    /// still overrun a very short timeout by one time slice of the scheduler).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<T> {
        // A timeout too long to be a point in time is no deadline at all.
        let deadline = Instant::now().checked_add(timeout);
        self.spin_until_answered(deadline);
        let mut state = self.slot.state.lock();
        loop {
            if let Some(v) = take(&self.slot, &mut state) {
                return v;
            }
            let Some(deadline) = deadline else {
                self.slot.ready.wait(&mut state);
                continue;
            };
            if self.slot.ready.wait_until(&mut state, deadline).timed_out() {
                return take(&self.slot, &mut state).unwrap_or(Err(Error::Timeout(timeout)));
            }
        }
    }
}

/// Tells `answerer`, if any, that somebody waits for its answer. Only a lingering
/// instance is named as an answerer: without linger this is nothing.
fn nudge(answerer: Option<Arc<dyn Nudge>>) {
    if let Some(answerer) = answerer {
        answerer.nudge();
    }
}

/// The response if it can be handed out now: the value, or `Closed` once it was taken.
fn take<T>(slot: &Slot<T>, state: &mut SlotState<T>) -> Option<Result<T>> {
    if slot.taken.load(Ordering::Relaxed) {
        return Some(Err(Error::Closed));
    }
    let v = state.value.take()?;
    slot.taken.store(true, Ordering::Release);
    Some(v)
}

impl<T> Future for Pending<T> {
    type Output = Result<T>;

    /// Ready once the response arrived. A poll that leaves a new waker also wakes the
    /// instance that owes the answer if it lingers (as [`wait`](Pending::wait) does):
    /// otherwise an awaited answer would wait out the linger, which may be endless.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut state = self.slot.state.lock();
        if let Some(v) = take(&self.slot, &mut state) {
            return Poll::Ready(v);
        }
        let replace = state
            .waker
            .as_ref()
            .is_none_or(|w| !w.will_wake(cx.waker()));
        if replace {
            state.waker = Some(cx.waker().clone());
            let answerer = state.answerer.clone();
            drop(state);
            nudge(answerer);
        }
        Poll::Pending
    }
}

impl<T> Drop for Pending<T> {
    /// Frees an answer nobody will take now, and has a later one dropped on arrival.
    fn drop(&mut self) {
        if self.slot.taken.load(Ordering::Acquire) {
            // Handed out: nothing is left to free, and no answer is stored after this.
            return;
        }
        let mut state = self.slot.state.lock();
        state.abandoned = true;
        let value = state.value.take();
        let waker = state.waker.take();
        let answerer = state.answerer.take();
        drop(state);
        drop((value, waker, answerer));
    }
}

impl<T> std::fmt::Debug for Pending<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("offset", &self.offset)
            .field("ready", &self.is_ready())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    /// The spin before sleeping counts toward the timeout: with threads hogging both
    /// cores, its yields alone made a zero timeout take 11-22 ms on average.
    #[test]
    fn a_zero_timeout_returns_at_once_however_busy_the_cores_are() {
        let stop = Arc::new(AtomicBool::new(false));
        let hogs: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let (p, _r) = pending::<u32>(0);
        // Each call is timed on its own and the median is judged, not the mean: a test
        // thread preempted by the hogs or by other load on the machine slows only the
        // calls it happens in, and a few such calls can carry the mean of 100 past the
        // bound. Yields counted outside the timeout would slow most calls, as they did
        // (11-22 ms on average) when this test was written.
        let mut took: Vec<Duration> = (0..100)
            .map(|_| {
                let started = Instant::now();
                assert!(matches!(
                    p.wait_timeout(Duration::ZERO),
                    Err(Error::Timeout(_))
                ));
                started.elapsed()
            })
            .collect();
        stop.store(true, Ordering::Relaxed);
        for h in hogs {
            h.join().expect("hog");
        }
        took.sort_unstable();
        let median = took[took.len() / 2];
        assert!(
            median < Duration::from_millis(2),
            "wait_timeout(ZERO): {median:?} a call (median; slowest {:?})",
            took[took.len() - 1]
        );
    }

    #[test]
    fn first_answer_wins() {
        let (p, r) = pending::<u32>(5);
        let r2 = r.clone();
        assert!(r.answer(Ok(1)));
        assert!(!r2.answer(Ok(2)));
        assert_eq!(p.wait().unwrap(), 1);
    }

    #[test]
    fn wait_timeout_times_out_then_succeeds() {
        let (p, r) = pending::<u32>(0);
        assert!(matches!(
            p.wait_timeout(Duration::from_millis(5)),
            Err(Error::Timeout(_))
        ));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            r.answer(Ok(9));
        });
        assert_eq!(p.wait_timeout(Duration::from_secs(5)).unwrap(), 9);
    }

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn future_is_woken_when_answered() {
        let (mut p, r) = pending::<u32>(0);
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut p).poll(&mut cx).is_pending());
        r.answer(Ok(3));
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(matches!(Pin::new(&mut p).poll(&mut cx), Poll::Ready(Ok(3))));
        assert!(matches!(p.wait_timeout(Duration::ZERO), Err(Error::Closed)));
    }

    #[test]
    fn pendings_of_one_block_are_answered_each_on_its_own() {
        let (mut pendings, responders): (Vec<Pending<u32>>, Vec<Responder<u32>>) =
            pendings(10..14).unzip();
        assert_eq!(
            pendings.iter().map(Pending::offset).collect::<Vec<_>>(),
            [10, 11, 12, 13]
        );
        let mut responders = responders.into_iter();
        let (first, second) = (responders.next().unwrap(), responders.next().unwrap());
        assert!(first.answer(Ok(1)));
        assert!(!pendings[1].is_ready(), "a neighbour's answer is not ours");
        drop(second);
        let rest: Vec<_> = responders.collect();
        assert!(rest[0].answer(Ok(3)));
        // Slots outlive the rest of their block: answer the last after dropping others.
        let last = pendings.pop().unwrap();
        let third = pendings.pop().unwrap();
        let results: Vec<_> = pendings.into_iter().map(Pending::wait).collect();
        assert_eq!(results[0].as_ref().unwrap(), &1);
        assert!(matches!(results[1], Err(Error::Closed)));
        assert_eq!(third.wait().unwrap(), 3);
        let answerer = std::thread::spawn(move || rest[1].answer(Ok(4)));
        assert_eq!(last.wait().unwrap(), 4);
        assert!(answerer.join().unwrap());
    }

    /// An answer that counts its drops in `.1`.
    struct Counted(u32, Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn answers_of_dropped_pendings_are_freed_while_a_sibling_of_their_block_lives() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut pendings, responders): (Vec<Pending<Counted>>, Vec<Responder<Counted>>) =
            pendings(0..64).unzip();
        let kept = pendings.pop().unwrap();
        // Half dropped before their answers, half after them but before taking them.
        let late = pendings.split_off(32);
        drop(pendings);
        for (i, r) in responders.iter().enumerate() {
            assert!(r.answer(Ok(Counted(i as u32, drops.clone()))));
        }
        assert_eq!(
            drops.load(Ordering::SeqCst),
            32,
            "dropped before the answer"
        );
        drop(late);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            63,
            "dropped before being taken"
        );
        let answer = kept.wait().unwrap();
        assert_eq!(answer.0, 63);
        assert_eq!(drops.load(Ordering::SeqCst), 63);
        drop(answer);
        drop(responders);
        assert_eq!(drops.load(Ordering::SeqCst), 64);
    }

    #[test]
    fn the_last_responder_dropped_unanswered_answers_closed() {
        let (p, r) = pending::<u32>(0);
        let other = r.clone();
        drop(r);
        assert!(!p.is_ready(), "a responder is left");
        drop(other);
        assert!(matches!(p.wait(), Err(Error::Closed)));
        // An answered one stays answered.
        let (p, r) = pending::<u32>(0);
        r.answer(Ok(4));
        drop(r);
        assert_eq!(p.wait().unwrap(), 4);
    }
}
