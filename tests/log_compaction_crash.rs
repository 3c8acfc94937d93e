//! Crash test with real processes for compaction with tombstones: a child appends values
//! and tombstones for a few keys (`SyncPolicy::Always`, 4 KiB segments) and every few
//! batches runs `compact_with` with tombstones (sometimes also `before`), printing each
//! append and each compaction as it starts it and once it returned. The parent SIGKILLs
//! it at random moments (100 kill points), most of them within a compaction's usual
//! length of a compaction's start, reopens the log (read-write: the next child goes on
//! with it), and checks it against a model built from those lines:
//!
//! - the log opens, leaving no commit marker nor rewrite behind (recovery rule 9), and
//!   verifies;
//! - offsets strictly increase, and every record read back is the one appended at its
//!   offset, byte for byte (key, timestamp, payload);
//! - an append the kill interrupted is there whole or not at all;
//! - each key's latest record read back is its latest acknowledged one, or nothing when
//!   that is a tombstone a compaction that had started could have expired. In particular
//!   a key whose latest record is a tombstone never reads back a value: a compaction that
//!   drops the tombstone and the value before it, each in its own segment, must not be
//!   left by a crash having dropped only the tombstone;
//! - the log holds exactly what it held before the compaction the kill interrupted, or
//!   what it holds after it (rule 9: a committed compaction rolls forward, one that did
//!   not commit is dropped).
//!
//! A record's timestamp is its offset, so a compaction expires the tombstones before an
//! offset; a value's payload is a function of its offset, so a record read back is
//! checked knowing only its key and kind, which the child prints.
//!
//! The test binary is its own child: with `CAUCE_COMPACTION_CRASH_DIR` set, the test runs
//! the child instead.

#[path = "support/kill.rs"]
mod kill;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use cauce::store::{CompactOptions, LogOptions, LogStore, Store, SyncPolicy};
use cauce::{Entry, Offset};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const TEST: &str = "a_compaction_killed_at_any_moment_is_all_or_nothing_and_revives_no_deleted_key";
const CHILD_ENV: &str = "CAUCE_COMPACTION_CRASH_DIR";
const KILL_POINTS: usize = 100;
/// Few keys, so that a compaction finds most of a key's records superseded.
const KEYS: u8 = 8;

fn options() -> LogOptions {
    // Small segments: a compaction rewrites and deletes many, and appends roll often.
    LogOptions::new()
        .sync(SyncPolicy::Always)
        .segment_bytes(4 << 10)
        .index_interval_bytes(1024)
}

/// A record as the child chose it: its key, and whether it is a tombstone. Its
/// timestamp is its offset, and a value's payload is [`payload_of`] its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Spec {
    key: u8,
    tombstone: bool,
}

impl Spec {
    fn key(&self) -> Vec<u8> {
        format!("key{}", self.key).into_bytes()
    }

    fn payload(&self, offset: Offset) -> Vec<u8> {
        if self.tombstone {
            Vec::new()
        } else {
            payload_of(offset)
        }
    }

    /// `3` for a value of `key3`, `3-` for its tombstone.
    fn word(&self) -> String {
        format!("{}{}", self.key, if self.tombstone { "-" } else { "" })
    }

    fn parse(word: &str) -> Option<Spec> {
        let (key, tombstone) = match word.strip_suffix('-') {
            Some(key) => (key, true),
            None => (word, false),
        };
        Some(Spec {
            key: key.parse().ok()?,
            tombstone,
        })
    }
}

/// The offset, then bytes derived from it, 16 to 1015 in all.
fn payload_of(offset: Offset) -> Vec<u8> {
    // splitmix64
    let mut x = offset.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let len = 16 + (x % 1000) as usize;
    let mut p = offset.to_le_bytes().to_vec();
    x |= 1;
    while p.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.push(x as u8);
    }
    p
}

/// Prints one line for the parent, ended by `;` so that a line cut by the kill is told
/// from a whole one, and flushes it.
fn say(out: &mut std::io::Stdout, line: std::fmt::Arguments<'_>) {
    writeln!(out, "{line} ;")
        .and_then(|()| out.flush())
        .expect("stdout");
}

/// Prints `error …` (the parent fails on it) and exits.
fn fail(why: std::fmt::Arguments<'_>) -> ! {
    println!("error {why}");
    std::process::exit(1)
}

fn or_report<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|e| fail(format_args!("{what}: {e}")))
}

/// Appends and compacts until killed. One thread: an append and a compaction never run
/// at once, so a kill interrupts at most one of them, and a compaction started when the
/// log ended at `next` compacts up to `next` (or to its `before`, if lower).
fn run_child(dir: &Path) {
    let log = or_report(LogStore::open(dir, options()), "open");
    let mut rng = StdRng::seed_from_u64(log.next_offset() ^ 0xc0ff_ee00);
    let mut out = std::io::stdout();
    // Ends the test harness's `test … ` line, which would swallow the first line's word.
    say(&mut out, format_args!(""));
    loop {
        // Some stretches between compactions only delete: their segment then holds only
        // tombstones, which a compaction that expires them empties, while the values
        // they delete are in older segments that keep other keys' values.
        let deleting = rng.random_bool(0.3);
        let batches = if deleting { 1..3 } else { 1..6 };
        for _ in 0..rng.random_range(batches) {
            let start = log.next_offset();
            let specs: Vec<Spec> = (0..rng.random_range(1..8))
                .map(|_| Spec {
                    key: rng.random_range(0..KEYS),
                    tombstone: deleting || rng.random_bool(0.15),
                })
                .collect();
            let records: Vec<(Vec<u8>, Vec<u8>)> = (start..)
                .zip(&specs)
                .map(|(o, spec)| (spec.key(), spec.payload(o)))
                .collect();
            let batch: Vec<Entry<'_>> = (start..)
                .zip(&records)
                .map(|(o, (k, p))| Entry::with_timestamp(o, k, p))
                .collect();
            let words: Vec<String> = specs.iter().map(Spec::word).collect();
            say(&mut out, format_args!("append {start} {}", words.join(",")));
            let end = start + specs.len() as u64;
            let offsets = or_report(log.append(&batch), "append");
            if offsets != (start..end) {
                // One appender: each batch's offsets follow the last one's.
                fail(format_args!(
                    "append: offsets {offsets:?}, not {start}..{end}"
                ));
            }
            say(&mut out, format_args!("ack {start} {end}"));
        }
        let next = log.next_offset();
        // Mostly every tombstone expires, the freshest too: a compaction then drops a
        // key's value and its tombstone together, which is where a crash could revive it.
        let expired_before = match rng.random_range(0..10) {
            0..5 => next,
            5..8 => next.saturating_sub(rng.random_range(0..60)),
            _ => 0,
        };
        let mut compaction = CompactOptions::new().tombstones(expired_before);
        let before = rng
            .random_bool(0.25)
            .then(|| next.saturating_sub(rng.random_range(0..30)));
        if let Some(before) = before {
            compaction = compaction.before(before);
        }
        let before = before.map_or("none".to_string(), |b| b.to_string());
        say(
            &mut out,
            format_args!("compact {before} {expired_before} {next}"),
        );
        let began = Instant::now();
        let done = or_report(log.compact_with(compaction), "compact");
        let micros = began.elapsed().as_micros();
        say(&mut out, format_args!("compacted {} {micros}", done.until));
    }
}

/// What the child was doing when the kill came, if anything.
#[derive(Clone, Debug)]
enum InFlight {
    Append(Range<Offset>),
    Compaction {
        until: Offset,
        expired_before: Offset,
    },
}

/// What the log must hold, from the lines of the children so far.
#[derive(Default)]
struct Model {
    /// The offsets the log holds: every acknowledged record that no finished compaction
    /// dropped (and those of an unacknowledged append found there after its kill).
    held: BTreeSet<Offset>,
    /// The record appended at each offset the log holds or held, and at those of the
    /// append the kill interrupted.
    written: BTreeMap<Offset, Spec>,
    /// The offset of each key's latest acknowledged record.
    latest: HashMap<u8, Offset>,
    /// `(until, expired_before)` of every compaction that started, finished or not.
    started: Vec<(Offset, Offset)>,
    finished: usize,
}

impl Model {
    fn acknowledge(&mut self, range: Range<Offset>) {
        for o in range {
            self.held.insert(o);
            self.latest.insert(self.written[&o].key, o);
        }
    }

    /// What the log holds after a compaction up to `until` with tombstones: a record
    /// before `until` stays if it is the latest of its key before `until`, unless it is
    /// a tombstone stamped (at its offset) before `expired_before`.
    fn compacted(&self, until: Offset, expired_before: Offset) -> BTreeSet<Offset> {
        let mut latest = HashMap::new();
        for &o in self.held.range(..until) {
            latest.insert(self.written[&o].key, o);
        }
        let keeps = |o: Offset| {
            let spec = self.written[&o];
            o >= until || (latest[&spec.key] == o && !(spec.tombstone && o < expired_before))
        };
        self.held.iter().copied().filter(|&o| keeps(o)).collect()
    }

    /// Folds in a child's lines; returns what it was doing when killed, and each
    /// finished compaction's duration.
    fn replay(&mut self, lines: &[String], round: usize) -> (Option<InFlight>, Vec<Duration>) {
        let mut in_flight = None;
        let mut durations = Vec::new();
        for line in lines {
            let mut words: Vec<&str> = line.split_whitespace().collect();
            if words.len() < 2 || words.pop() != Some(";") {
                continue; // the test harness's, or a line cut by the kill
            }
            let number = |i: usize| -> Offset {
                words[i]
                    .parse()
                    .unwrap_or_else(|_| panic!("kill {round}: bad line {line:?}"))
            };
            match words[0] {
                "append" => {
                    let start = number(1);
                    let specs: Vec<Spec> = words[2]
                        .split(',')
                        .map(|w| Spec::parse(w).expect("a record's key and kind"))
                        .collect();
                    self.written.extend((start..).zip(specs.iter().copied()));
                    in_flight = Some(InFlight::Append(start..start + specs.len() as u64));
                }
                "ack" => {
                    self.acknowledge(number(1)..number(2));
                    in_flight = None;
                }
                "compact" => {
                    let next = number(3);
                    let until = match words[1] {
                        "none" => next,
                        _ => number(1).min(next),
                    };
                    let expired_before = number(2);
                    self.started.push((until, expired_before));
                    in_flight = Some(InFlight::Compaction {
                        until,
                        expired_before,
                    });
                }
                "compacted" => {
                    let Some(InFlight::Compaction {
                        until,
                        expired_before,
                    }) = in_flight.take()
                    else {
                        panic!("kill {round}: a compaction finished that did not start")
                    };
                    assert_eq!(
                        number(1),
                        until,
                        "kill {round}: the compaction's until is not the model's"
                    );
                    self.held = self.compacted(until, expired_before);
                    self.finished += 1;
                    durations.push(Duration::from_micros(number(2)));
                }
                _ => {}
            }
        }
        (in_flight, durations)
    }
}

/// Reopens the log after a kill and checks it against the model (see the module docs),
/// then makes the model hold what the log holds.
fn check_after_kill(dir: &Path, model: &mut Model, in_flight: Option<&InFlight>, round: usize) {
    let log = LogStore::open(dir, options())
        .unwrap_or_else(|e| panic!("reopen after kill {round} failed: {e}"));
    for entry in std::fs::read_dir(dir).expect("list the log") {
        let name = entry.expect("list the log").file_name();
        let name = name.to_string_lossy();
        assert!(
            name != "compact.commit" && !name.ends_with(".log.compact"),
            "after kill {round}: the open left {name} behind"
        );
    }
    let mut found = BTreeSet::new();
    let mut latest_found: HashMap<u8, Offset> = HashMap::new();
    for r in log.read_from(log.start_offset()).expect("read") {
        let r = r.unwrap_or_else(|e| panic!("after kill {round}: {e}"));
        let o = r.offset;
        assert!(
            found.last().is_none_or(|&last| last < o),
            "after kill {round}: offset {o} comes after a higher one"
        );
        let spec = model
            .written
            .get(&o)
            .unwrap_or_else(|| panic!("after kill {round}: record {o} was never appended"));
        assert!(
            r.timestamp == o && r.key[..] == spec.key()[..] && r.payload[..] == spec.payload(o)[..],
            "after kill {round}: record {o} is not the one appended there"
        );
        found.insert(o);
        latest_found.insert(spec.key, o);
    }
    log.verify()
        .unwrap_or_else(|e| panic!("after kill {round}: verify: {e}"));

    // The append the kill interrupted is there whole or not at all; there, it is as good
    // as acknowledged (the reopen made it durable, and the next child builds on it), and
    // not there, its offsets are free for the next child's records.
    if let Some(InFlight::Append(range)) = in_flight {
        let there = found.range(range.clone()).count() as u64;
        assert!(
            there == 0 || there == range.end - range.start,
            "after kill {round}: {there} of the records {range:?} of an interrupted append \
             are there"
        );
        if there > 0 {
            model.acknowledge(range.clone());
        } else {
            model.written.retain(|o, _| !range.contains(o));
        }
    }

    for (&key, &last) in &model.latest {
        let got = latest_found.get(&key).copied();
        if !model.written[&last].tombstone {
            assert_eq!(
                got,
                Some(last),
                "after kill {round}: key{key}'s latest record is the value at {last}"
            );
            continue;
        }
        match got {
            Some(o) if o == last => {}
            Some(o) if !model.written[&o].tombstone => panic!(
                "after kill {round}: key{key}, deleted by the tombstone at {last}, reads back \
                 its value at {o}"
            ),
            Some(o) => panic!(
                "after kill {round}: key{key}'s latest record read back is the tombstone at \
                 {o}, not the later one at {last}"
            ),
            None => assert!(
                model
                    .started
                    .iter()
                    .any(|&(until, expired_before)| last < until && last < expired_before),
                "after kill {round}: key{key}'s tombstone at {last} is gone, but no \
                 compaction expired it"
            ),
        }
    }

    // All or nothing (rule 9): the log holds what it held before the interrupted
    // compaction, or what it holds after it.
    let after = match in_flight {
        Some(&InFlight::Compaction {
            until,
            expired_before,
        }) => model.compacted(until, expired_before),
        _ => model.held.clone(),
    };
    assert!(
        found == model.held || found == after,
        "after kill {round}: the log holds neither what it held before the interrupted \
         compaction ({in_flight:?}) nor what it holds after it: extra {:?}, missing {:?} \
         (next to after it)",
        found.difference(&after).collect::<Vec<_>>(),
        after.difference(&found).collect::<Vec<_>>(),
    );
    model.held = found;
}

/// When to kill, from the trigger (a compaction's start): mostly within a compaction's
/// usual length, else within some milliseconds after it, among the appends that follow.
fn kill_delay(rng: &mut StdRng, durations: &[Duration]) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort();
    let usual = sorted
        .get(sorted.len() * 3 / 4)
        .map_or(2_000, |d| d.as_micros() as u64);
    let micros = if rng.random_bool(0.75) {
        rng.random_range(0..=usual)
    } else {
        usual + rng.random_range(0..=10_000)
    };
    Duration::from_micros(micros)
}

#[test]
fn a_compaction_killed_at_any_moment_is_all_or_nothing_and_revives_no_deleted_key() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        run_child(Path::new(&dir));
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("log");
    let mut rng = StdRng::seed_from_u64(0xc0_4ac7);
    let mut model = Model::default();
    let mut durations = Vec::new();
    let (mut in_compaction, mut swapped, mut in_append) = (0, 0, 0);
    for round in 0..KILL_POINTS {
        // The kill is timed from the start of the first, second or third compaction.
        let nth = rng.random_range(1..=3);
        let mut starts = 0;
        let trigger = move |line: &str| {
            starts += usize::from(line.starts_with("compact "));
            starts == nth && line.starts_with("compact ")
        };
        let after = kill_delay(&mut rng, &durations);
        let lines = kill::run_and_kill_after(
            TEST,
            CHILD_ENV,
            &dir,
            trigger,
            Duration::from_secs(30),
            after,
        );
        let (in_flight, took) = model.replay(&lines, round);
        durations.extend(took);
        let held = model.held.clone();
        check_after_kill(&dir, &mut model, in_flight.as_ref(), round);
        match in_flight {
            Some(InFlight::Compaction { .. }) => {
                in_compaction += 1;
                swapped += usize::from(model.held != held);
            }
            Some(InFlight::Append(_)) => in_append += 1,
            None => {}
        }
    }
    assert!(
        model.finished > 0 && !model.latest.is_empty(),
        "the children appended and compacted"
    );
    eprintln!(
        "{KILL_POINTS} kills: {in_compaction} inside a compaction ({swapped} found it \
         swapped in), {in_append} inside an append; {} compactions finished; the log ends \
         at {}",
        model.finished,
        model.written.last_key_value().map_or(0, |(&o, _)| o + 1)
    );
}
