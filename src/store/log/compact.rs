//! Compaction: rewrite the sealed segments keeping only the latest record of each key,
//! and swap the rewritten files in atomically.
//!
//! 0. The directory is settled as on open: a marker left by an earlier compaction whose
//!    swap failed is rolled forward (or, failing that, this compaction stops before it
//!    writes anything), and `.log.compact` files no marker lists are deleted. So no
//!    marker is on disk while step 3 writes, and no stale file is beside the new ones.
//! 1. The active segment is sealed (a roll), so everything committed so far is in sealed
//!    segments; appends go on meanwhile into the new active segment.
//! 2. The sealed segments are fdatasync'd: under `SyncPolicy::Never` a roll leaves that
//!    to the kernel, and a rewrite made durable while the record that superseded a
//!    dropped one is not could lose both to a power failure. One pass over them maps
//!    each key to its latest offset.
//! 3. Each sealed segment that loses a record is rewritten to `{base:020}.log.compact`
//!    (same base offset, same offsets for the kept records) and fsync'd; one that loses
//!    every record is not rewritten but deleted after step 5 (but for the log's first
//!    segment, which keeps where the log starts), so that a log compacted again and
//!    again keeps as many files as segments with live records, not as it has history.
//! 4. The commit marker `compact.commit` (the list of rewritten bases) is written
//!    atomically. From here on the swap rolls forward on a crash: on open, a marker means
//!    "rename every listed `.log.compact` over its `.log`, then delete the marker".
//! 5. The renames are made, the directory fsync'd, the marker deleted. Then the emptied
//!    segments are unlisted from the segment manifest (so that an open does not take
//!    them for lost: recovery rule 16), deleted, and the directory fsync'd: every record
//!    they held has a later one of its key, durable since step 2, so any crash leaves
//!    the latest of each key.
//!
//! `.log.compact` files found on open without a marker are the leftovers of a compaction
//! that never committed, and are deleted. Readers that hold an old segment open keep
//! reading it (Unix keeps a renamed-over file alive while it is open).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::index::{self, IndexEntry};
use super::segment::{self, SEGMENT_HEADER_LEN};
use super::{Segment, Shared, meta, writer};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record};
use crate::store::{CompactOptions, Compaction};

/// The commit marker of a compaction.
pub(crate) const MARKER: &str = "compact.commit";
const MARKER_MAGIC: [u8; 8] = *b"CAUCECMP";
/// A rewritten batch holds at most this many body bytes.
const BATCH_BODY_BYTES: usize = 256 << 10;

fn compacted_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{base:020}.log.compact"))
}

fn encode_marker(bases: &[Offset]) -> Vec<u8> {
    meta::encode_offsets(&MARKER_MAGIC, bases)
}

fn decode_marker(b: &[u8]) -> Option<Vec<Offset>> {
    meta::decode_offsets(&MARKER_MAGIC, b)
}

/// Rolls a committed compaction forward and deletes the leftovers of one that did not
/// commit (rule 9). Run by a writable open before anything else, and by
/// [`Shared::compact`] before it writes anything. Returns the bases the marker listed,
/// whose segment files may now be other files than the ones the store has open.
///
/// `before_swap` runs with the bases the marker lists before any file is renamed (a
/// store retires its segments there: see `OpenFiles`).
pub(crate) fn settle(
    dir: &Path,
    before_swap: impl FnOnce(&[Offset]) -> Result<()>,
) -> Result<Vec<Offset>> {
    let marker = dir.join(MARKER);
    let mut listed = Vec::new();
    if let Some(bytes) = meta::read_if_exists(&marker)? {
        // The marker is written by rename, so a damaged one is damage, not a torn write.
        let bases = decode_marker(&bytes).ok_or_else(|| {
            Error::corrupt(
                &marker,
                0,
                None,
                "compaction commit marker fails its checks",
            )
        })?;
        tracing::warn!("rolling an interrupted compaction forward");
        before_swap(&bases)?;
        // Each listed file was whole on disk before the marker was written; one that is
        // not is damage, and renaming it would put it in place of a good segment. Left
        // out, it is deleted below, and its segment stays: it holds every record the
        // rewrite kept, and the records the rewrite dropped are kept elsewhere.
        let mut whole = Vec::with_capacity(bases.len());
        for &base in &bases {
            match check_rewrite(dir, base) {
                Ok(()) => whole.push(base),
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!("not swapping in a damaged rewrite: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        swap(dir, &whole)?;
        listed = bases;
    }
    let mut removed = false;
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        if name
            .to_str()
            .is_some_and(|n| segment::parse_base(n, "log.compact").is_some())
        {
            meta::remove_if_exists(&entry.path())?;
            removed = true;
        }
    }
    if removed {
        meta::sync_dir(dir)?;
    }
    Ok(listed)
}

/// Checks the rewrite of segment `base`, if it is there: its header names `base`, and
/// it is whole batches to its end.
fn check_rewrite(dir: &Path, base: Offset) -> Result<()> {
    let path = compacted_path(dir, base);
    let Some(data) = meta::read_if_exists(&path)? else {
        return Ok(()); // renamed already
    };
    segment::check_header_base(&data, base, &path)?;
    segment::scan_whole(&data, base, &path, false, |_| {}).map(|_| ())
}

/// Renames every listed compacted file over its segment, then deletes the marker. A
/// listed file already renamed (by an earlier, interrupted swap) is skipped; one whose
/// segment retention deleted since is deleted, not renamed into a segment below the
/// start.
fn swap(dir: &Path, bases: &[Offset]) -> Result<()> {
    for &base in bases {
        // The old file's index goes first, whether the rewrite was renamed already or
        // not: left behind by a crash after the rename, it would be read against the
        // rewrite. (Readers also check the entry they seek to: see `Shared::seek`.)
        meta::remove_if_exists(&index::index_path(dir, base))?;
        let from = compacted_path(dir, base);
        if !from.exists() {
            continue;
        }
        let to = segment::segment_path(dir, base);
        if !to.exists() {
            meta::remove_if_exists(&from)?;
            continue;
        }
        fs::rename(&from, &to).map_err(|e| Error::io("rename", &to, e))?;
    }
    meta::sync_dir(dir)?;
    meta::remove_if_exists(&dir.join(MARKER))?;
    meta::sync_dir(dir)
}

/// Every record of a sealed segment, checked.
pub(crate) fn records_of(seg: &Segment) -> Result<Vec<Record>> {
    let end = seg.end.load(Ordering::Acquire);
    let mut data = vec![0u8; end as usize];
    seg.file()?
        .read_exact_at(&mut data, 0)
        .map_err(|e| Error::io("read", &seg.path, e))?;
    let data = Bytes::from(data);
    let mut records = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    let mut expected = seg.base;
    while pos < data.len() {
        let batch = segment::check_batch_at(&data, pos, expected)
            .map_err(|reason| Error::corrupt(&seg.path, pos as u64, Some(expected), reason))?;
        let header = batch.header;
        let body_start = pos + segment::BATCH_HEADER_LEN;
        let body = data.slice(body_start..body_start + header.body_len as usize);
        for record in segment::BatchRecords::new(&header, body) {
            let corrupt = |reason| Error::corrupt(&seg.path, pos as u64, Some(expected), reason);
            records.push(record.map_err(corrupt)?);
        }
        expected = batch.last + 1;
        pos += batch.len as usize;
    }
    Ok(records)
}

/// Writes `records` as a segment file at `path` (fsync'd) and returns its index.
fn write_segment(
    path: &Path,
    base: Offset,
    records: &[Record],
    interval: u64,
) -> Result<(u64, Vec<IndexEntry>)> {
    let mut out = Vec::with_capacity(1 << 20);
    out.extend_from_slice(&segment::encode_segment_header(base));
    let mut builder = index::Builder::new(interval);
    let mut i = 0;
    while i < records.len() {
        let first = records[i].offset;
        let mut j = i;
        let mut body = 0;
        while j < records.len()
            && (j == i
                || (body + segment::record_len(&records[j].as_entry()) <= BATCH_BODY_BYTES
                    && records[j].offset - first <= u32::MAX as u64))
        {
            body += segment::record_len(&records[j].as_entry());
            j += 1;
        }
        let entries: Vec<(Offset, Entry<'_>)> = records[i..j]
            .iter()
            .map(|r| (r.offset, r.as_entry()))
            .collect();
        builder.add(first, out.len() as u64);
        segment::encode_batch(&mut out, body, entries.iter().map(|(o, e)| (*o, e)));
        i = j;
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    file.write_all_at(&out, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write compacted segment", path, e))?;
    Ok((out.len() as u64, builder.entries))
}

impl Shared {
    /// Compacts the sealed segments; see the module docs.
    pub(crate) fn compact(&self, options: CompactOptions) -> Result<Compaction> {
        if !self.writable {
            return Err(Error::ReadOnly("opened read-only: cannot compact".into()));
        }
        let _maintenance = self.maintenance.lock();
        // Tombstones kept for a duration expire before a time read once, now.
        let options = options.resolved();
        // No marker may be on disk while the `.log.compact` files below are written: a
        // stale one would roll a half-written file over its segment after a crash.
        self.settle_under_readers()?;
        let until = {
            let mut st = self.writer.lock();
            // Seal every record to compact, unless a roll by an appender already did
            // while this one waited.
            let target = options.limit(st.next);
            self.roll_while(&mut st, |st| {
                st.active.base < target
                    && st.buf_pos + st.buf.len() as u64 > SEGMENT_HEADER_LEN as u64
            })?;
            // The sealed segments, read below, hold every record before the limit.
            options.limit(st.active.base)
        };
        let start = self.start.load(Ordering::Acquire);
        let sealed: Vec<Arc<Segment>> = self
            .segments
            .read()
            .iter()
            .filter(|s| s.sealed.load(Ordering::Acquire))
            .cloned()
            .collect();
        // Whatever the policy now: segments sealed under `Never`, by this process or an
        // earlier one, may hold records only in the page cache. Cheap next to the reads.
        for seg in &sealed {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = seg.file()?.sync_data() {
                // As a failed fdatasync in `sync` (see `Shared::sync_all`): the next
                // `sync` would fdatasync this segment again and call lost bytes durable.
                let e = Error::io("fdatasync", &seg.path, e);
                if !seg.is_gone() {
                    writer::poison(&mut self.writer.lock(), &e);
                }
                return Err(e);
            }
        }
        let mut latest: HashMap<Bytes, Offset> = HashMap::new();
        for seg in &sealed {
            for r in records_of(seg)? {
                if r.offset >= start && r.offset < until && !r.key.is_empty() {
                    latest.insert(Bytes::copy_from_slice(&r.key), r.offset);
                }
            }
        }
        let (mut kept, mut dropped) = (0u64, 0u64);
        let mut rewritten = Vec::new();
        // Segments left without a record are deleted rather than rewritten, but for the
        // first one, whose base is where the log starts.
        let first = self.segments.read().first().map(|s| s.base);
        let mut emptied = Vec::new();
        // With tombstones a key's latest record can go too, and an emptied segment may
        // hold the only other record of a key whose tombstone a rewrite drops: deleted
        // after the swap, a crash between the two would bring that record back. Such
        // segments are rewritten empty in the swap itself (atomic with the other
        // rewrites), then deleted. Without tombstones every dropped record has a later
        // one of its key that stays, and deleting them in any order is safe.
        let empties_in_swap = options.tombstones_expired_before().is_some();
        for seg in sealed {
            let records = records_of(&seg)?;
            let before = records.len();
            let keep: Vec<Record> = records
                .into_iter()
                .filter(|r| {
                    r.offset < start || options.keeps(r, until, latest.get(&r.key[..]).copied())
                })
                .collect();
            let live = keep
                .iter()
                .filter(|r| r.offset >= start && r.offset < until)
                .count() as u64;
            kept += live;
            dropped += (before - keep.len()) as u64;
            if keep.len() == before {
                continue;
            }
            if keep.is_empty() && Some(seg.base) != first {
                emptied.push(seg.base);
                if !empties_in_swap {
                    continue;
                }
            }
            let path = compacted_path(&self.dir, seg.base);
            let (len, entries) =
                write_segment(&path, seg.base, &keep, self.options.index_interval_bytes)?;
            rewritten.push((seg.base, len, entries));
        }
        if !rewritten.is_empty() || !emptied.is_empty() {
            meta::sync_dir(&self.dir)?;
            let bases: Vec<Offset> = rewritten.iter().map(|(b, _, _)| *b).collect();
            // Held from before the renames until the list names the rewrites, so that
            // no reader takes an old segment whose path names its rewrite by then; the
            // readers that hold one keep its file (`OpenFiles`). (The renames and the
            // marker's fsyncs hold up rolls, and readers moving to another segment, for
            // those few milliseconds.)
            let mut segments = self.segments.write();
            let touched: Vec<Offset> = bases.iter().chain(&emptied).copied().collect();
            let swapped = (|| -> Result<()> {
                let retired = segments.iter().filter(|s| touched.contains(&s.base));
                for seg in retired {
                    seg.retire(|| Arc::strong_count(seg) > 1)?;
                }
                if !bases.is_empty() {
                    meta::write_atomic(&self.dir, MARKER, &encode_marker(&bases))?;
                    swap(&self.dir, &bases)?;
                }
                // Every record of these has a later one of its key, durable in a sealed
                // segment (synced above) and kept by the rewrites, or in the segments
                // they replace until the swap: deleting them, in any order, and a crash
                // at any point of it, leaves the latest record of every key. (With
                // tombstones they were swapped for empty rewrites above: nothing of
                // theirs is left to come back.) Readers step over the gap, as over the
                // offsets a rewrite leaves out.
                // Unlisted first (rule 16): a crash between leaves files no manifest
                // lists, which an open accepts.
                if !emptied.is_empty() {
                    self.manifest.lock().unlist(&emptied)?;
                }
                for &base in &emptied {
                    meta::remove_if_exists(&index::index_path(&self.dir, base))?;
                    meta::remove_if_exists(&segment::segment_path(&self.dir, base))?;
                }
                if !emptied.is_empty() {
                    meta::sync_dir(&self.dir)?;
                }
                Ok(())
            })();
            if let Err(e) = swapped {
                // Some paths may name a rewrite or nothing by now: the list follows the
                // files as they are (a failed swap's marker is rolled forward by the
                // next compaction, or the next open).
                self.relist(&mut segments, &touched);
                return Err(e);
            }
            segments.retain(|s| !emptied.contains(&s.base));
            for (base, len, entries) in rewritten {
                if emptied.contains(&base) {
                    continue; // swapped empty, then deleted
                }
                let path = segment::segment_path(&self.dir, base);
                if let Err(e) = index::write(&self.dir, base, &entries) {
                    tracing::warn!("could not write the index of {}: {e}", path.display());
                }
                let seg = Arc::new(Segment::new(
                    base,
                    path,
                    None,
                    &self.files,
                    len,
                    true,
                    Some(entries),
                ));
                if let Some(slot) = segments.iter_mut().find(|s| s.base == base) {
                    *slot = seg;
                }
            }
        }
        // What rolls under `SyncPolicy::Never` left owed, as rule 16 says (an unlist above
        // wrote it already).
        self.manifest.lock().write_owed()?;
        Ok(Compaction {
            until,
            kept,
            dropped,
        })
    }

    /// Settles the directory (rolls forward a compaction whose swap failed earlier in
    /// this process), and gives the segments whose file that replaced new entries in the
    /// list, as `compact` does for its own swap: readers that hold an old segment keep
    /// reading its file. Their index is loaded when first needed.
    fn settle_under_readers(&self) -> Result<()> {
        let mut segments = self.segments.write();
        let mut listed = Vec::new();
        let settled = settle(&self.dir, |bases| {
            listed = bases.to_vec();
            let replaced = segments
                .iter()
                .filter(|s| bases.contains(&s.base) && s.sealed.load(Ordering::Acquire));
            for seg in replaced {
                seg.retire(|| Arc::strong_count(seg) > 1)?;
            }
            Ok(())
        });
        // Whether it failed or not, once it retired them.
        self.relist(&mut segments, &listed);
        settled.map(drop)
    }

    /// Gives the sealed segments at `bases` new entries in `segments` for the files
    /// their paths name now (their index loaded when first needed), and drops those
    /// whose file is gone: after a swap, or a failed one, the old entries may describe
    /// files their paths no longer name. A segment whose file cannot be checked keeps
    /// its entry, retired: reading it reports why.
    fn relist(&self, segments: &mut Vec<Arc<Segment>>, bases: &[Offset]) {
        let mut missing = Vec::new();
        for slot in segments.iter_mut() {
            if !bases.contains(&slot.base) || !slot.sealed.load(Ordering::Acquire) {
                continue;
            }
            let path = segment::segment_path(&self.dir, slot.base);
            match fs::metadata(&path) {
                Ok(meta) => {
                    *slot = Arc::new(Segment::new(
                        slot.base,
                        path,
                        None,
                        &self.files,
                        meta.len(),
                        true,
                        None,
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(slot.base),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not stat a segment")
                }
            }
        }
        segments.retain(|s| !missing.contains(&s.base));
    }
}
