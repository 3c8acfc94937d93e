//! Property test: any sequence of appends, syncs, retention, compaction (with and
//! without options) and reopens leaves a `LogStore` holding the same records as the
//! model, a `MemoryStore`, and finding the same offsets by timestamp.

use cauce::store::{CompactOptions, LogOptions, LogStore, MemoryStore, Store, SyncPolicy};
use cauce::{Entry, Record};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// A batch of (key index, payload length) records.
    Append(Vec<(u8, usize)>),
    Sync,
    /// Retention up to this fraction (per mille) of the way from start to end.
    TruncateBefore(u16),
    Compact,
    /// `compact_with`: `before` at this fraction (per mille) of the way from start to
    /// end, tombstones expired before this fraction of the latest timestamp.
    CompactWith(Option<u16>, Option<u16>),
    /// `offset_for_timestamp` at this fraction (per mille) of the latest timestamp + 2.
    Lookup(u16),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec((0u8..6, prop_oneof![0usize..40, 300usize..1500]), 1..12)
            .prop_map(Op::Append),
        1 => Just(Op::Sync),
        1 => (0u16..=1000).prop_map(Op::TruncateBefore),
        1 => Just(Op::Compact),
        1 => (prop::option::of(0u16..=1100), prop::option::of(0u16..=1100))
            .prop_map(|(b, t)| Op::CompactWith(b, t)),
        1 => (0u16..=1000).prop_map(Op::Lookup),
        2 => Just(Op::Reopen),
    ]
}

fn contents(store: &impl Store) -> Vec<Record> {
    store
        .read_from(store.start_offset())
        .expect("read_from")
        .collect::<Result<Vec<_>, _>>()
        .expect("records")
}

fn run(ops: &[Op], options: &LogOptions) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = MemoryStore::new();
    let mut log = LogStore::open(tmp.path(), options.clone()).expect("open");
    let mut stamp = 0u64;
    for op in ops {
        match op {
            Op::Append(records) => {
                let keys: Vec<Vec<u8>> = records
                    .iter()
                    .map(|(k, _)| if *k == 0 { Vec::new() } else { vec![b'k', *k] })
                    .collect();
                let payloads: Vec<Vec<u8>> = records
                    .iter()
                    .map(|(_, len)| (0..*len).map(|i| (i as u64 + stamp) as u8).collect())
                    .collect();
                stamp += 1;
                let batch: Vec<Entry<'_>> = keys
                    .iter()
                    .zip(&payloads)
                    .map(|(k, p)| Entry::with_timestamp(stamp, k, p))
                    .collect();
                let want = model.append(&batch).expect("model append");
                prop_assert_eq!(log.append(&batch).expect("append"), want);
            }
            Op::Sync => log.sync().expect("sync"),
            Op::TruncateBefore(per_mille) => {
                let (s, e) = (model.start_offset(), model.next_offset());
                let to = s + (e - s) * *per_mille as u64 / 1000;
                model.truncate_before(to).expect("model retention");
                log.truncate_before(to).expect("retention");
            }
            Op::Compact => {
                let want = model.compact().expect("model compact");
                let got = log.compact().expect("compact");
                prop_assert_eq!((got.kept, got.dropped), (want.kept, want.dropped));
            }
            Op::CompactWith(before, tombstones) => {
                let (s, e) = (model.start_offset(), model.next_offset());
                let mut options = CompactOptions::new();
                if let Some(per_mille) = before {
                    options = options.before(s + (e - s) * u64::from(*per_mille) / 1000);
                }
                if let Some(per_mille) = tombstones {
                    options = options.tombstones(stamp * u64::from(*per_mille) / 1000);
                }
                let want = model.compact_with(options).expect("model compact");
                let got = log.compact_with(options).expect("compact");
                prop_assert_eq!(got, want);
            }
            Op::Lookup(per_mille) => {
                let at = (stamp + 2) * u64::from(*per_mille) / 1000;
                prop_assert_eq!(
                    log.offset_for_timestamp(at).expect("lookup"),
                    model.offset_for_timestamp(at).expect("model lookup")
                );
            }
            Op::Reopen => {
                drop(log);
                log = LogStore::open(tmp.path(), options.clone()).expect("reopen");
            }
        }
        prop_assert_eq!(log.start_offset(), model.start_offset());
        prop_assert_eq!(log.next_offset(), model.next_offset());
    }
    prop_assert_eq!(contents(&log), contents(&model));
    let mut replayed = Vec::new();
    let next = log
        .replay_from(log.start_offset(), |offset, e| {
            replayed.push(e.to_record(offset))
        })
        .expect("replay_from");
    prop_assert_eq!(&replayed, &contents(&model));
    prop_assert_eq!(
        next,
        replayed.last().map_or(log.start_offset(), |r| r.offset + 1)
    );
    drop(log);
    let log = LogStore::open(tmp.path(), options.clone()).expect("final reopen");
    prop_assert_eq!(contents(&log), contents(&model));
    log.verify().expect("verify");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_store_holds_what_the_model_holds_buffered(ops in prop::collection::vec(op(), 1..40)) {
        let options = LogOptions::new()
            .sync(SyncPolicy::Never)
            .segment_bytes(2048)
            .index_interval_bytes(200)
            .write_buffer_bytes(1000);
        run(&ops, &options)?;
    }

    #[test]
    fn log_store_holds_what_the_model_holds_durable(ops in prop::collection::vec(op(), 1..25)) {
        let options = LogOptions::new()
            .sync(SyncPolicy::Always)
            .segment_bytes(4096)
            .preallocate(true);
        run(&ops, &options)?;
    }
}
