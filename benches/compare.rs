//! `cargo bench --bench compare [-- --quick] [-- --only GROUP]`: cauce side by side with
//! the physical limit and with the peers a user would otherwise pick, in one run,
//! printed as ratios (above 1: cauce ahead). See PERFORMANCE.md.

#[path = "compare/harness.rs"]
mod harness;

fn main() {
    let bench = harness::Bench::from_args();
    bench.finish();
}
