//! Retention against subscribers that start "from the beginning": the beginning is
//! wherever the log begins when the reader opens, however retention moved it meanwhile.

#[path = "support/forward.rs"]
mod forward;
#[path = "support/retention_first.rs"]
mod retention_first;

use cauce::store::{LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::stream::{LogStream, Position, Publish, Stream, Subscribe};
use cauce::{Entry, Error, Offset};
use retention_first::RetentionFirst;

/// Where retention moves the start the first time a reader opens before it.
const RETAINED_FROM: Offset = 60;

/// A stream over `store` holding offsets 0..100, whose first reader that opens before
/// offset 60 finds retention has just dropped everything before it.
fn stream_racing_retention<S: Store>(store: S) -> LogStream<impl Store> {
    let entries: Vec<_> = (0..100).map(|_| Entry::new(b"k", b"v")).collect();
    store.append(&entries).expect("append");
    LogStream::new(RetentionFirst {
        store,
        retain_from: |_| RETAINED_FROM,
    })
}

fn log_store(dir: &tempfile::TempDir) -> LogStore {
    LogStore::open(dir.path(), LogOptions::new().sync(SyncPolicy::Never)).expect("open")
}

/// The first record a subscriber from `from` receives, and where its position is then.
fn first_from<S: Store>(stream: &LogStream<S>, from: Position) -> (Offset, Offset) {
    let mut subscriber = stream
        .subscribe(from.clone())
        .unwrap_or_else(|e| panic!("subscribe from {from:?} while retention moves the start: {e}"));
    let offset = subscriber.recv().expect("recv").offset;
    (offset, subscriber.position())
}

#[test]
fn beginning_is_where_the_log_begins_when_the_reader_opens() {
    let stream = stream_racing_retention(MemoryStore::new());
    assert_eq!(first_from(&stream, Position::Beginning), (60, 61));
    let dir = tempfile::tempdir().expect("temporary directory");
    let stream = stream_racing_retention(log_store(&dir));
    assert_eq!(first_from(&stream, Position::Beginning), (60, 61));
}

#[test]
fn a_cursor_never_committed_starts_where_the_log_begins_when_the_reader_opens() {
    let stream = stream_racing_retention(MemoryStore::new());
    let fresh = Position::Cursor("fresh".into());
    assert_eq!(first_from(&stream, fresh.clone()), (60, 61));
    let dir = tempfile::tempdir().expect("temporary directory");
    let stream = stream_racing_retention(log_store(&dir));
    assert_eq!(first_from(&stream, fresh), (60, 61));
}

#[test]
fn an_offset_that_retention_dropped_is_still_out_of_range() {
    let stream = stream_racing_retention(MemoryStore::new());
    assert!(matches!(
        stream.subscribe(Position::Offset(10)),
        Err(Error::OffsetOutOfRange {
            requested: 10,
            start: RETAINED_FROM,
            ..
        })
    ));
}

#[test]
fn retention_that_keeps_overtaking_the_reader_ends_in_an_error_not_a_loop() {
    let store = MemoryStore::new();
    let entries: Vec<_> = (0..1_000).map(|_| Entry::new(b"k", b"v")).collect();
    store.append(&entries).expect("append");
    let stream = LogStream::new(RetentionFirst {
        store,
        retain_from: |from: Offset| from + 1,
    });
    assert!(matches!(
        stream.subscribe(Position::Beginning),
        Err(Error::OffsetOutOfRange { .. })
    ));
    let publisher = stream.publisher();
    assert_eq!(
        publisher.publish(Entry::new(b"k", b"v")).expect("publish"),
        1_000,
        "the stream is still usable"
    );
}
