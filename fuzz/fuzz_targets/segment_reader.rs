//! Fuzzes the segment reader and the recovery scan: arbitrary bytes as a segment of a
//! log: the whole file, or batches behind a valid header, or batches whose checksums are
//! fixed up so the fuzzer reaches the record framing inside bodies that pass their CRCs.
//! The segment is the newest one (recovery scans it) or, with a later segment after it,
//! a sealed one (only readers check it, batch by batch as they read). Sealed segments are
//! read through windows, or through one mapping kept between reads (`keep_mapped`).
//!
//! Invariants: nothing panics or hangs; a read-only open never fails on a batch's bytes
//! alone; a writable open either refuses with `Error::Corrupt` or gives a log that reads
//! the same records, up to the same error or none, through `read_from` and `replay_from`;
//! a newest segment recovers to a log that verifies clean and reads without error; a log
//! that verifies clean reads without error.
#![no_main]

use std::fs;

use cauce::Error;
use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
use libfuzzer_sys::fuzz_target;

/// `keep_mapped`: sealed segments read through one mapping kept between reads, as
/// [`LogOptions::keep_mapped`] does, instead of windows.
fn options(keep_mapped: bool) -> LogOptions {
    LogOptions::new()
        .keep_mapped(keep_mapped)
        .sync(SyncPolicy::Never)
        .preallocate(false)
        .max_record_bytes(1 << 16)
        .index_interval_bytes(64)
}

fn read_everything(log: &LogStore) -> Result<usize, Error> {
    let mut n = 0;
    for r in log.read_from(log.start_offset())? {
        r?;
        n += 1;
    }
    Ok(n)
}

/// Every record `read_from` gives, and whether it ended with an error.
fn read_owned(log: &LogStore) -> (Vec<(u64, u64, Vec<u8>, Vec<u8>)>, bool) {
    let mut out = Vec::new();
    let Ok(reader) = log.read_from(log.start_offset()) else {
        return (out, true);
    };
    for r in reader {
        match r {
            Ok(r) => out.push((r.offset, r.timestamp, r.key.to_vec(), r.payload.to_vec())),
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

/// Every record `replay_from` gives, and whether it ended with an error.
fn read_borrowed(log: &LogStore) -> (Vec<(u64, u64, Vec<u8>, Vec<u8>)>, bool) {
    let mut out = Vec::new();
    let ended = log.replay_from(log.start_offset(), |offset, e| {
        out.push((offset, e.timestamp, e.key.to_vec(), e.payload.to_vec()))
    });
    (out, ended.is_err())
}

/// Walks `bytes` as batches (the documented 24-byte header: header CRC, body length,
/// count, body CRC, base offset), bounds each body length by what is left, and writes
/// correct checksums, so only the framing inside the bodies is left to the fuzzer.
fn fix_checksums(bytes: &mut [u8]) {
    let mut pos = 0;
    while pos + 24 <= bytes.len() {
        let left = bytes.len() - pos - 24;
        let claimed = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4"));
        let body_len = claimed as usize % (left + 1);
        bytes[pos + 4..pos + 8].copy_from_slice(&(body_len as u32).to_le_bytes());
        let body_crc = crc32c::crc32c(&bytes[pos + 24..pos + 24 + body_len]);
        bytes[pos + 12..pos + 16].copy_from_slice(&body_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[pos + 4..pos + 24]);
        bytes[pos..pos + 4].copy_from_slice(&header_crc.to_le_bytes());
        pos += (24 + body_len).div_ceil(8) * 8;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keep_mapped = mode & 8 != 0;
    let options = || options(keep_mapped);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let segment = dir.join(format!("{:020}.log", 0));
    if mode & 1 == 0 {
        fs::write(&segment, rest).expect("write segment");
    } else {
        // A valid, empty segment (its header), then the fuzzer's bytes as batches.
        drop(LogStore::open(dir, options()).expect("create"));
        let mut bytes = fs::read(&segment).expect("read header");
        bytes.truncate(32);
        let mut batches = rest.to_vec();
        if mode & 2 != 0 {
            fix_checksums(&mut batches);
        }
        bytes.extend_from_slice(&batches);
        fs::write(&segment, bytes).expect("write segment");
    }
    let sealed = mode & 4 != 0;
    if sealed {
        // A later, empty segment: the fuzzed one is sealed, checked only as it is read.
        let later = dir.join(format!("{:020}", 1u64 << 40));
        let mut header = fs::read(&segment).expect("read");
        header.truncate(32);
        if header.len() == 32 && mode & 1 != 0 {
            // The same header with the later base, and its CRC fixed up.
            header[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
            let crc = crc32c::crc32c(&header[..28]);
            header[28..32].copy_from_slice(&crc.to_le_bytes());
            fs::write(later.with_extension("log"), header).expect("write later segment");
        }
    }
    if let Ok(log) = LogStore::open_read_only(dir, options()) {
        let _ = read_everything(&log);
        let _ = log.verify();
    }
    match LogStore::open(dir, options()) {
        Ok(log) => {
            let owned = read_owned(&log);
            let borrowed = read_borrowed(&log);
            assert_eq!(owned, borrowed, "read_from and replay_from disagree");
            let verified = log.verify();
            if verified.is_ok() {
                assert!(!owned.1, "a log that verifies clean reads without error");
            }
            if !sealed {
                verified.expect("a recovered log verifies clean");
            }
        }
        Err(Error::Corrupt { .. }) => {}
        Err(e) => panic!("unexpected error: {e}"),
    }
});
