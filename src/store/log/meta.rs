//! Everything in a log directory besides the segments: the lock file, the start offset
//! left by retention, the segment manifest, the cursor journal and the snapshots.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::segment::{le32, le64};
use crate::error::{Error, Result};
use crate::record::Offset;
use crate::store::Snapshot;

/// The lock file; it holds an exclusive `flock` while a writable store is open.
pub(crate) const LOCK_FILE: &str = "lock";
/// The start offset left by retention.
pub(crate) const START_FILE: &str = "start.meta";
/// The segment manifest: the bases of the segment files that must exist (rule 16).
pub(crate) const MANIFEST_FILE: &str = "segments.meta";
/// The cursor journal.
pub(crate) const CURSOR_FILE: &str = "cursors.journal";
/// The directory of snapshots (one sub-directory per name).
pub(crate) const SNAPSHOT_DIR: &str = "snapshots";

const START_MAGIC: [u8; 8] = *b"CAUCESTA";
/// The manifest's magic, then its format version `u32` (1).
const MANIFEST_PREFIX: [u8; 12] = *b"CAUCESEG\x01\0\0\0";
const SNAPSHOT_MAGIC: [u8; 8] = *b"CAUCESNP";
const SNAPSHOT_HEADER_LEN: usize = 32;
/// The journal is rewritten when it is larger than this and four times its live part.
const JOURNAL_REWRITE_BYTES: u64 = 64 << 10;
/// How many names [`create_temporary`] tries before it gives up: each is taken only by
/// a leftover of an earlier process that had this one's pid.
const TEMPORARY_NAME_TRIES: u32 = 64;
/// How many times [`Snapshots::latest`] lists a name's snapshots without the lock of
/// the saves before it takes it: each retry means a save pruned what it listed.
const UNLOCKED_SNAPSHOT_LOOKS: u32 = 8;

/// Numbers the temporary files this process writes, so that no two share a name.
static TEMPORARIES: AtomicU64 = AtomicU64::new(0);

/// Takes the exclusive lock of `dir`, or fails with [`Error::Locked`].
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == ErrorKind::WouldBlock {
            Error::Locked { path }
        } else {
            Error::io("flock", &path, e)
        });
    }
    Ok(file)
}

/// `fsync` of a directory, so that creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .map_err(|e| Error::io("open directory", dir, e))?
        .sync_all()
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Writes `bytes` to `dir/name` atomically: a temporary file, fsync, rename, fsync of
/// the directory. A crash leaves either the old file or the new one.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    write_renamed(dir, name, bytes)?;
    sync_dir(dir)
}

/// [`write_atomic`] but for the fsync of the directory: the new file is whole once the
/// rename is durable, which the next fsync of the directory makes it. Until then a
/// crash leaves either file. Returns the new file, open for writing.
fn write_renamed(dir: &Path, name: &str, bytes: &[u8]) -> Result<File> {
    let (tmp, mut file) = create_temporary(dir, name)?;
    let target = dir.join(name);
    let written = file
        .write_all(bytes)
        .map_err(|e| Error::io("write", &tmp, e))
        .and_then(|()| file.sync_all().map_err(|e| Error::io("fsync", &tmp, e)))
        .and_then(|()| fs::rename(&tmp, &target).map_err(|e| Error::io("rename", &target, e)));
    if let Err(e) = written {
        // Its name is this call's alone, so nothing else would ever replace or remove
        // it before the next writable open. Failing to remove it loses nothing: that
        // open does.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(file)
}

/// Creates the temporary file for `dir/name` under a name no other write uses,
/// `{name}.{pid}.{n}.tmp`, with `O_EXCL`: nothing already there (another write's
/// temporary, a leftover, a symlink) is truncated or written through. Two writes to one
/// fixed `{name}.tmp` once truncated each other's bytes, and the one that renamed first
/// put the other's bytes, perhaps partial, under `name`.
fn create_temporary(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    let mut tries = 0;
    loop {
        let n = TEMPORARIES.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{name}.{}.{n}.tmp", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && tries < TEMPORARY_NAME_TRIES => {
                tries += 1;
            }
            Err(e) => return Err(Error::io("create", &tmp, e)),
        }
    }
}

/// The file a temporary file of this crate named `name` was to become, if `name` is one:
/// `{target}.{pid}.{n}.tmp` as [`create_temporary`] names them, or `{target}.tmp` as
/// they were named before (and an index's still is).
fn temporary_target(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".tmp")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let unique = stem.rsplit_once('.').and_then(|(rest, n)| {
        let (target, pid) = rest.rsplit_once('.')?;
        (digits(pid) && digits(n)).then_some(target)
    });
    Some(unique.unwrap_or(stem))
}

/// True for the name of a temporary file this crate writes in a log directory and a
/// crash may leave behind: [`write_atomic`]'s for the start offset, the segment
/// manifest, the cursor journal and the compaction marker, and an index's
/// (`{base:020}.index.tmp`).
fn is_own_temporary(name: &str) -> bool {
    temporary_target(name).is_some_and(|target| {
        [
            START_FILE,
            MANIFEST_FILE,
            CURSOR_FILE,
            super::compact::MARKER,
        ]
        .contains(&target)
            || super::segment::parse_base(target, "index").is_some()
    })
}

/// Removes the temporary files a crash left in `dir`: those named by
/// [`is_own_temporary`] in it, and a snapshot's (`{offset:020}.snap` as
/// [`temporary_target`] reads it) in each snapshot directory. Only regular files with
/// exactly those names: anything else is not the log's.
pub(crate) fn remove_temporaries(dir: &Path) -> Result<()> {
    remove_files_named(dir, is_own_temporary)?;
    for (_, sdir) in snapshot_dirs(dir)? {
        remove_files_named(&sdir, |name| {
            temporary_target(name).is_some_and(|t| super::segment::parse_base(t, "snap").is_some())
        })?;
    }
    Ok(())
}

/// The name and path of each directory in `dir/snapshots` (symlinks followed), one per
/// snapshot name. Anything else there, a stray file say, is not a snapshot name and is
/// left out: listing it as one once made every open fail.
fn snapshot_dirs(dir: &Path) -> Result<Vec<(std::ffi::OsString, PathBuf)>> {
    let root = dir.join(SNAPSHOT_DIR);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", &root, e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", &root, e))?;
        let path = entry.path();
        match fs::metadata(&path) {
            Ok(m) if m.is_dir() => dirs.push((entry.file_name(), path)),
            Ok(_) => {}
            // Gone since it was listed, or a symlink to nothing: no snapshots there.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("stat", &path, e)),
        }
    }
    Ok(dirs)
}

/// Removes the regular files of `dir` whose name `doomed` accepts.
fn remove_files_named(dir: &Path, doomed: impl Fn(&str) -> bool) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        if !entry.file_name().to_str().is_some_and(&doomed) {
            continue;
        }
        let is_file = entry
            .file_type()
            .map_err(|e| Error::io("stat", entry.path(), e))?
            .is_file();
        if is_file {
            tracing::debug!(path = %entry.path().display(), "removing a temporary file left by a crash");
            remove_if_exists(&entry.path())?;
        }
    }
    Ok(())
}

/// Reads a whole file, or `None` if it does not exist.
pub(crate) fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// Removes a file; a file already gone is fine.
pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Encodes the start-offset file.
fn encode_start(start: Offset) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&START_MAGIC);
    b[8..16].copy_from_slice(&start.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The start offset persisted by retention, if any.
pub(crate) fn read_start(dir: &Path) -> Result<Option<Offset>> {
    let path = dir.join(START_FILE);
    let Some(b) = read_if_exists(&path)? else {
        return Ok(None);
    };
    // Written atomically, so a bad file is damage, not a torn write.
    if b.len() != 20 || b[0..8] != START_MAGIC || crc32c::crc32c(&b[0..16]) != le32(&b, 16) {
        return Err(Error::corrupt(
            path,
            0,
            None,
            "start offset file fails its checks (it is written whole, so this is damage, \
             not a torn write; without the file, the log starts at its first segment, \
             which can hold records that retention dropped)",
        ));
    }
    Ok(Some(le64(&b, 8)))
}

/// Persists the start offset atomically.
pub(crate) fn write_start(dir: &Path, start: Offset) -> Result<()> {
    write_atomic(dir, START_FILE, &encode_start(start))
}

/// Encodes a list of offsets: `prefix`, count `u64`, the offsets `u64`, then a CRC of
/// everything before it. The compaction commit marker and the segment manifest.
pub(crate) fn encode_offsets(prefix: &[u8], offsets: &[Offset]) -> Vec<u8> {
    let mut b = Vec::with_capacity(prefix.len() + 12 + 8 * offsets.len());
    b.extend_from_slice(prefix);
    b.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    for offset in offsets {
        b.extend_from_slice(&offset.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// The offsets [`encode_offsets`] encoded with `prefix`; `None` for bytes that fail a
/// check (prefix, CRC, a count that does not match the length).
pub(crate) fn decode_offsets(prefix: &[u8], b: &[u8]) -> Option<Vec<Offset>> {
    let head = prefix.len() + 8;
    if b.len() < head + 4 || !b.starts_with(prefix) {
        return None;
    }
    let body = b.len() - 4;
    if crc32c::crc32c(&b[..body]) != le32(b, body) {
        return None;
    }
    let count = le64(b, prefix.len());
    if count.checked_mul(8)? != (body - head) as u64 {
        return None;
    }
    Some((0..count as usize).map(|i| le64(b, head + 8 * i)).collect())
}

/// The segment bases the manifest lists, if there is one (rule 16).
pub(crate) fn read_manifest(dir: &Path) -> Result<Option<Vec<Offset>>> {
    let path = dir.join(MANIFEST_FILE);
    let Some(b) = read_if_exists(&path)? else {
        return Ok(None);
    };
    let increasing = |bases: &Vec<Offset>| bases.windows(2).all(|w| w[0] < w[1]);
    match decode_offsets(&MANIFEST_PREFIX, &b).filter(increasing) {
        Some(bases) => Ok(Some(bases)),
        // Written atomically, so a bad file is damage, not a torn write.
        None => Err(Error::corrupt(
            path,
            0,
            None,
            "segment manifest fails its checks (magic, version, length, CRC, increasing \
             bases; it is written whole, so this is damage, not a torn write). Without the \
             file, the log opens as one written before the manifest existed, a missing \
             segment file going unnoticed, and a writable open writes the file anew from \
             the segment files there",
        )),
    }
}

/// Writes the manifest listing `bases`, atomically.
pub(crate) fn write_manifest(dir: &Path, bases: &[Offset]) -> Result<()> {
    write_atomic(dir, MANIFEST_FILE, &encode_offsets(&MANIFEST_PREFIX, bases))
}

/// The segment manifest of a writable store (rule 16): the bases of the segment files
/// that must exist, as written to `segments.meta` or owed to it.
///
/// A segment is listed before its file is created and unlisted before its file is
/// deleted, so that the file never lists a segment that is legitimately gone (but for
/// the newest one, listed by a roll that then failed or crashed before creating it).
#[derive(Debug)]
pub(crate) struct Manifest {
    dir: PathBuf,
    bases: Vec<Offset>,
    /// Listed here but not yet in the file: a roll under `SyncPolicy::Never` leaves the
    /// write to the next sync, as it leaves the new file's directory entry.
    unwritten: bool,
}

impl Manifest {
    /// The manifest of `dir` as written, listing `bases`.
    pub(crate) fn new(dir: &Path, bases: Vec<Offset>) -> Manifest {
        Manifest {
            dir: dir.to_path_buf(),
            bases,
            unwritten: false,
        }
    }

    /// The bases listed (written or owed).
    pub(crate) fn bases(&self) -> &[Offset] {
        &self.bases
    }

    /// Lists the segment whose file is about to be created at `base`: when `durable`,
    /// the file is written whole now, and the caller's fsync of the directory after it
    /// creates the segment makes both durable; else the write is owed to the next
    /// [`write_owed`](Self::write_owed). Nothing changes if the write fails.
    ///
    /// (One fsync of the directory for both, not one each: a crash before it leaves the
    /// manifest listing the new segment without its file, or the file not listed, or
    /// neither, and an open accepts each. A roll under `SyncPolicy::Always` with 4 KiB
    /// segments took 2.6-3.8 ms here before the manifest, 6.1-6.9 ms with a directory
    /// fsync of its own for the manifest, 4.3-5.6 ms without.)
    pub(crate) fn list(&mut self, base: Offset, durable: bool) -> Result<()> {
        let mut bases = self.bases.clone();
        bases.push(base);
        if durable {
            write_renamed(
                &self.dir,
                MANIFEST_FILE,
                &encode_offsets(&MANIFEST_PREFIX, &bases),
            )?;
        }
        // A file written now holds the entries owed before too.
        self.unwritten = !durable;
        self.bases = bases;
        Ok(())
    }

    /// Unlists the segments whose files are about to be deleted: written now, whatever
    /// the policy (the files go only after it).
    pub(crate) fn unlist(&mut self, gone: &[Offset]) -> Result<()> {
        let bases: Vec<Offset> = self
            .bases
            .iter()
            .copied()
            .filter(|b| !gone.contains(b))
            .collect();
        write_manifest(&self.dir, &bases)?;
        self.unwritten = false;
        self.bases = bases;
        Ok(())
    }

    /// Forgets the segments below `base`, which retention deletes: the next write leaves
    /// them out (they are below the start, where an open checks nothing).
    pub(crate) fn forget_below(&mut self, base: Offset) {
        self.bases.retain(|&b| b >= base);
    }

    /// Writes the list if a roll under `SyncPolicy::Never` left it owed.
    pub(crate) fn write_owed(&mut self) -> Result<()> {
        if self.unwritten {
            write_manifest(&self.dir, &self.bases)?;
            self.unwritten = false;
        }
        Ok(())
    }
}

/// The cursor journal: `crc32c u32, name length u8, name, offset u64` entries appended
/// and fdatasync'd one per commit; the last entry of a name wins.
#[derive(Debug)]
pub(crate) struct CursorJournal {
    dir: PathBuf,
    path: PathBuf,
    file: Option<File>,
    cursors: HashMap<String, Offset>,
    len: u64,
    /// A rewrite renamed the new journal into place but the fsync of the directory that
    /// makes the rename durable failed: owed before a commit returns.
    rename_unsynced: bool,
}

fn encode_cursor(out: &mut Vec<u8>, name: &str, offset: Offset) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The entry starting at `at`: its name, its offset and where it ends, or what check it
/// fails.
fn entry_at(bytes: &[u8], at: usize) -> std::result::Result<(&str, Offset, usize), &'static str> {
    let Some(&name_len) = bytes.get(at + 4) else {
        return Err("entry header runs past the end of the file");
    };
    let name_len = name_len as usize;
    let end = at + 5 + name_len + 8;
    if name_len == 0 {
        return Err("entry has an empty name");
    }
    if end > bytes.len() {
        return Err("entry runs past the end of the file");
    }
    if crc32c::crc32c(&bytes[at + 4..end]) != le32(bytes, at) {
        return Err("entry fails its checksum");
    }
    let name = std::str::from_utf8(&bytes[at + 5..at + 5 + name_len])
        .map_err(|_| "entry name is not UTF-8")?;
    Ok((name, le64(bytes, at + 5 + name_len), end))
}

/// How the journal's bytes end.
#[derive(Debug, PartialEq, Eq)]
enum JournalEnd {
    /// Every byte was whole entries.
    Clean,
    /// A bad entry at `position` with no valid entry at any byte after it: a torn append.
    Torn {
        position: usize,
        reason: &'static str,
    },
    /// A bad entry at `position` followed by a valid entry at `later`: a committed entry
    /// is damaged, and cutting here would lose the cursors after it.
    Corrupt {
        position: usize,
        reason: &'static str,
        later: usize,
    },
}

/// Parses journal bytes: the cursors of the whole entries before the first bad one, and
/// how the bytes end. Entries are not aligned, so a later valid entry is looked for at
/// every byte after a bad one.
fn parse_journal(bytes: &[u8]) -> (HashMap<String, Offset>, JournalEnd) {
    let mut cursors = HashMap::new();
    let mut at = 0;
    while at < bytes.len() {
        match entry_at(bytes, at) {
            Ok((name, offset, end)) => {
                cursors.insert(name.to_string(), offset);
                at = end;
            }
            Err(reason) => {
                let later = (at + 1..bytes.len()).find(|&q| entry_at(bytes, q).is_ok());
                let end = match later {
                    Some(later) => JournalEnd::Corrupt {
                        position: at,
                        reason,
                        later,
                    },
                    None => JournalEnd::Torn {
                        position: at,
                        reason,
                    },
                };
                return (cursors, end);
            }
        }
    }
    (cursors, JournalEnd::Clean)
}

impl CursorJournal {
    /// Replays the journal of `dir` (rule 11 of the module docs).
    ///
    /// A torn tail is cut when `writable` and left alone otherwise. Damage followed by a
    /// valid entry is an [`Error::Corrupt`] naming the file and the bad entry's byte
    /// position: when `writable` it is returned as the error; read-only, the journal opens
    /// with the cursors committed before the damage and the error is returned beside it.
    /// A read-only open never changes the file.
    pub(crate) fn open(dir: &Path, writable: bool) -> Result<(CursorJournal, Option<Error>)> {
        let path = dir.join(CURSOR_FILE);
        let bytes = read_if_exists(&path)?.unwrap_or_default();
        let (cursors, end) = parse_journal(&bytes);
        let (whole, damage) = match end {
            JournalEnd::Clean => (bytes.len(), None),
            JournalEnd::Torn { position, reason } => {
                tracing::warn!(
                    path = %path.display(),
                    position,
                    reason,
                    "cursor journal ends in a torn entry: it is left out (and cut if writable)"
                );
                (position, None)
            }
            JournalEnd::Corrupt {
                position,
                reason,
                later,
            } => {
                let e = Error::corrupt(
                    &path,
                    position as u64,
                    None,
                    format!(
                        "cursor journal {reason}; a valid entry follows at byte {later}, \
                         so this is not a torn tail"
                    ),
                );
                if writable {
                    return Err(e);
                }
                (position, Some(e))
            }
        };
        let mut journal = CursorJournal {
            dir: dir.to_path_buf(),
            path,
            file: None,
            cursors,
            len: whole as u64,
            rename_unsynced: false,
        };
        if writable {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&journal.path)
                .map_err(|e| Error::io("open", &journal.path, e))?;
            if whole < bytes.len() {
                file.set_len(whole as u64)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| Error::io("truncate torn cursor journal", &journal.path, e))?;
            }
            journal.file = Some(file);
        }
        Ok((journal, damage))
    }

    /// The committed position of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Offset> {
        self.cursors.get(name).copied()
    }

    /// The cursor that stands furthest, with its position (the first name of those
    /// that stand there, so that errors name the same one every time).
    fn furthest(&self) -> Option<(&str, Offset)> {
        self.cursors
            .iter()
            .map(|(name, &offset)| (name.as_str(), offset))
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
    }

    /// Appends and fdatasyncs one entry (rewriting the journal when it grew large).
    pub(crate) fn commit(&mut self, name: &str, offset: Offset) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(Error::ReadOnly("cursors cannot be committed".into()));
        };
        let mut entry = Vec::with_capacity(13 + name.len());
        encode_cursor(&mut entry, name, offset);
        use std::os::unix::fs::FileExt;
        file.write_all_at(&entry, self.len)
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io("append to cursor journal", &self.path, e))?;
        self.len += entry.len() as u64;
        self.cursors.insert(name.to_string(), offset);
        // The entry is in the file renamed into place by a rewrite: durable only once
        // the rename is.
        self.sync_rename()?;
        let live: usize = self.cursors.keys().map(|k| 13 + k.len()).sum();
        if self.len > JOURNAL_REWRITE_BYTES && self.len > 4 * live as u64 {
            self.rewrite()?;
        }
        Ok(())
    }

    /// Replaces the journal with one entry per cursor, atomically.
    fn rewrite(&mut self) -> Result<()> {
        let mut bytes = Vec::new();
        for (name, offset) in &self.cursors {
            encode_cursor(&mut bytes, name, *offset);
        }
        // The written file's own handle, not the path opened anew: from the rename on it
        // is the journal. An open after the rename that failed once left commits
        // appending to the replaced, unlinked file and returning `Ok`.
        let file = write_renamed(&self.dir, CURSOR_FILE, &bytes)?;
        self.file = Some(file);
        self.len = bytes.len() as u64;
        self.rename_unsynced = true;
        self.sync_rename()
    }

    /// Makes a rewrite's rename durable if that is owed.
    fn sync_rename(&mut self) -> Result<()> {
        if self.rename_unsynced {
            sync_dir(&self.dir)?;
            self.rename_unsynced = false;
        }
        Ok(())
    }
}

fn snapshot_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(SNAPSHOT_DIR).join(name)
}

/// The snapshots of a log directory, `snapshots/{name}/{offset:020}.snap`: each save
/// keeps the newest two of its name.
#[derive(Debug)]
pub(crate) struct Snapshots {
    dir: PathBuf,
    /// Held by each save from its write to the end of its pruning, and by a read that
    /// found the snapshots it listed pruned again and again. Two saves of one name and
    /// offset once wrote one temporary file at once, and a read could list snapshots
    /// that a save then deleted, every one, and answer that there were none.
    saving: Mutex<()>,
}

/// What one look at a name's snapshots found.
enum Look {
    /// The newest that passes its checks, if any does.
    Found(Option<Snapshot>),
    /// A snapshot listed was gone when read: a save of a newer one pruned it.
    Pruned(Error),
}

impl Snapshots {
    /// The snapshots of the log in `dir`.
    pub(crate) fn new(dir: &Path) -> Snapshots {
        Snapshots {
            dir: dir.to_path_buf(),
            saving: Mutex::new(()),
        }
    }

    /// Saves a snapshot atomically and keeps the newest two of its name: one older
    /// than those two is deleted again at once.
    pub(crate) fn save(&self, name: &str, offset: Offset, blob: &[u8]) -> Result<()> {
        let _saving = self.saving.lock();
        let root = self.dir.join(SNAPSHOT_DIR);
        let sdir = snapshot_dir(&self.dir, name);
        if !sdir.exists() {
            fs::create_dir_all(&sdir).map_err(|e| Error::io("create directory", &sdir, e))?;
            sync_dir(&root)?;
            sync_dir(&self.dir)?;
        }
        let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER_LEN + blob.len());
        bytes.extend_from_slice(&SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&(blob.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(blob).to_le_bytes());
        let header_crc = crc32c::crc32c(&bytes[0..28]);
        bytes.extend_from_slice(&header_crc.to_le_bytes());
        bytes.extend_from_slice(blob);
        write_atomic(&sdir, &format!("{offset:020}.snap"), &bytes)?;
        let mut offsets = list_snapshots(&sdir)?;
        offsets.sort_unstable_by(|a, b| b.cmp(a));
        for old in offsets.iter().skip(2) {
            remove_if_exists(&sdir.join(format!("{old:020}.snap")))?;
        }
        Ok(())
    }

    /// The snapshot of `name` with the highest offset whose checks pass.
    ///
    /// Saves prune while this reads, so a snapshot listed can be gone when read: then
    /// a newer one exists, and the name is listed again. After a few such looks the
    /// last is made holding the lock of this store's saves, which holds pruning off.
    /// (A read-only store's lock holds off no writer: should its last look find the
    /// snapshots pruned again, it fails with the `NotFound` of the one that went.)
    pub(crate) fn latest(&self, name: &str) -> Result<Option<Snapshot>> {
        let sdir = snapshot_dir(&self.dir, name);
        for _ in 0..UNLOCKED_SNAPSHOT_LOOKS {
            if let Look::Found(found) = look(&sdir)? {
                return Ok(found);
            }
        }
        let _saving = self.saving.lock();
        match look(&sdir)? {
            Look::Found(found) => Ok(found),
            Look::Pruned(e) => Err(e),
        }
    }
}

/// Lists the snapshots in `sdir` and reads them newest first, up to the first that
/// passes its checks.
fn look(sdir: &Path) -> Result<Look> {
    let mut offsets = list_snapshots(sdir)?;
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    for offset in offsets {
        let path = sdir.join(format!("{offset:020}.snap"));
        let mut bytes = Vec::new();
        match File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)) {
            Ok(_) => {}
            // Not the next older one: by now it may be older than the newest saved.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Ok(Look::Pruned(Error::io("read", &path, e)));
            }
            Err(e) => return Err(Error::io("read", &path, e)),
        }
        if let Some(snapshot) = check_snapshot(&bytes, offset) {
            return Ok(Look::Found(Some(snapshot)));
        }
        tracing::warn!(path = %path.display(), "snapshot fails its checks; trying an older one");
    }
    Ok(Look::Found(None))
}

fn list_snapshots(sdir: &Path) -> Result<Vec<Offset>> {
    let entries = match fs::read_dir(sdir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", sdir, e)),
    };
    let mut offsets = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", sdir, e))?;
        let name = entry.file_name();
        if let Some(o) = name
            .to_str()
            .and_then(|n| super::segment::parse_base(n, "snap"))
        {
            offsets.push(o);
        }
    }
    Ok(offsets)
}

/// How far the log was durable when its cursors and snapshots were committed: the
/// furthest offset any of them stands at (a commit and a save sync the log up to their
/// offset first), and what stands there, to name in an error. A snapshot counts by its
/// file's name, whether or not its contents pass their checks: it was renamed into place
/// only after that sync. `None` when there is neither.
pub(crate) fn durable_floor(
    dir: &Path,
    cursors: &CursorJournal,
) -> Result<Option<(Offset, String)>> {
    let mut floor = cursors
        .furthest()
        .map(|(name, offset)| (offset, format!("cursor {name:?}")));
    let mut found = Vec::new();
    for (name, sdir) in snapshot_dirs(dir)? {
        let Some(name) = name.to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(&offset) = list_snapshots(&sdir)?.iter().max() {
            found.push((offset, name));
        }
    }
    // The same one named whatever order the directory lists them in.
    found.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    if let Some((offset, name)) = found.pop()
        && floor.as_ref().is_none_or(|(at, _)| offset > *at)
    {
        floor = Some((offset, format!("snapshot {name:?}")));
    }
    Ok(floor)
}

fn check_snapshot(bytes: &[u8], offset: Offset) -> Option<Snapshot> {
    if bytes.len() < SNAPSHOT_HEADER_LEN
        || bytes[0..8] != SNAPSHOT_MAGIC
        || crc32c::crc32c(&bytes[0..28]) != le32(bytes, 28)
        || le64(bytes, 8) != offset
    {
        return None;
    }
    let len = le64(bytes, 16);
    let blob = &bytes[SNAPSHOT_HEADER_LEN..];
    if blob.len() as u64 != len || crc32c::crc32c(blob) != le32(bytes, 24) {
        return None;
    }
    Some(Snapshot {
        offset,
        blob: Bytes::copy_from_slice(blob),
    })
}
