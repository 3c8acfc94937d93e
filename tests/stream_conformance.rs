//! Every stream in the crate against the stream conformance suite.

use cauce::store::{LogOptions, LogStore, MemoryStore, SyncPolicy};
use cauce::stream::conformance::{self, Delivery, Fixture};
use cauce::stream::{LogStream, MemoryStream};

/// Small queues, so the suite's concurrent checks run into backpressure often.
const CAPACITY: usize = 4;

struct SharedQueue;

impl Fixture for SharedQueue {
    type Stream = MemoryStream;
    fn create(&mut self) -> MemoryStream {
        MemoryStream::bounded(CAPACITY).expect("capacity is not 0")
    }
    fn delivery(&self) -> Delivery {
        Delivery::Shared
    }
    fn capacity(&self) -> Option<usize> {
        Some(CAPACITY)
    }
    fn reopen(&mut self, stream: MemoryStream) -> MemoryStream {
        stream
    }
}

struct FanOut;

impl Fixture for FanOut {
    type Stream = MemoryStream;
    fn create(&mut self) -> MemoryStream {
        MemoryStream::fan_out(CAPACITY).expect("capacity is not 0")
    }
    fn delivery(&self) -> Delivery {
        Delivery::EverySubscriber
    }
    fn capacity(&self) -> Option<usize> {
        Some(CAPACITY)
    }
    fn reopen(&mut self, stream: MemoryStream) -> MemoryStream {
        stream
    }
}

/// A log stream over a `MemoryStore`; "reopening" makes a new stream over the same store.
#[derive(Default)]
struct LogOnMemoryStore {
    store: MemoryStore,
}

impl Fixture for LogOnMemoryStore {
    type Stream = LogStream<MemoryStore>;
    fn create(&mut self) -> LogStream<MemoryStore> {
        self.store = MemoryStore::new();
        LogStream::new(self.store.clone())
    }
    fn delivery(&self) -> Delivery {
        Delivery::Stored
    }
    fn capacity(&self) -> Option<usize> {
        None
    }
    fn reopen(&mut self, stream: LogStream<MemoryStore>) -> LogStream<MemoryStore> {
        drop(stream);
        LogStream::new(self.store.clone())
    }
}

/// A log stream over a `LogStore` in a temporary directory (sync `Never`: reopening after
/// a clean close keeps everything); reopening closes the store and opens the directory
/// again, as a restarted process would.
#[derive(Default)]
struct LogOnLogStore {
    dir: Option<tempfile::TempDir>,
}

impl LogOnLogStore {
    fn open(&self) -> LogStream<LogStore> {
        let dir = self.dir.as_ref().expect("created").path();
        let store = LogStore::open(dir, LogOptions::new().sync(SyncPolicy::Never))
            .expect("open the log directory");
        LogStream::new(store)
    }
}

impl Fixture for LogOnLogStore {
    type Stream = LogStream<LogStore>;
    fn create(&mut self) -> LogStream<LogStore> {
        self.dir = Some(tempfile::tempdir().expect("temporary directory"));
        self.open()
    }
    fn delivery(&self) -> Delivery {
        Delivery::Stored
    }
    fn capacity(&self) -> Option<usize> {
        None
    }
    fn reopen(&mut self, stream: LogStream<LogStore>) -> LogStream<LogStore> {
        drop(stream);
        self.open()
    }
}

#[test]
fn memory_stream_shared_queue_conforms() {
    conformance::run_all(&mut SharedQueue);
}

#[test]
fn memory_stream_fan_out_conforms() {
    conformance::run_all(&mut FanOut);
}

#[test]
fn log_stream_on_memory_store_conforms() {
    conformance::run_all(&mut LogOnMemoryStore::default());
}

#[test]
fn log_stream_on_log_store_conforms() {
    conformance::run_all(&mut LogOnLogStore::default());
}
