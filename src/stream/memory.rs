//! [`MemoryStream`]: a notified stream on bounded crossbeam channels.
//!
//! Every publish takes one short lock that gives the record its offset and puts it in the
//! subscriber queues, so offsets are in queue order even with many publishers, and every
//! fan-out subscriber sees the same order. A record goes into every queue or none: a
//! publisher that finds a queue full lets go of the lock, waits for room (a short spin,
//! then a crossbeam `Select` on the full queue and on the stream's close signal, so
//! [`close`](Publish::close) wakes it) and tries again. Only a batch keeps the lock while
//! it waits, so that its offsets are consecutive; `try_publish` does not wait behind it
//! (a batch that waits means the stream is full).

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{
    Receiver, RecvTimeoutError, Select, Sender, TryRecvError, TrySendError, bounded,
};
use crossbeam_utils::Backoff;
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
    /// Held while a record gets its offset and goes into the queues, and by a batch
    /// throughout; see the module docs.
    state: Mutex<State>,
    /// Fan-out subscribers not yet picked up by a publish. Kept apart from `state` so
    /// that subscribing never waits behind a batch blocked on a full queue.
    joining: Mutex<Vec<Queue>>,
    has_joining: AtomicBool,
    closed: AtomicBool,
    /// True while a batch publish holds `state` and waits for room.
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
/// holder is a batch waiting for room (then the stream is full).
const TRY_LOCK_SLICE: Duration = Duration::from_micros(20);

impl MemoryStream {
    /// The largest capacity of a queue. A queue reserves its room when it is made (a
    /// crossbeam array channel: about 100 bytes a record), so a capacity is memory taken
    /// up front; a buffer larger than this belongs in a [`LogStream`](super::LogStream).
    pub const MAX_CAPACITY: usize = 1 << 20;

    /// A stream with one queue of `capacity` records shared by all its subscribers.
    ///
    /// A capacity of 0, or above [`MAX_CAPACITY`](Self::MAX_CAPACITY), is
    /// [`Error::Config`].
    pub fn bounded(capacity: usize) -> Result<MemoryStream> {
        MemoryStream::make(capacity, false)
    }

    /// A stream that gives every subscriber every record, through a queue of `capacity`
    /// records per subscriber.
    ///
    /// A capacity of 0, or above [`MAX_CAPACITY`](Self::MAX_CAPACITY), is
    /// [`Error::Config`].
    pub fn fan_out(capacity: usize) -> Result<MemoryStream> {
        MemoryStream::make(capacity, true)
    }

    fn make(capacity: usize, fan_out: bool) -> Result<MemoryStream> {
        if capacity == 0 || capacity > MemoryStream::MAX_CAPACITY {
            return Err(Error::Config(format!(
                "a memory stream's capacity must be between 1 and {} records, not {capacity}",
                MemoryStream::MAX_CAPACITY
            )));
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
        // Subscribers that left before a publish picked their queues up: each queue
        // holds its whole capacity, so without this a stream nobody publishes into
        // would keep one per subscribe, however many subscribers are left.
        joining.retain(Queue::has_readers);
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

/// Copies an entry's key and payload into a record (one allocation each).
fn to_record(entry: &Entry<'_>) -> Record {
    Record {
        offset: 0,
        timestamp: entry.timestamp,
        key: Bytes::copy_from_slice(entry.key),
        payload: Bytes::copy_from_slice(entry.payload),
    }
}

impl Inner {
    /// Moves subscribers that joined since the last publish into the queues.
    fn admit_joining(&self, state: &mut State) {
        // A load first: the common case (nobody joined) writes nothing.
        if self.has_joining.load(Ordering::SeqCst) && self.has_joining.swap(false, Ordering::SeqCst)
        {
            // The queues of subscribers gone since the last publish go with them.
            state.queues.retain(Queue::has_readers);
            state.queues.append(&mut self.joining.lock());
        }
    }

    /// Gives `record` the next offset and puts it in every queue if every queue has room
    /// now; otherwise hands it back with a full queue to wait on. Offsets are given
    /// only here, under the publish lock, so they follow queue order.
    fn deliver(&self, state: &mut State, mut record: Record) -> Result<Delivery> {
        self.check_open(state)?;
        loop {
            // One queue (always, for a shared queue): try it directly, which is the
            // cheapest way to find out whether it has room.
            if let [queue] = &state.queues[..] {
                record.offset = state.next;
                match queue.sender.try_send(record) {
                    Ok(()) => return Ok(self.delivered(state)),
                    Err(TrySendError::Full(back)) if queue.has_readers() => {
                        return Ok(Delivery::NoRoom(back, queue.sender.clone()));
                    }
                    Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => {
                        record = back;
                        self.drop_unread_queues(state)?;
                        continue;
                    }
                }
            }
            // Several queues: the record goes in all or none, so check every queue for
            // room first (only lock holders send, so room cannot shrink meanwhile).
            if let Some(full) = state.queues.iter().find(|q| q.sender.is_full()) {
                if full.has_readers() {
                    return Ok(Delivery::NoRoom(record, full.sender.clone()));
                }
                self.drop_unread_queues(state)?;
                continue;
            }
            if state.queues.is_empty() && self.streams.load(Ordering::SeqCst) == 0 {
                // Fan-out with no subscriber and no stream value to make one: nobody
                // can ever receive this.
                return Err(Error::Closed);
            }
            record.offset = state.next;
            let mut i = 0;
            while i < state.queues.len() {
                // Cannot be full (checked above); a queue whose subscriber left since is
                // dropped.
                match state.queues[i].sender.try_send(record.clone()) {
                    Ok(()) => i += 1,
                    Err(_) => {
                        state.queues.swap_remove(i);
                    }
                }
            }
            return Ok(self.delivered(state));
        }
    }

    /// `Closed` once nothing published could ever be received: after `close`, or when
    /// no queue has a reader and no stream value is left to make one (a shared queue
    /// counts the stream values among its readers). Takes in the subscribers that
    /// joined since the last publish.
    fn check_open(&self, state: &mut State) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.admit_joining(state);
        let readable = state.queues.iter().any(Queue::has_readers)
            || (self.fan_out && self.streams.load(Ordering::SeqCst) > 0);
        if readable { Ok(()) } else { Err(Error::Closed) }
    }

    fn delivered(&self, state: &mut State) -> Delivery {
        let offset = state.next;
        state.next += 1;
        Delivery::Done(offset)
    }

    /// Drops the queues nobody can read any more; for a shared queue that means the
    /// stream is closed for publishers.
    fn drop_unread_queues(&self, state: &mut State) -> Result<()> {
        if !self.fan_out {
            return Err(Error::Closed);
        }
        state.queues.retain(Queue::has_readers);
        Ok(())
    }

    /// Waits until `queue` has room (or nobody reads it any more), or the stream closes.
    fn wait_for_room(&self, queue: &Sender<Record>) -> Result<()> {
        // Room usually comes back within microseconds: spin and yield a little, as
        // crossbeam's own `send` does, before the costlier select and park.
        let backoff = Backoff::new();
        while !backoff.is_completed() {
            if !queue.is_full() {
                return Ok(());
            }
            backoff.snooze();
        }
        if !self.closed.load(Ordering::SeqCst) {
            let mut select = Select::new();
            select.send(queue);
            select.recv(&self.closing);
            select.ready();
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
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

/// What [`Inner::deliver`] did with a record.
enum Delivery {
    /// Published at this offset.
    Done(Offset),
    /// Not published: this queue is full. The record comes back to try again.
    NoRoom(Record, Sender<Record>),
}

impl Publish for MemoryPublisher {
    fn publish(&self, entry: Entry<'_>) -> Result<Offset> {
        let mut record = to_record(&entry);
        loop {
            // The lock is released while waiting for room, so other publishers (and
            // `try_publish`) never wait behind this one.
            let delivery = self.inner.deliver(&mut self.inner.state.lock(), record)?;
            match delivery {
                Delivery::Done(offset) => return Ok(offset),
                Delivery::NoRoom(back, queue) => {
                    record = back;
                    self.inner.wait_for_room(&queue)?;
                }
            }
        }
    }

    fn try_publish(&self, entry: Entry<'_>) -> Result<Offset> {
        let record = to_record(&entry);
        let mut state = self.inner.try_lock_state()?;
        match self.inner.deliver(&mut state, record)? {
            Delivery::Done(offset) => Ok(offset),
            Delivery::NoRoom(..) => Err(Error::Full),
        }
    }

    /// Publishes the batch under one lock, which it keeps while it waits for room: its
    /// records get consecutive offsets. If the stream closes part way, the records
    /// before stay published and the result is [`Error::Closed`].
    fn publish_batch(&self, entries: &[Entry<'_>]) -> Result<Range<Offset>> {
        let records: Vec<Record> = entries.iter().map(to_record).collect();
        let mut state = self.inner.state.lock();
        // An empty batch is refused where a record would be (a batch's first record
        // checks it otherwise).
        if records.is_empty() {
            self.inner.check_open(&mut state)?;
        }
        let start = state.next;
        for mut record in records {
            while let Delivery::NoRoom(back, queue) = self.inner.deliver(&mut state, record)? {
                record = back;
                self.inner.blocked.store(true, Ordering::SeqCst);
                let waited = self.inner.wait_for_room(&queue);
                self.inner.blocked.store(false, Ordering::SeqCst);
                waited?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each fan-out queue holds its capacity (about 2.75 MiB at 2^15 slots): subscribers
    /// that come and go on a stream nobody publishes into must not pile them up.
    #[test]
    fn fan_out_subscribers_that_leave_before_a_publish_leave_no_queue_behind() {
        let stream = MemoryStream::fan_out(1 << 15).expect("stream");
        let publisher = stream.publisher();
        let stays = stream.subscribe(Position::End).expect("subscribe");
        for _ in 0..64 {
            drop(stream.subscribe(Position::End).expect("subscribe"));
        }
        assert!(stream.inner.joining.lock().len() <= 2);
        for _ in 0..64 {
            drop(stream.subscribe(Position::End).expect("subscribe"));
        }
        publisher
            .publish(crate::Entry::new(b"k", b"v"))
            .expect("publish");
        let state = stream.inner.state.lock();
        assert_eq!(state.queues.iter().filter(|q| q.has_readers()).count(), 1);
        assert!(state.queues.len() <= 2);
        drop(state);
        drop(stays);
    }
}
