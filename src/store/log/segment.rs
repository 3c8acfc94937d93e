//! The bytes of a segment file: its header, and the batches that follow it.
//!
//! Everything here is pure (bytes in, bytes or values out), so the writer, the reader, the
//! recovery scan, compaction and the fuzz target share one definition of the format.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record};

/// The first eight bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"CAUCELOG";
/// The format version written in segment headers; a reader refuses any other.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Length of the segment header; the first batch starts here.
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
/// Length of a batch header.
pub(crate) const BATCH_HEADER_LEN: usize = 24;
/// Fixed bytes in front of each record inside a batch body.
pub(crate) const RECORD_HEADER_LEN: usize = 20;
// Every store counts a record's size as a segment frames it.
const _: () = assert!(RECORD_HEADER_LEN == crate::store::RECORD_FRAMING);
/// Batches start at multiples of this inside a segment.
pub(crate) const ALIGN: usize = 8;

/// How far ahead of the record being decoded a walk over a batch body asks for bytes
/// (see [`prefetch`]).
const PREFETCH_AHEAD: usize = 2048;

/// Asks the CPU to bring `body[at..]` into its nearest cache, if `at` is inside `body`.
///
/// A walk over a batch body is a chain of dependent loads: each record's lengths say
/// where the next one starts. The body was just checksummed, so it sits in L2, and each
/// step of the chain waited on an L2 load (37% of the walk's samples were on the first
/// load of a record header). Asking 2 KiB ahead (about 17 records of 100 B) took borrowed
/// replay of 1,000,000 records of 100 B from 59-60M to 64-68M records/s (512 B ahead:
/// 61-64M; 4 and 8 KiB: no better than 2).
///
/// The decoding tests run under Miri, prefetch included:
/// `MIRIFLAGS=-Zmiri-disable-isolation cargo +nightly miri test --lib store::log::segment`.
#[inline(always)]
fn prefetch(body: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < body.len() {
        // SAFETY: `at < body.len()`, so the pointer stays inside `body`'s allocation; a
        // prefetch only hints the cache, reading nothing the program sees and never
        // faulting.
        unsafe {
            core::arch::x86_64::_mm_prefetch(
                body.as_ptr().add(at).cast::<i8>(),
                core::arch::x86_64::_MM_HINT_T0,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (body, at);
}

/// The name of the segment file whose first offset is `base`.
pub(crate) fn segment_file_name(base: Offset) -> String {
    format!("{base:020}.log")
}

/// The base offset named by a segment (or index) file name, if it is one.
pub(crate) fn parse_base(name: &str, extension: &str) -> Option<Offset> {
    let stem = name.strip_suffix(extension)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// The path of the segment with base `base` in `dir`.
pub(crate) fn segment_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(segment_file_name(base))
}

/// Rounds `n` up to the batch alignment.
pub(crate) fn align_up(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// Encodes the 32-byte segment header for a segment starting at `base`.
pub(crate) fn encode_segment_header(base: Offset) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 12..16: flags, zero in version 1.
    h[16..24].copy_from_slice(&base.to_le_bytes());
    // 24..28: reserved, zero.
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header and returns the base offset it names.
pub(crate) fn decode_segment_header(bytes: &[u8], path: &Path) -> Result<Offset> {
    let bad = |reason: &str| Error::corrupt(path, 0, None, format!("segment header: {reason}"));
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(bad("shorter than 32 bytes"));
    }
    let h = &bytes[..SEGMENT_HEADER_LEN];
    if h[0..8] != SEGMENT_MAGIC {
        return Err(bad("bad magic"));
    }
    if crc32c::crc32c(&h[0..28]) != le32(h, 28) {
        return Err(bad("checksum mismatch"));
    }
    let version = le32(h, 8);
    if version != FORMAT_VERSION {
        return Err(bad(&format!("unknown format version {version}")));
    }
    Ok(le64(h, 16))
}

#[inline]
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[inline]
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The bytes a record takes inside a batch body.
pub(crate) fn record_len(entry: &Entry<'_>) -> usize {
    crate::store::record_size(entry)
}

/// The bytes a batch of `body_len` body bytes takes in the file, padding included.
pub(crate) fn batch_len(body_len: usize) -> usize {
    align_up(BATCH_HEADER_LEN + body_len)
}

/// Payloads of at least this many bytes are checksummed from the caller's bytes as they
/// are encoded; everything else in passes over the encoded body.
const SUM_FROM_SOURCE: usize = 512;

/// Appends one framed, padded batch to `out`. `records` gives each record's offset and
/// entry, in increasing offset order, all within `u32::MAX` of the first.
///
/// The caller has checked the sizes (see [`check_batch`]).
pub(crate) fn encode_batch<'a, I>(out: &mut Vec<u8>, body_len: usize, records: I)
where
    I: IntoIterator<Item = (Offset, &'a Entry<'a>)>,
{
    let start = out.len();
    let total = batch_len(body_len);
    out.reserve(total);
    out.resize(start + BATCH_HEADER_LEN, 0);
    let mut base = None;
    let mut count = 0u32;
    // The body checksum, over `out[start + BATCH_HEADER_LEN..unsummed]` so far.
    let mut body_crc = 0u32;
    let mut unsummed = start + BATCH_HEADER_LEN;
    for (offset, entry) in records {
        let base = *base.get_or_insert(offset);
        // The caller keeps offsets within u32::MAX of the base (a true invariant).
        let delta = (offset - base) as u32;
        out.extend_from_slice(&delta.to_le_bytes());
        out.extend_from_slice(&entry.timestamp.to_le_bytes());
        out.extend_from_slice(&(entry.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(entry.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(entry.key);
        let payload_at = out.len();
        out.extend_from_slice(entry.payload);
        if entry.payload.len() >= SUM_FROM_SOURCE {
            // A large payload is summed from the caller's bytes (still in cache) rather
            // than from the copy just made: 1 KiB appends measured 3-6% faster.
            body_crc = crc32c::crc32c_append(body_crc, &out[unsummed..payload_at]);
            body_crc = crc32c::crc32c_append(body_crc, entry.payload);
            unsummed = out.len();
        }
        count += 1;
    }
    debug_assert_eq!(out.len() - start - BATCH_HEADER_LEN, body_len);
    // Small records are summed in one pass over the encoded body.
    let body_crc = crc32c::crc32c_append(body_crc, &out[unsummed..]);
    let h = &mut out[start..start + BATCH_HEADER_LEN];
    h[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[8..12].copy_from_slice(&count.to_le_bytes());
    h[12..16].copy_from_slice(&body_crc.to_le_bytes());
    h[16..24].copy_from_slice(&base.unwrap_or(0).to_le_bytes());
    let header_crc = crc32c::crc32c(&h[4..24]);
    h[0..4].copy_from_slice(&header_crc.to_le_bytes());
    out.resize(start + total, 0);
}

/// Checks that a batch can be framed: every record within `max_record_bytes` (the check
/// every store makes), the body within a `u32` length. Returns the body length.
pub(crate) fn check_batch(batch: &[Entry<'_>], max_record_bytes: usize) -> Result<usize> {
    let body = crate::store::check_record_sizes(batch, max_record_bytes)?;
    let limit = u32::MAX as usize - BATCH_HEADER_LEN - ALIGN;
    if body > limit {
        return Err(Error::AppendTooLarge { size: body, limit });
    }
    Ok(body)
}

/// A batch header that passed its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    /// Bytes of records after the header (padding excluded).
    pub(crate) body_len: u32,
    /// Records in the batch (at least one).
    pub(crate) count: u32,
    /// CRC32C of the body.
    pub(crate) body_crc: u32,
    /// Offset of the first record.
    pub(crate) base: Offset,
}

impl BatchHeader {
    /// Bytes the batch takes in the file, padding included.
    pub(crate) fn total_len(&self) -> u64 {
        batch_len(self.body_len as usize) as u64
    }
}

/// What is found at a batch position.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderCheck {
    /// A header whose checksum holds.
    Valid(BatchHeader),
    /// Every byte of the header is zero: the end of written data in a preallocated file.
    Zero,
    /// Fewer than a header's bytes are left.
    Short,
    /// The checksum fails or a field is impossible.
    Bad(&'static str),
}

/// Checks the batch header at the start of `bytes`. The checksum is checked before any
/// field is trusted.
pub(crate) fn check_header(bytes: &[u8]) -> HeaderCheck {
    if bytes.len() < BATCH_HEADER_LEN {
        return if bytes.iter().all(|&b| b == 0) {
            HeaderCheck::Zero
        } else {
            HeaderCheck::Short
        };
    }
    let h = &bytes[..BATCH_HEADER_LEN];
    if h.iter().all(|&b| b == 0) {
        return HeaderCheck::Zero;
    }
    if crc32c::crc32c(&h[4..24]) != le32(h, 0) {
        return HeaderCheck::Bad("batch header checksum mismatch");
    }
    let header = BatchHeader {
        body_len: le32(h, 4),
        count: le32(h, 8),
        body_crc: le32(h, 12),
        base: le64(h, 16),
    };
    if header.count == 0 {
        return HeaderCheck::Bad("batch with no record");
    }
    if (header.body_len as u64) < header.count as u64 * RECORD_HEADER_LEN as u64 {
        return HeaderCheck::Bad("batch body shorter than its records' headers");
    }
    HeaderCheck::Valid(header)
}

/// The records of a batch whose body checksum matched, decoded one at a time: keys and
/// payloads are slices of the body (no copy).
///
/// The framing is checked as each record is decoded ([`Framing`]), not in a pass of its
/// own: a reader walks the body once.
#[derive(Debug, Default)]
pub(crate) struct BatchRecords {
    body: Bytes,
    framing: Framing,
}

impl BatchRecords {
    /// The records of `body`, which [`check_crc`] accepted with `header`.
    pub(crate) fn new(header: &BatchHeader, body: Bytes) -> Self {
        BatchRecords {
            body,
            framing: Framing::new(header),
        }
    }
}

/// Where one record of a batch body lies: its offset and timestamp, and the byte
/// positions of its key (`key_at..payload_at`) and payload (`payload_at..end`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordAt {
    pub(crate) offset: Offset,
    timestamp: u64,
    key_at: usize,
    payload_at: usize,
    end: usize,
}

/// A walk over the records of a batch body that checks its framing as it goes: every
/// record header and record inside the body, offsets strictly increasing, no bytes left
/// over after the last record, and the offset after the last one representable.
///
/// A body whose checksum matches but whose framing is bad is something no writer of this
/// format produces; the walk ends at the first bad record with the reason, after the
/// records before it (whole, and the bytes that were written).
#[derive(Clone, Copy, Debug, Default)]
struct Framing {
    at: usize,
    left: u32,
    base: Offset,
    /// The lowest offset delta the next record may have.
    next_delta: u64,
}

impl Framing {
    fn new(header: &BatchHeader) -> Self {
        Framing {
            at: 0,
            left: header.count,
            base: header.base,
            next_delta: 0,
        }
    }

    /// Steps over the next record of `body` and says where it lies, or why the framing
    /// is bad there (after which there is no next record).
    #[inline(always)]
    fn step(&mut self, body: &[u8]) -> Option<std::result::Result<RecordAt, &'static str>> {
        if self.left == 0 {
            return None;
        }
        let at = self.decode(body);
        if at.is_err() {
            self.left = 0;
        }
        Some(at)
    }

    #[inline(always)]
    fn decode(&mut self, body: &[u8]) -> std::result::Result<RecordAt, &'static str> {
        prefetch(body, self.at.saturating_add(PREFETCH_AHEAD));
        let Some(h) = body
            .get(self.at..)
            .and_then(|rest| rest.first_chunk::<RECORD_HEADER_LEN>())
        else {
            return Err("record header past the end of its batch");
        };
        let delta = le32(h, 0) as u64;
        if delta < self.next_delta {
            return Err("record offsets not increasing inside a batch");
        }
        let key_at = self.at + RECORD_HEADER_LEN;
        // In u64, two u32 lengths cannot overflow the sum.
        let payload_at = key_at as u64 + le32(h, 12) as u64;
        let end = payload_at + le32(h, 16) as u64;
        if end > body.len() as u64 {
            return Err("record length past the end of its batch");
        }
        let (payload_at, end) = (payload_at as usize, end as usize);
        if self.left == 1 && end != body.len() {
            return Err("bytes left over after the last record of a batch");
        }
        // The offset after this one must exist too.
        let Some(next) = self.base.checked_add(delta + 1) else {
            return Err("record offset overflows");
        };
        self.at = end;
        self.left -= 1;
        self.next_delta = delta + 1;
        Ok(RecordAt {
            offset: next - 1,
            timestamp: le64(h, 4),
            key_at,
            payload_at,
            end,
        })
    }
}

impl BatchRecords {
    /// Steps over the next record and says where it lies in the body, or why the body's
    /// framing is bad there (after which there is no next record).
    #[inline(always)]
    pub(crate) fn step(&mut self) -> Option<std::result::Result<RecordAt, &'static str>> {
        self.framing.step(&self.body)
    }

    /// The record `at` (from [`step`](Self::step)) as an owned [`Record`]: its key and
    /// payload are slices of the body (no copy; an empty key holds no reference).
    #[inline(always)]
    pub(crate) fn record(&self, at: RecordAt) -> Record {
        Record {
            offset: at.offset,
            timestamp: at.timestamp,
            key: if at.payload_at == at.key_at {
                Bytes::new()
            } else {
                self.body.slice(at.key_at..at.payload_at)
            },
            payload: self.body.slice(at.payload_at..at.end),
        }
    }

    /// The record `at` (from [`step`](Self::step)), borrowed from the body.
    #[inline(always)]
    pub(crate) fn entry(&self, at: RecordAt) -> Entry<'_> {
        Entry {
            timestamp: at.timestamp,
            key: &self.body[at.key_at..at.payload_at],
            payload: &self.body[at.payload_at..at.end],
        }
    }
}

impl Iterator for BatchRecords {
    type Item = std::result::Result<Record, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.step()?.map(|at| self.record(at)))
    }
}

/// Checks a batch body's checksum against its header.
pub(crate) fn check_crc(
    header: &BatchHeader,
    body: &[u8],
) -> std::result::Result<(), &'static str> {
    if crc32c::crc32c(body) != header.body_crc {
        return Err("batch body checksum mismatch");
    }
    Ok(())
}

/// Checks the body checksum and the record framing of a batch, without building
/// records. Returns the batch's last offset.
pub(crate) fn check_body(
    header: &BatchHeader,
    body: &[u8],
) -> std::result::Result<Offset, &'static str> {
    check_crc(header, body)?;
    let mut framing = Framing::new(header);
    let mut last = None;
    while let Some(at) = framing.step(body) {
        last = Some(at?.offset);
    }
    last.ok_or("batch with no record")
}

/// A batch found by [`scan`]: where it is and which offsets it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScannedBatch {
    /// Byte position of its header in the segment.
    pub(crate) position: u64,
    /// Offset of its first record.
    pub(crate) base: Offset,
    /// Offset of its last record.
    pub(crate) last: Offset,
    /// Bytes it takes, padding included.
    pub(crate) len: u64,
    /// Its header.
    pub(crate) header: BatchHeader,
}

/// How a scan of a segment's bytes ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    /// Every byte up to the end was whole batches.
    Clean,
    /// Only zeros from `position` to the end (a preallocated file's unwritten part).
    Zeros {
        /// Where the zeros start.
        position: u64,
    },
    /// A bad batch at `position` with no valid batch after it: a torn write.
    Torn {
        /// Where the bad batch starts.
        position: u64,
        /// What failed.
        reason: &'static str,
    },
    /// A bad batch at `position` followed by a valid batch at `later`: damage in the
    /// middle.
    Corrupt {
        /// Where the bad batch starts.
        position: u64,
        /// What failed.
        reason: &'static str,
        /// Where a later valid batch was found.
        later: u64,
    },
}

/// Checks the whole batch at `pos` in `data`: its header, its length against the end
/// of `data`, its body checksum and framing, and that its offsets follow `expected`
/// (the lowest offset it may start at). Returns the batch or what failed.
pub(crate) fn check_batch_at(
    data: &[u8],
    pos: usize,
    expected: Offset,
) -> std::result::Result<ScannedBatch, &'static str> {
    let header = match check_header(&data[pos..]) {
        HeaderCheck::Valid(h) => h,
        HeaderCheck::Zero => return Err("zero batch header"),
        HeaderCheck::Short => return Err("batch header cut short"),
        HeaderCheck::Bad(reason) => return Err(reason),
    };
    let len = header.total_len();
    if len > (data.len() - pos) as u64 {
        return Err("batch length past the end of the file");
    }
    let body_start = pos + BATCH_HEADER_LEN;
    let body = &data[body_start..body_start + header.body_len as usize];
    let last = check_body(&header, body)?;
    if header.base < expected {
        return Err("batch offsets go back");
    }
    Ok(ScannedBatch {
        position: pos as u64,
        base: header.base,
        last,
        len,
        header,
    })
}

/// Scans the batches of a segment's bytes `data` (the whole file, header included,
/// whose base offset is `base`) and calls `each` for every whole batch, in order.
///
/// This is the recovery scan: it tells a torn tail (a bad batch with nothing valid after
/// it) from corruption in the middle (a bad batch followed by a valid one). "After" a
/// bad batch whose header checksum holds means past the end its length gives: its body
/// is its user's bytes, which may hold anything, this format's batches included.
pub(crate) fn scan(data: &[u8], base: Offset, mut each: impl FnMut(&ScannedBatch)) -> ScanEnd {
    let mut pos = SEGMENT_HEADER_LEN;
    let mut expected = base;
    while pos < data.len() {
        match check_batch_at(data, pos, expected) {
            Ok(batch) => {
                each(&batch);
                expected = batch.last + 1;
                pos += batch.len as usize;
            }
            Err(reason) => {
                if data[pos..].iter().all(|&b| b == 0) {
                    return ScanEnd::Zeros {
                        position: pos as u64,
                    };
                }
                return match valid_batch_after(data, pos, expected) {
                    Some(later) => ScanEnd::Corrupt {
                        position: pos as u64,
                        reason,
                        later,
                    },
                    None => ScanEnd::Torn {
                        position: pos as u64,
                        reason,
                    },
                };
            }
        }
    }
    ScanEnd::Clean
}

/// Checks that the segment header in `data` names `base`, the base of its file `path`.
pub(crate) fn check_header_base(data: &[u8], base: Offset, path: &Path) -> Result<()> {
    let found = decode_segment_header(data, path)?;
    if found != base {
        return Err(Error::corrupt(
            path,
            0,
            Some(base),
            format!("segment header names base offset {found}, its file name {base}"),
        ));
    }
    Ok(())
}

/// Scans the bytes of a segment that must be whole batches to their end (a segment
/// still written may end in zeros, when `zeros_end`), calling `each` for every batch.
/// Anything else is an [`Error::Corrupt`] naming `path`. Returns one past the last
/// offset (`base` for no batch).
pub(crate) fn scan_whole(
    data: &[u8],
    base: Offset,
    path: &Path,
    zeros_end: bool,
    mut each: impl FnMut(&ScannedBatch),
) -> Result<Offset> {
    let mut next = base;
    let end = scan(data, base, |b| {
        next = b.last + 1;
        each(b);
    });
    let (position, reason) = match end {
        ScanEnd::Clean => return Ok(next),
        ScanEnd::Zeros { .. } if zeros_end => return Ok(next),
        ScanEnd::Zeros { position } | ScanEnd::Torn { position, .. } => {
            (position, "a bad batch where a whole one was written")
        }
        ScanEnd::Corrupt {
            position, reason, ..
        } => (position, reason),
    };
    Err(Error::corrupt(path, position, Some(next), reason))
}

/// The position of the first valid batch after the bad batch at `pos`, if any. A header
/// whose checksum holds has a length to trust: the search starts past its end (a torn
/// write's batch whose end is past the data's end has nothing after it), never inside
/// its body. Only a header that fails its checksum gives no end, and the search then
/// tries every aligned position after it.
fn valid_batch_after(data: &[u8], pos: usize, expected: Offset) -> Option<u64> {
    let from = match check_header(&data[pos..]) {
        HeaderCheck::Valid(header) => {
            // In u64, a position and a u32-bounded length cannot overflow the sum.
            let end = pos as u64 + header.total_len();
            if end > data.len() as u64 {
                return None;
            }
            end as usize
        }
        HeaderCheck::Zero | HeaderCheck::Short | HeaderCheck::Bad(_) => pos + ALIGN,
    };
    first_valid_batch_from(data, from, expected)
}

/// The position of the first valid batch at an aligned position from `from` on, if any.
pub(crate) fn first_valid_batch_from(data: &[u8], from: usize, expected: Offset) -> Option<u64> {
    let mut pos = align_up(from);
    while pos + BATCH_HEADER_LEN <= data.len() {
        if data[pos..pos + BATCH_HEADER_LEN].iter().any(|&b| b != 0)
            && check_batch_at(data, pos, expected).is_ok()
        {
            return Some(pos as u64);
        }
        pos += ALIGN;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header and body of the one batch `bytes` holds (the header must be valid).
    fn split_batch(bytes: &[u8]) -> (BatchHeader, &[u8]) {
        let HeaderCheck::Valid(h) = check_header(bytes) else {
            panic!("valid header")
        };
        let body = &bytes[BATCH_HEADER_LEN..BATCH_HEADER_LEN + h.body_len as usize];
        (h, body)
    }

    fn one_batch(base: Offset, entries: &[Entry<'_>]) -> Vec<u8> {
        let body = check_batch(entries, 1 << 20).expect("sizes");
        let mut out = Vec::new();
        encode_batch(
            &mut out,
            body,
            entries
                .iter()
                .enumerate()
                .map(|(i, e)| (base + i as u64, e)),
        );
        out
    }

    #[test]
    fn a_batch_round_trips_and_is_padded_to_eight_bytes() {
        let entries = [
            Entry::with_timestamp(5, b"k", b"hello"),
            Entry::with_timestamp(6, b"", b""),
        ];
        let bytes = one_batch(40, &entries);
        assert_eq!(bytes.len() % ALIGN, 0);
        let (h, body) = split_batch(&bytes);
        assert_eq!((h.base, h.count), (40, 2));
        let body = Bytes::copy_from_slice(body);
        assert_eq!(check_body(&h, &body), Ok(41));
        let records: Vec<Record> = BatchRecords::new(&h, body)
            .collect::<Result<_, _>>()
            .expect("framing");
        assert_eq!(
            records,
            [entries[0].to_record(40), entries[1].to_record(41)]
        );
    }

    #[test]
    fn a_batch_mixing_large_and_small_records_has_the_checksum_of_its_body() {
        let large = vec![7u8; SUM_FROM_SOURCE];
        let larger = vec![9u8; 3 * SUM_FROM_SOURCE];
        let entries = [
            Entry::with_timestamp(1, b"a", b"small"),
            Entry::with_timestamp(2, b"", &large),
            Entry::with_timestamp(3, b"k", b""),
            Entry::with_timestamp(4, &larger, &larger),
            Entry::with_timestamp(5, b"b", b"tail"),
        ];
        let bytes = one_batch(7, &entries);
        let (h, body) = split_batch(&bytes);
        assert_eq!(h.body_crc, crc32c::crc32c(body));
        assert_eq!(check_body(&h, body), Ok(11));
        let records: Vec<Record> = BatchRecords::new(&h, Bytes::copy_from_slice(body))
            .collect::<Result<_, _>>()
            .expect("framing");
        let expected: Vec<Record> = (0..5).map(|i| entries[i].to_record(7 + i as u64)).collect();
        assert_eq!(records, expected);
    }

    /// A body many prefetch distances long, its records decoded to the last byte: the
    /// walk's prefetch stays inside the body. Runs under Miri (see [`prefetch`]).
    #[test]
    fn a_long_batch_decodes_every_record() {
        let payloads: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; 60 + usize::from(i)]).collect();
        let entries: Vec<Entry<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Entry::with_timestamp(i as u64, b"key", p))
            .collect();
        let bytes = one_batch(100, &entries);
        let (h, body) = split_batch(&bytes);
        assert!(h.body_len as usize > 8 * PREFETCH_AHEAD);
        let body = Bytes::copy_from_slice(body);
        assert_eq!(check_body(&h, &body), Ok(299));
        let records: Vec<Record> = BatchRecords::new(&h, body)
            .collect::<Result<_, _>>()
            .expect("framing");
        let expected: Vec<Record> = (0..200)
            .map(|i| entries[i].to_record(100 + i as u64))
            .collect();
        assert_eq!(records, expected);
    }

    #[test]
    fn decoding_and_check_body_refuse_bad_framing_alike() {
        let entries = [
            Entry::with_timestamp(1, b"a", b"one"),
            Entry::with_timestamp(2, b"b", b"two"),
            Entry::with_timestamp(3, b"c", b"three"),
        ];
        let bytes = one_batch(10, &entries);
        let (h, body) = split_batch(&bytes);
        let body = body.to_vec();
        // The second record's header starts after the first record (20 + 1 + 3 bytes).
        let second = RECORD_HEADER_LEN + 4;
        let reasons = [
            "record offsets not increasing inside a batch",
            "record length past the end of its batch",
            "bytes left over after the last record of a batch",
            "record header past the end of its batch",
        ];
        for reason in reasons {
            let (mut body, mut h) = (body.clone(), h);
            // Where the bad record is: the second, or the fourth of three.
            let mut good = 1;
            match reason {
                "record offsets not increasing inside a batch" => {
                    body[second..second + 4].copy_from_slice(&0u32.to_le_bytes());
                }
                "record length past the end of its batch" => {
                    body[second + 16..second + 20].copy_from_slice(&1000u32.to_le_bytes());
                }
                // The batch claims 2 records: the second leaves the third's bytes over.
                "bytes left over after the last record of a batch" => h.count = 2,
                _ => {
                    h.count = 4;
                    good = 3;
                }
            }
            h.body_crc = crc32c::crc32c(&body);
            assert_eq!(check_body(&h, &body), Err(reason));
            let decoded: Vec<_> = BatchRecords::new(&h, Bytes::from(body)).collect();
            let mut expected: Vec<_> = (0..good)
                .map(|i| Ok(entries[i].to_record(10 + i as u64)))
                .collect();
            expected.push(Err(reason));
            assert_eq!(decoded, expected, "{reason}");
        }
    }

    #[test]
    fn a_header_is_refused_before_its_length_is_read() {
        let mut bytes = one_batch(0, &[Entry::new(b"k", b"v")]);
        bytes[5] ^= 1; // the body length
        assert!(matches!(check_header(&bytes), HeaderCheck::Bad(_)));
        assert_eq!(check_header(&[0u8; 24]), HeaderCheck::Zero);
        assert_eq!(check_header(&[1u8; 10]), HeaderCheck::Short);
    }

    #[test]
    fn offsets_that_would_overflow_are_refused() {
        let bytes = one_batch(u64::MAX, &[Entry::new(b"k", b"v")]);
        let (h, body) = split_batch(&bytes);
        assert!(check_body(&h, body).is_err());
    }

    #[test]
    fn a_scan_tells_a_torn_tail_from_corruption_in_the_middle() {
        let mut data = encode_segment_header(0).to_vec();
        let first = one_batch(0, &[Entry::new(b"a", b"1")]);
        let second = one_batch(1, &[Entry::new(b"b", b"2")]);
        data.extend_from_slice(&first);
        data.extend_from_slice(&second);
        let whole = data.clone();
        assert_eq!(scan(&whole, 0, |_| {}), ScanEnd::Clean);
        let cut = &whole[..whole.len() - 3];
        assert!(matches!(scan(cut, 0, |_| {}), ScanEnd::Torn { .. }));
        data[SEGMENT_HEADER_LEN + 30] ^= 0xff; // inside the first batch's body
        assert!(matches!(scan(&data, 0, |_| {}), ScanEnd::Corrupt { .. }));
        let mut zeros = whole.clone();
        zeros.extend_from_slice(&[0u8; 100]);
        let end = whole.len() as u64;
        assert_eq!(scan(&zeros, 0, |_| {}), ScanEnd::Zeros { position: end });
    }

    #[test]
    fn a_scan_looks_for_a_later_batch_past_the_end_a_valid_header_gives() {
        let mut data = encode_segment_header(0).to_vec();
        // A 4-byte key puts the payload 8-aligned: it holds a batch that would pass.
        let mut payload = one_batch(1, &[Entry::new(b"b", b"2")]);
        payload.extend_from_slice(&[0xab; 64]);
        let outer = one_batch(0, &[Entry::new(b"four", &payload)]);
        data.extend_from_slice(&outer);
        let torn = &data[..data.len() - 8];
        let at = SEGMENT_HEADER_LEN as u64;
        assert!(matches!(scan(torn, 0, |_| {}), ScanEnd::Torn { position, .. } if position == at));
        // Damage to the body with a batch past its end stays corruption.
        let mut damaged = data.clone();
        damaged[SEGMENT_HEADER_LEN + 100] ^= 0xff;
        damaged.extend_from_slice(&one_batch(1, &[Entry::new(b"c", b"3")]));
        assert!(matches!(scan(&damaged, 0, |_| {}), ScanEnd::Corrupt { .. }));
        // A header that fails its checksum has no end to trust: every aligned position
        // after it is tried, and the batch inside the body counts.
        let mut bad_header = torn.to_vec();
        bad_header[SEGMENT_HEADER_LEN + 4] ^= 0xff;
        assert!(matches!(
            scan(&bad_header, 0, |_| {}),
            ScanEnd::Corrupt { .. }
        ));
    }
}
