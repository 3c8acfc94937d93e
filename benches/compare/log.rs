//! The log comparisons.

use crate::harness::Bench;

/// Runs the log group.
pub fn run(bench: &mut Bench) {
    let _ = bench;
}
