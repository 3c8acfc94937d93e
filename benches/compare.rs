//! `cargo bench --bench compare [-- --quick] [-- --only GROUP]`: cauce side by side with
//! the physical limit and with the peers a user would otherwise pick, in one run,
//! printed as ratios (above 1: cauce ahead). See PERFORMANCE.md.

#[path = "compare/cluster.rs"]
mod cluster;
#[path = "compare/harness.rs"]
mod harness;
#[path = "compare/log.rs"]
mod log;
#[path = "compare/router.rs"]
mod router;
#[path = "compare/stream.rs"]
mod stream;

fn main() {
    let mut bench = harness::Bench::from_args();
    log::run(&mut bench);
    router::run(&mut bench);
    stream::run(&mut bench);
    cluster::run(&mut bench);
    bench.finish();
}
