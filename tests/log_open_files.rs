//! A log of many segments opens, is read end to end, compacted and trimmed within a
//! small limit of open files: sealed segment files are closed past
//! `LogOptions::max_open_segments` and opened again when read. One test in this file,
//! since it lowers the limit of its whole process.

use std::fs;

use cauce::Entry;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};

fn open_files() -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn payload(i: u64) -> Vec<u8> {
    format!("payload-{i}-{}", "p".repeat((i % 23) as usize)).into_bytes()
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{}", i % 40).into_bytes()
}

fn options() -> LogOptions {
    LogOptions::new()
        .sync(SyncPolicy::Never)
        .preallocate(false)
        .segment_bytes(1024)
        .max_open_segments(8)
}

fn check_all(log: &LogStore, from: u64, until: u64) {
    let mut expected = from;
    for r in log.read_from(from).expect("read") {
        let r = r.expect("record");
        if r.offset >= until {
            break;
        }
        assert_eq!(r.offset, expected);
        assert_eq!(&r.key[..], key(r.offset));
        assert_eq!(&r.payload[..], payload(r.offset));
        expected += 1;
    }
    assert_eq!(expected, until);
}

#[test]
fn a_log_of_more_segments_than_the_open_file_limit_opens_reads_compacts_and_trims() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    fs::create_dir(&dir).expect("mkdir");
    const RECORDS: u64 = 12_000;
    {
        let log = LogStore::open(&dir, options()).expect("open");
        for i in 0..RECORDS {
            log.append(&[Entry::new(&key(i), &payload(i))])
                .expect("append");
        }
    }
    let segments = fs::read_dir(&dir)
        .expect("list")
        .filter(|e| {
            let name = e.as_ref().expect("entry").file_name();
            name.to_string_lossy().ends_with(".log")
        })
        .count();
    assert!(segments > 500, "{segments} segments");

    // Far fewer files than segments may be open from here on.
    let before = open_files();
    let limit = (before + 64) as libc::rlim_t;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a stack value; the limit is this process's.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let low = libc::rlimit {
            rlim_cur: limit.min(old.rlim_cur),
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
    }
    assert!((limit as usize) < segments);

    let log = LogStore::open(&dir, options()).expect("open under a low file limit");
    assert!(
        open_files() <= before + 8 + 8,
        "{} files open",
        open_files()
    );
    check_all(&log, 0, RECORDS);
    assert!(
        open_files() <= before + 8 + 8,
        "{} files open",
        open_files()
    );
    assert!(log.verify().expect("verify").segments as usize >= segments);

    // Appends roll on, readers follow, and compaction rewrites hundreds of segments.
    for i in RECORDS..RECORDS + 2_000 {
        log.append(&[Entry::new(&key(i), &payload(i))])
            .expect("append");
    }
    let mut reader = log.read_from(100).expect("read");
    assert_eq!(reader.next().expect("some").expect("ok").offset, 100);
    let report = log.compact().expect("compact");
    assert_eq!(report.kept, 40);
    // The reader opened before the compaction reads on: the rest of the old segment it
    // is in, then the segments as they are now, every record whole.
    let mut last = 100;
    for r in reader {
        let r = r.expect("record");
        assert!(r.offset > last, "{} after {last}", r.offset);
        assert_eq!(&r.key[..], key(r.offset));
        assert_eq!(&r.payload[..], payload(r.offset));
        last = r.offset;
        if last == RECORDS + 2_000 - 1 {
            break;
        }
    }
    assert_eq!(last, RECORDS + 2_000 - 1);
    let live: Vec<u64> = log
        .read_from(0)
        .expect("read")
        .map(|r| r.expect("record").offset)
        .take_while(|&o| o < RECORDS + 2_000)
        .collect();
    assert_eq!(live.len(), 40);
    assert!(
        open_files() <= before + 8 + 8,
        "{} files open",
        open_files()
    );

    log.truncate_before(RECORDS + 1_000).expect("retention");
    check_all(&log, RECORDS + 1_000, RECORDS + 1_000);
    drop(log);

    let log = LogStore::open(&dir, options()).expect("reopen");
    assert_eq!(log.start_offset(), RECORDS + 1_000);
    let live = log
        .read_from(RECORDS + 1_000)
        .expect("read")
        .take_while(|r| r.as_ref().is_ok_and(|r| r.offset < RECORDS + 2_000))
        .count();
    assert!(live <= 40 && live > 0, "{live}");
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0);
    }
}
