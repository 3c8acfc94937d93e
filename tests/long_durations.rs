//! Every API that takes a duration takes any duration: one too long to be a point in
//! time (`Duration::MAX`, say) means no deadline, never a panic.

mod common;

use std::time::Duration;

use cauce::Entry;
use cauce::cluster::Cluster;
use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::stream::{LogStream, MemoryStream, Position, Publish, Stream, Subscribe, SubscribeExt};
use common::{Req, Resp, Service};

/// Blocks in `wait_for` past the end with an endless timeout, until a record arrives.
fn wait_for_the_next_record(store: &impl Store) {
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            store.append(&[Entry::new(b"k", b"v")]).unwrap();
        });
        assert_eq!(store.wait_for(0, Some(Duration::MAX)), 1);
    });
}

#[test]
fn waits_with_an_endless_timeout_return_what_arrives() {
    wait_for_the_next_record(&MemoryStore::new());
    let tmp = tempfile::tempdir().unwrap();
    wait_for_the_next_record(&LogStore::open(tmp.path(), LogOptions::new()).unwrap());

    let stream = MemoryStream::fan_out(4).unwrap();
    let mut filtered = stream.subscribe(Position::End).unwrap().filter(|_| true);
    stream.publisher().publish(Entry::new(b"k", b"v")).unwrap();
    assert_eq!(filtered.recv_timeout(Duration::MAX).unwrap().offset, 0);
    let stream = LogStream::new(MemoryStore::new());
    let mut sub = stream.subscribe(Position::Beginning).unwrap();
    stream.publisher().publish(Entry::new(b"k", b"v")).unwrap();
    assert_eq!(sub.recv_timeout(Duration::MAX).unwrap().offset, 0);
}

#[test]
fn an_endless_sync_interval_syncs_by_record_count() {
    // The background flusher must not die on it either (a panic there is silent).
    static FLUSHER_PANICKED: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("cauce-log-flusher") {
            FLUSHER_PANICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        previous(info);
    }));
    let tmp = tempfile::tempdir().unwrap();
    let policy = SyncPolicy::Every {
        records: 2,
        interval: Duration::MAX,
    };
    let log = LogStore::open(tmp.path(), LogOptions::new().sync(policy)).unwrap();
    log.append(&[Entry::new(b"k", b"1")]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(log.stats().syncs, 0, "no interval ever passes");
    log.append(&[Entry::new(b"k", b"2")]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while log.stats().syncs == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the record count synced"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(log);
    assert!(
        !FLUSHER_PANICKED.load(std::sync::atomic::Ordering::SeqCst),
        "the flusher thread panicked"
    );
}

#[test]
fn a_cluster_with_endless_timeouts_serves_checkpoints_and_stops() {
    let cluster = Cluster::builder(Service::default())
        .in_memory()
        .instances(2)
        .stall_timeout(Duration::MAX)
        .supervise_every(Duration::MAX)
        .linger(Duration::MAX)
        .build()
        .unwrap();
    let client = cluster.client();
    let pending = client.submit("k", Req::Add(3)).unwrap();
    assert_eq!(pending.wait_timeout(Duration::MAX).unwrap(), Resp::Sum(3));
    assert_eq!(
        client.submit("k", Req::Add(1)).unwrap().wait().unwrap(),
        Resp::Sum(4)
    );
    cluster.checkpoint().unwrap();
    cluster.shutdown().unwrap();
}
