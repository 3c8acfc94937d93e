//! The one error type of the crate, and its `Result` alias.
//!
//! Every variant carries the context needed to act on it: the file and byte position of
//! corruption, the offset range a store holds, the instance or key involved.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::record::{Offset, Record};
use crate::router::InstanceId;

/// The result type used throughout cauce.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in cauce.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call on a file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`"open"`, `"write"`, `"fdatasync"`, ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Stored data failed its checks somewhere other than a torn tail.
    ///
    /// Nothing after this point is returned as data. A log with corruption in the middle
    /// can still be opened read-only up to this point.
    #[error("corrupt data in {path} at byte {position}{}: {reason}", offset_suffix(*.offset))]
    Corrupt {
        /// The file holding the bad bytes.
        path: PathBuf,
        /// Byte position of the first bad byte (or of the frame that failed its check).
        position: u64,
        /// The log offset expected at that position, when known.
        offset: Option<Offset>,
        /// What check failed.
        reason: String,
    },

    /// A read asked for an offset the store does not hold.
    #[error("offset {requested} is out of range: the store holds offsets {start}..{end}")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: Offset,
        /// The first offset still held (earlier ones were dropped by retention).
        start: Offset,
        /// The next offset to be written.
        end: Offset,
    },

    /// A record of a batch is larger than the store's limit; nothing of the batch was
    /// appended.
    #[error(
        "record {index} of the batch (0 for a single record) is {size} bytes, over the \
         store's limit of {limit} (LogOptions::max_record_bytes for a LogStore)"
    )]
    RecordTooLarge {
        /// Where the record is in the batch given to `append` (0 for the first).
        index: usize,
        /// Its size as the limit counts it ([`record_size`](crate::store::record_size)).
        size: usize,
        /// The store's limit.
        limit: usize,
    },

    /// A record of a batch is stamped further ahead of the store's clock than its
    /// options allow
    /// ([`LogOptions::max_timestamp_ahead`](crate::store::LogOptions::max_timestamp_ahead));
    /// nothing of the batch was appended.
    #[error(
        "record {index} of the batch (0 for a single record) is stamped {timestamp}, \
         {} ms ahead of the store's clock ({now}); the store accepts at most {} ms \
         (LogOptions::max_timestamp_ahead)",
        .timestamp.saturating_sub(*.now),
        .max_ahead.as_millis()
    )]
    TimestampAhead {
        /// Where the record is in the batch given to `append` (0 for the first).
        index: usize,
        /// Its timestamp.
        timestamp: crate::record::Timestamp,
        /// The store's clock when the append was called.
        now: crate::record::Timestamp,
        /// The most a timestamp may be ahead of it.
        max_ahead: Duration,
    },

    /// A batch is larger than one append can write (a [`LogStore`](crate::store::LogStore)
    /// frames a batch with a 32-bit length), though each of its records is within the
    /// limit; nothing of it was appended. Append it in parts.
    #[error("the batch is {size} bytes, over the {limit} bytes one append can write")]
    AppendTooLarge {
        /// The sum of its records' sizes.
        size: usize,
        /// The most one append can write.
        limit: usize,
    },

    /// A batch would take offsets past the last one a log can hold (the offset after
    /// its last record must fit in a `u64`); nothing of it was appended. Only a log whose
    /// files start near the end of the offset space gets here.
    #[error("offsets are used up: {records} records from offset {next} would pass u64::MAX")]
    OffsetsExhausted {
        /// The offset the batch's first record would have taken.
        next: Offset,
        /// How many records the batch holds.
        records: usize,
    },

    /// A value could not be encoded or decoded by a [`Codec`](crate::Codec).
    #[error("codec error ({context}): {message}")]
    Codec {
        /// What was being encoded or decoded.
        context: &'static str,
        /// The codec's own message.
        message: String,
    },

    /// A name (cursor, snapshot) is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A configuration value is out of its allowed range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A non-blocking publish found the stream full; nothing was published.
    #[error("stream is full")]
    Full,

    /// The other side is gone: every publisher (or every subscriber) was dropped, or the
    /// service shut down.
    #[error(
        "closed: the other side is gone (every publisher or every subscriber dropped, the stream closed, or the service shut down)"
    )]
    Closed,

    /// A blocking call gave up after its timeout. What it waited for is not cancelled: a
    /// request whose answer timed out is still handled, and can be waited on again.
    #[error(
        "timed out after {0:?} (what was waited for is not cancelled: a request is still handled, a record still comes, and either can be waited for again)"
    )]
    Timeout(Duration),

    /// The store was opened read-only (for example up to a corruption point).
    #[error("the store is read-only: {0}")]
    ReadOnly(String),

    /// The store's directory is open for writing already: by another process, or by
    /// another open store (or cluster) in this one.
    #[error(
        "{path} is locked: the store is open for writing elsewhere (another process, or another open store in this one)"
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
    },

    /// A stream cannot be read from a stored position because it is only notified.
    #[error("this stream is not stored: it can only be subscribed to from now on")]
    NotStored,

    /// An instance id that the router or launcher does not know.
    #[error("instance {0} is unknown")]
    UnknownInstance(InstanceId),

    /// The router has no instance to route to.
    #[error("no instance is available")]
    NoInstance,

    /// An instance's queue is full; a non-blocking submit was refused and nothing was
    /// accepted.
    #[error("instance {instance} is busy: its queue of {capacity} requests is full")]
    Busy {
        /// The instance whose queue is full.
        instance: InstanceId,
        /// The queue's capacity.
        capacity: usize,
    },

    /// The instance running the handler was declared stalled and replaced while it was
    /// in [`Context::call`](crate::cluster::Context::call)'s handler: it makes no more
    /// outside calls (its replacement handles the request, and its own answer is
    /// discarded).
    #[error("instance {instance} was replaced: it makes no more outside calls")]
    Fenced {
        /// The replaced instance.
        instance: InstanceId,
    },

    /// A batch sends more requests to one instance than its queue holds, so it could
    /// never fit; nothing of it was logged. A batch of at most the queue capacity
    /// ([`ClusterBuilder::queue_capacity`](crate::cluster::ClusterBuilder::queue_capacity))
    /// always fits.
    #[error("batch sends {requests} requests to instance {instance}, whose queue holds {capacity}")]
    BatchTooLarge {
        /// The instance.
        instance: InstanceId,
        /// How many of the batch's requests go to it.
        requests: usize,
        /// Its queue's capacity.
        capacity: usize,
    },

    /// The handler panicked while handling a request; the request was logged, its
    /// instance restarted and the key's state rebuilt without it. A mark in the log
    /// keeps every later replay from running it again; if the store refuses that mark
    /// (logged through `tracing` as "could not log the poison mark"), a replay after a
    /// restart runs the request again, and leaves it out only if the handler panics on
    /// it again, as a deterministic handler does.
    #[error("handler panicked on instance {instance} at offset {offset}: {message}")]
    HandlerPanicked {
        /// The instance that ran the handler.
        instance: InstanceId,
        /// The offset of the request in the input log.
        offset: Offset,
        /// The panic message.
        message: String,
    },

    /// A request submitted with an id
    /// ([`Client::submit_with_id`](crate::cluster::Client::submit_with_id)) repeats one
    /// already logged for the same key with the same id, at `offset`: this one was not
    /// logged, and changes nothing. The original is handled once, and its effect is in
    /// the key's state (unless its handler panicked or stalled, which set it aside); its
    /// own answer went to whoever submitted it. A retry after a timeout or a lost answer
    /// gets this instead of applying the request twice.
    #[error("request {id} for this key was already logged at offset {offset}; not logged again")]
    Duplicate {
        /// The request's id.
        id: crate::cluster::RequestId,
        /// Where the first request with this key and id is in the input log.
        offset: Offset,
    },

    /// The input store panicked while an appender thread logged an async submit
    /// ([`Client::submit_async`](crate::cluster::Client::submit_async) and its batch
    /// form, over a store whose appends wait for the disk). The thread goes on serving
    /// the others. Panicked in the append (`logged` false), the request was not logged.
    /// Panicked in the wait for the disk after it (`logged` true), the request is in
    /// the log and its instance handles it once its own wait says it is durable; as
    /// after a failed fdatasync, whether it survives a crash is known once the log is
    /// reopened.
    #[error("the input store panicked {}: {message}", if *.logged { "waiting for the disk after logging the request" } else { "appending the request; it was not logged" })]
    StorePanicked {
        /// Whether the request was appended before the panic.
        logged: bool,
        /// The panic message.
        message: String,
    },

    /// The handler stalled twice on a request: each time it ran longer than the stall
    /// timeout, and its instance was declared stalled and replaced (the second time
    /// usually while the replacement replayed it). The request is logged, and marked in
    /// the log so that no replay runs it again: it changed no state, like a request
    /// whose handler panicked. A request that stalls once is handled again by its key's
    /// new owner, and answered as usual.
    #[error(
        "handler stalled twice (past the stall timeout of {stall_timeout:?}) on the request at offset {offset}, the second time on instance {instance}; it was set aside"
    )]
    HandlerStalled {
        /// The instance the second stall caught on the request.
        instance: InstanceId,
        /// The offset of the request in the input log.
        offset: Offset,
        /// The cluster's stall timeout.
        stall_timeout: Duration,
    },

    /// A query's function panicked (see `Client::query`). The state it read is
    /// unchanged, and its instance goes on.
    #[error("query of key {key:?}{} panicked: {message}", on_instance(*.instance))]
    QueryPanicked {
        /// The instance that ran it; `None` when it ran on the caller's thread (a key
        /// with no state yet is read as `State::default()` there).
        instance: Option<InstanceId>,
        /// The key it read (lossy UTF-8).
        key: String,
        /// The panic message.
        message: String,
    },

    /// A query's function ran longer than the stall timeout: its instance was declared
    /// stalled and replaced, as for a request, and the query was not run again. Queries
    /// that were queued behind it are run by the keys' new owners.
    #[error(
        "query of key {key:?} stalled on instance {instance} (past the stall timeout of {stall_timeout:?}); its instance was replaced"
    )]
    QueryStalled {
        /// The instance the stall caught on the query.
        instance: InstanceId,
        /// The key it read (lossy UTF-8).
        key: String,
        /// The cluster's stall timeout.
        stall_timeout: Duration,
    },

    /// A replay did not do what the original run did (a handler that is not
    /// deterministic, for example one that calls out in a different order).
    #[error("replay of offset {offset} diverged from the journal: {detail}")]
    Nondeterministic {
        /// The offset of the request being replayed.
        offset: Offset,
        /// What differed.
        detail: String,
    },

    /// The state of a key could not be rebuilt (the store failed to read the checkpoint
    /// or the log, say), so a request of it is refused rather than served from a wrong
    /// state. `reason` names the key and carries the store's error.
    ///
    /// Every request that waited for the failed rebuild (those a lost instance held) is
    /// answered this at once. A later request of the key first rebuilds it again, and is
    /// refused so only if that fails too; other keys are not affected. A refused request
    /// stays in the log: it was not applied, but once a rebuild of its key works (or the
    /// cluster opens again) the key's state is the fold of every logged request, this one
    /// included.
    #[error("state on instance {instance} is unavailable: {reason}")]
    StateUnavailable {
        /// The instance that failed to rebuild.
        instance: InstanceId,
        /// Why.
        reason: String,
    },

    /// An instance was given a weight a router cannot take (weights must be positive).
    #[error("{} cannot have weight {weight}: weights must be at least 1", match .instance { Some(id) => format!("instance {id}"), None => "a new instance".to_string() })]
    InvalidWeight {
        /// The instance; `None` for one that was to be added
        /// ([`Cluster::add_instance`](crate::cluster::Cluster::add_instance)), which
        /// gets no id.
        instance: Option<InstanceId>,
        /// The weight refused.
        weight: u32,
    },

    /// The cluster's last instance cannot be removed: a cluster always has one to route
    /// to. Add another first, or shut the cluster down.
    #[error(
        "instance {0} is the cluster's last: add another before removing it, or shut the cluster down"
    )]
    LastInstance(InstanceId),

    /// An instance id no router takes as a member: [`InstanceId::REPLAY`] (`u32::MAX`)
    /// names the instance a replay runs handlers as, never a live one.
    #[error("instance id {0} is reserved: it names a replay's handlers, never a member")]
    ReservedInstance(InstanceId),

    /// An input of a [`merge`](crate::stream::merge) panicked while it was read (in a
    /// filter's or a map's closure, say): its thread stopped, and the records it had not
    /// read yet are not received. The merge goes on with its other inputs.
    #[error("merge input {input} panicked: {message}")]
    InputPanicked {
        /// The input's position among the merge's inputs.
        input: usize,
        /// The panic message.
        message: String,
    },

    /// A router already holds as many instances as it can.
    #[error("instance {instance} cannot join: the router holds at most {limit} instances")]
    TooManyInstances {
        /// The instance that could not join.
        instance: InstanceId,
        /// The most instances the router holds.
        limit: usize,
    },

    /// `commit` was called on a subscription whose position cannot be made durable: it
    /// was not opened from a named cursor, its stream is not stored, it merges several
    /// streams, or it is a [`Tee`](crate::stream::Tee) holding a record its caller has
    /// not received yet.
    #[error("cannot commit this subscription: {0}")]
    CannotCommit(&'static str),

    /// A [`Tee`](crate::stream::Tee)'s second stream refused a record the tee received
    /// from its input (for example because that stream was closed), so the record was
    /// not returned. The input has not ended: the tee holds the record and offers it to
    /// the second stream again on the next call.
    #[error("the tee's second stream refused the record at offset {offset}: {source}")]
    TeeRefused {
        /// The record's offset in the tee's input.
        offset: Offset,
        /// Why the second stream refused it.
        #[source]
        source: Box<Error>,
    },

    /// [`forward`](crate::stream::forward)'s output refused a record read from its
    /// input (for example because the output stream was closed), so the pump stopped.
    /// The input has not ended, and the record is not lost: it is handed back here, read
    /// from the input but published nowhere.
    #[error(
        "forward's output refused the record at offset {} after {moved} moved: {source}",
        .record.offset
    )]
    ForwardRefused {
        /// Records moved before this one.
        moved: u64,
        /// The record read from the input that the output did not take.
        record: Box<Record>,
        /// Why the output refused it.
        #[source]
        source: Box<Error>,
    },

    /// A batch published through a split routes to more than one instance, so it cannot
    /// be published as one batch; publish its entries one by one.
    #[error("entry {index} of the batch routes to instance {other}, entry 0 to {first}")]
    BatchSpansInstances {
        /// The instance the batch's first entry routes to.
        first: InstanceId,
        /// The instance entry `index` routes to.
        other: InstanceId,
        /// The first entry that routes elsewhere.
        index: usize,
    },

    /// A checkpoint could not be completed (an instance stalled or left before giving its
    /// part); the previous checkpoint stands and a later one will be tried.
    #[error("checkpoint at offset {offset} abandoned: {reason}")]
    CheckpointAbandoned {
        /// Where the checkpoint was to be taken.
        offset: Offset,
        /// Why it was abandoned.
        reason: String,
    },

    /// A [`Replay`](crate::cluster::Replay) was asked for a state it cannot rebuild: the
    /// log still holds the offset, but no longer the requests before it (its head was
    /// dropped by
    /// [`truncate_after_checkpoint`](crate::cluster::ClusterBuilder::truncate_after_checkpoint)
    /// or by retention), and they exist only folded into the checkpoint, which was
    /// taken later. States from the checkpoint's offset on can be rebuilt.
    #[error(
        "the state before offset {requested} cannot be rebuilt: the log no longer holds \
         the requests before it, and {}",
        match earliest {
            Some(c) => format!("its checkpoint, where states can be rebuilt from, is at offset {c}"),
            None => "it has no checkpoint".to_string(),
        }
    )]
    BeforeCheckpoint {
        /// The offset asked for.
        requested: Offset,
        /// The checkpoint's offset: the earliest a state can be rebuilt before (`None`:
        /// there is no checkpoint, and no state can be rebuilt).
        earliest: Option<Offset>,
    },

    /// The record at an offset of a cluster's input log is not the request asked for:
    /// it records a membership change or a request set aside after its handler
    /// panicked, so there is no request there to re-run or handle; or, asked
    /// [`was_applied`](crate::cluster::Client::was_applied) for one key, a request of
    /// another key.
    #[error("the record at offset {offset} is not the request asked for: it records {what}")]
    NotARequest {
        /// The record's offset in the input log.
        offset: Offset,
        /// What the record is instead.
        what: String,
    },

    /// A handler (or a query function) submitted to, queried or shut down its own
    /// cluster. The call is refused: waiting for an answer there can wait for the
    /// handler's own instance, which answers nothing meanwhile (it is then declared
    /// stalled, and the request runs again, submitting again), a submit can block on its
    /// own full queue, and a shutdown waits for every instance to stop. Submit follow-up requests from outside the handler, once its answer is
    /// back; an outside call belongs in
    /// [`Context::call`](crate::handler::Context::call), to another service.
    #[error(
        "a handler{}{} called its own cluster (a submit, query or shutdown): refused, \
         since its instance cannot answer while it waits and a replay would submit \
         again; submit follow-up requests from outside the handler",
        on_instance(*.instance),
        offset_suffix(*.offset)
    )]
    InsideHandler {
        /// The instance running the handler (`None` for a query of a key with no holder,
        /// run on the caller's thread).
        instance: Option<InstanceId>,
        /// The offset of the request being handled (`None` in a query function).
        offset: Option<Offset>,
    },

    /// A thread the library needed could not be started.
    #[error("could not start thread {name:?}: {source}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

fn on_instance(instance: Option<InstanceId>) -> String {
    match instance {
        Some(i) => format!(" on instance {i}"),
        None => String::new(),
    }
}

fn offset_suffix(offset: Option<Offset>) -> String {
    match offset {
        Some(o) => format!(" (offset {o})"),
        None => String::new(),
    }
}

impl Error {
    /// Builds an [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Builds an [`Error::Corrupt`].
    pub fn corrupt(
        path: impl Into<PathBuf>,
        position: u64,
        offset: Option<Offset>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            path: path.into(),
            position,
            offset,
            reason: reason.into(),
        }
    }

    /// True for errors that a retry may cure (full, busy, timed out, or a
    /// [`Error::TeeRefused`] or [`Error::ForwardRefused`] for one of those). A
    /// [`Pending`](crate::client::Pending)'s timeout is cured by waiting again: its
    /// request is accepted, and a second submit of it would apply it twice (unless it
    /// is submitted with an id, as by
    /// [`Client::submit_with_id`](crate::cluster::Client::submit_with_id)).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Full | Error::Busy { .. } | Error::Timeout(_) => true,
            Error::TeeRefused { source, .. } | Error::ForwardRefused { source, .. } => {
                source.is_transient()
            }
            _ => false,
        }
    }
}
