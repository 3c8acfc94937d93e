//! Appenders, readers, compaction, retention and syncs all at once, under each sync
//! policy: every record read is whole and in order, and the log verifies and reopens.

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Writer `w`'s record number `seq`: its payload says who wrote it, and is padded to a
/// length that depends on `seq`.
fn payload(w: u64, seq: u64) -> Vec<u8> {
    format!("{w}:{seq}:{}", "y".repeat((seq % 200) as usize)).into_bytes()
}
/// Panics unless a record read back is one that was written, whole.
fn check(key: &[u8], p: &[u8]) {
    let s = std::str::from_utf8(p).expect("utf8");
    let mut it = s.splitn(3, ':');
    let w: u64 = it.next().unwrap().parse().unwrap();
    let seq: u64 = it.next().unwrap().parse().unwrap();
    assert_eq!(p, &payload(w, seq)[..], "payload self-consistent");
    assert_eq!(key, format!("w{w}k{}", seq % 7).as_bytes());
}

#[test]
fn appenders_readers_compaction_and_retention_together_keep_every_record_whole() {
    let policies = [
        SyncPolicy::Never,
        SyncPolicy::Every {
            records: 50,
            interval: Duration::from_millis(2),
        },
        SyncPolicy::Always,
    ];
    for (round, policy) in policies.into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let seg = [16384u64, 262144][round % 2];
        let log = Arc::new(
            LogStore::open(
                tmp.path(),
                LogOptions::new()
                    .sync(policy)
                    .segment_bytes(seg)
                    // Sealed segments read through kept mappings in two rounds of three.
                    .keep_mapped(round != 1)
                    // Sealed files closed and opened again as readers go, in two.
                    .max_open_segments(if round == 2 { 128 } else { 2 }),
            )
            .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        // Records the readers have read so far, for the main thread to see.
        let read_so_far = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (log, stop) = (log.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) && seq < 8_000 {
                        let n = 1 + seq % 4;
                        let keys: Vec<_> =
                            (seq..seq + n).map(|s| format!("w{w}k{}", s % 7)).collect();
                        let ps: Vec<_> = (seq..seq + n).map(|s| payload(w, s)).collect();
                        let batch: Vec<_> = (0..n as usize)
                            .map(|j| Entry::new(keys[j].as_bytes(), &ps[j]))
                            .collect();
                        log.append(&batch).unwrap();
                        seq += n;
                    }
                    seq
                })
            })
            .collect();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (log, stop) = (log.clone(), stop.clone());
                let read_so_far = read_so_far.clone();
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let from = log.start_offset();
                        let it = match log.read_from(from) {
                            Ok(it) => it,
                            // Retention moved the start since it was read.
                            Err(cauce::Error::OffsetOutOfRange { .. }) => continue,
                            Err(e) => panic!("read_from: {e}"),
                        };
                        let mut last: Option<u64> = None;
                        for r in it {
                            let r = match r {
                                Ok(r) => r,
                                Err(cauce::Error::OffsetOutOfRange { .. }) => break,
                                Err(e) => panic!("read: {e}"),
                            };
                            assert!(last.is_none_or(|l| r.offset > l));
                            check(&r.key, &r.payload);
                            last = Some(r.offset);
                            reads += 1;
                        }
                        let mut n = 0u64;
                        let replayed =
                            LogStore::replay_from(&log, log.start_offset(), |_, e: Entry<'_>| {
                                check(e.key, e.payload);
                                n += 1;
                            });
                        match replayed {
                            Ok(_) | Err(cauce::Error::OffsetOutOfRange { .. }) => {}
                            Err(e) => panic!("replay_from: {e}"),
                        }
                        reads += n;
                        read_so_far.store(reads, Ordering::Relaxed);
                    }
                    reads
                })
            })
            .collect();
        for step in 0..20 {
            std::thread::sleep(Duration::from_millis(10));
            if step % 4 == 0 {
                log.compact().unwrap();
            }
            if step % 7 == 6 {
                let n = log.next_offset();
                log.truncate_before(n / 2).unwrap();
            }
            if step % 5 == 2 {
                log.sync().unwrap();
            }
        }
        // On a loaded machine the readers may not have read anything in those 200 ms:
        // let them go on (beside the writers) until one has, so that "nothing happened"
        // below means the store let nobody read, not that the threads ran late.
        let waiting = std::time::Instant::now();
        while read_so_far.load(Ordering::Relaxed) == 0
            && waiting.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        let appended: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        let log = Arc::try_unwrap(log).unwrap();
        log.verify().unwrap();
        let kept = log.read_from(log.start_offset()).unwrap().count();
        drop(log);
        // Reopen: recovery must accept it, and everything kept reads back whole.
        let reopened = LogStore::open(
            tmp.path(),
            LogOptions::new().sync(policy).segment_bytes(seg),
        )
        .unwrap();
        let mut n = 0;
        for r in reopened.read_from(reopened.start_offset()).unwrap() {
            let r = r.unwrap();
            check(&r.key, &r.payload);
            n += 1;
        }
        assert!(appended > 0 && reads > 0, "{policy:?}: nothing happened");
        assert_eq!(n, kept, "{policy:?}: the reopened log holds other records");
    }
}

/// The `.log` files in `dir`.
fn segment_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count()
}

/// Many `Always` appenders on tiny segments decide to roll at once and wait for the
/// write in flight: only the first rolls, the others find the new segment with room.
/// A second roll on an empty segment once created another segment at the same base
/// over the same file: readers skipped its records, and retention at that base unlinked
/// the file that held them.
#[test]
fn appenders_that_wait_to_roll_roll_once_and_every_segment_has_its_own_base() {
    let opts = || {
        LogOptions::new()
            .sync(SyncPolicy::Always)
            .preallocate(false)
            .segment_bytes(1024)
    };
    let started = std::time::Instant::now();
    for round in 0..20 {
        // Bounded: the race shows in the first rounds; later ones only add confidence.
        if round > 0 && started.elapsed() > Duration::from_secs(4) {
            break;
        }
        let tmp = tempfile::tempdir().unwrap();
        let log = Arc::new(LogStore::open(tmp.path(), opts()).unwrap());
        let writers: Vec<_> = (0..12u64)
            .map(|w| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for seq in 0..150 {
                        let key = format!("w{w}k{}", seq % 7);
                        log.append(&[Entry::new(key.as_bytes(), &payload(w, seq))])
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let next = log.next_offset();
        assert_eq!(next, 12 * 150);
        // Each segment of the store is a file of its own (verify walks the store's
        // segments), and holds the records it was given.
        let verified = log.verify().unwrap();
        assert_eq!(
            verified.segments as usize,
            segment_files(tmp.path()),
            "round {round}: two segments of the store share a file"
        );
        assert_eq!(verified.records, next, "round {round}");
        let offsets: Vec<u64> = log
            .read_from(0)
            .unwrap()
            .map(|r| r.unwrap().offset)
            .collect();
        assert_eq!(
            offsets,
            (0..next).collect::<Vec<_>>(),
            "round {round}: a reader skipped records"
        );
        // Retention at every segment boundary in turn, then a reopen: every record at or
        // after the last retention point is still on disk.
        let mut bases: Vec<u64> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".log").and_then(|b| b.parse().ok())
            })
            .collect();
        bases.sort_unstable();
        let keep_from = bases[bases.len() / 2];
        for &base in bases.iter().filter(|&&b| b <= keep_from) {
            log.truncate_before(base).unwrap();
        }
        drop(log);
        let log = LogStore::open(tmp.path(), opts()).unwrap();
        assert_eq!((log.start_offset(), log.next_offset()), (keep_from, next));
        let mut n = 0;
        for r in log.read_from(keep_from).unwrap() {
            let r = r.unwrap();
            check(&r.key, &r.payload);
            n += 1;
        }
        assert_eq!(
            n,
            next - keep_from,
            "round {round}: retention lost records above {keep_from}"
        );
    }
}

/// A store of `n` records (sync `Never`) in `dir`, for the snapshot tests.
fn store_of(dir: &std::path::Path, n: usize) -> LogStore {
    let log = LogStore::open(dir, LogOptions::new().sync(SyncPolicy::Never)).unwrap();
    let entries: Vec<Entry<'_>> = (0..n).map(|_| Entry::new(b"k", b"v")).collect();
    log.append(&entries).unwrap();
    log
}

/// Two threads save the same snapshot name at the same offset (two replicas of a
/// handler that folded to the same point): both calls succeed and what is saved is one
/// of the two blobs, whole. Both once wrote through one temporary name, truncating each
/// other's bytes: the call that renamed first left the other's (possibly partial) bytes
/// under the snapshot's name and returned `Ok`, and the other failed its rename.
#[test]
fn concurrent_saves_of_one_snapshot_both_succeed_and_one_blob_is_saved_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let log = store_of(tmp.path(), 100);
    let a = vec![b'a'; 64 << 10];
    let b = vec![b'b'; 64 << 10];
    for offset in 1..=30 {
        let (ra, rb) = std::thread::scope(|s| {
            let ha = s.spawn(|| log.save_snapshot("s", offset, &a));
            let hb = s.spawn(|| log.save_snapshot("s", offset, &b));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        assert!(
            ra.is_ok() && rb.is_ok(),
            "offset {offset}: {:?} {:?}",
            ra.err().map(|e| e.to_string()),
            rb.err().map(|e| e.to_string())
        );
        let s = log.latest_snapshot("s").unwrap().expect("saved");
        assert_eq!(s.offset, offset);
        assert!(
            s.blob[..] == a[..] || s.blob[..] == b[..],
            "offset {offset}: the blob saved is neither, {} bytes",
            s.blob.len()
        );
    }
}

/// A directory for a test that races snapshot saves against reads: on a RAM file system
/// where there is one (a save's fsyncs on a disk take a millisecond or more, and the
/// race then shows about once in a thousand saves rather than every few).
fn race_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    match shm.is_dir() {
        true => tempfile::tempdir_in(shm).unwrap(),
        false => tempfile::tempdir().unwrap(),
    }
}

/// `latest_snapshot`, of the store and of a read-only store of its directory, while
/// another thread saves snapshots of the name (each save keeps the newest two and
/// deletes the older): one always exists, so the answer is never `None`. It listed the
/// files once and skipped those deleted since, answering `None` when a save deleted
/// every one listed (tens of times a second here).
#[test]
fn latest_snapshot_is_never_none_while_saves_of_the_name_prune() {
    let tmp = race_dir();
    let log = store_of(tmp.path(), 100_000);
    log.save_snapshot("s", 1, b"1").unwrap();
    log.save_snapshot("s", 2, b"2").unwrap();
    let reader = LogStore::open_read_only(tmp.path(), LogOptions::new()).unwrap();
    let done = AtomicBool::new(false);
    let (mut reads, mut nones) = (0, 0);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            for offset in 3..=100_000 {
                if started.elapsed() > Duration::from_secs(1) {
                    break;
                }
                log.save_snapshot("s", offset, b"x").unwrap();
            }
            done.store(true, Ordering::Release);
        });
        while !done.load(Ordering::Acquire) {
            for store in [&log, &reader] {
                reads += 1;
                if store.latest_snapshot("s").unwrap().is_none() {
                    nones += 1;
                }
            }
        }
    });
    assert_eq!(
        nones, 0,
        "latest_snapshot was None {nones} times in {reads}"
    );
}

/// A read-only open takes no lock, and works beside a writer. A roll cuts the segment it
/// seals back to its data when segments are preallocated (to `segment_bytes`, and zeroed
/// ahead under `Always`), so an open that sized the newest segment before the cut and
/// then read exactly that many bytes failed with "failed to fill whole buffer".
#[test]
fn a_read_only_open_beside_a_writer_that_rolls_preallocated_segments_reads_what_is_there() {
    let tmp = tempfile::tempdir().expect("tmp");
    let options = || {
        LogOptions::new()
            .sync(SyncPolicy::Always)
            .preallocate(true)
            .segment_bytes(2 << 20)
    };
    let writer = LogStore::open(tmp.path(), options()).expect("open");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let payload = vec![7u8; 16 << 10];
            while !stop.load(Ordering::Relaxed) {
                let r = writer
                    .append(&[Entry::new(b"k", &payload)])
                    .expect("append");
                // Retention keeps the directory to the newest segment or two, which
                // each open reads whole: most of an open's time goes to the newest.
                if r.start.is_multiple_of(8) {
                    writer.truncate_before(r.start).expect("retention");
                }
            }
        });
        let started = std::time::Instant::now();
        let (mut opened, mut failure) = (0, None);
        // Opens go on for 2.5 s, and past that (up to 30 s) until they have run beside
        // two rolls (more than 2 * 127 records) and one succeeded: fdatasync'd appends
        // beside a CPU hog or a slow disk may not get that far in 2.5 s.
        let enough = |opened: u64| opened > 0 && writer.next_offset() > 2 * 127;
        // Not a panic here: the writer must stop before the scope can end.
        while failure.is_none()
            && (started.elapsed() < Duration::from_millis(2500) || !enough(opened))
            && started.elapsed() < Duration::from_secs(30)
        {
            match LogStore::open_read_only(tmp.path(), options()) {
                Ok(view) => match view.corruption() {
                    None => opened += 1,
                    Some(e) => failure = Some(e.to_string()),
                },
                // A segment deleted by retention between the listing and its open.
                Err(cauce::Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failure = Some(e.to_string()),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let records = writer.next_offset();
        assert_eq!(
            failure, None,
            "after {opened} read-only opens, {records} records"
        );
        // 127 records fill a segment: the opens ran beside rolls.
        assert!(
            opened > 0 && records > 2 * 127,
            "{opened} opens, {records} records"
        );
    });
}
