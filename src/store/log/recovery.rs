//! Opening a log directory: the recovery rules of the module docs, in code.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::index::IndexEntry;
use super::segment::{self, SEGMENT_HEADER_LEN, ScanEnd};
use super::writer::create_segment;
use super::{LogOptions, OpenFiles, Segment, compact, meta};
use crate::error::{Error, Result};
use crate::record::Offset;

/// What recovery found: the segments, the offsets, and where a read-only open stopped.
pub(crate) struct Recovered {
    pub(crate) segments: Vec<Arc<Segment>>,
    pub(crate) start: Offset,
    pub(crate) next: Offset,
    pub(crate) corruption: Option<Error>,
}

/// The segment bases present in `dir`, sorted.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<Offset>> {
    let mut bases = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = segment::parse_base(name, "log") {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// The segment files missing from a directory: at the front (rule 15), and a file the
/// manifest lists (rule 16), with the base where the view of a read-only open stops.
pub(crate) struct Missing {
    pub(crate) front: Option<Error>,
    pub(crate) listed: Option<(Offset, Error)>,
}

impl Missing {
    /// The first of them, as an error.
    pub(crate) fn into_error(self) -> Option<Error> {
        self.front.or(self.listed.map(|(_, e)| e))
    }
}

/// What segment files are missing from `dir`, which holds the files `present` (sorted),
/// given the start `start.meta` gives (if any) and the bases the manifest lists (if
/// there is one).
pub(crate) fn missing_files(
    dir: &Path,
    present: &[Offset],
    meta_start: Option<Offset>,
    listed: Option<&[Offset]>,
) -> Missing {
    let start = meta_start.unwrap_or(0);
    let front = present
        .first()
        .filter(|&&first| first > start)
        .map(|&first| missing_front(dir, first, meta_start));
    // Below the first file, what is missing is rule 15's to report (and a read-only
    // view then opens what is there). Below the start, retention deleted it, but for
    // the segment that holds the start: the greatest base at or below it, listed or
    // present (a file retention failed to delete can survive below it).
    let holder = listed
        .unwrap_or_default()
        .iter()
        .chain(present)
        .copied()
        .filter(|&b| b <= start)
        .max();
    let from = match present.first() {
        Some(&first) if first > start => first,
        Some(&first) => holder.map_or(start, |h| h.max(first)),
        None => holder.unwrap_or(start),
    };
    let listed = listed.and_then(|listed| missing_listed(dir, present, listed, from));
    Missing { front, listed }
}

/// Rule 15: retention persists the start before it deletes a segment, and compaction
/// never deletes the first, so a first segment file starting past the start means
/// files are missing.
fn missing_front(dir: &Path, first: Offset, meta_start: Option<Offset>) -> Error {
    let path = segment::segment_path(dir, first);
    Error::corrupt(
        &path,
        0,
        Some(first),
        format!(
            "the log starts at offset {} ({}), but its first segment file starts at \
             {first}: the segment files before it are missing",
            meta_start.unwrap_or(0),
            if meta_start.is_some() {
                "as retention left it in start.meta"
            } else {
                "no retention has run"
            }
        ),
    )
}

/// Rule 16: the first segment at or past `from` that the manifest lists and that has no
/// file, with the error naming it and the offsets gone. The newest listed one may have
/// no file when no file follows it: a roll lists a segment before it creates its file,
/// and may fail or crash in between.
fn missing_listed(
    dir: &Path,
    present: &[Offset],
    listed: &[Offset],
    from: Offset,
) -> Option<(Offset, Error)> {
    let newest = listed.last().copied();
    let base = listed
        .iter()
        .copied()
        .filter(|&b| b >= from && present.binary_search(&b).is_err())
        .find(|&b| Some(b) != newest || present.last().is_some_and(|&p| p > b))?;
    let path = segment::segment_path(dir, base);
    let gone = match present.iter().find(|&&p| p > base) {
        Some(next) => format!(
            ": the records from offset {base} to {} are gone (the next segment file starts \
             at {next})",
            next - 1
        ),
        None => format!(
            ", and so are the files listed after it: the records from offset {base} on are \
             gone"
        ),
    };
    let reason = format!(
        "{} lists this segment file, but it is missing{gone}",
        meta::MANIFEST_FILE
    );
    Some((base, Error::corrupt(&path, 0, Some(base), reason)))
}

fn open_file(path: &Path, writable: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

/// How many times a read-only open reads the newest segment again when it looks
/// damaged (see `open_last`).
const RACE_REREADS: u32 = 5;

/// Reads the data of a segment file (see [`written_len`]), up to where it ends when
/// read: a writer may cut the newest segment back to its data meanwhile (a roll of
/// preallocated segments does), and a read-only open must take the shorter file as it
/// is, not fail. A short read is the file's end.
fn read_all(file: &File, path: &Path) -> Result<Vec<u8>> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let len = written_len(file, len);
    let mut data = vec![0u8; len as usize];
    let mut read = 0;
    while read < data.len() {
        match file.read_at(&mut data[read..], read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    data.truncate(read);
    Ok(data)
}

/// How much of a file of `len` bytes must be read to see all its data: up to its first
/// hole when nothing but holes follows it (the unwritten, preallocated part reads as
/// zeros anyway), else all of it. File systems without `SEEK_HOLE` give `len`.
fn written_len(file: &File, len: u64) -> u64 {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a file descriptor we own; no memory is involved. The position it
    // moves is not used by the positional reads and writes of this module.
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    let Ok(hole) = u64::try_from(hole) else {
        return len;
    };
    if hole >= len {
        return len;
    }
    // SAFETY: as above.
    let more = unsafe { libc::lseek(fd, hole as libc::off_t, libc::SEEK_DATA) };
    let no_more_data =
        more < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    if no_more_data { hole } else { len }
}

/// A whole scan of one segment's bytes.
struct Scanned {
    end: ScanEnd,
    entries: Vec<IndexEntry>,
    /// One past the last offset of its last whole batch (the base if none).
    next: Offset,
}

fn scan_segment(data: &[u8], base: Offset, interval: u64) -> Scanned {
    let mut builder = super::index::Builder::new(interval);
    let mut next = base;
    let end = segment::scan(data, base, |b| {
        builder.add(b.base, b.position);
        next = b.last + 1;
    });
    Scanned {
        end,
        entries: builder.entries,
        next,
    }
}

/// What an open goes by.
struct Opening<'a> {
    dir: &'a Path,
    options: &'a LogOptions,
    writable: bool,
    /// How far cursors and snapshots say the log was durable (rule 14).
    floor: Option<&'a (Offset, String)>,
    files: &'a Arc<OpenFiles>,
    /// The start retention left in `start.meta`, if any.
    meta_start: Option<Offset>,
}

/// Opens (and, when `writable`, repairs) the log in `dir`. `floor` is how far the log was
/// durable by its cursors and snapshots ([`meta::durable_floor`]): a log that ends
/// before it has lost durable records, so its bad tail is damage, not a torn write.
pub(crate) fn recover(
    dir: &Path,
    options: &LogOptions,
    writable: bool,
    floor: Option<&(Offset, String)>,
    files: &Arc<OpenFiles>,
) -> Result<Recovered> {
    // Checked before anything is changed: a writable open that finds segment files
    // missing (rules 14 to 16) fails, and leaves the directory as it found it.
    // (Settling a compaction and removing temporaries create and delete no segment file.)
    let Listing {
        present,
        meta_start,
        listed,
        mut bases,
    } = read_directory(dir, writable)?;
    if bases.is_empty() {
        let base = meta_start.unwrap_or(0);
        if let Some((at, what)) = floor.filter(|(at, _)| *at > base) {
            return Err(Error::corrupt(
                dir,
                0,
                Some(base),
                format!(
                    "no segment file, but {what} stands at offset {at}: the records before \
                     it were durable"
                ),
            ));
        }
    }
    let missing = missing_files(dir, &present, meta_start, listed.as_deref());
    let at = Opening {
        dir,
        options,
        writable,
        floor,
        files,
        meta_start,
    };
    if writable {
        if let Some(e) = missing.into_error() {
            return Err(e);
        }
        compact::settle(dir, |_| Ok(()))?;
        meta::remove_temporaries(dir)?;
        return recover_writable(&at, listed.as_deref(), bases);
    }
    // Read-only, the view is what is there, and says what is missing (unless it stops
    // at damage further on, which it then names). With a listed file missing, it is
    // the sealed segments before it.
    let (gap, gap_damage) = missing.listed.unzip();
    let newest = match gap {
        Some(gap) => {
            bases.retain(|&b| b < gap);
            None
        }
        None => bases.pop(),
    };
    // Every file stays open (the view must not change under a writer): room for them.
    make_room_for_files(bases.len() + usize::from(newest.is_some()));
    let mut recovered = open_segments(&at, &bases, newest)?;
    recovered.corruption = recovered.corruption.or(gap_damage).or(missing.front);
    Ok(recovered)
}

/// Makes room for a read-only view to keep `files` segment files open: if they would
/// take half or more of the process's soft limit on open files, raises it by `files`,
/// up to the hard limit (as Go's runtime raises it to the hard limit for every
/// program). The usual soft limit, 1,024, is a relic of `select(2)`; the hard limit is
/// commonly far higher (524,288 under systemd). Where the hard limit is too low too,
/// the open fails as before, with the `EMFILE` of the file that did not open.
fn make_room_for_files(files: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes the limit into the struct passed, which lives on this
    // stack frame for the call; nothing else is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let files = libc::rlim_t::try_from(files).unwrap_or(libc::rlim_t::MAX);
    if files < limit.rlim_cur / 2 || limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_cur.saturating_add(files).min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: `setrlimit` reads the struct passed, which lives on this stack frame for
    // the call; a soft limit at or below the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::info!(
            from = limit.rlim_cur,
            to = raised.rlim_cur,
            files,
            "raised the soft limit on open files for a read-only view of a log's segments"
        );
    }
}

/// What an open reads of the directory.
struct Listing {
    /// The segment files present, for the checks of rules 15 and 16.
    present: Vec<Offset>,
    /// `start.meta`'s start.
    meta_start: Option<Offset>,
    /// The manifest's bases.
    listed: Option<Vec<Offset>>,
    /// The segment files to open.
    bases: Vec<Offset>,
}

/// Reads the directory for an open.
///
/// Read-only, a writer may be running beside the open, and the directory is listed
/// before and after `start.meta` and the manifest are read: what the writer deletes, it
/// unlists (compaction) or puts below the start (retention) first, so the first listing
/// still holds it; what it creates it lists first (but for the newest file of a roll),
/// so the second listing holds it. A segment both created and deleted between the
/// listings is in neither: the start and the manifest are read again after the second
/// listing, and only what both reads list, past both starts, is checked. The segments
/// opened are those of the second listing.
fn read_directory(dir: &Path, writable: bool) -> Result<Listing> {
    let mut present = list_segments(dir)?;
    let mut meta_start = meta::read_start(dir)?;
    let mut listed = meta::read_manifest(dir)?;
    // Writable, the directory's lock keeps every other writer out.
    let bases = if writable {
        present.clone()
    } else {
        let after = list_segments(dir)?;
        present.extend_from_slice(&after);
        present.sort_unstable();
        present.dedup();
        // A segment rolled after the first listing and deleted before the second is in
        // neither, though the manifest read between may list it: read again, a file
        // counts as lost only if both reads list it and it is past both starts
        // (compaction unlists, and retention moves the start, before they delete).
        let start_after = meta::read_start(dir)?;
        let listed_after = meta::read_manifest(dir)?;
        meta_start = meta_start.max(start_after);
        listed = match (listed, listed_after) {
            (Some(before), Some(after)) => {
                Some(before.into_iter().filter(|b| after.contains(b)).collect())
            }
            _ => None,
        };
        after
    };
    Ok(Listing {
        present,
        meta_start,
        listed,
        bases,
    })
}

/// A writable open, with no file missing: creates the first segment of an empty log or
/// opens and repairs the segments there, and brings the manifest up to date.
fn recover_writable(
    at: &Opening<'_>,
    listed: Option<&[Offset]>,
    mut bases: Vec<Offset>,
) -> Result<Recovered> {
    let Some(newest) = bases.pop() else {
        let base = at.meta_start.unwrap_or(0);
        // Listed before it is created, as a roll does.
        update_manifest(at.dir, listed, &[base])?;
        let seg = create_segment(at.dir, base, preallocation(at.options), true, at.files)?;
        return Ok(Recovered {
            segments: vec![Arc::new(seg)],
            start: base,
            next: base,
            corruption: None,
        });
    };
    let recovered = open_segments(at, &bases, Some(newest))?;
    let found: Vec<Offset> = recovered.segments.iter().map(|s| s.base).collect();
    update_manifest(at.dir, listed, &found)?;
    meta::sync_dir(at.dir)?;
    Ok(recovered)
}

/// Writes the manifest listing the segments `found` unless it lists those already: a log
/// written before the manifest existed gets one, and what an open accepts (the newest
/// listed segment never created, files not listed) is written as it is now. Entries
/// below the first segment (retention deleted those, and the next roll leaves them out)
/// are no reason to write: an open of a sound log changes nothing.
fn update_manifest(dir: &Path, listed: Option<&[Offset]>, found: &[Offset]) -> Result<()> {
    let first = found.first().copied().unwrap_or(0);
    if listed.is_some_and(|l| {
        l.iter()
            .copied()
            .filter(|&b| b >= first)
            .eq(found.iter().copied())
    }) {
        return Ok(());
    }
    meta::write_manifest(dir, found)
}

/// Opens the segments `sealed`, then `newest` unless the view stopped at damage
/// before it (read-only). With neither, the log is empty at its start.
fn open_segments(at: &Opening<'_>, sealed: &[Offset], newest: Option<Offset>) -> Result<Recovered> {
    let Opening {
        dir,
        options,
        writable,
        floor,
        files,
        meta_start,
    } = *at;
    let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(sealed.len() + 1);
    let mut corruption = None;
    for &base in sealed {
        match open_sealed(dir, base, options, writable, files) {
            Ok(mut seg) => {
                let damage = seg.damage.take();
                segments.push(Arc::new(seg));
                if damage.is_some() {
                    corruption = damage;
                    break;
                }
            }
            Err(e) if !writable && matches!(e, Error::Corrupt { .. }) => {
                corruption = Some(e);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let mut next = None;
    if let Some(last_base) = newest.filter(|_| corruption.is_none()) {
        let has_prev = !segments.is_empty();
        match open_last(dir, last_base, has_prev, options, writable, floor, files) {
            Ok((seg, last_next, found)) => {
                corruption = found;
                segments.push(Arc::new(seg));
                next = Some(last_next);
            }
            // Read-only, a newest segment whose header is damaged ends the view before
            // it, as damage in a sealed segment does (rule 3).
            Err(e) if !writable && matches!(e, Error::Corrupt { .. }) => corruption = Some(e),
            Err(e) => return Err(e),
        }
    }
    let next = match next {
        Some(next) => next,
        // Read-only and stopped before the newest segment's data: the view ends where
        // it stopped.
        None => match segments.last() {
            Some(seg) => seg.next_hint,
            None => {
                let start = meta_start.unwrap_or(0);
                return Ok(Recovered {
                    segments,
                    start,
                    next: start,
                    corruption,
                });
            }
        },
    };
    let first_base = segments.first().map_or(0, |s| s.base);
    let start = meta_start.unwrap_or(first_base).max(first_base);
    let next = next.max(start);
    Ok(Recovered {
        segments,
        start,
        next,
        corruption,
    })
}

fn preallocation(options: &LogOptions) -> Option<u64> {
    options.preallocate.then_some(options.segment_bytes)
}

/// Opens a sealed segment. Writable: the header is checked and its data is trusted up
/// to the file's end (the reader checks every batch). Read-only: every batch is checked
/// now, so the view stops at the first damage.
fn open_sealed(
    dir: &Path,
    base: Offset,
    options: &LogOptions,
    writable: bool,
    files: &Arc<OpenFiles>,
) -> Result<Segment> {
    let path = segment::segment_path(dir, base);
    let file = open_file(&path, false)?;
    if writable {
        let mut head = [0u8; SEGMENT_HEADER_LEN];
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        let got = if len >= SEGMENT_HEADER_LEN as u64 {
            file.read_exact_at(&mut head, 0)
                .map_err(|e| Error::io("read", &path, e))?;
            &head[..]
        } else {
            &[][..]
        };
        segment::check_header_base(got, base, &path)?;
        // Sealed under `SyncPolicy::Never` (or by a process that died before its roll's
        // writes reached the disk), its records may be in the page cache only; the store
        // counts every record it opens with as durable, so that `sync`, cursors and
        // snapshots need not sync it again. (A clean file took 50-300 µs here: 0.1-0.6 s
        // for 2,000 sealed segments.)
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", &path, e))?;
        // The next offset of a sealed segment is only needed if the newest segment's header
        // turns out torn; it is computed then. Its file is opened again when first read
        // (see `OpenFiles`): a log of thousands of segments opens without holding a file
        // descriptor for each.
        drop(file);
        let mut seg = Segment::new(base, path, None, files, len, true, None);
        seg.next_hint = Offset::MAX;
        return Ok(seg);
    }
    let data = read_all(&file, &path)?;
    segment::check_header_base(&data, base, &path)?;
    let scanned = scan_segment(&data, base, options.index_interval_bytes);
    let len = data.len() as u64;
    let damage = match scanned.end {
        ScanEnd::Clean => None,
        ScanEnd::Zeros { position } | ScanEnd::Torn { position, .. } => {
            Some((position, "a sealed segment ends in a bad batch".to_string()))
        }
        ScanEnd::Corrupt {
            position, reason, ..
        } => Some((position, reason.to_string())),
    };
    let mut seg = Segment::new(
        base,
        path.clone(),
        Some(file),
        files,
        len,
        true,
        Some(scanned.entries),
    );
    seg.next_hint = scanned.next;
    if let Some((position, reason)) = damage {
        seg.end
            .store(position, std::sync::atomic::Ordering::Release);
        seg.damage = Some(Error::corrupt(&path, position, Some(scanned.next), reason));
    }
    Ok(seg)
}

/// Opens the newest segment: scans it, cuts a torn tail, repairs a torn header, and
/// fdatasyncs it. Returns the segment, the next offset, and (read-only) the damage
/// where the view stopped. A segment whose whole batches end before `floor` lost
/// durable records: that is damage (an error when `writable`, cutting nothing).
fn open_last(
    dir: &Path,
    base: Offset,
    has_prev: bool,
    options: &LogOptions,
    writable: bool,
    floor: Option<&(Offset, String)>,
    files: &Arc<OpenFiles>,
) -> Result<(Segment, Offset, Option<Error>)> {
    let path = segment::segment_path(dir, base);
    let file = open_file(&path, writable)?;
    let mut data = read_all(&file, &path)?;
    if let Err(header_error) = segment::check_header_base(&data, base, &path) {
        repair_torn_header(dir, &path, &file, &mut data, base, has_prev, writable)
            .map_err(|_| header_error)?;
    }
    let mut scanned = scan_segment(&data, base, options.index_interval_bytes);
    // A read-only open beside a writer reads the newest segment while it is written: a
    // preempted read can find a batch not yet copied in followed by one copied since,
    // which looks like damage. The writer fills the gap within moments; damage stays.
    let mut rereads = 0;
    while !writable && matches!(scanned.end, ScanEnd::Corrupt { .. }) && rereads < RACE_REREADS {
        rereads += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
        data = read_all(&file, &path)?;
        scanned = scan_segment(&data, base, options.index_interval_bytes);
    }
    let mut corruption = None;
    let whole_end = match &scanned.end {
        ScanEnd::Clean => Some(data.len() as u64),
        ScanEnd::Zeros { position } | ScanEnd::Torn { position, .. } => Some(*position),
        // Damage whatever the floor: reported below.
        ScanEnd::Corrupt { .. } => None,
    };
    let short_of_floor = match (whole_end, floor) {
        (Some(position), Some((at, what))) if scanned.next < *at => Some((position, at, what)),
        _ => None,
    };
    if let Some((position, at, what)) = short_of_floor {
        let e = Error::corrupt(
            &path,
            position,
            Some(scanned.next),
            format!(
                "the log's whole records end at offset {}, but {what} stands at offset \
                 {at}: the records before it were durable, so this is not a torn tail",
                scanned.next
            ),
        );
        if writable {
            return Err(e);
        }
        let seg = Segment::new(
            base,
            path,
            Some(file),
            files,
            position,
            false,
            Some(scanned.entries),
        );
        return Ok((seg, scanned.next, Some(e)));
    }
    let data_end = match scanned.end {
        ScanEnd::Clean => data.len() as u64,
        ScanEnd::Zeros { position } => {
            if writable && !options.preallocate {
                cut(&file, &path, position)?;
            }
            position
        }
        ScanEnd::Torn { position, reason } => {
            tracing::warn!(
                path = %path.display(),
                position,
                reason,
                "cutting a torn tail"
            );
            if writable {
                cut(&file, &path, position)?;
            }
            position
        }
        ScanEnd::Corrupt {
            position,
            reason,
            later,
        } => {
            let e = Error::corrupt(
                &path,
                position,
                Some(scanned.next),
                format!(
                    "{reason}; a valid batch follows at byte {later}, so this is not a torn tail"
                ),
            );
            if writable {
                return Err(e);
            }
            corruption = Some(e);
            position
        }
    };
    if writable {
        // After a crash the tail may be in the page cache only: make it durable before
        // anything is built on it.
        file.sync_data()
            .map_err(|e| Error::io("fdatasync", &path, e))?;
    }
    let seg = Segment::new(
        base,
        path,
        Some(file),
        files,
        data_end,
        false,
        Some(scanned.entries),
    );
    Ok((seg, scanned.next, corruption))
}

fn cut(file: &File, path: &PathBuf, at: u64) -> Result<()> {
    file.set_len(at)
        .and_then(|()| file.sync_data())
        .map_err(|e| Error::io("truncate torn tail", path, e))
}

/// A torn header on the newest segment is a crash during a roll: no record in the
/// segment was acknowledged. It is rewritten when nothing valid follows it and its base
/// continues the previous segment; anything else is corruption.
fn repair_torn_header(
    dir: &Path,
    path: &Path,
    file: &File,
    data: &mut Vec<u8>,
    base: Offset,
    has_prev: bool,
    writable: bool,
) -> Result<()> {
    let nothing_after = data.len() <= SEGMENT_HEADER_LEN
        || segment::first_valid_batch_from(data, SEGMENT_HEADER_LEN, 0).is_none();
    let continues = !has_prev || previous_next(dir, base)? == Some(base);
    if !(nothing_after && continues) {
        return Err(Error::corrupt(path, 0, Some(base), "bad segment header"));
    }
    let header = segment::encode_segment_header(base);
    if writable {
        file.set_len(0)
            .and_then(|()| file.write_all_at(&header, 0))
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("rewrite torn segment header", path, e))?;
    }
    data.clear();
    data.extend_from_slice(&header);
    tracing::warn!(path = %path.display(), "rewrote the torn header of the newest segment");
    Ok(())
}

/// The next offset after the segment before `base` (scanned whole), if there is one.
fn previous_next(dir: &Path, base: Offset) -> Result<Option<Offset>> {
    let bases = list_segments(dir)?;
    let Some(&prev) = bases.iter().rev().find(|&&b| b < base) else {
        return Ok(None);
    };
    let path = segment::segment_path(dir, prev);
    let file = open_file(&path, false)?;
    let data = read_all(&file, &path)?;
    segment::check_header_base(&data, prev, &path)?;
    let scanned = scan_segment(&data, prev, u64::MAX);
    Ok(Some(scanned.next))
}
