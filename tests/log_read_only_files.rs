//! A read-only view keeps every segment file open: a log of more segments than the soft
//! limit on open files opens read-only all the same (the limit is raised toward the hard
//! one), and where the hard limit is too low, the open fails with a typed `Io` error.
//! One test in this file, since it changes the limits of its whole process.

use std::fs;

use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use cauce::{Entry, Error};

fn limits() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes into a stack value.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit
}

fn set_limits(soft: libc::rlim_t, hard: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `setrlimit` reads a stack value; the limits are this process's.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

#[test]
fn a_read_only_view_of_more_segments_than_the_soft_limit_opens() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("log");
    const RECORDS: u64 = 6_000;
    {
        let log = LogStore::open(
            &dir,
            LogOptions::new()
                .sync(SyncPolicy::Never)
                .preallocate(false)
                .segment_bytes(1024)
                .max_open_segments(8),
        )
        .expect("open");
        for i in 0..RECORDS {
            let payload = format!("payload-{i}");
            log.append(&[Entry::new(b"k", payload.as_bytes())])
                .expect("append");
        }
    }
    let segments = fs::read_dir(&dir)
        .expect("list")
        .filter(|e| {
            let name = e.as_ref().expect("entry").file_name();
            name.to_string_lossy().ends_with(".log")
        })
        .count() as libc::rlim_t;
    let start = limits();
    assert!(
        start.rlim_max > segments + 512,
        "this test needs a hard limit above {} (it is {})",
        segments + 512,
        start.rlim_max
    );
    // A soft limit well below the segment count, as 1,024 is below a big log's.
    let soft = segments / 3;
    set_limits(soft, start.rlim_max);
    let log = LogStore::open_read_only(&dir, LogOptions::new()).expect("open read-only");
    assert!(
        limits().rlim_cur >= segments,
        "raised to {} for {segments} segments",
        limits().rlim_cur
    );
    let mut expected = 0;
    for r in log.read_from(0).expect("read") {
        let r = r.expect("record");
        assert_eq!(r.offset, expected);
        assert_eq!(&r.payload[..], format!("payload-{expected}").as_bytes());
        expected += 1;
    }
    assert_eq!(expected, RECORDS);
    drop(log);

    // Where the hard limit is below what the view needs, the open says which file did
    // not open and why. (Lowering the hard limit cannot be undone: the last check.)
    set_limits(soft, segments / 2);
    match LogStore::open_read_only(&dir, LogOptions::new()) {
        Err(Error::Io { op, path, source }) => {
            assert_eq!(op, "open");
            assert_eq!(source.raw_os_error(), Some(libc::EMFILE));
            assert!(path.starts_with(&dir), "{}", path.display());
        }
        Ok(_) => panic!(
            "{segments} files opened under a hard limit of {}",
            segments / 2
        ),
        Err(e) => panic!("expected EMFILE from an open, got {e}"),
    }
}
