//! Launchers: start, watch, restart and stop instances.
//!
//! An instance is a loop that pulls work from its own queue. A [`Launcher`] decides where
//! that loop runs ([`ThreadLauncher`]: a named thread in this process); a [`Heartbeat`]
//! is how the loop tells the world it is alive (it marks the start and end of each unit of
//! work); and a [`Supervisor`] watches the heartbeats of every instance and reports the
//! ones that stop making progress, so that their work can be moved elsewhere.
//!
//! The cluster (the composition root) wires these together; they know nothing of handlers
//! or logs. A launcher decides where and how an instance's loop runs *in this process*
//! (a named thread, a pinned one, a thread of a pool of its own): the loop is a closure
//! over the cluster's state, not something that can run in another process.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use cauce::launcher::{Heartbeat, Launcher, ThreadLauncher};
//! use cauce::router::InstanceId;
//!
//! let beat = Arc::new(Heartbeat::new());
//! let b = beat.clone();
//! let running = ThreadLauncher::new()
//!     .launch(InstanceId(1), Box::new(move || {
//!         let _work = b.begin();
//!         std::thread::sleep(Duration::from_millis(5));
//!     }))
//!     .unwrap();
//! running.join().unwrap();
//! assert_eq!(beat.completed(), 1);
//! assert!(!beat.is_busy());
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::router::InstanceId;

mod supervisor;
pub(crate) mod thread;

pub use supervisor::{Supervised, Supervisor};
pub use thread::ThreadLauncher;

/// Starts instance loops somewhere.
pub trait Launcher: Send + Sync + 'static {
    /// Starts `body` as instance `id` and returns a handle to watch it.
    ///
    /// `body` is the instance's loop: it runs until the instance stops, so `launch` must
    /// start it on a thread of its own and return at once, never run it on the calling
    /// thread (a cluster's `build` would then wait for good). It is called from the
    /// cluster's own threads too, with the cluster's locks held: when an instance's
    /// handler panics, its replacement is launched from the old instance's thread, and a
    /// stalled instance's by the supervisor. So it must not wait for another instance
    /// to end (a pool with no free thread that waits for one deadlocks). An `Err` goes
    /// to the caller of the change that needed the instance (`Cluster::add_instance`
    /// returns it); for a replacement it is logged through `tracing`, and the keys go to
    /// the instances left.
    fn launch(&self, id: InstanceId, body: Box<dyn FnOnce() + Send>) -> Result<Box<dyn Running>>;
}

/// A launched instance.
pub trait Running: Send {
    /// True once the instance's loop has returned or panicked.
    fn is_finished(&self) -> bool;

    /// Waits for the loop to end; `Err` carries the panic message if it panicked.
    fn join(self: Box<Self>) -> std::result::Result<(), String>;
}

/// The pulse of an instance: a counter the instance bumps when a unit of work begins and
/// again when it ends (odd while busy). Written by the instance with one atomic add, no
/// clock; a [`Supervisor`] samples it and times how long it stays on one odd value.
#[derive(Debug, Default)]
pub struct Heartbeat {
    // On a line of its own: the instance writes it twice per unit of work.
    beats: crossbeam_utils::CachePadded<AtomicU64>,
    /// The count a [`Supervisor`] last declared stalled (0: none; a stalled count is
    /// odd), set before it reports the stall.
    stalled_at: AtomicU64,
}

impl Heartbeat {
    /// A heartbeat of an idle instance.
    pub fn new() -> Self {
        Heartbeat::default()
    }

    /// Marks the start of a unit of work; the unit ends when the guard drops.
    pub fn begin(&self) -> Beat<'_> {
        self.beats.fetch_add(1, Ordering::Release);
        Beat { heartbeat: self }
    }

    /// The counter: it changes whenever a unit of work begins or ends, and is odd while
    /// one runs.
    pub fn sample(&self) -> u64 {
        self.beats.load(Ordering::Acquire)
    }

    /// True while a unit of work runs.
    pub fn is_busy(&self) -> bool {
        self.sample() % 2 == 1
    }

    /// Units of work finished so far.
    pub fn completed(&self) -> u64 {
        self.sample() / 2
    }

    /// Notes that the unit of work at count `sample` was declared stalled.
    pub(crate) fn declare_stalled(&self, sample: u64) {
        self.stalled_at.store(sample, Ordering::Release);
    }

    /// Whether the unit of work counted `unit` (the count while it ran) was declared
    /// stalled, and still runs.
    pub(crate) fn stalled_in(&self, unit: u64) -> bool {
        self.still_stalled() && self.sample() == unit
    }

    /// The count of the unit of work declared stalled last, if it still runs.
    pub(crate) fn stalled_unit(&self) -> Option<u64> {
        let sample = self.sample();
        (sample % 2 == 1 && sample == self.stalled_at.load(Ordering::Acquire)).then_some(sample)
    }

    /// Whether the unit of work declared stalled last is still running: the count has
    /// not moved since the supervisor saw it.
    pub(crate) fn still_stalled(&self) -> bool {
        self.stalled_unit().is_some()
    }
}

/// A unit of work in progress (see [`Heartbeat::begin`]).
#[must_use = "the unit of work ends when the guard is dropped"]
pub struct Beat<'a> {
    heartbeat: &'a Heartbeat,
}

impl Drop for Beat<'_> {
    fn drop(&mut self) {
        self.heartbeat.beats.fetch_add(1, Ordering::Release);
    }
}
