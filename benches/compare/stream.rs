//! The stream comparisons.
//!
//! - `stream.memory.{spsc,mpsc4}.vs_channel`: records/s through a `MemoryStream` against
//!   a bare `crossbeam_channel::bounded` of the same capacity moving the same records
//!   (the baseline builds a `Record` from the same bytes: that is the limit).
//! - `stream.log.memory_store.vs_append`: records/s published one by one into a
//!   `LogStream` against appending them one by one to its store alone.
//! - `stream.log.tail_{p50,p99}_us`: microseconds from the start of a publish to the
//!   record reaching a subscriber that follows the tail, at half of the peak rate
//!   measured first, against a bare channel paced the same way.

use std::hint::{black_box, spin_loop};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cauce::store::{MemoryStore, Store};
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
    log_publish(bench);
    tail_latency(bench);
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

fn log_publish(bench: &mut Bench) {
    let id = "stream.log.memory_store.vs_append";
    if !bench.wants(id) {
        return;
    }
    let n = bench.size(500_000, 100_000);
    let entry = Entry::with_timestamp(1, KEY, &PAYLOAD);
    bench.compare(
        id,
        "records/s",
        Better::More,
        Some(Goal::RatioAtLeast(0.8)),
        || {
            let stream = LogStream::new(MemoryStore::new());
            let publisher = stream.publisher();
            rate(n, || {
                for _ in 0..n {
                    publisher.publish(entry).expect("publish");
                }
            })
        },
        || {
            let store = MemoryStore::new();
            rate(n, || {
                for _ in 0..n {
                    store.append(&[entry]).expect("append");
                }
            })
        },
    );
}

/// A pipe for the tail-follow measure: `start` gives the sending side and a function
/// that receives the next record and returns its stamp.
trait Tail: Send + 'static {
    fn start() -> (Self, Box<dyn FnMut() -> u64 + Send>)
    where
        Self: Sized;
    fn send(&self, stamp: u64);
}

/// A log stream over a memory store, the follower subscribed at the end.
struct LogTail(cauce::stream::LogPublisher<MemoryStore>);

impl Tail for LogTail {
    fn start() -> (Self, Box<dyn FnMut() -> u64 + Send>) {
        // A store that has already grown its buffer, as the channel has its own: the
        // latency measured is the stream's, not that of a deque doubling.
        let store = MemoryStore::new();
        let warm: Vec<_> = (0..WARM_RECORDS)
            .map(|_| Entry::with_timestamp(1, KEY, &PAYLOAD))
            .collect();
        store.append(&warm).expect("append");
        store
            .truncate_before(WARM_RECORDS as u64)
            .expect("truncate");
        let stream = LogStream::new(store);
        let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
        let receive = move || stamp_of(&subscriber.recv().expect("recv"));
        (LogTail(stream.publisher()), Box::new(receive))
    }
    fn send(&self, stamp: u64) {
        let payload = stamp_payload(stamp);
        self.0
            .publish(Entry::with_timestamp(1, KEY, &payload))
            .expect("publish");
    }
}

/// A bare channel carrying the same records.
struct ChannelTail(crossbeam_channel::Sender<Record>);

impl Tail for ChannelTail {
    fn start() -> (Self, Box<dyn FnMut() -> u64 + Send>) {
        let (tx, rx) = crossbeam_channel::bounded::<Record>(CAPACITY);
        let receive = move || stamp_of(&rx.recv().expect("recv"));
        (ChannelTail(tx), Box::new(receive))
    }
    fn send(&self, stamp: u64) {
        let record = Record {
            offset: 0,
            timestamp: 1,
            key: Bytes::copy_from_slice(KEY),
            payload: Bytes::copy_from_slice(&stamp_payload(stamp)),
        };
        self.0.send(record).expect("send");
    }
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

/// Publishes `count` records, one every `interval` (`None`: as fast as possible), and
/// returns the follower's latencies in microseconds and the rate it received at.
fn follow<T: Tail>(count: usize, interval: Option<Duration>) -> (Vec<f64>, f64) {
    let (tail, mut receive) = T::start();
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
        tail.send(base.elapsed().as_nanos() as u64);
    }
    let (latencies, done) = follower.join().expect("follower");
    let rate = count as f64 / (done - start).as_secs_f64();
    (latencies, rate)
}

fn tail_latency(bench: &mut Bench) {
    let id = "stream.log.tail_p99_us";
    if !bench.wants(id) {
        return;
    }
    let peak = median(
        &(0..3)
            .map(|_| follow::<LogTail>(bench.size(200_000, 50_000), None).1)
            .collect::<Vec<_>>(),
    );
    let half = peak / 2.0;
    let interval = Duration::from_secs_f64(1.0 / half);
    let count = (half * if bench.quick() { 0.1 } else { 0.3 }) as usize;
    println!(
        "  (tail-follow: peak {:.2}M records/s, paced at {:.2}M/s, {count} records per run)",
        peak / 1e6,
        half / 1e6
    );
    let (mut ours_p50, mut theirs_p50) = (Vec::new(), Vec::new());
    let p99 = |p50s: &mut Vec<f64>, mut latencies: Vec<f64>| {
        p50s.push(quantile(&mut latencies, 0.5));
        quantile(&mut latencies, 0.99)
    };
    bench.compare(
        id,
        "us",
        Better::Less,
        Some(Goal::OursAtMost(50.0)),
        || p99(&mut ours_p50, follow::<LogTail>(count, Some(interval)).0),
        || {
            p99(
                &mut theirs_p50,
                follow::<ChannelTail>(count, Some(interval)).0,
            )
        },
    );
    bench.record(
        "stream.log.tail_p50_us",
        "us",
        Better::Less,
        None,
        median(&ours_p50),
        median(&theirs_p50),
    );
}
