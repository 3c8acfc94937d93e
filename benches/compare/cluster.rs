//! The cluster comparisons.

use crate::harness::Bench;

/// Runs the cluster group.
pub fn run(bench: &mut Bench) {
    let _ = bench;
}
