//! Writes a log, reopens it (recovery), replays it and prints what it found.
//!
//! ```sh
//! cargo run --release --example log_replay                 # 1,000,000 records in a temp dir
//! cargo run --release --example log_replay -- DIR 200000   # in DIR, 200,000 records
//! ```
//!
//! Records of 100 bytes are appended in batches of 100 under `SyncPolicy::Every` (10 ms,
//! as the cluster uses it), the store is closed, opened again (which runs recovery), read
//! from offset 0 to the end (owned records, then borrowed ones with `replay_from`), and
//! checked with `verify`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tmp;
    let dir = match args.next() {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("log")
        }
    };
    let records: u64 = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let options = LogOptions::new().sync(SyncPolicy::Every {
        records: 100_000,
        interval: Duration::from_millis(10),
    });

    let log = LogStore::open(&dir, options.clone())?;
    let first = log.next_offset();
    let started = Instant::now();
    let mut payload = [0u8; 100];
    let mut written = first;
    while written < first + records {
        let n = (first + records - written).min(100);
        let keys: Vec<[u8; 8]> = (written..written + n)
            .map(|o| (o % 1000).to_le_bytes())
            .collect();
        let mut batch = Vec::with_capacity(n as usize);
        for k in &keys {
            batch.push(Entry::new(k, &payload));
        }
        log.append(&batch)?;
        written += n;
        payload[0] = payload[0].wrapping_add(1);
    }
    log.sync()?;
    let wrote = started.elapsed();
    drop(log);
    println!(
        "wrote    {records} records of 100 B to {} in {:.3} s ({:.2} M records/s)",
        dir.display(),
        wrote.as_secs_f64(),
        records as f64 / wrote.as_secs_f64() / 1e6
    );

    let started = Instant::now();
    let log = LogStore::open(&dir, options)?;
    let opened = started.elapsed();
    println!(
        "reopened in {:.1} ms: offsets {}..{}",
        opened.as_secs_f64() * 1e3,
        log.start_offset(),
        log.next_offset()
    );

    let started = Instant::now();
    let (mut count, mut bytes) = (0u64, 0u64);
    let (mut lowest, mut highest) = (None, None);
    for record in log.read_from(log.start_offset())? {
        let record = record?;
        lowest.get_or_insert(record.offset);
        highest = Some(record.offset);
        count += 1;
        bytes += (record.key.len() + record.payload.len()) as u64;
    }
    let replayed = started.elapsed();
    println!(
        "replayed {count} records ({:.1} MB of keys and payloads), offsets {:?}..={:?}, in {:.3} s ({:.2} M records/s)",
        bytes as f64 / 1e6,
        lowest.unwrap_or_default(),
        highest.unwrap_or_default(),
        replayed.as_secs_f64(),
        count as f64 / replayed.as_secs_f64() / 1e6
    );
    let started = Instant::now();
    let (mut folded, mut folded_records) = (0u64, 0u64);
    let next = log.replay_from(log.start_offset(), |_offset, entry| {
        folded += entry.payload.len() as u64;
        folded_records += 1;
    })?;
    let borrowed = started.elapsed();
    println!(
        "replayed again with replay_from (records borrowed, no copies) up to offset {next}: {:.1} MB of payloads in {:.3} s ({:.2} M records/s)",
        folded as f64 / 1e6,
        borrowed.as_secs_f64(),
        folded_records as f64 / borrowed.as_secs_f64() / 1e6
    );
    // Both replays saw every record the log holds (those written now among them), and
    // nothing else.
    let held = log.next_offset() - log.start_offset();
    if count != held || folded_records != held || held < records || next != log.next_offset() {
        eprintln!(
            "replays disagree with the log: {count} and {folded_records} of {held} records, up to {next} of {}",
            log.next_offset()
        );
        std::process::exit(1);
    }
    let check = log.verify()?;
    println!(
        "verified {} segments, {} batches, {} records, {:.1} MB on disk: every checksum holds",
        check.segments,
        check.batches,
        check.records,
        check.bytes as f64 / 1e6
    );
    Ok(())
}
