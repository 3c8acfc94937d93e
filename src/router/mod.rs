//! Routers: which instance owns a key, with no central table.
//!
//! (Being built: see the router issue.)

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies one instance of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceId(pub u32);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}
