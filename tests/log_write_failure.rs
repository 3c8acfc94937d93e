//! Writes that fail: what the failing call returns, what readers see, and that a store
//! whose write or fdatasync failed writes and syncs nothing again.
//!
//! Write failures are injected with `RLIMIT_FSIZE` (with `SIGXFSZ` ignored, a write past
//! the limit fails with `EFBIG`); fsync and fdatasync failures with the `LD_PRELOAD` shim
//! `tests/support/failsync.c`, built by the test that uses it. The limit and the shim
//! hold for the whole process, so each test that uses them runs in a child process:
//! this test binary, running only that test, with `CAUCE_WRITE_FAILURE_CHILD` set.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use cauce::{Entry, Error};

const CHILD_ENV: &str = "CAUCE_WRITE_FAILURE_CHILD";

/// Runs `scenario` in a child process running only the test `name` (this one); the
/// scenario may call [`limit_file_size`].
fn in_child(name: &str, scenario: impl FnOnce()) {
    in_child_with(name, &[], scenario);
}

/// [`in_child`], with the variables `env` set in the child.
fn in_child_with(name: &str, env: &[(&str, &OsStr)], scenario: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        scenario();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the child running {name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// From now on, in this (child) process, writes past `bytes` of any file fail with
/// `EFBIG`; `None` lifts the limit.
fn limit_file_size(bytes: Option<u64>) {
    assert!(std::env::var_os(CHILD_ENV).is_some(), "only in a child");
    // SAFETY: plain libc calls with valid arguments; no memory is shared with them
    // beyond the rlimit struct on this stack.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut limit: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes.unwrap_or(libc::RLIM_INFINITY);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

/// Runs `scenario` as [`in_child`] does, with the shim `tests/support/failsync.c`
/// preloaded in the child: once the scenario calls [`arm_sync_failure`], the first fsync
/// or fdatasync of the file or directory whose path ends with `name` fails with `EIO`,
/// after the real call ran (the kernel reports a writeback error once, then clears it).
/// The shim is built here with `cc`, which every machine that links Rust has: a missing
/// one fails the test rather than skip what it checks.
fn with_failing_sync(test: &str, name: &str, scenario: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).is_some() {
        scenario();
        return;
    }
    let shim_dir = tempfile::tempdir().unwrap();
    let shim = shim_dir.path().join("libfailsync.so");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/failsync.c");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&source)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run cc to build {}: {e}", source.display()));
    assert!(built.success(), "cc failed to build {}", source.display());
    let armed = shim_dir.path().join("armed");
    let env = [
        ("LD_PRELOAD", shim.as_os_str()),
        ("FAILSYNC_NAME", OsStr::new(name)),
        ("FAILSYNC_ARMED", armed.as_os_str()),
    ];
    in_child_with(test, &env, scenario);
}

/// From now on, in this child of [`with_failing_sync`], the next fsync or fdatasync of
/// the file it names fails.
fn arm_sync_failure() {
    let armed = std::env::var_os("FAILSYNC_ARMED").expect("only in a child of with_failing_sync");
    std::fs::write(armed, b"").unwrap();
}

/// The poisoned error: read-only, naming the file whose write failed and why.
fn assert_poisoned(result: cauce::Result<impl std::fmt::Debug>, dir: &Path) {
    assert_poisoned_by(result, dir, "too large");
}

/// The poisoned error: read-only, naming `path` (the file whose write or sync failed, or
/// its directory) and `cause`.
fn assert_poisoned_by(result: cauce::Result<impl std::fmt::Debug>, path: &Path, cause: &str) {
    match result {
        Err(Error::ReadOnly(message)) => {
            assert!(
                message.contains(&path.display().to_string()) && message.contains(cause),
                "{message}"
            );
        }
        other => panic!("expected the poisoned error, got {other:?}"),
    }
}

fn record(i: u64) -> Vec<u8> {
    format!("record {i:06} {}", "z".repeat(40 + (i % 7) as usize * 150)).into_bytes()
}

/// Every record in `log` from 0 must be `record(offset)`, and there must be `n` of them.
fn assert_reads_exactly(log: &LogStore, n: u64) {
    let mut read = 0;
    for r in log.read_from(0).unwrap() {
        let r = r.unwrap();
        assert_eq!((r.offset, &r.payload[..]), (read, &record(read)[..]));
        read += 1;
    }
    assert_eq!(read, n, "records read");
}

/// A segment is created only where no file is: one with bytes in it (here planted by
/// hand, as a bug that rolled twice to the same base once left one) is a typed error
/// and stays as it was, and the store stops there with every acknowledged record kept.
#[test]
fn a_roll_never_truncates_a_file_already_at_the_new_segments_path() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = || {
        LogOptions::new()
            .sync(SyncPolicy::Always)
            .preallocate(false)
            .segment_bytes(1024)
    };
    let log = LogStore::open(tmp.path(), opts()).unwrap();
    let planted = b"not a segment, but someone's bytes";
    let planted_path = |base: u64| tmp.path().join(format!("{base:020}.log"));
    for base in 1..100 {
        std::fs::write(planted_path(base), planted).unwrap();
    }
    let mut acked = 0;
    let err = loop {
        match log.append(&[Entry::new(b"k", &record(acked))]) {
            Ok(r) => acked = r.end,
            Err(e) => break e,
        }
        assert!(acked < 100, "no roll within 100 records");
    };
    match &err {
        Error::Io { op, path, source } => {
            assert_eq!(*op, "create segment");
            assert_eq!(*path, planted_path(acked));
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        other => panic!("expected an Io error naming the file, got {other}"),
    }
    assert_eq!(std::fs::read(planted_path(acked)).unwrap(), planted);
    // The store is poisoned: no write goes ahead on a log in this state.
    assert!(matches!(
        log.append(&[Entry::new(b"k", b"later")]),
        Err(Error::ReadOnly(_))
    ));
    assert_eq!(log.next_offset(), acked);
    assert_reads_exactly(&log, acked);
    drop(log);
    for base in 1..100 {
        std::fs::remove_file(planted_path(base)).unwrap();
    }
    let log = LogStore::open(tmp.path(), opts()).unwrap();
    assert_eq!(log.next_offset(), acked);
    assert_reads_exactly(&log, acked);
}

/// Appends one record at a time until an append fails; returns how many were
/// acknowledged (their offsets are `0..n`, in order) and the error.
fn append_until_err(log: &LogStore) -> (u64, Error) {
    let mut acked = 0;
    loop {
        match log.append(&[Entry::new(b"k", &record(acked))]) {
            Ok(r) => {
                assert_eq!(r, acked..acked + 1);
                acked = r.end;
            }
            Err(e) => return (acked, e),
        }
        assert!(acked < 100_000, "no write failed");
    }
}

/// Under `Every` with a record threshold of 1, each append writes and fdatasyncs the
/// buffer itself; once one of those writes failed, the background thread's timer once
/// wrote and synced past the failed bytes and called every record durable: `sync()`
/// returned Ok after having failed, cursors moved past lost records, readers got
/// nothing then "failed to fill whole buffer", and a record called durable was gone
/// after a reopen. Now nothing is written or synced again, every call that would
/// need it fails with the poisoned error, and readers see every committed record.
#[test]
fn after_a_failed_write_nothing_is_written_or_synced_again() {
    in_child(
        "after_a_failed_write_nothing_is_written_or_synced_again",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let opts = || {
                LogOptions::new()
                    .sync(SyncPolicy::Every {
                        records: 1,
                        interval: Duration::from_millis(20),
                    })
                    .preallocate(false)
            };
            let log = LogStore::open(tmp.path(), opts()).unwrap();
            limit_file_size(Some(16 << 10));
            let (acked, err) = append_until_err(&log);
            assert_poisoned(Err::<(), _>(err), tmp.path());
            assert_eq!(
                log.next_offset(),
                acked,
                "the refused append took no offset"
            );
            let stats = log.stats();
            let segment = tmp.path().join(format!("{:020}.log", 0));
            let len = std::fs::metadata(&segment).unwrap().len();
            // Several of the background thread's intervals.
            std::thread::sleep(Duration::from_millis(150));
            assert_poisoned(log.sync(), tmp.path());
            assert_poisoned(log.sync_until(acked), tmp.path());
            assert_poisoned(log.commit_cursor("c", acked), tmp.path());
            assert_poisoned(log.append(&[Entry::new(b"k", b"later")]), tmp.path());
            assert_poisoned(log.append(&[]), tmp.path());
            assert_poisoned(log.compact(), tmp.path());
            assert_eq!(log.stats(), stats, "a write or fdatasync after the failure");
            assert_eq!(std::fs::metadata(&segment).unwrap().len(), len);
            assert_eq!(log.next_offset(), acked);
            assert_reads_exactly(&log, acked);
            assert_eq!(log.cursor("c").unwrap(), None);
            drop(log); // returns: neither the flusher nor close waits for a write
            limit_file_size(None);
            let log = LogStore::open(tmp.path(), opts()).unwrap();
            let reopened = log.next_offset();
            assert!(reopened <= acked);
            assert_reads_exactly(&log, reopened);
        },
    );
}

/// Four appenders under `Every`, each leading the writes its appends make due, run
/// into a failed write: none writes after it (a write past the failed bytes left a hole
/// that made the reopen fail as corruption), the appends that returned Ok are exactly
/// the records readers see, and the log reopens.
#[test]
fn concurrent_appenders_after_a_failed_write_leave_no_hole() {
    in_child(
        "concurrent_appenders_after_a_failed_write_leave_no_hole",
        || {
            for round in 0..5 {
                let tmp = tempfile::tempdir().unwrap();
                let opts = || {
                    LogOptions::new()
                        .sync(SyncPolicy::Every {
                            records: 1,
                            interval: Duration::from_secs(5),
                        })
                        .preallocate(false)
                };
                let log = std::sync::Arc::new(LogStore::open(tmp.path(), opts()).unwrap());
                limit_file_size(Some((256 << 10) + 100));
                let threads: Vec<_> = (0..4u8)
                    .map(|t| {
                        let log = log.clone();
                        std::thread::spawn(move || {
                            let payload = vec![b'a' + t; 3000];
                            let mut acked = 0u64;
                            for _ in 0..1000 {
                                match log.append(&[Entry::new(b"k", &payload)]) {
                                    Ok(r) => acked += r.end - r.start,
                                    Err(Error::ReadOnly(_)) => return acked,
                                    Err(e) => panic!("expected the poisoned error, got {e}"),
                                }
                            }
                            panic!("no write failed");
                        })
                    })
                    .collect();
                let acked: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
                limit_file_size(None);
                assert_eq!(log.next_offset(), acked, "round {round}");
                assert!(log.sync().is_err(), "round {round}");
                let read = log
                    .read_from(0)
                    .unwrap()
                    .try_fold(0u64, |n, r| r.map(|_| n + 1));
                assert_eq!(read.map_err(|e| e.to_string()), Ok(acked), "round {round}");
                drop(log);
                let log = LogStore::open(tmp.path(), opts()).unwrap();
                assert!(log.next_offset() <= acked, "round {round}");
                for r in log.read_from(0).unwrap() {
                    let r = r.unwrap();
                    assert!(
                        r.payload.len() == 3000 && r.payload.iter().all(|&b| b == r.payload[0])
                    );
                }
            }
        },
    );
}

/// An append returns Ok exactly when readers see its records. Under `Every` and
/// `Never` an append's records are committed once they are in the buffer, also when a
/// write that the same call then runs fails: it returns Ok, and the calls after it
/// fail. (The append that ran the failed write returned its error, yet readers were
/// shown its records.)
#[test]
fn an_append_returns_ok_exactly_when_readers_see_its_records() {
    in_child(
        "an_append_returns_ok_exactly_when_readers_see_its_records",
        || {
            let policies = [
                SyncPolicy::Never,
                SyncPolicy::Every {
                    records: 1,
                    interval: Duration::from_secs(5),
                },
            ];
            for policy in policies {
                let tmp = tempfile::tempdir().unwrap();
                let log = LogStore::open(
                    tmp.path(),
                    LogOptions::new()
                        .sync(policy)
                        .preallocate(false)
                        .write_buffer_bytes(4096),
                )
                .unwrap();
                limit_file_size(Some(64 << 10));
                let (acked, err) = append_until_err(&log);
                limit_file_size(None);
                assert_eq!(log.next_offset(), acked, "{policy:?}: {err}");
                assert_reads_exactly(&log, acked);
                // The append that failed was refused on entry: the failed write ran in
                // an append that returned Ok.
                assert_poisoned(Err::<(), _>(err), tmp.path());
            }
        },
    );
}

/// A roll whose write fails keeps the records of the buffer it was writing readable
/// from memory, and the append that needed the roll fails without taking offsets.
#[test]
fn a_failed_roll_keeps_the_committed_records_readable() {
    in_child("a_failed_roll_keeps_the_committed_records_readable", || {
        let tmp = tempfile::tempdir().unwrap();
        let log = LogStore::open(
            tmp.path(),
            LogOptions::new()
                .sync(SyncPolicy::Every {
                    records: u64::MAX,
                    interval: Duration::from_secs(60),
                })
                .preallocate(false)
                .segment_bytes(64 << 10)
                .write_buffer_bytes(1 << 20),
        )
        .unwrap();
        limit_file_size(Some(16 << 10));
        let (acked, err) = append_until_err(&log);
        limit_file_size(None);
        assert!(matches!(err, Error::Io { op: "write", .. }), "{err}");
        assert_eq!(log.next_offset(), acked);
        assert_reads_exactly(&log, acked);
        assert_poisoned(log.sync(), tmp.path());
    });
}

/// Appends 100 records under `Never` to a log in `dir` whose segments roll at 4 KiB, so
/// that the sync that follows has sealed segments and a directory to sync.
fn log_with_unsynced_rolls(dir: &Path) -> LogStore {
    let log = LogStore::open(dir, unsynced_rolls()).unwrap();
    for i in 0..100 {
        log.append(&[Entry::new(b"k", &record(i))]).unwrap();
    }
    let files = std::fs::read_dir(dir).unwrap().count();
    assert!(files > 3, "no roll: {files} files");
    log
}

fn unsynced_rolls() -> LogOptions {
    LogOptions::new()
        .sync(SyncPolicy::Never)
        .preallocate(false)
        .segment_bytes(4096)
}

/// What a store poisoned by a failed sync of `path` does: refuses every sync, cursor and
/// append, and goes on showing its records. A reopen finds those of the sealed segments
/// (the shim ran the real sync; the buffered ones a poisoned store never writes).
fn assert_poisoned_by_a_failed_sync(log: LogStore, dir: &Path, path: &Path) {
    let cause = "Input/output error";
    assert_poisoned_by(log.sync(), path, cause);
    assert_poisoned_by(log.sync_until(100), path, cause);
    assert_poisoned_by(log.commit_cursor("c", 100), path, cause);
    assert_poisoned_by(log.append(&[Entry::new(b"k", b"later")]), path, cause);
    assert_eq!(log.next_offset(), 100);
    assert_reads_exactly(&log, 100);
    assert_eq!(log.cursor("c").unwrap(), None);
    drop(log);
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(".log")?.parse::<u64>().ok())
        .max()
        .unwrap();
    let log = LogStore::open(dir, unsynced_rolls()).unwrap();
    let reopened = log.next_offset();
    assert!((newest..=100).contains(&reopened), "{reopened}");
    assert_reads_exactly(&log, reopened);
}

/// Makes the fdatasync of the first (sealed) segment fail during `call`, in the child
/// running the test `name`: `call` returns that failure, and the store is poisoned.
fn a_failed_fdatasync_of_the_first_segment_during<T: std::fmt::Debug>(
    name: &str,
    call: impl FnOnce(&LogStore) -> cauce::Result<T>,
) {
    let first = format!("{:020}.log", 0);
    with_failing_sync(name, &first, || {
        let tmp = tempfile::tempdir().unwrap();
        let log = log_with_unsynced_rolls(tmp.path());
        let sealed = tmp.path().join(&first);
        arm_sync_failure();
        match call(&log) {
            Err(Error::Io { op, path, .. }) => {
                assert_eq!((op, path), ("fdatasync", sealed.clone()))
            }
            other => panic!("expected the failed fdatasync, got {other:?}"),
        }
        assert_poisoned_by_a_failed_sync(log, tmp.path(), &sealed);
    });
}

/// Under `Never` a roll leaves the fdatasync of the segment it seals to the next `sync`.
/// When that fdatasync fails, what the kernel failed to write back may be lost, and the
/// kernel says so only once: the store is poisoned, as after a failed fdatasync of the
/// active segment. (The failure was returned, but the next `sync` fdatasync'd the
/// segment again, succeeded, and called its records durable; cursors and appends went
/// on.)
#[test]
fn a_failed_fdatasync_of_a_sealed_segment_poisons_the_store() {
    a_failed_fdatasync_of_the_first_segment_during(
        "a_failed_fdatasync_of_a_sealed_segment_poisons_the_store",
        LogStore::sync,
    );
}

/// Compaction fdatasyncs the sealed segments before it rewrites them, whatever the
/// policy; when one of those fails, the store is poisoned as when `sync`'s does.
#[test]
fn a_failed_fdatasync_before_a_compaction_poisons_the_store() {
    a_failed_fdatasync_of_the_first_segment_during(
        "a_failed_fdatasync_before_a_compaction_poisons_the_store",
        LogStore::compact,
    );
}

/// Under `Never` a roll leaves the fsync of the directory, which makes the new segment
/// files' names durable, to the next `sync`. When it fails, the store is poisoned alike.
#[test]
fn a_failed_fsync_of_the_directory_poisons_the_store() {
    with_failing_sync(
        "a_failed_fsync_of_the_directory_poisons_the_store",
        "/log-whose-fsync-fails",
        || {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("log-whose-fsync-fails");
            let log = log_with_unsynced_rolls(&dir);
            arm_sync_failure();
            match log.sync() {
                Err(Error::Io { op, path, .. }) => {
                    assert_eq!((op, path), ("fsync directory", dir.clone()))
                }
                other => panic!("expected the failed fsync, got {other:?}"),
            }
            assert_poisoned_by_a_failed_sync(log, &dir, &dir);
        },
    );
}
