//! [`futures_core::Stream`] for the subscribers that can wait without a thread (the
//! `futures` feature): a stored stream read with `StreamExt` on tokio, async-std or any
//! other executor.

use std::pin::Pin;
use std::task::{Context, Poll};

use super::LogSubscriber;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::store::Store;

/// The records of a [`LogSubscriber`] as a [`futures_core::Stream`] (feature
/// `futures`): each item is what [`recv_async`](LogSubscriber::recv_async) resolves
/// to, and the stream ends (`None`) where it resolves to [`Error::Closed`], once the
/// stream closed and every record before the close was received; it then stays ended.
/// Other errors are items, and the stream goes on after them as `recv` does.
///
/// ```
/// use cauce::stream::{LogStream, Position, Publish, Stream};
/// use cauce::store::MemoryStore;
/// use cauce::Entry;
/// use futures_core::Stream as _;
///
/// let stream = LogStream::new(MemoryStore::new());
/// let mut subscriber = stream.subscribe(Position::Beginning)?;
/// let publisher = stream.publisher();
/// publisher.publish(Entry::new(b"k", b"hello"))?;
/// publisher.close();
/// # let waker = std::task::Waker::noop();
/// # let mut cx = std::task::Context::from_waker(&waker);
/// // With tokio-stream: `while let Some(record) = subscriber.next().await { .. }`
/// let first = std::pin::Pin::new(&mut subscriber).poll_next(&mut cx);
/// assert!(matches!(first, std::task::Poll::Ready(Some(Ok(r))) if r.payload == "hello"));
/// let end = std::pin::Pin::new(&mut subscriber).poll_next(&mut cx);
/// assert!(matches!(end, std::task::Poll::Ready(None)));
/// # Ok::<(), cauce::Error>(())
/// ```
impl<S: Store> futures_core::Stream for LogSubscriber<S> {
    type Item = Result<Record>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Record>>> {
        match self.get_mut().poll_recv(cx) {
            Poll::Ready(Err(Error::Closed)) => Poll::Ready(None),
            Poll::Ready(item) => Poll::Ready(Some(item)),
            Poll::Pending => Poll::Pending,
        }
    }
}
