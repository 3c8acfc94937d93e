//! The Store conformance suite against `LogStore`, reopening from the same directory,
//! under several option sets.

use std::time::Duration;

use cauce::store::conformance::{self, Fixture};
use cauce::store::{LogOptions, LogStore, SyncPolicy};

struct Disk {
    dir: tempfile::TempDir,
    options: LogOptions,
    made: usize,
}

impl Disk {
    fn new(options: LogOptions) -> Disk {
        Disk {
            dir: tempfile::tempdir().expect("temp dir"),
            options,
            made: 0,
        }
    }
}

impl Fixture for Disk {
    type Store = LogStore;

    fn create(&mut self) -> LogStore {
        self.made += 1;
        let dir = self.dir.path().join(self.made.to_string());
        LogStore::open(dir, self.options.clone()).expect("open a new log")
    }

    fn reopen(&mut self, store: LogStore) -> LogStore {
        let dir = store.dir().to_path_buf();
        drop(store);
        LogStore::open(dir, self.options.clone()).expect("reopen the log")
    }
}

#[test]
fn log_store_conforms_with_sync_always() {
    conformance::run_all(&mut Disk::new(LogOptions::new().sync(SyncPolicy::Always)));
}

#[test]
fn log_store_conforms_with_sync_never() {
    conformance::run_all(&mut Disk::new(LogOptions::new().sync(SyncPolicy::Never)));
}

#[test]
fn log_store_conforms_with_sync_every() {
    let every = SyncPolicy::Every {
        records: 50,
        interval: Duration::from_millis(2),
    };
    conformance::run_all(&mut Disk::new(LogOptions::new().sync(every)));
}

#[test]
fn log_store_conforms_with_tiny_segments_that_roll_in_every_check() {
    let options = LogOptions::new()
        .segment_bytes(600)
        .index_interval_bytes(64)
        .sync(SyncPolicy::Always);
    conformance::run_all(&mut Disk::new(options));
}

#[test]
fn log_store_conforms_with_tiny_buffered_preallocated_segments() {
    let options = LogOptions::new()
        .segment_bytes(1000)
        .index_interval_bytes(100)
        .write_buffer_bytes(256)
        .preallocate(true)
        .sync(SyncPolicy::Never);
    conformance::run_all(&mut Disk::new(options));
}
