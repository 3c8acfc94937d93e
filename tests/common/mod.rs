//! A test service whose state remembers the order of its requests, and a model of it.
#![allow(dead_code)]

#[path = "../support/forward.rs"]
mod forward;

use std::collections::HashMap;
use std::time::Duration;

use cauce::cluster::{Context, Handler};
use cauce::store::Store;
use serde::{Deserialize, Serialize};

/// Requests of the test service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Req {
    /// Adds a value; answers the new sum.
    Add(u64),
    /// Answers the whole state.
    Get,
    /// Panics (after changing the state, to prove the change is not kept).
    Panic,
    /// Sleeps this long when live (not on replay), then adds 1.
    Stall(u64),
    /// Asks the outside world for a number through the journal and adds it.
    External,
}

/// The state: a sum, a count, and a hash chain that depends on the order of requests.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct Tally {
    pub sum: u64,
    pub count: u64,
    pub chain: u64,
}

impl Tally {
    pub fn add(&mut self, v: u64) -> u64 {
        self.sum = self.sum.wrapping_add(v);
        self.count += 1;
        self.chain = self
            .chain
            .wrapping_mul(0x100000001b3)
            .wrapping_add(v ^ 0x9e37);
        self.sum
    }
}

/// Responses of the test service.
#[derive(Clone, Debug, PartialEq)]
pub enum Resp {
    Sum(u64),
    State(Tally),
}

/// The test service.
#[derive(Default)]
pub struct Service {
    /// Counts how many times `External` really called out.
    pub calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Handler for Service {
    type State = Tally;
    type Request = Req;
    type Response = Resp;

    fn handle(&self, ctx: &mut Context<'_>, _key: &[u8], state: &mut Tally, req: Req) -> Resp {
        match req {
            Req::Add(v) => Resp::Sum(state.add(v)),
            Req::Get => Resp::State(*state),
            Req::Panic => {
                state.add(1_000_000);
                panic!("asked to panic at offset {}", ctx.offset());
            }
            Req::Stall(ms) => {
                if !ctx.is_replay() {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                Resp::Sum(state.add(1))
            }
            Req::External => {
                let calls = self.calls.clone();
                let v: u64 = ctx
                    .call("dice", move |id| {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        // Not a function of the request: only the journal makes replays agree.
                        (id.offset * 7 + std::process::id() as u64) % 97
                    })
                    .expect("journal");
                Resp::Sum(state.add(v))
            }
        }
    }
}

/// The cluster's control records in the input log, as the crate encodes them (a tag
/// byte of 1, then the record through bincode): only the set-aside mark matters here.
#[derive(Deserialize)]
enum Control {
    Join {
        _id: u32,
        _weight: u32,
    },
    Leave {
        _id: u32,
    },
    Stalled {
        _id: u32,
    },
    /// The request at `offset` was set aside (its handler panicked, or stalled twice).
    Poison {
        offset: u64,
    },
}

/// The requests the log marks as set aside.
pub fn set_aside(input: &dyn Store) -> std::collections::HashSet<u64> {
    input
        .read_from(input.start_offset())
        .unwrap()
        .map(|r| r.unwrap())
        .filter(|r| r.payload.first() == Some(&1))
        .filter_map(|r| match bincode::deserialize(&r.payload[1..]).unwrap() {
            Control::Poison { offset } => Some(offset),
            _ => None,
        })
        .collect()
}

/// Folds the input log in order, as a single thread would: the state of every key, and
/// the answer to every request (None for requests the service refuses or panics on, and
/// for those the log marks as set aside).
pub fn model(
    input: &dyn Store,
    journal: &HashMap<u64, u64>,
) -> (HashMap<Vec<u8>, Tally>, HashMap<u64, Option<Resp>>) {
    let folded = fold(input, journal);
    (folded.states, folded.answers)
}

/// What [`fold`] gives.
pub struct Folded {
    /// Every key's final state.
    pub states: HashMap<Vec<u8>, Tally>,
    /// The answer to every request (see [`model`]).
    pub answers: HashMap<u64, Option<Resp>>,
    /// Every key's states in log order: the offset of each request that changed it, and
    /// the state after it.
    pub histories: HashMap<Vec<u8>, Vec<(u64, Tally)>>,
}

/// [`model`], with every key's history.
pub fn fold(input: &dyn Store, journal: &HashMap<u64, u64>) -> Folded {
    let aside = set_aside(input);
    let mut states: HashMap<Vec<u8>, Tally> = HashMap::new();
    let mut answers = HashMap::new();
    let mut histories: HashMap<Vec<u8>, Vec<(u64, Tally)>> = HashMap::new();
    for r in input.read_from(input.start_offset()).unwrap() {
        let r = r.unwrap();
        let Some(body) = request_body(&r.payload) else {
            continue;
        };
        let req: Req = bincode::deserialize(body).unwrap();
        let state = states.entry(r.key.to_vec()).or_default();
        let answer = match req {
            _ if aside.contains(&r.offset) => None,
            Req::Add(v) => Some(Resp::Sum(state.add(v))),
            Req::Get => Some(Resp::State(*state)),
            Req::Panic => None,
            Req::Stall(_) => Some(Resp::Sum(state.add(1))),
            Req::External => Some(Resp::Sum(state.add(journal[&r.offset]))),
        };
        histories
            .entry(r.key.to_vec())
            .or_default()
            .push((r.offset, *state));
        answers.insert(r.offset, answer);
    }
    Folded {
        states,
        answers,
        histories,
    }
}

/// Checks the answer of a query of `key` made at offset `at` (its `Pending::offset`):
/// the key's state before `at`, or, when the instance that held the key was lost before
/// running the query, a later state of the key. Returns whether it was the state before
/// `at` exactly.
pub fn assert_query_answer(
    context: &str,
    histories: &HashMap<Vec<u8>, Vec<(u64, Tally)>>,
    key: &[u8],
    at: u64,
    got: &Tally,
) -> bool {
    let empty = Vec::new();
    let history = histories.get(key).unwrap_or(&empty);
    // The states the query may see: the one before `at`, then every later one.
    let first = history.partition_point(|(o, _)| *o < at);
    let before = first
        .checked_sub(1)
        .map_or(Tally::default(), |i| history[i].1);
    if *got == before {
        return true;
    }
    assert!(
        history[first..].iter().any(|(_, t)| t == got),
        "{context}: a query of {} at offset {at} saw {got:?}, which is no state of the key \
         from that offset on (the state before it: {before:?})",
        String::from_utf8_lossy(key)
    );
    false
}

/// The journal's entries in journal order: (request offset, answer), for handlers whose
/// calls answer a `u64`.
pub fn journal_entries(effects: &dyn Store) -> Vec<(u64, u64)> {
    effects
        .read_from(effects.start_offset())
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            let offset = u64::from_be_bytes(r.key[..8].try_into().unwrap());
            let name_len = u16::from_be_bytes(r.payload[..2].try_into().unwrap()) as usize;
            let value: u64 = bincode::deserialize(&r.payload[2 + name_len..]).unwrap();
            (offset, value)
        })
        .collect()
}

/// The journaled answers of `External` requests: request offset → value (the first
/// entry of a call is its answer).
pub fn journal(effects: &dyn Store) -> HashMap<u64, u64> {
    let mut answers = HashMap::new();
    for (offset, value) in journal_entries(effects) {
        answers.entry(offset).or_insert(value);
    }
    answers
}

/// Every request in the input log: offset → (key, request).
pub fn requests(input: &dyn Store) -> HashMap<u64, (Vec<u8>, Req)> {
    input
        .read_from(input.start_offset())
        .unwrap()
        .map(|r| r.unwrap())
        .filter_map(|r| {
            let req: Req = bincode::deserialize(request_body(&r.payload)?).unwrap();
            Some((r.offset, (r.key.to_vec(), req)))
        })
        .collect()
}

/// The encoded request of an input-log payload, as the crate writes it: a tag byte of 0
/// then the request, or of 2 then a 16-byte request id and the request. `None` for a
/// control record (tag 1).
pub fn request_body(payload: &[u8]) -> Option<&[u8]> {
    match payload.split_first()? {
        (0, body) => Some(body),
        (2, rest) => Some(&rest[16..]),
        _ => None,
    }
}

/// Checks every answer received against the fold of `input`, then asks `client` for
/// every key's state and checks it too. `context` prefixes failure messages.
pub fn assert_matches_model(
    context: &str,
    input: &dyn Store,
    effects: &dyn Store,
    answers: &HashMap<u64, cauce::Result<Resp>>,
    client: &cauce::cluster::Client<Service>,
) {
    let (states, expected) = model(input, &journal(effects));
    for (offset, got) in answers {
        match (expected.get(offset), got) {
            (Some(Some(want)), Ok(got)) => assert_eq!(got, want, "{context}: answer at {offset}"),
            // Set aside: a panic, or two stalls in a row (a slow panic can be both).
            (
                Some(None),
                Err(cauce::Error::HandlerPanicked { .. } | cauce::Error::HandlerStalled { .. }),
            ) => {}
            (want, got) => panic!("{context}: offset {offset}: expected {want:?}, got {got:?}"),
        }
    }
    for (key, want) in states {
        let got = client.submit(&key, Req::Get).unwrap().wait().unwrap();
        assert_eq!(
            got,
            Resp::State(want),
            "{context}: state of {}",
            String::from_utf8_lossy(&key)
        );
    }
}

/// Waits until `flag` is set, at most `at_most` (a handler held until a test lets it go).
pub fn wait_for(flag: &std::sync::atomic::AtomicBool, at_most: Duration) {
    let since = std::time::Instant::now();
    while !flag.load(std::sync::atomic::Ordering::SeqCst) && since.elapsed() < at_most {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `done()` holds, failing the test with `timed out: {what}` after
/// `at_most`.
pub fn wait_until(what: &str, at_most: Duration, done: impl Fn() -> bool) {
    let since = std::time::Instant::now();
    while !done() {
        assert!(since.elapsed() < at_most, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A minimal executor: polls `fut` on this thread, parking until woken.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// An input log whose reads fail while `broken` is set (appends still work): a disk
/// that returns read errors, as a rebuild meets them.
pub struct Unreadable {
    pub live: cauce::store::MemoryStore,
    pub broken: std::sync::atomic::AtomicBool,
}

impl Unreadable {
    fn check(&self) -> cauce::Result<()> {
        match self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err(cauce::Error::io(
                "read",
                "test-input",
                std::io::Error::other("injected read failure"),
            )),
            false => Ok(()),
        }
    }
}

impl Store for Unreadable {
    crate::forward_store!(live; append);
    fn read_from(&self, from: u64) -> cauce::Result<cauce::store::RecordIter> {
        self.check()?;
        self.live.read_from(from)
    }
    fn replay_from(
        &self,
        from: u64,
        f: &mut dyn FnMut(u64, cauce::Entry<'_>),
    ) -> cauce::Result<u64> {
        self.check()?;
        self.live.replay_from(from, f)
    }
    crate::forward_store!(
        live;
        all_but_appends_and_reads
    );
}

/// Inside an `impl Store for T` that writes its own `append`: every other method, passed
/// to the `Store` in field `$live` of `T`; `(live, but sync)` leaves out `sync` too. (Not
/// every test file that shares this module uses it.)
#[allow(unused_macros)]
macro_rules! forward_store_but_append {
    ($live:ident) => {
        $crate::forward_store!($live; read_from, replay_from, all_but_appends_and_reads);
    };
    ($live:ident, but sync) => {
        $crate::forward_store!($live; save_snapshot, read_from, replay_from, start_offset,
            next_offset, wait_for, wake_waiters, truncate_before, compact_with,
            commit_cursor, cursor, latest_snapshot);
    };
    ($live:ident, but sync and save_snapshot) => {
        $crate::forward_store!($live; read_from, replay_from, start_offset, next_offset,
            wait_for, wake_waiters, truncate_before, compact_with, commit_cursor, cursor,
            latest_snapshot);
    };
}
#[allow(unused_imports)]
pub(crate) use forward_store_but_append;

/// A `tracing` subscriber that hands each event's metadata and fields to a closure, on
/// the thread that emits it: for tests that act on the crate's log lines (note one, or
/// hold up the thread that emits it). The fields come as text, `name=value ` each, the
/// value `Debug`-formatted (a message reads as written).
pub struct OnEvent<F>(pub F);

struct FieldText(String);

impl tracing::field::Visit for FieldText {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        self.0 += &format!("{}={:?} ", f.name(), v);
    }
}

impl<F> tracing::Subscriber for OnEvent<F>
where
    F: Fn(&tracing::Metadata<'_>, &str) + Send + Sync + 'static,
{
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut text = FieldText(String::new());
        e.record(&mut text);
        (self.0)(e.metadata(), &text.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A memory log whose `wait_appended` (a deferred append's fdatasync) waits at a gate
/// while `held`, and fails while `failing` (a wait under way ends then, failed);
/// `disk` is what it says for `append_waits_for_disk`. Every append defers.
#[derive(Default)]
pub struct Gated {
    pub live: cauce::store::MemoryStore,
    pub held: std::sync::atomic::AtomicBool,
    pub failing: std::sync::atomic::AtomicBool,
    pub disk: bool,
    /// Callers waiting at the gate now.
    pub waiting: std::sync::atomic::AtomicUsize,
}

impl Store for Gated {
    fn append(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.live.append(batch)
    }
    fn append_deferred(&self, batch: &[cauce::Entry<'_>]) -> cauce::Result<cauce::store::Deferred> {
        Ok(cauce::store::Deferred {
            offsets: self.live.append(batch)?,
            pending: true,
        })
    }
    fn append_waits_for_disk(&self) -> bool {
        self.disk
    }
    fn wait_appended(&self, _end: u64) -> cauce::Result<()> {
        use std::sync::atomic::Ordering;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let since = std::time::Instant::now();
        while self.held.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(30) {
            if self.failing.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(cauce::Error::ReadOnly("the test's fdatasync failed".into()));
        }
        Ok(())
    }
    crate::common::forward_store_but_append!(live);
}
