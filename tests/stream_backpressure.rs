//! Backpressure and bounded memory: a slow subscriber holds publishers back (memory
//! streams) or reads at its own pace without buffering (log streams); waiting costs no
//! CPU.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cauce::store::{LogOptions, LogStore, MemoryStore, RecordIter, Store, SyncPolicy};
use cauce::stream::{LogStream, MemoryStream, Position, Publish, Stream, Subscribe};
use cauce::{Entry, Error, Offset, Result};

#[path = "support/forward.rs"]
mod forward;

#[test]
fn slowest_fan_out_subscriber_holds_the_publisher_back() {
    const CAPACITY: u64 = 4;
    let stream = MemoryStream::fan_out(CAPACITY as usize).expect("capacity");
    let mut fast = stream.subscribe(Position::End).expect("subscribe");
    let mut slow = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    drop(stream);
    let published = Arc::new(AtomicU64::new(0));
    let publishing = {
        let published = published.clone();
        thread::spawn(move || {
            for i in 0..100u64 {
                publisher
                    .publish(Entry::new(b"", &i.to_le_bytes()))
                    .expect("publish");
                published.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let fast_reader = thread::spawn(move || {
        let mut got = 0;
        while fast.recv().is_ok() {
            got += 1;
        }
        got
    });
    // The publisher fills the slow subscriber's queue at its own pace (slow on a loaded
    // machine): wait for it to get that far, then give it time to go past if it would.
    // A publisher that did not wait for the slow subscriber would reach 100 at once.
    let started = Instant::now();
    while published.load(Ordering::SeqCst) < CAPACITY {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the publisher did not fill the queues"
        );
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        published.load(Ordering::SeqCst),
        CAPACITY,
        "the publisher waits for the slow subscriber, whatever the fast one does"
    );
    let mut got = 0;
    while slow.recv().is_ok() {
        got += 1;
    }
    publishing.join().expect("publisher");
    assert_eq!((got, fast_reader.join().expect("fast reader")), (100, 100));
}

#[test]
fn dropping_the_slow_subscriber_releases_the_publisher() {
    let stream = MemoryStream::fan_out(2).expect("capacity");
    let slow = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    let publishing = thread::spawn(move || {
        for _ in 0..10 {
            publisher.publish(Entry::new(b"", b"x")).expect("publish");
        }
    });
    thread::sleep(Duration::from_millis(30));
    assert!(!publishing.is_finished(), "blocked on the slow subscriber");
    drop(slow);
    publishing
        .join()
        .expect("with nobody subscribed, records go nowhere and publish goes on");
}

#[test]
fn a_shared_queue_nobody_can_read_is_closed_for_publishers() {
    let stream = MemoryStream::bounded(2).expect("capacity");
    let subscriber = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    publisher
        .publish(Entry::new(b"", b"queued"))
        .expect("publish");
    drop(stream);
    publisher
        .publish(Entry::new(b"", b"queued"))
        .expect("a subscriber is left");
    drop(subscriber);
    assert!(matches!(
        publisher.publish(Entry::new(b"", b"lost")),
        Err(Error::Closed)
    ));
    assert!(matches!(
        publisher.try_publish(Entry::new(b"", b"lost")),
        Err(Error::Closed)
    ));
    assert!(
        matches!(publisher.publish_batch(&[]), Err(Error::Closed)),
        "an empty batch is refused where a record is"
    );
}

#[test]
fn a_fan_out_stream_nobody_can_read_is_closed_for_publishers() {
    let stream = MemoryStream::fan_out(2).expect("capacity");
    let subscribers = [
        stream.subscribe(Position::End).expect("subscribe"),
        stream.subscribe(Position::End).expect("subscribe"),
    ];
    let publisher = stream.publisher();
    publisher
        .publish(Entry::new(b"", b"seen"))
        .expect("publish");
    drop((stream, subscribers));
    assert!(
        matches!(
            publisher.publish(Entry::new(b"", b"lost")),
            Err(Error::Closed)
        ),
        "no subscriber and no stream value to make one"
    );
    assert!(matches!(publisher.publish_batch(&[]), Err(Error::Closed)));
}

#[test]
fn capacity_zero_or_past_the_maximum_is_a_config_error() {
    assert!(matches!(MemoryStream::bounded(0), Err(Error::Config(_))));
    assert!(matches!(MemoryStream::fan_out(0), Err(Error::Config(_))));
    // Room is reserved up front: a huge capacity is refused, not an allocation failure.
    for capacity in [MemoryStream::MAX_CAPACITY + 1, 1 << 40, usize::MAX] {
        assert!(matches!(
            MemoryStream::bounded(capacity),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            MemoryStream::fan_out(capacity),
            Err(Error::Config(_))
        ));
    }
    assert!(MemoryStream::bounded(MemoryStream::MAX_CAPACITY).is_ok());
}

#[test]
fn close_wakes_a_publisher_blocked_on_a_full_stream() {
    let stream = MemoryStream::bounded(1).expect("capacity");
    let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
    let publisher = stream.publisher();
    publisher
        .publish(Entry::new(b"", b"fills it"))
        .expect("room");
    let blocked = {
        let publisher = publisher.clone();
        thread::spawn(move || publisher.publish(Entry::new(b"", b"waits")))
    };
    thread::sleep(Duration::from_millis(30));
    assert!(!blocked.is_finished());
    assert!(
        matches!(
            publisher.try_publish(Entry::new(b"", b"no")),
            Err(Error::Full)
        ),
        "try_publish does not wait behind the blocked publisher"
    );
    publisher.close();
    assert!(matches!(
        blocked.join().expect("publisher thread"),
        Err(Error::Closed)
    ));
    assert_eq!(
        subscriber.recv().expect("queued before close").payload,
        "fills it"
    );
    assert!(matches!(subscriber.recv(), Err(Error::Closed)));
}

/// Tests that measure resident memory run one at a time.
static MEASURING_MEMORY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Peak resident memory while 200 MiB of records go through a stream of 64 one-KiB
/// records, read by a subscriber that lags behind the publisher.
#[test]
fn records_through_a_bounded_stream_do_not_grow_memory() {
    let _one_at_a_time = MEASURING_MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    const RECORDS: usize = 200_000;
    let payload = vec![7u8; 1024];
    for stream in [
        MemoryStream::bounded(64).expect("capacity"),
        MemoryStream::fan_out(64).expect("capacity"),
    ] {
        let mut subscriber = stream.subscribe(Position::End).expect("subscribe");
        let publisher = stream.publisher();
        drop(stream);
        let before = resident_kib();
        let publishing = {
            let payload = payload.clone();
            thread::spawn(move || {
                for _ in 0..RECORDS {
                    publisher
                        .publish(Entry::new(b"k", &payload))
                        .expect("publish");
                }
            })
        };
        let mut peak = before;
        let mut got = 0;
        while subscriber.recv().is_ok() {
            got += 1;
            if got % 1_000 == 0 {
                peak = peak.max(resident_kib());
                thread::sleep(Duration::from_micros(200)); // lag behind
            }
        }
        publishing.join().expect("publisher");
        assert_eq!(got, RECORDS);
        let grown_mib = peak.saturating_sub(before) / 1024;
        assert!(
            grown_mib < 32,
            "resident memory grew by {grown_mib} MiB for 200 MiB of records"
        );
    }
}

/// A subscriber that starts 100 MiB behind the tail of a `LogStore` reads it all with a
/// few MiB of memory: it reads the files at its own pace.
#[test]
fn lagging_subscriber_of_a_log_store_reads_with_bounded_memory() {
    let _one_at_a_time = MEASURING_MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    const BATCHES: usize = 1_000;
    const PER_BATCH: usize = 100;
    let dir = tempfile::tempdir().expect("temporary directory");
    let options = LogOptions::new().sync(SyncPolicy::Never);
    let stream = LogStream::new(LogStore::open(dir.path(), options).expect("open"));
    let mut lagging = stream.subscribe(Position::Beginning).expect("subscribe");
    let payload = vec![3u8; 1024];
    let batch: Vec<_> = (0..PER_BATCH).map(|_| Entry::new(b"k", &payload)).collect();
    let before = resident_kib();
    let publisher = stream.publisher();
    for _ in 0..BATCHES {
        publisher.publish_batch(&batch).expect("publish_batch");
    }
    drop((publisher, stream));
    let mut peak = resident_kib();
    let mut got = 0;
    while let Ok(record) = lagging.recv() {
        assert_eq!(record.payload.len(), 1024);
        got += 1;
        if got % 1_000 == 0 {
            peak = peak.max(resident_kib());
        }
    }
    assert_eq!(got, BATCHES * PER_BATCH);
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 32,
        "resident memory grew by {grown_mib} MiB while 100 MiB were published and read"
    );
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A store that counts the records its readers have handed out.
#[derive(Clone, Default)]
struct CountingStore {
    store: MemoryStore,
    handed_out: Arc<AtomicU64>,
}

impl Store for CountingStore {
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        self.store.append(batch)
    }
    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        let handed_out = self.handed_out.clone();
        Ok(Box::new(self.store.read_from(from)?.inspect(move |_| {
            handed_out.fetch_add(1, Ordering::SeqCst);
        })))
    }
    forward_store!(
        store;
        all_but_appends_and_reads
    );
}

#[test]
fn lagging_log_subscriber_takes_records_only_as_it_reads_them() {
    let store = CountingStore::default();
    let stream = LogStream::new(store.clone());
    let mut lagging = stream.subscribe(Position::Beginning).expect("subscribe");
    let publisher = stream.publisher();
    for i in 0..10u32 {
        publisher
            .publish(Entry::new(b"", &i.to_le_bytes()))
            .expect("publish");
    }
    for _ in 0..10 {
        lagging.recv().expect("recv");
    }
    for i in 0..20_000u32 {
        publisher
            .try_publish(Entry::new(b"", &i.to_le_bytes()))
            .expect("a log stream never pushes back on publishers");
    }
    assert_eq!(
        store.handed_out.load(Ordering::SeqCst),
        10,
        "the subscriber holds nothing beyond what it received"
    );
    let mut got = 10;
    while lagging.try_recv().expect("try_recv").is_some() {
        got += 1;
    }
    assert_eq!(got, 20_010);
    assert_eq!(store.handed_out.load(Ordering::SeqCst), 20_010);
}

#[test]
fn retention_past_a_lagging_subscriber_is_an_error_not_a_silent_skip() {
    let store = MemoryStore::new();
    let stream = LogStream::new(store.clone());
    let publisher = stream.publisher();
    let entries: Vec<_> = (0..1_000).map(|_| Entry::new(b"", b"x")).collect();
    publisher.publish_batch(&entries).expect("publish_batch");
    let mut lagging = stream.subscribe(Position::Beginning).expect("subscribe");
    let mut expected = 0;
    assert_eq!(lagging.recv().expect("first").offset, 0);
    store.truncate_before(500).expect("retention");
    let error = loop {
        match lagging.recv() {
            Ok(record) => {
                expected += 1;
                assert_eq!(record.offset, expected, "no record skipped");
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(error, Error::OffsetOutOfRange { start: 500, requested, .. } if requested == expected + 1),
        "got {error}"
    );
    assert!(
        matches!(lagging.recv(), Err(Error::OffsetOutOfRange { .. })),
        "and it stays an error: the subscriber does not jump over the lost records"
    );
}

/// CPU time used by the calling thread (the first field of its schedstat, in ns).
fn thread_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let nanos = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("CPU time in schedstat");
    Duration::from_nanos(nanos)
}

fn cpu_used_waiting<S: Subscribe>(subscriber: &mut S, wait: Duration) -> Duration {
    let before = thread_cpu_time();
    assert!(matches!(
        subscriber.recv_timeout(wait),
        Err(Error::Timeout(_))
    ));
    thread_cpu_time() - before
}

#[test]
fn a_waiting_subscriber_sleeps_instead_of_polling() {
    let wait = Duration::from_millis(300);
    let log = LogStream::new(MemoryStore::new());
    let _log_publisher = log.publisher();
    let mut follower = log.subscribe(Position::End).expect("subscribe");
    let used = cpu_used_waiting(&mut follower, wait);
    assert!(
        used < wait / 10,
        "a log follower used {used:?} of CPU in {wait:?}"
    );

    let dir = tempfile::tempdir().expect("temporary directory");
    let on_disk = LogStream::new(LogStore::open(dir.path(), LogOptions::new()).expect("open"));
    let _disk_publisher = on_disk.publisher();
    let mut follower = on_disk.subscribe(Position::End).expect("subscribe");
    let used = cpu_used_waiting(&mut follower, wait);
    assert!(
        used < wait / 10,
        "a log store follower used {used:?} of CPU in {wait:?}"
    );

    let memory = MemoryStream::fan_out(8).expect("capacity");
    let mut subscriber = memory.subscribe(Position::End).expect("subscribe");
    let used = cpu_used_waiting(&mut subscriber, wait);
    assert!(
        used < wait / 10,
        "a memory subscriber used {used:?} of CPU in {wait:?}"
    );
}
