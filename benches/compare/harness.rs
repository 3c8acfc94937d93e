//! The side-by-side harness: alternates contenders, takes medians and pairwise ratios,
//! prints a table and writes `target/cauce-bench.json` (see PERFORMANCE.md).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Whether more of a unit is better (throughput) or less (time, imbalance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    More,
    Less,
}

/// A goal for one comparison.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// The ratio (above 1 means cauce is ahead) must be at least this.
    RatioAtLeast(f64),
    /// cauce's own figure must be at most this (in the comparison's unit).
    OursAtMost(f64),
    /// cauce's own figure must be at least this (in the comparison's unit).
    OursAtLeast(f64),
    /// cauce's own figure must be at most `.0` where the other side's is above `.1`
    /// (the goal's premise: met only if both hold).
    OursAtMostWhereTheirsAbove(f64, f64),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::RatioAtLeast(x) => format!(">= {x}"),
            Goal::OursAtMost(x) => format!("ours <= {x}"),
            Goal::OursAtLeast(x) => format!("ours >= {x}"),
            Goal::OursAtMostWhereTheirsAbove(x, t) => format!("ours <= {x} where theirs > {t}"),
        }
    }

    fn meets(self, ours: f64, theirs: f64, ratio: f64) -> bool {
        match self {
            Goal::RatioAtLeast(x) => ratio >= x,
            Goal::OursAtMost(x) => ours <= x,
            Goal::OursAtLeast(x) => ours >= x,
            Goal::OursAtMostWhereTheirsAbove(x, t) => ours <= x && theirs > t,
        }
    }
}

/// One published comparison.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub id: String,
    pub unit: String,
    pub ours: f64,
    pub theirs: f64,
    pub ratio: f64,
    pub goal: Option<Goal>,
}

/// The harness state: options and results.
pub struct Bench {
    quick: bool,
    only: Option<String>,
    rounds: usize,
    outcomes: Vec<Outcome>,
    started: Instant,
    /// Whether `--only` named the group announced last (or a prefix of it): then every
    /// comparison of that group runs, whatever its id.
    in_named_group: bool,
}

impl Bench {
    /// Reads `--quick`, `--only NAME` and `--rounds N` from the command line.
    pub fn from_args() -> Bench {
        let mut quick = false;
        let mut only = None;
        let mut rounds = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--only" => only = args.next(),
                "--rounds" => rounds = args.next().and_then(|r| r.parse().ok()),
                _ => {} // cargo passes --bench; ignore what we do not know
            }
        }
        Bench {
            quick,
            only,
            rounds: rounds.unwrap_or(if quick { 5 } else { 7 }),
            outcomes: Vec::new(),
            started: Instant::now(),
            in_named_group: false,
        }
    }

    /// True when run with `--quick` (reduced sizes).
    pub fn quick(&self) -> bool {
        self.quick
    }

    /// Rounds of A B after the warm-up (`--rounds`; 7, or 5 with `--quick`), for
    /// comparisons that alternate their contenders themselves.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// Picks the full or the quick size.
    pub fn size(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// True when the group `name` should run (no `--only`, or `--only` names it or a
    /// prefix of it).
    pub fn wants(&self, name: &str) -> bool {
        match &self.only {
            None => true,
            Some(only) => name.starts_with(only.as_str()) || only.starts_with(name),
        }
    }

    /// Announces a group on stdout.
    pub fn group(&mut self, name: &str) -> bool {
        let wanted = self.wants(name);
        self.in_named_group = self
            .only
            .as_deref()
            .is_some_and(|only| name.starts_with(only));
        if wanted {
            println!("\n== {name} ==");
        }
        wanted
    }

    /// Measures `ours` and `theirs` alternately (one warm-up each, then `rounds` rounds of
    /// A B), each call returning a figure in `unit`; records the medians and the median of
    /// the pairwise ratios. Runs nothing (and returns `None`) when `--only` leaves `id` out.
    pub fn compare(
        &mut self,
        id: &str,
        unit: &str,
        better: Better,
        goal: Option<Goal>,
        mut ours: impl FnMut() -> f64,
        mut theirs: impl FnMut() -> f64,
    ) -> Option<Outcome> {
        if !self.wants(id) && !self.in_named_group {
            return None;
        }
        ours();
        theirs();
        let mut a = Vec::with_capacity(self.rounds);
        let mut b = Vec::with_capacity(self.rounds);
        for _ in 0..self.rounds {
            a.push(ours());
            b.push(theirs());
        }
        let ratios: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&o, &t)| ratio(better, o, t))
            .collect();
        Some(self.record_with_ratio(id, unit, median(&a), median(&b), median(&ratios), goal))
    }

    /// Records figures measured elsewhere (for example both sides in one pass).
    pub fn record(
        &mut self,
        id: &str,
        unit: &str,
        better: Better,
        goal: Option<Goal>,
        ours: f64,
        theirs: f64,
    ) -> Outcome {
        self.record_with_ratio(id, unit, ours, theirs, ratio(better, ours, theirs), goal)
    }

    fn record_with_ratio(
        &mut self,
        id: &str,
        unit: &str,
        ours: f64,
        theirs: f64,
        ratio: f64,
        goal: Option<Goal>,
    ) -> Outcome {
        let outcome = Outcome {
            id: id.to_string(),
            unit: unit.to_string(),
            ours,
            theirs,
            ratio,
            goal,
        };
        let verdict = match goal {
            Some(g) if g.meets(ours, theirs, ratio) => format!("meets {}", g.describe()),
            Some(g) => format!("MISSES {}", g.describe()),
            None => String::new(),
        };
        println!(
            "{:<44} {:>12} {:>12} {:<8} ratio {:>7.3}  {}",
            id,
            fmt_num(ours),
            fmt_num(theirs),
            unit,
            ratio,
            verdict
        );
        self.outcomes.push(outcome.clone());
        outcome
    }

    /// Prints the summary and writes `target/cauce-bench.json`.
    pub fn finish(self) {
        let mut json = String::from("[\n");
        for (i, o) in self.outcomes.iter().enumerate() {
            let goal = o.goal.map(Goal::describe);
            let meets = o.goal.map(|g| g.meets(o.ours, o.theirs, o.ratio));
            let _ = writeln!(
                json,
                "  {{\"id\": {:?}, \"unit\": {:?}, \"ours\": {}, \"theirs\": {}, \"ratio\": {}, \"goal\": {}, \"meets\": {}}}{}",
                o.id,
                o.unit,
                json_num(o.ours),
                json_num(o.theirs),
                json_num(o.ratio),
                goal.map_or("null".to_string(), |g| format!("{g:?}")),
                meets.map_or("null".to_string(), |m| m.to_string()),
                if i + 1 < self.outcomes.len() { "," } else { "" }
            );
        }
        json.push_str("]\n");
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("cauce-bench.json");
        match std::fs::write(&path, json) {
            Ok(()) => println!("\nwrote {}", path.display()),
            Err(e) => eprintln!("could not write {}: {e}", path.display()),
        }
        let missed = self
            .outcomes
            .iter()
            .filter(|o| o.goal.is_some_and(|g| !g.meets(o.ours, o.theirs, o.ratio)))
            .count();
        println!(
            "{} comparisons, {} with goals missed, in {:.1} s; peak RSS {} MiB",
            self.outcomes.len(),
            missed,
            self.started.elapsed().as_secs_f64(),
            peak_rss_kib() / 1024
        );
    }
}

fn ratio(better: Better, ours: f64, theirs: f64) -> f64 {
    match better {
        Better::More => ours / theirs,
        Better::Less => theirs / ours,
    }
}

/// The median of `xs` (the mean of the middle two for an even count).
/// A fresh temporary directory in the target directory (`CARGO_TARGET_DIR`, or
/// `target` beside the manifest), made if missing: every group's files go to the same
/// disk as the build, never to /tmp (which may be memory).
pub fn bench_dir() -> tempfile::TempDir {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&target).expect("target dir");
    tempfile::tempdir_in(target).expect("bench dir")
}

/// The median of figures a `compare` closure collected on the side: the first is its
/// warm-up call's, and is left out as the compared figures' is.
pub fn median_of_rounds(xs: &[f64]) -> f64 {
    median(xs.get(1..).filter(|r| !r.is_empty()).unwrap_or(xs))
}

pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) of `xs`, nearest rank.
pub fn quantile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
    xs[i.min(xs.len() - 1)]
}

/// Runs `f` and returns `count / seconds`.
pub fn rate(count: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    count as f64 / t.elapsed().as_secs_f64()
}

/// Runs `f` and returns how long it took.
pub fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Peak resident memory of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".to_string()
    }
}
