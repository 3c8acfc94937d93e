//! The composition root: a keyed service built from a [`Handler`], a log, a router and a
//! launcher, and the [`Client`] that submits requests to it.
//!
//! What happens to a request:
//! 1. `submit(key, request)` routes the key (sticky placement with bounded loads), takes
//!    room in the owner's bounded queue (blocking; [`Error::Busy`] from `try_submit`; a
//!    future that waits from [`submit_async`](Client::submit_async)),
//!    appends the request to the input log (durable per the log's sync policy) and queues
//!    it. The request's log offset is its identity.
//! 2. The owning instance pulls it, folds it into the key's state with the handler, and
//!    answers the [`Pending`] response. An idle instance can linger
//!    ([`linger`](ClusterBuilder::linger), off by default) to take requests in batches
//!    without a wake-up per request; a thread that blocks on an answer wakes it.
//!
//! What happens when things go wrong:
//! - a handler panics: that request is answered with [`Error::HandlerPanicked`] and
//!   marked in the log; the instance restarts and rebuilds its keys from the last
//!   checkpoint and the log, without the marked request. Other instances never notice.
//! - an instance stalls (one request runs longer than the stall timeout): it is fenced,
//!   a replacement is launched, and its keys are rebuilt on their new owners from the
//!   checkpoint and the log, answering the requests it had queued. A key that was still
//!   on its way to it (from an instance that is removed and still drains its queue, say)
//!   is taken from that handoff when it completes, and only the log after it is folded:
//!   records the other instance handles are never applied twice. When the stalled one
//!   wakes up it stops without applying anything else. A rebuild replays request by
//!   request under the same watch: one replayed request that runs past the stall timeout
//!   is a stall too.
//! - a request stalls twice in a row (a stall caught an instance on it, and then its new
//!   owner replaying it, with no run of it completed between): it is set aside like a
//!   request whose handler panicked, answered [`Error::HandlerStalled`] and marked in
//!   the log before the next owner rebuilds, so that no replay runs it again and it
//!   changes no state. A request that stalls once is handled again by its new owner
//!   (the stall may have been passing, a slow outside call say). Only a request not
//!   answered yet is set aside: one that was answered keeps its place in its key's state
//!   whatever its replays do. Stalls are counted in memory, so a restart starts counting
//!   again, and sets aside nothing (no caller waits for an answer any more).
//! - a rebuild fails (the store cannot read the checkpoint or the log): the requests
//!   that waited for it are answered [`Error::StateUnavailable`] at once, as is each
//!   later request of those keys whose rebuild, tried again first, fails again; other
//!   keys are served as usual. The refused requests stay in the log, so once a rebuild
//!   works the key's state folds them like every logged request.
//! - the process dies: opening the same directory rebuilds every key from the last
//!   checkpoint and the log, so each state is the fold of every logged request, once.
//! - a client retries (its answer timed out, it restarted): a request submitted with an
//!   id ([`Client::submit_with_id`]) is logged once; a retry with the same key and id is
//!   refused [`Error::Duplicate`] while the first is among the last
//!   [`retry_window`](ClusterBuilder::retry_window) records of the log, across restarts
//!   and crashes too.
//!
//! Reads need no request: [`Client::query`] runs a function of one key's state on the
//! instance that holds it, between the key's requests, with nothing logged or synced.
//! It sees every request of the key submitted before it.
//!
//! Instances can be added and removed while requests flow; only the keys whose owner
//! changes move, handed over in memory at a point in the log both sides agree on.
//!
//! Every [`checkpoint_every`](ClusterBuilder::checkpoint_every) requests, a marker goes
//! through every instance's queue and each instance hands in its keys' states: a
//! consistent cut of every state at one log offset, saved as a snapshot of the input
//! store. It bounds how much log a restart or a rebuild replays, and with
//! [`truncate_after_checkpoint`](ClusterBuilder::truncate_after_checkpoint) how much log
//! is kept. [`Replay`] rebuilds any past state from the logs, for debugging. A checkpoint
//! holds states encoded with the handler's `State` type of the day: after changing that
//! type, open once with [`rebuild_from_log`](ClusterBuilder::rebuild_from_log).
//!
//! ```
//! use cauce::cluster::{Cluster, Context, Handler};
//!
//! struct Counter;
//! impl Handler for Counter {
//!     type State = u64;
//!     type Request = u64;
//!     type Response = u64;
//!     fn handle(&self, _: &mut Context<'_>, _key: &[u8], total: &mut u64, add: u64) -> u64 {
//!         *total += add;
//!         *total
//!     }
//! }
//!
//! let cluster = Cluster::builder(Counter).in_memory().instances(2).build()?;
//! let client = cluster.client();
//! client.submit("alice", 2)?.wait()?;
//! assert_eq!(client.submit("alice", 3)?.wait()?, 5);
//! let added = cluster.add_instance(1)?;
//! assert_eq!(client.submit("alice", 1)?.wait()?, 6); // state follows the key
//! assert!(cluster.members().contains(&added));
//! cluster.shutdown()?;
//! # Ok::<(), cauce::Error>(())
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use parking_lot::Mutex;

mod appenders;
mod core;
mod fold;
mod ids;
mod instance;
mod metrics;
mod owned;
mod placement;
mod query;
mod reentry;
mod replay;

pub use crate::client::Pending;
pub use crate::handler::{Context, EffectId, Handler};
pub use ids::RequestId;
pub use metrics::{InstanceMetrics, Metrics};
pub use replay::{Replay, Rerun};

use crate::error::{Error, Result};
use crate::launcher::{Launcher, Supervisor, ThreadLauncher};
use crate::router::{InstanceId, Sticky, StickyOptions};
use crate::store::{LogOptions, LogStore, MemoryStore, Store};
use core::{
    Appended, BatchAppended, BatchProgress, Options, Parts, Room, Shared, Submitted, lost_payload,
};
use instance::Registration;
use owned::OwnedLog;

/// A running keyed service. Dropping it stops it, blocking until its instances have
/// stopped (prefer [`shutdown`](Cluster::shutdown), which also checkpoints and reports
/// errors).
pub struct Cluster<H: Handler> {
    shared: Arc<Shared<H>>,
    supervisor: Mutex<Option<Supervisor>>,
    checkpointer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Submits requests to a [`Cluster`]. Cheap to clone; every clone talks to the same
/// cluster.
pub struct Client<H: Handler> {
    shared: Arc<Shared<H>>,
}

impl<H: Handler> Clone for Client<H> {
    fn clone(&self) -> Self {
        Client {
            shared: self.shared.clone(),
        }
    }
}

enum Storage {
    Unset,
    Memory,
    Dir(std::path::PathBuf),
    Stores {
        input: Arc<dyn Store>,
        effects: Option<Arc<dyn Store>>,
    },
}

/// The largest segment of the journal of outside calls in a cluster's directory.
const EFFECTS_SEGMENT_BYTES: u64 = 4 << 20;

/// The cluster's default ε for bounded loads (see [`ClusterBuilder::placement`]).
const CLUSTER_EPSILON: f64 = 0.2;

/// The default of [`ClusterBuilder::retry_window`].
const DEFAULT_RETRY_WINDOW: u64 = 1 << 16;

/// Builds a [`Cluster`]; every setting has a documented default.
pub struct ClusterBuilder<H: Handler> {
    handler: H,
    storage: Storage,
    log_options: LogOptions,
    placement: StickyOptions,
    instances: usize,
    options: Options,
    launcher: Arc<dyn Launcher>,
}

impl<H: Handler> Cluster<H> {
    /// Starts building a cluster around `handler`.
    pub fn builder(handler: H) -> ClusterBuilder<H> {
        ClusterBuilder {
            handler,
            storage: Storage::Unset,
            log_options: LogOptions::new(),
            // ε = 0.2 always passes `epsilon`'s check; the fallback is never taken.
            placement: StickyOptions::default()
                .epsilon(CLUSTER_EPSILON)
                .unwrap_or_default(),
            instances: 4,
            options: Options {
                queue_capacity: 1024,
                stall_timeout: Duration::from_secs(5),
                checkpoint_every: 100_000,
                tick: Duration::from_millis(20),
                truncate_after_checkpoint: false,
                linger: Duration::ZERO,
                rebuild_from_log: false,
                append_threads: 16,
                retry_window: DEFAULT_RETRY_WINDOW,
            },
            launcher: Arc::new(ThreadLauncher::new()),
        }
    }

    /// A client to submit requests with.
    pub fn client(&self) -> Client<H> {
        Client {
            shared: self.shared.clone(),
        }
    }

    /// Adds an instance with `weight` (its share of keys relative to the others) while
    /// requests flow; the keys it takes over move to it with their state.
    ///
    /// A weight of 0 is [`Error::InvalidWeight`] (naming no instance: none is added);
    /// past the router's
    /// [`MAX_INSTANCES`](crate::router::MAX_INSTANCES), [`Error::TooManyInstances`]; a
    /// launcher that cannot start it, the launcher's error (and it is not a member);
    /// after [`shutdown`](Self::shutdown), [`Error::Closed`].
    pub fn add_instance(&self, weight: u32) -> Result<InstanceId> {
        self.shared.add_instance(weight)
    }

    /// Removes an instance while requests flow: its keys move to the others with their
    /// state, it finishes what it had queued, then stops. It returns once the keys are
    /// moved, without waiting for the instance to finish.
    ///
    /// [`Error::UnknownInstance`] if `id` is not a member (a stalled instance is
    /// replaced under a new id); [`Error::LastInstance`] for the last instance: a
    /// cluster always has one; after [`shutdown`](Self::shutdown), [`Error::Closed`].
    pub fn remove_instance(&self, id: InstanceId) -> Result<()> {
        self.shared.remove_instance(id)
    }

    /// The live instances.
    pub fn members(&self) -> Vec<InstanceId> {
        self.shared.members()
    }

    /// The instance that holds `key`'s state: the same answer as [`Client::owner_of`].
    pub fn owner_of(&self, key: impl AsRef<[u8]>) -> Option<InstanceId> {
        self.shared.owner_of(key.as_ref())
    }

    /// A snapshot of the cluster's counters.
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics()
    }

    /// Checkpoints every key's state now (it also happens every
    /// [`checkpoint_every`](ClusterBuilder::checkpoint_every) requests); returns the
    /// offset it was taken at.
    pub fn checkpoint(&self) -> Result<u64> {
        self.shared.take_checkpoint()
    }

    /// Stops accepting requests, drains the queues, checkpoints, stops the instances and
    /// syncs the logs.
    ///
    /// A submit waiting for room in a full queue (blocked, or as a [`Submit`] future)
    /// ends at once with [`Error::Closed`]: its request was not logged.
    ///
    /// An instance stuck in its handler is waited for twice, for the stall timeout (at
    /// least a second) each: for its part of the checkpoint, which is given up as long as
    /// it makes no progress that long ([`Error::CheckpointAbandoned`] is then returned,
    /// after everything else has stopped; the next open replays from the checkpoint
    /// before), and for its stop. Then it is left behind: the requests it still holds
    /// are answered [`Error::Closed`] at once, as are requests of a lost instance whose
    /// rebuild did not finish. They are in the log, and are handled when the cluster
    /// opens again.
    ///
    /// It blocks the calling thread until all that is done (a drop does the same,
    /// without the checkpoint). From async code, run it where blocking is allowed: on
    /// tokio, `tokio::task::spawn_blocking(move || cluster.shutdown()).await`.
    ///
    /// It takes `&self`, so a cluster shared in an `Arc` (with a thread that scales it,
    /// say) is shut down from wherever it is. Afterwards the cluster refuses what would
    /// start anything again: submits, queries, [`add_instance`](Self::add_instance),
    /// [`remove_instance`](Self::remove_instance) and [`checkpoint`](Self::checkpoint)
    /// answer [`Error::Closed`]; metrics and `owner_of` still answer. A second call
    /// (from any thread) waits for the first to end, and returns `Ok`. From inside one
    /// of this cluster's handlers (or query functions) it is refused with
    /// [`Error::InsideHandler`]: it would wait for the handler's own instance to stop.
    pub fn shutdown(&self) -> Result<()> {
        // Before anything stops: a handler of this cluster cannot wait for its own
        // instance to stop. (A drop there still stops the cluster: it waits for that
        // instance a grace period, then leaves it behind.)
        reentry::refuse_inside(self.shared.cluster_id())?;
        self.stop(true)
    }

    fn stop(&self, checkpoint: bool) -> Result<()> {
        if let Some(mut s) = self.supervisor.lock().take() {
            s.stop();
        }
        let result = self.shared.shutdown(checkpoint);
        if let Some(t) = self.checkpointer.lock().take() {
            let _ = t.join();
        }
        result
    }
}

impl<H: Handler> Drop for Cluster<H> {
    fn drop(&mut self) {
        if let Err(e) = self.stop(false) {
            tracing::warn!(error = %e, "error while stopping a dropped cluster");
        }
    }
}

impl<H: Handler> Client<H> {
    /// Submits `request` for `key`, waiting for room in the owner's queue if it is full.
    /// Returns once the request is in the log; the [`Pending`] resolves when it has been
    /// handled.
    ///
    /// # Errors
    /// Each means this cluster will not handle the request:
    /// - [`Error::Closed`]: the cluster was shut down or dropped;
    /// - [`Error::Codec`]: the request cannot be encoded;
    /// - [`Error::RecordTooLarge`]: the key and request exceed the log's record limit;
    /// - [`Error::NoInstance`]: no instance can take it (a membership change failed half
    ///   way; the last instance cannot be removed);
    /// - the input store's errors: [`Error::Io`], or [`Error::ReadOnly`] once a write
    ///   or fdatasync of the log failed (see [`LogStore`]).
    ///
    /// All but the store's errors mean the request was not logged. A store's error can
    /// come after the record was written, from the wait for the disk (an `fdatasync`
    /// that failed): the cluster does not handle it, but the record may have reached the
    /// disk anyway, and a cluster opened on the log again then handles it, as
    /// [`LogStore`] recovers what reached the disk. So after an `Io` or `ReadOnly` the
    /// request's fate is unknown until the log is reopened, as for a Kafka producer whose
    /// send failed: requests that may be retried are submitted with an id
    /// ([`submit_with_id`](Client::submit_with_id)), so that a retry is applied only if
    /// the first did not reach the log.
    ///
    /// The [`Pending`] then resolves to the handler's response, or to an error that
    /// says why the logged request got none: [`Error::HandlerPanicked`],
    /// [`Error::HandlerStalled`] (both set the request aside: it changed no state),
    /// [`Error::StateUnavailable`] (its key's state could not be rebuilt; the request
    /// stays in the log and is folded once a rebuild works), [`Error::Codec`] (it does
    /// not decode as the handler's `Request`), or [`Error::Closed`] (the cluster
    /// stopped first; the log keeps the request for the next open, which folds it).
    pub fn submit(
        &self,
        key: impl AsRef<[u8]>,
        request: H::Request,
    ) -> Result<Pending<H::Response>> {
        self.shared.submit(key.as_ref(), &request, true)
    }

    /// Like [`submit`](Client::submit), but never blocks the thread that polls it: the
    /// returned future resolves once the request is in the log, to the [`Pending`]
    /// response, itself a future. For async code, where a blocking `submit` would hold
    /// up the executor's thread. Needs no particular runtime.
    ///
    /// It waits for room in a full queue as a future (as tokio's `Sender::send().await`
    /// does for a bounded channel). When the input log's appends wait for the disk (the
    /// embedded default, [`SyncPolicy::Always`](crate::store::SyncPolicy::Always)), it
    /// then hands the append to an appender thread and waits for it as a future too
    /// (see [`append_threads`](ClusterBuilder::append_threads)): a poll never waits for
    /// an fdatasync, and appends in flight together share one.
    ///
    /// Dropping the future before it resolves submits nothing (unless an appender
    /// thread had already begun its append: then the request is logged and handled, and
    /// its answer dropped), and leaves nothing in the placement either (no load
    /// counted, no key placed: see [`try_submit`](Client::try_submit)). A request
    /// waiting for an instance that is removed or stalls is routed again when it next
    /// looks for room.
    ///
    /// Where [`submit`](Client::submit) lets a panic of the input store reach its caller,
    /// a store that panics on an appender thread resolves this future
    /// [`Error::StorePanicked`] (the thread goes on serving the others), which says
    /// whether the request was logged: not if the store panicked in its append; yes
    /// (and handled) if it panicked in the wait for the disk after it, as after a
    /// store's `Io` error there (see `submit`'s errors).
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
    /// # // A minimal executor: any runtime's `block_on` or `spawn` does the same.
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     struct Unpark(std::thread::Thread);
    /// #     impl std::task::Wake for Unpark {
    /// #         fn wake(self: std::sync::Arc<Self>) { self.0.unpark() }
    /// #     }
    /// #     let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         match f.as_mut().poll(&mut cx) {
    /// #             std::task::Poll::Ready(out) => return out,
    /// #             std::task::Poll::Pending => std::thread::park(),
    /// #         }
    /// #     }
    /// # }
    /// # let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// # let client = cluster.client();
    /// // `block_on`: any executor's (tokio's `Runtime::block_on`, say); in a task, just
    /// // `.await` the same expression.
    /// let total = block_on(async {
    ///     client.submit_async("alice", 5).await?.await
    /// })?;
    /// assert_eq!(total, 5);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn submit_async(&self, key: impl AsRef<[u8]>, request: H::Request) -> Submit<H> {
        Submit {
            shared: self.shared.clone(),
            key: key.as_ref().to_vec(),
            state: SubmitState::Start(fold::Scratch::request(&request)),
            registration: Registration::default(),
        }
    }

    /// Submits `request` for `key` and awaits its response: [`submit_async`] and then
    /// the [`Pending`] it resolves to, in one future, for callers that have nothing to do
    /// between the request being logged and its answer.
    ///
    /// An error is either the submit's (nothing was logged, as with
    /// [`submit_async`]) or the answer's ([`Error::HandlerPanicked`], say: the request
    /// is in the log). Dropping the future before its append begins submits nothing;
    /// after, the request is still handled, and its answer dropped. So a request whose
    /// future a timeout dropped may well have been applied: how often depends on the
    /// timeout and the disk (under `SyncPolicy::Always`, where the append runs on an
    /// appender thread, two trials found 23% of the dropped ones logged with 400 µs
    /// timeouts, and 69% of futures dropped after up to 3 polls 200 µs apart; under
    /// `SyncPolicy::Never`, 2 of 50 dropped after one poll). The future gives no offset
    /// to look for: **with timeouts, submit with an id**
    /// ([`request_with_id`](Client::request_with_id)), which refuses a retry of a
    /// request already logged. The future owns
    /// what it needs (it holds the cluster, as a clone of the client does): it can be
    /// spawned, `tokio::spawn(client.request(key, req))`.
    ///
    /// ```
    /// # use cauce::cluster::{Cluster, Context, Handler};
    /// # struct Counter;
    /// # impl Handler for Counter {
    /// #     type State = u64;
    /// #     type Request = u64;
    /// #     type Response = u64;
    /// #     fn handle(&self, _: &mut Context<'_>, _: &[u8], t: &mut u64, add: u64) -> u64 {
    /// #         *t += add;
    /// #         *t
    /// #     }
    /// # }
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     struct Unpark(std::thread::Thread);
    /// #     impl std::task::Wake for Unpark {
    /// #         fn wake(self: std::sync::Arc<Self>) { self.0.unpark() }
    /// #     }
    /// #     let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         match f.as_mut().poll(&mut cx) {
    /// #             std::task::Poll::Ready(out) => return out,
    /// #             std::task::Poll::Pending => std::thread::park(),
    /// #         }
    /// #     }
    /// # }
    /// # let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// # let client = cluster.client();
    /// // `block_on`: any executor's; `tokio::spawn(client.request("alice", 5))` too.
    /// let total = block_on(client.request("alice", 5))?;
    /// assert_eq!(total, 5);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    ///
    /// [`submit_async`]: Client::submit_async
    pub fn request(
        &self,
        key: impl AsRef<[u8]>,
        request: H::Request,
    ) -> impl Future<Output = Result<H::Response>> + Send + 'static {
        let submit = self.submit_async(key, request);
        async move { submit.await?.await }
    }

    /// Like [`submit`](Client::submit), for a request that may be submitted again (its
    /// answer lost, a restart of the client or the cluster): whichever submit of `key`
    /// with `id` comes first is logged and handled, once; each later one is refused with
    /// [`Error::Duplicate`], naming where the first is in the log, and changes nothing.
    /// The client picks an id per logical request and reuses it on every retry (an
    /// idempotency key: unlike Kafka's `enable.idempotence`, which numbers a producer's
    /// sends itself, the ids are the caller's, so they hold across client restarts).
    /// An id names a request: a retry with the same key and id but another request is
    /// refused too (the requests are not compared).
    ///
    /// How long an id is remembered: while the first submit is among the last
    /// [`retry_window`](ClusterBuilder::retry_window) records of the log (65,536 by
    /// default), and at most twice as long (the ids are dropped a window's worth at a
    /// time; longer if no request with an id follows), after a restart or a
    /// crash too (an open reads the ids back from the log; a record a crash lost, under
    /// [`SyncPolicy::Every`](crate::store::SyncPolicy::Every) say, takes its id with it,
    /// and its retry is applied). A retry later than that is applied again.
    ///
    /// What is remembered: only a logged request's id. A submit refused before its
    /// append ([`Error::Busy`], [`Error::Closed`], a failed write) can be retried with
    /// the same id, and so can a request set aside because its handler panicked or
    /// stalled twice ([`Error::HandlerPanicked`], [`Error::HandlerStalled`]: it changed
    /// no state), once its submitter was told so. (Outside calls its handler made before
    /// it panicked, or while it stalled, were made: its retry, a new request, makes
    /// them again.) A retry of a request still on its way
    /// to the disk waits for it as the first submit does (under
    /// [`SyncPolicy::Always`](crate::store::SyncPolicy::Always)), and gets the store's
    /// error instead if its fdatasync failed (the first's fate is then known once the
    /// log is reopened, as for [`submit`](Client::submit)). Batches:
    /// [`submit_batch_with_ids`](Client::submit_batch_with_ids).
    ///
    /// What it costs: each submit with an id looks its key and id up in, and adds them
    /// to, one set shared by every submitter (two lock round trips, a hash of the key
    /// and id, and a probe of one or two small tables more per request). The bench's
    /// `cluster.zipf.4.throughput.ids.vs_without` measures it: every request with an id
    /// made 0.62-0.75 of the requests/s of the same load without (batches of 64:
    /// 0.53-0.59), on 2 cores where the submitters are the bottleneck. Requests without
    /// ids pay a look at one byte.
    ///
    /// A duplicate gets no answer of the first request (it went to the first submit's
    /// [`Pending`]): read the state with [`query`](Client::query) if the answer
    /// matters, and [`was_applied`](Client::was_applied) says whether the first took
    /// effect. A first request still queued or running when its retry came may still
    /// be set aside; a retry after its `HandlerPanicked` is logged. When a
    /// [`wait_timeout`](Pending::wait_timeout) runs out, the request is still accepted:
    /// waiting again is the cheaper retry; the id is for the answer that is lost.
    ///
    /// ```
    /// # use cauce::cluster::{Cluster, Context, Handler, RequestId};
    /// # use cauce::Error;
    /// # struct Counter;
    /// # impl Handler for Counter {
    /// #     type State = u64;
    /// #     type Request = u64;
    /// #     type Response = u64;
    /// #     fn handle(&self, _: &mut Context<'_>, _: &[u8], t: &mut u64, a: u64) -> u64 { *t += a; *t }
    /// # }
    /// # let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// # let client = cluster.client();
    /// let id = RequestId(0x5eed);
    /// let first = client.submit_with_id("alice", id, 5)?;
    /// let logged_at = first.offset();
    /// assert_eq!(first.wait()?, 5);
    /// // The answer was lost, say: the retry is recognized, and not applied again.
    /// match client.submit_with_id("alice", id, 5) {
    ///     Err(Error::Duplicate { offset, .. }) => assert_eq!(offset, logged_at),
    ///     other => panic!("expected a duplicate, got {other:?}"),
    /// }
    /// assert_eq!(client.query("alice", |total: &u64| *total)?.wait()?, 5);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Duplicate`], and those of [`submit`](Client::submit).
    pub fn submit_with_id(
        &self,
        key: impl AsRef<[u8]>,
        id: RequestId,
        request: H::Request,
    ) -> Result<Pending<H::Response>> {
        self.submit_id(key.as_ref(), id, &request, true)
    }

    /// [`submit_with_id`](Client::submit_with_id) that never waits for room, as
    /// [`try_submit`](Client::try_submit) is [`submit`](Client::submit)'s: a full queue
    /// is [`Error::Busy`], nothing is logged, and the id can be submitted again.
    pub fn try_submit_with_id(
        &self,
        key: impl AsRef<[u8]>,
        id: RequestId,
        request: H::Request,
    ) -> Result<Pending<H::Response>> {
        self.submit_id(key.as_ref(), id, &request, false)
    }

    /// [`submit_with_id`](Client::submit_with_id), waiting for room if `block`, else
    /// [`try_submit_with_id`](Client::try_submit_with_id).
    fn submit_id(
        &self,
        key: &[u8],
        id: RequestId,
        request: &H::Request,
        block: bool,
    ) -> Result<Pending<H::Response>> {
        let payload = fold::Scratch::request_with_id(request, id)?;
        self.shared.submit_encoded(key, &payload, block)
    }

    /// [`submit_with_id`](Client::submit_with_id) as a future, as
    /// [`submit_async`](Client::submit_async) is [`submit`](Client::submit)'s: it
    /// resolves to [`Error::Duplicate`] for a request already logged with this key and
    /// id.
    pub fn submit_with_id_async(
        &self,
        key: impl AsRef<[u8]>,
        id: RequestId,
        request: H::Request,
    ) -> Submit<H> {
        Submit {
            shared: self.shared.clone(),
            key: key.as_ref().to_vec(),
            state: SubmitState::Start(fold::Scratch::request_with_id(&request, id)),
            registration: Registration::default(),
        }
    }

    /// [`request`](Client::request) with an id: submits as
    /// [`submit_with_id_async`](Client::submit_with_id_async) and awaits the answer, in
    /// one future. A duplicate resolves to [`Error::Duplicate`]; a future dropped before
    /// it resolved may or may not have logged its request, and a retry with the same id
    /// is how to find out safely.
    pub fn request_with_id(
        &self,
        key: impl AsRef<[u8]>,
        id: RequestId,
        request: H::Request,
    ) -> impl Future<Output = Result<H::Response>> + Send + 'static {
        let submit = self.submit_with_id_async(key, id, request);
        async move { submit.await?.await }
    }

    /// Like [`submit`](Client::submit), but never waits: a full queue is
    /// [`Error::Busy`] and nothing is logged.
    ///
    /// A refused request leaves no trace in the placement either: it is not counted
    /// toward its instance's recent load, and a key it would have placed (its first
    /// request, or the first after going idle) is not placed. Only requests given room
    /// are counted, so retrying against a full queue does not steer new keys away from
    /// that instance.
    pub fn try_submit(
        &self,
        key: impl AsRef<[u8]>,
        request: H::Request,
    ) -> Result<Pending<H::Response>> {
        self.shared.submit(key.as_ref(), &request, false)
    }

    /// Submits several requests at once, waiting for room where queues are full: one
    /// routing pass, one batch in the log (all of it or none of it is logged), one
    /// hand-off per instance. Requests of one key are handled in the order given.
    ///
    /// A batch that sends more requests to one instance than its queue holds could never
    /// fit: it is refused with [`Error::BatchTooLarge`] and nothing is logged. A batch of
    /// at most [`queue_capacity`](ClusterBuilder::queue_capacity) requests always fits.
    ///
    /// Batching pays from a few requests up. Two threads keeping 256 requests in flight
    /// each, on 2 cores with 4 instances, handled about 1.2 times as many requests per
    /// second in batches of 4 as one at a time, 1.4 times in batches of 16 and 1.6 to
    /// 1.7 times in batches of 64; batches of 2 about as many as one at a time.
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
    /// let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// let client = cluster.client();
    /// let pending = client.submit_batch([("alice", 1), ("bob", 10), ("alice", 2)])?;
    /// let answers: Vec<u64> = pending.into_iter().map(|p| p.wait()).collect::<Result<_, _>>()?;
    /// assert_eq!(answers, [1, 10, 3]);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn submit_batch<K: AsRef<[u8]>>(
        &self,
        requests: impl IntoIterator<Item = (K, H::Request)>,
    ) -> Result<Vec<Pending<H::Response>>> {
        let (items, payloads) = encode_batch(requests)?;
        self.shared.submit_batch(&items, payloads.as_slice())
    }

    /// [`submit_batch`](Client::submit_batch) of requests with ids, as
    /// [`submit_with_id`](Client::submit_with_id) submits one: each request that repeats
    /// one already logged with its key and id, or an earlier one of the same batch, is
    /// not logged, and its [`Pending`] resolves to [`Error::Duplicate`] naming the first
    /// one's offset (which is also the pending's [`offset`](Pending::offset)); the
    /// others are logged as one batch, all of them or none. For a pipeline that
    /// re-delivers what it is not sure was taken (a consumer that resumes from its last
    /// committed position): ids derived from where each message came from (a Kafka
    /// topic, partition and offset, say) make the second delivery change nothing,
    /// however it is batched.
    ///
    /// ```
    /// # use cauce::cluster::{Cluster, Context, Handler, RequestId};
    /// # use cauce::Error;
    /// # struct Counter;
    /// # impl Handler for Counter {
    /// #     type State = u64;
    /// #     type Request = u64;
    /// #     type Response = u64;
    /// #     fn handle(&self, _: &mut Context<'_>, _: &[u8], t: &mut u64, a: u64) -> u64 { *t += a; *t }
    /// # }
    /// # let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// # let client = cluster.client();
    /// let first = [("alice", RequestId(1), 5), ("bob", RequestId(2), 7)];
    /// for pending in client.submit_batch_with_ids(first)? {
    ///     pending.wait()?;
    /// }
    /// // Delivered again, with one more: only the new one is applied.
    /// let again = [("alice", RequestId(1), 5), ("bob", RequestId(2), 7), ("alice", RequestId(3), 1)];
    /// let answers: Vec<_> = client
    ///     .submit_batch_with_ids(again)?
    ///     .into_iter()
    ///     .map(|p| p.wait())
    ///     .collect();
    /// assert!(matches!(answers[0], Err(Error::Duplicate { .. })));
    /// assert!(matches!(answers[1], Err(Error::Duplicate { .. })));
    /// assert_eq!(answers[2].as_ref().ok(), Some(&6));
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    ///
    /// Requests found logged already before the batch is routed take no room in the
    /// queues and count toward no load (a re-delivered batch larger than a queue is
    /// not [`Error::BatchTooLarge`] for them); one whose first request is still on its
    /// way to the disk, or that repeats an earlier one of the same batch, is found when
    /// the batch is logged, and takes room until then. The async form takes out only
    /// those known durable.
    ///
    /// # Errors
    /// Those of [`submit_batch`](Client::submit_batch).
    pub fn submit_batch_with_ids<K: AsRef<[u8]>>(
        &self,
        requests: impl IntoIterator<Item = (K, RequestId, H::Request)>,
    ) -> Result<Vec<Pending<H::Response>>> {
        let (items, payloads) = encode_batch_with_ids(requests)?;
        let payloads = payloads.as_slice();
        // Those logged already take no room and count no load: taken out first.
        let known = self.shared.logged_already(&items, payloads, true);
        if known.is_empty() {
            return self.shared.submit_batch(&items, payloads);
        }
        let rest: Vec<(&[u8], std::ops::Range<usize>)> = items
            .iter()
            .zip(&known)
            .filter(|(_, k)| k.is_none())
            .map(|((key, range), _)| (key.as_ref(), range.clone()))
            .collect();
        let logged = self.shared.submit_batch(&rest, payloads)?;
        self.shared.with_duplicates(logged, &known)
    }

    /// [`submit_batch_with_ids`](Client::submit_batch_with_ids) as a future, as
    /// [`submit_batch_async`](Client::submit_batch_async) is
    /// [`submit_batch`](Client::submit_batch)'s.
    pub fn submit_batch_with_ids_async<K: AsRef<[u8]>>(
        &self,
        requests: impl IntoIterator<Item = (K, RequestId, H::Request)>,
    ) -> SubmitBatch<H> {
        let owned = requests
            .into_iter()
            .map(|(k, id, r)| (k.as_ref().to_vec(), id, r));
        let (mut items, payloads, failed) = match encode_batch_with_ids(owned) {
            Ok((items, payloads)) => (items, payloads, None),
            Err(e) => (Vec::new(), fold::Scratch::empty(), Some(e)),
        };
        // Those logged already, and known durable, take no room and count no load.
        let known = self
            .shared
            .logged_already(&items, payloads.as_slice(), false);
        if !known.is_empty() {
            let mut at = 0;
            items.retain(|_| {
                at += 1;
                known[at - 1].is_none()
            });
        }
        SubmitBatch {
            shared: self.shared.clone(),
            items,
            payloads,
            failed,
            progress: BatchProgress::default(),
            appending: None,
            done: false,
            known,
            registration: Registration::default(),
        }
    }

    /// Like [`submit_batch`](Client::submit_batch), but waits for room in full queues
    /// without blocking the thread, and hands its append to an appender thread when
    /// appends wait for the disk, as [`submit_async`](Client::submit_async) does for one
    /// request. While it waits it holds the room it has taken so far, taken a whole
    /// queue at a time in a fixed order, so two waiting batches never hold each other up;
    /// dropping it before its append begins gives that room back and submits nothing.
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
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     struct Unpark(std::thread::Thread);
    /// #     impl std::task::Wake for Unpark {
    /// #         fn wake(self: std::sync::Arc<Self>) { self.0.unpark() }
    /// #     }
    /// #     let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         match f.as_mut().poll(&mut cx) {
    /// #             std::task::Poll::Ready(out) => return out,
    /// #             std::task::Poll::Pending => std::thread::park(),
    /// #         }
    /// #     }
    /// # }
    /// # let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// # let client = cluster.client();
    /// let answers = block_on(async {
    ///     let mut answers = Vec::new();
    ///     for pending in client.submit_batch_async([("alice", 1), ("alice", 2)]).await? {
    ///         answers.push(pending.await?);
    ///     }
    ///     Ok::<_, cauce::Error>(answers)
    /// })?;
    /// assert_eq!(answers, [1, 3]);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn submit_batch_async<K: AsRef<[u8]>>(
        &self,
        requests: impl IntoIterator<Item = (K, H::Request)>,
    ) -> SubmitBatch<H> {
        let owned = requests.into_iter().map(|(k, r)| (k.as_ref().to_vec(), r));
        let (items, payloads, failed) = match encode_batch(owned) {
            Ok((items, payloads)) => (items, payloads, None),
            Err(e) => (Vec::new(), fold::Scratch::empty(), Some(e)),
        };
        SubmitBatch {
            shared: self.shared.clone(),
            items,
            payloads,
            failed,
            progress: BatchProgress::default(),
            appending: None,
            done: false,
            known: Vec::new(),
            registration: Registration::default(),
        }
    }

    /// Reads `key`'s state: runs `query` on it, on the instance that holds it, between
    /// the key's requests. Nothing is logged and nothing is synced, so a read costs no
    /// fdatasync, where a request that changes nothing would cost one under
    /// [`SyncPolicy::Always`](crate::store::SyncPolicy::Always).
    ///
    /// The state it sees is the fold of every request of the key before
    /// [`Pending::offset`] (the input log's next offset when the query was made): every
    /// request whose `submit` returned before `query` was called is in it, answered or
    /// not, and no request submitted after. (One exception: when the instance holding
    /// the key is lost before it gets to the query, the query runs on the key's new
    /// owner once the key is rebuilt, and may see requests submitted after it too.)
    /// [`Replay::state_before`]`(key, offset)` rebuilds that state from the logs. A
    /// key no request was ever submitted for is read as `State::default()`, at once,
    /// on the calling thread.
    ///
    /// Like a request, a query waits for room in the owner's queue
    /// ([`try_query`](Client::try_query) returns [`Error::Busy`] instead) and holds up
    /// the key's later requests while it runs: keep it short (read a field, clone a
    /// part). A query is not counted toward its instance's load, and does not place
    /// its key. Since it changes nothing, a replay neither has nor needs it.
    ///
    /// # Errors
    /// [`Error::Closed`] (the cluster was shut down) and [`Error::NoInstance`] at once.
    /// The [`Pending`] then resolves to what `query` returned, or to
    /// [`Error::QueryPanicked`] (the state is unchanged, and the instance goes on),
    /// [`Error::QueryStalled`] (it ran past the stall timeout: its instance was
    /// replaced, as for a request, and the query is not run again),
    /// [`Error::StateUnavailable`] (the key's state could not be rebuilt), or
    /// [`Error::Closed`] (the cluster stopped first).
    ///
    /// ```
    /// # use cauce::cluster::{Cluster, Context, Handler};
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct Account {
    ///     balance: i64,
    ///     history: Vec<i64>,
    /// }
    ///
    /// struct Bank;
    /// impl Handler for Bank {
    ///     type State = Account;
    ///     type Request = i64;
    ///     type Response = i64;
    ///     fn handle(&self, _: &mut Context<'_>, _: &[u8], a: &mut Account, amount: i64) -> i64 {
    ///         a.balance += amount;
    ///         a.history.push(amount);
    ///         a.balance
    ///     }
    /// }
    ///
    /// let cluster = Cluster::builder(Bank).in_memory().build()?;
    /// let client = cluster.client();
    /// let deposit = client.submit("alice", 50)?;
    /// let withdrawal = client.submit("alice", -20)?;
    /// // Sees both, answered or not: they were submitted before it.
    /// assert_eq!(client.query("alice", |a: &Account| a.balance)?.wait()?, 30);
    /// assert_eq!((deposit.wait()?, withdrawal.wait()?), (50, 30));
    /// assert_eq!(client.query("alice", |a: &Account| a.history.len())?.wait()?, 2);
    /// assert_eq!(client.query("nobody", |a: &Account| a.balance)?.wait()?, 0);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn query<T, F>(&self, key: impl AsRef<[u8]>, query: F) -> Result<Pending<T>>
    where
        T: Send + 'static,
        F: FnOnce(&H::State) -> T + Send + 'static,
    {
        let mut query = Some(query);
        match self
            .shared
            .submit_query(key.as_ref(), &mut query, &mut Room::Wait)
        {
            Poll::Ready(queried) => queried,
            Poll::Pending => Err(Error::Closed),
        }
    }

    /// Whether the request of `key` logged at `offset` was applied (changed its state),
    /// or set aside (its handler panicked or stalled twice, or it did not decode: it
    /// changed nothing). For the `offset` of an [`Error::Duplicate`]: the retry was
    /// refused because its first request was logged, and this tells whether that one
    /// took effect, which a retry arriving while the first is still queued cannot know.
    ///
    /// It waits until the key's requests submitted before it are handled, as a
    /// [`query`](Client::query) of the key does (and with a query's errors, such as
    /// [`Error::StateUnavailable`]). Its answer is then final. For an offset before the
    /// last checkpoint it reads the log from `offset` on (the set-aside marks of those
    /// requests are not kept in memory), and fails [`Error::OffsetOutOfRange`] if the
    /// log no longer holds it. A record at `offset` that is not a request of `key` is
    /// [`Error::NotARequest`].
    pub fn was_applied(&self, key: impl AsRef<[u8]>, offset: crate::Offset) -> Result<bool> {
        let key = key.as_ref();
        let record = fold::record_at(&*self.shared.input, offset)?;
        match fold::envelope(&record)? {
            fold::Envelope::Request(_) if &record.key[..] == key => {}
            fold::Envelope::Request(_) => {
                return Err(Error::NotARequest {
                    offset,
                    what: "a request of another key".to_string(),
                });
            }
            fold::Envelope::Control(control) => {
                return Err(Error::NotARequest {
                    offset,
                    what: control.describe(),
                });
            }
        }
        self.query(key, |_: &H::State| ())?.wait()?;
        Ok(!self.shared.is_set_aside(offset)?)
    }

    /// Like [`query`](Client::query), but never waits: a full queue is
    /// [`Error::Busy`], and `query` is not run.
    pub fn try_query<T, F>(&self, key: impl AsRef<[u8]>, query: F) -> Result<Pending<T>>
    where
        T: Send + 'static,
        F: FnOnce(&H::State) -> T + Send + 'static,
    {
        let mut query = Some(query);
        match self
            .shared
            .submit_query(key.as_ref(), &mut query, &mut Room::Refuse)
        {
            Poll::Ready(queried) => queried,
            Poll::Pending => Err(Error::Closed),
        }
    }

    /// Like [`query`](Client::query), but waits for room in a full queue as a future,
    /// as [`submit_async`](Client::submit_async) does for a request. One wait stays in
    /// the poll: for an append in progress under the key's stripe lock. That is a copy
    /// into the log's buffer (a submit waits for its fdatasync under
    /// [`SyncPolicy::Always`](crate::store::SyncPolicy::Always) after releasing the
    /// lock), except for an append that rolls a segment (which syncs the one it seals)
    /// or reaches [`SyncPolicy::Every`](crate::store::SyncPolicy::Every)'s record count,
    /// which runs its fdatasync there. The future resolves to the [`Pending`] answer once the query
    /// is queued; dropping it before then queues nothing.
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
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     struct Unpark(std::thread::Thread);
    /// #     impl std::task::Wake for Unpark {
    /// #         fn wake(self: std::sync::Arc<Self>) { self.0.unpark() }
    /// #     }
    /// #     let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         match f.as_mut().poll(&mut cx) {
    /// #             std::task::Poll::Ready(out) => return out,
    /// #             std::task::Poll::Pending => std::thread::park(),
    /// #         }
    /// #     }
    /// # }
    /// # let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// # let client = cluster.client();
    /// client.submit("alice", 5)?;
    /// let total = block_on(async { client.query_async("alice", |t: &u64| *t).await?.await })?;
    /// assert_eq!(total, 5);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn query_async<T, F>(&self, key: impl AsRef<[u8]>, query: F) -> Query<H, F>
    where
        T: Send + 'static,
        F: FnOnce(&H::State) -> T + Send + 'static,
    {
        Query {
            shared: self.shared.clone(),
            key: key.as_ref().to_vec(),
            query: Some(query),
            done: false,
            registration: Registration::default(),
        }
    }

    /// Queries `key` and awaits the answer: [`query_async`](Client::query_async) and
    /// then the [`Pending`] it resolves to, in one future (as [`request`](Client::request)
    /// is for a request). The future owns what it needs: it can be spawned.
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
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     struct Unpark(std::thread::Thread);
    /// #     impl std::task::Wake for Unpark {
    /// #         fn wake(self: std::sync::Arc<Self>) { self.0.unpark() }
    /// #     }
    /// #     let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         match f.as_mut().poll(&mut cx) {
    /// #             std::task::Poll::Ready(out) => return out,
    /// #             std::task::Poll::Pending => std::thread::park(),
    /// #         }
    /// #     }
    /// # }
    /// # let cluster = Cluster::builder(Counter).in_memory().build()?;
    /// # let client = cluster.client();
    /// // `block_on`: any executor's (tokio's `Runtime::block_on`, say).
    /// block_on(client.request("alice", 5))?;
    /// assert_eq!(block_on(client.read("alice", |total: &u64| *total))?, 5);
    /// # cluster.shutdown()?;
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn read<T, F>(
        &self,
        key: impl AsRef<[u8]>,
        query: F,
    ) -> impl Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&H::State) -> T + Send + 'static,
    {
        let query = self.query_async(key, query);
        async move { query.await?.await }
    }

    /// The instance that holds `key`'s state now, or for a key not placed yet (never
    /// seen, or idle long enough to be forgotten) the instance its hash names. A key
    /// not placed yet may be placed elsewhere by its first request: placement bounds
    /// every instance's load, so a key whose home instance is busy goes to the next
    /// one with room.
    pub fn owner_of(&self, key: impl AsRef<[u8]>) -> Option<InstanceId> {
        self.shared.owner_of(key.as_ref())
    }

    /// A snapshot of the cluster's counters.
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics()
    }
}

/// A submit that waits for room, and for its append, as a future: see
/// [`Client::submit_async`]. Resolves to the [`Pending`] response once the request is
/// in the log.
#[must_use = "a submit does nothing unless polled"]
pub struct Submit<H: Handler> {
    shared: Arc<Shared<H>>,
    key: Vec<u8>,
    state: SubmitState<H>,
    /// Where it waits for room in a full queue (dropped with it).
    registration: Registration,
}

enum SubmitState<H: Handler> {
    /// The encoded request, waiting for room (and, if appends do not wait for the disk,
    /// logged here once there is room).
    Start(Result<fold::Scratch>),
    /// Room taken; an appender thread logs and queues it (see
    /// [`ClusterBuilder::append_threads`]).
    Appending(Pending<Appended<H>>),
    /// Back from an appender thread: its key routes to this instance, whose queue was
    /// full. Waits for room there, as a future.
    Waiting(InstanceId, fold::Scratch),
    /// Resolved: polling again is [`Error::Closed`] and submits nothing.
    Done,
}

impl<H: Handler> Future for Submit<H> {
    type Output = Result<Pending<H::Response>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match std::mem::replace(&mut this.state, SubmitState::Done) {
                SubmitState::Done => return Poll::Ready(Err(Error::Closed)),
                SubmitState::Start(Err(e)) => return Poll::Ready(Err(e)),
                SubmitState::Start(Ok(payload)) => {
                    let mut room = Room::Poll(cx, &mut this.registration);
                    if !this.shared.appends_elsewhere() {
                        let submitted =
                            this.shared
                                .submit_payload(&this.key, payload.as_slice(), &mut room);
                        if submitted.is_pending() {
                            this.state = SubmitState::Start(Ok(payload));
                        }
                        return submitted;
                    }
                    let reserved = this.shared.submit_from(
                        &this.key,
                        payload.as_slice(),
                        &mut room,
                        None,
                        true,
                    );
                    match reserved {
                        Poll::Pending => {
                            this.state = SubmitState::Start(Ok(payload));
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(Submitted::Logged(p, waits))) => {
                            return Poll::Ready(this.shared.durable(p, waits));
                        }
                        // Only for a request known durable: refused without a wait.
                        Poll::Ready(Ok(Submitted::Duplicate(id, offset))) => {
                            return Poll::Ready(Err(this.shared.duplicate(id, offset)));
                        }
                        Poll::Ready(Ok(Submitted::Room(dest))) => {
                            let key = std::mem::take(&mut this.key);
                            let range = 0..payload.as_slice().len();
                            let answer = this.shared.append_elsewhere(key, payload, range, dest);
                            this.state = SubmitState::Appending(answer);
                        }
                    }
                }
                SubmitState::Appending(mut answer) => match Pin::new(&mut answer).poll(cx) {
                    Poll::Ready(Ok(Appended::Logged(pending))) => return Poll::Ready(Ok(pending)),
                    Poll::Ready(Ok(Appended::Busy {
                        instance,
                        key,
                        payload,
                        ..
                    })) => {
                        this.key = key;
                        this.state = SubmitState::Waiting(instance, payload);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        this.state = SubmitState::Appending(answer);
                        return Poll::Pending;
                    }
                },
                SubmitState::Waiting(instance, payload) => {
                    match this
                        .shared
                        .poll_room_in(instance, cx, &mut this.registration)
                    {
                        Poll::Pending => {
                            this.state = SubmitState::Waiting(instance, payload);
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(dest)) => {
                            let key = std::mem::take(&mut this.key);
                            let range = 0..payload.as_slice().len();
                            let answer = this.shared.append_elsewhere(key, payload, range, dest);
                            this.state = SubmitState::Appending(answer);
                        }
                        // Gone: route again.
                        Poll::Ready(None) => this.state = SubmitState::Start(Ok(payload)),
                    }
                }
            }
        }
    }
}

/// A query waiting for room as a future: see [`Client::query_async`] (and the one wait
/// it keeps in its poll). Resolves to the [`Pending`] answer once the query is queued.
#[must_use = "a query does nothing unless polled"]
pub struct Query<H: Handler, F> {
    shared: Arc<Shared<H>>,
    key: Vec<u8>,
    /// The function, until it is queued (or run).
    query: Option<F>,
    /// Resolved: polling again is [`Error::Closed`].
    done: bool,
    /// Where it waits for room in a full queue (dropped with it).
    registration: Registration,
}

impl<H, F, T> Future for Query<H, F>
where
    H: Handler,
    T: Send + 'static,
    F: FnOnce(&H::State) -> T + Send + 'static,
{
    type Output = Result<Pending<T>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(Err(Error::Closed));
        }
        let mut room = Room::Poll(cx, &mut this.registration);
        let queried = this
            .shared
            .submit_query(&this.key, &mut this.query, &mut room);
        this.done = queried.is_ready();
        queried
    }
}

// The function is never pinned: it is only moved out, to be queued.
impl<H: Handler, F> Unpin for Query<H, F> {}

impl<H: Handler, F> std::fmt::Debug for Query<H, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("key", &self.key)
            .field("resolved", &self.done)
            .finish()
    }
}

/// A batch's keys, each with where its encoded request lies in the buffer beside them.
type EncodedBatch<K> = (Vec<(K, std::ops::Range<usize>)>, fold::Scratch);

/// Encodes a batch's requests into one buffer this thread reuses.
fn encode_batch<K, R: serde::Serialize>(
    requests: impl IntoIterator<Item = (K, R)>,
) -> Result<EncodedBatch<K>> {
    let mut payloads = fold::Scratch::empty();
    let items = requests
        .into_iter()
        .map(|(k, r)| Ok((k, payloads.push_request(&r)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((items, payloads))
}

fn encode_batch_with_ids<K, R: serde::Serialize>(
    requests: impl IntoIterator<Item = (K, RequestId, R)>,
) -> Result<EncodedBatch<K>> {
    let mut payloads = fold::Scratch::empty();
    let items = requests
        .into_iter()
        .map(|(k, id, r)| Ok((k, payloads.push_request_with_id(&r, id)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((items, payloads))
}

/// A batch submit that waits for room, and for its append, as a future: see
/// [`Client::submit_batch_async`]. Resolves to the [`Pending`] responses, in the order
/// given, once the batch is in the log.
#[must_use = "a submit does nothing unless polled"]
pub struct SubmitBatch<H: Handler> {
    shared: Arc<Shared<H>>,
    /// The keys, and where each one's encoded request lies in `payloads`.
    items: Vec<(Vec<u8>, std::ops::Range<usize>)>,
    payloads: fold::Scratch,
    /// Why the requests could not be encoded: the first poll's answer.
    failed: Option<Error>,
    progress: BatchProgress<H>,
    /// Room taken; an appender thread logs and queues the batch (see
    /// [`ClusterBuilder::append_threads`]).
    appending: Option<BatchAppend<H>>,
    /// The requests found logged already (with their key and id) and taken out of
    /// `items` before it was routed: their places among the answers (see
    /// [`Shared::with_duplicates`]). Empty if none were.
    known: Vec<Option<(RequestId, crate::Offset)>>,
    /// Resolved: polling again is [`Error::Closed`] and submits nothing.
    done: bool,
    /// Where a batch of one waits for room in a full queue (dropped with it; a larger
    /// batch waits under `progress`'s).
    registration: Registration,
}

/// The answer of an appender thread logging a batch: a batch of one goes as a single
/// submit.
enum BatchAppend<H: Handler> {
    One(Pending<Appended<H>>),
    /// A batch of one back from an appender thread: waiting for room in this instance's
    /// full queue, as a future (see [`Appended::Busy`]).
    OneWaiting(InstanceId),
    Many(Pending<BatchAppended<H>>),
}

impl<H: Handler> Future for SubmitBatch<H> {
    type Output = Result<Vec<Pending<H::Response>>>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut submitted = this.poll_once(cx);
        this.done = submitted.is_ready();
        if !this.known.is_empty()
            && let Poll::Ready(Ok(logged)) = submitted
        {
            let known = std::mem::take(&mut this.known);
            submitted = Poll::Ready(this.shared.with_duplicates(logged, &known));
        }
        submitted
    }
}

impl<H: Handler> SubmitBatch<H> {
    fn poll_once(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Vec<Pending<H::Response>>>> {
        if self.done {
            return Poll::Ready(Err(Error::Closed));
        }
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        loop {
            // Every state but the first goes on with `continue` (or returns): only a
            // batch with no append in progress takes room below.
            match &mut self.appending {
                Some(BatchAppend::One(answer)) => match ready!(Pin::new(answer).poll(cx))? {
                    Appended::Logged(pending) => return Poll::Ready(Ok(vec![pending])),
                    Appended::Busy {
                        instance, payload, ..
                    } => {
                        self.payloads = payload;
                        self.appending = Some(BatchAppend::OneWaiting(instance));
                        continue;
                    }
                },
                Some(BatchAppend::OneWaiting(instance)) => {
                    let instance = *instance;
                    match ready!(
                        self.shared
                            .poll_room_in(instance, cx, &mut self.registration)
                    ) {
                        Some(dest) => {
                            // A batch of one: its item is still here.
                            let Some((key, range)) = self.items.first().cloned() else {
                                dest.permits.release();
                                return Poll::Ready(Err(lost_payload()));
                            };
                            let payloads =
                                std::mem::replace(&mut self.payloads, fold::Scratch::empty());
                            let answer = self.shared.append_elsewhere(key, payloads, range, dest);
                            self.appending = Some(BatchAppend::One(answer));
                        }
                        // Gone: route again.
                        None => self.appending = None,
                    }
                    continue;
                }
                Some(BatchAppend::Many(answer)) => match ready!(Pin::new(answer).poll(cx))? {
                    BatchAppended::Logged(pendings) => return Poll::Ready(Ok(pendings)),
                    BatchAppended::Again(items, payloads) => {
                        // Routed again, taking room again as a future.
                        self.items = items;
                        self.payloads = payloads;
                        self.progress = BatchProgress::default();
                        self.appending = None;
                        continue;
                    }
                },
                None => {}
            }
            if self.items.is_empty() || !self.shared.appends_elsewhere() {
                return self.shared.poll_submit_batch(
                    &self.items,
                    self.payloads.as_slice(),
                    &mut self.progress,
                    Some(cx),
                );
            }
            // Room is taken here, as a future; the append runs on an appender thread. (A
            // batch of one with an id goes the batch's way: its duplicate resolves its
            // pending, where a single submit's is refused.)
            if let [(key, range)] = self.items.as_slice()
                && self
                    .payloads
                    .as_slice()
                    .get(range.clone())
                    .is_some_and(|p| fold::request_id(p).is_none())
            {
                let Some(body) = self.payloads.as_slice().get(range.clone()) else {
                    return Poll::Ready(Err(lost_payload()));
                };
                let mut room = Room::Poll(cx, &mut self.registration);
                let reserved = self.shared.submit_from(key, body, &mut room, None, true);
                match ready!(reserved)? {
                    Submitted::Logged(p, waits) => {
                        return Poll::Ready(self.shared.durable(p, waits).map(|p| vec![p]));
                    }
                    // Only requests with ids, which go the batch's way (above).
                    Submitted::Duplicate(id, offset) => {
                        return Poll::Ready(Err(self.shared.duplicate(id, offset)));
                    }
                    Submitted::Room(dest) => {
                        let (key, range) = (key.clone(), range.clone());
                        let payloads =
                            std::mem::replace(&mut self.payloads, fold::Scratch::empty());
                        let answer = self.shared.append_elsewhere(key, payloads, range, dest);
                        self.appending = Some(BatchAppend::One(answer));
                    }
                }
                continue;
            }
            ready!(
                self.shared
                    .poll_batch_room(&self.items, &mut self.progress, Some(cx))
            )?;
            let items = std::mem::take(&mut self.items);
            let payloads = std::mem::replace(&mut self.payloads, fold::Scratch::empty());
            let progress = std::mem::take(&mut self.progress);
            let answer = self
                .shared
                .append_batch_elsewhere(items, payloads, progress);
            self.appending = Some(BatchAppend::Many(answer));
        }
    }
}

impl<H: Handler> std::fmt::Debug for SubmitBatch<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitBatch")
            .field("requests", &self.items.len())
            .field("resolved", &self.done)
            .finish()
    }
}

impl<H: Handler> std::fmt::Debug for Submit<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submit")
            .field("key", &self.key)
            .field("resolved", &matches!(self.state, SubmitState::Done))
            .finish()
    }
}

impl<H: Handler> ClusterBuilder<H> {
    /// How many appender threads async submits may use (default 16). When the input
    /// log's appends wait for the disk
    /// ([`SyncPolicy::Always`](crate::store::SyncPolicy::Always), the default), an async
    /// submit ([`submit_async`](Client::submit_async), [`request`](Client::request),
    /// [`submit_batch_async`](Client::submit_batch_async)) takes room in the queue as a
    /// future, then hands its append to one of these threads and waits for it as a
    /// future too: an executor's thread never waits for an fdatasync. Up to this many
    /// appends are in flight at once, sharing fdatasyncs through the log's group
    /// commit. The threads start with the first such submit; blocking submits never use
    /// them. At least 1.
    pub fn append_threads(mut self, threads: usize) -> Self {
        self.options.append_threads = threads.max(1);
        self
    }

    /// Keeps the logs on disk in `dir` (the embedded default): the input log in
    /// `dir/input` and the journal of outside calls in `dir/effects`, both [`LogStore`]s
    /// opened with [`log_options`](ClusterBuilder::log_options) (the journal's segments
    /// are at most 4 MiB: with preallocation on, each log reserves one segment on disk).
    /// Opening a directory that holds logs rebuilds every key's state from them. A
    /// directory that is itself a [`LogStore`]'s (its segments at the top) is refused
    /// with [`Error::Config`] at [`build`](Self::build): its records are not a
    /// cluster's; [`stores`](Self::stores) takes such a log.
    pub fn dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.storage = Storage::Dir(dir.into());
        self
    }

    /// Options of the on-disk logs (default [`LogOptions::new`]: `SyncPolicy::Always`,
    /// so a request whose submit returned survives a crash of the process or the
    /// machine; `SyncPolicy::Every` trades a window for throughput: the requests
    /// appended since the last sync are in the process's memory, and a crash of the
    /// process loses them, even those already answered). Options with retention
    /// ([`LogOptions::retain_for`], [`LogOptions::retain_bytes`]) are refused by
    /// [`build`](Self::build) with [`Error::Config`]: see
    /// [`truncate_after_checkpoint`](Self::truncate_after_checkpoint) instead.
    pub fn log_options(mut self, options: LogOptions) -> Self {
        self.log_options = options;
        self
    }

    /// How keys are placed on instances (default: ε = 0.2, keys forgotten after 10
    /// minutes idle, instances over their cap shed keys; see [`StickyOptions`]).
    ///
    /// ε bounds an instance's load when a key is placed on it: under `⌈(1 + ε) · mean⌉`
    /// recent requests. A placed key stays where it is while its instance is within
    /// that bound, so the load can drift a little past it as keys get busier; past it,
    /// the instance sheds keys to instances with room, each moving with its state
    /// (see [`StickyOptions::shed_when_over`]; the router considers a key for that at
    /// most once per load window of requests). The cluster's default ε is below the router's 0.25: on a
    /// Zipf(1.1) load whose hottest keys share a static partition (a static hash at
    /// 2.06 times the mean), the busiest instance measured 1.251–1.252 times the mean
    /// with ε = 0.25, and 1.201–1.202 with 0.2.
    pub fn placement(mut self, options: StickyOptions) -> Self {
        self.placement = options;
        self
    }

    /// Keeps the logs in memory (tests; nothing survives the process).
    pub fn in_memory(mut self) -> Self {
        self.storage = Storage::Memory;
        self
    }

    /// Uses `input` as the input log and `effects` as the journal of outside calls (any
    /// [`Store`]; `None` keeps the journal in memory only).
    pub fn stores(mut self, input: Arc<dyn Store>, effects: Option<Arc<dyn Store>>) -> Self {
        self.storage = Storage::Stores { input, effects };
        self
    }

    /// How many instances start (default 4; at least 1, at most
    /// [`MAX_INSTANCES`](crate::router::MAX_INSTANCES)).
    pub fn instances(mut self, n: usize) -> Self {
        self.instances = n;
        self
    }

    /// Requests an instance may have queued before producers wait (default 1024; at
    /// least 1). The queue grows as requests arrive, up to this bound: it is what bounds
    /// an instance's memory when it falls behind (at most this many requests, each with
    /// its key and payload), so a very large value leaves it next to unbounded.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.options.queue_capacity = n;
        self
    }

    /// How long an instance with nothing to do waits for more requests before it looks
    /// at its queue again (default `Duration::ZERO`: it does not linger). Lingering
    /// trades latency for CPU, as Kafka's `linger.ms` does for a producer.
    ///
    /// Without lingering, an idle instance yields its core a few times, then sleeps, and
    /// a request that finds it asleep wakes it: the lowest latency.
    ///
    /// While an instance lingers, submitting a request does not wake it (a half-full
    /// queue does), so requests reach it in batches and a submit costs no futex wake-up;
    /// a request may wait up to `linger`, plus the OS timer slack (about 50 µs on
    /// Linux), before its instance picks it up. A thread that blocks on an answer
    /// ([`Pending::wait`]) wakes the instance that owes it, which then stops lingering
    /// for a while, so a caller that submits one request at a time and waits is served
    /// almost as fast as without lingering (the quickstart's 9,544 sequential reads:
    /// 56–75 ms, against 44 ms without). An `.await`ed answer wakes it the same way,
    /// when the executor's poll leaves its waker, so even an endless linger
    /// (`Duration::MAX`) delays no answer somebody waits for. After about 20 lingers
    /// that found nothing, an instance sleeps until the next request wakes it, so a
    /// quiet cluster uses no CPU.
    ///
    /// What 50 µs measured on the 2-core bench (`cargo bench --bench compare -- --only
    /// cluster`: 4 instances, 2 submitting threads, Zipf load), against no linger:
    /// 0.6–0.9× the CPU per request; the median latency at half load 70–80 µs instead of
    /// about 5 µs (p99 about 250–420 µs either way); 1.25–1.4× the requests per second
    /// in short runs (60k requests) but 0.8–1.0× in long ones (400k), where lingering
    /// instances fall into phases of small batches. Linger when CPU per request matters
    /// more than latency.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.options.linger = linger;
        self
    }

    /// How long one request may run before its instance is declared stalled
    /// (default 5 s; above zero). The supervisor checks every
    /// [`supervise_every`](Self::supervise_every), so a stall is declared between this
    /// long and this long plus two checks after the request began.
    ///
    /// A request stalled twice is set aside ([`Error::HandlerStalled`]) unless it was
    /// answered: an answered request keeps its place in the state, so an instance
    /// replaying it (a rebuild after a panic or a move) is not replaced at every stall
    /// timeout, which on a machine too slow for its replays would go on for good. Each
    /// replacement its replays cost doubles the time the next replay of it is given (2,
    /// 4, ... up to 1,024 times this timeout).
    ///
    /// A call into the input store that runs this long (an append, or a wait for
    /// appended records to be durable) is reported too, as a warning and in
    /// [`Metrics::store_stalls`] and [`Metrics::store_stalled_for`]; the requests behind
    /// it wait for it, and no instance is replaced for it.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.options.stall_timeout = timeout;
        self
    }

    /// Checkpoint every key's state after this many requests (default 100,000; at
    /// least 1). `u64::MAX` leaves checkpoints to [`Cluster::checkpoint`].
    ///
    /// What a checkpoint bounds: the log replayed at the next open, and the answers of
    /// outside calls ([`Context::call`]) kept in memory for rebuilds, which are those
    /// made since the last checkpoint. Without checkpoints both grow with the log.
    pub fn checkpoint_every(mut self, requests: u64) -> Self {
        self.options.checkpoint_every = requests;
        self
    }

    /// How often the supervisor looks at heartbeats (default 20 ms; above zero).
    pub fn supervise_every(mut self, tick: Duration) -> Self {
        self.options.tick = tick;
        self
    }

    /// Drop the input log before each checkpoint (default false: keep every record, so
    /// any past state can be rebuilt and re-run). The last
    /// [`retry_window`](Self::retry_window) records stay (65,536 by default), so that a
    /// restart still recognizes their request ids.
    pub fn truncate_after_checkpoint(mut self, truncate: bool) -> Self {
        self.options.truncate_after_checkpoint = truncate;
        self
    }

    /// Opens by rebuilding every key's state from the whole input log, ignoring every
    /// checkpoint in the store (default false: start from the latest checkpoint and fold
    /// only the log after it).
    ///
    /// For the first open after changing the handler's `State` type (a field added, say).
    /// A checkpoint holds each state encoded with bincode, which is not self-describing:
    /// states written with the old type do not decode as the new one, and without this
    /// option the build is refused with [`Error::Codec`] naming a key (it decodes a few
    /// of the checkpoint's states before it starts anything; a type change that some of
    /// them still decode as would leave those that do not [`Error::StateUnavailable`]).
    /// The log still holds every request (its requests' type must be unchanged: a
    /// request that does not decode fails its key's fold, and the build, as below), so
    /// folding it with the current handler rebuilds each state in the new type.
    ///
    /// What it costs: the open folds every request of the log, as a cluster that never
    /// checkpointed would. Before `build` returns it takes a fresh checkpoint, waiting
    /// as long as the fold takes, so that every later rebuild (after a panic, a stall, a
    /// move, or the next open, which needs this option no more) starts from a checkpoint
    /// in the new type. A key whose fold fails (the store cannot read the log, say)
    /// would be missing from that checkpoint: `build` then fails with
    /// [`Error::CheckpointAbandoned`], naming the key, and stops what it started.
    ///
    /// What it refuses: a log that no longer starts at offset 0 (its head dropped by
    /// [`truncate_after_checkpoint`](Self::truncate_after_checkpoint) or by retention on
    /// the store) no longer holds the requests before its start; their effect on the
    /// states exists only in the checkpoint. `build` then fails with [`Error::Config`]
    /// before it writes anything, and the store is left as it was: open it with the
    /// `State` type its checkpoint was written with.
    pub fn rebuild_from_log(mut self, rebuild: bool) -> Self {
        self.options.rebuild_from_log = rebuild;
        self
    }

    /// How far back the ids of requests submitted with one are remembered, in records of
    /// the input log (default 65,536; 0 remembers none). A retry through
    /// [`Client::submit_with_id`] is recognized while its first submit is among the
    /// last `records` records of the log (requests of every key and control records
    /// count), and after a restart too, as far as the log still holds them.
    ///
    /// What it costs: memory for at most twice `records` ids (88 bytes each with keys of
    /// up to 30 bytes at the default, so 11 MiB; up to twice that per id at other sizes,
    /// as its tables grow by doubling; and only as many as requests with ids were
    /// logged), and at open a read of the last `records` records of the log.
    /// Size it to cover the longest a client may take to retry, at the busiest request
    /// rate: at 100,000 requests/s, the default covers 0.65 s; a client that retries
    /// after a 5 s timeout needs 500,000.
    ///
    /// A restart remembers what the log still holds:
    /// [`truncate_after_checkpoint`](Self::truncate_after_checkpoint) keeps the last
    /// `records` records for that, and retention on the store (or a log opened with a
    /// larger window than it was written with) can leave fewer. Records before the
    /// checkpoint that the store cannot read (damage the open does not need to read
    /// past) lose their ids, with a warning, not the open.
    pub fn retry_window(mut self, records: u64) -> Self {
        self.options.retry_window = records;
        self
    }

    /// Where instances run (default [`ThreadLauncher`]).
    pub fn launcher(mut self, launcher: impl Launcher) -> Self {
        self.launcher = Arc::new(launcher);
        self
    }

    /// Recovers the state from the logs and starts the instances.
    pub fn build(self) -> Result<Cluster<H>> {
        if self.instances == 0 || self.instances > crate::router::MAX_INSTANCES {
            return Err(Error::Config(format!(
                "instances must be between 1 and {}, not {}",
                crate::router::MAX_INSTANCES,
                self.instances
            )));
        }
        if self.options.queue_capacity == 0 {
            return Err(Error::Config("queue_capacity must be at least 1".into()));
        }
        // Zero would declare every busy instance stalled at the next tick, spin the
        // supervisor on a core, or checkpoint at every tick even with no traffic.
        if self.options.stall_timeout.is_zero() {
            return Err(Error::Config("stall_timeout must be above zero".into()));
        }
        if self.options.tick.is_zero() {
            return Err(Error::Config("supervise_every must be above zero".into()));
        }
        if self.options.checkpoint_every == 0 {
            return Err(Error::Config(
                "checkpoint_every must be at least 1 (u64::MAX: no checkpoint but on demand)"
                    .into(),
            ));
        }
        let mut owned = Vec::new();
        let (input, effects): (Arc<dyn Store>, Option<Arc<dyn Store>>) = match self.storage {
            Storage::Unset => {
                return Err(Error::Config(
                    "no storage chosen: call .dir(..), .in_memory() or .stores(..)".into(),
                ));
            }
            Storage::Memory => (
                Arc::new(MemoryStore::new()),
                Some(Arc::new(MemoryStore::new())),
            ),
            Storage::Stores { input, effects } => (input, effects),
            Storage::Dir(dir) => {
                if self.log_options.retains() {
                    return Err(Error::Config(
                        "log_options set retention (retain_for or retain_bytes): a cluster \
                         rebuilds every key's state from its log, and drops the log's head \
                         itself once a checkpoint covers it (truncate_after_checkpoint)"
                            .into(),
                    ));
                }
                if let Some(file) = log_store_file_in(&dir) {
                    return Err(Error::Config(format!(
                        "{} holds a LogStore's own files ({file}): a cluster keeps its logs \
                         in input/ and effects/ under the directory it is given; give it \
                         another directory, or open that log and pass it with .stores(..)",
                        dir.display()
                    )));
                }
                let input = Arc::new(OwnedLog::new(LogStore::open(
                    dir.join("input"),
                    self.log_options.clone(),
                )?));
                // Outside calls are few: small segments, so that a service that makes
                // none does not reserve a whole segment of the input's size for them.
                let segment = self.log_options.segment_bytes_value();
                let effects = Arc::new(OwnedLog::new(LogStore::open(
                    dir.join("effects"),
                    self.log_options
                        .segment_bytes(segment.min(EFFECTS_SEGMENT_BYTES)),
                )?));
                owned = vec![input.clone(), effects.clone()];
                (input, Some(effects))
            }
        };
        let tick = self.options.tick;
        let stall = self.options.stall_timeout;
        let rebuild_from_log = self.options.rebuild_from_log;
        let shared = Shared::open(Parts {
            handler: self.handler,
            input,
            effects,
            options: self.options,
            placement: Box::new(Sticky::new(self.placement)),
            launcher: self.launcher,
            instances: (0..self.instances as u32).collect(),
            owned,
        })?;
        // Made first, so that a failure below drops it, which stops what was started.
        let cluster = Cluster {
            shared,
            supervisor: Mutex::new(None),
            checkpointer: Mutex::new(None),
        };
        *cluster.checkpointer.lock() = Some(cluster.shared.start_checkpointer()?);
        *cluster.supervisor.lock() = Some(Supervisor::start(cluster.shared.clone(), tick, stall)?);
        if rebuild_from_log {
            // With the supervisor watching: a fold that hangs is a stall, not a hang here.
            cluster.shared.checkpoint_rebuilt_states()?;
        }
        Ok(cluster)
    }
}

/// The name of a file in `dir` that only a [`LogStore`] opened on `dir` itself writes
/// (its segment manifest, or a segment), if there is one: a cluster's directory holds
/// its logs one level down.
fn log_store_file_in(dir: &std::path::Path) -> Option<String> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries.filter_map(|e| e.ok()).find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let segment = name
            .strip_suffix(".log")
            .is_some_and(|base| base.len() == 20 && base.bytes().all(|b| b.is_ascii_digit()));
        (segment || name == "segments.meta").then_some(name)
    })
}
