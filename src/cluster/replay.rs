//! [`Replay`]: rebuild any past state of a service from its logs, and re-run a request
//! on it, in a test or under a debugger.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::fold::{self, CHECKPOINT, Checkpoint, Control, Envelope, FoldSink, Outcome};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::handler::{Effects, Handler};
use crate::record::{Offset, Record};
use crate::router::InstanceId;
use crate::store::{LogOptions, LogStore, Store, read_from_start};

/// Rebuilds the state a key had before any request of the log, and re-runs the handler
/// on it, without touching the logs or the outside world.
///
/// A replay reads the input log and the journal of outside calls, read-only (it may run
/// beside the live service, and sees the logs, and the latest checkpoint, as they were
/// when it opened). Calls to the outside world get their journaled answers; a call that
/// was never journaled, or was journaled under another name, fails the replay with
/// [`Error::Nondeterministic`] rather than calling out or folding on a guess.
///
/// ```
/// use cauce::cluster::{Cluster, Context, Handler, Replay};
///
/// struct Counter;
/// impl Handler for Counter {
///     type State = u64;
///     type Request = u64;
///     type Response = u64;
///     fn handle(&self, _: &mut Context<'_>, _: &[u8], total: &mut u64, add: u64) -> u64 {
///         *total += add;
///         *total
///     }
/// }
///
/// let dir = tempfile::tempdir().unwrap();
/// let cluster = Cluster::builder(Counter).dir(dir.path()).build()?;
/// let client = cluster.client();
/// client.submit("alice", 5)?.wait()?;
/// let second = client.submit("alice", 2)?;
/// let offset = second.offset();
/// second.wait()?;
/// cluster.shutdown()?;
///
/// let replay = Replay::open(dir.path(), Counter)?;
/// assert_eq!(replay.state_before("alice", offset)?, 5);
/// assert_eq!(replay.state_before("alice", replay.next_offset())?, 7);
/// let rerun = replay.rerun(offset)?;
/// assert_eq!((rerun.before, rerun.request, rerun.response, rerun.after), (5, 2, 7, 7));
/// # Ok::<(), cauce::Error>(())
/// ```
pub struct Replay<H: Handler> {
    handler: H,
    input: Arc<dyn Store>,
    effects: Effects,
    poisoned: BTreeSet<Offset>,
    /// The latest checkpoint when the replay was made: a checkpoint the live service
    /// takes later may be past the replay's view of the log.
    checkpoint: Option<Arc<Checkpoint>>,
    /// The last state [`state_before`](Replay::state_before) folded: a later offset of
    /// the same key folds on from it instead of from the checkpoint, so stepping
    /// through a key's history reads the log once, not once per step.
    last: parking_lot::Mutex<Option<Folded>>,
}

/// A key's state before an offset, encoded.
#[derive(Clone)]
struct Folded {
    key: Bytes,
    offset: Offset,
    state: Bytes,
}

/// A request re-run on the state it was handled in (see [`Replay::rerun`]).
pub struct Rerun<H: Handler> {
    /// The request's offset.
    pub offset: Offset,
    /// Its key.
    pub key: Bytes,
    /// The request itself.
    pub request: H::Request,
    /// The key's state before it.
    pub before: H::State,
    /// What the handler answered.
    pub response: H::Response,
    /// The key's state after it.
    pub after: H::State,
}

impl<H: Handler> std::fmt::Debug for Rerun<H>
where
    H::Request: std::fmt::Debug,
    H::State: std::fmt::Debug,
    H::Response: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rerun")
            .field("offset", &self.offset)
            .field("key", &self.key)
            .field("request", &self.request)
            .field("before", &self.before)
            .field("response", &self.response)
            .field("after", &self.after)
            .finish()
    }
}

/// A fold that answers nobody and keeps its poison marks to itself.
struct Silent;

impl<R> FoldSink<R> for Silent {
    fn handled(&mut self, _: Offset, _: Result<R>) {}
    fn poison(&mut self, _: Offset, _: String) -> Result<()> {
        Ok(())
    }
    fn refused(&mut self, _: Offset, _: Error) {}
}

const REPLAY_INSTANCE: InstanceId = InstanceId::REPLAY;

impl<H: Handler> Replay<H> {
    /// Opens the logs a cluster keeps in `dir` (see
    /// [`ClusterBuilder::dir`](super::ClusterBuilder::dir)), read-only.
    ///
    /// Damage in either log (anything but a torn tail, which a crash leaves and which
    /// is left out) is [`Error::Corrupt`], naming the file and byte: a replay that
    /// stopped there would give states that silently lack every later request. To look
    /// at what comes before the damage anyway, open the logs with
    /// [`LogStore::open_read_only`] and pass them to [`from_stores`](Self::from_stores).
    /// A directory without a journal (`effects`) is a service that made no outside
    /// calls; a journal that cannot be read is an error.
    ///
    /// A directory that is missing, or that holds no `input` log (not a cluster's), is
    /// [`Error::Io`] with [`NotFound`](std::io::ErrorKind::NotFound), naming it.
    pub fn open(dir: impl AsRef<Path>, handler: H) -> Result<Self> {
        let dir = dir.as_ref();
        let not_found = |what: &str| {
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, what.to_owned());
            Error::io("open a cluster's logs in", dir, e)
        };
        if !dir.is_dir() {
            return Err(not_found("no such directory"));
        }
        if !dir.join("input").is_dir() {
            return Err(not_found(
                "no `input` log in it: not the directory of a cluster (`ClusterBuilder::dir`)",
            ));
        }
        let input = LogStore::open_read_only(dir.join("input"), LogOptions::new())?;
        refuse_damage(&input)?;
        let journal = dir.join("effects");
        let effects = if journal.exists() {
            let effects = LogStore::open_read_only(journal, LogOptions::new())?;
            refuse_damage(&effects)?;
            Some(Arc::new(effects) as Arc<dyn Store>)
        } else {
            None
        };
        Replay::from_stores(Arc::new(input), effects, handler)
    }

    /// A replay over any input log and journal (`None`: the handler made no outside
    /// calls). The latest checkpoint is read now, once.
    pub fn from_stores(
        input: Arc<dyn Store>,
        effects: Option<Arc<dyn Store>>,
        handler: H,
    ) -> Result<Self> {
        let checkpoint = match input.latest_snapshot(CHECKPOINT)? {
            Some(s) => Some(Arc::new(Checkpoint::decode(s.offset, &s.blob)?)),
            None => None,
        };
        let mut poisoned = BTreeSet::new();
        for record in read_from_start(&*input)?.1 {
            let record = record?;
            if let Envelope::Control(Control::Poison { offset }) = fold::envelope(&record)? {
                poisoned.insert(offset);
            }
        }
        Ok(Replay {
            handler,
            input,
            effects: Effects::journal_only(effects)?,
            poisoned,
            checkpoint,
            last: parking_lot::Mutex::new(None),
        })
    }

    /// The state of `key` just before the request at `offset` (the fold of every request
    /// of `key` before it; requests whose handler panicked or stalled twice are not part
    /// of it). `offset` may be the log's next offset
    /// ([`next_offset`](Self::next_offset)), for the state after every request; past it
    /// is [`Error::OffsetOutOfRange`], and so is an offset before the log's start. It
    /// reads the log no further than `offset`, and from the last state it folded when
    /// that was of the same key at an earlier offset (see [`rerun`](Self::rerun)). An
    /// offset the log holds, but before its checkpoint once the log's head was dropped
    /// (the requests before it are gone), is [`Error::BeforeCheckpoint`].
    pub fn state_before(&self, key: impl AsRef<[u8]>, offset: Offset) -> Result<H::State> {
        let key = key.as_ref();
        let end = self.input.next_offset();
        if offset > end {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                start: self.input.start_offset(),
                end,
            });
        }
        let key = Bytes::copy_from_slice(key);
        let base = self.base_for(offset)?;
        // The same key, folded before up to an offset no later than this one and no
        // earlier than the checkpoint a fold from scratch starts at: fold on from there.
        let last = self
            .last
            .lock()
            .clone()
            .filter(|l| l.key == key && l.offset <= offset && l.offset >= base.offset);
        if let Some(last) = last {
            let mut relayed = HashMap::default();
            relayed.insert(key.clone(), (last.offset, last.state));
            // With no other key, a checkpoint at that offset with nothing in it only
            // says where the log's read starts.
            let from = Checkpoint::empty(last.offset);
            match self.fold(&key, offset, &from, &relayed) {
                Ok(state) => return Ok(state),
                // A state that does not decode as it was encoded (a `State` whose serde
                // attributes bincode cannot read back): fold from scratch, as if nothing
                // were kept.
                Err(_) => *self.last.lock() = None,
            }
        }
        self.fold(&key, offset, &base, &HashMap::default())
    }

    /// The state of `key` before `offset`, folded from `base` (and the state `relayed`
    /// for `key`, if any); kept as the last state folded if it encodes.
    fn fold(
        &self,
        key: &Bytes,
        offset: Offset,
        base: &Checkpoint,
        relayed: &HashMap<Bytes, (Offset, Bytes), ahash::RandomState>,
    ) -> Result<H::State> {
        let mut limits: HashMap<Bytes, Offset, ahash::RandomState> = HashMap::default();
        limits.insert(key.clone(), offset);
        let replay = fold::Replay {
            handler: &self.handler,
            effects: &self.effects,
            instance: REPLAY_INSTANCE,
            fenced: None,
            input: &*self.input,
            handled_before: self.checkpoint.as_ref().map_or(0, |c| c.offset),
        };
        let mut poisoned = self.poisoned.clone();
        let mut states = fold::rebuild(
            replay,
            base,
            relayed,
            &mut poisoned,
            &limits,
            &mut Silent,
            |_| (),
        )?;
        let state = states
            .remove(key)
            .map(|slot| slot.state)
            .unwrap_or_default();
        *self.last.lock() = fold::CODEC.encode(&state).ok().map(|encoded| Folded {
            key: key.clone(),
            offset,
            state: Bytes::from(encoded),
        });
        Ok(state)
    }

    /// Re-runs the request at `offset` on the state its key had before it. An offset
    /// that holds a membership record, or the mark of a request whose handler panicked
    /// or stalled twice, is [`Error::NotARequest`].
    ///
    /// A handler that panics on the request panics again here: the panic hook runs
    /// (a debugger's breakpoint on `rust_panic` stops in the handler), then the panic is
    /// caught and returned as [`Error::HandlerPanicked`] with its message. A request
    /// whose live run panicked (or stalled) inside an outside call's function left no
    /// answer of that call to replay: its rerun stops at the call, with
    /// [`Error::Nondeterministic`] saying so.
    ///
    /// Each call folds the key's requests up to `offset`, as
    /// [`state_before`](Replay::state_before) does: from the last state it folded if that
    /// was of the same key at an earlier offset, else from the latest checkpoint (or the
    /// log's first record). Stepping forward through a key's history (its
    /// [`history`](Self::history)) so reads the log once; a jump back, or to another
    /// key, folds from the checkpoint again. (Rerunning each of 660 requests of a key in
    /// a log of 66,000 without a checkpoint: 0.1 ms a call, where a fold from the start
    /// each time took 7-9 ms.)
    pub fn rerun(&self, offset: Offset) -> Result<Rerun<H>> {
        let record = self.record_at(offset)?;
        let body = match fold::envelope(&record)? {
            Envelope::Request(body) => body,
            Envelope::Control(control) => {
                return Err(Error::NotARequest {
                    offset,
                    what: control.describe(),
                });
            }
        };
        let request: H::Request = fold::decode_request(offset, &record.key, body)?;
        let before = self.state_before(&record.key, offset)?;
        let mut after: H::State = fold::CODEC.decode(&fold::CODEC.encode(&before)?)?;
        let live = fold::Request {
            offset,
            timestamp: record.timestamp,
            key: &record.key,
            body,
        };
        let outcome = fold::apply(
            &self.handler,
            &self.effects,
            REPLAY_INSTANCE,
            None,
            true,
            live,
            &mut after,
        );
        let response = match outcome {
            Outcome::Answered(r) => r,
            Outcome::Refused(e) | Outcome::Diverged(e) => return Err(e),
            Outcome::Panicked(message) => {
                return Err(Error::HandlerPanicked {
                    instance: REPLAY_INSTANCE,
                    offset,
                    message,
                });
            }
        };
        Ok(Rerun {
            offset,
            key: record.key,
            request,
            before,
            response,
            after,
        })
    }

    /// Every request of `key` in log order, with its offset. A request that cannot be
    /// decoded (the live service refused it, and it changed no state) is listed with
    /// the error, which names its offset. A request whose handler panicked (or stalled
    /// twice) is listed like any other, though it changed no state either:
    /// [`panicked`](Self::panicked) tells them apart. Of a log whose head was truncated
    /// (`truncate_after_checkpoint`), only the requests it still holds, from
    /// [`Store::start_offset`](crate::store::Store::start_offset) on.
    pub fn history(&self, key: impl AsRef<[u8]>) -> Result<Vec<(Offset, Result<H::Request>)>> {
        let key = key.as_ref();
        let mut out = Vec::new();
        for record in read_from_start(&*self.input)?.1 {
            let record = record?;
            if &record.key[..] != key {
                continue;
            }
            if let Envelope::Request(body) = fold::envelope(&record)? {
                out.push((
                    record.offset,
                    fold::decode_request(record.offset, key, body),
                ));
            }
        }
        Ok(out)
    }

    /// The offset of the checkpoint the replay folds from (the latest when it opened),
    /// if the log has one. States before it are folded from the log's first record, and
    /// only while the log still starts at offset 0: once its head was dropped (by
    /// [`truncate_after_checkpoint`](super::ClusterBuilder::truncate_after_checkpoint)
    /// or retention), [`state_before`](Self::state_before) and [`rerun`](Self::rerun)
    /// of an earlier offset are [`Error::BeforeCheckpoint`].
    pub fn checkpoint_offset(&self) -> Option<Offset> {
        self.checkpoint.as_ref().map(|c| c.offset)
    }

    /// The id the request at `offset` was submitted with
    /// ([`Client::submit_with_id`](super::Client::submit_with_id)), if any: `None` for a
    /// request without one, and for a record that is not a request.
    pub fn request_id(&self, offset: Offset) -> Result<Option<super::RequestId>> {
        let record = self.record_at(offset)?;
        Ok(fold::request_id(&record.payload))
    }

    /// The offset one past the last record the replay sees: `state_before(key,
    /// replay.next_offset())` is the state of `key` after every request.
    pub fn next_offset(&self) -> Offset {
        self.input.next_offset()
    }

    /// Whether the live service's handler panicked on the request at `offset`, or
    /// stalled on it twice. Such a request was answered [`Error::HandlerPanicked`] (or
    /// [`Error::HandlerStalled`]) and marked in the log, and no state folds it:
    /// [`state_before`](Self::state_before) leaves it out, and [`rerun`](Self::rerun)
    /// runs it again (under a debugger, to see the panic or the hang), on the state it
    /// met. False for an offset before the log's start (of a truncated log): the marks
    /// of those requests went with it.
    pub fn panicked(&self, offset: Offset) -> bool {
        self.poisoned.contains(&offset)
    }

    /// The offsets of the requests [`panicked`](Self::panicked) is true for, in log
    /// order: where to start looking into an incident.
    pub fn panicked_offsets(&self) -> impl Iterator<Item = Offset> + '_ {
        self.poisoned.iter().copied()
    }

    /// Where a fold up to `offset` can start: the latest checkpoint at or before it, or
    /// the beginning of the log.
    fn base_for(&self, offset: Offset) -> Result<Arc<Checkpoint>> {
        let start = self.input.start_offset();
        if let Some(c) = self.checkpoint.as_ref().filter(|c| c.offset <= offset) {
            return Ok(c.clone());
        }
        if offset < start {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                start,
                end: self.input.next_offset(),
            });
        }
        if start > 0 {
            // The offset is held, but the requests before it are not.
            return Err(Error::BeforeCheckpoint {
                requested: offset,
                earliest: self.checkpoint.as_ref().map(|c| c.offset),
            });
        }
        Ok(Arc::new(Checkpoint::empty(0)))
    }

    fn record_at(&self, offset: Offset) -> Result<Record> {
        fold::record_at(&*self.input, offset)
    }
}

/// Damage a read-only view of a log stopped at, as an error.
fn refuse_damage(log: &LogStore) -> Result<()> {
    match log.corruption() {
        None => Ok(()),
        Some(damage) => Err(crate::store::log::damage_again(damage, log.dir())),
    }
}
