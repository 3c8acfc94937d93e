//! The sparse offset index of a segment: every ~`index_interval_bytes`, the first offset
//! of a batch and the byte position of its header, so a read from offset N seeks close
//! to it instead of scanning the segment.
//!
//! The active segment's index lives in memory (the recovery scan rebuilds it); a sealed
//! segment's is written to `{base:020}.index` and checked before it is trusted. A missing
//! or failing index file is rebuilt from its segment.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::segment::{self, BATCH_HEADER_LEN, HeaderCheck, SEGMENT_HEADER_LEN, le32, le64};
use crate::error::{Error, Result};
use crate::record::Offset;

const INDEX_MAGIC: [u8; 8] = *b"CAUCEIDX";
const INDEX_HEADER_LEN: usize = 24;
const ENTRY_LEN: usize = 16;

/// One index entry: a batch starting at `offset` has its header at `position`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// The first offset of the batch.
    pub(crate) offset: Offset,
    /// The byte position of its header in the segment.
    pub(crate) position: u64,
}

/// The path of the index file of the segment with base `base`.
pub(crate) fn index_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{base:020}.index"))
}

/// The entry to start scanning from to find `offset`: the last whose offset is at most
/// `offset`; `None` if the scan starts at the segment's first batch
/// ([`SEGMENT_HEADER_LEN`]).
pub(crate) fn seek(entries: &[IndexEntry], offset: Offset) -> Option<&IndexEntry> {
    let i = entries.partition_point(|e| e.offset <= offset);
    i.checked_sub(1).map(|i| &entries[i])
}

/// Encodes an index file.
pub(crate) fn encode(base: Offset, entries: &[IndexEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(INDEX_HEADER_LEN + entries.len() * ENTRY_LEN + 4);
    b.extend_from_slice(&INDEX_MAGIC);
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        b.extend_from_slice(&e.offset.to_le_bytes());
        b.extend_from_slice(&e.position.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks an index file against its segment (`file`, `data_len` bytes of
/// whole batches): checksum, base, entries increasing and inside the segment, and a spot
/// check that the first, middle and last entries point at a batch header with their
/// offset. `None` when any check fails.
pub(crate) fn decode_checked(
    bytes: &[u8],
    base: Offset,
    file: &File,
    data_len: u64,
) -> Option<Vec<IndexEntry>> {
    if bytes.len() < INDEX_HEADER_LEN + 4 || bytes[0..8] != INDEX_MAGIC {
        return None;
    }
    let body = bytes.len() - 4;
    if crc32c::crc32c(&bytes[..body]) != le32(bytes, body) || le64(bytes, 8) != base {
        return None;
    }
    let count = le64(bytes, 16);
    if count.checked_mul(ENTRY_LEN as u64)? != (body - INDEX_HEADER_LEN) as u64 {
        return None;
    }
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = INDEX_HEADER_LEN + i * ENTRY_LEN;
        let e = IndexEntry {
            offset: le64(bytes, at),
            position: le64(bytes, at + 8),
        };
        let in_file = e.position >= SEGMENT_HEADER_LEN as u64
            && e.position
                .checked_add(BATCH_HEADER_LEN as u64)
                .is_some_and(|end| end <= data_len)
            && e.position.is_multiple_of(segment::ALIGN as u64);
        let increasing = entries
            .last()
            .is_none_or(|p: &IndexEntry| p.offset < e.offset && p.position < e.position);
        if !in_file || !increasing || e.offset < base {
            return None;
        }
        entries.push(e);
    }
    if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
        let middle = entries[entries.len() / 2];
        if ![*first, middle, *last]
            .iter()
            .all(|e| points_at_its_batch(file, e))
        {
            return None;
        }
    }
    Some(entries)
}

/// Whether `e` names a whole batch header in `file` whose first offset is the entry's.
/// An index built from another file of the segment (the one a compaction replaced) can
/// pass the spot check of [`decode_checked`] and be wrong elsewhere: readers check the
/// entry they seek to as well (see `Shared::seek`).
pub(crate) fn points_at_its_batch(file: &File, e: &IndexEntry) -> bool {
    let mut h = [0u8; BATCH_HEADER_LEN];
    if file.read_exact_at(&mut h, e.position).is_err() {
        return false;
    }
    matches!(segment::check_header(&h), HeaderCheck::Valid(header) if header.base == e.offset)
}

/// Loads the index of a sealed segment, or rebuilds it from `data` (the segment's bytes)
/// when the file is missing, cannot be read or fails its checks. The rebuilt index is
/// written back when `writable`. The index is a hint: failing to read or write its file
/// is logged, not returned; only failing to read the segment is an error.
///
/// With `trust_file` false the file is not read: it was found wrong, and is rebuilt.
/// Also returns whether the entries were read from the file.
pub(crate) fn load_or_rebuild(
    dir: &Path,
    base: Offset,
    file: &File,
    data_len: u64,
    interval: u64,
    writable: bool,
    trust_file: bool,
) -> Result<(Vec<IndexEntry>, bool)> {
    let path = index_path(dir, base);
    let read = match trust_file {
        true => super::meta::read_if_exists(&path),
        false => Ok(None),
    };
    match read {
        Ok(Some(bytes)) => {
            if let Some(entries) = decode_checked(&bytes, base, file, data_len) {
                return Ok((entries, true));
            }
            tracing::warn!(path = %path.display(), "index fails its checks; rebuilding it");
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("could not read an index; rebuilding it: {e}"),
    }
    let mut data = vec![0u8; data_len as usize];
    let seg_path = segment::segment_path(dir, base);
    file.read_exact_at(&mut data, 0)
        .map_err(|e| Error::io("read", &seg_path, e))?;
    let mut builder = Builder::new(interval);
    // Damage is reported by the reader when it gets there; the index covers what is whole.
    segment::scan(&data, base, |b| {
        builder.add(b.base, b.position);
    });
    let entries = builder.entries;
    if writable && let Err(e) = write(dir, base, &entries) {
        // As after a roll or a compaction: the index in memory serves, and a later
        // open rebuilds the file.
        tracing::warn!("could not write a rebuilt index: {e}");
    }
    Ok((entries, false))
}

/// Writes the index file of a sealed segment (temporary file and rename; no fsync, since
/// an index that did not reach the disk is rebuilt).
pub(crate) fn write(dir: &Path, base: Offset, entries: &[IndexEntry]) -> Result<()> {
    let path = index_path(dir, base);
    let tmp = path.with_extension("index.tmp");
    std::fs::write(&tmp, encode(base, entries)).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &path, e))
}

/// Collects entries as batches are laid down, one per `interval` bytes.
#[derive(Debug)]
pub(crate) struct Builder {
    interval: u64,
    last_position: Option<u64>,
    pub(crate) entries: Vec<IndexEntry>,
}

impl Builder {
    pub(crate) fn new(interval: u64) -> Self {
        Builder {
            interval,
            last_position: None,
            entries: Vec::new(),
        }
    }

    /// Notes a batch at `position` starting at `offset`; returns the entry if one is due.
    pub(crate) fn add(&mut self, offset: Offset, position: u64) -> Option<IndexEntry> {
        let due = self
            .last_position
            .is_none_or(|last| position >= last.saturating_add(self.interval));
        if due {
            let e = IndexEntry { offset, position };
            self.last_position = Some(position);
            self.entries.push(e);
            Some(e)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry's position comes from the file: one at the end of the position space
    /// fails the check that its batch header is inside the segment, without an
    /// overflow.
    #[test]
    fn an_entry_at_the_end_of_the_position_space_fails_its_checks() {
        let segment = tempfile::tempfile().expect("tmp");
        let far = u64::MAX - (u64::MAX % segment::ALIGN as u64);
        for position in [far, far - segment::ALIGN as u64] {
            let entries = [IndexEntry {
                offset: 7,
                position,
            }];
            let bytes = encode(7, &entries);
            assert_eq!(decode_checked(&bytes, 7, &segment, 4096), None);
        }
    }
}
