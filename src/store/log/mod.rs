//! [`LogStore`]: the embedded, durable [`Store`]: segmented files on disk, group commit,
//! recovery on open.
//!
//! A log directory holds an append-only sequence of *segment* files. Appends go to the
//! newest (active) segment; once it would grow past
//! [`segment_bytes`](LogOptions::segment_bytes) it is sealed and a new one starts.
//! Concurrent appenders share one `write` and one `fdatasync` (group commit), readers
//! follow the tail without polling, and opening the directory *is* recovery: a torn tail
//! left by a crash is cut, damage anywhere else is reported with its file and byte
//! position and never returned as data.
//!
//! ```
//! use cauce::store::{LogOptions, LogStore, Store, SyncPolicy};
//! use cauce::Entry;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let log = LogStore::open(dir.path(), LogOptions::new().sync(SyncPolicy::Always)).unwrap();
//! log.append(&[Entry::new(b"alice", b"hello"), Entry::new(b"bob", b"hi")]).unwrap();
//! drop(log);
//!
//! let log = LogStore::open(dir.path(), LogOptions::new()).unwrap();
//! let payloads: Vec<_> = log.read_from(0).unwrap().map(|r| r.unwrap().payload).collect();
//! assert_eq!(payloads, [&b"hello"[..], &b"hi"[..]]);
//! ```
//!
//! # On-disk format (version 1)
//!
//! All integers are little-endian; every checksum is CRC32C.
//!
//! | file | contents |
//! | --- | --- |
//! | `{base:020}.log` | a segment: header, then batches, `base` = its first offset |
//! | `{base:020}.index` | the sparse index of a sealed segment (a hint, rebuilt when bad) |
//! | `start.meta` | the start offset set by retention (magic, offset, CRC) |
//! | `segments.meta` | the segment manifest, the segment files that must exist: magic `CAUCESEG`, version `u32` = 1, count `u64`, their bases `u64`, CRC (rule 16) |
//! | `cursors.journal` | named cursors: `crc, name_len u8, name, offset u64` entries, one appended and fdatasync'd per commit; rewritten atomically once past 64 KiB and 4x its live entries |
//! | `snapshots/{name}/{offset:020}.snap` | a snapshot: 32-byte header (magic, offset, length, blob CRC, header CRC), blob |
//! | `compact.commit` | only while a committed compaction is swapped in: magic `CAUCECMP`, count `u64`, the rewritten bases `u64`, CRC |
//! | `{base:020}.log.compact` | a rewritten segment waiting for its swap |
//! | `lock` | `flock`ed by the one process that has the directory open for writing |
//! | `start.meta.{pid}.{n}.tmp`, `segments.meta.{pid}.{n}.tmp`, `cursors.journal.{pid}.{n}.tmp`, `compact.commit.{pid}.{n}.tmp`, `snapshots/{name}/{offset:020}.snap.{pid}.{n}.tmp`, `{base:020}.index.tmp` | a file being written, renamed over its target once whole; `{pid}.{n}` (the writing process's id and a count, decimal) makes each write's name its own, so two writes never share one. A writable open removes those a crash left (regular files of exactly these names, nothing else), and those named `{target}.tmp` by versions before the count |
//!
//! **Segment header** (32 bytes): magic `CAUCELOG` (8), format version `u32` = 1, flags
//! `u32` = 0, base offset `u64`, reserved `u32`, CRC of the 28 bytes before it `u32`.
//!
//! **Batch** (the unit of framing, appended atomically, starts at a multiple of 8):
//! a 24-byte header: `header_crc u32` (CRC of the next 20 bytes), `body_len u32`,
//! `count u32` (≥ 1), `body_crc u32`, `base_offset u64`; then the body, then zero padding
//! to the next multiple of 8. The body is `count` records, each: `offset_delta u32`
//! (from the batch's base offset, strictly increasing: compaction leaves gaps),
//! `timestamp u64`, `key_len u32`, `payload_len u32`, key, payload. A sealed segment
//! ends at its file's end; a preallocated active segment ends at the first all-zero
//! batch header.
//!
//! **Index** (`.index`): magic `CAUCEIDX`, base `u64`, count `u64`, `count` pairs of
//! (first offset of a batch `u64`, byte position of its header `u64`), one per
//! [`index_interval_bytes`](LogOptions::index_interval_bytes), then a CRC of everything
//! before it.
//!
//! # Recovery rules
//!
//! Each rule has a test named after it, in `tests/log_recovery.rs` unless said otherwise.
//!
//! 1. **A batch header's checksum is checked before its length is trusted**, and every
//!    length is bounded by the end of the file (and of its batch): damaged bytes can never
//!    make the reader allocate or read past what is there.
//!    (`batch_header_checksum_is_checked_before_its_length_is_trusted`)
//! 2. **A torn tail is cut**: in the newest segment, a bad batch (header checksum, body
//!    checksum, framing, or a length past the end of the file) with no valid batch at any
//!    aligned position after it is the trace of a write that a crash interrupted; the file
//!    is truncated there and fdatasync'd, and its records were never acknowledged
//!    (unless a cursor or snapshot says otherwise: rule 14). "After" a bad batch whose
//!    header checksum holds is past the end its length gives (so a torn batch whose
//!    length runs past the end of the file has nothing after it): its body is the
//!    user's bytes, and a payload may hold anything, batches of this format included.
//!    Only a header that fails its checksum is followed by every aligned position after
//!    it. (`torn_tail_is_cut_not_returned`,
//!    `a_torn_batch_whose_payload_holds_a_batch_is_a_torn_tail`,
//!    `truncating_the_last_segment_at_any_byte_keeps_exactly_the_whole_records_before_it`,
//!    and the SIGKILL test in `tests/log_crash.rs`)
//! 3. **Corruption in the middle is an error, not a cut**: a bad batch followed by a valid
//!    batch means acknowledged data is damaged; opening for writing fails with
//!    [`Error::Corrupt`] naming the file, byte position and offset.
//!    [`LogStore::open_read_only`] opens up to that point instead, and its
//!    [`LogStore::verify`] still reports the damage.
//!    A power failure (not a process crash) that persisted a later page of one group
//!    write without an earlier one looks the same, and is reported, not guessed at.
//!    (`corruption_in_the_middle_is_an_error_not_a_cut`,
//!    `read_only_verify_reports_the_damage_its_view_stops_at`,
//!    `random_byte_flips_give_a_typed_error_or_a_cut_tail_never_a_wrong_record`)
//! 4. **Zeros end the data**: an all-zero batch header followed only by zeros is the
//!    unwritten part of the file (preallocation, or a crash before data reached the disk).
//!    Recovery reads a preallocated file only up to its first hole when only holes follow
//!    (`SEEK_HOLE`), since a hole reads as zeros. (`zeros_after_the_last_batch_end_the_data`)
//! 5. **Sealed segments are checked when read**: the reader checks every batch's checksums
//!    before returning its records; damage yields [`Error::Corrupt`] and the reader stops.
//!    The framing of a batch whose checksums match is checked as its records are decoded
//!    (one pass over the bytes, not two): framing that does not hold there, which no
//!    writer of this format produces, ends the read with [`Error::Corrupt`] at the batch,
//!    after its records before the bad one, as written. [`LogStore::verify`] checks every
//!    segment at once, framing included. (`corruption_in_a_sealed_segment_is_found_when_read`,
//!    `checksummed_batch_with_bad_framing_is_an_error_at_the_batch`)
//! 6. **A torn header on the newest segment is a crash during a roll**: no record in it was
//!    acknowledged (records go to a new segment only after its header, the file and the
//!    directory are fsync'd). If nothing valid follows it and its base continues the
//!    previous segment, the header is rewritten; otherwise it is corruption: opening for
//!    writing fails, and [`LogStore::open_read_only`] views the segments before it, as
//!    in rule 3. (`torn_header_on_the_newest_segment_is_rewritten`,
//!    `read_only_open_views_the_segments_before_a_damaged_newest_header`)
//! 7. **The tail is fdatasync'd on open**: after a crash, what recovery reads may still be
//!    only in the page cache; it is made durable before new records are built on it.
//!    (`tail_is_synced_on_open_and_appends_continue_after_recovery`)
//! 8. **A bad or missing index is rebuilt**: an index file is checked (checksum, base,
//!    increasing entries inside the segment, and that its first, middle and last entries
//!    point at batch headers with their offsets) and rebuilt from its segment if it fails.
//!    An index is a hint: a file that cannot be read, or a rebuilt one that cannot be
//!    written back, is logged and the index in memory serves.
//!    (`missing_or_wrong_index_is_rebuilt_and_reads_stay_correct`,
//!    `an_index_file_that_cannot_be_read_or_written_fails_no_read`)
//! 9. **A committed compaction rolls forward, an uncommitted one is dropped**: with
//!    `compact.commit` present, every listed `.log.compact` replaces its segment; one
//!    that fails its checks (header, every batch whole), or whose segment retention has
//!    deleted since, is deleted instead and its segment stays as it is (it holds every
//!    record the rewrite kept). Without a marker, `.log.compact` files are deleted. [`Store::compact`] settles the directory the same
//!    way before it writes anything, so a marker that a failed swap left is never on disk
//!    beside the files of a later compaction.
//!    (`committed_compaction_rolls_forward_and_uncommitted_one_is_dropped`, in
//!    `tests/log_compaction.rs`
//!    `a_compaction_after_a_failed_swap_first_finishes_the_committed_one`, and the
//!    SIGKILL test in `tests/log_compaction_crash.rs`)
//! 10. **Retention's start offset is exact**: it is persisted atomically before any
//!     segment is deleted, so reads below it are [`Error::OffsetOutOfRange`] after a
//!     crash too. (`retention_start_offset_is_exact_after_reopen`)
//! 11. **The cursor journal's torn tail is cut**; the last entry of each name wins.
//!     A bad entry with no valid entry at any byte after it is a torn append and is cut;
//!     a bad entry followed by a valid one is damage to committed cursors, and opening
//!     for writing fails with [`Error::Corrupt`] naming the journal and the bad entry's
//!     byte position rather than dropping the cursors after it.
//!     [`LogStore::open_read_only`] changes nothing and answers from the entries before
//!     the damage ([`LogStore::corruption`] reports it).
//!     (`cursor_journal_torn_tail_is_cut`,
//!     `cursor_journal_damage_in_the_middle_is_an_error_not_a_cut`)
//! 12. **The newest snapshot that passes its checks wins**: a damaged one falls back to
//!     the one before it (the newest two of each name are kept; a save below those two
//!     is deleted again at once, superseded, as [`Store::save_snapshot`] says).
//!     (`damaged_newest_snapshot_falls_back_to_the_previous_one`)
//! 13. **One writer per directory**: a second writable open, in this process or another,
//!     is [`Error::Locked`]. (`second_writable_open_of_a_directory_is_locked`)
//! 14. **No cut below a cursor or a snapshot**: committing a cursor or saving a snapshot
//!     makes the records before its offset durable first, so a log whose whole records
//!     end before the furthest cursor or snapshot has lost durable records. What rule 2
//!     would cut as a torn tail is then damage: opening for writing fails with
//!     [`Error::Corrupt`] naming the newest segment, the byte where its whole records
//!     end, and the cursor or snapshot, and cuts nothing; [`LogStore::open_read_only`]
//!     opens up to the damage. (`a_bad_tail_below_a_cursor_is_damage_not_a_torn_write`)
//! 15. **No segment file missing at the front**: retention persists the start before it
//!     deletes a segment and compaction never deletes the first, so a first segment file
//!     starting past the start (`start.meta`'s, or 0 where retention never ran) means
//!     files are missing: opening for writing fails with [`Error::Corrupt`] naming that
//!     first file; [`LogStore::open_read_only`] opens what is there and reports it.
//!     (`a_missing_first_segment_is_damage`)
//! 16. **No segment file the manifest lists is missing**: a roll lists its new segment
//!     in `segments.meta` before it creates the file, and compaction unlists the
//!     segments it empties before it deletes them, so a listed file from the one that
//!     holds the start on (and past the first file: rule 15) that is not there is lost,
//!     with its records. Opening for writing fails with [`Error::Corrupt`] naming that
//!     file and the offsets gone (from its base to the next file's), and changes no
//!     segment file (the cursor journal's torn tail, rule 11, is cut before);
//!     [`LogStore::open_read_only`] views the segments before it and reports it, as in
//!     rule 3; [`LogStore::verify`] reports it too (a store open for writing checks the
//!     directory as it is then). Only the newest listed segment may be missing, when no
//!     file follows it: a roll that failed or crashed between listing and creating it
//!     (a lost newest file looks the same). Files not listed are accepted: the emptied
//!     segments of a compaction that crashed before deleting them, and segments rolled
//!     under [`SyncPolicy::Never`], which the next [`Store::sync`] (or compaction, or
//!     dropping the store) lists rather than the roll. A read-only open beside a running
//!     writer lists the directory before and after it reads the manifest and the start,
//!     and reads those again after, so what the writer rolls, compacts or trims
//!     meanwhile is not taken for lost. A
//!     log without the file (written before it existed) opens as before; a writable
//!     open writes the file whenever it differs from the segments the open found
//!     (entries below the first segment aside). The file is written whole, so a damaged
//!     one is damage, as for `start.meta`: both opens fail with [`Error::Corrupt`]
//!     naming it; without it, the log opens as one written before it existed. (A
//!     version of this crate from before the manifest does not keep it: after one
//!     compacted the directory, an open may report a segment it deleted; remove
//!     `segments.meta`.)
//!     (`a_missing_segment_the_manifest_lists_is_damage`,
//!     `the_newest_segments_missing_past_a_crashed_roll_are_damage`,
//!     `a_listed_newest_segment_never_created_is_a_crashed_roll`,
//!     `a_log_whose_compaction_deleted_emptied_segments_reopens_clean`,
//!     `a_log_whose_retention_deleted_segments_reopens_clean`,
//!     `a_log_without_a_manifest_opens_and_gets_one`,
//!     `a_damaged_manifest_is_an_error_naming_it`,
//!     `verify_finds_a_segment_file_deleted_while_the_log_is_open`,
//!     `rolls_under_never_are_listed_by_the_next_sync_or_the_close`, and in
//!     `tests/log_compaction.rs`
//!     `read_only_opens_beside_a_writer_that_rolls_compacts_and_trims_find_no_file_missing`)
//!
//! # Durability and visibility
//!
//! A record is *committed* once its `append` returned: with [`SyncPolicy::Always`] that
//! is after its `fdatasync`; with `Every` and `Never`, as soon as it is in the write
//! buffer. Readers see exactly the committed records, including those still in the
//! buffer, so a follower waiting in [`Store::wait_for`] sees a record as soon as its
//! append returns. New segments are fsync'd, and so is the directory, before a record is
//! acknowledged in them, and a sealed segment is fdatasync'd when it is sealed; under
//! [`SyncPolicy::Never`] neither happens on its own, and the next [`Store::sync`] does both
//! (and writes the segment manifest the rolls left owed, rule 16).
//! Compaction fdatasyncs every sealed segment before it writes a rewrite, whatever the
//! policy: a rewrite drops records superseded by later ones, and must not become durable
//! before they are.
//!
//! A write or `fdatasync` that fails *poisons* the store: nothing is written to its
//! files or fdatasync'd again (a later write would land past the bytes that did not,
//! leaving a hole, and a later `fdatasync` would call them durable: the kernel reports
//! a failed writeback to one `fdatasync` only). That holds for the fdatasync of a
//! segment sealed under `Never` (by the next sync, or by a compaction) and for the
//! fsync of the directory that makes new segment files' names durable, as much as for
//! the active segment's. Every later append,
//! [`Store::sync`], [`Store::compact`], and [`Store::sync_until`] (so also a cursor or
//! snapshot) past the records already durable fails with [`Error::ReadOnly`] naming the
//! failed call and its file; reopening the store recovers what reached the disk. An
//! append's result and what readers see always agree:
//!
//! - Under `Always`, an append whose write or `fdatasync` failed returns the error, and
//!   its records are never shown to readers.
//! - Under `Every` and `Never`, an append returns `Ok` once its records are in the
//!   buffer, also when a write that the same call happens to run then fails (the
//!   background thread or another append could as well have run it): its records are
//!   committed, and readers go on seeing them, from memory if they never reached the
//!   file, as long as the store is open. Whether they are durable only a sync says,
//!   and after the failure it fails.
//! - An append that fails before its records are in the buffer (the store was poisoned
//!   already, or the roll to a new segment failed) takes no offsets.
//!
//! # Reading
//!
//! [`Store::read_from`] yields owned [`Record`](crate::Record)s whose key and payload are
//! slices of one shared read buffer (no copy, one reference count per record);
//! [`LogStore::replay_from`] hands out the same records borrowed, for folds that rebuild
//! state at full speed. A read from offset N seeks through the sparse index, then checks
//! every batch it passes.
//!
//! Sealed segments, and stretches of the active one already written to its file, are
//! read through memory mappings, which spares a copy of every byte; the tail is read
//! with `read` and from the writer's buffer. With [`LogOptions::keep_mapped`], a sealed
//! segment stays mapped once read, for faster replays again and again, and the
//! process's resident size counts the pages of it that were read. No process that
//! follows this format ever rewrites or shortens the bytes a reader maps (appends only
//! add after them, recovery cuts only what no reader was shown, compaction and retention
//! replace or delete whole files). Shortening a segment file by hand while a reader maps
//! it makes that reader fault (`SIGBUS`), as with any memory-mapped store.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_utils::CachePadded;
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use super::tail::Tail;
use super::{
    CompactOptions, Compaction, Deferred, RecordIter, Snapshot, Store, check_name,
    check_not_past_end, check_read_range,
};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Timestamp};

mod compact;
mod epoch;
mod index;
mod meta;
mod options;
mod reader;
pub(crate) use reader::LogReader;
mod recovery;
mod segment;
mod writer;

pub use options::{LogOptions, SyncPolicy};

use index::IndexEntry;

/// One segment file, shared by the writer and every reader that has it open.
pub(crate) struct Segment {
    pub(crate) base: Offset,
    pub(crate) path: PathBuf,
    /// Its file, while open: see [`Segment::file`].
    file: Arc<FileSlot>,
    files: Arc<OpenFiles>,
    /// Bytes of whole batches in the file (header included); the active segment's grows
    /// as the writer writes.
    pub(crate) end: AtomicU64,
    pub(crate) sealed: AtomicBool,
    /// The sparse index; `None` for a sealed segment until it is first needed.
    index: Mutex<Option<Vec<IndexEntry>>>,
    /// Whether `index` was read from its file (rather than built as the segment was
    /// written, or rebuilt from it): its entries are then checked as they are used.
    index_from_file: AtomicBool,
    /// One past its last offset, when recovery computed it.
    pub(crate) next_hint: Offset,
    /// Damage found by a read-only open (the view stops there).
    pub(crate) damage: Option<Error>,
    /// The whole segment mapped into memory, once it is sealed and first read (`None`
    /// inside: the kernel refused, and readers read the file).
    pub(crate) mapped: std::sync::OnceLock<Option<Bytes>>,
    /// The newest record timestamp in it, for retention by age: set by the writer when
    /// it seals the segment, or found by a read of the segment when first needed.
    pub(crate) newest: std::sync::OnceLock<Timestamp>,
}

/// The open files of a store's sealed segments. A log keeps every segment it holds, so
/// a file descriptor for each (as until now) let a long or often compacted log outgrow the
/// usual limit of 1,024 open files: its open failed with `EMFILE`. At most `limit` sealed
/// segments stay open between reads, the least recently opened closed first; a closed
/// one is opened again by its path when next read. The active segment stays open.
///
/// A path names the same file for as long as its segment is in the store's list:
/// compaction renames a rewrite over a path, and retention unlinks one, only after they
/// took the segment out of the list (under its lock) and [pinned](Segment::pin) the file
/// of each one that a reader still holds, so that readers keep reading the old file, as
/// they did when every file stayed open.
pub(crate) struct OpenFiles {
    limit: usize,
    /// Slots in the order their files were opened; some closed or gone since.
    order: Mutex<std::collections::VecDeque<std::sync::Weak<FileSlot>>>,
}

impl OpenFiles {
    pub(crate) fn new(limit: usize) -> Arc<OpenFiles> {
        Arc::new(OpenFiles {
            limit: limit.max(1),
            order: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Counts `slot`'s file as open, closing the least recently opened ones past the
    /// limit (a reader that holds one keeps it open until it is done).
    fn opened(&self, slot: &Arc<FileSlot>) {
        let mut order = self.order.lock();
        order.push_back(Arc::downgrade(slot));
        while order.len() > self.limit {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            if let Some(oldest) = oldest.upgrade() {
                let mut file = oldest.file.lock();
                if !oldest.pinned.load(Ordering::Relaxed) {
                    file.open.take();
                }
            }
        }
    }
}

/// A segment's file, open or closed (see [`OpenFiles`]).
#[derive(Default)]
pub(crate) struct FileSlot {
    file: Mutex<SlotFile>,
    /// Never closed: the path may name another file by now, or none.
    pinned: AtomicBool,
    /// Replaced by compaction or deleted by retention: nothing to make durable.
    gone: AtomicBool,
}

#[derive(Default)]
struct SlotFile {
    open: Option<Arc<File>>,
    /// The file's device and inode, once opened: a file opened again by its path must be
    /// the same, or the segment's length and index would be read against another file
    /// (a mapping past its end faults the process).
    identity: Option<(u64, u64)>,
}

/// The device and inode of an open file.
fn identity_of(file: &File, path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    Ok((meta.dev(), meta.ino()))
}

impl Segment {
    /// A segment whose file is `file`, or, for `None`, the file its path names (opened
    /// when first needed). A sealed one's open file counts toward `files`' limit; the
    /// active segment's counts once it is sealed ([`Segment::sealed_now`]).
    pub(crate) fn new(
        base: Offset,
        path: PathBuf,
        file: Option<File>,
        files: &Arc<OpenFiles>,
        end: u64,
        sealed: bool,
        index: Option<Vec<IndexEntry>>,
    ) -> Segment {
        let open = file.is_some();
        // Unknown (and then taken at the first open) only if the stat fails.
        let identity = file.as_ref().and_then(|f| identity_of(f, &path).ok());
        let slot = Arc::new(FileSlot {
            file: Mutex::new(SlotFile {
                open: file.map(Arc::new),
                identity,
            }),
            ..FileSlot::default()
        });
        if open && sealed {
            files.opened(&slot);
        }
        Segment {
            base,
            path,
            file: slot,
            files: files.clone(),
            end: AtomicU64::new(end),
            sealed: AtomicBool::new(sealed),
            index: Mutex::new(index),
            index_from_file: AtomicBool::new(false),
            next_hint: base,
            damage: None,
            mapped: std::sync::OnceLock::new(),
            newest: std::sync::OnceLock::new(),
        }
    }

    /// Its file, opened again by its path if it was closed to keep under the limit of
    /// open files (only a sealed segment's is, and only while its path names it).
    pub(crate) fn file(&self) -> Result<Arc<File>> {
        let mut slot = self.file.file.lock();
        if let Some(file) = slot.open.as_ref() {
            return Ok(file.clone());
        }
        let file = self.reopen(&mut slot)?;
        drop(slot);
        self.files.opened(&self.file);
        Ok(file)
    }

    /// Opens the file by its path again, if it is still this segment's.
    fn reopen(&self, slot: &mut SlotFile) -> Result<Arc<File>> {
        let file = File::open(&self.path).map_err(|e| Error::io("open", &self.path, e))?;
        let identity = identity_of(&file, &self.path)?;
        if slot.identity.is_some_and(|known| known != identity) {
            return Err(Error::io(
                "open",
                &self.path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the file at this path is no longer this segment's: compaction or \
                     retention replaced or removed it since it was read",
                ),
            ));
        }
        slot.identity = Some(identity);
        let file = Arc::new(file);
        slot.open = Some(file.clone());
        Ok(file)
    }

    /// Counts the file of a segment just sealed toward the limit of open files.
    pub(crate) fn sealed_now(&self) {
        if self.file.file.lock().open.is_some() {
            self.files.opened(&self.file);
        }
    }

    /// Marks the segment replaced or deleted, then keeps its file open for as long as
    /// the segment lives if `held()` (a reader may still read it): called once it is
    /// out of reach of new readers (the store's list is locked, or it left the list),
    /// before its path is renamed over or unlinked. Marked first, so that the writer,
    /// which takes segments from `Weak`s and not from the list, either counts in
    /// `held()` or sees the mark (see `Shared::sync_all`).
    pub(crate) fn retire(&self, held: impl FnOnce() -> bool) -> Result<()> {
        self.file.gone.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !held() {
            return Ok(());
        }
        let mut slot = self.file.file.lock();
        if slot.open.is_none() {
            self.reopen(&mut slot)?;
        }
        self.file.pinned.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Whether compaction replaced it or retention deleted it.
    /// (The fence pairs with `retire`'s: a caller that took the segment from a `Weak`
    /// just before is counted there, or sees the mark here.)
    pub(crate) fn is_gone(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.file.gone.load(Ordering::SeqCst)
    }

    fn add_index_entry(&self, offset: Offset, position: u64) {
        if let Some(entries) = self.index.lock().as_mut() {
            entries.push(IndexEntry { offset, position });
        }
    }

    fn index_entries(&self) -> Option<Vec<IndexEntry>> {
        self.index.lock().clone()
    }
}

/// The writer's side, under one short lock.
// The fields every append touches come first, in declaration order (`repr(C)`), so that
// an append reads and writes two or three cache lines of the state, not five: submitters
// on different cores pass these lines back and forth on every append.
#[repr(C)]
pub(crate) struct WriterState {
    /// The offset the next appended record gets.
    next: Offset,
    /// Encoded batches not yet handed to the file.
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    buf_pos: u64,
    /// The next batch at or past this position gets an index entry.
    next_index_pos: u64,
    /// Appends whose records are in `buf`.
    buf_appends: u64,
    unsynced_records: u64,
    /// When the oldest record not yet synced was appended (`Every`).
    unsynced_since: Option<Instant>,
    /// Set when a write or fdatasync failed: later appends are refused.
    poisoned: Option<String>,
    /// True while a leader writes outside the lock.
    flushing: bool,
    /// A segment was created under `SyncPolicy::Never` without an fsync of the directory.
    dir_unsynced: bool,
    /// Followers that went to sleep on `Shared::flush_epoch` since the last write ended.
    sleepers: u32,
    /// Readers wait for the committed end, which a sync under `Always` moved: they are
    /// woken with the followers, once the lock is let go (`Shared::end_flush`).
    tail_waiting: bool,
    active: Arc<Segment>,
    /// The buffer a leader is writing right now, at its file position.
    inflight: Option<(u64, Bytes)>,
    /// Every record before this offset is on disk.
    synced: Offset,
    /// An empty buffer kept for reuse.
    spare: Vec<u8>,
    /// Appends seen around the last group commit: how many appenders are active.
    concurrency: u64,
    /// How long the last write + fdatasync took.
    last_sync: Duration,
    /// How long the last group took to fill (from its first append to its write).
    last_fill: Duration,
    /// When the group in `buf` was opened (`SyncPolicy::Always`: by the first append
    /// that found no write in flight); it is written at the latest a gather window
    /// later.
    group_started: Option<Instant>,
    /// Segments sealed under `SyncPolicy::Never` and not fdatasync'd yet. Weak: one
    /// that retention deletes or compaction replaces needs no fdatasync, and holding it
    /// would keep its file open (and its disk space taken) for as long as the store
    /// lives.
    unsynced_sealed: Vec<std::sync::Weak<Segment>>,
    /// The active segment is written (data or zeros) up to here.
    zeroed_until: u64,
    /// The newest timestamp appended to the active segment, kept under retention by
    /// age; `None` when not known (the segment the store opened on, whose earlier
    /// records it did not read).
    active_newest: Option<Timestamp>,
    /// When the active segment became the active one (or the store opened on it).
    active_since: Instant,
}

/// Where the bytes at a position of the active segment are.
pub(crate) enum TailBytes {
    /// In memory (the buffer or the write in flight), from the position on.
    Memory(Bytes),
    /// In the file (written, or the segment is no longer the active one).
    File,
    /// Nowhere yet.
    Nothing,
}

/// State shared by a store, its readers and its flusher thread.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) options: LogOptions,
    writable: bool,
    writer: CachePadded<Mutex<WriterState>>,
    /// Signalled whenever a leader finishes (or a roll ends).
    flushed: Condvar,
    /// Wakes the `Every` flusher thread.
    flusher_wake: Condvar,
    /// `WriterState::synced`, readable without the lock.
    durable: AtomicU64,
    /// Counts the writes (and rolls) that ended; followers sleep until it moves.
    flush_epoch: epoch::FlushEpoch,
    tail: Tail,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// The open files of the sealed segments.
    files: Arc<OpenFiles>,
    start: AtomicU64,
    /// The segment files that must exist (rule 16); taken after the writer's lock, the
    /// list's and `maintenance`, never before them.
    manifest: Mutex<meta::Manifest>,
    cursors: Mutex<meta::CursorJournal>,
    snapshots: meta::Snapshots,
    /// Serialises retention and compaction.
    maintenance: Mutex<()>,
    shutdown: AtomicBool,
    /// `write` calls and `fdatasync` calls made for appended records.
    writes: AtomicU64,
    syncs: AtomicU64,
    /// A segment was sealed since retention was last applied (set only under a
    /// retention option).
    retention_due: AtomicBool,
}

impl Shared {
    /// The writer's lock for a reader at the tail, which contends with every append: it
    /// tries the lock in a short spin (crossbeam's backoff: spins, then a few yields)
    /// before it parks. A follower parked on this lock takes tens of microseconds to
    /// wake, and every record appended meanwhile waits for it. A follower of a stream
    /// published at 1.8M records/s found the lock taken on about a quarter of its
    /// reads; spinning instead of parking took `stream.log.logstore.tail_p99_us` from
    /// 34–45 µs to 12–19 µs, the bare channel's. A writer that holds the lock longer (a
    /// roll) still gets its follower parked.
    fn lock_for_tail(&self) -> MutexGuard<'_, WriterState> {
        let backoff = crossbeam_utils::Backoff::new();
        loop {
            if let Some(st) = self.writer.try_lock() {
                return st;
            }
            if backoff.is_completed() {
                return self.writer.lock();
            }
            backoff.snooze();
        }
    }

    /// The bytes of the active segment `seg` at `pos` that are not in the file yet: at
    /// least `want` of them when there are, and at most about a read chunk more (the
    /// copy is made under the writer's lock).
    fn tail_bytes(&self, seg: &Segment, pos: u64, want: usize) -> TailBytes {
        let st = self.lock_for_tail();
        if !std::ptr::eq(Arc::as_ptr(&st.active), seg) || pos < seg.end.load(Ordering::Acquire) {
            return TailBytes::File;
        }
        if let Some((at, bytes)) = &st.inflight
            && pos >= *at
            && pos < at + bytes.len() as u64
        {
            return TailBytes::Memory(bytes.slice((pos - at) as usize..));
        }
        if pos >= st.buf_pos && pos < st.buf_pos + st.buf.len() as u64 {
            let from = (pos - st.buf_pos) as usize;
            let to = st.buf.len().min(from + want.max(reader::CHUNK_BYTES));
            return TailBytes::Memory(Bytes::copy_from_slice(&st.buf[from..to]));
        }
        TailBytes::Nothing
    }

    /// The position to scan from for `offset` in `seg`, loading (or rebuilding) its index
    /// first if needed.
    ///
    /// The entry sought to is checked against the segment (a batch header starting at
    /// its offset): an index built from another file of the segment, which a compaction
    /// replaced, passes the load's spot checks and would have the scan start at a later
    /// batch, skipping records. A wrong entry has the index rebuilt from the segment.
    fn seek(&self, seg: &Segment, offset: Offset) -> Result<u64> {
        let mut index = seg.index.lock();
        let mut trust_file = true;
        loop {
            if index.is_none() {
                // The index file of a retired segment is its rewrite's, or nobody's:
                // built from the segment's own file, and not written out.
                let gone = seg.is_gone();
                let (entries, from_file) = index::load_or_rebuild(
                    &self.dir,
                    seg.base,
                    &*seg.file()?,
                    seg.end.load(Ordering::Acquire),
                    self.options.index_interval_bytes,
                    self.writable && !gone,
                    trust_file && !gone,
                )?;
                *index = Some(entries);
                seg.index_from_file.store(from_file, Ordering::Relaxed);
            }
            let entry = index.as_deref().and_then(|e| index::seek(e, offset));
            match entry {
                None => return Ok(segment::SEGMENT_HEADER_LEN as u64),
                Some(e)
                    if !seg.index_from_file.load(Ordering::Relaxed)
                        || index::points_at_its_batch(&*seg.file()?, e) =>
                {
                    return Ok(e.position);
                }
                Some(e) => {
                    tracing::warn!(
                        segment = %seg.path.display(),
                        offset = e.offset,
                        position = e.position,
                        "an index entry does not match its segment; rebuilding the index"
                    );
                    *index = None;
                    trust_file = false;
                }
            }
        }
    }

    /// The segments held, in order, with their sizes in bytes: a sealed one's file, the
    /// active one's records so far (those still in the write buffer included).
    fn segment_sizes(&self) -> Vec<(Arc<Segment>, u64)> {
        let segments: Vec<Arc<Segment>> = self.segments.read().clone();
        let active_len = {
            let st = self.writer.lock();
            (st.active.clone(), st.buf_pos + st.buf.len() as u64)
        };
        segments
            .into_iter()
            .map(|seg| {
                let len = if Arc::ptr_eq(&seg, &active_len.0) {
                    active_len.1
                } else {
                    seg.end.load(Ordering::Acquire)
                };
                (seg, len)
            })
            .collect()
    }

    /// Rules 15 and 16 against the directory as it is now: every segment file the store
    /// holds is there.
    fn check_files(&self) -> Result<()> {
        // Retention and compaction delete segment files only under this lock.
        let _maintenance = self.maintenance.lock();
        // The list before the files: a roll lists a segment before it creates its file.
        let listed = self.manifest.lock().bases().to_vec();
        let present = recovery::list_segments(&self.dir)?;
        let meta_start = meta::read_start(&self.dir)?;
        let missing = recovery::missing_files(&self.dir, &present, meta_start, Some(&listed));
        missing.into_error().map_or(Ok(()), Err)
    }

    fn truncate_before(&self, offset: Offset) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly(
                "opened read-only: retention is refused".into(),
            ));
        }
        let _maintenance = self.maintenance.lock();
        self.truncate_locked(offset)
    }

    /// [`truncate_before`](Self::truncate_before) with the store writable and the
    /// maintenance lock held.
    fn truncate_locked(&self, offset: Offset) -> Result<()> {
        let start = self.start.load(Ordering::Acquire);
        let end = self.tail.get();
        if offset > end {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                start,
                end,
            });
        }
        if offset <= start {
            return Ok(());
        }
        // Persist the exact start first: a crash after it never shows records below it.
        meta::write_start(&self.dir, offset)?;
        self.start.store(offset, Ordering::Release);
        let doomed: Vec<Arc<Segment>> = {
            let mut segments = self.segments.write();
            // A segment is wholly below `offset` when the next one starts at or before it;
            // the active (last) segment always stays.
            let keep_from = segments
                .windows(2)
                .take_while(|w| w[1].base <= offset)
                .count();
            if let Some(kept) = segments.get(keep_from) {
                self.manifest.lock().forget_below(kept.base);
            }
            segments.drain(..keep_from).collect()
        };
        for seg in &doomed {
            // Out of the list, so no reader can take it any more: one that holds it
            // keeps reading its file (see `OpenFiles`).
            seg.retire(|| Arc::strong_count(seg) > 1)?;
            meta::remove_if_exists(&seg.path)?;
            meta::remove_if_exists(&index::index_path(&self.dir, seg.base))?;
        }
        if !doomed.is_empty() {
            meta::sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// What [`LogStore::verify`] found: every segment checked, batch by batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogVerification {
    /// Segment files checked.
    pub segments: u64,
    /// Batches whose checksums and framing hold.
    pub batches: u64,
    /// Records in those batches.
    pub records: u64,
    /// Bytes of those segments, headers and padding included.
    pub bytes: u64,
}

/// Counters of the work a [`LogStore`] did since it was opened, from
/// [`LogStore::stats`]: with group commit, `appends / syncs` is how many appends shared
/// each `fdatasync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records appended.
    pub records: u64,
    /// `write` calls that carried appended records to a segment file.
    pub writes: u64,
    /// `fdatasync` calls made for appended records (by appends, syncs, rolls, and
    /// compaction for the sealed segments it reads).
    pub syncs: u64,
    /// Segment files the store holds now, the active one included.
    pub segments: u64,
    /// Bytes of those segments now: the sealed ones' files, the active one's records so
    /// far (those still in the write buffer included; not the zeros of
    /// [preallocation](LogOptions::preallocate)).
    pub bytes: u64,
}

/// A [`Store`] in a directory of segment files; see the [module docs](self) for the
/// format, the recovery rules and the guarantees.
///
/// Share it between threads by reference or in an `Arc`: every method takes `&self`.
/// Dropping it writes what is still buffered (and fdatasyncs it unless the policy is
/// [`SyncPolicy::Never`]) and releases the directory's lock.
pub struct LogStore {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    /// Read-only: the damage in the segments where the view stops.
    segment_damage: Option<Error>,
    /// Read-only: the damage in the middle of the cursor journal.
    journal_damage: Option<Error>,
    opened_at: Offset,
    _lock: Option<File>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.shared.dir)
            .field("writable", &self.shared.writable)
            .field("start", &self.start_offset())
            .field("next", &self.next_offset())
            .finish()
    }
}

impl LogStore {
    /// Opens (creating it if needed) the log in `dir` for reading and writing, running
    /// recovery: see the module docs. Fails with [`Error::Locked`] if another open store
    /// holds the directory, and with [`Error::Corrupt`] on damage that is not a torn tail.
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<LogStore> {
        let dir = dir.as_ref();
        options.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let lock = meta::lock_dir(dir)?;
        LogStore::build(dir, options, Some(lock))
    }

    /// Opens the log in `dir` without changing anything in it, up to the first damage:
    /// every segment is checked now, and the view ends before the first bad batch or
    /// missing segment file ([`corruption`](Self::corruption) says where). The cursor
    /// journal likewise answers from its entries before any damage in it. A torn tail
    /// is left out of the view but not cut. Appends, retention, compaction and cursor
    /// commits are [`Error::ReadOnly`]. Takes no lock: a writer may be running, and the
    /// view is the log as it was when opened (records appended later are not seen).
    ///
    /// So that the view stays the same whatever a writer deletes or renames, it keeps
    /// every segment file open ([`LogOptions::max_open_segments`] does not apply). When
    /// the segments would take half or more of the process's soft limit on open files,
    /// the open raises that limit by their number, up to the hard limit (logged at
    /// `info`); with a hard limit too low, it fails with the [`Error::Io`] `EMFILE` of
    /// the file that did not open.
    pub fn open_read_only(dir: impl AsRef<Path>, options: LogOptions) -> Result<LogStore> {
        let dir = dir.as_ref();
        options.validate()?;
        if !dir.is_dir() {
            return Err(Error::io(
                "open",
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
            ));
        }
        LogStore::build(dir, options, None)
    }

    fn build(dir: &Path, options: LogOptions, lock: Option<File>) -> Result<LogStore> {
        let writable = lock.is_some();
        let (cursors, journal_damage) = meta::CursorJournal::open(dir, writable)?;
        let floor = meta::durable_floor(dir, &cursors)?;
        // A read-only store keeps every file open: its view is the log as it was when
        // opened, whatever a writer renames or deletes meanwhile.
        let files = OpenFiles::new(if writable {
            options.max_open_segments
        } else {
            usize::MAX
        });
        let recovered = recovery::recover(dir, &options, writable, floor.as_ref(), &files)?;
        // Read-only, the segments' damage is the one reported; the journal's is logged.
        if let (Some(_), Some(journal)) = (&recovered.corruption, &journal_damage) {
            tracing::warn!(error = %journal, "the cursor journal is damaged too");
        }
        let empty = || -> Result<Arc<Segment>> {
            // A read-only view of a directory with no segment: a stand-in that holds
            // nothing, never read.
            let file = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
            Ok(Arc::new(Segment::new(
                recovered.start,
                dir.join("(none)"),
                Some(file),
                &files,
                segment::SEGMENT_HEADER_LEN as u64,
                false,
                Some(Vec::new()),
            )))
        };
        let mut segments = recovered.segments;
        // What a writable open listed in the manifest: its segments.
        let manifest = meta::Manifest::new(dir, segments.iter().map(|s| s.base).collect());
        if segments.is_empty() {
            segments.push(empty()?);
        }
        let active = segments[segments.len() - 1].clone();
        let buf_pos = active.end.load(Ordering::Acquire);
        let next_index_pos = active
            .index_entries()
            .and_then(|e| {
                e.last()
                    .map(|l| l.position.saturating_add(options.index_interval_bytes))
            })
            .unwrap_or(0);
        let state = WriterState {
            active,
            next: recovered.next,
            buf: Vec::new(),
            buf_pos,
            inflight: None,
            flushing: false,
            synced: recovered.next,
            unsynced_since: None,
            unsynced_records: 0,
            next_index_pos,
            poisoned: None,
            spare: Vec::new(),
            buf_appends: 0,
            concurrency: 1,
            last_sync: Duration::ZERO,
            last_fill: Duration::ZERO,
            group_started: None,
            unsynced_sealed: Vec::new(),
            sleepers: 0,
            tail_waiting: false,
            dir_unsynced: false,
            zeroed_until: buf_pos,
            active_newest: None,
            active_since: Instant::now(),
        };
        let sync = options.sync;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            options,
            writable,
            writer: CachePadded::new(Mutex::new(state)),
            flushed: Condvar::new(),
            flusher_wake: Condvar::new(),
            durable: AtomicU64::new(recovered.next),
            flush_epoch: epoch::FlushEpoch::default(),
            tail: Tail::new(recovered.next),
            segments: RwLock::new(segments),
            files,
            start: AtomicU64::new(recovered.start),
            manifest: Mutex::new(manifest),
            cursors: Mutex::new(cursors),
            snapshots: meta::Snapshots::new(dir),
            maintenance: Mutex::new(()),
            shutdown: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            retention_due: AtomicBool::new(false),
        });
        let flusher = match sync {
            SyncPolicy::Every { interval, .. } if writable => {
                let s = shared.clone();
                let handle = std::thread::Builder::new()
                    .name("cauce-log-flusher".into())
                    .spawn(move || s.flusher_loop(interval))
                    .map_err(|source| Error::Spawn {
                        name: "cauce-log-flusher".to_string(),
                        source,
                    })?;
                Some(handle)
            }
            _ => None,
        };
        let store = LogStore {
            shared,
            flusher,
            segment_damage: recovered.corruption,
            journal_damage,
            opened_at: recovered.next,
            _lock: lock,
        };
        if writable && store.shared.options.retains() {
            // As after a seal: the store opens whatever retention finds (a damaged
            // sealed segment it reads for its newest timestamp is reported when read,
            // as without retention), and retention is tried again after the next seal.
            store.shared.retention_due.store(true, Ordering::Release);
            store.retain_if_due(true);
        }
        Ok(store)
    }

    /// Replays every committed record from `from` on, in order: `f` gets each record's
    /// offset and its timestamp, key and payload borrowed from the read buffer, so nothing
    /// is copied or reference-counted per record. This is the fastest way to rebuild state
    /// as a fold over the log; [`Store::read_from`] gives owned [`Record`]s instead.
    /// Returns the offset after the last record replayed (where to resume).
    ///
    /// Damage is an [`Error::Corrupt`] after the records before it were replayed, as a
    /// reader would report it; a `from` outside the held range is
    /// [`Error::OffsetOutOfRange`].
    ///
    /// ```
    /// use cauce::store::{LogOptions, LogStore, Store};
    /// use cauce::Entry;
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = LogStore::open(dir.path(), LogOptions::new()).unwrap();
    /// log.append(&[Entry::new(b"a", b"1"), Entry::new(b"b", b"22")]).unwrap();
    /// let mut total = 0;
    /// let next = log.replay_from(0, |_offset, entry| total += entry.payload.len()).unwrap();
    /// assert_eq!((total, next), (3, 2));
    /// ```
    ///
    /// [`Record`]: crate::Record
    pub fn replay_from(&self, from: Offset, f: impl FnMut(Offset, Entry<'_>)) -> Result<Offset> {
        self.replay_range(from, Offset::MAX, f)
    }

    /// [`replay_from`](Self::replay_from), stopping before `until`
    /// ([`Store::replay_range`]): no batch past the one that holds `until` is read.
    pub fn replay_range(
        &self,
        from: Offset,
        until: Offset,
        f: impl FnMut(Offset, Entry<'_>),
    ) -> Result<Offset> {
        self.reader_at(from)?.replay(until, f)
    }

    /// A reader from `from` (checked against the log's range now). It holds the log's
    /// files, not the store: dropping the store releases the directory's lock even
    /// while the reader runs.
    pub(crate) fn reader_at(&self, from: Offset) -> Result<LogReader> {
        check_read_range(from, self.start_offset(), self.next_offset())?;
        Ok(reader::LogReader::new(self.shared.clone(), from))
    }

    /// For a store opened with [`open_read_only`](Self::open_read_only): the damage where
    /// its view stops, if it found any. Damage in the segments comes first; failing
    /// that, damage in the middle of the cursor journal, in which case
    /// [`cursor`](Store::cursor) answers from the entries before it (a cursor committed
    /// again after the damage shows its earlier position).
    pub fn corruption(&self) -> Option<&Error> {
        self.segment_damage
            .as_ref()
            .or(self.journal_damage.as_ref())
    }

    /// What the store did since it was opened (records, writes, fdatasyncs), and the
    /// segment files it holds now.
    pub fn stats(&self) -> LogStats {
        let records = self.shared.writer.lock().next - self.opened_at;
        let sizes = self.shared.segment_sizes();
        LogStats {
            records,
            writes: self.shared.writes.load(Ordering::Relaxed),
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            segments: sizes.len() as u64,
            bytes: sizes.iter().map(|(_, len)| len).sum(),
        }
    }

    /// Applies the retention of its options ([`LogOptions::retain_for`],
    /// [`LogOptions::retain_bytes`]) now: deletes the oldest sealed segments they let
    /// go, as [`Store::truncate_before`] of the first offset kept would, and returns the
    /// start offset after it. The store does this itself when it opens and after each
    /// append that seals a segment; a host calls it on a timer for retention by age on
    /// a log that can go quiet (no thread of the store's wakes for it). Does nothing
    /// without a retention option. [`Error::ReadOnly`] on a store opened read-only.
    ///
    /// Finding a segment's newest timestamp reads the segment once, for a segment this
    /// store did not seal itself (one it found when it opened, or a compaction's
    /// rewrite); the store remembers it after.
    ///
    /// ```
    /// use std::time::Duration;
    /// use cauce::store::{LogOptions, LogStore, Store};
    /// use cauce::Entry;
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let options = LogOptions::new().segment_bytes(4096).retain_for(Duration::from_secs(3600));
    /// let log = LogStore::open(dir.path(), options).unwrap();
    /// // Records stamped two hours ago, a few segments' worth, then one of now.
    /// let old = cauce::record::now() - 2 * 3600 * 1000;
    /// for _ in 0..100 {
    ///     log.append(&[Entry::with_timestamp(old, b"k", &[0u8; 100])]).unwrap();
    /// }
    /// log.append(&[Entry::new(b"k", b"now")]).unwrap();
    /// // Every sealed segment held only old records; the active one stays.
    /// assert_eq!(log.apply_retention().unwrap(), log.start_offset());
    /// assert_eq!(log.stats().segments, 1);
    /// # Ok::<(), cauce::Error>(())
    /// ```
    pub fn apply_retention(&self) -> Result<Offset> {
        if !self.shared.writable {
            return Err(Error::ReadOnly(
                "opened read-only: retention is refused".into(),
            ));
        }
        let _maintenance = self.shared.maintenance.lock();
        self.apply_retention_locked(true)
    }

    /// [`apply_retention`](Self::apply_retention) on a writable store, with the
    /// maintenance lock held. `seal_active`: whether a quiet log's active segment whose
    /// every record expired may be sealed to go too (by `apply_retention` and at open;
    /// not after an append, whose own record, backfilled past the age, would then be
    /// dropped before the append returned).
    fn apply_retention_locked(&self, seal_active: bool) -> Result<Offset> {
        let shared = &self.shared;
        shared.retention_due.store(false, Ordering::Release);
        if !shared.options.retains() {
            return Ok(self.start_offset());
        }
        let (mut cut, expired_active) = self.retention_cut()?;
        if let Some(active) = expired_active.filter(|_| seal_active) {
            // A quiet log whose every record expired: its active segment is sealed so
            // that it can go too. A record appended meanwhile is in it now, and keeps it.
            shared.seal_active(&active)?;
            // The seal asked for retention after it: this is it. Left set, the next
            // append (which seals nothing) ran retention again, and dropped its own
            // record if it was backfilled past the age before the call returned. A
            // segment sealed from here on asks again; one sealed before is in the cut.
            shared.retention_due.store(false, Ordering::Release);
            cut = self.retention_cut()?.0;
        }
        if let Some(cut) = cut {
            let before = self.start_offset();
            shared.truncate_locked(cut)?;
            tracing::info!(
                dir = %shared.dir.display(),
                from = before,
                to = cut,
                "retention dropped the oldest segments"
            );
        }
        Ok(self.start_offset())
    }

    /// The first offset that retention keeps, if it lets any sealed segment go; and the
    /// active segment, if every segment before it goes and every record in it is older
    /// than the retention age (to be sealed, then let go). Called under the maintenance
    /// lock: the segments do not change under it but by a roll, which only adds one.
    fn retention_cut(&self) -> Result<(Option<Offset>, Option<Arc<Segment>>)> {
        let options = &self.shared.options;
        let segments = self.shared.segment_sizes();
        // Every segment but the last (the active one) may go.
        let sealed = segments.len().saturating_sub(1);
        let mut drop = 0;
        if let Some(limit) = options.retain_bytes {
            let mut total: u64 = segments.iter().map(|(_, len)| len).sum();
            while drop < sealed {
                let size = segments[drop].1;
                if total - size < limit {
                    break;
                }
                total -= size;
                drop += 1;
            }
        }
        let mut expired_active = None;
        if let Some(age) = options.retain_for {
            let horizon = crate::record::now().saturating_sub(crate::record::millis(age));
            while drop < sealed {
                if self.newest_timestamp(&segments[drop].0, segments[drop + 1].0.base)? >= horizon {
                    break;
                }
                drop += 1;
            }
            if let Some((active, len)) = segments.last().filter(|_| drop == sealed)
                && *len > segment::SEGMENT_HEADER_LEN as u64
                && self.active_newest(active)?.is_some_and(|t| t < horizon)
            {
                expired_active = Some(active.clone());
            }
        }
        let cut = (drop > 0).then(|| segments[drop].0.base);
        Ok((cut, expired_active))
    }

    /// The newest record timestamp of the active segment `seg` so far: the writer's
    /// note, or a read of its records (not remembered: it grows). `None` if `seg` is no
    /// longer the active segment, or holds no record from the start on.
    fn active_newest(&self, seg: &Arc<Segment>) -> Result<Option<Timestamp>> {
        let noted = {
            let st = self.shared.writer.lock();
            if !Arc::ptr_eq(&st.active, seg) {
                return Ok(None);
            }
            st.active_newest
        };
        if noted.is_some() {
            return Ok(noted);
        }
        self.read_newest(seg, self.next_offset())
    }

    /// The newest timestamp of the records of `seg` from the start on and before
    /// `until`, read from the log; `None` if there is none.
    fn read_newest(&self, seg: &Segment, until: Offset) -> Result<Option<Timestamp>> {
        let from = seg.base.max(self.start_offset());
        let mut newest = None;
        if from < until {
            self.reader_at(from)?.replay(until, |_, e| {
                newest = Some(newest.map_or(e.timestamp, |n: Timestamp| n.max(e.timestamp)));
            })?;
        }
        Ok(newest)
    }

    /// The newest record timestamp of sealed segment `seg`, whose records end before
    /// `until` (the next segment's base), reading the segment if the writer did not
    /// note it. Records below the start do not count (they are gone).
    fn newest_timestamp(&self, seg: &Segment, until: Offset) -> Result<Timestamp> {
        if let Some(&newest) = seg.newest.get() {
            return Ok(newest);
        }
        // A segment with no record left counts as older than any time.
        let newest = self.read_newest(seg, until)?.unwrap_or(0);
        Ok(*seg.newest.get_or_init(|| newest))
    }

    /// The lookup of [`Store::offset_for_timestamp`], segment by segment.
    fn lookup_timestamp(&self, at: Timestamp) -> Result<Option<Offset>> {
        // No segment leaves the list, and the start does not move, while this runs.
        let _maintenance = self.shared.maintenance.lock();
        let segments: Vec<Arc<Segment>> = self.shared.segments.read().clone();
        for (i, seg) in segments.iter().enumerate() {
            let until = match segments.get(i + 1) {
                Some(next) => {
                    if self.newest_timestamp(seg, next.base)? < at {
                        continue;
                    }
                    next.base
                }
                // The active segment: read to the end.
                None => self.next_offset(),
            };
            let from = seg.base.max(self.start_offset());
            if from >= until {
                continue;
            }
            if let Some(found) = super::first_stamped_since(self.reader_at(from)?, until, at)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// After an append (or a compaction): applies retention if a segment was sealed,
    /// never sealing the active one (see `apply_retention_locked`).
    fn retain_after_seal(&self) {
        self.retain_if_due(false);
    }

    /// Applies retention if a seal (or the open) asked for it. The append stands
    /// whatever this finds; a failure is logged, and tried again after the next seal
    /// (or by [`apply_retention`](Self::apply_retention)). A compaction or a lookup by
    /// timestamp holding the maintenance lock leaves it to the next seal, or to the
    /// compaction's own call of this: an append does not wait for them.
    fn retain_if_due(&self, seal_active: bool) {
        if !self.shared.options.retains() || !self.shared.retention_due.load(Ordering::Acquire) {
            return;
        }
        let Some(_maintenance) = self.shared.maintenance.try_lock() else {
            return;
        };
        if let Err(e) = self.apply_retention_locked(seal_active) {
            tracing::warn!(dir = %self.shared.dir.display(), error = %e, "retention failed; tried again after the next seal");
            self.shared.retention_due.store(true, Ordering::Release);
        }
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        !self.shared.writable
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Checks every batch of every segment (checksums, framing, offsets in order), up to
    /// what is written to the files, and that the segments fit together (each header
    /// names the base its file name gives; no segment starts below the last record of
    /// the one before); the first damage is an [`Error::Corrupt`]. A store opened for
    /// writing first checks that no segment file is missing from the directory (rules
    /// 15 and 16), as an open would.
    ///
    /// A store opened [read-only](Self::open_read_only) up to damage in its segments, or
    /// to a missing segment file, checks the segments of its view, then returns that
    /// damage (the one [`corruption`](Self::corruption) reports): its view ends there,
    /// the log does not.
    pub fn verify(&self) -> Result<LogVerification> {
        if self.shared.writable {
            self.shared.check_files()?;
        }
        let segments: Vec<Arc<Segment>> = self.shared.segments.read().clone();
        let mut report = LogVerification::default();
        // One past the last record of the segment before, which the next one's base
        // must not be below (compaction may leave a gap, never an overlap).
        let mut before: Option<(Offset, &Path)> = None;
        for seg in segments.iter().filter(|s| s.path.extension().is_some()) {
            let end = seg.end.load(Ordering::Acquire);
            let mut data = vec![0u8; end as usize];
            std::os::unix::fs::FileExt::read_exact_at(&*seg.file()?, &mut data, 0)
                .map_err(|e| Error::io("read", &seg.path, e))?;
            segment::check_header_base(&data, seg.base, &seg.path)?;
            if let Some((prev_end, prev_path)) = before.filter(|(e, _)| *e > seg.base) {
                return Err(Error::corrupt(
                    &seg.path,
                    0,
                    Some(seg.base),
                    format!(
                        "the segment starts at offset {}, but {} holds records up to {}",
                        seg.base,
                        prev_path.display(),
                        prev_end - 1
                    ),
                ));
            }
            let mut counts = (0u64, 0u64);
            let sealed = seg.sealed.load(Ordering::Acquire);
            let last = segment::scan_whole(&data, seg.base, &seg.path, !sealed, |b| {
                counts.0 += 1;
                counts.1 += b.header.count as u64;
            })?;
            before = Some((last, &seg.path));
            report.segments += 1;
            report.batches += counts.0;
            report.records += counts.1;
            report.bytes += end;
        }
        if let Some(damage) = &self.segment_damage {
            return Err(damage_again(damage, &self.shared.dir));
        }
        Ok(report)
    }
}

/// The damage a read-only open found, as a new error to return ([`Error`] is not
/// `Clone`: it may hold an `io::Error`). Recovery reports damage as [`Error::Corrupt`];
/// anything else keeps its message, placed at the log's directory.
pub(crate) fn damage_again(damage: &Error, dir: &Path) -> Error {
    match damage {
        Error::Corrupt {
            path,
            position,
            offset,
            reason,
        } => Error::corrupt(path.clone(), *position, *offset, reason.clone()),
        other => Error::corrupt(dir, 0, None, other.to_string()),
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        if let Some(handle) = self.flusher.take() {
            self.shared.stop_flusher();
            let _ = handle.join();
        }
        if self.shared.writable {
            self.shared.close();
        }
    }
}

impl Store for LogStore {
    fn append(&self, batch: &[Entry<'_>]) -> Result<Range<Offset>> {
        let offsets = self.shared.append(batch)?;
        self.retain_after_seal();
        Ok(offsets)
    }

    fn append_deferred(&self, batch: &[Entry<'_>]) -> Result<Deferred> {
        let offsets = self.shared.append_deferred(batch)?;
        self.retain_after_seal();
        Ok(Deferred {
            offsets,
            pending: self.shared.options.sync == SyncPolicy::Always,
        })
    }

    fn wait_appended(&self, end: Offset) -> Result<()> {
        self.shared.wait_appended(end)
    }

    fn append_waits_for_disk(&self) -> bool {
        // Under `Every`, the append that reaches the record count runs the fdatasync,
        // and one that rolls the segment syncs the sealed one.
        matches!(
            self.shared.options.sync,
            SyncPolicy::Always | SyncPolicy::Every { .. }
        )
    }

    fn read_from(&self, from: Offset) -> Result<RecordIter> {
        check_read_range(from, self.start_offset(), self.next_offset())?;
        Ok(Box::new(reader::LogReader::new(self.shared.clone(), from)))
    }

    // `replay_from` is this to the end (the trait's default).
    fn replay_range(
        &self,
        from: Offset,
        until: Offset,
        f: &mut dyn FnMut(Offset, Entry<'_>),
    ) -> Result<Offset> {
        LogStore::replay_range(self, from, until, f)
    }

    fn start_offset(&self) -> Offset {
        self.shared.start.load(Ordering::Acquire)
    }

    fn next_offset(&self) -> Offset {
        self.shared.tail.get()
    }

    fn wait_for(&self, offset: Offset, timeout: Option<Duration>) -> Offset {
        self.shared.tail.wait_for(offset, timeout)
    }

    fn poll_committed(&self, offset: Offset, cx: &mut std::task::Context<'_>) -> Poll<Offset> {
        self.shared.tail.poll_wait(offset, cx)
    }

    fn wake_waiters(&self) {
        self.shared.tail.wake();
    }

    fn sync(&self) -> Result<()> {
        self.shared.sync_all()
    }

    /// Nothing to do when the records before `offset` are durable already (always, under
    /// [`SyncPolicy::Always`]); else a [`sync`](Store::sync).
    fn sync_until(&self, offset: Offset) -> Result<()> {
        if self.shared.durable.load(Ordering::Acquire) >= offset {
            return Ok(());
        }
        self.shared.sync_all()
    }

    fn truncate_before(&self, offset: Offset) -> Result<()> {
        self.shared.truncate_before(offset)
    }

    /// Sealed segments whose newest timestamp is older than `at` are skipped without
    /// reading them, once that newest timestamp is known (the writer notes it for a
    /// segment it seals under [`LogOptions::retain_for`]; otherwise the first lookup,
    /// or retention, reads the segment once). The segment that holds the answer is read
    /// up to it. Waits for a compaction or retention that is running.
    fn offset_for_timestamp(&self, at: Timestamp) -> Result<Option<Offset>> {
        self.lookup_timestamp(at)
    }

    fn compact_with(&self, options: CompactOptions) -> Result<Compaction> {
        let compaction = self.shared.compact(options)?;
        self.retain_after_seal();
        Ok(compaction)
    }

    fn commit_cursor(&self, name: &str, offset: Offset) -> Result<()> {
        check_name(name)?;
        if !self.shared.writable {
            return Err(Error::ReadOnly(
                "opened read-only: cursors cannot move".into(),
            ));
        }
        check_not_past_end(offset, self.start_offset(), self.next_offset())?;
        // A cursor must not outlive the records it stands after: under a policy that
        // syncs later, a crash could otherwise keep it and lose them.
        self.sync_until(offset)?;
        self.shared.cursors.lock().commit(name, offset)
    }

    fn cursor(&self, name: &str) -> Result<Option<Offset>> {
        check_name(name)?;
        Ok(self.shared.cursors.lock().get(name))
    }

    fn save_snapshot(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()> {
        check_name(name)?;
        if !self.shared.writable {
            return Err(Error::ReadOnly(
                "opened read-only: snapshots cannot be saved".into(),
            ));
        }
        check_not_past_end(offset, self.start_offset(), self.next_offset())?;
        // As for cursors: the records the snapshot folds are durable first.
        self.sync_until(offset)?;
        self.shared.snapshots.save(name, offset, blob)
    }

    fn latest_snapshot(&self, name: &str) -> Result<Option<Snapshot>> {
        check_name(name)?;
        self.shared.snapshots.latest(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed segment's file closed to keep under the limit is opened again by its
    /// path only while that path still names it: a file renamed over the path is
    /// refused, never read as the segment.
    #[test]
    fn a_closed_segment_file_replaced_under_its_path_is_refused_not_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        std::fs::write(&a, b"the segment").expect("write");
        std::fs::write(&b, b"another").expect("write");
        let open = |p: &Path| Some(File::open(p).expect("open"));
        let files = OpenFiles::new(1);
        let seg = Segment::new(0, a.clone(), open(&a), &files, 11, true, None);
        let other = Segment::new(100, b.clone(), open(&b), &files, 7, true, None);
        // Opening `other` closed `seg`'s file; reading `seg` opens it again, closing
        // `other`'s, and reading `other` closes `seg`'s once more.
        assert!(seg.file.file.lock().open.is_none());
        let mut bytes = [0u8; 11];
        std::os::unix::fs::FileExt::read_exact_at(&*seg.file().expect("reopen"), &mut bytes, 0)
            .expect("read");
        assert_eq!(&bytes, b"the segment");
        other.file().expect("reopen");
        assert!(seg.file.file.lock().open.is_none());
        let rewrite = dir.path().join("rewrite");
        std::fs::write(&rewrite, b"a rewrite").expect("write");
        std::fs::rename(&rewrite, &a).expect("rename over");
        match seg.file() {
            Err(Error::Io { path, .. }) => assert_eq!(path, a),
            other => panic!("expected an error, got {other:?}"),
        }
        // Retired while a reader holds it, a segment keeps its file open for good.
        let held = Segment::new(200, b.clone(), None, &files, 7, true, None);
        held.retire(|| true).expect("retire");
        assert!(held.is_gone());
        std::fs::remove_file(&b).expect("unlink");
        seg.file().ok();
        other.file().ok();
        held.file().expect("a pinned file stays open");
    }
}
