//! Crash test with real processes: a child appends with `SyncPolicy::Always` from two
//! threads and prints every acknowledged offset; the parent SIGKILLs it at random moments
//! (60 kill points), reopens the log, and checks that every acknowledged record is there
//! byte for byte and that nothing but whole, self-consistent records is returned.
//!
//! The test binary is its own child: with `CAUCE_CRASH_CHILD_DIR` set, the test runs the
//! appender instead.

use std::collections::HashMap;

#[path = "support/kill.rs"]
mod kill;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use rand::{RngExt, SeedableRng};

const CHILD_ENV: &str = "CAUCE_CRASH_CHILD_DIR";
const KILL_POINTS: usize = 60;

fn options() -> LogOptions {
    // Small segments, so kills also land during rolls.
    LogOptions::new()
        .sync(SyncPolicy::Always)
        .segment_bytes(96 << 10)
        .index_interval_bytes(1024)
}

/// A payload that carries its own identity: writer, sequence number, then bytes derived
/// from both, so any record read back can be checked without knowing its offset.
fn payload(writer: u8, seq: u64) -> Vec<u8> {
    let len = 9 + (seq.wrapping_mul(2654435761) % 2000) as usize;
    let mut p = Vec::with_capacity(len);
    p.push(writer);
    p.extend_from_slice(&seq.to_le_bytes());
    let mut x = seq ^ ((writer as u64) << 56) ^ 0x9e37_79b9_7f4a_7c15;
    while p.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(x as u8);
    }
    p
}

fn identity(p: &[u8]) -> Option<(u8, u64)> {
    if p.len() < 9 {
        return None;
    }
    let seq = u64::from_le_bytes(p[1..9].try_into().ok()?);
    (payload(p[0], seq) == p).then_some((p[0], seq))
}

fn run_child(dir: &Path) {
    let log = match LogStore::open(dir, options()) {
        Ok(log) => log,
        Err(e) => {
            println!("error {e}");
            return;
        }
    };
    // Continue each writer's sequence after what the log already holds.
    let mut next_seq = [0u64; 2];
    for r in log.read_from(log.start_offset()).expect("read") {
        let r = r.expect("record");
        if let Some((w, s)) = identity(&r.payload) {
            next_seq[w as usize] = next_seq[w as usize].max(s + 1);
        }
    }
    std::thread::scope(|scope| {
        for writer in 0..2u8 {
            let log = &log;
            let mut seq = next_seq[writer as usize];
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seq ^ writer as u64);
                loop {
                    let n = rng.random_range(1..6u64);
                    let payloads: Vec<Vec<u8>> =
                        (seq..seq + n).map(|s| payload(writer, s)).collect();
                    let key = [b'k', writer];
                    let batch: Vec<Entry<'_>> = payloads
                        .iter()
                        .map(|p| Entry::with_timestamp(seq, &key, p))
                        .collect();
                    let offsets = log.append(&batch).expect("append");
                    let mut out = std::io::stdout().lock();
                    for (i, o) in offsets.enumerate() {
                        writeln!(out, "ack {o} {writer} {}", seq + i as u64).expect("stdout");
                    }
                    out.flush().expect("stdout");
                    seq += n;
                }
            });
        }
    });
}

#[test]
fn acknowledged_records_survive_sigkill_at_random_moments() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        run_child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc4a5);
    let mut acked: HashMap<u64, (u8, u64)> = HashMap::new();
    for round in 0..KILL_POINTS {
        // Kill while appends are under way: after the first acknowledgement, at a random
        // moment within the next few milliseconds.
        let after = Duration::from_micros(rng.random_range(0..8000));
        let lines = kill::run_and_kill(
            "acknowledged_records_survive_sigkill_at_random_moments",
            CHILD_ENV,
            &dir,
            "ack ",
            Duration::from_secs(30),
            after,
        );
        for line in lines {
            let mut parts = line.split_whitespace().skip(1);
            let mut next = || parts.next().and_then(|p| p.parse::<u64>().ok());
            let (Some(o), Some(w), Some(s)) = (next(), next(), next()) else {
                continue; // a line cut by the kill
            };
            acked.insert(o, (w as u8, s));
        }
        check_log(&dir, &acked, round);
    }
    assert!(acked.len() > KILL_POINTS, "the child acknowledged records");
}

/// Every acknowledged record is present byte for byte; every record present is whole.
fn check_log(dir: &Path, acked: &HashMap<u64, (u8, u64)>, round: usize) {
    let log = LogStore::open(dir, options())
        .unwrap_or_else(|e| panic!("reopen after kill {round} failed: {e}"));
    let mut expected_offset = 0;
    let mut seen = 0;
    for r in log.read_from(0).expect("read") {
        let r = r.unwrap_or_else(|e| panic!("after kill {round}: {e}"));
        assert_eq!(
            r.offset, expected_offset,
            "after kill {round}: offsets are contiguous"
        );
        expected_offset += 1;
        let id = identity(&r.payload)
            .unwrap_or_else(|| panic!("after kill {round}: record {} is not whole", r.offset));
        assert_eq!(&r.key[..], &[b'k', id.0], "key of offset {}", r.offset);
        if let Some(want) = acked.get(&r.offset) {
            assert_eq!(
                *want, id,
                "after kill {round}: acknowledged record {} changed",
                r.offset
            );
            seen += 1;
        }
    }
    assert_eq!(log.next_offset(), expected_offset);
    assert_eq!(
        seen,
        acked.len(),
        "after kill {round}: {} acknowledged records are missing",
        acked.len() - seen
    );
    log.verify().expect("verify after recovery");
}
