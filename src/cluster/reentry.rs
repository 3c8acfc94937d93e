//! A handler (or a query function) that calls back into its own cluster: refused.
//!
//! A handler that submits to its cluster and waits for the answer can wait for its own
//! instance, which answers nothing while it waits: the instance is declared stalled,
//! and the request runs again elsewhere, submitting again (its first submit was no
//! journaled outside call). A submit can also block on a full queue of its own instance.
//! So while a handler or a query function of a cluster runs on a thread, that cluster's
//! clients refuse submits and queries on that thread, and the cluster its shutdown, with
//! [`Error::InsideHandler`](crate::Error::InsideHandler). Other clusters are unaffected.

use std::cell::Cell;

use crate::error::{Error, Result};
use crate::record::Offset;
use crate::router::InstanceId;

/// What runs on this thread now: the cluster (its handler's address), the instance and
/// the request's offset (`None` for a query).
type Running = (usize, Option<InstanceId>, Option<Offset>);

thread_local! {
    static RUNNING: Cell<Option<Running>> = const { Cell::new(None) };
}

/// Marks a handler or query function of `cluster` as running on this thread until the
/// guard is dropped.
pub(crate) fn enter(cluster: usize, instance: Option<InstanceId>, offset: Option<Offset>) -> Guard {
    let before = RUNNING.with(|r| r.replace(Some((cluster, instance, offset))));
    Guard { before }
}

/// Restores what ran before (handlers do not nest, but replays run inside rebuilds).
pub(crate) struct Guard {
    before: Option<Running>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(self.before));
    }
}

/// Refuses a submit or query of `cluster` from inside one of its handlers or query
/// functions.
pub(crate) fn refuse_inside(cluster: usize) -> Result<()> {
    match RUNNING.with(Cell::get) {
        Some((running, instance, offset)) if running == cluster => {
            Err(Error::InsideHandler { instance, offset })
        }
        _ => Ok(()),
    }
}

/// The identity of a cluster for [`enter`] and [`refuse_inside`]: its handler's address.
pub(crate) fn cluster_of<H>(handler: &H) -> usize {
    std::ptr::from_ref(handler) as *const () as usize
}
