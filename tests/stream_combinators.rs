//! The combinators: what each does, that backpressure passes through, and that closing
//! propagates through every one of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::router::InstanceId;
use cauce::store::MemoryStore;
use cauce::stream::{
    LogStream, MemoryStream, MemorySubscriber, Position, Publish, Stream, Subscribe, SubscribeExt,
    Tee, Typed, forward, merge, split,
};
use cauce::{Entry, Error, Record};

const PATIENCE: Duration = Duration::from_secs(10);

fn payloads<S: Subscribe>(subscriber: &mut S) -> Vec<String> {
    subscriber
        .records()
        .map(|r| String::from_utf8(r.expect("record").payload.to_vec()).expect("utf-8"))
        .collect()
}

fn publish_all<P: Publish>(publisher: &P, payloads: &[&str]) {
    for p in payloads {
        publisher
            .publish(Entry::new(b"k", p.as_bytes()))
            .expect("publish");
    }
}

/// A bounded stream with its two halves, the stream value dropped (so that dropping the
/// publisher closes it).
fn halves(capacity: usize) -> (cauce::stream::MemoryPublisher, MemorySubscriber) {
    let stream = MemoryStream::bounded(capacity).expect("capacity");
    let subscriber = stream.subscribe(Position::End).expect("subscribe");
    (stream.publisher(), subscriber)
}

fn expect_closed<S: Subscribe>(subscriber: &mut S, what: &str) {
    match subscriber.recv_timeout(PATIENCE) {
        Err(Error::Closed) => {}
        other => panic!("{what}: expected Closed, got {other:?}"),
    }
}

#[test]
fn map_changes_every_record_and_ends_with_its_input() {
    let (publisher, subscriber) = halves(8);
    let mut shouting = subscriber.map(|mut r: Record| {
        r.payload = r.payload.to_ascii_uppercase().into();
        r
    });
    publish_all(&publisher, &["a", "b"]);
    assert!(shouting.try_recv().expect("try_recv").is_some());
    drop(publisher);
    assert_eq!(payloads(&mut shouting), ["B"]);
    expect_closed(&mut shouting, "map after its input closed");
}

#[test]
fn filter_passes_only_kept_records_and_ends_with_its_input() {
    let (publisher, subscriber) = halves(8);
    let mut odd = subscriber.filter(|r| r.offset % 2 == 1);
    publish_all(&publisher, &["0", "1", "2", "3", "4"]);
    drop(publisher);
    assert_eq!(payloads(&mut odd), ["1", "3"]);
    expect_closed(&mut odd, "filter after its input closed");
}

#[test]
fn filter_timeout_covers_the_records_it_drops() {
    let (publisher, subscriber) = halves(64);
    let mut none = subscriber.filter(|_| false);
    // The feeder keeps records coming (every 2 ms) until told to stop, for at most
    // FEEDING: a filter that let each dropped record start its timeout afresh would
    // then wait until the feeding ends, far past the bound asserted below, while a
    // loaded machine that delays the filter's return only stretches the wait a little.
    const FEEDING: Duration = Duration::from_secs(5);
    let stop = Arc::new(AtomicBool::new(false));
    let feeding = {
        let stop = stop.clone();
        thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < FEEDING {
                publish_all(&publisher, &["dropped"]);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let started = Instant::now();
    let timeout = Duration::from_millis(30);
    assert!(matches!(none.recv_timeout(timeout), Err(Error::Timeout(t)) if t == timeout));
    let waited = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    // The bound is far above the timeout so that a descheduled test thread does not
    // fail it, and far below FEEDING so that a timeout restarted by every dropped
    // record does.
    assert!(
        waited >= timeout && waited < Duration::from_secs(2),
        "waited {waited:?}, not about {timeout:?}"
    );
    // Drops whatever came since (and frees a feeder blocked on the full queue).
    assert!(matches!(none.try_recv(), Ok(None)));
    feeding.join().expect("feeder");
}

#[test]
fn filter_and_map_commit_the_cursor_they_wrap() {
    let store = MemoryStore::new();
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    publish_all(&publisher, &["skip", "take", "skip", "take"]);
    let mut takes = stream
        .subscribe(Position::Cursor("taker".into()))
        .expect("subscribe")
        .filter(|r| &r.payload[..] == b"take")
        .map(|r| r);
    assert_eq!(takes.recv().expect("recv").offset, 1);
    takes.commit().expect("commit through filter and map");
    use cauce::store::Store;
    assert_eq!(store.cursor("taker").expect("cursor"), Some(2));
}

#[test]
fn tee_copies_every_record_into_the_second_stream() {
    let (publisher, subscriber) = halves(8);
    let (audit, mut audit_log) = halves(8);
    let mut handler = subscriber.tee(audit);
    publish_all(&publisher, &["a", "b", "c"]);
    drop(publisher);
    assert_eq!(payloads(&mut handler), ["a", "b", "c"]);
    let copies: Vec<_> = audit_log.records().map(|r| r.expect("record")).collect();
    assert_eq!(
        copies.iter().map(|r| &r.payload[..]).collect::<Vec<_>>(),
        [b"a", b"b", b"c"]
    );
    assert!(copies.iter().all(|r| &r.key[..] == b"k"), "keys are kept");
}

#[test]
fn tee_waits_for_room_in_the_second_stream_and_loses_nothing() {
    let (publisher, subscriber) = halves(8);
    let (audit, mut audit_log) = halves(1);
    let mut handler = subscriber.tee(audit);
    publish_all(&publisher, &["a", "b", "c"]);
    assert_eq!(
        handler
            .try_recv()
            .expect("room for one")
            .expect("a")
            .payload,
        "a"
    );
    assert!(
        handler
            .try_recv()
            .expect("the audit stream is full")
            .is_none(),
        "a full second stream holds the reader back"
    );
    assert_eq!(audit_log.recv().expect("audit").payload, "a");
    assert_eq!(
        handler.try_recv().expect("room again").expect("b").payload,
        "b"
    );
    let draining = thread::spawn(move || payloads(&mut audit_log));
    drop(publisher);
    assert_eq!(payloads(&mut handler), ["c"]);
    assert_eq!(draining.join().expect("audit reader"), ["b", "c"]);
}

#[test]
fn tee_closes_its_second_stream_when_its_input_ends() {
    let (publisher, subscriber) = halves(8);
    let (audit, mut audit_log) = halves(8);
    let mut handler = subscriber.tee(audit);
    drop(publisher);
    expect_closed(&mut handler, "tee after its input closed");
    expect_closed(&mut audit_log, "the tee's second stream");
}

/// A stored input of five records ("0".."4") read from the cursor `c` through a tee into
/// `audit`; returns the store (to read the cursor) and the tee.
fn tee_from_cursor<P: Publish>(
    audit: P,
) -> (
    MemoryStore,
    Tee<cauce::stream::LogSubscriber<MemoryStore>, P>,
) {
    let store = MemoryStore::new();
    let input = LogStream::new(store.clone());
    publish_all(&input.publisher(), &["0", "1", "2", "3", "4"]);
    let tee = input
        .subscribe(Position::Cursor("c".into()))
        .expect("subscribe")
        .tee(audit);
    (store, tee)
}

fn cursor(store: &MemoryStore) -> Option<u64> {
    use cauce::store::Store;
    store.cursor("c").expect("cursor")
}

fn expect_refused(item: Result<Record, Error>, offset: u64, what: &str) {
    match item {
        Err(Error::TeeRefused { offset: o, source }) => {
            assert_eq!(o, offset, "{what}");
            assert!(matches!(*source, Error::Closed), "{what}: {source}");
        }
        other => panic!("{what}: expected TeeRefused at {offset}, got {other:?}"),
    }
}

#[test]
fn tee_refused_by_its_second_stream_is_an_error_not_the_end_of_its_input() {
    let (audit, mut audit_log) = halves(8);
    let (store, mut tee) = tee_from_cursor(audit.clone());
    assert_eq!(tee.recv().expect("recv").payload, "0");
    tee.commit().expect("commit after record 0");
    assert_eq!(cursor(&store), Some(1));
    audit.close();
    expect_refused(tee.recv(), 1, "recv");
    expect_refused(tee.recv_timeout(PATIENCE), 1, "recv_timeout, again");
    assert!(matches!(
        tee.try_recv(),
        Err(Error::TeeRefused { offset: 1, .. })
    ));
    let items: Vec<_> = tee.records().take(3).collect();
    assert_eq!(items.len(), 3, "records() does not end: the input has not");
    for item in items {
        expect_refused(item, 1, "records()");
    }
    assert!(
        matches!(tee.commit(), Err(Error::CannotCommit(_))),
        "commit would count record 1, never received"
    );
    assert_eq!(cursor(&store), Some(1), "the cursor did not move");
    assert_eq!(audit_log.recv().expect("audit").payload, "0");
    expect_closed(&mut audit_log, "the closed second stream");

    // Going on without the copy: the held record first, then the rest of the input.
    let (mut input, held) = tee.into_parts();
    assert_eq!(held.expect("the held record").payload, "1");
    let rest: Vec<_> = (0..3)
        .map(|_| input.recv().expect("recv").payload)
        .collect();
    assert_eq!(rest, ["2", "3", "4"]);
    input.commit().expect("commit");
    assert_eq!(cursor(&store), Some(5));
}

/// A publisher that refuses (with `Error::Closed`) while `refusing` is set.
#[derive(Clone)]
struct Refusing {
    inner: cauce::stream::MemoryPublisher,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Publish for Refusing {
    fn publish(&self, entry: Entry<'_>) -> cauce::Result<u64> {
        if self.refusing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.inner.publish(entry)
    }
    fn try_publish(&self, entry: Entry<'_>) -> cauce::Result<u64> {
        if self.refusing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.inner.try_publish(entry)
    }
    fn publish_batch(&self, entries: &[Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        if self.refusing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.inner.publish_batch(entries)
    }
    fn close(&self) {
        self.inner.close();
    }
}

#[test]
fn tee_returns_a_refused_record_once_its_second_stream_takes_it() {
    let (inner, mut audit_log) = halves(8);
    let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let audit = Refusing {
        inner,
        refusing: refusing.clone(),
    };
    let (store, mut tee) = tee_from_cursor(audit);
    assert_eq!(tee.recv().expect("recv").payload, "0");
    refusing.store(true, std::sync::atomic::Ordering::SeqCst);
    expect_refused(tee.recv(), 1, "refused");
    assert!(matches!(tee.commit(), Err(Error::CannotCommit(_))));
    assert_eq!(cursor(&store), None, "nothing committed");
    refusing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(tee.recv().expect("taken now").payload, "1");
    tee.commit().expect("commit after record 1 was returned");
    assert_eq!(cursor(&store), Some(2));
    assert_eq!(tee.recv().expect("recv").payload, "2");
    let copies: Vec<_> = (0..3)
        .map(|_| audit_log.recv().expect("copy").payload)
        .collect();
    assert_eq!(copies, ["0", "1", "2"], "each record copied once, in order");
}

#[test]
fn tee_commit_does_not_count_a_record_held_back_by_a_full_second_stream() {
    let (audit, mut audit_log) = halves(1);
    let (store, mut tee) = tee_from_cursor(audit);
    assert_eq!(tee.try_recv().expect("try_recv").expect("0").payload, "0");
    assert!(
        tee.try_recv().expect("full").is_none(),
        "record 1 held back"
    );
    assert!(matches!(tee.commit(), Err(Error::CannotCommit(_))));
    assert_eq!(cursor(&store), None);
    assert_eq!(audit_log.recv().expect("audit").payload, "0");
    assert_eq!(tee.try_recv().expect("room").expect("1").payload, "1");
    tee.commit().expect("commit");
    assert_eq!(cursor(&store), Some(2));
}

#[test]
fn merge_and_forward_of_a_refused_tee_report_the_refusal_not_the_end() {
    let (audit, _audit_log) = halves(8);
    audit.close();
    let (_store, tee) = tee_from_cursor(audit.clone());
    let mut merged = merge([tee]).expect("merge");
    match merged.recv_timeout(PATIENCE) {
        Err(Error::TeeRefused { offset: 0, .. }) => {}
        other => panic!("merge: expected TeeRefused at 0, got {other:?}"),
    }
    let (sink, _sink_log) = halves(8);
    let (_store, tee) = tee_from_cursor(audit);
    match forward(tee, sink) {
        Err(Error::TeeRefused { offset: 0, .. }) => {}
        other => panic!("forward: expected TeeRefused at 0, got {other:?}"),
    }
}

#[test]
fn merge_takes_from_its_inputs_in_turn() {
    let (busy, busy_sub) = halves(1_000);
    let (quiet, quiet_sub) = halves(1_000);
    for i in 0..500 {
        busy.publish(Entry::new(b"busy", format!("{i}").as_bytes()))
            .expect("publish");
        quiet
            .publish(Entry::new(b"quiet", format!("{i}").as_bytes()))
            .expect("publish");
    }
    drop((busy, quiet));
    // Counts the records each forwarding thread has taken from its input.
    let taken = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let counted = |sub: MemorySubscriber, count: &Arc<AtomicUsize>| {
        let count = count.clone();
        sub.map(move |r: Record| {
            count.fetch_add(1, Ordering::SeqCst);
            r
        })
    };
    let mut merged =
        merge([counted(busy_sub, &taken[0]), counted(quiet_sub, &taken[1])]).expect("merge");
    // Each input's queue in the merge holds 16 records; its thread has taken one more
    // once the queue is full (and waits to hand it over). Wait for that, so that both
    // inputs have 16 records ready when reading starts: which one is taken is then the
    // merge's choice alone, however late either forwarding thread was scheduled.
    let started = Instant::now();
    while taken.iter().any(|t| t.load(Ordering::SeqCst) < 17) {
        assert!(
            started.elapsed() < PATIENCE,
            "the forwarding threads did not fill their queues"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let first: Vec<_> = (0..32).map(|_| merged.recv().expect("recv").key).collect();
    assert!(
        first.windows(2).all(|w| w[0] != w[1]),
        "round robin over two full inputs alternates: {:?}",
        first
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>()
    );
    let mut counts = (0, 0);
    for r in merged.records() {
        let r = r.expect("record");
        if &r.key[..] == b"quiet" {
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
    }
    assert_eq!(counts.0 + counts.1 + 32, 1_000, "every record once");
}

#[test]
fn merge_does_not_starve_a_quiet_input_behind_a_busy_one() {
    let (busy, busy_sub) = halves(64);
    let (quiet, quiet_sub) = halves(64);
    let mut merged = merge([busy_sub, quiet_sub]).expect("merge");
    let flooding = thread::spawn(move || {
        // Floods until the merge is gone (then its input is dropped and publish fails).
        while busy.publish(Entry::new(b"busy", b"x")).is_ok() {}
    });
    let trickling = thread::spawn(move || {
        for i in 0..20u8 {
            quiet.publish(Entry::new(b"quiet", &[i])).expect("publish");
            thread::sleep(Duration::from_millis(1));
        }
    });
    let started = Instant::now();
    let mut quiet_seen = Vec::new();
    while quiet_seen.len() < 20 {
        assert!(started.elapsed() < PATIENCE, "the quiet input starved");
        let r = merged.recv().expect("recv");
        if &r.key[..] == b"quiet" {
            quiet_seen.push(r.payload[0]);
        }
    }
    assert_eq!(
        quiet_seen,
        (0..20).collect::<Vec<_>>(),
        "in order, none lost"
    );
    trickling.join().expect("trickle");
    drop(merged);
    flooding
        .join()
        .expect("the flood ends once the merge is dropped");
}

#[test]
fn merge_ends_when_every_input_has_ended() {
    let (first, first_sub) = halves(8);
    let (second, second_sub) = halves(8);
    let mut merged = merge([first_sub, second_sub]).expect("merge");
    publish_all(&first, &["1"]);
    drop(first);
    publish_all(&second, &["2"]);
    let mut got = vec![
        merged.recv().expect("recv").payload,
        merged.recv().expect("recv").payload,
    ];
    got.sort();
    assert_eq!(got, ["1", "2"]);
    assert!(
        matches!(
            merged.recv_timeout(Duration::from_millis(20)),
            Err(Error::Timeout(_))
        ),
        "one input still open: the merge goes on"
    );
    drop(second);
    expect_closed(&mut merged, "merge after all its inputs closed");
    assert!(matches!(merged.try_recv(), Err(Error::Closed)));
    assert!(matches!(merged.commit(), Err(Error::CannotCommit(_))));
}

fn by_first_letter(key: &[u8]) -> Option<InstanceId> {
    match key.first()? {
        b'a'..=b'm' => Some(InstanceId(0)),
        b'n'..=b'z' => Some(InstanceId(1)),
        b'0'..=b'9' => Some(InstanceId(7)),
        _ => None,
    }
}

#[test]
fn split_routes_each_key_to_its_instance() {
    let (zero, mut zero_sub) = halves(8);
    let (one, mut one_sub) = halves(8);
    let by_key = split(
        by_first_letter,
        [(InstanceId(0), zero), (InstanceId(1), one)],
    );
    for key in ["alice", "zoe", "bob", "nina"] {
        by_key
            .publish(Entry::new(key.as_bytes(), b""))
            .expect("publish");
    }
    assert!(matches!(
        by_key.publish(Entry::new(b"7up", b"")),
        Err(Error::UnknownInstance(InstanceId(7)))
    ));
    assert!(matches!(
        by_key.publish(Entry::new(b"", b"")),
        Err(Error::NoInstance)
    ));
    let mixed = [
        Entry::new(b"amy", b""),
        Entry::new(b"ann", b""),
        Entry::new(b"zed", b""),
    ];
    assert!(matches!(
        by_key.publish_batch(&mixed),
        Err(Error::BatchSpansInstances {
            index: 2,
            first: InstanceId(0),
            other: InstanceId(1)
        })
    ));
    assert_eq!(
        by_key.publish_batch(&mixed[..2]).expect("one instance"),
        2..4
    );
    drop(by_key);
    let keys = |s: &mut MemorySubscriber| -> Vec<_> {
        s.records().map(|r| r.expect("record").key).collect()
    };
    assert_eq!(keys(&mut zero_sub), ["alice", "bob", "amy", "ann"]);
    assert_eq!(
        keys(&mut one_sub),
        ["zoe", "nina"],
        "and nothing of the refused batch"
    );
}

#[test]
fn split_pushes_back_only_on_the_full_instance() {
    let (zero, mut zero_sub) = halves(2);
    let (one, mut one_sub) = halves(2);
    let by_key = split(
        by_first_letter,
        [(InstanceId(0), zero), (InstanceId(1), one)],
    );
    by_key.publish(Entry::new(b"a", b"1")).expect("room");
    by_key.publish(Entry::new(b"a", b"2")).expect("room");
    assert!(matches!(
        by_key.try_publish(Entry::new(b"a", b"3")),
        Err(Error::Full)
    ));
    by_key
        .try_publish(Entry::new(b"z", b"1"))
        .expect("the other instance still has room");
    let blocked = {
        let by_key = by_key.clone();
        thread::spawn(move || by_key.publish(Entry::new(b"b", b"3")))
    };
    thread::sleep(Duration::from_millis(30));
    assert!(
        !blocked.is_finished(),
        "a publish to the full instance waits"
    );
    assert_eq!(one_sub.recv().expect("recv").payload, "1");
    assert_eq!(zero_sub.recv().expect("recv").payload, "1");
    assert_eq!(blocked.join().expect("thread").expect("publish"), 2);
}

#[test]
fn split_closes_every_instance_stream_when_dropped_or_closed() {
    let (zero, mut zero_sub) = halves(8);
    let (one, mut one_sub) = halves(8);
    let by_key = split(
        by_first_letter,
        [(InstanceId(0), zero), (InstanceId(1), one)],
    );
    let clone = by_key.clone();
    drop(by_key);
    clone
        .publish(Entry::new(b"a", b"x"))
        .expect("a clone keeps it open");
    drop(clone);
    assert_eq!(zero_sub.recv().expect("recv").payload, "x");
    expect_closed(&mut zero_sub, "instance 0 after the split was dropped");
    expect_closed(&mut one_sub, "instance 1 after the split was dropped");

    let streams = [
        MemoryStream::bounded(8).expect("capacity"),
        MemoryStream::bounded(8).expect("capacity"),
    ];
    let mut subs: Vec<_> = streams
        .iter()
        .map(|s| s.subscribe(Position::End).expect("subscribe"))
        .collect();
    let by_key = split(
        by_first_letter,
        [
            (InstanceId(0), streams[0].publisher()),
            (InstanceId(1), streams[1].publisher()),
        ],
    );
    by_key.close();
    for (i, sub) in subs.iter_mut().enumerate() {
        expect_closed(
            sub,
            &format!("instance {i} after close, its stream value still alive"),
        );
    }
}

#[test]
fn forward_moves_everything_then_closes_its_output() {
    let (input, input_sub) = halves(4);
    let (output, mut output_sub) = halves(4);
    let pump = thread::spawn(move || forward(input_sub, output));
    let reading = thread::spawn(move || payloads(&mut output_sub));
    let sent: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    for s in &sent {
        input
            .publish(Entry::new(b"", s.as_bytes()))
            .expect("publish");
    }
    drop(input);
    assert_eq!(pump.join().expect("pump").expect("forward"), 100);
    assert_eq!(
        reading.join().expect("reader"),
        sent,
        "in order, then closed"
    );
}

#[test]
fn forward_into_a_split_splits_an_existing_stream() {
    let log = LogStream::new(MemoryStore::new());
    let (zero, zero_sub) = halves(4);
    let (one, one_sub) = halves(4);
    let by_key = split(
        by_first_letter,
        [(InstanceId(0), zero), (InstanceId(1), one)],
    );
    let from = log.subscribe(Position::Beginning).expect("subscribe");
    let pump = thread::spawn(move || forward(from, by_key));
    let readers: Vec<_> = [zero_sub, one_sub]
        .into_iter()
        .map(|mut s| thread::spawn(move || s.records().count()))
        .collect();
    let publisher = log.publisher();
    for i in 0..200u32 {
        let key = if i % 4 == 0 { "zed" } else { "amy" };
        publisher
            .publish(Entry::new(key.as_bytes(), &i.to_le_bytes()))
            .expect("publish");
    }
    drop((publisher, log));
    assert_eq!(pump.join().expect("pump").expect("forward"), 200);
    let counts: Vec<_> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect();
    assert_eq!(counts, [150, 50]);
}

#[test]
fn an_empty_batch_into_a_split_routes_to_no_instance_and_publishes_nothing() {
    let (zero, mut zero_sub) = halves(8);
    let (one, mut one_sub) = halves(8);
    let by_key = split(
        by_first_letter,
        [(InstanceId(0), zero), (InstanceId(1), one)],
    );
    publish_all(&by_key, &["a"]);
    assert!(
        matches!(by_key.publish_batch(&[]), Err(Error::NoInstance)),
        "an empty batch has no key, so no instance and no next offset to name"
    );
    drop(by_key);
    assert_eq!(payloads(&mut zero_sub), ["a"]);
    assert!(payloads(&mut one_sub).is_empty());
}

/// A typed batch with nothing in it, after one value, through `publisher`.
fn empty_typed_batch_after_one_value<P: Publish>(publisher: P) -> std::ops::Range<u64> {
    let typed: Typed<_, u32> = Typed::new(publisher);
    typed.publish(b"k", &7).expect("publish");
    typed
        .publish_batch(std::iter::empty::<(&[u8], &u32)>())
        .expect("empty batch")
}

#[test]
fn an_empty_typed_batch_is_the_empty_range_at_the_next_offset() {
    let stored = LogStream::new(MemoryStore::new());
    assert_eq!(empty_typed_batch_after_one_value(stored.publisher()), 1..1);
    let notified = MemoryStream::bounded(4).expect("capacity");
    assert_eq!(
        empty_typed_batch_after_one_value(notified.publisher()),
        1..1
    );
}

#[test]
fn typed_values_round_trip_and_a_bad_record_does_not_end_the_stream() {
    let stream = LogStream::new(MemoryStore::new());
    let raw = stream.publisher();
    let typed: Typed<_, (String, u32)> = Typed::new(stream.publisher());
    let mut reader: Typed<_, (String, u32)> =
        Typed::new(stream.subscribe(Position::Beginning).expect("subscribe"));
    typed
        .publish(b"alice", &("hello".to_string(), 1))
        .expect("publish");
    raw.publish(Entry::new(b"mallory", &[0xff; 3]))
        .expect("publish");
    let pairs = [
        (&b"bob"[..], &("hi".to_string(), 2)),
        (&b"carol"[..], &("hey".to_string(), 3)),
    ];
    assert_eq!(typed.publish_batch(pairs).expect("batch"), 2..4);

    let first = reader.recv().expect("first");
    assert_eq!(
        (first.offset, &first.key[..], first.value),
        (0, &b"alice"[..], ("hello".into(), 1))
    );
    match reader.recv() {
        Err(Error::Codec { message, .. }) => {
            assert!(
                message.contains("offset 1"),
                "the error names the offset: {message}"
            )
        }
        other => panic!("expected a codec error, got {other:?}"),
    }
    assert_eq!(reader.recv().expect("goes on").value.1, 2);
    assert_eq!(
        reader
            .try_recv()
            .expect("try_recv")
            .expect("a value")
            .value
            .1,
        3
    );
    drop((raw, typed, stream));
    assert!(
        matches!(reader.recv(), Err(Error::Closed)),
        "closing passes through"
    );
}

#[test]
fn forward_into_a_closed_output_returns_the_record_it_read_and_the_count_moved() {
    let source = MemoryStream::bounded(8).expect("capacity");
    let from = source.subscribe(Position::End).expect("subscribe");
    // A second subscriber of the same shared queue: what forward leaves, it gets.
    let mut rest = source.subscribe(Position::End).expect("subscribe");
    publish_all(&source.publisher(), &["one", "two"]);
    let (to, _to_log) = halves(8);
    to.close();
    match forward(from, to) {
        Err(Error::ForwardRefused {
            moved: 0,
            record,
            source,
        }) => {
            assert_eq!(
                record.payload, "one",
                "the record forward read is handed back"
            );
            assert!(matches!(*source, Error::Closed), "why: {source}");
        }
        other => panic!("expected ForwardRefused of 'one', got {other:?}"),
    }
    assert_eq!(
        rest.try_recv().expect("try_recv").expect("two").payload,
        "two"
    );
}

/// `recv_timeout(ZERO)` takes a record that is already there on every subscriber; a
/// filter looks at least once too, instead of giving up before it looks.
#[test]
fn a_filter_with_a_zero_timeout_returns_a_record_already_queued() {
    let stream = MemoryStream::bounded(8).unwrap();
    let mut plain = stream.subscribe(Position::End).unwrap();
    let publisher = stream.publisher();
    publisher.publish(Entry::new(b"k", b"0")).unwrap();
    assert_eq!(plain.recv_timeout(Duration::ZERO).unwrap().payload, "0");
    publisher.publish(Entry::new(b"k", b"1")).unwrap();
    publisher.publish(Entry::new(b"k", b"2")).unwrap();
    let mut odd = plain.filter(|r| r.payload != "1");
    let got = odd.recv_timeout(Duration::ZERO);
    assert!(
        matches!(&got, Ok(r) if r.payload == "2"),
        "a filter's recv_timeout(0) with a kept record queued: {got:?}"
    );
    assert!(matches!(
        odd.recv_timeout(Duration::ZERO),
        Err(Error::Timeout(_))
    ));
}

/// Past its deadline a filter still takes records already queued, but only a few: a
/// backlog of records it drops kept a `recv_timeout` going for as long as the backlog
/// lasted (a 5 ms timeout over 300,000 dropped records took 184-276 ms).
#[test]
fn filter_timeout_does_not_wade_through_a_whole_backlog_of_dropped_records() {
    let store = MemoryStore::new();
    let stream = LogStream::new(store.clone());
    let entries: Vec<Entry<'_>> = (0..10_000).map(|_| Entry::new(b"k", b"dropped")).collect();
    stream.publisher().publish_batch(&entries).expect("publish");
    let looked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = looked.clone();
    let mut filter = stream
        .subscribe(Position::Beginning)
        .expect("subscribe")
        .filter(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        });
    assert!(matches!(
        filter.recv_timeout(Duration::ZERO),
        Err(Error::Timeout(_))
    ));
    let looked = looked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=100).contains(&looked),
        "a zero timeout looked at {looked} records"
    );
}

/// A merge input that panics (here in a filter's closure) is an error of the merge,
/// not the input's end: the merge took it for a clean end and its records were lost
/// without a word. The other inputs go on.
#[test]
fn a_merge_input_that_panics_is_an_error_not_its_end() {
    let (first, first_sub) = halves(8);
    let (second, second_sub) = halves(8);
    let panicking = first_sub.filter(|r| {
        assert!(&r.payload[..] != b"boom", "the filter panics on boom");
        true
    });
    let mut merged = merge([
        Box::new(panicking) as Box<dyn Subscribe>,
        Box::new(second_sub),
    ])
    .expect("merge");
    publish_all(&first, &["before", "boom", "after"]);
    let mut got = Vec::new();
    let mut panicked = None;
    publish_all(&second, &["other"]);
    drop((first, second));
    loop {
        match merged.recv_timeout(PATIENCE) {
            Ok(r) => got.push(String::from_utf8(r.payload.to_vec()).expect("utf-8")),
            Err(Error::InputPanicked { input, message }) => panicked = Some((input, message)),
            Err(Error::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let (input, message) = panicked.expect("the panic is reported");
    assert_eq!(input, 0);
    assert!(message.contains("the filter panics on boom"), "{message}");
    got.sort();
    assert_eq!(got, ["before", "other"]);
}

/// A tee's `recv_timeout` waits for room in its second stream until its timeout, not
/// past it (it waited for good: a merge over a tee whose second stream stayed full
/// kept its thread after the merge was dropped). The record it holds comes first once
/// there is room.
#[test]
fn tee_recv_timeout_gives_up_on_a_full_second_stream_at_its_timeout() {
    let (publisher, subscriber) = halves(8);
    let (audit, mut audit_log) = halves(1);
    let mut handler = subscriber.tee(audit);
    publish_all(&publisher, &["a", "b"]);
    assert_eq!(handler.recv().expect("a").payload, "a");
    // The audit stream is full; room comes only in 2 s.
    let draining = thread::spawn(move || {
        thread::sleep(Duration::from_secs(2));
        payloads(&mut audit_log)
    });
    assert!(matches!(
        handler.recv_timeout(Duration::from_millis(50)),
        Err(Error::Timeout(_))
    ));
    assert!(matches!(handler.commit(), Err(Error::CannotCommit(_))));
    drop(publisher);
    assert_eq!(payloads(&mut handler), ["b"]);
    assert_eq!(draining.join().expect("audit reader"), ["a", "b"]);
}
