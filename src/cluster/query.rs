//! Queries: a function of one key's state, run by the instance that holds it, between
//! that key's requests, with nothing logged (see [`Client::query`](super::Client::query)).

use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::client::Responder;
use crate::error::{Error, Result};
use crate::launcher::thread::panic_message;
use crate::record::Offset;
use crate::router::InstanceId;
use crate::small::Key;

/// A query on its way to the instance that holds its key, its result type erased: the
/// instance queue carries queries of any result type.
pub(crate) trait Ask<S>: Send {
    /// The key whose state it reads.
    fn key(&self) -> &[u8];
    /// How far its key's requests are queued before it on the instance it is queued
    /// to: every request of the key before this offset is queued before it, every
    /// later one after it. When it is made, the input log's next offset (its
    /// [`Pending::offset`](crate::client::Pending::offset)); when it is routed again
    /// from a lost instance, the log's next offset then. A key whose rebuild failed is
    /// rebuilt up to it before the query runs.
    fn until(&self) -> Offset;
    /// Routed again, with every request of its key before `until` queued before it.
    fn set_until(&mut self, until: Offset);
    /// A way to answer it with an error that stays with the instance while the query
    /// runs: if the instance is declared stalled meanwhile, the cluster answers through
    /// it (the first answer wins, so the query's own answer, if it ever comes, is
    /// dropped).
    fn stall_answer(&self) -> StallAnswer;
    /// Runs the function on `state` and answers with what it returns, or with
    /// [`Error::QueryPanicked`] if it panics (`instance`: who ran it).
    fn run(self: Box<Self>, state: &S, instance: Option<InstanceId>);
    /// Answers with an error instead of running.
    fn refuse(self: Box<Self>, error: Error);
}

/// Answers a query that a stall caught its instance on: see [`Ask::stall_answer`].
pub(crate) type StallAnswer = Box<dyn FnOnce(Error) + Send>;

/// A query, with the responder of its [`Pending`](crate::client::Pending) answer.
pub(crate) struct Asked<S, T, F> {
    key: Key,
    until: Offset,
    query: F,
    responder: Responder<T>,
    state: PhantomData<fn(&S)>,
}

impl<S, T, F> Asked<S, T, F> {
    pub(crate) fn new(key: &[u8], at: Offset, query: F, responder: Responder<T>) -> Self {
        Asked {
            key: Key::copy_from(key),
            until: at,
            query,
            responder,
            state: PhantomData,
        }
    }
}

impl<S, T, F> Ask<S> for Asked<S, T, F>
where
    T: Send + 'static,
    F: FnOnce(&S) -> T + Send,
{
    fn key(&self) -> &[u8] {
        self.key.as_slice()
    }

    fn until(&self) -> Offset {
        self.until
    }

    fn set_until(&mut self, until: Offset) {
        self.until = until;
    }

    fn stall_answer(&self) -> StallAnswer {
        let responder = self.responder.clone();
        Box::new(move |e| {
            responder.answer(Err(e));
        })
    }

    fn run(self: Box<Self>, state: &S, instance: Option<InstanceId>) {
        let Asked {
            key,
            query,
            responder,
            ..
        } = *self;
        // Only a shared reference reaches the function, so a panic leaves the state as
        // it was (short of interior mutability inside `State`).
        let result: Result<T> =
            catch_unwind(AssertUnwindSafe(|| query(state))).map_err(|p| Error::QueryPanicked {
                instance,
                key: key_name(key.as_slice()),
                message: panic_message(p.as_ref()),
            });
        responder.answer(result);
    }

    fn refuse(self: Box<Self>, error: Error) {
        self.responder.answer(Err(error));
    }
}

/// A key as errors name it.
pub(crate) fn key_name(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}
