//! The fixed hashes routing rests on: the key hash and the slot scores.
//!
//! Two routers agree on where a key goes only if they hash it the same way, in every
//! process, on every machine and in every release of cauce. So nothing here is seeded at
//! run time, and nothing depends on a hasher whose output may change between versions:
//!
//! - the **key hash** is [xxh3-64](https://xxhash.com) with the fixed seed [`KEY_SEED`];
//! - the **slot score** of an instance for a slot is a weighted rendezvous score: a
//!   64-bit mix of the instance's own xxh3 hash (seed [`INSTANCE_SEED`]) and the slot
//!   number (splitmix64's finalizer), turned into an exponential variate
//!   `-ln(u) · (1 / weight)`, kept as `f32` bits (the lowest wins), with a logarithm
//!   written here in basic IEEE-754 operations (no fused multiply-add), so that it
//!   rounds the same everywhere (a platform's `ln` may differ in the last bit).
//!
//! The test suite pins all of this with golden vectors: changing any constant here
//! re-routes every key of every deployed cluster, and must fail the build first.
//!
//! ```
//! use cauce::router::key_hash;
//!
//! // The same on every machine, in every process, in every release.
//! assert_eq!(key_hash(b"alice"), 0x0617_682e_f693_f4a1);
//! ```

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::InstanceId;

/// The seed of the key hash (the bytes `"cauce.k1"`, little-endian).
pub const KEY_SEED: u64 = u64::from_le_bytes(*b"cauce.k1");

/// The seed of an instance's own hash, from which its slot scores derive (the bytes
/// `"cauce.i1"`, little-endian).
pub const INSTANCE_SEED: u64 = u64::from_le_bytes(*b"cauce.i1");

/// The 64-bit hash of a routing key: xxh3-64 with the fixed seed [`KEY_SEED`].
///
/// Routers place a key by the top bits of this hash, so callers that route the same key
/// many times (or through several routers) can hash it once and use the `*_hash`
/// methods, such as [`SlotRouter::owner_of_hash`](super::SlotRouter::owner_of_hash).
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, KEY_SEED)
}

/// The hash that seeds all of an instance's slot scores.
pub(crate) fn instance_hash(id: InstanceId) -> u64 {
    xxh3_64_with_seed(&id.0.to_le_bytes(), INSTANCE_SEED)
}

/// The slot a key hash falls in, for a table of `2^bits` slots (`1 <= bits <= 32`): the
/// top bits, so that doubling the table splits every slot in two.
#[inline]
pub(crate) fn slot_of(hash: u64, bits: u32) -> usize {
    (hash >> (64 - bits)) as usize
}

/// A strong 64-bit finalizer (splitmix64's, Stafford's variant 13): every input bit
/// flips every output bit with probability about one half.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The uniform 64-bit score hash of an instance (by its [`instance_hash`]) for a slot.
#[inline]
pub(crate) fn score_hash(slot: u32, instance_hash: u64) -> u64 {
    mix64(
        instance_hash
            ^ u64::from(slot)
                .wrapping_add(1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
    )
}

/// Scores one instance against slots: its rank for a slot is the bits of the `f32` value
/// `-ln(u) · (1 / weight)` where `u` in (0, 1) comes from the score hash. The lowest rank
/// wins the slot; an instance of weight `w` wins with probability `w / W` (the minimum
/// of exponential variates), independently for every slot. The bits of a positive `f32`
/// order like the numbers, so ranks compare as integers; a rank is never 0.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotScorer {
    instance_hash: u64,
    inverse_weight: f64,
}

impl SlotScorer {
    /// The scorer of an instance (by its [`instance_hash`]) of weight `weight` (> 0).
    pub(crate) fn new(instance_hash: u64, weight: u32) -> Self {
        SlotScorer {
            instance_hash,
            inverse_weight: 1.0 / f64::from(weight.max(1)),
        }
    }

    /// The instance's rank for `slot`.
    #[inline]
    pub(crate) fn rank(&self, slot: u32) -> u32 {
        rank_of_hash(score_hash(slot, self.instance_hash), self.inverse_weight)
    }

    /// The rank for `slot` if it may be at most `bound`; `None` when it is surely above.
    /// Cheap when it says `None`: it bounds `-ln(u)` from below by `1 - u` instead of
    /// taking the logarithm, which is what a join does for the many slots where a
    /// newcomer ranks too low to matter.
    #[inline]
    pub(crate) fn rank_within(&self, slot: u32, bound: u32) -> Option<u32> {
        let h = score_hash(slot, self.instance_hash);
        let complement = ((1u64 << 53) - (h >> 11)) as f64 - 0.5;
        // -ln(u) >= 1 - u; the factor keeps the bound below the computed logarithm
        // whatever its last-bit rounding.
        let lower = complement * (1.0 / (1u64 << 53) as f64) * (1.0 - 1.0 / (1u64 << 20) as f64);
        if ((lower * self.inverse_weight) as f32).to_bits() > bound {
            return None;
        }
        Some(self.rank(slot))
    }
}

/// The rank for score hash `h` of an instance with `1 / weight` = `inverse_weight`.
#[inline]
fn rank_of_hash(h: u64, inverse_weight: f64) -> u32 {
    // 53 bits, centred in their interval: u is never 0, and below 1 but for the highest
    // hash, which rounds up to 1.
    let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    let variate = -ln(u) * inverse_weight;
    // That rounding gives a variate of -0.0, whose sign bit would make the best rank
    // the worst: it ranks 1 instead, still below every other variate (all positive, and
    // at least 2^-53 / u32::MAX, far above the smallest f32), and ranks stay above 0.
    ((variate as f32).to_bits() & !(1 << 31)).max(1)
}

/// The rank of an instance for a slot (see [`SlotScorer`]).
#[inline]
pub(crate) fn slot_rank(slot: u32, instance_hash: u64, weight: u32) -> u32 {
    SlotScorer::new(instance_hash, weight).rank(slot)
}

/// The natural logarithm of a positive, normal `x`, in basic IEEE-754 operations only
/// (no fused multiply-add, no platform `ln`), so it gives the same bits everywhere.
/// Accurate to about 1e-12 relative, far below the `f32` the ranks keep.
fn ln(x: f64) -> f64 {
    const LN_2: f64 = std::f64::consts::LN_2;
    const SQRT_2: f64 = std::f64::consts::SQRT_2;
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > SQRT_2 {
        m *= 0.5;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.1716.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0
                + s2 * (1.0 / 7.0
                    + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0 + s2 / 15.0))))));
    exponent as f64 * LN_2 + 2.0 * s * series
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_the_platform_logarithm_closely() {
        let mut x = 1e-300_f64;
        while x < 1.0 {
            let ours = ln(x);
            let std = x.ln();
            assert!(
                (ours - std).abs() <= 1e-12 * std.abs().max(1.0),
                "ln({x}): {ours} vs {std}"
            );
            x *= 1.37;
        }
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn the_highest_score_hash_is_the_best_rank_not_the_worst() {
        for inverse_weight in [1.0, 1e-9, 1.0 / u32::MAX as f64] {
            assert_eq!(rank_of_hash(u64::MAX, inverse_weight), 1);
            assert!(rank_of_hash(u64::MAX - (1 << 11), inverse_weight) > 1);
            assert!(rank_of_hash(0, inverse_weight) > rank_of_hash(u64::MAX >> 1, inverse_weight));
        }
    }

    #[test]
    fn ranks_order_like_the_exponential_variates() {
        let a = slot_rank(7, instance_hash(InstanceId(1)), 1);
        let heavier = slot_rank(7, instance_hash(InstanceId(1)), 2);
        assert!(
            heavier < a,
            "a heavier weight divides the variate, so it ranks better"
        );
    }

    #[test]
    fn the_cheap_bound_never_hides_a_rank_within_it() {
        for id in 0..50 {
            for weight in [1, 3, 1000, u32::MAX] {
                let scorer = SlotScorer::new(instance_hash(InstanceId(id)), weight);
                for slot in 0..2_000 {
                    let rank = scorer.rank(slot);
                    assert_eq!(scorer.rank_within(slot, rank), Some(rank));
                    assert_eq!(scorer.rank_within(slot, u32::MAX), Some(rank));
                    if let Some(r) = scorer.rank_within(slot, rank - 1) {
                        assert_eq!(r, rank);
                    }
                }
            }
        }
    }
}
