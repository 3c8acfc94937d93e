//! cauce: a keyed service that scales over many instances with no central load balancer
//! and no central routing table, on a durable log it can always replay.
//!
//! (Crate docs grow with the parts; see the module docs.)
#![warn(missing_docs)]

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

pub use codec::{Bincode, Codec};
pub use error::{Error, Result};
pub use record::{Entry, Offset, Record, Timestamp};
