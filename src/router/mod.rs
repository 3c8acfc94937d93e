//! Routers: which instance owns a key, with no central table.
//!
//! A service keyed by user (or tenant, or document) runs as many instances; each key
//! must go to one of them, the same one every time, decided by every process on its
//! own. A [`Router`] is that decision: the owner of a key, from a membership of
//! instances with weights. It is *consistent* hashing: a membership change moves only
//! the keys it must (about `w / W` of them, to or from the instance that changed), so an
//! instance keeps the state it built for its keys.
//!
//! - [`SlotRouter`] (the default) hashes a key with a fixed hash ([`key_hash`]) into one
//!   of `S` slots and reads the owner from a table: O(1), lock-free, a few nanoseconds.
//!   The table is a pure function of the membership (same members and weights, same
//!   table, in any join order and any process), balanced to within a small ε, and
//!   rebuilt off the hot path on a change ([`table`] explains how).
//! - [`BoundedLoads`] spreads requests that any instance may serve: a request whose
//!   owner is busier than `(1 + ε)` times the mean spills down the key's preference
//!   list.
//! - [`Sticky`] places keys that own state: on first sight, on the first instance of the
//!   preference list under the load cap, where the key stays until membership changes,
//!   it goes idle, or its instance is over the cap long enough to shed it
//!   ([`StickyOptions::shed_when_over`]). Placement is a deterministic function of the events it is fed, so
//!   routers reading the same log agree without talking.
//!
//! ```
//! use cauce::router::{InstanceId, Router, SlotRouter};
//!
//! let router = SlotRouter::new();
//! for id in 1..=3 {
//!     router.add(InstanceId(id), 1).unwrap();
//! }
//! let owner = router.owner_of(b"user-42").unwrap();
//!
//! // A fourth instance takes about a quarter of the keys from the other three. Here a
//! // key that moves, moves to the newcomer (with more instances, a few slots also move
//! // between the others to keep the table balanced).
//! router.add(InstanceId(4), 1).unwrap();
//! let now = router.owner_of(b"user-42").unwrap();
//! assert!(now == owner || now == InstanceId(4));
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Result;

pub mod bounded;
pub mod hash;
mod matching;
pub mod table;

pub(crate) use bounded::Pick;
pub use bounded::{BoundedLoads, LoadGuard, Move, Sticky, StickyOptions};
pub use hash::key_hash;
pub use table::{MAX_INSTANCES, SlotRouter, SlotRouterOptions, SlotTable, TableReader};

/// Identifies one instance of a service.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceId(pub u32);

impl InstanceId {
    /// The instance a [`Replay`](crate::cluster::Replay) runs handlers as (what their
    /// [`Context::instance`](crate::handler::Context::instance) says, and errors name):
    /// never a live instance. Shown as `replay`.
    ///
    /// ```
    /// use cauce::router::InstanceId;
    ///
    /// assert_eq!(InstanceId::REPLAY.to_string(), "replay");
    /// assert_eq!(InstanceId(3).to_string(), "#3");
    /// assert_eq!(format!("{:?}", InstanceId::REPLAY), "InstanceId::REPLAY");
    /// assert_eq!(format!("{:?}", InstanceId(3)), "InstanceId(3)");
    /// ```
    pub const REPLAY: InstanceId = InstanceId(u32::MAX);
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InstanceId::REPLAY => f.write_str("InstanceId::REPLAY"),
            InstanceId(id) => f.debug_tuple("InstanceId").field(&id).finish(),
        }
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            InstanceId::REPLAY => f.write_str("replay"),
            InstanceId(id) => write!(f, "#{id}"),
        }
    }
}

/// A membership version: it changes with every membership change.
pub type Epoch = u64;

/// An instance and its weight (its share of keys is `weight / total weight`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The instance.
    pub id: InstanceId,
    /// Its weight, at least 1.
    pub weight: u32,
}

/// Decides which instance owns a key, from a membership of weighted instances.
///
/// # Contract
///
/// - `owner_of` is a pure function of the key and the current membership (ids and
///   weights): two routers of the same type and options with the same membership give
///   the same answer, in any process, whatever order the members joined in.
/// - A membership change moves few keys: adding or removing an instance of weight `w`
///   moves about `w / W` of the keys, to or from that instance.
/// - Lookups may run concurrently with membership changes and see either the old or the
///   new membership, never a mix.
/// - `add` with weight 0 is [`Error::InvalidWeight`](crate::Error::InvalidWeight), of
///   [`InstanceId::REPLAY`] [`Error::ReservedInstance`](crate::Error::ReservedInstance);
///   `remove` of an absent instance is
///   [`Error::UnknownInstance`](crate::Error::UnknownInstance). Every successful `add`
///   or `remove` returns a new, larger epoch.
pub trait Router: Send + Sync {
    /// The instance that owns `key`; `None` when there is no member.
    fn owner_of(&self, key: &[u8]) -> Option<InstanceId>;

    /// Clears `out` and fills it with up to `n` distinct instances for `key`: the owner
    /// first, then the instances that would take the key if those before it were gone or
    /// full (for spill and for replicas).
    fn preference_list(&self, key: &[u8], n: usize, out: &mut Vec<InstanceId>);

    /// Adds an instance with a weight (> 0; re-adding changes its weight); new epoch.
    fn add(&self, id: InstanceId, weight: u32) -> Result<Epoch>;

    /// Removes an instance (`Error::UnknownInstance` if absent); new epoch.
    fn remove(&self, id: InstanceId) -> Result<Epoch>;

    /// Changes with every membership change.
    fn epoch(&self) -> Epoch;

    /// The members and weights, sorted by id.
    fn members(&self) -> Vec<Member>;
}
