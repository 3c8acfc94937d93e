//! cauce (Spanish: the bed a stream runs in) turns one trait implementation into a keyed
//! service that spreads over many instances with no central load balancer and no central
//! routing table, absorbs skewed keys, survives crashed and stalled instances, and can
//! rebuild, and re-run, any state it was ever in.
//!
//! You implement [`Handler`](cluster::Handler): per-key state, a request in, a response
//! out. cauce appends every request to a durable log before anything acts on it, places
//! each key on an instance by consistent hashing with bounded loads, and folds the key's
//! requests into its state on that instance. State is a fold over the log, so it can
//! always be rebuilt: after a crash, after a handler panic, when an instance stalls, or
//! when keys move because instances were added or removed.
//!
//! ```
//! use cauce::cluster::{Cluster, Context, Handler};
//!
//! /// A per-user counter: all of the service's code.
//! struct Counter;
//!
//! impl Handler for Counter {
//!     type State = u64;
//!     type Request = u64;
//!     type Response = u64;
//!
//!     fn handle(&self, _ctx: &mut Context<'_>, _user: &[u8], total: &mut u64, add: u64) -> u64 {
//!         *total += add;
//!         *total
//!     }
//! }
//!
//! # fn main() -> cauce::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let cluster = Cluster::builder(Counter).dir(dir.path()).instances(4).build()?;
//! let client = cluster.client();
//! client.submit("alice", 5)?.wait()?;
//! let pending = client.submit("alice", 2)?; // in the log once submit returns
//! assert_eq!(pending.wait()?, 7);
//! cluster.shutdown()?;
//!
//! // Start again from the same directory: the state is rebuilt from the log.
//! let cluster = Cluster::builder(Counter).dir(dir.path()).instances(2).build()?;
//! // A read runs on the key's instance, between its requests, and logs nothing.
//! assert_eq!(cluster.client().query("alice", |total: &u64| *total)?.wait()?, 7);
//! cluster.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! # The parts
//!
//! Each part is a small trait with at least one real implementation; the store and the
//! stream come with a conformance suite that any other implementation can run
//! ([`store::conformance`], [`stream::conformance`]):
//!
//! | part | what it is | implementations |
//! | --- | --- | --- |
//! | [`Record`], [`Codec`] | offset, timestamp, key and payload bytes; typed values to bytes | [`Bincode`] |
//! | [`store::Store`] | an append-only log: append, read from an offset, sync, retention, compaction, cursors, snapshots | [`store::LogStore`] (segmented files, group commit), [`store::MemoryStore`] |
//! | [`stream::Stream`] | publish on one side, subscribe on the other; `tee`, `merge`, `split`, `map`, `filter` | [`stream::MemoryStream`], [`stream::LogStream`] |
//! | [`router::Router`] | key → instance, membership, weights | [`router::SlotRouter`]; built on it: [`router::BoundedLoads`] (bounded loads per request) and [`router::Sticky`] (placement of keys that own state) |
//! | [`launcher::Launcher`] | where instances run, their heartbeats, a supervisor | [`launcher::ThreadLauncher`] |
//! | [`cluster::Handler`] | the service's code | yours |
//! | [`cluster::Cluster`] | the composition root a host application builds and submits to | — |
//!
//! # What you may rely on
//!
//! - A request whose `submit` returned is in the input log under the log's sync policy
//!   ([`store::SyncPolicy::Always`] by default: it survives a crash of the process or the
//!   machine).
//! - Every key's state is the fold of its logged requests in log order, each applied
//!   once, whatever crashed, panicked, stalled or moved along the way.
//! - A handler's calls to the outside world go through [`cluster::Context::call`] and are
//!   journaled, so a replay gets the recorded answers instead of calling again.
//! - Any past state can be rebuilt and any request re-run on it with
//!   [`cluster::Replay`], from the logs alone.
//! - Damaged storage, bad input and full queues are typed [`Error`]s that say what and
//!   where; library code does not panic on them.
#![warn(missing_docs)]
// docs.rs marks what a feature adds (`--cfg docsrs`, see Cargo.toml).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
pub mod cluster;
pub mod codec;
pub mod error;
pub mod handler;
pub mod launcher;
pub mod record;
pub mod router;
pub mod store;
pub mod stream;

mod small;

pub use codec::{Bincode, Codec};
pub use error::{Error, Result};
pub use record::{Entry, Offset, Record, Timestamp};
