//! Threads that append for async submits when the input log's appends wait for the disk.
//!
//! Under [`SyncPolicy::Always`](crate::store::SyncPolicy::Always) an append returns once
//! its records are fdatasync'd: a millisecond or more. An async submit that appended
//! inside `poll` would hold its executor's thread that long (and, on a runtime of two
//! threads, let at most two submits share one fdatasync). So async submits take room in
//! the queue as futures, then hand the append to one of these threads and wait for it
//! as a future too. Many appends in flight at once share one fdatasync through the log's
//! group commit. The threads start with the first such submit.

use crossbeam_channel::{Receiver, Sender, unbounded};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// An append to run on an appender thread. It may leave the wait for its records to be
/// durable in `Finishes`, run once the thread has run the appends queued behind it.
pub(crate) type Job = Box<dyn FnOnce(&mut Finishes) + Send>;

/// The second halves of the appends a thread ran: each waits for its records to be
/// durable (`Store::wait_appended`) and answers. A thread runs every append queued to it
/// (up to [`BATCH`]) before the first of these, so one group commit covers them all:
/// waiting for each in turn, 16 threads let at most 16 requests share an fdatasync.
pub(crate) type Finishes = Vec<Box<dyn FnOnce() + Send>>;

/// The most appends a thread runs before it waits for them.
const BATCH: usize = 64;

/// The appender threads of a cluster, started on first use.
pub(crate) struct Appenders {
    threads: usize,
    state: Mutex<State>,
}

enum State {
    /// No submit needed them yet.
    Idle,
    Running(Pool),
    /// No thread starts any more.
    Stopped,
}

struct Pool {
    jobs: Sender<Job>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Appenders {
    /// Up to `threads` appends in flight at once (at least 1).
    pub(crate) fn new(threads: usize) -> Self {
        Appenders {
            threads: threads.max(1),
            state: Mutex::new(State::Idle),
        }
    }

    /// Runs `job` on an appender thread. Gives it back if it cannot: the cluster is
    /// stopping, or no thread could be started (the caller then runs it itself, or
    /// refuses it).
    pub(crate) fn run(&self, job: Job) -> std::result::Result<(), (Job, Error)> {
        let mut state = self.state.lock();
        if let State::Idle = *state {
            match start(self.threads) {
                Ok(started) => *state = State::Running(started),
                Err(e) => return Err((job, e)),
            }
        }
        match &*state {
            // The threads hold the receiver until the pool is stopped, under this lock.
            State::Running(pool) => pool
                .jobs
                .send(job)
                .map_err(|e| (e.into_inner(), Error::Closed)),
            State::Idle | State::Stopped => Err((job, Error::Closed)),
        }
    }

    /// Stops the threads once they have run every job handed to them. Called by the
    /// cluster's shutdown, never from an appender thread.
    pub(crate) fn stop(&self) {
        let state = std::mem::replace(&mut *self.state.lock(), State::Stopped);
        if let State::Running(Pool { jobs, handles }) = state {
            drop(jobs);
            for h in handles {
                let _ = h.join();
            }
        }
    }
}

fn start(threads: usize) -> Result<Pool> {
    let (jobs, queue) = unbounded::<Job>();
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads {
        let queue: Receiver<Job> = queue.clone();
        let name = format!("cauce-append-{i}");
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut finishes = Finishes::new();
                while let Ok(job) = queue.recv() {
                    run(job, &mut finishes);
                    for _ in 1..BATCH {
                        match queue.try_recv() {
                            Ok(job) => run(job, &mut finishes),
                            Err(_) => break,
                        }
                    }
                    for finish in finishes.drain(..) {
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(finish));
                    }
                }
            });
        match spawned {
            Ok(h) => handles.push(h),
            // The threads started so far serve alone.
            Err(source) if !handles.is_empty() => {
                tracing::warn!(thread = %name, error = %source, "could not start an appender thread");
                break;
            }
            Err(source) => return Err(Error::Spawn { name, source }),
        }
    }
    Ok(Pool { jobs, handles })
}

/// Runs one job; the thread goes on serving the others if it panics. (A job turns a
/// panic of the store into `Error::StorePanicked` itself; one that panics anyway
/// answers its caller `Closed`, its responder dropped.)
fn run(job: Job, finishes: &mut Finishes) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(finishes)));
}
