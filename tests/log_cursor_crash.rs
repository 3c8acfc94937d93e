//! Crash test with real processes for cursors and snapshots under a sync policy that
//! syncs late (`SyncPolicy::Never`, a large write buffer): a child appends records and,
//! every few batches, commits a cursor and saves a snapshot at the log's end, printing
//! each once its call returned; the parent SIGKILLs it at random moments and reopens.
//!
//! A cursor or a snapshot must never name records a crash can lose: after every kill,
//! the committed cursor and the latest snapshot are at or before the log's end, and every
//! record before them is there. (Records after them may be lost: nothing promised them.)
//!
//! The test binary is its own child: with `CAUCE_CURSOR_CRASH_DIR` set, the test runs
//! the appender instead.

#[path = "support/kill.rs"]
mod kill;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use rand::{RngExt, SeedableRng};

const CHILD_ENV: &str = "CAUCE_CURSOR_CRASH_DIR";
const KILL_POINTS: usize = 20;

fn options() -> LogOptions {
    LogOptions::new()
        .sync(SyncPolicy::Never)
        .write_buffer_bytes(4 << 20)
        .segment_bytes(1 << 20)
}

fn payload(offset_hint: u64) -> Vec<u8> {
    let len = 20 + (offset_hint % 300) as usize;
    (0..len).map(|i| (offset_hint as usize + i) as u8).collect()
}

fn run_child(dir: &Path) {
    let log = match LogStore::open(dir, options()) {
        Ok(log) => log,
        Err(e) => {
            println!("error {e}");
            return;
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(log.next_offset());
    let mut out = std::io::stdout();
    loop {
        for _ in 0..rng.random_range(1..20) {
            let n = rng.random_range(1..50u64);
            let next = log.next_offset();
            let payloads: Vec<Vec<u8>> = (next..next + n).map(payload).collect();
            let batch: Vec<Entry<'_>> = payloads.iter().map(|p| Entry::new(b"k", p)).collect();
            log.append(&batch).expect("append");
        }
        let end = log.next_offset();
        log.commit_cursor("reader", end).expect("commit cursor");
        log.save_snapshot("state", end, &end.to_le_bytes())
            .expect("save snapshot");
        writeln!(out, "ack {end}").expect("stdout");
        out.flush().expect("stdout");
    }
}

#[test]
fn cursors_and_snapshots_never_name_records_a_crash_loses() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        run_child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0c0);
    let mut committed = 0;
    for round in 0..KILL_POINTS {
        let after = Duration::from_micros(rng.random_range(0..20_000));
        let lines = kill::run_and_kill(
            "cursors_and_snapshots_never_name_records_a_crash_loses",
            CHILD_ENV,
            &dir,
            "ack ",
            Duration::from_secs(30),
            after,
        );
        for line in &lines {
            if let Some(end) = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                committed = std::cmp::max(committed, end);
            }
        }
        let log = LogStore::open(&dir, options())
            .unwrap_or_else(|e| panic!("reopen after kill {round} failed: {e}"));
        let end = log.next_offset();
        let cursor = log.cursor("reader").expect("cursor").unwrap_or(0);
        let snapshot = log.latest_snapshot("state").expect("snapshot");
        assert!(
            cursor >= committed,
            "kill {round}: the cursor went back from {committed} to {cursor}"
        );
        assert!(
            cursor <= end,
            "kill {round}: the cursor names offset {cursor}, past the log's end {end}"
        );
        if let Some(s) = snapshot {
            assert!(
                s.offset <= end,
                "kill {round}: the snapshot names offset {}, past the log's end {end}",
                s.offset
            );
        }
        // Every record before the cursor is there, whole.
        let mut n = 0;
        for r in log.read_from(0).expect("read") {
            let r = r.expect("record");
            assert_eq!(r.offset, n);
            assert_eq!(r.payload, payload(r.offset), "record {}", r.offset);
            n += 1;
        }
        assert_eq!(n, end);
        committed = cursor;
    }
    assert!(committed > 0, "the child committed cursors");
}
