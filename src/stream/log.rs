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

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crossbeam_utils::{Backoff, CachePadded};
use parking_lot::RwLock;

use super::{Position, Publish, Stream, Subscribe, remaining};
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
/// - Subscribing from [`Position::Beginning`], an [`Offset`](Position::Offset),
///   [`End`](Position::End) or a named [`Cursor`](Position::Cursor) replays what is
///   stored from there, then follows the tail. Each subscriber sees every record from its
///   start, in order, once (records dropped by retention or compaction excepted).
/// - A cursor subscription's [`commit`](Subscribe::commit) saves its position with
///   [`Store::commit_cursor`]; subscribing to the same cursor later, in this process or
///   after a restart, resumes after the last committed record.
///
/// Closing: the stream closes when its last publisher and its last `LogStream` value
/// are dropped, or on [`Publish::close`]. Subscribers then read what the store held when
/// it closed and end with [`Error::Closed`], on every later call too; new subscribers
/// can still replay those records. The store itself stays open: a new `LogStream` over
/// it is a new, open stream, and what it (or anyone) appends after the close is not
/// the closed stream's.
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
    /// The offset after the last record delivered: what `commit` saves.
    position: Offset,
    cursor: Option<String>,
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
}

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
        });
        LogStream {
            handle: Arc::new(Handle { shared }),
        }
    }

    /// The store the stream is kept in.
    pub fn store(&self) -> &S {
        &self.handle.shared.store
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

impl<S: Store> Stream for LogStream<S> {
    type Publisher = LogPublisher<S>;
    type Subscriber = LogSubscriber<S>;

    fn publisher(&self) -> LogPublisher<S> {
        LogPublisher {
            handle: self.handle.clone(),
        }
    }

    fn subscribe(&self, from: Position) -> Result<LogSubscriber<S>> {
        let shared = &self.handle.shared;
        let store = &shared.store;
        let at =
            |offset| -> Result<(Offset, RecordIter)> { Ok((offset, store.read_from(offset)?)) };
        let ((position, reader), cursor) = match from {
            // The beginning is where the log begins when the reader opens, however
            // retention moved it since `start_offset` was read.
            Position::Beginning => (read_from_start(store)?, None),
            Position::Offset(offset) => (at(offset)?, None),
            Position::Timestamp(time) => (from_time(store, time)?, None),
            Position::End => (at(store.next_offset())?, None),
            Position::Cursor(name) => {
                let opened = match store.cursor(&name)? {
                    Some(offset) => at(offset)?,
                    None => read_from_start(store)?,
                };
                (opened, Some(name))
            }
        };
        Ok(LogSubscriber {
            reader: Some(reader),
            shared: shared.clone(),
            position,
            streak: 0,
            cursor,
        })
    }
}

/// A reader at the first record of `store` stamped at or after `time`, or at the end.
/// Retention that drops that record between the lookup and the open has the lookup
/// made again (from the new start), a few times before its error is returned.
fn from_time<S: Store>(store: &S, time: Timestamp) -> Result<(Offset, RecordIter)> {
    let mut attempts = 1;
    loop {
        let offset = store
            .offset_for_timestamp(time)?
            .unwrap_or_else(|| store.next_offset());
        match store.read_from(offset) {
            Ok(reader) => return Ok((offset, reader)),
            Err(Error::OffsetOutOfRange { start, .. }) if offset < start && attempts < 3 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
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

    fn next_record(&mut self, wait: Wait) -> Result<Option<Record>> {
        let shared = &*self.shared;
        loop {
            // Read `closed` before reading: if it was set, every append had returned by
            // then, so the read below sees everything there will ever be.
            let closed = shared.closed.load(Ordering::SeqCst);
            // Every record below it is committed before the read below starts.
            let end = shared.store.next_offset();
            let reader = match &mut self.reader {
                Some(reader) => reader,
                None => self.reader.insert(shared.store.read_from(self.position)?),
            };
            match reader.next() {
                // Appended to the store after the stream closed: not the stream's.
                Some(Ok(record)) if record.offset >= shared.closed_at.load(Ordering::SeqCst) => {
                    return Err(Error::Closed);
                }
                Some(Ok(record)) => {
                    self.position = record.offset + 1;
                    self.streak += 1;
                    return Ok(Some(record));
                }
                Some(Err(e)) => {
                    // A reader yields nothing after an error; start a new one next time.
                    self.reader = None;
                    return Err(e);
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
                if let Wait::Until(deadline, timeout) = wait {
                    if remaining(deadline).is_none_or(|left| left.is_zero()) {
                        return Err(Error::Timeout(timeout));
                    }
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
            shared.store.wait_for(self.position, Some(slice));
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

    fn commit(&mut self) -> Result<()> {
        match &self.cursor {
            Some(name) => self.shared.store.commit_cursor(name, self.position),
            None => Err(Error::CannotCommit(
                "the subscription was not opened from a named cursor",
            )),
        }
    }
}

impl<S: Store> std::fmt::Debug for LogSubscriber<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSubscriber")
            .field("position", &self.position)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}
