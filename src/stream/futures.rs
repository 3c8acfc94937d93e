//! [`futures_core::Stream`] for the subscribers that can wait without a thread (the
//! `futures` feature): a stored stream read with `StreamExt` on tokio, async-std or any
//! other executor.

use std::pin::Pin;
use std::task::{Context, Poll};

use super::LogSubscriber;
#[cfg(doc)]
use crate::error::Error;
use crate::error::Result;
use crate::record::Record;
use crate::store::Store;

/// The records of a [`LogSubscriber`] as a [`futures_core::Stream`] (feature
/// `futures`): each item is what [`recv_async`](LogSubscriber::recv_async) resolves
/// to, and the stream ends (`None`) where it resolves to [`Error::Closed`], once the
/// stream closed and every record before the close was received.
///
/// An error ([`Error::OffsetOutOfRange`] once retention overtook a subscriber whose
/// policy is [`OffsetReset::Fail`](super::OffsetReset::Fail), or an `Io` or `Corrupt`
/// error of the store) is the stream's last item: each of them would come back at
/// every poll, and a stream that kept yielding one would spin a `filter_map` that
/// skips errors. To go on, subscribe again from
/// [`position()`](LogSubscriber::position), or with a reset policy. Once ended, the
/// stream stays ended ([`FusedStream`](futures_core::FusedStream)).
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
#[cfg_attr(docsrs, doc(cfg(feature = "futures")))]
impl<S: Store> futures_core::Stream for LogSubscriber<S> {
    type Item = Result<Record>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Record>>> {
        self.get_mut().poll_next_item(cx)
    }
}

/// Ended for good at the close or after an error.
#[cfg_attr(docsrs, doc(cfg(feature = "futures")))]
impl<S: Store> futures_core::FusedStream for LogSubscriber<S> {
    fn is_terminated(&self) -> bool {
        self.stream_ended()
    }
}
