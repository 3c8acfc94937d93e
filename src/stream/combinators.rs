//! The combinators: small wrappers around the two halves of a stream.
//!
//! Each keeps backpressure (it blocks where what it wraps blocks, and buffers at most a
//! fixed number of records) and passes closing through: when its input ends, its output
//! ends. See the table in the [module docs](super).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender, TryRecvError, bounded};

use super::{Publish, Subscribe, remaining};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record};
use crate::router::InstanceId;

/// A subscriber whose records are changed by a function; see [`SubscribeExt::map`].
///
/// [`SubscribeExt::map`]: super::SubscribeExt::map
#[derive(Debug)]
pub struct Map<S, F> {
    input: S,
    f: F,
}

impl<S, F> Map<S, F> {
    pub(super) fn new(input: S, f: F) -> Self {
        Map { input, f }
    }

    /// The wrapped subscriber.
    pub fn into_inner(self) -> S {
        self.input
    }
}

impl<S, F> Subscribe for Map<S, F>
where
    S: Subscribe,
    F: FnMut(Record) -> Record + Send,
{
    fn recv(&mut self) -> Result<Record> {
        self.input.recv().map(&mut self.f)
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        self.input.recv_timeout(timeout).map(&mut self.f)
    }

    fn try_recv(&mut self) -> Result<Option<Record>> {
        Ok(self.input.try_recv()?.map(&mut self.f))
    }

    fn commit(&mut self) -> Result<()> {
        self.input.commit()
    }
}

/// A subscriber that passes on only some records; see [`SubscribeExt::filter`].
///
/// Records it drops count as received: a commit covers them.
///
/// [`SubscribeExt::filter`]: super::SubscribeExt::filter
#[derive(Debug)]
pub struct Filter<S, F> {
    input: S,
    keep: F,
}

impl<S, F> Filter<S, F> {
    pub(super) fn new(input: S, keep: F) -> Self {
        Filter { input, keep }
    }

    /// The wrapped subscriber.
    pub fn into_inner(self) -> S {
        self.input
    }
}

impl<S, F> Subscribe for Filter<S, F>
where
    S: Subscribe,
    F: FnMut(&Record) -> bool + Send,
{
    fn recv(&mut self) -> Result<Record> {
        loop {
            let record = self.input.recv()?;
            if (self.keep)(&record) {
                return Ok(record);
            }
        }
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        // A timeout too long to be a point in time is no deadline at all.
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            return self.recv();
        };
        // Past the deadline it still takes what is already queued, as `recv_timeout`
        // does on every other subscriber (a zero timeout looks at least once), but
        // only so many records: a backlog of records the filter drops would otherwise
        // keep it past its timeout for as long as the backlog lasts.
        let mut left = timeout;
        let mut past_deadline = 0;
        loop {
            let record = match self.input.recv_timeout(left) {
                Err(Error::Timeout(_)) => return Err(Error::Timeout(timeout)),
                other => other?,
            };
            if (self.keep)(&record) {
                return Ok(record);
            }
            left = match remaining(deadline) {
                Some(left) if !left.is_zero() => left,
                _ if past_deadline < LOOKS_PAST_DEADLINE => {
                    past_deadline += 1;
                    Duration::ZERO
                }
                _ => return Err(Error::Timeout(timeout)),
            };
        }
    }

    fn try_recv(&mut self) -> Result<Option<Record>> {
        while let Some(record) = self.input.try_recv()? {
            if (self.keep)(&record) {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    fn commit(&mut self) -> Result<()> {
        self.input.commit()
    }
}

/// A subscriber that also publishes every record it receives into a second stream;
/// see [`SubscribeExt::tee`].
///
/// A record is returned only once the second stream has taken it, so a full second
/// stream holds the reader back: `try_recv` then answers `Ok(None)`, and `recv_timeout`
/// waits for room until its timeout, then answers [`Error::Timeout`]; either way the
/// tee holds the record, and the next call returns it once the second stream takes it.
/// When the input ends, the tee drops its publisher, so the second stream closes too
/// unless it has other publishers. The copy keeps the
/// record's timestamp, key and payload and gets its offset from the second stream.
///
/// # When the second stream refuses a record
///
/// The tee has then read the record from its input but cannot return it. It holds it,
/// and every call returns [`Error::TeeRefused`] (the record's offset, with the second
/// stream's error as its source) after offering it again, until the second stream takes
/// it; then it is returned and reading goes on. A refusal is never [`Error::Closed`],
/// which means only that the input ended: [`records`](super::SubscribeExt::records)
/// yields it as an error item instead of ending, [`merge`] passes it on, and
/// [`forward`] returns it.
///
/// While the tee holds a record (refused, or kept back from `try_recv` by a full second
/// stream), [`commit`](Subscribe::commit) is [`Error::CannotCommit`] and commits
/// nothing: the input's position already counts that record, which the caller has not
/// received. Commits made before stand.
///
/// A refusal that does not pass (the second stream was closed for good) leaves the
/// choice to the caller: drop the tee, and a subscriber opened again from the last
/// committed cursor receives the held record again; or take the input and the held
/// record back with [`into_parts`](Tee::into_parts) and go on without the copy.
///
/// ```
/// use cauce::stream::{MemoryStream, Position, Publish, Stream, Subscribe, SubscribeExt};
/// use cauce::Entry;
///
/// let (requests, audit) = (MemoryStream::bounded(8)?, MemoryStream::bounded(8)?);
/// let mut audit_log = audit.subscribe(Position::End)?;
/// let mut handler = requests.subscribe(Position::End)?.tee(audit.publisher());
/// drop(audit);
/// requests.publisher().publish(Entry::new(b"alice", b"open"))?;
/// drop(requests);
///
/// assert_eq!(handler.recv()?.payload, "open");
/// assert!(handler.recv().is_err()); // the requests stream closed...
/// assert_eq!(audit_log.recv()?.payload, "open");
/// assert!(audit_log.recv().is_err()); // ...and so did the audit stream
/// # Ok::<(), cauce::Error>(())
/// ```
///
/// [`SubscribeExt::tee`]: super::SubscribeExt::tee
#[derive(Debug)]
pub struct Tee<S, P> {
    input: S,
    /// `None` once the input has closed.
    output: Option<P>,
    /// Received from the input, not yet taken by the output.
    pending: Option<Record>,
}

impl<S: Subscribe, P: Publish> Tee<S, P> {
    pub(super) fn new(input: S, output: P) -> Self {
        Tee {
            input,
            output: Some(output),
            pending: None,
        }
    }

    /// The wrapped subscriber, and the record the tee holds because its second stream
    /// has not taken it, if any. The input has read that record and the caller has not
    /// received it: handle it before reading on from the input, or it is skipped.
    pub fn into_parts(self) -> (S, Option<Record>) {
        (self.input, self.pending)
    }

    /// Publishes the received (or pending) record; `wait` says whether to wait for room.
    fn pass(&mut self, received: Result<Option<Record>>, wait: bool) -> Result<Option<Record>> {
        let record = match (self.pending.take(), received) {
            (Some(record), _) => record,
            (None, Ok(Some(record))) => record,
            (None, Ok(None)) => return Ok(None),
            (None, Err(Error::Closed)) => {
                self.output = None;
                return Err(Error::Closed);
            }
            (None, Err(e)) => return Err(e),
        };
        let Some(output) = &self.output else {
            return Err(Error::Closed);
        };
        let published = if wait {
            output.publish(record.as_entry())
        } else {
            output.try_publish(record.as_entry())
        };
        match published {
            Ok(_) => Ok(Some(record)),
            Err(Error::Full) if !wait => {
                self.pending = Some(record);
                Ok(None)
            }
            Err(e) => {
                let offset = record.offset;
                self.pending = Some(record);
                // Not passed up as is: a `Closed` of the second stream would read as the
                // end of the input.
                Err(Error::TeeRefused {
                    offset,
                    source: Box::new(e),
                })
            }
        }
    }
}

impl<S: Subscribe, P: Publish> Subscribe for Tee<S, P> {
    fn recv(&mut self) -> Result<Record> {
        let received = match self.pending {
            Some(_) => Ok(None),
            None => self.input.recv().map(Some),
        };
        self.pass(received, true)?.ok_or(Error::Closed)
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        let Some(deadline) = Instant::now().checked_add(timeout) else {
            return self.recv();
        };
        let mut received = match self.pending {
            Some(_) => Ok(None),
            None => self.input.recv_timeout(timeout).map(Some),
        };
        // Room in the second stream is waited for until the deadline, not past it: a
        // merge reading this tee checks between its calls whether it was dropped.
        let mut naps = 0u32;
        loop {
            if let Some(record) = self.pass(received, false)? {
                return Ok(record);
            }
            if self.pending.is_none() {
                return Err(Error::Closed);
            }
            let Some(left) = remaining(deadline).filter(|left| !left.is_zero()) else {
                return Err(Error::Timeout(timeout));
            };
            // Short naps first (room usually comes back soon), then up to a millisecond.
            let nap = Duration::from_micros(50 << naps.min(4)).min(left);
            naps += 1;
            thread::sleep(nap);
            received = Ok(None);
        }
    }

    fn try_recv(&mut self) -> Result<Option<Record>> {
        let received = match self.pending {
            Some(_) => Ok(None),
            None => self.input.try_recv(),
        };
        self.pass(received, false)
    }

    /// Commits the input, unless the tee holds a record the caller has not received
    /// ([`Error::CannotCommit`]; see [`Tee`]).
    fn commit(&mut self) -> Result<()> {
        if self.pending.is_some() {
            return Err(Error::CannotCommit(
                "the tee holds a record its second stream has not taken and its caller has \
                 not received; commit after it is returned",
            ));
        }
        self.input.commit()
    }
}

/// Several subscribers merged into one; see [`merge`].
#[derive(Debug)]
pub struct Merge {
    /// One bounded queue per input still open, fed by that input's forwarding thread.
    inputs: Vec<Receiver<Result<Record>>>,
    /// Where the next round-robin pass starts.
    next: usize,
    stop: Arc<AtomicBool>,
}

/// Records each input's forwarding thread may hold ahead of the merged subscriber.
const MERGE_QUEUE: usize = 16;

/// How often an idle forwarding thread checks whether its merge was dropped.
const MERGE_STOP_CHECK: Duration = Duration::from_millis(50);

/// Merges several subscribers into one that receives the records of all of them.
///
/// Fair: the merged subscriber takes from its inputs in turn (round robin), so a busy
/// input cannot starve a quiet one, nor the other way round. Each input keeps its own
/// order and offsets; records of different inputs interleave. Each input is read by a
/// thread of its own that holds at most a few (16) records ahead, so memory stays
/// bounded and a merged subscriber that stops reading pushes back on every input. The
/// merged subscriber ends with [`Error::Closed`] once every input has ended and its
/// records are received; errors of an input are passed on as they come, and an input
/// that panics (a filter's closure, say) is [`Error::InputPanicked`] (its thread ends
/// there, the merge goes on with the others).
///
/// A merge has no single position, so [`commit`](Subscribe::commit) is
/// [`Error::CannotCommit`]. Dropping the merged subscriber stops its threads within
/// 50 ms, and they drop their inputs.
///
/// ```
/// use cauce::stream::{merge, MemoryStream, Position, Publish, Stream, SubscribeExt};
/// use cauce::Entry;
///
/// let (web, mobile) = (MemoryStream::bounded(8)?, MemoryStream::bounded(8)?);
/// let mut all = merge([web.subscribe(Position::End)?, mobile.subscribe(Position::End)?])?;
/// web.publisher().publish(Entry::new(b"", b"from web"))?;
/// mobile.publisher().publish(Entry::new(b"", b"from mobile"))?;
/// drop((web, mobile));
/// let mut got: Vec<_> = all.records().map(|r| r.unwrap().payload).collect();
/// got.sort();
/// assert_eq!(got, ["from mobile", "from web"]);
/// # Ok::<(), cauce::Error>(())
/// ```
pub fn merge<S, I>(inputs: I) -> Result<Merge>
where
    S: Subscribe + 'static,
    I: IntoIterator<Item = S>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut queues = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        let (tx, rx) = bounded(MERGE_QUEUE);
        let name = format!("cauce-merge-{i}");
        let stop_flag = stop.clone();
        let spawned = thread::Builder::new()
            .name(name.clone())
            .spawn(move || forward_into(i, input, tx, &stop_flag));
        if let Err(source) = spawned {
            stop.store(true, Ordering::SeqCst);
            return Err(Error::Spawn { name, source });
        }
        queues.push(rx);
    }
    Ok(Merge {
        inputs: queues,
        next: 0,
        stop,
    })
}

/// How many records a `Filter::recv_timeout` past its deadline still looks at (when
/// they are queued already) before it gives up.
const LOOKS_PAST_DEADLINE: usize = 64;

/// A merge input's thread: moves the records of input `index` into the merge's queue
/// for it. An input that panics (a filter's closure, say) is passed on as
/// [`Error::InputPanicked`], not taken for the input's end.
fn forward_into<S: Subscribe>(
    index: usize,
    mut input: S,
    queue: Sender<Result<Record>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            input.recv_timeout(MERGE_STOP_CHECK)
        }));
        let item = match received {
            Ok(Err(Error::Timeout(_))) => continue,
            Ok(Err(Error::Closed)) => return,
            Ok(item) => item,
            Err(panic) => {
                let _ = queue.send(Err(Error::InputPanicked {
                    input: index,
                    message: crate::launcher::thread::panic_message(&*panic),
                }));
                return;
            }
        };
        // Blocks while the merged subscriber is behind; fails once it is dropped.
        if queue.send(item).is_err() {
            return;
        }
    }
}

impl Merge {
    /// One round-robin pass over the inputs: the first record found, if any. Inputs
    /// that have ended are removed.
    fn take_next(&mut self) -> Option<Result<Record>> {
        let mut checked = 0;
        while checked < self.inputs.len() {
            let i = (self.next + checked) % self.inputs.len();
            match self.inputs[i].try_recv() {
                Ok(item) => {
                    self.next = i + 1;
                    return Some(item);
                }
                Err(TryRecvError::Empty) => checked += 1,
                Err(TryRecvError::Disconnected) => {
                    self.inputs.remove(i);
                    if i < self.next {
                        self.next -= 1;
                    }
                }
            }
        }
        None
    }

    /// Blocks until some input queue is ready (a record, or its end), or `deadline`.
    /// False if the deadline passed.
    fn wait_ready(&self, deadline: Option<Instant>) -> bool {
        let mut select = Select::new();
        for input in &self.inputs {
            select.recv(input);
        }
        match deadline {
            None => {
                select.ready();
                true
            }
            Some(deadline) => select.ready_deadline(deadline).is_ok(),
        }
    }

    fn next_record(&mut self, deadline: Option<Instant>, timeout: Duration) -> Result<Record> {
        loop {
            if let Some(item) = self.take_next() {
                return item;
            }
            if self.inputs.is_empty() {
                return Err(Error::Closed);
            }
            if !self.wait_ready(deadline) {
                return Err(Error::Timeout(timeout));
            }
        }
    }
}

impl Subscribe for Merge {
    fn recv(&mut self) -> Result<Record> {
        self.next_record(None, Duration::MAX)
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Result<Record> {
        self.next_record(Instant::now().checked_add(timeout), timeout)
    }

    fn try_recv(&mut self) -> Result<Option<Record>> {
        match self.take_next() {
            Some(item) => item.map(Some),
            None if self.inputs.is_empty() => Err(Error::Closed),
            None => Ok(None),
        }
    }

    fn commit(&mut self) -> Result<()> {
        Err(Error::CannotCommit(
            "a merge reads ahead of what it delivered and has no single position",
        ))
    }
}

impl Drop for Merge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A publisher that routes each record by key to the stream of one instance; see
/// [`split`].
pub struct Split<P, R> {
    inner: Arc<SplitInner<P, R>>,
}

struct SplitInner<P, R> {
    route: R,
    outputs: HashMap<InstanceId, P>,
}

/// Splits one stream into one stream per instance: publishing into the returned
/// [`Split`] publishes each record into the stream of the instance that `route` picks
/// for its key.
///
/// This is the load-balancing split of the design, with no central balancer: any number
/// of splits can run side by side, each only a function of the key and of what `route`
/// reads. With a [`Router`](crate::router::Router), pass
/// `move |key| router.owner_of(key)` (the stream module does not depend on the router
/// module, which builds on streams). Backpressure is per instance: a full instance
/// stream blocks exactly the publishes routed to it. The offset returned is the record's
/// offset in its instance's stream.
///
/// A key that `route` maps to `None` is [`Error::NoInstance`]; to an instance without a
/// stream here, [`Error::UnknownInstance`]. A batch must route to one instance (it is
/// published there as one batch), otherwise [`Error::BatchSpansInstances`] and nothing
/// is published. An empty batch has no key, so it routes to no instance either:
/// `Error::NoInstance`, since a split has no single next offset to return for it (see
/// [`Publish::publish_batch`]). Dropping the last clone of the split drops its publishers, which closes
/// each instance stream that has no other publisher; [`Publish::close`] closes them all.
/// To split an existing stream, [`forward`] a subscriber of it into the split.
///
/// ```
/// use cauce::router::InstanceId;
/// use cauce::stream::{split, MemoryStream, Position, Publish, Stream, Subscribe};
/// use cauce::Entry;
///
/// let instances = [InstanceId(0), InstanceId(1)];
/// let streams = [MemoryStream::bounded(8)?, MemoryStream::bounded(8)?];
/// let mut queues = Vec::new();
/// for s in &streams {
///     queues.push(s.subscribe(Position::End)?);
/// }
/// // A toy router: keys starting with a-m go to instance 0, the rest to 1.
/// let by_key = split(
///     |key: &[u8]| Some(InstanceId(u32::from(key.first()? > &b'm'))),
///     instances.into_iter().zip(streams.iter().map(|s| s.publisher())),
/// );
/// by_key.publish(Entry::new(b"alice", b"hi"))?;
/// by_key.publish(Entry::new(b"zoe", b"yo"))?;
/// assert_eq!(queues[0].recv()?.key, "alice");
/// assert_eq!(queues[1].recv()?.key, "zoe");
/// # Ok::<(), cauce::Error>(())
/// ```
pub fn split<P, R, I>(route: R, outputs: I) -> Split<P, R>
where
    P: Publish,
    R: Fn(&[u8]) -> Option<InstanceId> + Send + Sync + 'static,
    I: IntoIterator<Item = (InstanceId, P)>,
{
    Split {
        inner: Arc::new(SplitInner {
            route,
            outputs: outputs.into_iter().collect(),
        }),
    }
}

impl<P, R> Split<P, R>
where
    P: Publish,
    R: Fn(&[u8]) -> Option<InstanceId> + Send + Sync + 'static,
{
    /// The instance `key` routes to, and its publisher.
    pub fn route(&self, key: &[u8]) -> Result<(InstanceId, &P)> {
        let instance = (self.inner.route)(key).ok_or(Error::NoInstance)?;
        let output = self
            .inner
            .outputs
            .get(&instance)
            .ok_or(Error::UnknownInstance(instance))?;
        Ok((instance, output))
    }

    /// The instances this split has a stream for.
    pub fn instances(&self) -> impl Iterator<Item = InstanceId> + '_ {
        self.inner.outputs.keys().copied()
    }
}

impl<P, R> Clone for Split<P, R> {
    fn clone(&self) -> Self {
        Split {
            inner: self.inner.clone(),
        }
    }
}

impl<P, R> std::fmt::Debug for Split<P, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut instances: Vec<_> = self.inner.outputs.keys().collect();
        instances.sort();
        f.debug_struct("Split")
            .field("instances", &instances)
            .finish_non_exhaustive()
    }
}

impl<P, R> Publish for Split<P, R>
where
    P: Publish,
    R: Fn(&[u8]) -> Option<InstanceId> + Send + Sync + 'static,
{
    fn publish(&self, entry: Entry<'_>) -> Result<Offset> {
        self.route(entry.key)?.1.publish(entry)
    }

    fn try_publish(&self, entry: Entry<'_>) -> Result<Offset> {
        self.route(entry.key)?.1.try_publish(entry)
    }

    fn publish_batch(&self, entries: &[Entry<'_>]) -> Result<Range<Offset>> {
        // No key, no instance, and no one next offset to name (see `split`).
        let Some(first) = entries.first() else {
            return Err(Error::NoInstance);
        };
        let (instance, output) = self.route(first.key)?;
        for (index, entry) in entries.iter().enumerate().skip(1) {
            let (other, _) = self.route(entry.key)?;
            if other != instance {
                return Err(Error::BatchSpansInstances {
                    first: instance,
                    other,
                    index,
                });
            }
        }
        output.publish_batch(entries)
    }

    fn close(&self) {
        for output in self.inner.outputs.values() {
            output.close();
        }
    }
}

/// Pumps every record of `from` into `to` until `from` ends; returns how many it moved.
///
/// Backpressure passes through (`to` blocks, so `from` is not read). When `from` ends,
/// `to` is dropped: the output stream closes too unless it has other publishers. Run it
/// on a thread of its own to split or bridge an existing stream.
///
/// `Ok` means that `from` ended. An error ends the pump:
/// - an error of `from` is returned as it is (it yielded no record, so nothing was
///   read and left unpublished);
/// - when `to` refuses a record (its stream was closed, its store failed), the error is
///   [`Error::ForwardRefused`]: it holds that record, which `from` gave up and `to` did
///   not take, the count moved before it, and `to`'s error as its source. So a closed
///   output is never `Error::Closed`, which would read as the end of the input.
///
/// `forward` takes `from` by value and never commits it; pass `&mut subscriber` to keep
/// it, go on after an error, or commit once the pump returns. A commit then counts a
/// refused record as received: publish it elsewhere first, or it is skipped.
///
/// ```
/// use cauce::stream::{forward, LogStream, MemoryStream, Position, Publish, Stream, Subscribe};
/// use cauce::store::MemoryStore;
/// use cauce::Entry;
///
/// // Record a notified stream into a stored one.
/// let live = MemoryStream::bounded(8)?;
/// let recorded = LogStream::new(MemoryStore::new());
/// let (from, to) = (live.subscribe(Position::End)?, recorded.publisher());
/// let pump = std::thread::spawn(move || forward(from, to));
/// live.publisher().publish(Entry::new(b"k", b"v"))?;
/// drop(live);
/// assert_eq!(pump.join().unwrap()?, 1);
/// let mut replay = recorded.subscribe(Position::Beginning)?;
/// assert_eq!(replay.recv()?.payload, "v");
/// # Ok::<(), cauce::Error>(())
/// ```
pub fn forward<S: Subscribe, P: Publish>(mut from: S, to: P) -> Result<u64> {
    let mut moved = 0;
    loop {
        let record = match from.recv() {
            Ok(record) => record,
            Err(Error::Closed) => return Ok(moved),
            Err(e) => return Err(e),
        };
        if let Err(source) = to.publish(record.as_entry()) {
            return Err(Error::ForwardRefused {
                moved,
                record: Box::new(record),
                source: Box::new(source),
            });
        }
        moved += 1;
    }
}
