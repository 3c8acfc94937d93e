//! [`Supervisor`]: a thread that watches heartbeats and calls back on stalls and ticks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::Heartbeat;
use crate::error::{Error, Result};
use crate::router::InstanceId;

/// What a supervisor watches, and what it tells when something is wrong.
///
/// The supervisor calls these on its own thread. A panic in any of them ends that
/// thread: supervision stops, [`Supervisor::is_running`] turns false, and the panic
/// message goes to the panic hook (stderr by default). The supervisor does not catch it
/// and go on: a target that panicked may be in a state nobody checked, and would likely
/// panic again at every tick.
pub trait Supervised: Send + Sync + 'static {
    /// The instances to watch, with their heartbeats.
    fn heartbeats(&self) -> Vec<(InstanceId, Arc<Heartbeat>)>;

    /// `id` has been inside one unit of work for longer than the stall timeout;
    /// `busy_for` (always above the timeout) is how long the supervisor has seen it busy.
    ///
    /// The supervisor samples heartbeats once per tick and counts a unit of work from
    /// the first tick that sees it, without reading a clock on the instance's side (the
    /// heartbeat is bumped per unit of work and stays one atomic add). So the report
    /// comes once the unit has run between the stall timeout and the stall timeout plus
    /// two ticks, and `busy_for` is short of the unit's true run time by up to one tick.
    /// A tick here is the `tick` given to [`Supervisor::start`] plus the time one round
    /// of these calls takes.
    fn stalled(&self, id: InstanceId, busy_for: Duration);

    /// Called once per tick after the stall checks (periodic work: checkpoints, ...).
    fn tick(&self);
}

/// Watches a [`Supervised`] every `tick` on its own thread until dropped or stopped.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use cauce::launcher::{Heartbeat, Supervised, Supervisor};
/// use cauce::router::InstanceId;
///
/// struct Quiet;
/// impl Supervised for Quiet {
///     fn heartbeats(&self) -> Vec<(InstanceId, Arc<Heartbeat>)> { Vec::new() }
///     fn stalled(&self, _: InstanceId, _: Duration) {}
///     fn tick(&self) {}
/// }
///
/// let mut supervisor =
///     Supervisor::start(Arc::new(Quiet), Duration::from_millis(20), Duration::from_secs(5))?;
/// assert!(supervisor.is_running());
/// supervisor.stop();
/// assert!(!supervisor.is_running());
/// // A zero tick would spin a core: it is refused.
/// assert!(Supervisor::start(Arc::new(Quiet), Duration::ZERO, Duration::from_secs(5)).is_err());
/// # Ok::<(), cauce::Error>(())
/// ```
pub struct Supervisor {
    stop: Arc<(Mutex<bool>, Condvar)>,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts watching `target`: an instance busy for longer than `stall_timeout` is
    /// reported once per stall through [`Supervised::stalled`] (see there how late), and
    /// [`Supervised::tick`] is called every `tick`.
    ///
    /// Both must be above zero ([`Error::Config`]): a zero tick would spin a core, and a
    /// zero stall timeout would report every unit of work that spans a tick. A duration
    /// too long to pass (`Duration::MAX`) is fine: a stall timeout that long reports no
    /// stall, and a tick that long never looks (stopping still works at once).
    pub fn start<S: Supervised>(
        target: Arc<S>,
        tick: Duration,
        stall_timeout: Duration,
    ) -> Result<Self> {
        if tick.is_zero() {
            return Err(Error::Config(
                "Supervisor::start: tick must be above zero (a zero tick spins a core)".into(),
            ));
        }
        if stall_timeout.is_zero() {
            return Err(Error::Config(
                "Supervisor::start: stall_timeout must be above zero (zero reports every unit \
                 of work that spans a tick as stalled)"
                    .into(),
            ));
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let running = Arc::new(AtomicBool::new(true));
        let (s, r) = (stop.clone(), running.clone());
        let thread = std::thread::Builder::new()
            .name("cauce-supervisor".to_string())
            .spawn(move || {
                // Cleared however the thread ends: returning, or a panic of the target.
                let _running = ClearOnExit(r);
                let (lock, cond) = &*s;
                // Per instance: the odd heartbeat value last seen, since when, whether
                // that stall was reported, and the heartbeat it was read from (a
                // `Supervised` may hand a fresh one under an id seen before, whose count
                // starts over: its first unit is not the old one's). Holding the `Arc`
                // keeps the old heartbeat's address from being reused by a new one.
                let mut busy: HashMap<InstanceId, (u64, Instant, bool, Arc<Heartbeat>)> =
                    HashMap::new();
                let mut stopped = lock.lock();
                while !*stopped {
                    cond.wait_for(&mut stopped, tick);
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    let now = Instant::now();
                    let beats = target.heartbeats();
                    busy.retain(|id, _| beats.iter().any(|(b, _)| b == id));
                    for (id, beat) in beats {
                        let sample = beat.sample();
                        if sample % 2 == 0 {
                            busy.remove(&id);
                            continue;
                        }
                        let since = busy
                            .entry(id)
                            .or_insert_with(|| (sample, now, false, beat.clone()));
                        if since.0 != sample || !Arc::ptr_eq(&since.3, &beat) {
                            *since = (sample, now, false, beat.clone());
                        } else if !since.2 && now - since.1 > stall_timeout {
                            since.2 = true;
                            beat.declare_stalled(sample);
                            target.stalled(id, now - since.1);
                        }
                    }
                    target.tick();
                    stopped = lock.lock();
                }
            })
            .map_err(|source| Error::Spawn {
                name: "cauce-supervisor".to_string(),
                source,
            })?;
        Ok(Supervisor {
            stop,
            running,
            thread: Some(thread),
        })
    }

    /// True while the supervisor thread runs: false once it was stopped, and once a
    /// panic of the target ended it (see [`Supervised`]).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Stops the supervisor and waits for its thread.
    pub fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Marks the supervisor as not running when its thread ends, on unwind too.
struct ClearOnExit(Arc<AtomicBool>);

impl Drop for ClearOnExit {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the supervisor stopped: its target panicked");
        }
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}
