//! Sync policies: when `fdatasync` happens, and that records are visible to readers as
//! soon as their append returns whatever the policy.

use std::time::{Duration, Instant};

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};

fn every(records: u64, interval_ms: u64) -> LogOptions {
    LogOptions::new().sync(SyncPolicy::Every {
        records,
        interval: Duration::from_millis(interval_ms),
    })
}

#[test]
fn every_policy_syncs_within_the_interval_when_appends_stop() {
    let tmp = tempfile::tempdir().expect("tmp");
    // With a 20 ms interval the background flusher may well have synced by the time a
    // descheduled test thread looks, so "the append did not sync" is checked on a
    // store whose interval cannot fall due during the test.
    let slow = LogStore::open(tmp.path().join("slow"), every(u64::MAX, 600_000)).expect("open");
    slow.append(&[Entry::new(b"k", b"v")]).expect("append");
    assert_eq!(
        slow.stats().syncs,
        0,
        "an append under Every does not sync by itself"
    );
    let log = LogStore::open(tmp.path().join("fast"), every(u64::MAX, 20)).expect("open");
    log.append(&[Entry::new(b"k", b"v")]).expect("append");
    let started = Instant::now();
    while log.stats().syncs == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the background flusher never synced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing new: no further syncs.
    let syncs = log.stats().syncs;
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(log.stats().syncs, syncs, "idle store does not keep syncing");
}

#[test]
fn every_policy_syncs_after_the_record_count() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), every(10, 60_000)).expect("open");
    for i in 0..9u64 {
        log.append(&[Entry::new(b"k", &i.to_le_bytes())])
            .expect("append");
    }
    assert_eq!(log.stats().syncs, 0);
    log.append(&[Entry::new(b"k", b"tenth")]).expect("append");
    assert_eq!(log.stats().syncs, 1, "the tenth record triggers the sync");
}

#[test]
fn always_policy_syncs_before_append_returns_and_never_policy_does_not() {
    let tmp = tempfile::tempdir().expect("tmp");
    let always = LogStore::open(tmp.path().join("a"), LogOptions::new()).expect("open");
    always.append(&[Entry::new(b"k", b"v")]).expect("append");
    assert_eq!(always.stats().syncs, 1);
    let never = LogOptions::new().sync(SyncPolicy::Never);
    let never = LogStore::open(tmp.path().join("n"), never).expect("open");
    never.append(&[Entry::new(b"k", b"v")]).expect("append");
    assert_eq!(never.stats().syncs, 0);
    never.sync().expect("sync");
    assert_eq!(never.stats().syncs, 1);
}

/// `sync_until`, and the cursors and snapshots that rely on it, sync only when records
/// before their offset are not durable yet.
#[test]
fn sync_until_syncs_only_what_is_not_durable_yet() {
    let tmp = tempfile::tempdir().expect("tmp");
    let always = LogStore::open(tmp.path().join("a"), LogOptions::new()).expect("open");
    always.append(&[Entry::new(b"k", b"v")]).expect("append");
    always.sync_until(1).expect("sync_until");
    always.commit_cursor("c", 1).expect("cursor");
    always.save_snapshot("s", 1, b"blob").expect("snapshot");
    assert_eq!(
        always.stats().syncs,
        1,
        "under Always, nothing more to sync"
    );
    let never = LogOptions::new().sync(SyncPolicy::Never);
    let never = LogStore::open(tmp.path().join("n"), never).expect("open");
    never.append(&[Entry::new(b"k", b"v")]).expect("append");
    never.sync_until(0).expect("sync_until");
    assert_eq!(never.stats().syncs, 0, "nothing before offset 0");
    never.commit_cursor("c", 1).expect("cursor");
    assert_eq!(
        never.stats().syncs,
        1,
        "the cursor's record is synced first"
    );
    never.save_snapshot("s", 1, b"blob").expect("snapshot");
    never.sync_until(1).expect("sync_until");
    assert_eq!(never.stats().syncs, 1, "already durable");
    never.append(&[Entry::new(b"k", b"w")]).expect("append");
    never.save_snapshot("s", 2, b"blob").expect("snapshot");
    assert_eq!(
        never.stats().syncs,
        2,
        "the snapshot's records are synced first"
    );
}

#[test]
fn buffered_records_are_visible_to_a_waiting_reader_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    for options in [
        LogOptions::new().sync(SyncPolicy::Never),
        every(u64::MAX, 60_000),
    ] {
        let dir = tempfile::tempdir_in(tmp.path()).expect("dir");
        let log = LogStore::open(dir.path(), options).expect("open");
        let mut reader = log.read_from(0).expect("read");
        assert!(reader.next().is_none());
        std::thread::scope(|s| {
            let follower = s.spawn(|| {
                assert_eq!(log.wait_for(0, Some(Duration::from_secs(5))), 1);
                reader.next().expect("a record").expect("ok")
            });
            std::thread::sleep(Duration::from_millis(10));
            log.append(&[Entry::with_timestamp(7, b"key", b"payload")])
                .expect("append");
            let r = follower.join().expect("follower");
            assert_eq!((r.offset, r.timestamp), (0, 7));
            assert_eq!((&r.key[..], &r.payload[..]), (&b"key"[..], &b"payload"[..]));
        });
        assert_eq!(log.stats().writes, 0, "the record was read from the buffer");
    }
}

#[test]
fn group_commit_shares_fsyncs_between_concurrent_appenders() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = LogStore::open(tmp.path(), LogOptions::new()).expect("open");
    // An fdatasync is shared only by appends that overlap, and on a loaded machine with
    // a fast disk (tmpfs: an fdatasync of a few microseconds) 8 threads may well run
    // one after another for all of their first 50 appends: with two CPU hogs and
    // TMPDIR=/dev/shm, 400 appends took 400 fdatasyncs in 52 runs of 60. So the
    // threads go on appending past 50 until some fdatasync has carried more than one
    // append (30 s or 20,000 appends each at most): a store that never shares one
    // still fails below.
    let started = Instant::now();
    let shared = || {
        let stats = log.stats();
        stats.syncs < stats.records
    };
    let appended: Vec<u32> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let (log, shared) = (&log, &shared);
                s.spawn(move || {
                    let mut i = 0u32;
                    while i < 50
                        || (i < 20_000 && !shared() && started.elapsed() < Duration::from_secs(30))
                    {
                        log.append(&[Entry::new(&[t], &i.to_le_bytes())])
                            .expect("append");
                        i += 1;
                    }
                    i
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|h| h.join().expect("appender"))
            .collect()
    });
    let total: u64 = appended.iter().map(|&n| u64::from(n)).sum();
    let stats = log.stats();
    assert_eq!(stats.records, total);
    assert!(
        stats.syncs < stats.records,
        "{total} appends from 8 threads took {} fdatasyncs",
        stats.syncs
    );
    let got: Vec<_> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.expect("ok"))
        .collect();
    assert_eq!(got.len() as u64, total);
    for t in 0..8u8 {
        let mine: Vec<u32> = got
            .iter()
            .filter(|r| r.key[..] == [t])
            .map(|r| u32::from_le_bytes(r.payload[..].try_into().expect("4 bytes")))
            .collect();
        assert_eq!(
            mine,
            (0..appended[usize::from(t)]).collect::<Vec<u32>>(),
            "per-thread order kept"
        );
    }
}

/// A group waits for as many appenders as were active at the last group commit; when
/// some go away, the group's first appender writes it anyway after the gather window.
#[test]
fn group_commit_goes_on_when_appenders_go_away() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = std::sync::Arc::new(LogStore::open(tmp.path(), LogOptions::new()).expect("open"));
    let (done, finished) = std::sync::mpsc::channel();
    let appending = log.clone();
    std::thread::spawn(move || {
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let log = &appending;
                s.spawn(move || {
                    // Thread t stops after (t + 1) * 10 appends: the active count keeps
                    // dropping, down to one appender.
                    for i in 0..(t + 1) * 10 {
                        log.append(&[Entry::new(&[t], &[i])]).expect("append");
                    }
                });
            }
        });
        for i in 0..20u8 {
            appending
                .append(&[Entry::new(b"alone", &[i])])
                .expect("append");
        }
        drop(appending); // before the main thread reopens the directory
        done.send(()).expect("send");
    });
    // A liveness bound, not a speed goal: a group nobody writes would hang forever.
    finished
        .recv_timeout(Duration::from_secs(60))
        .expect("group commit stalled: a group was never written");
    assert_eq!(log.stats().records, 360 + 20);
    assert_eq!(log.read_from(0).expect("read").count(), 380);
    drop(log);
    let log = LogStore::open(tmp.path(), LogOptions::new()).expect("reopen");
    assert_eq!(
        log.next_offset(),
        380,
        "every acknowledged append is durable"
    );
}

#[test]
fn a_write_buffer_larger_than_a_read_chunk_is_read_whole_from_memory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let options = LogOptions::new()
        .sync(SyncPolicy::Never)
        .write_buffer_bytes(16 << 20);
    let log = LogStore::open(tmp.path(), options).expect("open");
    let payload = |i: u64| vec![(i % 251) as u8; 700 + (i % 300) as usize];
    for chunk in 0..30u64 {
        let payloads: Vec<_> = (chunk * 100..(chunk + 1) * 100).map(payload).collect();
        let batch: Vec<_> = payloads.iter().map(|p| Entry::new(b"k", p)).collect();
        log.append(&batch).expect("append");
    }
    assert_eq!(
        log.stats().writes,
        0,
        "about 3 MB still in the write buffer"
    );
    let mut n = 0;
    for r in log.read_from(0).expect("read") {
        let r = r.expect("ok");
        assert_eq!(r.payload, payload(r.offset));
        n += 1;
    }
    assert_eq!(n, 3000);
}

/// Files of `dir` this process still has open after they were deleted (Linux).
fn deleted_but_open(dir: &std::path::Path) -> usize {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().to_string())
        .filter(|target| target.starts_with(&dir) && target.ends_with("(deleted)"))
        .count()
}

#[test]
fn retention_and_compaction_release_the_files_they_delete_under_never() {
    // Under `Never` a sealed segment waits for the next `sync` to be fdatasync'd; it used
    // to wait holding its file, so the files retention deleted and compaction replaced
    // stayed open (and took their disk space) for as long as the store lived.
    let tmp = tempfile::tempdir().expect("tmp");
    let options = LogOptions::new()
        .sync(SyncPolicy::Never)
        .segment_bytes(4096);
    let log = LogStore::open(tmp.path(), options).expect("open");
    let payload = [7u8; 200];
    for i in 0..3000u64 {
        let key = format!("k{}", i % 20);
        log.append(&[Entry::new(key.as_bytes(), &payload)])
            .expect("append");
    }
    log.truncate_before(1500).expect("retention");
    log.compact().expect("compaction");
    assert_eq!(deleted_but_open(tmp.path()), 0);
    // What is left is still made durable by `sync`, and reads back whole.
    log.sync().expect("sync");
    let kept = log.read_from(log.start_offset()).expect("read").count();
    assert!(kept >= 20, "compaction keeps the latest record of each key");
    assert_eq!(deleted_but_open(tmp.path()), 0);
}

#[test]
fn every_policy_writes_full_buffers_in_the_background_and_appenders_never_wait_forever() {
    let tmp = tempfile::tempdir().expect("tmp");
    // No sync falls due during the test: only full buffers are written.
    let options = every(u64::MAX, 3_600_000).write_buffer_bytes(4096);
    let log = LogStore::open(tmp.path(), options.clone()).expect("open");
    let payload = [7u8; 100];
    // Four appenders write 200 times the buffer's size, far past the bound on what may
    // wait in memory for the background writer.
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let log = &log;
            s.spawn(move || {
                for i in 0..2_000u32 {
                    let key = [t, (i >> 8) as u8, i as u8];
                    log.append(&[Entry::new(&key, &payload)]).expect("append");
                }
            });
        }
    });
    let stats = log.stats();
    assert!(stats.writes > 0, "full buffers were written");
    assert_eq!(stats.syncs, 0, "and nothing was synced");
    let read = log.read_from(0).expect("read").count();
    assert_eq!(read, 8_000);
    drop(log);
    let log = LogStore::open(tmp.path(), options).expect("reopen");
    assert_eq!(log.read_from(0).expect("read").count(), 8_000);
}
