//! The log comparisons: `LogStore` against the physical limit (raw `write`, raw
//! `write` + `fdatasync`, raw sequential `read` of the same files) and against the peers
//! (`commitlog` 0.2.0 for unsynced appends and replay, `okaywal` 0.3.1 for durable ones).
//! The durable limit overwrites a file written with zeros and synced before its timer
//! starts (no allocation for an fdatasync to commit); the same loop into a growing file
//! is reported beside it.
//!
//! Files go to a temporary directory inside the target directory (the same disk as the
//! build, never /dev/shm).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};

use crate::harness::{Bench, Better, Goal, peak_rss_kib, quantile, rate, time};

/// Makes a fresh, empty directory for each measured run.
struct Dirs {
    root: tempfile::TempDir,
    made: AtomicUsize,
}

impl Dirs {
    fn new() -> Dirs {
        Dirs {
            root: crate::harness::bench_dir(),
            made: AtomicUsize::new(0),
        }
    }

    fn fresh(&self) -> PathBuf {
        let n = self.made.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.path().join(format!("run{n}"));
        std::fs::create_dir_all(&dir).expect("run dir");
        dir
    }
}

fn remove(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// `count` payloads of `size` bytes, cycling through a pool of 1021 distinct ones: the
/// same bytes to write as `count` distinct payloads, without holding them all in memory.
fn payloads(count: usize, size: usize) -> Vec<Bytes> {
    let pool: Vec<Bytes> = (0..count.clamp(1, 1021))
        .map(|i| Bytes::from((0..size).map(|j| (i * 31 + j) as u8).collect::<Vec<u8>>()))
        .collect();
    (0..count).map(|i| pool[i % pool.len()].clone()).collect()
}

/// How the raw loop's file is made, before its timer starts.
#[derive(Clone, Copy)]
enum RawFile {
    /// Created empty: every write extends it (and an fdatasync commits its new size).
    Growing,
    /// Written with zeros to its full size and fdatasync'd, then overwritten in place:
    /// the disk's limit for durable writes (no size or extent change to commit), which
    /// cauce's preallocated segments and the zeros it writes ahead approach.
    Prefilled,
}

/// The limit: records framed with a 4-byte length and a 4-byte CRC32C, gathered in a
/// 1 MiB buffer and written with plain `write` calls (with an `fdatasync` every
/// `sync_every` records, if given). The file is made before the timer starts, as
/// cauce's segment is by its `open`.
fn raw_write(dir: &Path, payloads: &[Bytes], sync_every: Option<usize>, file: RawFile) -> f64 {
    let path = dir.join("raw.log");
    let mut file = match file {
        RawFile::Growing => File::create(&path).expect("create"),
        RawFile::Prefilled => {
            let framed: usize = payloads.iter().map(|p| 8 + p.len()).sum();
            let mut file = File::create(&path).expect("create");
            let zeros = vec![0u8; 1 << 20];
            let mut left = framed;
            while left > 0 {
                let n = left.min(zeros.len());
                file.write_all(&zeros[..n]).expect("zero-fill");
                left -= n;
            }
            file.sync_all().expect("fsync");
            File::sync_all(&File::open(dir).expect("open dir")).expect("fsync dir");
            drop(file);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("reopen")
        }
    };
    let t = Instant::now();
    let mut buf = Vec::with_capacity(1 << 20);
    for (i, p) in payloads.iter().enumerate() {
        buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(p).to_le_bytes());
        buf.extend_from_slice(p);
        let flush = match sync_every {
            Some(n) => (i + 1) % n == 0,
            None => buf.len() >= 1 << 20,
        };
        if flush {
            file.write_all(&buf).expect("write");
            buf.clear();
            if sync_every.is_some() {
                file.sync_data().expect("fdatasync");
            }
        }
    }
    file.write_all(&buf).expect("write");
    if sync_every.is_some() {
        file.sync_data().expect("fdatasync");
    }
    drop(file);
    let rate = payloads.len() as f64 / t.elapsed().as_secs_f64();
    remove(dir);
    rate
}

fn ours_append(dir: &Path, payloads: &[Bytes], batch: usize, sync: SyncPolicy) -> f64 {
    let log = LogStore::open(dir, LogOptions::new().sync(sync)).expect("open");
    let t = Instant::now();
    let mut entries = Vec::with_capacity(batch);
    for chunk in payloads.chunks(batch) {
        entries.clear();
        entries.extend(chunk.iter().map(|p| Entry::with_timestamp(0, b"", p)));
        log.append(&entries).expect("append");
    }
    drop(log); // writes what is buffered
    let rate = payloads.len() as f64 / t.elapsed().as_secs_f64();
    remove(dir);
    rate
}

fn commitlog_append(dir: &Path, payloads: &[Bytes], batch: usize) -> f64 {
    let mut opts = commitlog::LogOptions::new(dir);
    opts.segment_max_bytes(64 << 20);
    opts.message_max_bytes(8 << 20);
    let mut log = commitlog::CommitLog::new(opts).expect("commitlog");
    let t = Instant::now();
    if batch == 1 {
        for p in payloads {
            log.append_msg(p).expect("append");
        }
    } else {
        for chunk in payloads.chunks(batch) {
            let mut buf: commitlog::message::MessageBuf = chunk.iter().collect();
            log.append(&mut buf).expect("append");
        }
    }
    log.flush().expect("flush");
    drop(log);
    let rate = payloads.len() as f64 / t.elapsed().as_secs_f64();
    remove(dir);
    rate
}

fn okaywal_open(dir: &Path) -> okaywal::WriteAheadLog {
    okaywal::WriteAheadLog::recover(dir, okaywal::LogVoid).expect("okaywal")
}

fn okaywal_append(wal: &okaywal::WriteAheadLog, chunk: &[Bytes]) {
    let mut entry = wal.begin_entry().expect("entry");
    for p in chunk {
        entry.write_chunk(p).expect("chunk");
    }
    entry.commit().expect("commit");
}

/// Durable appends from `threads` threads, `per_thread` records each, `batch` per
/// append. Returns records/s and records per fdatasync.
fn ours_durable(dir: &Path, threads: usize, per_thread: &[Bytes], batch: usize) -> (f64, f64) {
    ours_durable_with(dir, threads, per_thread, batch, LogOptions::new())
}

fn ours_durable_with(
    dir: &Path,
    threads: usize,
    per_thread: &[Bytes],
    batch: usize,
    options: LogOptions,
) -> (f64, f64) {
    let log = LogStore::open(dir, options.sync(SyncPolicy::Always)).expect("open");
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let log = &log;
            s.spawn(move || {
                let mut entries = Vec::with_capacity(batch);
                for chunk in per_thread.chunks(batch) {
                    entries.clear();
                    entries.extend(chunk.iter().map(|p| Entry::with_timestamp(0, b"", p)));
                    log.append(&entries).expect("append");
                }
            });
        }
    });
    let elapsed = t.elapsed().as_secs_f64();
    let stats = log.stats();
    drop(log);
    remove(dir);
    let records = (threads * per_thread.len()) as f64;
    (records / elapsed, records / stats.syncs.max(1) as f64)
}

fn okaywal_durable(dir: &Path, threads: usize, per_thread: &[Bytes], batch: usize) -> f64 {
    let wal = okaywal_open(dir);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let wal = wal.clone();
            s.spawn(move || {
                for chunk in per_thread.chunks(batch) {
                    okaywal_append(&wal, chunk);
                }
            });
        }
    });
    let elapsed = t.elapsed().as_secs_f64();
    drop(wal);
    remove(dir);
    (threads * per_thread.len()) as f64 / elapsed
}

fn unsynced(bench: &mut Bench, dirs: &Dirs) {
    let n100 = bench.size(1_000_000, 200_000);
    let n1k = bench.size(1_000_000, 40_000);
    let small = payloads(n100, 100);
    let large = payloads(n1k, 1024);
    let never = SyncPolicy::Never;
    let mib = |rate: f64| rate * 1024.0 / 1e6;
    for (label, data, batch) in [
        ("100b.one", &small, 1),
        ("100b.batch", &small, 1000),
        ("1k.one", &large, 1),
        ("1k.batch", &large, 1000),
    ] {
        let kib = label.starts_with("1k");
        let (unit, scale): (&str, &dyn Fn(f64) -> f64) = if kib {
            ("MB/s", &mib)
        } else {
            ("rec/s", &|r| r)
        };
        let id = format!("log.append.{label}.unsynced.vs_raw");
        if bench.wants(&id) {
            let goal = kib.then_some(Goal::RatioAtLeast(0.8));
            bench.compare(
                &id,
                unit,
                Better::More,
                goal,
                || scale(ours_append(&dirs.fresh(), data, batch, never)),
                || scale(raw_write(&dirs.fresh(), data, None, RawFile::Growing)),
            );
        }
        let id = format!("log.append.{label}.unsynced.vs_commitlog");
        if bench.wants(&id) {
            let goal = (label == "100b.one").then_some(Goal::RatioAtLeast(4.0));
            bench.compare(
                &id,
                unit,
                Better::More,
                goal,
                || scale(ours_append(&dirs.fresh(), data, batch, never)),
                || scale(commitlog_append(&dirs.fresh(), data, batch)),
            );
        }
    }
}

fn durable(bench: &mut Bench, dirs: &Dirs) {
    let one = payloads(bench.size(3000, 300), 100);
    // The limit is the raw loop overwriting a file written ahead (cauce preallocates its
    // segments and writes zeros ahead of its appends); into a growing file, as a log
    // without preallocation writes, is the second line.
    for (file, suffix, goal) in [
        (RawFile::Prefilled, "", Some(Goal::RatioAtLeast(0.9))),
        (RawFile::Growing, "_growing", None),
    ] {
        bench.compare(
            &format!("log.durable.100b.one.vs_raw_fdatasync{suffix}"),
            "rec/s",
            Better::More,
            goal,
            || ours_durable(&dirs.fresh(), 1, &one, 1).0,
            || raw_write(&dirs.fresh(), &one, Some(1), file),
        );
    }
    let id = "log.durable.100b.one.vs_okaywal";
    bench.compare(
        id,
        "rec/s",
        Better::More,
        None,
        || ours_durable(&dirs.fresh(), 1, &one, 1).0,
        || okaywal_durable(&dirs.fresh(), 1, &one, 1),
    );
    let id = "log.durable.100b.one.preallocated.vs_not";
    bench.compare(
        id,
        "rec/s",
        Better::More,
        None,
        || {
            let options = LogOptions::new().preallocate(true);
            ours_durable_with(&dirs.fresh(), 1, &one, 1, options).0
        },
        || {
            let options = LogOptions::new().preallocate(false);
            ours_durable_with(&dirs.fresh(), 1, &one, 1, options).0
        },
    );
    let per_thread = payloads(bench.size(600, 60), 100);
    for threads in [4, 16] {
        let id = format!("log.durable.100b.threads{threads}.vs_okaywal");
        bench.compare(
            &id,
            "rec/s",
            Better::More,
            None,
            || ours_durable(&dirs.fresh(), threads, &per_thread, 1).0,
            || okaywal_durable(&dirs.fresh(), threads, &per_thread, 1),
        );
    }
    let id = "log.durable.100b.group_commit.threads16.vs_threads1";
    if bench.wants(id) {
        let mut per_fsync = Vec::new();
        bench.compare(
            id,
            "rec/s",
            Better::More,
            Some(Goal::RatioAtLeast(10.0)),
            || {
                let (rate, rpf) = ours_durable(&dirs.fresh(), 16, &per_thread, 1);
                per_fsync.push(rpf);
                rate
            },
            || ours_durable(&dirs.fresh(), 1, &per_thread, 1).0,
        );
        let rpf = crate::harness::median_of_rounds(&per_fsync);
        // The 10x goal above needs at least 10 appends to share each fdatasync.
        bench.record(
            "log.durable.100b.threads16.records_per_fsync.vs_raw",
            "rec/fsync",
            Better::More,
            Some(Goal::OursAtLeast(10.0)),
            rpf,
            1.0,
        );
    }
    let batches = payloads(bench.size(200_000, 30_000), 100);
    // Into new space (a growing file; cauce's preallocated but unwritten extents) each
    // fdatasync also commits the blocks' allocation: a log that is not overwriting old
    // files pays that, as the growing loop does.
    for (file, suffix) in [(RawFile::Prefilled, ""), (RawFile::Growing, "_growing")] {
        bench.compare(
            &format!("log.durable.100b.batch1000.vs_raw_fdatasync{suffix}"),
            "rec/s",
            Better::More,
            None,
            || ours_durable(&dirs.fresh(), 1, &batches, 1000).0,
            || raw_write(&dirs.fresh(), &batches, Some(1000), file),
        );
    }
    let id = "log.durable.100b.batch1000.vs_okaywal";
    bench.compare(
        id,
        "rec/s",
        Better::More,
        Some(Goal::RatioAtLeast(1.2)),
        || ours_durable(&dirs.fresh(), 1, &batches, 1000).0,
        || okaywal_durable(&dirs.fresh(), 1, &batches, 1000),
    );
}

/// Reads every file of `dir` sequentially in 1 MiB reads: the limit of a replay.
fn raw_read(dir: &Path) -> usize {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for f in files {
        let mut file = File::open(f).expect("open");
        loop {
            let n = file.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += std::hint::black_box(&buf[..n]).len();
        }
    }
    total
}

/// Replays a plain file of `len u32, crc32c u32, payload` frames (as `raw_write` writes
/// it) in 1 MiB reads, checking every CRC: the limit of a checksummed replay, as the
/// issue measured it ("a plain file, 8-byte len+CRC32C frame, 1 MiB buffer").
fn raw_framed_replay(path: &Path) -> usize {
    let mut file = File::open(path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let (mut filled, mut count) = (0usize, 0usize);
    loop {
        let n = file.read(&mut buf[filled..]).expect("read");
        filled += n;
        let mut at = 0;
        while filled - at >= 8 {
            let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4")) as usize;
            let crc = u32::from_le_bytes(buf[at + 4..at + 8].try_into().expect("4"));
            if filled - at - 8 < len {
                break;
            }
            assert_eq!(crc32c::crc32c(&buf[at + 8..at + 8 + len]), crc, "raw frame");
            count += 1;
            at += 8 + len;
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
        if n == 0 {
            return count;
        }
    }
}

/// Replays the `n` records of 100 B of `log` through `replay_from` (borrowed);
/// records/s.
fn replay_borrowed(log: &LogStore, n: usize) -> f64 {
    let t = Instant::now();
    let (mut count, mut bytes) = (0usize, 0usize);
    let next = log
        .replay_from(0, |_, e| {
            bytes += e.payload.len();
            count += 1;
        })
        .expect("replay");
    assert_eq!((count, bytes, next), (n, n * 100, n as u64));
    n as f64 / t.elapsed().as_secs_f64()
}

fn replay(bench: &mut Bench, dirs: &Dirs) {
    let ids = [
        "log.replay.100b.vs_raw_read",
        "log.replay.100b.vs_commitlog",
        "log.open.recovery.vs_raw_read",
        "log.replay.100b.borrowed.vs_raw_read",
        "log.replay.100b.borrowed.vs_commitlog",
        "log.replay.100b.vs_raw_framed_replay",
        "log.replay.100b.borrowed.vs_raw_framed_replay",
        "log.replay.100b.peak_rss_mib.vs_commitlog",
        "log.replay.100b.borrowed.keep_mapped.vs_raw_read",
    ];
    if !ids.iter().any(|id| bench.wants(id)) {
        return;
    }
    let n = bench.size(1_000_000, 200_000);
    let data = payloads(n, 100);
    // Not preallocated, so the raw read reads exactly the log's bytes.
    let ours_dir = dirs.fresh();
    {
        let log = LogStore::open(
            &ours_dir,
            LogOptions::new().sync(SyncPolicy::Never).preallocate(false),
        )
        .expect("open");
        for chunk in data.chunks(1000) {
            let entries: Vec<_> = chunk
                .iter()
                .map(|p| Entry::with_timestamp(0, b"", p))
                .collect();
            log.append(&entries).expect("append");
        }
    }
    let theirs_dir = dirs.fresh();
    {
        let mut opts = commitlog::LogOptions::new(&theirs_dir);
        opts.segment_max_bytes(64 << 20);
        opts.message_max_bytes(8 << 20);
        let mut log = commitlog::CommitLog::new(opts).expect("commitlog");
        for chunk in data.chunks(1000) {
            let mut buf: commitlog::message::MessageBuf = chunk.iter().collect();
            log.append(&mut buf).expect("append");
        }
        log.flush().expect("flush");
    }
    let raw_dir = dirs.fresh();
    {
        let mut file = File::create(raw_dir.join("raw.log")).expect("create");
        let mut buf = Vec::with_capacity(1 << 20);
        for p in &data {
            buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32c::crc32c(p).to_le_bytes());
            buf.extend_from_slice(p);
        }
        file.write_all(&buf).expect("write");
    }
    drop(data);
    let ours = LogStore::open(&ours_dir, LogOptions::new().preallocate(false)).expect("open");
    let theirs = {
        let mut opts = commitlog::LogOptions::new(&theirs_dir);
        opts.segment_max_bytes(64 << 20);
        opts.message_max_bytes(8 << 20);
        commitlog::CommitLog::new(opts).expect("commitlog")
    };
    let replay_ours = || {
        let t = Instant::now();
        let mut count = 0usize;
        let mut bytes = 0usize;
        for r in ours.read_from(0).expect("read") {
            let r = r.expect("record");
            bytes += r.payload.len();
            count += 1;
        }
        assert_eq!((count, bytes), (n, n * 100));
        n as f64 / t.elapsed().as_secs_f64()
    };
    let replay_ours_borrowed = || replay_borrowed(&ours, n);
    let replay_theirs = || {
        use commitlog::message::MessageSet;
        let t = Instant::now();
        let mut offset = 0;
        let mut count = 0usize;
        let mut bytes = 0usize;
        loop {
            let msgs = theirs
                .read(offset, commitlog::ReadLimit::max_bytes(256 << 10))
                .expect("read");
            if msgs.is_empty() {
                break;
            }
            for m in msgs.iter() {
                bytes += m.payload().len();
                count += 1;
                offset = m.offset() + 1;
            }
        }
        assert_eq!((count, bytes), (n, n * 100));
        n as f64 / t.elapsed().as_secs_f64()
    };
    // Peak memory of the process during each replay: reset the high-water mark (Linux),
    // replay once, read the peak (VmHWM).
    let peak_rss_mib = |replay: &dyn Fn() -> f64| {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        replay();
        peak_rss_kib() as f64 / 1024.0
    };
    if bench.wants(ids[7]) {
        let ours_mib = peak_rss_mib(&replay_ours);
        let theirs_mib = peak_rss_mib(&replay_theirs);
        bench.record(ids[7], "MiB", Better::Less, None, ours_mib, theirs_mib);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = peak_rss_kib();
    bench.compare(
        ids[0],
        "rec/s",
        Better::More,
        Some(Goal::RatioAtLeast(0.8)),
        replay_ours,
        || rate(n, || _ = std::hint::black_box(raw_read(&ours_dir))),
    );
    let ours_peak = peak_rss_kib();
    if bench.wants(ids[1]) {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        bench.compare(
            ids[1],
            "rec/s",
            Better::More,
            Some(Goal::RatioAtLeast(1.0)),
            replay_ours,
            replay_theirs,
        );
    }
    // The same replay through `replay_from` (records borrowed, no per-record refcount).
    bench.compare(
        ids[3],
        "rec/s",
        Better::More,
        Some(Goal::RatioAtLeast(0.8)),
        replay_ours_borrowed,
        || rate(n, || _ = std::hint::black_box(raw_read(&ours_dir))),
    );
    bench.compare(
        ids[4],
        "rec/s",
        Better::More,
        Some(Goal::RatioAtLeast(1.0)),
        replay_ours_borrowed,
        replay_theirs,
    );
    let raw_file = raw_dir.join("raw.log");
    let framed = || {
        let t = Instant::now();
        assert_eq!(raw_framed_replay(&raw_file), n);
        n as f64 / t.elapsed().as_secs_f64()
    };
    if bench.wants(ids[5]) {
        let goal = Some(Goal::RatioAtLeast(0.8));
        bench.compare(ids[5], "rec/s", Better::More, goal, replay_ours, framed);
    }
    if bench.wants(ids[6]) {
        let goal = Some(Goal::RatioAtLeast(0.8));
        bench.compare(
            ids[6],
            "rec/s",
            Better::More,
            goal,
            replay_ours_borrowed,
            framed,
        );
    }
    let ours_peak = ours_peak.max(peak_rss_kib());
    let mut kept_peak = None;
    if bench.wants(ids[8]) {
        // The same borrowed replay with the sealed segments kept mapped between replays
        // (`LogOptions::keep_mapped`), through a read-only view of the same files.
        let kept = LogStore::open_read_only(&ours_dir, LogOptions::new().keep_mapped(true))
            .expect("open read-only");
        bench.compare(
            ids[8],
            "rec/s",
            Better::More,
            None,
            || replay_borrowed(&kept, n),
            || rate(n, || _ = std::hint::black_box(raw_read(&ours_dir))),
        );
        kept_peak = Some(peak_rss_kib());
    }
    let id = ids[2];
    if bench.wants(id) {
        // Opening is recovery: the newest segment is scanned and checked whole.
        drop(ours);
        bench.compare(
            id,
            "ms",
            Better::Less,
            None,
            || {
                let options = LogOptions::new().preallocate(false);
                let opened = time(|| drop(LogStore::open(&ours_dir, options).expect("open")));
                opened.as_secs_f64() * 1e3
            },
            || time(|| _ = std::hint::black_box(raw_read(&ours_dir))).as_secs_f64() * 1e3,
        );
    } else {
        drop(ours);
    }
    println!(
        "log.replay: peak RSS {} MiB before, {} MiB during the replays ({n} records){}",
        before / 1024,
        ours_peak / 1024,
        kept_peak.map_or(String::new(), |kib| format!(
            ", {} MiB with the segments kept mapped",
            kib / 1024
        ))
    );
    drop(theirs);
    remove(&ours_dir);
    remove(&theirs_dir);
    remove(&raw_dir);
}

/// Append-to-follower latency: one appender, one follower blocked in `wait_for`, each
/// record carrying the time it was appended; the next append waits for the follower to
/// have seen the last one, then 100 us more, so the follower is parked (not spinning)
/// when the record comes. Returns the p99 in microseconds.
fn ours_tail_latency(dir: &Path, samples: usize) -> f64 {
    let every = SyncPolicy::Every {
        records: u64::MAX,
        interval: std::time::Duration::from_millis(10),
    };
    let log = LogStore::open(dir, LogOptions::new().sync(every)).expect("open");
    let base = Instant::now();
    let seen = std::sync::atomic::AtomicU64::new(0);
    let mut lat = std::thread::scope(|s| {
        let follower = s.spawn(|| {
            let mut reader = log.read_from(0).expect("read");
            let mut lat = Vec::with_capacity(samples);
            while lat.len() < samples {
                log.wait_for(
                    lat.len() as u64,
                    Some(std::time::Duration::from_millis(100)),
                );
                for r in reader.by_ref() {
                    let r = r.expect("record");
                    let sent = u64::from_le_bytes(r.payload[..8].try_into().expect("8 bytes"));
                    lat.push((base.elapsed().as_nanos() as u64 - sent) as f64 / 1e3);
                    seen.store(r.offset + 1, Ordering::Release);
                }
            }
            lat
        });
        let mut payload = [0u8; 100];
        for i in 0..samples as u64 {
            payload[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
            log.append(&[Entry::with_timestamp(0, b"", &payload)])
                .expect("append");
            while seen.load(Ordering::Acquire) <= i {
                std::thread::yield_now();
            }
            std::thread::sleep(FOLLOWER_PARKS);
        }
        follower.join().expect("follower")
    });
    drop(log);
    remove(dir);
    quantile(&mut lat, 0.99)
}

/// The pause between a follower seeing a record and the next append.
const FOLLOWER_PARKS: std::time::Duration = std::time::Duration::from_micros(100);

/// The same with a bare crossbeam channel: the limit of a hand-off between threads.
fn channel_tail_latency(samples: usize) -> f64 {
    let (tx, rx) = crossbeam_channel::bounded::<u64>(1024);
    let base = Instant::now();
    let seen = std::sync::atomic::AtomicU64::new(0);
    let mut lat = std::thread::scope(|s| {
        let follower = s.spawn(|| {
            let mut lat = Vec::with_capacity(samples);
            while let Ok(sent) = rx.recv() {
                lat.push((base.elapsed().as_nanos() as u64 - sent) as f64 / 1e3);
                seen.store(lat.len() as u64, Ordering::Release);
            }
            lat
        });
        for i in 0..samples as u64 {
            tx.send(base.elapsed().as_nanos() as u64).expect("send");
            while seen.load(Ordering::Acquire) <= i {
                std::thread::yield_now();
            }
            std::thread::sleep(FOLLOWER_PARKS);
        }
        drop(tx);
        follower.join().expect("follower")
    });
    quantile(&mut lat, 0.99)
}

fn tail(bench: &mut Bench, dirs: &Dirs) {
    let id = "log.tail.follow_p99_us.vs_channel";
    if !bench.wants(id) {
        return;
    }
    let samples = if bench.quick() { 1_000 } else { 10_000 };
    bench.compare(
        id,
        "us",
        Better::Less,
        Some(Goal::OursAtMost(50.0)),
        || ours_tail_latency(&dirs.fresh(), samples),
        || channel_tail_latency(samples),
    );
}

/// Runs the log group.
pub fn run(bench: &mut Bench) {
    if !bench.group("log") {
        return;
    }
    let dirs = Dirs::new();
    unsynced(bench, &dirs);
    durable(bench, &dirs);
    replay(bench, &dirs);
    tail(bench, &dirs);
}
