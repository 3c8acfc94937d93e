//! The supervisor reports each stall once, and a later stall of the same instance again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cauce::launcher::{Heartbeat, Supervised, Supervisor};
use cauce::router::InstanceId;

struct One {
    beat: Arc<Heartbeat>,
    reports: AtomicUsize,
}

impl Supervised for One {
    fn heartbeats(&self) -> Vec<(InstanceId, Arc<Heartbeat>)> {
        vec![(InstanceId(1), self.beat.clone())]
    }
    fn stalled(&self, _: InstanceId, _: Duration) {
        self.reports.fetch_add(1, Ordering::SeqCst);
    }
    fn tick(&self) {}
}

/// Waits until `reports` reaches `n` (at most 10 s), then 100 ms more for any extra.
fn reports_settle(target: &One, n: usize) -> usize {
    let since = Instant::now();
    while target.reports.load(Ordering::SeqCst) < n && since.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    target.reports.load(Ordering::SeqCst)
}

#[test]
fn a_stall_is_reported_once_and_the_next_one_again() {
    let target = Arc::new(One {
        beat: Arc::new(Heartbeat::new()),
        reports: AtomicUsize::new(0),
    });
    let beat = target.beat.clone();
    let mut supervisor = Supervisor::start(
        target.clone(),
        Duration::from_millis(2),
        Duration::from_millis(20),
    )
    .unwrap();
    let first = beat.begin();
    // Ticks every 2 ms for as long as it stays stuck: one report.
    assert_eq!(reports_settle(&target, 1), 1);
    drop(first);
    // A new unit of work that gets stuck is a new stall.
    let _second = beat.begin();
    assert_eq!(reports_settle(&target, 2), 2);
    supervisor.stop();
}

#[test]
fn a_zero_tick_or_stall_timeout_is_a_typed_error_not_a_spinning_thread() {
    let target = || {
        Arc::new(One {
            beat: Arc::new(Heartbeat::new()),
            reports: AtomicUsize::new(0),
        })
    };
    match Supervisor::start(target(), Duration::ZERO, Duration::from_secs(1)) {
        Err(cauce::Error::Config(message)) => assert!(message.contains("tick"), "{message}"),
        Err(other) => panic!("zero tick: expected a Config error, got {other}"),
        Ok(_) => panic!("zero tick: started a supervisor that would spin"),
    }
    match Supervisor::start(target(), Duration::from_millis(5), Duration::ZERO) {
        Err(cauce::Error::Config(message)) => {
            assert!(message.contains("stall_timeout"), "{message}")
        }
        Err(other) => panic!("zero stall timeout: expected a Config error, got {other}"),
        Ok(_) => panic!("zero stall timeout: started a supervisor that reports every unit"),
    }
    // A stall timeout too long to ever pass is no stall detection, which works.
    let mut supervisor =
        Supervisor::start(target(), Duration::from_millis(5), Duration::MAX).unwrap();
    assert!(supervisor.is_running());
    supervisor.stop();
    // A tick too long to come never looks, and stopping does not wait for it.
    let mut supervisor =
        Supervisor::start(target(), Duration::MAX, Duration::from_secs(1)).unwrap();
    assert!(supervisor.is_running());
    supervisor.stop();
    assert!(!supervisor.is_running());
}

/// A target whose periodic work panics.
struct PanickingTick;

impl Supervised for PanickingTick {
    fn heartbeats(&self) -> Vec<(InstanceId, Arc<Heartbeat>)> {
        Vec::new()
    }
    fn stalled(&self, _: InstanceId, _: Duration) {}
    fn tick(&self) {
        panic!("the target's tick failed");
    }
}

#[test]
fn a_supervisor_whose_target_panicked_is_not_running() {
    let mut supervisor = Supervisor::start(
        Arc::new(PanickingTick),
        Duration::from_millis(2),
        Duration::from_secs(1),
    )
    .unwrap();
    let since = Instant::now();
    while supervisor.is_running() && since.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        !supervisor.is_running(),
        "the supervisor thread died in the target's tick; is_running() still says true"
    );
    supervisor.stop();
}

/// A `Supervised` that hands out a fresh heartbeat under the id it had (an instance
/// restarted under its old id): the new one's count starts over.
struct Swappable {
    beat: parking_lot::Mutex<Arc<Heartbeat>>,
    reports: AtomicUsize,
}

impl Supervised for Swappable {
    fn heartbeats(&self) -> Vec<(InstanceId, Arc<Heartbeat>)> {
        vec![(InstanceId(0), self.beat.lock().clone())]
    }
    fn stalled(&self, _: InstanceId, _: Duration) {
        self.reports.fetch_add(1, Ordering::SeqCst);
    }
    fn tick(&self) {}
}

#[test]
fn a_fresh_heartbeat_under_an_id_seen_before_is_timed_afresh() {
    let target = Arc::new(Swappable {
        beat: parking_lot::Mutex::new(Arc::new(Heartbeat::new())),
        reports: AtomicUsize::new(0),
    });
    let supervisor = Supervisor::start(
        target.clone(),
        Duration::from_millis(5),
        Duration::from_millis(50),
    )
    .unwrap();
    let old = target.beat.lock().clone();
    let unit = old.begin();
    let since = Instant::now();
    while target.reports.load(Ordering::SeqCst) < 1 && since.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(target.reports.load(Ordering::SeqCst), 1, "the first stall");
    // The replacement's first unit has the count the reported one had: it stalls too.
    let fresh = Arc::new(Heartbeat::new());
    let fresh_unit = fresh.begin();
    *target.beat.lock() = fresh.clone();
    drop(unit);
    let since = Instant::now();
    while target.reports.load(Ordering::SeqCst) < 2 && since.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        target.reports.load(Ordering::SeqCst),
        2,
        "the new heartbeat's unit, busy far past the stall timeout, was not reported"
    );
    drop(fresh_unit);
    drop(supervisor);
}
