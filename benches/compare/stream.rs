//! The stream comparisons.
//!
//! - `stream.memory.{spsc,mpsc4}.vs_channel`: records/s through a `MemoryStream` against
//!   a bare `crossbeam_channel::bounded` of the same capacity moving the same records
//!   (the baseline builds a `Record` from the same bytes: that is the limit).
//! - `stream.log.{memory_store,logstore}.vs_append`: records/s published one by one into
//!   a `LogStream` against appending them one by one to its store alone (`LogStore` with
//!   `SyncPolicy::Never`, in a temporary directory). The goal (≥ 0.8) is the issue's,
//!   set on `LogStore`; the `MemoryStore` figure is for information.
//! - `stream.log.{memory_store,logstore}.tail_{p50,p99}_us`: microseconds from the start
//!   of a publish to the record reaching a subscriber that follows the tail, at half of
//!   the peak rate measured first (publisher and follower together), against a bare
//!   channel paced the same way.
//! - `stream.log.logstore.wake_{p50,p99}_us`: the same with a record every 100 µs, so
//!   that the follower is asleep in `Store::wait_for` when each record comes (the path
//!   of a quiet stream), against a bare channel whose receiver sleeps the same way.

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::stream::{LogStream, MemoryStream, Position, Publish, Stream, Subscribe};
use cauce::{Entry, Record};

use crate::harness::{Bench, Better, Goal, median, quantile, rate};

const KEY: &[u8] = b"user-042";
const PAYLOAD: [u8; 100] = [0x5a; 100];
/// Queue capacity of both the stream and the bare channel.
const CAPACITY: usize = 1024;
/// Records appended then truncated to grow a store's buffer before the tail measure.
const WARM_RECORDS: usize = 400_000;

/// Runs the stream group.
pub fn run(bench: &mut Bench) {
    if !bench.group("stream") {
        return;
    }
    memory_throughput(bench, 1, "stream.memory.spsc.vs_channel");
    memory_throughput(bench, 4, "stream.memory.mpsc4.vs_channel");
    // The goal (LogStream >= 0.8x the store's append rate) is set for a
    // LogStream over LogStore with sync Never; the same over MemoryStore is measured
    // beside it, for information.
    log_publish(
        bench,
        "stream.log.memory_store.vs_append",
        memory_store,
        None,
    );
    let goal = Some(Goal::RatioAtLeast(0.8));
    log_publish(bench, "stream.log.logstore.vs_append", log_store, goal);
    tail_latency(bench, "stream.log.memory_store", warm_memory_store);
    tail_latency(bench, "stream.log.logstore", log_store);
    wake_latency(bench);
}

fn memory_throughput(bench: &mut Bench, producers: usize, id: &str) {
    if !bench.wants(id) {
        return;
    }
    let per_producer = bench.size(1_000_000, 200_000) / producers;
    let total = per_producer * producers;
    bench.compare(
        id,
        "records/s",
        Better::More,
        Some(Goal::RatioAtLeast(0.8)),
        || {
            let stream = MemoryStream::bounded(CAPACITY).expect("capacity");
            let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
            let publishers: Vec<_> = (0..producers).map(|_| stream.publisher()).collect();
            drop(stream);
            let started = Instant::now();
            let threads: Vec<_> = publishers
                .into_iter()
                .map(|publisher| {
                    thread::spawn(move || {
                        for _ in 0..per_producer {
                            let entry = Entry::with_timestamp(1, KEY, &PAYLOAD);
                            publisher.publish(entry).expect("publish");
                        }
                    })
                })
                .collect();
            let mut bytes = 0;
            for _ in 0..total {
                bytes += subscriber.recv().expect("recv").payload.len();
            }
            let elapsed = started.elapsed();
            black_box(bytes);
            threads
                .into_iter()
                .for_each(|t| t.join().expect("publisher"));
            total as f64 / elapsed.as_secs_f64()
        },
        || {
            let (tx, rx) = crossbeam_channel::bounded::<Record>(CAPACITY);
            let started = Instant::now();
            let threads: Vec<_> = (0..producers)
                .map(|_| {
                    let tx = tx.clone();
                    thread::spawn(move || {
                        for offset in 0..per_producer as u64 {
                            let record = Record {
                                offset,
                                timestamp: 1,
                                key: Bytes::copy_from_slice(KEY),
                                payload: Bytes::copy_from_slice(&PAYLOAD),
                            };
                            tx.send(record).expect("send");
                        }
                    })
                })
                .collect();
            drop(tx);
            let mut bytes = 0;
            for _ in 0..total {
                bytes += rx.recv().expect("recv").payload.len();
            }
            let elapsed = started.elapsed();
            black_box(bytes);
            threads.into_iter().for_each(|t| t.join().expect("sender"));
            total as f64 / elapsed.as_secs_f64()
        },
    );
}

/// A `LogStore` with `SyncPolicy::Never` in a temporary directory that lives as long as
/// the store (the directory goes when the store does).
struct OnDisk {
    store: LogStore,
    _dir: tempfile::TempDir,
}

fn log_store() -> OnDisk {
    let dir = crate::harness::bench_dir();
    let options = LogOptions::new().sync(SyncPolicy::Never);
    let store = LogStore::open(dir.path(), options).expect("open");
    OnDisk { store, _dir: dir }
}

fn memory_store() -> MemoryStore {
    MemoryStore::new()
}

/// A memory store that has already grown its buffer, as the channel has its own: the
/// latency measured is the stream's, not that of a deque doubling.
fn warm_memory_store() -> MemoryStore {
    let store = MemoryStore::new();
    let warm: Vec<_> = (0..WARM_RECORDS)
        .map(|_| Entry::with_timestamp(1, KEY, &PAYLOAD))
        .collect();
    store.append(&warm).expect("append");
    store
        .truncate_before(WARM_RECORDS as u64)
        .expect("truncate");
    store
}

/// Forwards the `Store` trait to the wrapped `LogStore`, so the temporary directory
/// lives inside the store value.
impl Store for OnDisk {
    fn append(&self, batch: &[Entry<'_>]) -> cauce::Result<std::ops::Range<u64>> {
        self.store.append(batch)
    }
    fn read_from(&self, from: u64) -> cauce::Result<cauce::store::RecordIter> {
        self.store.read_from(from)
    }
    fn start_offset(&self) -> u64 {
        self.store.start_offset()
    }
    fn next_offset(&self) -> u64 {
        self.store.next_offset()
    }
    fn wait_for(&self, offset: u64, timeout: Option<Duration>) -> u64 {
        self.store.wait_for(offset, timeout)
    }
    fn wake_waiters(&self) {
        self.store.wake_waiters()
    }
    fn sync(&self) -> cauce::Result<()> {
        self.store.sync()
    }
    fn sync_until(&self, offset: u64) -> cauce::Result<()> {
        self.store.sync_until(offset)
    }
    fn truncate_before(&self, offset: u64) -> cauce::Result<()> {
        self.store.truncate_before(offset)
    }
    fn compact_with(
        &self,
        options: cauce::store::CompactOptions,
    ) -> cauce::Result<cauce::store::Compaction> {
        self.store.compact_with(options)
    }
    fn commit_cursor(&self, name: &str, offset: u64) -> cauce::Result<()> {
        self.store.commit_cursor(name, offset)
    }
    fn cursor(&self, name: &str) -> cauce::Result<Option<u64>> {
        self.store.cursor(name)
    }
    fn save_snapshot(&self, name: &str, offset: u64, blob: &[u8]) -> cauce::Result<()> {
        self.store.save_snapshot(name, offset, blob)
    }
    fn latest_snapshot(&self, name: &str) -> cauce::Result<Option<cauce::store::Snapshot>> {
        self.store.latest_snapshot(name)
    }
}

fn log_publish<S: Store>(bench: &mut Bench, id: &str, new_store: fn() -> S, goal: Option<Goal>) {
    if !bench.wants(id) {
        return;
    }
    let n = bench.size(500_000, 100_000);
    let entry = Entry::with_timestamp(1, KEY, &PAYLOAD);
    bench.compare(
        id,
        "records/s",
        Better::More,
        goal,
        || {
            let stream = LogStream::new(new_store());
            let publisher = stream.publisher();
            rate(n, || {
                for _ in 0..n {
                    publisher.publish(entry).expect("publish");
                }
            })
        },
        || {
            let store = new_store();
            rate(n, || {
                for _ in 0..n {
                    store.append(&[entry]).expect("append");
                }
            })
        },
    );
}

/// The sending side of a pipe for the tail-follow measure (called with a stamp), and
/// the receiving side (returns the stamp of the next record).
type Pipe = (Box<dyn Fn(u64)>, Box<dyn FnMut() -> u64 + Send>);

/// A log stream over `store`, the follower subscribed at the end.
fn log_pipe<S: Store>(store: S) -> Pipe {
    let stream = LogStream::new(store);
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    let send = move |stamp| {
        let payload = stamp_payload(stamp);
        publisher
            .publish(Entry::with_timestamp(1, KEY, &payload))
            .expect("publish");
    };
    let receive = move || stamp_of(&subscriber.recv().expect("recv"));
    (Box::new(send), Box::new(receive))
}

/// A bare channel carrying the same records.
fn channel_pipe() -> Pipe {
    let (tx, rx) = crossbeam_channel::bounded::<Record>(CAPACITY);
    let send = move |stamp| {
        let record = Record {
            offset: 0,
            timestamp: 1,
            key: Bytes::copy_from_slice(KEY),
            payload: Bytes::copy_from_slice(&stamp_payload(stamp)),
        };
        tx.send(record).expect("send");
    };
    let receive = move || stamp_of(&rx.recv().expect("recv"));
    (Box::new(send), Box::new(receive))
}

fn stamp_payload(stamp: u64) -> [u8; 100] {
    let mut payload = PAYLOAD;
    payload[..8].copy_from_slice(&stamp.to_le_bytes());
    payload
}

fn stamp_of(record: &Record) -> u64 {
    let mut stamp = [0; 8];
    stamp.copy_from_slice(&record.payload[..8]);
    u64::from_le_bytes(stamp)
}

/// Publishes `count` records into `pipe`, one every `interval` (`None`: as fast as
/// possible), and returns the follower's latencies in microseconds and the rate it
/// received at.
fn follow(pipe: Pipe, count: usize, interval: Option<Duration>) -> (Vec<f64>, f64) {
    let (send, mut receive) = pipe;
    let base = Instant::now();
    let follower = thread::spawn(move || {
        let mut latencies = Vec::with_capacity(count);
        for _ in 0..count {
            let sent = receive();
            let now = base.elapsed().as_nanos() as u64;
            latencies.push(now.saturating_sub(sent) as f64 / 1_000.0);
        }
        (latencies, base.elapsed())
    });
    // Let the follower reach its wait before the first record.
    thread::sleep(Duration::from_millis(2));
    let start = base.elapsed();
    for i in 0..count {
        if let Some(interval) = interval {
            let due = start + interval.mul_f64(i as f64);
            while base.elapsed() < due {
                spin_loop();
            }
        }
        send(base.elapsed().as_nanos() as u64);
    }
    let (latencies, done) = follower.join().expect("follower");
    let rate = count as f64 / (done - start).as_secs_f64();
    (latencies, rate)
}

fn tail_latency<S: Store>(bench: &mut Bench, prefix: &str, new_store: fn() -> S) {
    let id = format!("{prefix}.tail_p99_us");
    if !bench.wants(&id) {
        return;
    }
    let peak = median(
        &(0..3)
            .map(|_| follow(log_pipe(new_store()), bench.size(200_000, 50_000), None).1)
            .collect::<Vec<_>>(),
    );
    let half = peak / 2.0;
    let interval = Duration::from_secs_f64(1.0 / half);
    let count = (half * if bench.quick() { 0.1 } else { 0.3 }) as usize;
    println!(
        "  ({prefix}: peak {:.2}M records/s, paced at {:.2}M/s, {count} records per run)",
        peak / 1e6,
        half / 1e6
    );
    let goal = Some(Goal::OursAtMost(50.0));
    paced_latency(bench, prefix, "tail", goal, count, interval, || {
        log_pipe(new_store())
    });
}

/// Records `{prefix}.{name}_p99_us` (with `goal`) and `{prefix}.{name}_p50_us`: the
/// follower's latencies over `count` records paced `interval` apart, through the pipe
/// `ours` makes and through a bare channel.
fn paced_latency(
    bench: &mut Bench,
    prefix: &str,
    name: &str,
    goal: Option<Goal>,
    count: usize,
    interval: Duration,
    ours: impl Fn() -> Pipe,
) {
    let (mut ours_p50, mut theirs_p50) = (Vec::new(), Vec::new());
    let p99 = |p50s: &mut Vec<f64>, mut latencies: Vec<f64>| {
        p50s.push(quantile(&mut latencies, 0.5));
        quantile(&mut latencies, 0.99)
    };
    bench.compare(
        &format!("{prefix}.{name}_p99_us"),
        "us",
        Better::Less,
        goal,
        || p99(&mut ours_p50, follow(ours(), count, Some(interval)).0),
        || {
            p99(
                &mut theirs_p50,
                follow(channel_pipe(), count, Some(interval)).0,
            )
        },
    );
    bench.record(
        &format!("{prefix}.{name}_p50_us"),
        "us",
        Better::Less,
        None,
        crate::harness::median_of_rounds(&ours_p50),
        crate::harness::median_of_rounds(&theirs_p50),
    );
}

fn wake_latency(bench: &mut Bench) {
    if !bench.wants("stream.log.logstore.wake_p99_us") {
        return;
    }
    let interval = Duration::from_micros(100);
    let count = bench.size(3_000, 1_000);
    paced_latency(
        bench,
        "stream.log.logstore",
        "wake",
        None,
        count,
        interval,
        || log_pipe(log_store()),
    );
}
