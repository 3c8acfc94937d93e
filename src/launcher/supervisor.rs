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
pub trait Supervised: Send + Sync + 'static {
    /// The instances to watch, with their heartbeats.
    fn heartbeats(&self) -> Vec<(InstanceId, Arc<Heartbeat>)>;

    /// `id` has been inside one unit of work for longer than the stall timeout (measured
    /// by sampling its heartbeat every tick, so up to one tick late).
    fn stalled(&self, id: InstanceId, busy_for: Duration);

    /// Called once per tick after the stall checks (periodic work: checkpoints, ...).
    fn tick(&self);
}

/// Watches a [`Supervised`] every `tick` on its own thread until dropped or stopped.
pub struct Supervisor {
    stop: Arc<(Mutex<bool>, Condvar)>,
    running: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts watching `target`: an instance busy for longer than `stall_timeout` is
    /// reported once per stall through [`Supervised::stalled`].
    pub fn start<S: Supervised>(
        target: Arc<S>,
        tick: Duration,
        stall_timeout: Duration,
    ) -> Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let running = Arc::new(AtomicBool::new(true));
        let (s, r) = (stop.clone(), running.clone());
        let thread = std::thread::Builder::new()
            .name("cauce-supervisor".to_string())
            .spawn(move || {
                let (lock, cond) = &*s;
                // Per instance: the odd heartbeat value last seen, since when, and whether
                // that stall was reported.
                let mut busy: HashMap<InstanceId, (u64, Instant, bool)> = HashMap::new();
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
                        let since = busy.entry(id).or_insert((sample, now, false));
                        if since.0 != sample {
                            *since = (sample, now, false);
                        } else if !since.2 && now - since.1 > stall_timeout {
                            since.2 = true;
                            target.stalled(id, now - since.1);
                        }
                    }
                    target.tick();
                    stopped = lock.lock();
                }
                r.store(false, Ordering::SeqCst);
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

    /// True while the supervisor thread runs.
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

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}
