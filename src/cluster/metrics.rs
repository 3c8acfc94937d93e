//! Counters and latency histograms of a running cluster.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::record::Offset;
use crate::router::InstanceId;

const SUB: usize = 8; // sub-buckets per power of two: ~12% resolution
const BUCKETS: usize = 16 + 60 * SUB;

/// A lock-free log-linear histogram of durations in nanoseconds (one writer, any readers).
pub(crate) struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < 16 {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros() as usize; // >= 4
    let sub = ((ns >> (e - 3)) & (SUB as u64 - 1)) as usize;
    (16 + (e - 4) * SUB + sub).min(BUCKETS - 1)
}

fn bucket_floor(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let e = (i - 16) / SUB + 4;
    let sub = ((i - 16) % SUB) as u64;
    (1u64 << e) | (sub << (e - 3))
}

/// The middle of bucket `i`; the last bucket, which holds everything past it, is
/// reported as its lower bound.
fn bucket_mid(i: usize) -> u64 {
    if i < 16 || i + 1 >= BUCKETS {
        return bucket_floor(i);
    }
    let (floor, next) = (bucket_floor(i), bucket_floor(i + 1));
    floor + (next - floor) / 2
}

impl Histogram {
    pub(crate) fn record(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.counts[bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0..=1), as the midpoint of its bucket: within about 6% of the
    /// value (a bucket spans an eighth of a power of two).
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_nanos(bucket_mid(i));
            }
        }
        Duration::from_nanos(bucket_floor(BUCKETS - 1))
    }
}

/// Live counters of one instance.
#[derive(Default)]
pub(crate) struct InstanceStats {
    pub(crate) requests: AtomicU64,
    pub(crate) queries: AtomicU64,
    pub(crate) keys: AtomicUsize,
    pub(crate) restarts: AtomicU32,
    pub(crate) latency: Histogram,
}

/// A snapshot of one instance.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct InstanceMetrics {
    /// The instance.
    pub id: InstanceId,
    /// Keys whose state it holds. It fills in as the instance loads them: right after
    /// [`build`](super::ClusterBuilder::build) or
    /// [`add_instance`](super::Cluster::add_instance) it can be below what the instance
    /// owns (`moved_keys` counts the moves at once; a moved key's state arrives with the
    /// handoff, and a key from the checkpoint is loaded by the instance's rebuild).
    pub keys: usize,
    /// Requests (and queries) in its queue: waiting, or handled in the batch it is on
    /// (an instance gives room back every 32 requests and when its batch ends). Exact
    /// while it is idle; at most 31 above the requests still to handle while it works.
    pub queue_depth: usize,
    /// Requests it handled.
    pub requests: u64,
    /// Queries ([`Client::query`](super::Client::query)) it ran, panicked ones included.
    pub queries: u64,
    /// Median time from queueing to response, over a sample of one in eight of this
    /// instance's requests, to within about 6% (the midpoint of a histogram bucket).
    pub p50: Duration,
    /// 99th percentile of the time from queueing to response (same sample and
    /// precision).
    pub p99: Duration,
    /// Times its loop was restarted after a handler panic. Per instance: a replacement
    /// (after a stall) starts from 0, and the cluster's `stalls` counts the replacement.
    pub restarts: u32,
}

/// A snapshot of the whole cluster.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// One entry per live instance, by id.
    pub instances: Vec<InstanceMetrics>,
    /// The next offset of the input log. Not a count of requests: the log also holds
    /// the cluster's control records (membership changes, requests set aside); see
    /// [`requests`](Self::requests).
    pub next_offset: Offset,
    /// The offset of the latest checkpoint: `None` until one was taken (or found in the
    /// store at open).
    pub checkpoint_offset: Option<Offset>,
    /// Instances replaced so far: declared stalled, or lost (a loop that ended without
    /// being told to, such as one a [`Launcher`](crate::launcher::Launcher) failed to
    /// restart after a panic).
    pub stalls: u64,
    /// Keys moved between instances so far, for any reason: membership changes, stalls,
    /// keys placed anew after going idle, keys shed by busy instances.
    pub moved_keys: u64,
    /// Keys the placement moved off instances over their load cap so far (see
    /// [`StickyOptions::shed_when_over`](crate::router::StickyOptions::shed_when_over)):
    /// its decisions, each followed by a move of the key's state (in `moved_keys`), at
    /// once, or at the key's next request if the request that decided it was not
    /// logged after all.
    pub shed_keys: u64,
    /// Requests handled by instances that have since left or been replaced (not in
    /// `instances`). A removed instance counts here from its removal on, the requests
    /// it handles while it drains its queue included.
    pub handled_by_gone: u64,
    /// Times a call into the input store ran past the stall timeout
    /// ([`ClusterBuilder::stall_timeout`](super::ClusterBuilder::stall_timeout)): an
    /// append made under a key's stripe (every submit of the keys that share it waits
    /// behind it), or a wait for appended records to be durable (under
    /// [`SyncPolicy::Always`](crate::store::SyncPolicy::Always), the submits and the
    /// instances that need those records wait behind it). Each such stall counts once,
    /// and is logged as a warning; instances are not replaced for it. Seen by the
    /// supervisor, so up to one supervision tick late.
    pub store_stalls: u64,
    /// While a call into the input store runs past the stall timeout: how long it has
    /// run, as the supervisor last saw it. `None` otherwise.
    pub store_stalled_for: Option<Duration>,
    /// Requests found to repeat one already logged with the same key and id so far (see
    /// [`Client::submit_with_id`](super::Client::submit_with_id)), and not logged: each
    /// answered [`Error::Duplicate`](crate::Error::Duplicate), or the error of the first
    /// one's wait for the disk if that failed.
    pub duplicates: u64,
}

impl Metrics {
    /// Requests handled so far by every instance, those that left included.
    pub fn requests(&self) -> u64 {
        self.instances.iter().map(|i| i.requests).sum::<u64>() + self.handled_by_gone
    }

    /// The busiest instance's requests over the mean, counting every request each live
    /// instance handled since it started (1.0 is perfect balance, and what a cluster
    /// that has handled nothing yet reports). A figure since the start: for the balance
    /// of the last seconds, or after a change, see
    /// [`peak_to_mean_since`](Self::peak_to_mean_since).
    pub fn peak_to_mean(&self) -> f64 {
        peak_over_mean(self.instances.iter().map(|i| i.requests))
    }

    /// [`peak_to_mean`](Self::peak_to_mean) of the requests handled since `earlier`
    /// (a snapshot of the same cluster): per live instance, its requests now less its
    /// requests then (all of them for an instance that joined since).
    ///
    /// ```
    /// # use cauce::cluster::{Cluster, Context, Handler};
    /// # struct Counter;
    /// # impl Handler for Counter {
    /// #     type State = u64;
    /// #     type Request = u64;
    /// #     type Response = u64;
    /// #     fn handle(&self, _: &mut Context<'_>, _: &[u8], t: &mut u64, a: u64) -> u64 { *t += a; *t }
    /// # }
    /// let cluster = Cluster::builder(Counter).in_memory().instances(2).build()?;
    /// let before = cluster.metrics();
    /// for user in 0..100 {
    ///     cluster.client().submit(format!("user-{user}"), 1)?.wait()?;
    /// }
    /// let recent = cluster.metrics().peak_to_mean_since(&before);
    /// assert!((1.0..=2.0).contains(&recent));
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn peak_to_mean_since(&self, earlier: &Metrics) -> f64 {
        let then = |id: InstanceId| {
            let at = earlier.instances.iter().find(|i| i.id == id);
            at.map_or(0, |i| i.requests)
        };
        peak_over_mean(
            self.instances
                .iter()
                .map(|i| i.requests.saturating_sub(then(i.id))),
        )
    }
}

/// The largest of `requests` over their mean; 1.0 when there are none.
fn peak_over_mean(requests: impl Iterator<Item = u64> + Clone) -> f64 {
    let n = requests.clone().count();
    let total: u64 = requests.clone().sum();
    let peak = requests.max().unwrap_or(0);
    if n == 0 || total == 0 {
        return 1.0;
    }
    peak as f64 * n as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 20, 1 << 30, u64::MAX]) {
            let b = bucket(ns);
            assert!(b >= last || ns < 100_000, "bucket order");
            last = b;
            assert!(bucket_floor(b) <= ns, "floor {} > {ns}", bucket_floor(b));
        }
        let h = Histogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        // Within 6.25% (half a bucket) of 50 and 99 µs.
        let p50 = h.quantile(0.5).as_micros();
        assert!((47..=53).contains(&p50), "p50 {p50}");
        let p99 = h.quantile(0.99).as_micros();
        assert!((93..=105).contains(&p99), "p99 {p99}");
        for i in 16..BUCKETS - 1 {
            let mid = bucket_mid(i);
            assert!(
                bucket_floor(i) < mid && mid < bucket_floor(i + 1),
                "bucket {i}"
            );
            assert_eq!(bucket(mid), i);
        }
    }
}
