//! Streams: the channels every part of cauce talks through.
//!
//! A stream is an ordered flow of [`Record`]s. It has two halves: any number of
//! publishers put records in (each gets an [`Offset`], its place in the stream), and
//! subscribers pull them out, in order. The same records can flow two ways:
//!
//! - **notified**: a [`MemoryStream`] hands each record to whoever is subscribed now,
//!   through bounded queues. Nothing is kept, so a subscriber starts from "now"
//!   ([`Position::End`]) and a full queue pushes back on the publisher.
//! - **stored**: a [`LogStream`] appends each record to a [`Store`](crate::store::Store).
//!   A subscriber starts from any [`Position`] (the beginning, an offset, the end, or a
//!   durable named cursor), replays what is stored, then follows the tail as new records
//!   are committed. Publishers never wait for subscribers; a slow subscriber simply reads
//!   the store at its own pace. Records that retention drops before a subscriber
//!   reads them are an error for it, or skipped as its [`OffsetReset`] says.
//!
//! ```
//! use cauce::stream::{MemoryStream, Position, Publish, Stream, Subscribe, SubscribeExt};
//! use cauce::Entry;
//!
//! let stream = MemoryStream::bounded(16)?;
//! let publisher = stream.publisher();
//! let mut subscriber = stream.subscribe(Position::End)?;
//! drop(stream); // keep only the halves: the stream closes with its last publisher
//!
//! std::thread::spawn(move || {
//!     for word in ["log", "first", "then", "act"] {
//!         publisher.publish(Entry::new(b"greeting", word.as_bytes())).unwrap();
//!     }
//! }); // the publisher is dropped here: the subscriber drains the queue, then ends
//!
//! let words: Vec<_> = subscriber.records().map(|r| r.unwrap().payload).collect();
//! assert_eq!(words, ["log", "first", "then", "act"].map(str::as_bytes));
//! # Ok::<(), cauce::Error>(())
//! ```
//!
//! # The traits
//! [`Publish`] and [`Subscribe`] are the two halves, [`Stream`] makes them. They are
//! kept small, like tower's `Service`; everything else composes around them.
//!
//! # Closing
//! A stream closes when its last publisher is dropped, counting the stream value itself
//! (it can make more publishers; crossbeam's rule), or when any publisher calls
//! [`Publish::close`]. Its subscribers then get every record already published (queued
//! or stored) and after that [`Error::Closed`], on every call. Publishing into a closed
//! stream is `Error::Closed`. A stream whose readers are all gone for good is closed for
//! its publishers too (see each implementation).
//!
//! # Composition
//! The combinators are small wrappers that keep backpressure (each blocks where its
//! input or output would) and pass closing through:
//!
//! | combinator | side | what it does |
//! | --- | --- | --- |
//! | [`SubscribeExt::map`] | subscriber | changes each record as it is received |
//! | [`SubscribeExt::filter`] | subscriber | drops records that fail a test |
//! | [`SubscribeExt::tee`] | subscriber | also publishes every received record into a second stream (logging, auditing, recording) |
//! | [`merge`] | subscriber | several subscribers into one, fairly (round robin) |
//! | [`split`] | publisher | one stream into one stream per instance, by key, through a router function |
//! | [`forward`] | both | pumps a subscriber into a publisher until it closes |
//!
//! Map and filter act where records are consumed, so one stored stream can serve
//! consumers that see it differently. Tee acts where records are consumed, so it
//! records exactly what a consumer saw. Split acts where records are produced, so a
//! full instance queue pushes back on exactly the publishers that feed it, and no
//! central balancer sits in between; [`forward`] a subscriber into a split to split an
//! existing stream.
//!
//! # Typed streams
//! [`Typed`] wraps a publisher or a subscriber and encodes or decodes values through a
//! [`Codec`](crate::Codec) ([`Bincode`](crate::Bincode) by default). A record that does
//! not decode is an [`Error::Codec`] for that record only; the next `recv` goes on with
//! the next record.

use std::ops::Range;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record, Timestamp};

mod combinators;
pub mod conformance;
#[cfg(feature = "futures")]
mod futures;
mod log;
mod memory;
mod typed;

pub use combinators::{Filter, Map, Merge, Split, Tee, forward, merge, split};
pub use log::{LogPublisher, LogStream, LogSubscriber};
pub use memory::{MemoryPublisher, MemoryStream, MemorySubscriber};
pub use typed::{Typed, TypedRecord};

/// The publishing half of a stream: cloneable and shared between threads.
///
/// # Contract
/// - `publish` gives the record the next offset of the stream and returns it; offsets
///   increase in the order publishes take effect, and every subscriber sees records in
///   offset order.
/// - When the stream is full, `publish` blocks until there is room; `try_publish` never
///   waits for room: it returns [`Error::Full`] and publishes nothing.
/// - `publish_batch` gives the batch consecutive offsets, in order, and returns them.
///   An empty batch publishes nothing and returns the empty range `next..next`, where
///   `next` is the offset the next record published would get: the start of the range
///   is always a place in the stream. A publisher without one next offset (a [`Split`],
///   whose next offset depends on the key) refuses an empty batch instead.
/// - Publishing into a closed stream is [`Error::Closed`] and publishes nothing.
/// - [`close`](Publish::close) ends the stream for every publisher and subscriber.
pub trait Publish: Clone + Send + Sync + 'static {
    /// Publishes one entry, blocking while the stream is full; returns its offset.
    fn publish(&self, entry: Entry<'_>) -> Result<Offset>;

    /// Publishes one entry if there is room now; [`Error::Full`] (nothing published) if
    /// not.
    fn try_publish(&self, entry: Entry<'_>) -> Result<Offset>;

    /// Publishes `entries` as one unit, in order, and returns the consecutive offsets
    /// they got.
    ///
    /// An empty batch publishes nothing and returns `next..next`, `next` being the
    /// offset the next record published would get (with nobody else publishing
    /// meanwhile); into a closed stream it is [`Error::Closed`], as any publish.
    /// [`conformance`] checks both. There is no default: one built on `publish` could
    /// neither keep a batch consecutive beside other publishers nor name `next` for an
    /// empty one.
    fn publish_batch(&self, entries: &[Entry<'_>]) -> Result<Range<Offset>>;

    /// Closes the stream: later publishes are [`Error::Closed`], and subscribers end with
    /// `Error::Closed` after receiving what was published before. Closing twice is
    /// harmless.
    fn close(&self);
}

/// The subscribing half of a stream: pulls records in offset order.
///
/// # Contract
/// - `recv` blocks until a record is available and returns it; once the stream is closed
///   and everything published before has been received, it returns [`Error::Closed`],
///   and so does every later call.
/// - `recv_timeout` is `recv` that gives up with [`Error::Timeout`] after `timeout`.
/// - `try_recv` never waits: `Ok(None)` means nothing is available now.
/// - `commit` makes the position durable (everything received so far counts as
///   processed) when the subscription has a durable position; otherwise it is
///   [`Error::CannotCommit`].
/// - Other errors (a damaged store, a record that would not decode) are reported for
///   that call; the subscription goes on where it can.
pub trait Subscribe: Send {
    /// The next record, blocking until one is available; [`Error::Closed`] at the end.
    fn recv(&mut self) -> Result<Record>;

    /// The next record, waiting at most `timeout`; [`Error::Timeout`] if none came.
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record>;

    /// The next record if one is available now.
    fn try_recv(&mut self) -> Result<Option<Record>>;

    /// Durably records that every record received so far is processed, so that a
    /// consumer that restarts from the same named cursor resumes after them.
    ///
    /// The default refuses: only subscriptions with a durable position can commit.
    /// Wrappers forward it to what they wrap.
    fn commit(&mut self) -> Result<()> {
        Err(Error::CannotCommit(
            "this subscription has no durable position",
        ))
    }
}

impl<S: Subscribe + ?Sized> Subscribe for Box<S> {
    fn recv(&mut self) -> Result<Record> {
        (**self).recv()
    }
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        (**self).recv_timeout(timeout)
    }
    fn try_recv(&mut self) -> Result<Option<Record>> {
        (**self).try_recv()
    }
    fn commit(&mut self) -> Result<()> {
        (**self).commit()
    }
}

impl<S: Subscribe + ?Sized> Subscribe for &mut S {
    fn recv(&mut self) -> Result<Record> {
        (**self).recv()
    }
    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        (**self).recv_timeout(timeout)
    }
    fn try_recv(&mut self) -> Result<Option<Record>> {
        (**self).try_recv()
    }
    fn commit(&mut self) -> Result<()> {
        (**self).commit()
    }
}

/// Where a subscription starts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Position {
    /// The first record still stored when the subscription opens its reader (stored
    /// streams only): retention that moves the start meanwhile moves it along, as
    /// [`read_from_start`](crate::store::read_from_start) does.
    Beginning,
    /// The record at this offset (stored streams only).
    Offset(Offset),
    /// The first record stamped at or after this time (stored streams only), as
    /// [`Store::offset_for_timestamp`](crate::store::Store::offset_for_timestamp) finds
    /// it: to consume what was published since a moment (Kafka's `offsetsForTimes`
    /// and a seek). The [end](Position::End) if no record is that recent.
    Timestamp(Timestamp),
    /// The next record published: a subscription that starts now. For a
    /// [`MemoryStream`] shared queue, the oldest record still queued.
    End,
    /// Where the named cursor was last committed, or, if it never was, the
    /// [beginning](Position::Beginning) (the end under [`OffsetReset::Latest`]; stored
    /// streams only). [`Subscribe::commit`] moves the cursor. If retention
    /// dropped records after the cursor, subscribing is [`Error::OffsetOutOfRange`],
    /// which names the first offset still held: those records are gone, and the caller
    /// chooses where to go on from ([`Position::Offset`] of that start, say), or
    /// subscribes with an [`OffsetReset`] that chooses
    /// ([`LogStream::subscribe_with`]).
    Cursor(String),
}

/// What a stored-stream subscription does when the store no longer holds its position
/// (Kafka's `auto.offset.reset`): retention ([`Store::truncate_before`]) dropped the
/// records at a [`Cursor`](Position::Cursor) or [`Offset`](Position::Offset) it
/// starts from, or overtook a running subscriber that had not read them yet.
///
/// Pass it to [`LogStream::subscribe_with`]; [`Stream::subscribe`] uses the default,
/// [`Fail`](OffsetReset::Fail) (so generic code over [`Stream`], and the combinators,
/// subscribe with `Fail`). A reset that jumps over offsets is a loss the consumer never
/// sees: [`LogSubscriber::skipped`] counts those offsets, and each reset logs a warning
/// (`tracing`) naming the cursor, if any, and the offsets it went from and to.
///
/// As in Kafka, the policy also says where a [`Cursor`](Position::Cursor) that was
/// never committed starts: `Latest` at the end (a new consumer sees only what is
/// published from then on), `Earliest` and `Fail` at the beginning (Kafka's `none`
/// fails there instead; `Fail` keeps what [`Stream::subscribe`] always did).
///
/// An offset past the store's end (the store is not the one the offset was taken from,
/// or lost its tail) is reset by the same policy when subscribing, as Kafka does:
/// `Earliest` goes to the start, `Latest` to the end. A reset back like that jumps over
/// nothing, and [`skipped`](LogSubscriber::skipped) does not count it; `Earliest` then
/// delivers again the records from the start, which the consumer may have seen before.
///
/// [`Store::truncate_before`]: crate::store::Store::truncate_before
///
/// ```
/// use cauce::stream::{LogStream, OffsetReset, Position, Stream, Subscribe};
/// use cauce::store::{MemoryStore, Store};
/// use cauce::{Entry, Error};
///
/// let store = MemoryStore::new();
/// let stream = LogStream::new(store.clone());
/// store.append(&[Entry::new(b"a", b"1"), Entry::new(b"b", b"2"), Entry::new(b"c", b"3")])?;
/// store.truncate_before(2)?; // retention dropped offsets 0 and 1
///
/// // By default a position the store no longer holds is an error...
/// let failed = stream.subscribe(Position::Offset(0));
/// assert!(matches!(failed, Err(Error::OffsetOutOfRange { requested: 0, start: 2, .. })));
///
/// // ...with `Earliest` the subscription goes on from the first record still stored.
/// let mut billing = stream.subscribe_with(Position::Offset(0), OffsetReset::Earliest)?;
/// assert_eq!(billing.recv()?.offset, 2);
/// assert_eq!(billing.skipped(), 2); // offsets 0 and 1 were never received
///
/// // With `Latest` it goes on from the end: only records published from now on.
/// let latest = stream.subscribe_with(Position::Offset(0), OffsetReset::Latest)?;
/// assert_eq!((latest.position(), latest.skipped()), (3, 3));
/// # Ok::<(), cauce::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// Report [`Error::OffsetOutOfRange`], which names the first offset still held, and
    /// move nowhere: subscribing fails, and a running subscriber returns the error from
    /// every receive until the caller subscribes anew. The default.
    #[default]
    Fail,
    /// Go on from the first record still stored (Kafka's `earliest`).
    Earliest,
    /// Go on from the store's end, with the records published from then on (Kafka's
    /// `latest`).
    Latest,
}

/// A stream: makes publishers and subscribers of the same flow of records.
///
/// ```
/// use cauce::stream::{LogStream, Position, Publish, Stream, Subscribe};
/// use cauce::store::MemoryStore;
/// use cauce::Entry;
///
/// fn first_payload<S: Stream>(stream: &S) -> cauce::Result<Vec<u8>> {
///     let mut subscriber = stream.subscribe(Position::Beginning)?;
///     stream.publisher().publish(Entry::new(b"", b"hello"))?;
///     Ok(subscriber.recv()?.payload.to_vec())
/// }
/// assert_eq!(first_payload(&LogStream::new(MemoryStore::new()))?, b"hello");
/// # Ok::<(), cauce::Error>(())
/// ```
pub trait Stream {
    /// The publishing half.
    type Publisher: Publish;
    /// The subscribing half.
    type Subscriber: Subscribe + 'static;

    /// A new publisher of this stream.
    fn publisher(&self) -> Self::Publisher;

    /// A new subscriber starting at `from`. A position a stream cannot start at is an
    /// error: [`Error::NotStored`] for stored positions on a notified stream,
    /// [`Error::OffsetOutOfRange`] for offsets a store does not hold (a
    /// [`LogStream`] can reset those instead: [`LogStream::subscribe_with`]).
    fn subscribe(&self, from: Position) -> Result<Self::Subscriber>;
}

/// The records of a subscriber as an iterator, until the stream closes; see
/// [`SubscribeExt::records`].
#[derive(Debug)]
pub struct Records<'a, S: ?Sized> {
    subscriber: &'a mut S,
}

impl<S: Subscribe + ?Sized> Iterator for Records<'_, S> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        match self.subscriber.recv() {
            Ok(record) => Some(Ok(record)),
            Err(Error::Closed) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Adapters for every [`Subscribe`]r: iteration and the subscriber-side combinators.
pub trait SubscribeExt: Subscribe + Sized {
    /// The records as a blocking iterator that ends when the stream closes; other
    /// errors are yielded as items.
    fn records(&mut self) -> Records<'_, Self> {
        Records { subscriber: self }
    }

    /// Changes every record with `f` as it is received.
    ///
    /// ```
    /// # use cauce::stream::{MemoryStream, Position, Publish, Stream, Subscribe, SubscribeExt};
    /// # let stream = MemoryStream::bounded(4)?;
    /// let mut upper = stream.subscribe(Position::End)?.map(|mut r| {
    ///     r.payload = r.payload.to_ascii_uppercase().into();
    ///     r
    /// });
    /// stream.publisher().publish(cauce::Entry::new(b"", b"shout"))?;
    /// assert_eq!(upper.recv()?.payload, "SHOUT");
    /// # Ok::<(), cauce::Error>(())
    /// ```
    fn map<F>(self, f: F) -> Map<Self, F>
    where
        F: FnMut(Record) -> Record + Send,
    {
        Map::new(self, f)
    }

    /// Passes on only the records for which `keep` is true.
    ///
    /// ```
    /// # use cauce::stream::{MemoryStream, Position, Publish, Stream, Subscribe, SubscribeExt};
    /// # let stream = MemoryStream::bounded(4)?;
    /// let mut alice = stream.subscribe(Position::End)?.filter(|r| &r.key[..] == b"alice");
    /// let publisher = stream.publisher();
    /// publisher.publish(cauce::Entry::new(b"bob", b"1"))?;
    /// publisher.publish(cauce::Entry::new(b"alice", b"2"))?;
    /// assert_eq!(alice.recv()?.payload, "2");
    /// # Ok::<(), cauce::Error>(())
    /// ```
    fn filter<F>(self, keep: F) -> Filter<Self, F>
    where
        F: FnMut(&Record) -> bool + Send,
    {
        Filter::new(self, keep)
    }

    /// Also publishes every received record into `to` before returning it; see [`Tee`].
    fn tee<P: Publish>(self, to: P) -> Tee<Self, P> {
        Tee::new(self, to)
    }
}

impl<S: Subscribe> SubscribeExt for S {}

/// The time left until `deadline`, or `None` if it has passed.
pub(crate) fn remaining(deadline: std::time::Instant) -> Option<Duration> {
    deadline.checked_duration_since(std::time::Instant::now())
}
