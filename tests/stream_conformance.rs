//! Every stream in the crate against the stream conformance suite.

use cauce::store::MemoryStore;
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
