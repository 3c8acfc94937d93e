//! Handlers: the one trait a service author implements.
//!
//! A [`Handler`] owns no state of its own: cauce keeps one `State` per key, hands the
//! handler that key's state with each request, and stores the request in the log before
//! the handler sees it. Because the state of a key is the fold of its requests in log
//! order, a handler must be deterministic: the same requests in the same order give the
//! same state and the same responses. Anything that talks to the outside world (a clock, a
//! network call, a random number) goes through [`Context::call`], which journals the
//! answer so that a replay gets the recorded answer instead of calling again.
//!
//! ```
//! use cauce::cluster::{Context, Handler};
//!
//! /// A per-user counter.
//! struct Counter;
//!
//! impl Handler for Counter {
//!     type State = u64;
//!     type Request = u64;
//!     type Response = u64;
//!
//!     fn handle(&self, _ctx: &mut Context<'_>, _key: &[u8], total: &mut u64, add: u64) -> u64 {
//!         *total += add;
//!         *total
//!     }
//! }
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{Bincode, Codec};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Timestamp};
use crate::router::InstanceId;
use crate::store::{Store, read_from_start};

/// The code of a keyed service: per-key state, a request in, a response out.
///
/// # Contract
/// - `handle` is deterministic given `state`, `request` and the answers of
///   [`Context::call`]: cauce rebuilds states by re-running it over the log.
/// - A panic in `handle` is caught: the request is marked in the log (durably, whatever
///   the sync policy) so that no replay applies it again, then answered with
///   [`Error::HandlerPanicked`], and the instance's keys are rebuilt from the last
///   checkpoint and the log, so the half-done change of the panicking call is not kept.
///   The panic still goes through the process's panic hook first (by default a message,
///   and a backtrace under `RUST_BACKTRACE`, on stderr, naming the thread
///   `cauce-instance-N`): set a hook of your own (`std::panic::set_hook`) to log it
///   otherwise.
/// - `handle` runs more than once for one request: at every rebuild that replays it
///   (after a restart, a panic of another request, a move), and twice at once when an
///   instance is declared stalled while the request is still running (the stalled run's
///   result is thrown away). Anything it does besides changing `state` and calling
///   [`Context::call`] (logging, metrics, writes elsewhere) happens again each time.
/// - `handle` runs on its instance's thread, one request at a time: while it runs (or
///   waits on an outside call), the other keys of its instance wait, until the stall
///   timeout declares the instance stalled.
/// - `handle` must not call its own cluster: a submit or query of the cluster running
///   it is refused with [`Error::InsideHandler`] (waiting there could wait for its own
///   instance, and a replay would submit again). A request that needs another key
///   changed (a transfer) is answered first, and its caller submits the follow-up;
///   another service, even another cluster, is called through [`Context::call`].
///
/// # Changing the types
/// Requests are kept in the log, and states in checkpoints, encoded with bincode
/// ([`Bincode`]), which is not self-describing: what was written must still decode as
/// the types the handler has when it reads it back.
/// - `Request`: add enum variants at the end only; never reorder, remove or change one
///   (a reordered enum decodes old requests as other variants, without an error). Avoid
///   serde attributes bincode cannot read back (`skip_serializing_if`, `flatten`,
///   `untagged`): such a request is logged, then refused as undecodable (and set aside,
///   so that no rebuild meets it again). A `Request` changed so that the logged requests
///   after the last checkpoint no longer decode is refused at open ([`Error::Codec`],
///   naming the first such request; the build decodes a few before it starts anything).
///   This check sees only requests logged after the last checkpoint: after a clean
///   [`shutdown`](crate::cluster::Cluster::shutdown), which checkpoints, there are none,
///   and a changed `Request` opens without a word, the log then holding both encodings.
///   The requests before that checkpoint were all handled: a fold that meets one of them
///   that does not decode (and was not set aside) fails on it, naming it, rather than
///   leave it out of the state: a
///   [`rebuild_from_log`](crate::cluster::ClusterBuilder::rebuild_from_log) open fails
///   (and keeps the checkpoint), and [`Replay`](crate::cluster::Replay) of a state
///   before the checkpoint fails with [`Error::Codec`]. (One after the checkpoint that
///   does not decode is refused, as live: its instance may not have refused it yet when
///   the process stopped.) Test a change against a copy of a real log first.
/// - `State`: a `State` changed so that the last checkpoint's states no longer decode
///   is refused at open ([`Error::Codec`], naming a key and the checkpoint; the build
///   decodes a few states before it starts anything). Open once with
///   [`ClusterBuilder::rebuild_from_log`](crate::cluster::ClusterBuilder::rebuild_from_log)
///   to fold the whole log into the new type, while the log still starts at offset 0.
/// - Neither check sees a change under which the old bytes still decode as something
///   else: two fields of one type swapped, a `u64` become `(u32, u32)`. Such data is
///   read as the new type says, without an error.
pub trait Handler: Send + Sync + 'static {
    /// The state of one key. A key's first request sees `State::default()`.
    type State: Default + Serialize + DeserializeOwned + Send + 'static;
    /// A request, stored in the log (hence serde).
    type Request: Serialize + DeserializeOwned + Send + 'static;
    /// A response, handed back to the submitter in memory.
    type Response: Send + 'static;

    /// Handles `request` for `key`, changing `state`.
    fn handle(
        &self,
        ctx: &mut Context<'_>,
        key: &[u8],
        state: &mut Self::State,
        request: Self::Request,
    ) -> Self::Response;
}

/// Names one outside call: the request's offset and the call's position within the
/// handling of that request. Pass it to the outside world as an idempotency key: after a
/// crash or a stall, a call whose answer was not yet journaled may be made again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EffectId {
    /// Offset of the request being handled.
    pub offset: Offset,
    /// 0 for the first call made while handling it, 1 for the second, ...
    pub index: u32,
}

/// What a handler may use besides its state: where the request stands in the log, which
/// instance runs it, and a journaled way to call out.
pub struct Context<'a> {
    pub(crate) offset: Offset,
    pub(crate) timestamp: Timestamp,
    pub(crate) instance: InstanceId,
    pub(crate) replaying: bool,
    pub(crate) calls: u32,
    pub(crate) effects: &'a Effects,
    /// Set once the running instance was declared stalled and replaced.
    pub(crate) fenced: Option<&'a std::sync::atomic::AtomicBool>,
    /// Under a journal-only replay, the first call that diverged from the journal: the
    /// replay fails with it whatever the handler made of the error it got.
    pub(crate) diverged: Option<(Offset, String)>,
}

impl Context<'_> {
    /// The offset of the request in the input log.
    pub fn offset(&self) -> Offset {
        self.offset
    }

    /// The request's timestamp (milliseconds since the Unix epoch), as logged: use it
    /// instead of the clock, so replays see the same time.
    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    /// The instance running the handler (`InstanceId(u32::MAX)` under a debugging
    /// [`Replay`](crate::cluster::Replay), which runs on no instance).
    pub fn instance(&self) -> InstanceId {
        self.instance
    }

    /// True while cauce rebuilds state by replaying the log (after a restart, a crash, a
    /// stall or a move), false for a live request.
    pub fn is_replay(&self) -> bool {
        self.replaying
    }

    /// Calls the outside world through the journal.
    ///
    /// The first time a request is handled, `call` runs `f` and journals its answer
    /// (encoded with bincode) under this request's offset and the call's index; when the
    /// request is handled again (a replay), it returns the journaled answer and does not run
    /// `f`. A replay whose calls differ in name from the journal is
    /// [`Error::Nondeterministic`]; so is a call without a journaled answer under a
    /// debugging [`Replay`](crate::cluster::Replay), which never calls out.
    ///
    /// Whatever the stores' sync policy, a call is bracketed by two syncs (each one
    /// `fdatasync` at most, shared with concurrent appends; under
    /// [`SyncPolicy::Always`](crate::store::SyncPolicy::Always) both find their records
    /// durable already):
    /// - before `f` runs, the request is made durable in the input log, so a call is only
    ///   ever made for a request that a restart will find (else a crash could lose the
    ///   request but keep the journaled answer, and hand it to the next request given the
    ///   same offset); an error of that sync is returned, and `f` is not run;
    /// - before `call` returns, the answer is durable in the journal, so no response is
    ///   ever given from an answer that a replay after a crash would not find. A crash
    ///   between the two makes the call again on replay, with the same [`EffectId`].
    ///
    /// One answer per call: if the same call was answered and journaled meanwhile (by
    /// the instance that took over a stalled one's request, say), `call` returns that
    /// first answer instead of `f`'s, so every handling and every replay of the request
    /// sees the same one. An instance that was declared stalled and replaced makes no
    /// further call without a journaled answer: [`Error::Fenced`]. But `f` itself can
    /// run twice: an instance declared stalled while inside `f` is not stopped there, and
    /// its replacement, finding no answer yet, runs `f` again (so do crashes, as above).
    /// Calls are made at least once and answered once: give the outside world the
    /// [`EffectId`] `f` is passed as an idempotency key where it takes one.
    ///
    /// Refused before `f` runs: a `name` over 65,535 bytes ([`Error::InvalidName`]). An
    /// answer that cannot be encoded is a [`Error::Codec`] after `f` ran: that call is
    /// not journaled, so a replay makes it again.
    ///
    /// Whatever `f` returns is the answer, for good: a `Result` answer whose `Err` says
    /// "timed out, try later" is journaled like any other, and every replay sees it. Retry
    /// inside `f` what should be retried. `f` runs on the instance's own thread, a plain
    /// thread outside any async runtime: an async call can be driven to its end there
    /// (`tokio::runtime::Handle::block_on`, say), holding up only this instance.
    pub fn call<T, F>(&mut self, name: &str, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(EffectId) -> T,
    {
        let id = EffectId {
            offset: self.offset,
            index: self.calls,
        };
        self.calls += 1;
        effect_name_len(name)?;
        let answered = self.journaled_or_make(id, name, f);
        if let Err(Error::Nondeterministic { offset, detail }) = &answered
            && self.effects.journal_only
            && self.diverged.is_none()
        {
            self.diverged = Some((*offset, detail.clone()));
        }
        answered
    }

    /// The journaled answer of call `id`, or `f`'s, journaled (see [`call`](Self::call)).
    fn journaled_or_make<T, F>(&mut self, id: EffectId, name: &str, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(EffectId) -> T,
    {
        if let Some((recorded, answer)) = self.effects.lookup(id) {
            return journaled_answer(id, name, &recorded, &answer, "replayed");
        }
        if self.effects.journal_only {
            return Err(Error::Nondeterministic {
                offset: id.offset,
                detail: format!(
                    "call {} ({name:?}) has no journaled answer, and this replay does not call \
                     out: the call never returned when it was made (the request panicked or \
                     stalled inside it: see `Replay::panicked`), or the journal is missing, or \
                     the answer was not journaled yet when the replay opened",
                    id.index
                ),
            });
        }
        if self
            .fenced
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(Error::Fenced {
                instance: self.instance,
            });
        }
        self.effects.before_call(id.offset)?;
        let answer = f(id);
        let bytes = Bincode.encode(&answer)?;
        match self.effects.record(id, name, &bytes)? {
            None => Ok(answer),
            Some((recorded, earlier)) => journaled_answer(id, name, &recorded, &earlier, "made"),
        }
    }
}

/// The journaled `answer` of call `id`, if it was journaled under the `name` it is now
/// `made` (or replayed) as.
fn journaled_answer<T: DeserializeOwned>(
    id: EffectId,
    name: &str,
    recorded: &str,
    answer: &[u8],
    now: &str,
) -> Result<T> {
    if recorded != name {
        return Err(Error::Nondeterministic {
            offset: id.offset,
            detail: format!(
                "call {} was journaled as {recorded:?} but {now} as {name:?}",
                id.index
            ),
        });
    }
    Bincode.decode(answer)
}

/// The journal of outside calls: a second store holding `(offset, index) → (name,
/// answer)`, with an index in memory of the entries a rebuild may still need.
pub(crate) struct Effects {
    store: Option<Arc<dyn Store>>,
    /// The input log, synced before a live call when there is a journal (see
    /// [`Context::call`]).
    input: Option<Arc<dyn Store>>,
    /// The entries a rebuild may still need, and the calls whose first answer is being
    /// journaled right now.
    index: Mutex<HashMap<EffectId, Journaled>>,
    /// Signalled when an entry stops being [`Journaled::Writing`].
    written: Condvar,
    /// Never call out: a call without a journaled answer is an error (debug replays).
    journal_only: bool,
}

/// A call as the journal's index knows it.
enum Journaled {
    /// Its first answer is being journaled: whoever else needs it waits.
    Writing,
    /// Its first journaled answer, and the call's name.
    Answer(Arc<str>, Bytes),
}

fn effect_key(id: EffectId) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&id.offset.to_be_bytes());
    key[8..].copy_from_slice(&id.index.to_be_bytes());
    key
}

impl Effects {
    /// A journal in `store` for the requests of `input`, loading the entries at or after
    /// `from`.
    ///
    /// An entry for an offset past the end of `input` is refused: a call is made only
    /// once its request is durable in `input`, so such an entry means the two stores do
    /// not belong together (or `input` lost records it had synced). Used, it would hand
    /// its answer to whichever new request gets that offset.
    pub(crate) fn open(
        store: Option<Arc<dyn Store>>,
        input: Option<Arc<dyn Store>>,
        from: Offset,
    ) -> Result<Effects> {
        let effects = Effects {
            store,
            input,
            index: Mutex::new(HashMap::new()),
            written: Condvar::new(),
            journal_only: false,
        };
        if let Some(store) = &effects.store {
            let end = effects.input.as_ref().map(|i| i.next_offset());
            let mut index = effects.index.lock();
            for record in read_from_start(store)?.1 {
                let record = record?;
                let (id, name, answer) =
                    decode_effect(&record.key, &record.payload).ok_or_else(|| Error::Codec {
                        context: "effect journal entry",
                        message: format!("malformed entry at offset {}", record.offset),
                    })?;
                if let Some(end) = end.filter(|&end| id.offset >= end) {
                    return Err(Error::Config(format!(
                        "the journal of outside calls holds an answer (entry {}) for the \
                         request at offset {}, but the input log ends at offset {end}: the \
                         journal belongs to another input log, or the input log lost \
                         records it had synced",
                        record.offset, id.offset
                    )));
                }
                if id.offset >= from {
                    // The first entry of a call is its answer (a later one can only be
                    // from an older journal that let a late call append its own).
                    index
                        .entry(id)
                        .or_insert_with(|| Journaled::Answer(name.into(), answer));
                }
            }
        }
        Ok(effects)
    }

    /// Makes the request at `offset` durable in the input log before a live call, when
    /// the call's answer is journaled.
    fn before_call(&self, offset: Offset) -> Result<()> {
        match (&self.store, &self.input) {
            (Some(_), Some(input)) => input.sync_until(offset + 1),
            _ => Ok(()),
        }
    }

    /// The journaled answer of `id`, waiting for it if it is being journaled.
    fn lookup(&self, id: EffectId) -> Option<(Arc<str>, Bytes)> {
        let mut index = self.index.lock();
        loop {
            match index.get(&id) {
                None => return None,
                Some(Journaled::Answer(name, answer)) => {
                    return Some((name.clone(), answer.clone()));
                }
                Some(Journaled::Writing) => self.written.wait(&mut index),
            }
        }
    }

    /// Journals `answer` as the answer of `id`, unless the call already has one: then
    /// that earlier answer is returned, for the caller to use instead of its own.
    fn record(&self, id: EffectId, name: &str, answer: &[u8]) -> Result<Option<(Arc<str>, Bytes)>> {
        {
            let mut index = self.index.lock();
            loop {
                match index.get(&id) {
                    Some(Journaled::Answer(name, earlier)) => {
                        return Ok(Some((name.clone(), earlier.clone())));
                    }
                    Some(Journaled::Writing) => self.written.wait(&mut index),
                    None => {
                        index.insert(id, Journaled::Writing);
                        break;
                    }
                }
            }
        }
        let written = self.append(id, name, answer);
        let mut index = self.index.lock();
        match &written {
            Ok(()) => {
                let answer = Journaled::Answer(name.into(), Bytes::copy_from_slice(answer));
                index.insert(id, answer);
            }
            Err(_) => {
                index.remove(&id);
            }
        }
        drop(index);
        self.written.notify_all();
        written.map(|()| None)
    }

    /// Appends the entry of `id` to the journal store, durably.
    fn append(&self, id: EffectId, name: &str, answer: &[u8]) -> Result<()> {
        if let Some(store) = &self.store {
            let mut payload = Vec::with_capacity(2 + name.len() + answer.len());
            let name_len = effect_name_len(name)?;
            payload.extend_from_slice(&name_len.to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(answer);
            let appended = store.append(&[Entry::new(&effect_key(id), &payload)])?;
            // Durable before the handler goes on: no response is ever given from an
            // answer that a replay after a crash would not find.
            store.sync_until(appended.end)?;
        }
        Ok(())
    }

    /// The journal of `store` for a replay that must not call out: every entry is
    /// loaded, nothing is appended, and a call without an answer is an error.
    pub(crate) fn journal_only(store: Option<Arc<dyn Store>>) -> Result<Effects> {
        let mut effects = Effects::open(store, None, 0)?;
        effects.store = None;
        effects.journal_only = true;
        Ok(effects)
    }

    /// The position in `store` of the first journal entry for a request at or after
    /// `offset`: every entry before it is for an earlier request (entries are appended
    /// when calls are made, so they are only roughly in request order).
    pub(crate) fn first_entry_at_or_after(store: &dyn Store, offset: Offset) -> Result<Offset> {
        for record in read_from_start(store)?.1 {
            let record = record?;
            match decode_effect(&record.key, &record.payload) {
                Some((id, _, _)) if id.offset >= offset => return Ok(record.offset),
                Some(_) => {}
                None => {
                    return Err(Error::Codec {
                        context: "effect journal entry",
                        message: format!("malformed entry at offset {}", record.offset),
                    });
                }
            }
        }
        Ok(store.next_offset())
    }

    /// Forgets index entries for requests before `offset` (a checkpoint covers them).
    pub(crate) fn forget_before(&self, offset: Offset) {
        self.index
            .lock()
            .retain(|id, j| id.offset >= offset || matches!(j, Journaled::Writing));
    }
}

/// The length of an effect's name as the journal stores it (two bytes).
fn effect_name_len(name: &str) -> Result<u16> {
    u16::try_from(name.len()).map_err(|_| Error::InvalidName {
        name: name.chars().take(64).collect(),
        reason: "effect names are at most 65535 bytes",
    })
}

fn decode_effect(key: &[u8], payload: &[u8]) -> Option<(EffectId, String, Bytes)> {
    let offset = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    let index = u32::from_be_bytes(key.get(8..12)?.try_into().ok()?);
    let name_len = u16::from_be_bytes(payload.get(..2)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(payload.get(2..2 + name_len)?).ok()?;
    let answer = Bytes::copy_from_slice(payload.get(2 + name_len..)?);
    Some((EffectId { offset, index }, name.to_string(), answer))
}
