//! [`LogStream`]: a stored stream over any [`Store`].
//!
//! Publishing appends to the store. A subscriber owns one store reader
//! ([`Store::read_from`]) for its whole life: the reader replays what is stored, yields
//! `None` when it has caught up, and yields later records once they are committed (a
//! `RecordIter` is not fused). So replay and tail are the same loop over the same
//! reader, and nothing can be missed or repeated where one hands over to the other.
//! When the reader has caught up, the subscriber sleeps in [`Store::wait_for`] until the
//! store's committed end passes its position; closing the stream calls
//! [`Store::wake_waiters`].
//!
//! Retention can drop records a subscriber has not read yet. Its reader then reports
//! [`Error::OffsetOutOfRange`] and stops; the subscriber's [`OffsetReset`] says whether
//! that error is returned or a new reader opens at the store's start or end, in the
//! same call. Opening a reader at a subscription's first position and reopening one
//! after an error are one path ([`read_at`]), so a reset is the same wherever it
//! happens.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use crossbeam_utils::{Backoff, CachePadded};
use parking_lot::{Condvar, Mutex, RwLock};

use super::{OffsetReset, Position, Publish, Stream, Subscribe, remaining};
use crate::client::{Pending, Responder, pending};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record, Timestamp};
use crate::store::{RecordIter, Store, read_from_start};

/// A stream stored in a [`Store`]: subscribers can start anywhere in it and replay.
///
/// - Publishing appends: a publish is durable as the store's sync policy says, and
///   [`publish_batch`](Publish::publish_batch) appends one atomic batch. The stream is
///   never full ([`try_publish`](Publish::try_publish) is `publish`): a slow subscriber
///   does not hold publishers back, it reads the store at its own pace and keeps at most
///   what the store's reader buffers.
/// - Subscribing from [`Position::Beginning`], an [`Offset`](Position::Offset), a
///   [`Timestamp`](Position::Timestamp), the [`End`](Position::End) or a named
///   [`Cursor`](Position::Cursor) replays what is stored from there, then follows the
///   tail. Each subscriber sees every record from its
///   start, in order, once (records dropped by retention or compaction excepted).
/// - A cursor subscription's [`commit`](Subscribe::commit) saves its position with
///   [`Store::commit_cursor`]; subscribing to the same cursor later, in this process or
///   after a restart, resumes after the last committed record.
/// - Records that retention dropped before a subscriber read them are
///   [`Error::OffsetOutOfRange`] by default;
///   [`subscribe_with`](LogStream::subscribe_with) an [`OffsetReset`] to go on from the
///   store's start or end instead.
///
/// Closing: the stream closes when its last publisher and its last `LogStream` value
/// are dropped, or on [`Publish::close`]. Subscribers then read what the store held when
/// it closed and end with [`Error::Closed`], on every later call too; new subscribers
/// can still replay those records. The store itself stays open: a new `LogStream` over
/// it is a new, open stream, and what it (or anyone) appends after the close is not
/// the closed stream's. (So a subscriber outlives the stream only as a reader of what
/// was published: keep a `LogStream` value or a publisher alive for as long as it
/// should follow the tail.) A close waits for the stream's appender thread, if an
/// [async publish](LogPublisher::publish_async) or
/// [commit](LogSubscriber::commit_async) started one, to end: the group of publishes it
/// is appending (up to 256, and their fdatasync) and the commits queued (one per
/// cursor and group) are made; the publishes queued behind them are refused
/// ([`Error::Closed`]). So the last handle's drop can take that long.
///
/// ```
/// use cauce::stream::{LogStream, Position, Publish, Stream, Subscribe};
/// use cauce::store::MemoryStore;
/// use cauce::Entry;
///
/// let store = MemoryStore::new();
/// let stream = LogStream::new(store.clone());
/// let publisher = stream.publisher();
/// publisher.publish_batch(&[Entry::new(b"a", b"1"), Entry::new(b"b", b"2")])?;
///
/// let mut mailer = stream.subscribe(Position::Cursor("mailer".into()))?;
/// assert_eq!(mailer.recv()?.offset, 0);
/// mailer.commit()?; // record 0 is processed
/// drop(mailer);     // the consumer stops...
///
/// let mut mailer = stream.subscribe(Position::Cursor("mailer".into()))?;
/// assert_eq!(mailer.recv()?.offset, 1); // ...and resumes after what it committed
/// publisher.publish(Entry::new(b"c", b"3"))?;
/// assert_eq!(mailer.recv()?.payload, "3"); // then follows the tail
/// # Ok::<(), cauce::Error>(())
/// ```
#[derive(Debug)]
pub struct LogStream<S: Store> {
    handle: Arc<Handle<S>>,
}

/// The publishing half of a [`LogStream`].
#[derive(Debug)]
pub struct LogPublisher<S: Store> {
    handle: Arc<Handle<S>>,
}

/// The subscribing half of a [`LogStream`].
pub struct LogSubscriber<S: Store> {
    shared: Arc<Shared<S>>,
    /// `None` after the reader failed: the next call opens a new one at `position`.
    reader: Option<RecordIter>,
    /// The offset after the last record delivered (or where a reset went): what
    /// `commit` saves.
    position: Offset,
    cursor: Option<String>,
    reset: OffsetReset,
    /// The offsets resets jumped over, in total.
    skipped: u64,
    /// As a `futures_core::Stream`: ended (at the close, or after an error).
    #[cfg(feature = "futures")]
    stream_ended: bool,
    /// Records delivered since the follower last slept in `wait_for`: a long streak is a
    /// busy stream, worth spinning for through a short stall of its writer.
    streak: u64,
}

/// Owned by the stream values and publishers; dropping the last one closes the stream.
#[derive(Debug)]
struct Handle<S: Store> {
    shared: Arc<Shared<S>>,
}

#[derive(Debug)]
struct Shared<S> {
    store: S,
    /// Publishes hold it shared while they append, `close` exclusively: once a subscriber
    /// sees `closed`, every append that will ever succeed has returned. Padded: every
    /// publish writes it, and followers keep reading `closed`.
    gate: CachePadded<RwLock<()>>,
    closed: AtomicBool,
    /// The store's end when the stream closed (`Offset::MAX` while open): subscribers
    /// end there. Records appended to the store after the close (by another
    /// `LogStream` over it, or directly) are not this stream's: a subscriber that
    /// returned `Closed` once returned records after it again.
    closed_at: AtomicU64,
    /// The queue of the thread that runs async publishes whose appends may wait for the
    /// disk, started by the first one, and the thread; taken out when the stream
    /// closes, which ends the thread once it drained the queue.
    appender: Mutex<Appender>,
    /// Notified once a close joined the appender thread (see `Appender::ended`).
    appender_ended: Condvar,
}

/// The stream's appender thread, once an async call started it.
#[derive(Debug, Default)]
struct Appender {
    /// Its queue: `None` before it starts, and once the stream closed.
    queue: Option<Sender<AsyncJob>>,
    /// The thread, until a close takes it to join it.
    thread: Option<JoinHandle<()>>,
    /// Its id, once started.
    id: Option<ThreadId>,
    /// Set once a close joined it: a close running beside that one waits for this, so
    /// that each returns with the store let go of by the thread.
    ended: bool,
}

/// Work handed to the stream's appender thread: an async publish (its entries, owned,
/// and whom to answer), or an async commit of a cursor.
enum AsyncJob {
    Append {
        /// The entries, owned (their offsets unset: an entry has none).
        entries: Vec<Record>,
        answer: Responder<Range<Offset>>,
    },
    Commit {
        cursor: String,
        offset: Offset,
        answer: Responder<()>,
    },
}

impl std::fmt::Debug for AsyncJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AsyncJob::Append { entries, .. } => f
                .debug_struct("Append")
                .field("entries", &entries.len())
                .finish_non_exhaustive(),
            AsyncJob::Commit { cursor, offset, .. } => f
                .debug_struct("Commit")
                .field("cursor", cursor)
                .field("offset", offset)
                .finish_non_exhaustive(),
        }
    }
}

/// A commit asked of the appender thread: the offset, and whom to answer.
type CommitAsked = (Offset, Responder<()>);

/// The most async publishes the appender thread appends before it waits for them to be
/// durable (one fdatasync for all of them under `SyncPolicy::Always`).
const ASYNC_GROUP: usize = 256;

/// The longest a follower sleeps in `wait_for` before it checks whether the stream was
/// closed. Closing wakes it at once; this only bounds the race where the close lands
/// between its check and its sleep.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// How many times `poll_recv` reads and registers before it yields to the executor.
const POLL_TURNS: usize = 8;

/// A follower that has taken this many records without sleeping follows a busy stream.
const BUSY_STREAK: u64 = 1024;

/// How long the follower of a busy stream spins (yielding) before it sleeps. A sleeping
/// follower costs tens of microseconds to wake; the writer of a busy `LogStore` stalls
/// for a few hundred every time it writes its buffer out, and each stall used to put the
/// follower to sleep: `stream.log.*.tail_p99_us` went from 38–45 µs to 28–40 µs
/// (`LogStore`) with this. A stream that goes quiet costs at most this much CPU, once.
const BUSY_SPIN: Duration = Duration::from_micros(500);

impl<S: Store> LogStream<S> {
    /// An open stream over `store`. Pass an `Arc<S>`, or a cloneable store handle such
    /// as [`MemoryStore`](crate::store::MemoryStore), to keep using the store alongside.
    pub fn new(store: S) -> LogStream<S> {
        let shared = Arc::new(Shared {
            store,
            gate: CachePadded::new(RwLock::new(())),
            closed: AtomicBool::new(false),
            closed_at: AtomicU64::new(Offset::MAX),
            appender: Mutex::new(Appender::default()),
            appender_ended: Condvar::new(),
        });
        LogStream {
            handle: Arc::new(Handle { shared }),
        }
    }

    /// The store the stream is kept in.
    pub fn store(&self) -> &S {
        &self.handle.shared.store
    }

    /// A new subscriber starting at `from`, which goes on as `reset` says where the
    /// store does not hold its position: at subscribe, a [`Cursor`](Position::Cursor) or
    /// [`Offset`](Position::Offset) before the store's start or past its end; later,
    /// records that retention dropped before the subscriber read them (in the receive
    /// that finds them gone). A cursor subscription keeps its cursor through a reset, so
    /// its next [`commit`](Subscribe::commit) saves where the reset went. A cursor never
    /// committed starts at the end under [`OffsetReset::Latest`], at the beginning
    /// otherwise. [`subscribe`](Stream::subscribe) is this with [`OffsetReset::Fail`].
    ///
    /// The other positions are wherever the store is when the reader opens; `reset`
    /// does not change where they start. Retention that overtakes the opening of a
    /// reader at the store's start or end on each of a few attempts in a row is
    /// [`Error::OffsetOutOfRange`], whatever the policy.
    ///
    /// ```
    /// use cauce::stream::{LogStream, OffsetReset, Position, Stream, Subscribe};
    /// use cauce::store::{MemoryStore, Store};
    /// use cauce::Entry;
    ///
    /// let store = MemoryStore::new();
    /// let stream = LogStream::new(store.clone());
    /// let mailer = Position::Cursor("mailer".into());
    /// let mut subscriber = stream.subscribe_with(mailer.clone(), OffsetReset::Earliest)?;
    /// store.append(&[Entry::new(b"a", b"1"), Entry::new(b"b", b"2")])?;
    /// store.truncate_before(1)?; // record 0 goes before the mailer read it
    /// assert_eq!(subscriber.recv()?.offset, 1);
    /// assert_eq!(subscriber.skipped(), 1);
    /// subscriber.commit()?;
    /// assert_eq!(stream.subscribe(mailer)?.position(), 2);
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn subscribe_with(&self, from: Position, reset: OffsetReset) -> Result<LogSubscriber<S>> {
        let shared = &self.handle.shared;
        let cursor = match &from {
            Position::Cursor(name) => Some(name.clone()),
            _ => None,
        };
        let (position, reader) = locate(&shared.store, from, reset)?;
        let mut subscriber = LogSubscriber {
            shared: shared.clone(),
            reader,
            position,
            cursor,
            reset,
            skipped: 0,
            #[cfg(feature = "futures")]
            stream_ended: false,
            streak: 0,
        };
        subscriber.reader()?;
        Ok(subscriber)
    }
}

impl<S: Store> Clone for LogStream<S> {
    fn clone(&self) -> Self {
        LogStream {
            handle: self.handle.clone(),
        }
    }
}

impl<S: Store> Clone for LogPublisher<S> {
    fn clone(&self) -> Self {
        LogPublisher {
            handle: self.handle.clone(),
        }
    }
}

impl<S: Store> Drop for Handle<S> {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl<S: Store> Shared<S> {
    fn close(&self) {
        let gate = self.gate.write();
        if !self.closed.load(Ordering::SeqCst) {
            // No publish of this stream is under way: its records all end before this.
            self.closed_at
                .store(self.store.next_offset(), Ordering::SeqCst);
            self.closed.store(true, Ordering::SeqCst);
        }
        drop(gate);
        // The appender thread drains what was queued (publishes refused: `Closed`;
        // commits made), then ends; waited for, so that the store is let go of once the
        // last handle is (a store reopened right after, say, finds its lock free).
        self.end_appender();
        self.store.wake_waiters();
    }

    fn append(&self, entries: &[Entry<'_>]) -> Result<Range<Offset>> {
        let _gate = self.gate.read();
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.store.append(entries)
    }
}

impl<S: Store> Shared<S> {
    /// Ends the appender thread, if one started: drops its queue, and joins it (or, if
    /// another close is joining it, waits for that). On the thread itself (the last
    /// handle dropped by a job's answer, say) it only drops the queue: the thread ends
    /// after the job.
    fn end_appender(&self) {
        let here = std::thread::current().id();
        let mut appender = self.appender.lock();
        drop(appender.queue.take());
        let Some(id) = appender.id else {
            return;
        };
        if id == here {
            appender.thread = None; // detached: it is this thread
            appender.ended = true;
            self.appender_ended.notify_all();
            return;
        }
        match appender.thread.take() {
            Some(thread) => {
                drop(appender);
                let _ = thread.join();
                appender = self.appender.lock();
                appender.ended = true;
                self.appender_ended.notify_all();
            }
            None => {
                while !appender.ended {
                    self.appender_ended.wait(&mut appender);
                }
            }
        }
    }

    /// Appends `entries` without blocking the caller on the disk: at once (the answer
    /// ready) where the store's appends never wait for it, or on the stream's appender
    /// thread, which appends every publish queued meanwhile and waits for them to be
    /// durable together.
    fn append_async(self: &Arc<Self>, entries: &[Entry<'_>]) -> Pending<Range<Offset>> {
        let (pending, answer) = pending(0);
        if !self.store.append_waits_for_disk() {
            answer.answer(self.append(entries));
            return pending;
        }
        let entries = entries.iter().map(|e| e.to_record(0)).collect();
        if let Err(refused) = self.run_async(AsyncJob::Append { entries, answer })
            && let (AsyncJob::Append { answer, .. }, e) = *refused
        {
            answer.answer(Err(e));
        }
        pending
    }

    /// Commits `cursor` at `offset` without blocking the caller on the disk where it can:
    /// at once where the store's writes never wait for it, on the appender thread
    /// while the stream is open (after the publishes and commits queued before it), in
    /// this call once it closed.
    fn commit_async(self: &Arc<Self>, cursor: String, offset: Offset) -> Pending<()> {
        let (pending, answer) = pending(0);
        if !self.store.append_waits_for_disk() {
            answer.answer(self.store.commit_cursor(&cursor, offset));
            return pending;
        }
        let job = AsyncJob::Commit {
            cursor,
            offset,
            answer,
        };
        if let Err(refused) = self.run_async(job)
            && let (
                AsyncJob::Commit {
                    cursor,
                    offset,
                    answer,
                },
                _,
            ) = *refused
        {
            answer.answer(self.store.commit_cursor(&cursor, offset));
        }
        pending
    }

    /// A blocking commit: behind the async publishes and commits queued on the
    /// appender thread, if it runs (commits of a cursor are made in the order they were
    /// asked, as Kafka's `commitSync` waits for the `commitAsync`s before it); in this
    /// call otherwise.
    fn commit(&self, cursor: &str, offset: Offset) -> Result<()> {
        let queue = {
            let appender = self.appender.lock();
            match appender.id == Some(std::thread::current().id()) {
                true => None,
                false => appender.queue.clone(),
            }
        };
        if let Some(queue) = queue {
            let (pending, answer) = pending(0);
            let job = AsyncJob::Commit {
                cursor: cursor.to_owned(),
                offset,
                answer,
            };
            if queue.send(job).is_ok() {
                return pending.wait();
            }
        }
        self.store.commit_cursor(cursor, offset)
    }

    /// Queues `job` for the appender thread, starting it if need be; the job back, with
    /// why, if the stream is closed or the thread could not start.
    fn run_async(
        self: &Arc<Self>,
        job: AsyncJob,
    ) -> std::result::Result<(), Box<(AsyncJob, Error)>> {
        let mut appender = self.appender.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Err(Box::new((job, Error::Closed)));
        }
        if appender.queue.is_none() {
            if appender.id.is_some() {
                // Started and ended: only a close ends it, and `closed` is set first.
                return Err(Box::new((job, Error::Closed)));
            }
            match self.start_appender() {
                Ok((queue, thread)) => {
                    appender.id = Some(thread.thread().id());
                    appender.queue = Some(queue);
                    appender.thread = Some(thread);
                }
                Err(e) => return Err(Box::new((job, e))),
            }
        }
        if let Some(queue) = appender.queue.as_ref() {
            // The thread holds the receiver until the queue goes: it cannot be gone.
            let _ = queue.send(job);
        }
        Ok(())
    }

    /// Starts the appender thread; it ends when the stream closes (its queue dropped)
    /// and it has answered every job queued.
    fn start_appender(self: &Arc<Self>) -> Result<(Sender<AsyncJob>, JoinHandle<()>)> {
        let (sender, queue) = crossbeam_channel::unbounded::<AsyncJob>();
        let shared = self.clone();
        let thread = std::thread::Builder::new()
            .name("cauce-stream-append".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut group = vec![first];
                    group.extend(queue.try_iter().take(ASYNC_GROUP - 1));
                    shared.run_group(group);
                }
            })
            .map_err(|source| Error::Spawn {
                name: "cauce-stream-append".to_string(),
                source,
            })?;
        Ok((sender, thread))
    }

    /// Runs a group of jobs. The publishes are appended (`Store::append_deferred`) in
    /// the order they were made, and waited for (`Store::wait_appended`: the first wait
    /// a group commit of them all), under the stream's gate as a blocking publish is:
    /// a close then finds them committed (its `closed_at` past them), or refuses them.
    /// Then the commits, after every publish queued before them, one per cursor (the
    /// last asked, which is where committing each in turn leaves the cursor; each
    /// answered once it is durable). Every answer is given with the gate let go: an
    /// answer can run a waker, and dropping a task can close the stream on this thread.
    fn run_group(&self, group: Vec<AsyncJob>) {
        let mut appends = Vec::new();
        // Per cursor, in the order first asked: the offsets asked, each with its answer.
        let mut commits: Vec<(String, Vec<CommitAsked>)> = Vec::new();
        for job in group {
            match job {
                AsyncJob::Append { entries, answer } => appends.push((entries, answer)),
                AsyncJob::Commit {
                    cursor,
                    offset,
                    answer,
                } => match commits.iter_mut().find(|(c, _)| *c == cursor) {
                    Some((_, asked)) => asked.push((offset, answer)),
                    None => commits.push((cursor, vec![(offset, answer)])),
                },
            }
        }
        let mut answers = Vec::with_capacity(appends.len());
        {
            let _gate = self.gate.read();
            let closed = self.closed.load(Ordering::SeqCst);
            for (entries, answer) in appends {
                let entries: Vec<Entry<'_>> = entries.iter().map(Record::as_entry).collect();
                let result = match closed {
                    true => Err(Error::Closed),
                    false => self.store.append_deferred(&entries),
                };
                answers.push((answer, result));
            }
            // Each publish gets the store's own answer for its records (`Ok` if and
            // only if they are durable).
            for (_, result) in &mut answers {
                if let Ok(deferred) = result
                    && deferred.pending
                    && let Err(e) = self.store.wait_appended(deferred.offsets.end)
                {
                    *result = Err(e);
                }
            }
        }
        for (answer, result) in answers {
            answer.answer(result.map(|deferred| deferred.offsets));
        }
        for (cursor, mut asked) in commits {
            let Some((last, answer)) = asked.pop() else {
                continue;
            };
            match self.store.commit_cursor(&cursor, last) {
                Ok(()) => {
                    answer.answer(Ok(()));
                    for (_, earlier) in asked {
                        earlier.answer(Ok(()));
                    }
                }
                // Each of the others made in turn, with its own answer: where that
                // leaves the cursor is where committing them all in turn would.
                Err(e) => {
                    for (offset, earlier) in asked {
                        earlier.answer(self.store.commit_cursor(&cursor, offset));
                    }
                    answer.answer(Err(e));
                }
            }
        }
    }
}

impl<S: Store> Stream for LogStream<S> {
    type Publisher = LogPublisher<S>;
    type Subscriber = LogSubscriber<S>;

    fn publisher(&self) -> LogPublisher<S> {
        LogPublisher {
            handle: self.handle.clone(),
        }
    }

    /// [`subscribe_with`](LogStream::subscribe_with) [`OffsetReset::Fail`]: a position
    /// the store does not hold is [`Error::OffsetOutOfRange`].
    fn subscribe(&self, from: Position) -> Result<LogSubscriber<S>> {
        self.subscribe_with(from, OffsetReset::Fail)
    }
}

/// Where a subscription to `from` under `reset` starts, with its reader if it is open
/// already; `None` for a position the store may not hold, which the subscriber opens
/// (resetting it as `reset` says: `LogSubscriber::reader`).
fn locate<S: Store>(
    store: &S,
    from: Position,
    reset: OffsetReset,
) -> Result<(Offset, Option<RecordIter>)> {
    let opened = |(at, reader): (Offset, RecordIter)| (at, Some(reader));
    Ok(match from {
        // The beginning is where the log begins when the reader opens, however
        // retention moved it since `start_offset` was read.
        Position::Beginning => opened(read_from_start(store)?),
        Position::Offset(offset) => (offset, None),
        Position::Timestamp(time) => opened(from_time(store, time)?),
        Position::End => opened(read_from_end(store)?),
        // Never committed: where the policy says a new consumer starts.
        Position::Cursor(name) => match (store.cursor(&name)?, reset) {
            (Some(offset), _) => (offset, None),
            (None, OffsetReset::Latest) => opened(read_from_end(store)?),
            (None, OffsetReset::Earliest | OffsetReset::Fail) => opened(read_from_start(store)?),
        },
    })
}

/// A reader at `from`, or, where the store does not hold `from`, where `reset` says (the
/// error for [`OffsetReset::Fail`]); returns where the reader is.
fn read_at<S: Store>(store: &S, from: Offset, reset: OffsetReset) -> Result<(Offset, RecordIter)> {
    match (store.read_from(from), reset) {
        (Ok(reader), _) => Ok((from, reader)),
        (Err(Error::OffsetOutOfRange { .. }), OffsetReset::Earliest) => read_from_start(store),
        (Err(Error::OffsetOutOfRange { .. }), OffsetReset::Latest) => read_from_end(store),
        (Err(e), _) => Err(e),
    }
}

/// How many times [`read_located`] looks an offset up and opens a reader there before it
/// lets retention win.
const LOCATE_ATTEMPTS: usize = 3;

/// A reader at the offset `locate` finds in `store`. Retention that drops that offset
/// between the lookup and the open has the lookup made again (from the new start), a
/// few times before its error is returned.
fn read_located<S: Store>(
    store: &S,
    locate: impl Fn(&S) -> Result<Offset>,
) -> Result<(Offset, RecordIter)> {
    let mut attempts = 1;
    loop {
        let offset = locate(store)?;
        match store.read_from(offset) {
            Ok(reader) => return Ok((offset, reader)),
            Err(Error::OffsetOutOfRange { start, .. })
                if offset < start && attempts < LOCATE_ATTEMPTS =>
            {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A reader at the first record of `store` stamped at or after `time`, or at the end.
fn from_time<S: Store>(store: &S, time: Timestamp) -> Result<(Offset, RecordIter)> {
    read_located(store, |store| {
        Ok(store
            .offset_for_timestamp(time)?
            .unwrap_or_else(|| store.next_offset()))
    })
}

/// A reader at the end of `store`: the next record appended. Appends and retention can
/// move the start past the end just read before the reader opens.
fn read_from_end<S: Store>(store: &S) -> Result<(Offset, RecordIter)> {
    read_located(store, |store| Ok(store.next_offset()))
}

impl<S: Store> Publish for LogPublisher<S> {
    fn publish(&self, entry: Entry<'_>) -> Result<Offset> {
        Ok(self.handle.shared.append(&[entry])?.start)
    }

    /// The same as `publish`: a log stream is never full.
    fn try_publish(&self, entry: Entry<'_>) -> Result<Offset> {
        self.publish(entry)
    }

    /// Appends the entries as one atomic batch.
    fn publish_batch(&self, entries: &[Entry<'_>]) -> Result<Range<Offset>> {
        self.handle.shared.append(entries)
    }

    fn close(&self) {
        self.handle.shared.close();
    }
}

impl<S: Store> LogPublisher<S> {
    /// [`publish`](Publish::publish) for async code: resolves to the entry's offset once
    /// the append returned what `publish` returns (durable as the store's sync policy
    /// says), without blocking the executor's thread on the disk. Works on any
    /// executor; no runtime is needed.
    ///
    /// Where the store's appends may wait for the disk
    /// ([`Store::append_waits_for_disk`]: a [`LogStore`](crate::store::LogStore) under
    /// `SyncPolicy::Always` or `Every`), the entry is copied and appended on the
    /// stream's appender thread (started by the first such publish, ended when the
    /// stream closes), which appends every publish queued meanwhile, in the order they
    /// were made, and waits for them together: many async publishers share one
    /// fdatasync, as threads publishing at once do. Elsewhere (a `MemoryStore`) it
    /// appends in this call and the future is ready. Dropping the future does not take
    /// the entry back: it is published all the same, unless the stream closes before
    /// the appender thread gets to it (then it is refused).
    ///
    /// Async publishes keep the order they were made in among themselves; a blocking
    /// [`publish`](Publish::publish) made while some are queued can come before them.
    /// The appender thread's queue is not bounded: a publisher that does not await its
    /// publishes (or bound how many it has in flight) can queue without limit.
    ///
    /// ```
    /// use cauce::stream::{LogStream, Position, Stream, Subscribe};
    /// use cauce::store::{LogOptions, LogStore};
    /// use cauce::Entry;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let log = LogStore::open(dir.path(), LogOptions::new())?; // fdatasync each append
    /// let stream = LogStream::new(std::sync::Arc::new(log));
    /// let publisher = stream.publisher();
    /// let published = publisher.publish_async(Entry::new(b"k", b"durable"));
    /// # // Any runtime's block_on will do.
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     struct Unpark(std::thread::Thread);
    /// #     impl std::task::Wake for Unpark {
    /// #         fn wake(self: std::sync::Arc<Self>) { self.0.unpark() }
    /// #     }
    /// #     let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) { return out; }
    /// #         std::thread::park();
    /// #     }
    /// # }
    /// let offset = block_on(published)?; // on the disk by now
    /// assert_eq!(stream.subscribe(Position::Beginning)?.recv()?.offset, offset);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn publish_async(
        &self,
        entry: Entry<'_>,
    ) -> impl Future<Output = Result<Offset>> + Send + 'static + use<S> {
        let published = self.handle.shared.append_async(&[entry]);
        async move { Ok(published.await?.start) }
    }

    /// [`publish_batch`](Publish::publish_batch) for async code, as
    /// [`publish_async`](Self::publish_async): one atomic batch, its offsets once it is
    /// appended and durable as the store's sync policy says.
    pub fn publish_batch_async(
        &self,
        entries: &[Entry<'_>],
    ) -> impl Future<Output = Result<Range<Offset>>> + Send + 'static + use<S> {
        self.handle.shared.append_async(entries)
    }
}

/// How long a receive may wait.
#[derive(Clone, Copy)]
enum Wait {
    No,
    Until(Instant, Duration),
    Forever,
}

impl<S: Store> LogSubscriber<S> {
    /// The offset after the last record received (where a commit would resume).
    pub fn position(&self) -> Offset {
        self.position
    }

    /// The named cursor this subscription commits to, if it has one.
    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// [`commit`](Subscribe::commit) for async code: resolves once the cursor is
    /// committed at the subscriber's [`position`](Self::position) as this call found
    /// it, without blocking the executor's thread on the disk (a `LogStore` makes the
    /// records before the cursor durable, then writes the cursor's journal: milliseconds
    /// under `SyncPolicy::Always`). Where the store's writes may wait for the disk, the
    /// commit runs on the stream's appender thread, after the
    /// [async publishes](LogPublisher::publish_async) and commits queued before it;
    /// elsewhere, and once the stream closed (its appender thread gone), in this call.
    /// A cursor's commits take effect in the order they were made, a blocking
    /// [`commit`](Subscribe::commit) after them too (as Kafka's `commitSync` after
    /// `commitAsync`). Dropping the future does not take the commit back.
    /// [`Error::CannotCommit`] without a cursor.
    pub fn commit_async(&self) -> impl Future<Output = Result<()>> + Send + 'static + use<S> {
        let committed = self
            .committing()
            .map(|name| self.shared.commit_async(name.to_owned(), self.position));
        async move { committed?.await }
    }

    /// The cursor a commit saves, or why the subscription cannot commit.
    fn committing(&self) -> Result<&str> {
        self.cursor.as_deref().ok_or(Error::CannotCommit(
            "the subscription was not opened from a named cursor",
        ))
    }

    /// Moves the subscriber to `to` (Kafka's `seek`): the next record received is the
    /// one there, as for a new subscription from `to` under this subscriber's
    /// [reset policy](Self::reset_policy), which keeps its own cursor (a later
    /// [`commit`](Subscribe::commit) saves where it moved) and its
    /// [`skipped`](Self::skipped) count (a reset at the new position adds to it; the
    /// move itself does not). A [`Cursor`](Position::Cursor) is another cursor's
    /// committed position. Back is allowed: the records from there are received
    /// again. On an error the subscriber is where it was. As a `futures_core::Stream`
    /// (the `futures` feature), a seek starts a stream that had ended over again.
    ///
    /// ```
    /// use cauce::stream::{LogStream, Position, Publish, Stream, Subscribe};
    /// use cauce::store::MemoryStore;
    /// use cauce::Entry;
    ///
    /// let stream = LogStream::new(MemoryStore::new());
    /// let publisher = stream.publisher();
    /// publisher.publish_batch(&[Entry::new(b"a", b"1"), Entry::new(b"b", b"2")])?;
    /// let mut subscriber = stream.subscribe(Position::End)?;
    /// subscriber.seek(Position::Offset(1))?;
    /// assert_eq!(subscriber.recv()?.payload, "2");
    /// subscriber.seek(Position::Beginning)?; // and again from the start
    /// assert_eq!(subscriber.recv()?.payload, "1");
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn seek(&mut self, to: Position) -> Result<()> {
        let (position, reader) = locate(&self.shared.store, to, self.reset)?;
        let was = (self.position, self.reader.take(), self.skipped);
        self.position = position;
        self.reader = reader;
        self.streak = 0;
        if let Err(e) = self.reader() {
            (self.position, self.reader, self.skipped) = was;
            return Err(e);
        }
        #[cfg(feature = "futures")]
        {
            self.stream_ended = false;
        }
        Ok(())
    }

    /// How many records the subscriber is behind the store's end (Kafka's consumer
    /// lag): offsets from its [`position`](Self::position) to the committed end (the
    /// end when the stream closed, once it did), gaps that compaction left included;
    /// 0 when caught up.
    pub fn lag(&self) -> u64 {
        let closed_at = self.shared.closed_at.load(Ordering::SeqCst);
        self.shared
            .store
            .next_offset()
            .min(closed_at)
            .saturating_sub(self.position)
    }

    /// What the subscription does where the store does not hold its position; see
    /// [`LogStream::subscribe_with`].
    pub fn reset_policy(&self) -> OffsetReset {
        self.reset
    }

    /// How many offsets resets jumped over, in total, at subscribe and since: with
    /// [`Earliest`](OffsetReset::Earliest), the records retention dropped before this
    /// subscriber read them; with [`Latest`](OffsetReset::Latest), those and the records
    /// still stored that the reset passed over to reach the end (offsets a compaction
    /// had already emptied count too). Zero while nothing was passed over; a consumer
    /// that must not lose records silently alerts on it. A reset back (from an offset
    /// past the store's end) jumps over nothing, and a never-committed cursor starting
    /// at the end under `Latest` is not a reset.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// [`recv`](Subscribe::recv) for async code: resolves to the next record, or to
    /// [`Error::Closed`] at the end, without blocking the executor's thread while it
    /// waits (the store wakes the task when a record is committed or the stream closes:
    /// [`Store::poll_committed`]). Works on any executor; no runtime is needed.
    /// Dropping the future loses nothing: a record is taken from the store only in the
    /// poll that returns it. A timeout is the executor's (`tokio::time::timeout`, say).
    ///
    /// ```
    /// use cauce::stream::{LogStream, Position, Publish, Stream};
    /// use cauce::store::MemoryStore;
    /// use cauce::Entry;
    ///
    /// let stream = LogStream::new(MemoryStore::new());
    /// let mut subscriber = stream.subscribe(Position::End)?;
    /// let publisher = stream.publisher();
    /// std::thread::spawn(move || publisher.publish(Entry::new(b"k", b"hello")));
    /// # // A minimal executor, for the example: any runtime's block_on will do.
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     struct Unpark(std::thread::Thread);
    /// #     impl std::task::Wake for Unpark {
    /// #         fn wake(self: std::sync::Arc<Self>) { self.0.unpark() }
    /// #     }
    /// #     let waker = std::sync::Arc::new(Unpark(std::thread::current())).into();
    /// #     let mut cx = std::task::Context::from_waker(&waker);
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         if let std::task::Poll::Ready(out) = f.as_mut().poll(&mut cx) { return out; }
    /// #         std::thread::park();
    /// #     }
    /// # }
    /// let record = block_on(async { subscriber.recv_async().await })?;
    /// assert_eq!(record.payload, "hello");
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn recv_async(&mut self) -> impl Future<Output = Result<Record>> + Send + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    /// The poll behind [`recv_async`](Self::recv_async), for a hand-written future or
    /// stream adapter: `Ready` with the next record (or the error `recv` would return),
    /// `Pending` with `cx`'s waker registered to be woken when there may be one.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Record>> {
        // A store whose end moves without a record to read (a record appended to it
        // after the stream closed) would have this loop forever: it yields after a few
        // turns, asking to be polled again.
        for _ in 0..POLL_TURNS {
            match self.next_record(Wait::No) {
                Ok(Some(record)) => return Poll::Ready(Ok(record)),
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) => {}
            }
            if self
                .shared
                .store
                .poll_committed(self.position, cx)
                .is_ready()
            {
                continue;
            }
            // Registered. A close sets `closed`, then wakes: one that came before the
            // registration is seen here, one after it wakes the task.
            if self.shared.closed.load(Ordering::SeqCst) {
                continue;
            }
            self.streak = 0;
            return Poll::Pending;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The next item as a `futures_core::Stream` (see `stream::futures`): records, then
    /// `None` from the close on; an error is the last item before `None`.
    #[cfg(feature = "futures")]
    pub(super) fn poll_next_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Record>>> {
        if self.stream_ended {
            return Poll::Ready(None);
        }
        let item = match self.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(record)) => return Poll::Ready(Some(Ok(record))),
            Poll::Ready(Err(Error::Closed)) => None,
            Poll::Ready(Err(e)) => Some(Err(e)),
        };
        self.stream_ended = true;
        Poll::Ready(item)
    }

    /// Whether [`poll_next_item`](Self::poll_next_item) returns only `None` from now on.
    #[cfg(feature = "futures")]
    pub(super) fn stream_ended(&self) -> bool {
        self.stream_ended
    }

    /// Spins and yields briefly (crossbeam's backoff: a few microseconds) while the
    /// store's end has not passed the position; true if it did. A follower of a busy
    /// stream thus takes the next record without a sleep and a wake-up, which cost tens
    /// of microseconds; an idle one goes to sleep after the spin.
    fn spin_until_committed(&self) -> bool {
        let shared = &*self.shared;
        let backoff = Backoff::new();
        let busy = (self.streak >= BUSY_STREAK).then(Instant::now);
        loop {
            if shared.store.next_offset() > self.position {
                return true;
            }
            if shared.closed.load(Ordering::SeqCst) {
                return false;
            }
            if backoff.is_completed() && busy.is_none_or(|since| since.elapsed() >= BUSY_SPIN) {
                return false;
            }
            backoff.snooze();
        }
    }

    /// The reader, opened at `position` first if there is none (at subscribe, or after
    /// an error): where the reset policy says if the store does not hold `position`.
    fn reader(&mut self) -> Result<&mut RecordIter> {
        let reader = match self.reader.take() {
            Some(reader) => reader,
            None => {
                let (at, reader) = read_at(&self.shared.store, self.position, self.reset)?;
                self.reset_to(at);
                reader
            }
        };
        Ok(self.reader.insert(reader))
    }

    /// Moves the position to `at`, where a reset opened the reader, counting and
    /// reporting the offsets it jumps over.
    fn reset_to(&mut self, at: Offset) {
        if at == self.position {
            return;
        }
        let skipped = at.saturating_sub(self.position);
        tracing::warn!(
            cursor = self.cursor.as_deref(),
            from = self.position,
            to = at,
            skipped,
            policy = ?self.reset,
            "the store does not hold the subscription's position: reset"
        );
        self.skipped = self.skipped.saturating_add(skipped);
        self.position = at;
    }

    fn next_record(&mut self, wait: Wait) -> Result<Option<Record>> {
        loop {
            // Read `closed` before reading: if it was set, every append had returned by
            // then, so the read below sees everything there will ever be.
            let closed = self.shared.closed.load(Ordering::SeqCst);
            // Every record below it is committed before the read below starts.
            let end = self.shared.store.next_offset();
            match self.reader()?.next() {
                // Appended to the store after the stream closed: not the stream's.
                Some(Ok(record))
                    if record.offset >= self.shared.closed_at.load(Ordering::SeqCst) =>
                {
                    return Err(Error::Closed);
                }
                Some(Ok(record)) => {
                    self.position = record.offset + 1;
                    self.streak += 1;
                    return Ok(Some(record));
                }
                Some(Err(e)) => {
                    // A reader yields nothing after an error; a new one opens at
                    // `position`. After retention overtook the reader, and the policy
                    // resets, it opens where the policy says in this call; otherwise the
                    // error is returned and it opens in the next.
                    self.reader = None;
                    match e {
                        Error::OffsetOutOfRange {
                            requested, start, ..
                        } if requested < start && self.reset != OffsetReset::Fail => continue,
                        e => return Err(e),
                    }
                }
                None if closed => return Err(Error::Closed),
                None => {
                    // The reader found nothing from `position` to `end`, all committed
                    // before it read: a compaction dropped them (an expired tombstone at
                    // the tail), and the next record is past `end`. Without this the
                    // end stayed past the position with nothing to read, and a wait
                    // for it returned at once, forever.
                    self.position = self.position.max(end);
                }
            }
            if let Wait::No = wait {
                return Ok(None);
            }
            if self.spin_until_committed() {
                if let Wait::Until(deadline, timeout) = wait
                    && remaining(deadline).is_none_or(|left| left.is_zero())
                {
                    return Err(Error::Timeout(timeout));
                }
                continue;
            }
            let slice = match wait {
                Wait::No => return Ok(None),
                Wait::Forever => WAIT_SLICE,
                Wait::Until(deadline, timeout) => match remaining(deadline) {
                    Some(left) if !left.is_zero() => left.min(WAIT_SLICE),
                    _ => return Err(Error::Timeout(timeout)),
                },
            };
            self.streak = 0;
            self.shared.store.wait_for(self.position, Some(slice));
        }
    }
}

impl<S: Store> Subscribe for LogSubscriber<S> {
    fn recv(&mut self) -> Result<Record> {
        self.next_record(Wait::Forever)?.ok_or(Error::Closed)
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        let wait = match Instant::now().checked_add(timeout) {
            Some(deadline) => Wait::Until(deadline, timeout),
            None => Wait::Forever,
        };
        self.next_record(wait)?.ok_or(Error::Closed)
    }

    fn try_recv(&mut self) -> Result<Option<Record>> {
        self.next_record(Wait::No)
    }

    /// Commits behind the [async publishes](LogPublisher::publish_async) and
    /// [commits](LogSubscriber::commit_async) the stream's appender thread has queued,
    /// if any, so that a cursor's commits take effect in the order they were made.
    fn commit(&mut self) -> Result<()> {
        self.shared.commit(self.committing()?, self.position)
    }
}

impl<S: Store> std::fmt::Debug for LogSubscriber<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSubscriber")
            .field("position", &self.position)
            .field("cursor", &self.cursor)
            .field("reset", &self.reset)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}
