//! What the input log holds and how state is folded out of it.
//!
//! Every record of the input log is one of two things, told apart by the first byte of
//! its payload:
//! - `0`, a request: the record's key is the request's key, the rest of the payload is the
//!   request encoded with the cluster's codec;
//! - `2`, a request with an id ([`RequestId`]): the id's 16 bytes (little-endian), then
//!   the request as for `0`;
//! - `1`, a control record (empty key): a membership change or a poison mark, encoded
//!   with bincode. A poison mark names a request whose handler panicked, or stalled
//!   twice: no replay applies it again.
//!
//! A checkpoint is a snapshot named [`CHECKPOINT`] in the input store, taken at an offset
//! `c`: the state of every key after folding every request before `c`. Its blob is
//! `"CCP1"`, a little-endian `u64` count, then per key a `u32` key length, the key, a `u32`
//! state length and the state encoded with the codec.

use std::collections::{BTreeSet, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::handler::{Context, Effects, Handler};
use crate::launcher::thread::panic_message;
use crate::record::{Entry, Offset, Record};
use crate::router::InstanceId;
use crate::store::Store;

use super::ids::RequestId;

/// The snapshot name of cluster checkpoints in the input store.
pub(crate) const CHECKPOINT: &str = "cluster-state";

const TAG_REQUEST: u8 = 0;
const TAG_CONTROL: u8 = 1;
const TAG_REQUEST_WITH_ID: u8 = 2;
const CHECKPOINT_MAGIC: &[u8; 4] = b"CCP1";

/// The codec of requests and states. Replacing it is this one line.
pub(crate) type ClusterCodec = crate::codec::Bincode;
pub(crate) const CODEC: ClusterCodec = crate::codec::Bincode;

/// A control record of the input log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Control {
    /// An instance joined with a weight.
    Join { id: u32, weight: u32 },
    /// An instance left (scaled in).
    Leave { id: u32 },
    /// An instance was declared stalled and its keys moved away.
    Stalled { id: u32 },
    /// The handler panicked on the request at `offset`, or stalled on it twice: never
    /// apply it again.
    Poison { offset: Offset },
}

impl Control {
    /// What the record says, for an error about it.
    pub(crate) fn describe(&self) -> String {
        match self {
            Control::Join { id, .. } => format!("instance #{id} joining"),
            Control::Leave { id } => format!("instance #{id} leaving"),
            Control::Stalled { id } => format!("instance #{id} declared stalled"),
            Control::Poison { offset } => format!(
                "that the request at offset {offset} was set aside (its handler panicked or \
                 stalled twice, or it did not decode)"
            ),
        }
    }
}

/// A decoded input-log record.
pub(crate) enum Envelope<'a> {
    Request(&'a [u8]),
    Control(Control),
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A buffer for one request's payload, reused by each thread from one request to the
/// next: encoding a request then allocates nothing.
pub(crate) struct Scratch(Vec<u8>);

impl Scratch {
    /// This thread's buffer, empty.
    pub(crate) fn empty() -> Scratch {
        let mut buffer = SCRATCH.try_with(|c| c.take()).unwrap_or_default();
        buffer.clear();
        Scratch(buffer)
    }

    /// The payload of `request`, encoded into this thread's buffer.
    pub(crate) fn request<T: Serialize>(request: &T) -> Result<Scratch> {
        let mut scratch = Scratch::empty();
        scratch.push_request(request)?;
        Ok(scratch)
    }

    /// The payload of `request` submitted with `id`, encoded into this thread's buffer.
    pub(crate) fn request_with_id<T: Serialize>(request: &T, id: RequestId) -> Result<Scratch> {
        let mut scratch = Scratch::empty();
        scratch.push_request_with_id(request, id)?;
        Ok(scratch)
    }

    /// Appends the payload of `request` submitted with `id`; returns where it lies.
    pub(crate) fn push_request_with_id<T: Serialize>(
        &mut self,
        request: &T,
        id: RequestId,
    ) -> Result<std::ops::Range<usize>> {
        let start = self.0.len();
        self.0.push(TAG_REQUEST_WITH_ID);
        self.0.extend_from_slice(&id.to_bytes());
        if let Err(e) = CODEC.encode_into(request, &mut self.0) {
            self.0.truncate(start);
            return Err(e);
        }
        Ok(start..self.0.len())
    }

    /// Appends the payload of `request`; returns where it lies in the buffer.
    pub(crate) fn push_request<T: Serialize>(
        &mut self,
        request: &T,
    ) -> Result<std::ops::Range<usize>> {
        let start = self.0.len();
        self.0.push(TAG_REQUEST);
        if let Err(e) = CODEC.encode_into(request, &mut self.0) {
            self.0.truncate(start);
            return Err(e);
        }
        Ok(start..self.0.len())
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Keep a buffer of ordinary size; let a huge one go.
        if self.0.capacity() <= 64 * 1024 {
            let buffer = std::mem::take(&mut self.0);
            let _ = SCRATCH.try_with(|c| c.set(buffer));
        }
    }
}

/// The payload of a control record.
pub(crate) fn control_payload(control: &Control) -> Result<Vec<u8>> {
    let mut payload = vec![TAG_CONTROL];
    CODEC.encode_into(control, &mut payload)?;
    Ok(payload)
}

/// The encoded request in a request payload, or `None` for anything else.
pub(crate) fn request_body(payload: &[u8]) -> Option<&[u8]> {
    match payload.split_first() {
        Some((&TAG_REQUEST, body)) => Some(body),
        Some((&TAG_REQUEST_WITH_ID, rest)) => rest.get(ID_BYTES..),
        _ => None,
    }
}

const ID_BYTES: usize = 16;

/// The id a request payload carries, if it was submitted with one.
pub(crate) fn request_id(payload: &[u8]) -> Option<RequestId> {
    match payload.split_first() {
        Some((&TAG_REQUEST_WITH_ID, rest)) => {
            let bytes: [u8; ID_BYTES] = rest.get(..ID_BYTES)?.try_into().ok()?;
            Some(RequestId::from_bytes(bytes))
        }
        _ => None,
    }
}

/// The record at `offset` of `input`: [`Error::OffsetOutOfRange`] if the store does
/// not hold it (before its start, at or past its end, or dropped by compaction).
pub(crate) fn record_at(input: &dyn Store, offset: Offset) -> Result<Record> {
    match input.read_from(offset)?.next() {
        Some(Ok(record)) if record.offset == offset => Ok(record),
        Some(Err(e)) => Err(e),
        _ => Err(Error::OffsetOutOfRange {
            requested: offset,
            start: input.start_offset(),
            end: input.next_offset(),
        }),
    }
}

/// Reads a record's envelope.
pub(crate) fn envelope(record: &Record) -> Result<Envelope<'_>> {
    envelope_of(record.offset, &record.payload)
}

/// Reads the envelope of the payload of the record at `offset`.
pub(crate) fn envelope_of(offset: Offset, payload: &[u8]) -> Result<Envelope<'_>> {
    match payload.split_first() {
        Some((&TAG_REQUEST, body)) => Ok(Envelope::Request(body)),
        Some((&TAG_REQUEST_WITH_ID, rest)) => match rest.get(ID_BYTES..) {
            Some(body) => Ok(Envelope::Request(body)),
            None => Err(Error::Codec {
                context: "input log envelope",
                message: format!("record at offset {offset} is too short for its request id"),
            }),
        },
        Some((&TAG_CONTROL, body)) => Ok(Envelope::Control(CODEC.decode(body)?)),
        _ => Err(Error::Codec {
            context: "input log envelope",
            message: format!("record at offset {offset} has no known tag"),
        }),
    }
}

/// The state of every key at a checkpoint offset, encoded.
#[derive(Debug, Default)]
pub(crate) struct Checkpoint {
    pub(crate) offset: Offset,
    pub(crate) states: HashMap<Bytes, Bytes, ahash::RandomState>,
}

impl Checkpoint {
    pub(crate) fn empty(offset: Offset) -> Self {
        Checkpoint {
            offset,
            states: HashMap::default(),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let size: usize = self.states.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
        let mut out = Vec::with_capacity(12 + size);
        out.extend_from_slice(CHECKPOINT_MAGIC);
        out.extend_from_slice(&(self.states.len() as u64).to_le_bytes());
        // Sorted, so the same states always make the same bytes.
        let mut keys: Vec<_> = self.states.keys().collect();
        keys.sort_unstable();
        for key in keys {
            let state = &self.states[key];
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&(state.len() as u32).to_le_bytes());
            out.extend_from_slice(state);
        }
        out
    }

    pub(crate) fn decode(offset: Offset, blob: &Bytes) -> Result<Self> {
        let bad = |what: &str| Error::Codec {
            context: "checkpoint",
            message: format!("checkpoint at offset {offset}: {what}"),
        };
        if blob.get(..4) != Some(&CHECKPOINT_MAGIC[..]) {
            return Err(bad("bad magic"));
        }
        let mut pos: usize = 4;
        let mut take = |n: usize| -> Result<Bytes> {
            // A damaged length can be anything: checked, so that it is damage on every
            // target, never an overflow.
            let end = pos.checked_add(n).filter(|&end| end <= blob.len());
            let Some(end) = end else {
                return Err(bad("truncated"));
            };
            let part = blob.slice(pos..end);
            pos = end;
            Ok(part)
        };
        let count = u64::from_le_bytes(take(8)?[..].try_into().map_err(|_| bad("count"))?);
        // Each entry is at least 8 bytes: a count larger than that is damage.
        if count > (blob.len() as u64) / 8 {
            return Err(bad("count larger than the blob"));
        }
        let mut states = HashMap::with_capacity_and_hasher(count as usize, Default::default());
        for _ in 0..count {
            let len = u32::from_le_bytes(take(4)?[..].try_into().map_err(|_| bad("len"))?);
            let key = take(len as usize)?;
            let len = u32::from_le_bytes(take(4)?[..].try_into().map_err(|_| bad("len"))?);
            let state = take(len as usize)?;
            // Written from a map: a key twice is damage, not a state to pick from.
            if states.insert(key, state).is_some() {
                return Err(bad("a key twice"));
            }
        }
        if pos != blob.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Checkpoint { offset, states })
    }
}

/// The state of one key and the offset of the last record folded into it.
pub(crate) struct Slot<S> {
    pub(crate) state: S,
    /// One past the last offset folded into `state`.
    pub(crate) folded_until: Offset,
}

/// What handling one request came to.
pub(crate) enum Outcome<R> {
    Answered(R),
    /// The request could not be decoded: the state is unchanged.
    Refused(Error),
    Panicked(String),
    /// Under a journal-only replay, a call of the handler found no journaled answer or
    /// one journaled under another name: the state and the response cannot be trusted,
    /// whatever the handler made of the error its call returned.
    Diverged(Error),
}

/// Runs the handler on one request. `state` may be half-changed after `Panicked`.
pub(crate) struct Request<'a> {
    pub(crate) offset: Offset,
    pub(crate) timestamp: crate::record::Timestamp,
    pub(crate) key: &'a [u8],
    /// The encoded request (the payload after its tag byte).
    pub(crate) body: &'a [u8],
}

pub(crate) fn apply<H: Handler>(
    handler: &H,
    effects: &Effects,
    instance: InstanceId,
    fenced: Option<&std::sync::atomic::AtomicBool>,
    replaying: bool,
    request: Request<'_>,
    state: &mut H::State,
) -> Outcome<H::Response> {
    let Request {
        offset,
        timestamp,
        key,
        body,
    } = request;
    let request: H::Request = match decode_request(offset, key, body) {
        Ok(r) => r,
        Err(e) => return Outcome::Refused(e),
    };
    let mut ctx = Context {
        offset,
        timestamp,
        instance,
        replaying,
        calls: 0,
        effects,
        fenced,
        diverged: None,
    };
    let _running = super::reentry::enter(
        super::reentry::cluster_of(handler),
        Some(instance),
        Some(offset),
    );
    match catch_unwind(AssertUnwindSafe(|| {
        handler.handle(&mut ctx, key, state, request)
    })) {
        Ok(response) => match ctx.diverged {
            Some((offset, detail)) => Outcome::Diverged(Error::Nondeterministic { offset, detail }),
            None => Outcome::Answered(response),
        },
        Err(panic) => Outcome::Panicked(panic_message(panic.as_ref())),
    }
}

/// Decodes the request at `offset`; an error names the offset and the key, and the
/// usual cause.
pub(crate) fn decode_request<R: serde::de::DeserializeOwned>(
    offset: Offset,
    key: &[u8],
    body: &[u8],
) -> Result<R> {
    CODEC.decode(body).map_err(|e| Error::Codec {
        context: "request",
        message: format!(
            "the request at offset {offset} (key {:?}) cannot be decoded as the handler's \
             Request: {e} (a Request type changed since it was logged, or serde attributes \
             that bincode cannot read back, such as skip_serializing_if; see Bincode)",
            String::from_utf8_lossy(key)
        ),
    })
}

/// Decodes a key's state from a checkpoint, or the default state.
pub(crate) fn checkpoint_state<S>(checkpoint: &Checkpoint, key: &[u8]) -> Result<S>
where
    S: Default + serde::de::DeserializeOwned,
{
    match checkpoint.states.get(key) {
        Some(bytes) => CODEC.decode(bytes).map_err(|e| Error::Codec {
            context: "checkpoint state",
            message: format!(
                "the checkpoint at offset {} holds a state of key {:?} that cannot be decoded \
                 as the handler's State: {e} (did the State type change since the \
                 checkpoint was taken? then open once with \
                 ClusterBuilder::rebuild_from_log(true))",
                checkpoint.offset,
                String::from_utf8_lossy(key)
            ),
        }),
        None => Ok(S::default()),
    }
}

/// What a fold does with the requests it applies and the panics it meets.
pub(crate) trait FoldSink<R> {
    /// The request at `offset` was handled (or refused) during the fold.
    fn handled(&mut self, offset: Offset, outcome: std::result::Result<R, Error>);
    /// The handler panicked on the request at `offset`: mark it so no fold applies it.
    fn poison(&mut self, offset: Offset, message: String) -> Result<()>;
    /// The request at `offset` does not decode, and is refused: set it aside (marked) as
    /// the live loop does, so that no later fold meets it unmarked (before a checkpoint,
    /// an unmarked one means a changed `Request` type: see `Replay::handled_before`),
    /// then answer `error`.
    fn refused(&mut self, offset: Offset, error: Error);
}

/// Where a fold reads from and what it runs.
pub(crate) struct Replay<'a, H> {
    pub(crate) handler: &'a H,
    pub(crate) effects: &'a Effects,
    pub(crate) instance: InstanceId,
    /// The instance's fence, for a rebuild on an instance (none for a debugging replay).
    pub(crate) fenced: Option<&'a std::sync::atomic::AtomicBool>,
    pub(crate) input: &'a dyn Store,
    /// The requests before this offset were handled by the live service (a checkpoint
    /// covers them): each was applied, or set aside with a mark. One of them that does
    /// not decode, and is not set aside, means the `Request` type changed since: the
    /// fold fails on it rather than skip it as refused, which would drop its effect from
    /// the state without a word. (After it, an undecodable request may be one its
    /// instance had not refused yet when the process stopped: refused, as live.)
    pub(crate) handled_before: Offset,
}

/// Rebuilds the states of `limits`' keys: each key from the checkpoint, then every
/// request of that key in the log from the checkpoint up to (not including) its limit,
/// skipping poisoned offsets. A key in `relayed` starts instead from the state given
/// there (encoded), which folds every request of the key before the offset given with
/// it. A panic poisons its request and starts the fold again.
///
/// `unit(offset)` is called before each request is applied, and what it returns is held
/// until the request is done: an instance marks a unit of work on its heartbeat there,
/// so that a request that hangs in a replay is seen to stall like a live one. A fold on
/// an instance that is fenced meanwhile stops before its next request with
/// [`Error::Fenced`]: its states would be thrown away, and it must apply nothing more.
pub(crate) fn rebuild<H: Handler, U>(
    replay: Replay<'_, H>,
    checkpoint: &Checkpoint,
    relayed: &HashMap<Bytes, (Offset, Bytes), ahash::RandomState>,
    poisoned: &mut BTreeSet<Offset>,
    limits: &HashMap<Bytes, Offset, ahash::RandomState>,
    sink: &mut dyn FoldSink<H::Response>,
    mut unit: impl FnMut(Offset) -> U,
) -> Result<HashMap<Bytes, Slot<H::State>, ahash::RandomState>> {
    let Replay {
        handler,
        effects,
        instance,
        fenced,
        input,
        handled_before,
    } = replay;
    // Requests refused (undecodable) by this fold: set aside by the sink.
    let mut refused: BTreeSet<Offset> = BTreeSet::new();
    loop {
        let mut states: HashMap<Bytes, Slot<H::State>, ahash::RandomState> =
            HashMap::with_capacity_and_hasher(limits.len(), Default::default());
        // While folding, a slot's `folded_until` is where its fold starts.
        let mut start = checkpoint.offset;
        for key in limits.keys() {
            let (from, state) = match relayed.get(key) {
                Some((from, encoded)) => (*from, CODEC.decode(encoded)?),
                None => (checkpoint.offset, checkpoint_state(checkpoint, key)?),
            };
            start = start.min(from);
            states.insert(
                key.clone(),
                Slot {
                    state,
                    folded_until: from,
                },
            );
        }
        let until = limits.values().copied().max().unwrap_or(checkpoint.offset);
        // The first thing that stops the fold: damage, or a panic (which is marked and
        // the fold started again without it). The replay itself runs to its end.
        let mut stop: Option<std::result::Result<(Offset, String), Error>> = None;
        if until > start {
            let mut fold_one = |offset: Offset, entry: Entry<'_>| {
                if stop.is_some() || offset >= until {
                    return;
                }
                let body = match envelope_of(offset, entry.payload) {
                    Ok(Envelope::Request(body)) => body,
                    Ok(Envelope::Control(_)) => return,
                    Err(e) => {
                        stop = Some(Err(e));
                        return;
                    }
                };
                let Some(&limit) = limits.get(entry.key) else {
                    return;
                };
                if offset >= limit || poisoned.contains(&offset) || refused.contains(&offset) {
                    return;
                }
                let Some(slot) = states.get_mut(entry.key) else {
                    return;
                };
                if offset < slot.folded_until {
                    return;
                }
                if fenced.is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst)) {
                    stop = Some(Err(Error::Fenced { instance }));
                    return;
                }
                let _unit = unit(offset);
                let request = Request {
                    offset,
                    timestamp: entry.timestamp,
                    key: entry.key,
                    body,
                };
                match apply(
                    handler,
                    effects,
                    instance,
                    fenced,
                    true,
                    request,
                    &mut slot.state,
                ) {
                    Outcome::Answered(r) => sink.handled(offset, Ok(r)),
                    // Undecodable: refused, as the live instance refused it (and set
                    // it aside, unless the process stopped first). A changed `Request`
                    // type is refused at open instead (see `Shared::open`).
                    Outcome::Refused(e) if offset < handled_before => stop = Some(Err(e)),
                    Outcome::Refused(e) => {
                        // A fold started again (after a panic) passes it by.
                        refused.insert(offset);
                        sink.refused(offset, e);
                    }
                    Outcome::Panicked(message) => stop = Some(Ok((offset, message))),
                    Outcome::Diverged(e) => stop = Some(Err(e)),
                }
            };
            // Requests queued before they were durable are not visible before then (see
            // `Store::append_deferred`): the fold waits for those it must see.
            input.wait_appended(until)?;
            input.replay_range(start, until, &mut fold_one)?;
        }
        match stop {
            Some(Err(e)) => return Err(e),
            Some(Ok((offset, message))) => {
                poisoned.insert(offset);
                sink.poison(offset, message)?;
                continue;
            }
            None => {}
        }
        for (key, slot) in states.iter_mut() {
            slot.folded_until = limits.get(key).copied().unwrap_or(checkpoint.offset);
        }
        return Ok(states);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_rejects_damage() {
        let mut cp = Checkpoint::empty(42);
        cp.states.insert(
            Bytes::from_static(b"alice"),
            Bytes::from_static(b"\x01\x02"),
        );
        cp.states.insert(Bytes::from_static(b""), Bytes::new());
        let blob = Bytes::from(cp.encode());
        let back = Checkpoint::decode(42, &blob).unwrap();
        assert_eq!(back.states, cp.states);
        for cut in 0..blob.len() {
            assert!(
                Checkpoint::decode(42, &blob.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
        let mut huge = blob.to_vec();
        huge[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Checkpoint::decode(42, &Bytes::from(huge)).is_err());
        // The same key twice (two entries of one key, the count raised to match).
        let mut one = Checkpoint::empty(42);
        one.states
            .insert(Bytes::from_static(b"k"), Bytes::from_static(b"1"));
        let single = one.encode();
        let entry = &single[12..];
        let mut twice = single[..4].to_vec();
        twice.extend_from_slice(&2u64.to_le_bytes());
        twice.extend_from_slice(entry);
        twice.extend_from_slice(entry);
        let err = Checkpoint::decode(42, &Bytes::from(twice)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("a key twice")));
        // A length that would overflow a position is damage, on any target.
        let mut long = single[..12].to_vec();
        long.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Checkpoint::decode(42, &Bytes::from(long)).is_err());
    }

    #[test]
    fn requests_with_ids_read_as_requests_and_give_their_ids() {
        let id = RequestId(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        let with = Scratch::request_with_id(&5u64, id).unwrap();
        let without = Scratch::request(&5u64).unwrap();
        assert_eq!(request_id(with.as_slice()), Some(id));
        assert_eq!(request_id(without.as_slice()), None);
        assert_eq!(
            request_body(with.as_slice()),
            request_body(without.as_slice())
        );
        match envelope_of(3, with.as_slice()).unwrap() {
            Envelope::Request(body) => assert_eq!(Some(body), request_body(without.as_slice())),
            Envelope::Control(_) => panic!("a request read as a control record"),
        }
        // Cut inside its id: a typed error, no id, no body.
        let cut = &with.as_slice()[..10];
        assert!(envelope_of(3, cut).is_err());
        assert_eq!(request_id(cut), None);
        assert_eq!(request_body(cut), None);
    }

    #[test]
    fn envelopes_round_trip() {
        let payload = control_payload(&Control::Poison { offset: 9 }).unwrap();
        let record = Record {
            offset: 1,
            timestamp: 0,
            key: Bytes::new(),
            payload: Bytes::from(payload),
        };
        assert!(matches!(
            envelope(&record).unwrap(),
            Envelope::Control(Control::Poison { offset: 9 })
        ));
        let record = Record {
            payload: Bytes::from_static(&[7, 1]),
            ..record
        };
        assert!(envelope(&record).is_err());
    }
}
