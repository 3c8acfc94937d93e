//! [`MemoryStream`]: a notified stream on bounded crossbeam channels.
//!
//! Every publish takes one short lock that gives the record its offset and puts it in the
//! subscriber queues, so offsets are in queue order even with many publishers. A
//! publisher that finds a queue full waits for room while it keeps that lock: the other
//! publishers would wait for the same room anyway, and the order stays exact. It waits
//! in a crossbeam `Select` on the full queue and on the stream's close signal, so
//! [`close`](Publish::close) wakes it.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{
    Receiver, RecvTimeoutError, Select, Sender, TryRecvError, TrySendError, bounded,
};
use parking_lot::{Mutex, MutexGuard};

use super::{Position, Publish, Stream, Subscribe};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record};

/// A bounded, in-memory, notified stream.
///
/// Two shapes, chosen when it is made:
/// - [`bounded`](MemoryStream::bounded): one queue of `capacity` records shared by every
///   subscriber; each record goes to exactly one of them (competing consumers, the
///   shape of a work queue). Records published before anyone subscribed wait in the
///   queue.
/// - [`fan_out`](MemoryStream::fan_out): each subscriber has its own queue of `capacity`
///   records and gets every record published after it subscribed; a record published
///   while nobody is subscribed goes nowhere. The slowest subscriber sets the pace.
///
/// Either way memory is bounded: when a queue is full, [`Publish::publish`] blocks and
/// [`Publish::try_publish`] is [`Error::Full`]. Offsets count the records published into
/// the stream, from 0. Nothing is stored, so only [`Position::End`] can be subscribed to;
/// other positions are [`Error::NotStored`].
///
/// Closing: the stream closes when its last publisher and its last `MemoryStream` value
/// are dropped, or on [`Publish::close`]. Subscribers then receive what is queued and
/// end with [`Error::Closed`]. Publishing is `Error::Closed` once nobody can ever receive
/// again: after `close`, or when every subscriber and every `MemoryStream` value is gone.
///
/// ```
/// use cauce::stream::{MemoryStream, Position, Publish, Stream, Subscribe};
/// use cauce::{Entry, Error};
///
/// let stream = MemoryStream::fan_out(2)?;
/// let (mut fast, mut slow) = (stream.subscribe(Position::End)?, stream.subscribe(Position::End)?);
/// let publisher = stream.publisher();
/// publisher.publish(Entry::new(b"k", b"1"))?;
/// publisher.publish(Entry::new(b"k", b"2"))?;
/// assert_eq!(fast.recv()?.offset, 0);
/// assert_eq!(fast.recv()?.offset, 1);
/// // `slow` has not read: its queue is full, and it holds the publisher back.
/// assert!(matches!(publisher.try_publish(Entry::new(b"k", b"3")), Err(Error::Full)));
/// assert_eq!(slow.recv()?.payload, "1");
/// assert_eq!(publisher.try_publish(Entry::new(b"k", b"3"))?, 2);
/// # Ok::<(), cauce::Error>(())
/// ```
#[derive(Debug)]
pub struct MemoryStream {
    inner: Arc<Inner>,
    /// For a shared queue: its receiving end, which every subscriber clones.
    shared_queue: Option<(Receiver<Record>, Readers)>,
}

/// The publishing half of a [`MemoryStream`].
#[derive(Clone, Debug)]
pub struct MemoryPublisher {
    inner: Arc<Inner>,
}

/// The subscribing half of a [`MemoryStream`].
#[derive(Debug)]
pub struct MemorySubscriber {
    queue: Receiver<Record>,
    _readers: Readers,
}

/// Counts who can read a queue: its subscribers and, for a shared queue, the stream
/// values that can make more. crossbeam reports a queue without receivers only when
/// sending, and a full queue must not look merely full to `try_publish` once nobody can
/// ever empty it.
type Readers = Arc<()>;

/// The sending end of one subscriber queue.
#[derive(Debug)]
struct Queue {
    sender: Sender<Record>,
    readers: Readers,
}

impl Queue {
    fn has_readers(&self) -> bool {
        Arc::strong_count(&self.readers) > 1
    }
}

#[derive(Debug)]
struct Inner {
    capacity: usize,
    fan_out: bool,
    /// Held by a publish from start to end; see the module docs.
    state: Mutex<State>,
    /// Fan-out subscribers not yet picked up by a publish. Kept apart from `state` so
    /// that subscribing never waits behind a publisher blocked on a full queue.
    joining: Mutex<Vec<Queue>>,
    has_joining: AtomicBool,
    closed: AtomicBool,
    /// True while a publisher holds `state` and waits for room.
    blocked: AtomicBool,
    /// Dropped by `close`, which makes `closing` ready and wakes a blocked publisher.
    close_signal: Mutex<Option<Sender<()>>>,
    closing: Receiver<()>,
    /// Live `MemoryStream` values: while any is alive, a subscriber can still come.
    streams: AtomicUsize,
}

#[derive(Debug)]
struct State {
    next: Offset,
    queues: Vec<Queue>,
}

/// How long `try_publish` waits for the publish lock before it checks again whether the
/// holder is blocked on a full queue (then the stream is full).
const TRY_LOCK_SLICE: Duration = Duration::from_micros(20);

impl MemoryStream {
    /// A stream with one queue of `capacity` records shared by all its subscribers.
    ///
    /// A capacity of 0 is [`Error::Config`].
    pub fn bounded(capacity: usize) -> Result<MemoryStream> {
        MemoryStream::make(capacity, false)
    }

    /// A stream that gives every subscriber every record, through a queue of `capacity`
    /// records per subscriber.
    ///
    /// A capacity of 0 is [`Error::Config`].
    pub fn fan_out(capacity: usize) -> Result<MemoryStream> {
        MemoryStream::make(capacity, true)
    }

    fn make(capacity: usize, fan_out: bool) -> Result<MemoryStream> {
        if capacity == 0 {
            return Err(Error::Config(
                "a memory stream needs a capacity of at least one record".to_string(),
            ));
        }
        let (close_signal, closing) = bounded(0);
        let (queues, shared_queue) = if fan_out {
            (Vec::new(), None)
        } else {
            let (sender, receiver) = bounded(capacity);
            let readers = Readers::default();
            let queue = Queue {
                sender,
                readers: readers.clone(),
            };
            (vec![queue], Some((receiver, readers)))
        };
        let inner = Inner {
            capacity,
            fan_out,
            state: Mutex::new(State { next: 0, queues }),
            joining: Mutex::new(Vec::new()),
            has_joining: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            close_signal: Mutex::new(Some(close_signal)),
            closing,
            streams: AtomicUsize::new(1),
        };
        Ok(MemoryStream {
            inner: Arc::new(inner),
            shared_queue,
        })
    }

    /// The capacity of each queue, in records.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// True if every subscriber gets every record (made by
    /// [`fan_out`](MemoryStream::fan_out)).
    pub fn is_fan_out(&self) -> bool {
        self.inner.fan_out
    }
}

impl Clone for MemoryStream {
    fn clone(&self) -> Self {
        self.inner.streams.fetch_add(1, Ordering::SeqCst);
        MemoryStream {
            inner: self.inner.clone(),
            shared_queue: self.shared_queue.clone(),
        }
    }
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        self.inner.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Stream for MemoryStream {
    type Publisher = MemoryPublisher;
    type Subscriber = MemorySubscriber;

    fn publisher(&self) -> MemoryPublisher {
        MemoryPublisher {
            inner: self.inner.clone(),
        }
    }

    fn subscribe(&self, from: Position) -> Result<MemorySubscriber> {
        if from != Position::End {
            return Err(Error::NotStored);
        }
        if let Some((queue, readers)) = &self.shared_queue {
            return Ok(MemorySubscriber {
                queue: queue.clone(),
                _readers: readers.clone(),
            });
        }
        let (sender, receiver) = bounded(self.inner.capacity);
        let readers = Readers::default();
        let mut joining = self.inner.joining.lock();
        // Under the `joining` lock, as in `close`: a subscriber added after close would
        // never see its queue disconnect.
        if !self.inner.closed.load(Ordering::SeqCst) {
            joining.push(Queue {
                sender,
                readers: readers.clone(),
            });
            self.inner.has_joining.store(true, Ordering::SeqCst);
        }
        Ok(MemorySubscriber {
            queue: receiver,
            _readers: readers,
        })
    }
}

/// Copies an entry into one allocation that the record's key and payload share.
fn to_record(entry: &Entry<'_>) -> Record {
    let mut buf = Vec::with_capacity(entry.key.len() + entry.payload.len());
    buf.extend_from_slice(entry.key);
    buf.extend_from_slice(entry.payload);
    let mut key = Bytes::from(buf);
    let payload = key.split_off(entry.key.len());
    Record {
        offset: 0,
        timestamp: entry.timestamp,
        key,
        payload,
    }
}

impl Inner {
    /// Moves subscribers that joined since the last publish into the queues.
    fn admit_joining(&self, state: &mut State) {
        if self.has_joining.swap(false, Ordering::SeqCst) {
            state.queues.append(&mut self.joining.lock());
        }
    }

    /// Gives `record` the next offset and puts it in every queue; `wait` says whether to
    /// wait for room or to refuse with `Full`.
    fn deliver(&self, state: &mut State, mut record: Record, wait: bool) -> Result<Offset> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.admit_joining(state);
        if !wait && state.queues.iter().any(|q| q.sender.is_full()) {
            self.drop_unread_queues(state)?;
            if state.queues.iter().any(|q| q.sender.is_full()) {
                return Err(Error::Full);
            }
        }
        if state.queues.is_empty() && self.streams.load(Ordering::SeqCst) == 0 {
            // Fan-out with no subscriber and no stream value to make one: nobody can
            // ever receive this.
            return Err(Error::Closed);
        }
        let offset = state.next;
        record.offset = offset;
        // The last queue gets the record itself, the others a clone (which shares the
        // bytes): a single queue costs no clone.
        let mut record = Some(record);
        let mut i = 0;
        while i < state.queues.len() {
            let message = if i + 1 == state.queues.len() {
                record.take()
            } else {
                record.clone()
            };
            let Some(message) = message else { break };
            match self.send(&state.queues[i].sender, message, wait)? {
                Sent::Yes => i += 1,
                Sent::Disconnected if self.fan_out => {
                    state.queues.swap_remove(i);
                }
                // A shared queue is disconnected when every subscriber and every stream
                // value is gone: nobody can receive again.
                Sent::Disconnected => return Err(Error::Closed),
            }
        }
        state.next += 1;
        Ok(offset)
    }

    /// Drops the queues nobody can read any more; for a shared queue that means the
    /// stream is closed for publishers.
    fn drop_unread_queues(&self, state: &mut State) -> Result<()> {
        if !self.fan_out {
            return match state.queues.first() {
                Some(queue) if queue.has_readers() => Ok(()),
                _ => Err(Error::Closed),
            };
        }
        state.queues.retain(Queue::has_readers);
        Ok(())
    }

    /// Sends into one queue, waiting for room (or close) if `wait`.
    fn send(&self, queue: &Sender<Record>, message: Record, wait: bool) -> Result<Sent> {
        let message = match queue.try_send(message) {
            Ok(()) => return Ok(Sent::Yes),
            Err(TrySendError::Disconnected(_)) => return Ok(Sent::Disconnected),
            // Not reached when not waiting: under the publish lock nobody else sends,
            // and every queue had room when `deliver` checked.
            Err(TrySendError::Full(_)) if !wait => return Err(Error::Full),
            Err(TrySendError::Full(message)) => message,
        };
        self.blocked.store(true, Ordering::SeqCst);
        let mut select = Select::new();
        let send = select.send(queue);
        select.recv(&self.closing);
        let operation = select.select();
        let sent = if operation.index() == send {
            match operation.send(queue, message) {
                Ok(()) => Ok(Sent::Yes),
                Err(_) => Ok(Sent::Disconnected),
            }
        } else {
            let _ = operation.recv(&self.closing);
            Err(Error::Closed)
        };
        self.blocked.store(false, Ordering::SeqCst);
        sent
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.close_signal.lock().take());
        self.joining.lock().clear();
        // Waits for a publish in progress; it sees `closed` or the close signal.
        self.state.lock().queues.clear();
    }

    /// The publish lock, for `try_publish`: never waits behind a publisher that is
    /// blocked on a full queue (that means the stream is full).
    fn try_lock_state(&self) -> Result<MutexGuard<'_, State>> {
        loop {
            if let Some(state) = self.state.try_lock_for(TRY_LOCK_SLICE) {
                return Ok(state);
            }
            if self.blocked.load(Ordering::SeqCst) {
                return Err(Error::Full);
            }
        }
    }
}

enum Sent {
    Yes,
    Disconnected,
}

impl Publish for MemoryPublisher {
    fn publish(&self, entry: Entry<'_>) -> Result<Offset> {
        let record = to_record(&entry);
        let mut state = self.inner.state.lock();
        self.inner.deliver(&mut state, record, true)
    }

    fn try_publish(&self, entry: Entry<'_>) -> Result<Offset> {
        let record = to_record(&entry);
        let mut state = self.inner.try_lock_state()?;
        self.inner.deliver(&mut state, record, false)
    }

    /// Publishes the batch under one lock: its records get consecutive offsets. If the
    /// stream closes part way, the records before stay published and the result is
    /// [`Error::Closed`].
    fn publish_batch(&self, entries: &[Entry<'_>]) -> Result<Range<Offset>> {
        let records: Vec<Record> = entries.iter().map(to_record).collect();
        let mut state = self.inner.state.lock();
        let start = state.next;
        for record in records {
            self.inner.deliver(&mut state, record, true)?;
        }
        Ok(start..state.next)
    }

    fn close(&self) {
        self.inner.close();
    }
}

impl Subscribe for MemorySubscriber {
    fn recv(&mut self) -> Result<Record> {
        self.queue.recv().map_err(|_| Error::Closed)
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        self.queue.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => Error::Timeout(timeout),
            RecvTimeoutError::Disconnected => Error::Closed,
        })
    }

    fn try_recv(&mut self) -> Result<Option<Record>> {
        match self.queue.try_recv() {
            Ok(record) => Ok(Some(record)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Error::Closed),
        }
    }

    fn commit(&mut self) -> Result<()> {
        Err(Error::CannotCommit("a memory stream is not stored"))
    }
}
