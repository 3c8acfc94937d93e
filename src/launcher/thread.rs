//! [`ThreadLauncher`]: instances as named threads of this process.

use std::thread::JoinHandle;

use super::{Launcher, Running};
use crate::error::{Error, Result};
use crate::router::InstanceId;

/// Runs each instance on its own named thread (`cauce-instance-{id}`).
#[derive(Clone, Debug, Default)]
pub struct ThreadLauncher {
    stack_size: Option<usize>,
}

impl ThreadLauncher {
    /// A launcher with the platform's default thread stack size.
    pub fn new() -> Self {
        ThreadLauncher::default()
    }

    /// Sets the stack size of instance threads (handlers with deep recursion).
    pub fn stack_size(mut self, bytes: usize) -> Self {
        self.stack_size = Some(bytes);
        self
    }
}

struct RunningThread(JoinHandle<()>);

impl Running for RunningThread {
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    fn join(self: Box<Self>) -> std::result::Result<(), String> {
        self.0.join().map_err(|panic| panic_message(panic.as_ref()))
    }
}

impl Launcher for ThreadLauncher {
    fn launch(&self, id: InstanceId, body: Box<dyn FnOnce() + Send>) -> Result<Box<dyn Running>> {
        let mut builder = std::thread::Builder::new().name(format!("cauce-instance-{}", id.0));
        if let Some(size) = self.stack_size {
            builder = builder.stack_size(size);
        }
        let handle = builder.spawn(body).map_err(|source| Error::Spawn {
            name: format!("cauce-instance-{}", id.0),
            source,
        })?;
        Ok(Box::new(RunningThread(handle)))
    }
}

/// The message of a panic payload (`&str` or `String`), or a placeholder.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}
