//! The committed end of a store, and the threads waiting for it to move.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::record::Offset;

/// Publishes a store's committed end (`next_offset`) and lets readers block until it
/// passes an offset, without a lock on the append path when nobody waits.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    next: AtomicU64,
    waiters: AtomicUsize,
    wakes: AtomicU64,
    lock: Mutex<()>,
    cond: Condvar,
}

impl Tail {
    pub(crate) fn new(next: Offset) -> Self {
        Tail {
            next: AtomicU64::new(next),
            ..Tail::default()
        }
    }

    /// The committed end.
    pub(crate) fn get(&self) -> Offset {
        self.next.load(Ordering::SeqCst)
    }

    /// Moves the committed end up to `next` (never down) and wakes the waiters.
    ///
    /// A store publishes under the lock that orders its appends: a reader that finds
    /// records under that lock then finds none the end does not cover yet, and ends
    /// arrive in order. Never down is only a guard (the max costs what a `SeqCst` store
    /// costs): a late publish of an older end would otherwise hide committed records from
    /// readers until the next append.
    pub(crate) fn publish(&self, next: Offset) {
        // SeqCst pairs with the waiter's increment then load in `wait_for`: either this
        // load sees the waiter, or the waiter's load sees the new end.
        self.next.fetch_max(next, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock();
            self.cond.notify_all();
        }
    }

    /// Wakes every waiter, whether the end moved or not.
    pub(crate) fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        let _guard = self.lock.lock();
        self.cond.notify_all();
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
