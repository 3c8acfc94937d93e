//! The router comparisons.

use crate::harness::Bench;

/// Runs the router group.
pub fn run(bench: &mut Bench) {
    let _ = bench;
}
