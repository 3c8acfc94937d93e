//! The committed end of a store, and the threads waiting for it to move.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::record::Offset;

/// Publishes a store's committed end (`next_offset`) and lets readers block until it
/// passes an offset, or register a [`Waker`] for it, without a lock on the append path
/// when nobody waits.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    next: AtomicU64,
    /// Threads blocked in `wait_for`, plus the wakers registered.
    waiters: AtomicUsize,
    wakes: AtomicU64,
    lock: Mutex<()>,
    cond: Condvar,
    /// Registered by `poll_wait`; all woken (and dropped) when the end next moves, or at a wake.
    wakers: Mutex<Vec<Waker>>,
    /// How many wakers are registered: a wake-up with only blocked threads waiting
    /// does not take the wakers' lock.
    registered: AtomicUsize,
}

impl Tail {
    pub(crate) fn new(next: Offset) -> Self {
        Tail {
            next: AtomicU64::new(next),
            ..Tail::default()
        }
    }

    /// How many threads and wakers wait.
    #[cfg(test)]
    pub(crate) fn waiters(&self) -> usize {
        self.waiters.load(Ordering::SeqCst)
    }

    /// The committed end.
    pub(crate) fn get(&self) -> Offset {
        self.next.load(Ordering::SeqCst)
    }

    /// Moves the committed end up to `next` (never down), and says whether anyone
    /// waits for it: the caller then calls [`wake_waiting`](Self::wake_waiting), once it
    /// has let go of its own lock.
    ///
    /// A store advances the end under the lock that orders its appends: a reader that
    /// finds records under that lock then finds none the end does not cover yet, and
    /// ends arrive in order. Never down is only a guard (the max costs what a `SeqCst`
    /// store costs): a late call with an older end would otherwise hide committed
    /// records from readers until the next append. The wake-up comes after that lock: a
    /// waiter woken under it would first wait for it (a reader takes it for the records
    /// not yet written out), and an executor's waker would run under it. A wake-up that
    /// comes late is never lost: a waiter checks the end under the tail's own lock
    /// before it sleeps.
    #[must_use = "wake the waiters with `wake_waiting` when this is true"]
    pub(crate) fn advance(&self, next: Offset) -> bool {
        // SeqCst pairs with the waiter's increment then load in `wait_for`: either this
        // load sees the waiter, or the waiter's load sees the new end.
        self.next.fetch_max(next, Ordering::SeqCst);
        self.waiters.load(Ordering::SeqCst) > 0
    }

    /// Wakes the threads blocked in `wait_for` and the registered wakers, after an
    /// [`advance`](Self::advance) that found some.
    pub(crate) fn wake_waiting(&self) {
        {
            let _guard = self.lock.lock();
            self.cond.notify_all();
        }
        self.wake_registered();
    }

    /// [`advance`](Self::advance), then the wake-up.
    #[cfg(test)]
    pub(crate) fn publish(&self, next: Offset) {
        if self.advance(next) {
            self.wake_waiting();
        }
    }

    /// Wakes every waiter, whether the end moved or not.
    pub(crate) fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.wake_waiting();
    }

    /// Wakes (and forgets) every registered waker.
    fn wake_registered(&self) {
        if self.registered.load(Ordering::SeqCst) == 0 {
            return;
        }
        let wakers = std::mem::take(&mut *self.wakers.lock());
        if wakers.is_empty() {
            return;
        }
        self.registered.fetch_sub(wakers.len(), Ordering::SeqCst);
        self.waiters.fetch_sub(wakers.len(), Ordering::SeqCst);
        for waker in wakers {
            waker.wake();
        }
    }

    /// `Ready` with the end once it is past `offset`; otherwise registers `cx`'s waker,
    /// to be woken when the end next moves or at [`wake`](Self::wake) (which the caller checks
    /// for by its own state: a closed stream), and is `Pending`. A waker registered
    /// twice (the same task polling again) is kept once.
    pub(crate) fn poll_wait(&self, offset: Offset, cx: &mut Context<'_>) -> Poll<Offset> {
        let now = self.get();
        if now > offset {
            return Poll::Ready(now);
        }
        {
            let mut wakers = self.wakers.lock();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
                // SeqCst, then the load below: pairs with `advance`'s store then load,
                // as in `wait_for`.
                self.registered.fetch_add(1, Ordering::SeqCst);
                self.waiters.fetch_add(1, Ordering::SeqCst);
            }
        }
        let now = self.get();
        if now > offset {
            return Poll::Ready(now);
        }
        Poll::Pending
    }

    /// Blocks until the end is past `offset`, `timeout` passes, or [`wake`](Self::wake)
    /// is called. Returns the end.
    pub(crate) fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
        let now = self.get();
        if now > offset {
            return now;
        }
        // A timeout too long to be a point in time is no deadline at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let wakes = self.wakes.load(Ordering::SeqCst);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock();
        loop {
            let now = self.get();
            if now > offset || self.wakes.load(Ordering::SeqCst) != wakes {
                break;
            }
            match deadline {
                Some(d) => {
                    if self.cond.wait_until(&mut guard, d).timed_out() {
                        break;
                    }
                }
                None => self.cond.wait(&mut guard),
            }
        }
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        self.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_end_never_moves_back() {
        let tail = Tail::new(0);
        tail.publish(6);
        // An appender that committed 5 before another committed 6, publishing late.
        tail.publish(5);
        assert_eq!(tail.get(), 6);
        assert_eq!(tail.wait_for(5, Some(Duration::from_millis(1))), 6);
    }

    /// Waits until `n` threads are registered as waiting on `tail` (30 s at most), so
    /// that what the test does next reaches a thread already in `wait_for`: a wake sent
    /// before the waiter got there would leave it waiting forever.
    fn until_waiting(tail: &Tail, n: usize) {
        let started = Instant::now();
        while tail.waiters.load(Ordering::SeqCst) < n {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the waiter never started waiting"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Joins a waiter thread that reports on `done`, failing the test (rather than
    /// hanging it) if it is not woken within 30 s.
    fn woken(done: &std::sync::mpsc::Receiver<Offset>) -> Offset {
        done.recv_timeout(Duration::from_secs(30))
            .expect("the waiter was not woken")
    }

    /// Counts its wakes.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_registered_waker_is_woken_once_by_publish_and_by_wake() {
        let tail = Tail::new(3);
        let counting = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(counting.clone());
        let mut cx = Context::from_waker(&waker);
        assert_eq!(tail.poll_wait(2, &mut cx), Poll::Ready(3));
        assert_eq!(tail.poll_wait(3, &mut cx), Poll::Pending);
        // Polled again before anything happened: registered once.
        assert_eq!(tail.poll_wait(3, &mut cx), Poll::Pending);
        assert_eq!(tail.waiters.load(Ordering::SeqCst), 1);
        tail.publish(4);
        assert_eq!(counting.0.load(Ordering::SeqCst), 1);
        assert_eq!(tail.waiters.load(Ordering::SeqCst), 0);
        // Woken wakers are forgotten: another publish does not wake it again.
        tail.publish(5);
        assert_eq!(counting.0.load(Ordering::SeqCst), 1);
        assert_eq!(tail.poll_wait(4, &mut cx), Poll::Ready(5));
        assert_eq!(tail.poll_wait(5, &mut cx), Poll::Pending);
        tail.wake();
        assert_eq!(counting.0.load(Ordering::SeqCst), 2);
        assert_eq!(tail.waiters.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn waiter_wakes_on_publish_and_on_wake() {
        let tail = Arc::new(Tail::new(0));
        let (report, done) = std::sync::mpsc::channel();
        let (t, r) = (tail.clone(), report.clone());
        std::thread::spawn(move || r.send(t.wait_for(4, None)).unwrap());
        until_waiting(&tail, 1);
        tail.publish(5);
        assert_eq!(woken(&done), 5);

        let t = tail.clone();
        std::thread::spawn(move || report.send(t.wait_for(10, None)).unwrap());
        until_waiting(&tail, 1);
        tail.wake();
        assert_eq!(woken(&done), 5);
        assert_eq!(tail.wait_for(10, Some(Duration::from_millis(5))), 5);
    }
}
