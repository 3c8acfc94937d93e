//! The stream comparisons.

use crate::harness::Bench;

/// Runs the stream group.
pub fn run(bench: &mut Bench) {
    let _ = bench;
}
