//! [`Typed`]: values instead of bytes, through a [`Codec`].

use std::marker::PhantomData;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Publish, Subscribe};
use crate::codec::{Bincode, Codec};
use crate::error::{Error, Result};
use crate::record::{Entry, Offset, Record, Timestamp};

/// A publisher or a subscriber that carries values of type `T`, encoded by the codec
/// `C` ([`Bincode`] by default).
///
/// Wrapping a [`Publish`]er gives `publish(key, &value)`; wrapping a [`Subscribe`]r gives
/// `recv()` of [`TypedRecord<T>`]. A record whose payload does not decode as `T` is an
/// [`Error::Codec`] naming its offset, returned for that record alone: the next call
/// goes on with the next record.
///
/// ```
/// use cauce::stream::{MemoryStream, Position, Stream, Typed};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct Move { from: (u8, u8), to: (u8, u8) }
///
/// let stream = MemoryStream::bounded(8)?;
/// let moves: Typed<_, Move> = Typed::new(stream.publisher());
/// let mut board: Typed<_, Move> = Typed::new(stream.subscribe(Position::End)?);
/// moves.publish(b"game-7", &Move { from: (4, 1), to: (4, 3) })?;
/// let got = board.recv()?;
/// assert_eq!((&got.key[..], got.value), (&b"game-7"[..], Move { from: (4, 1), to: (4, 3) }));
/// # Ok::<(), cauce::Error>(())
/// ```
pub struct Typed<X, T, C = Bincode> {
    inner: X,
    codec: C,
    // fn() -> T: a typed wrapper is Send and Sync whatever T is; it holds no T.
    _values: PhantomData<fn() -> T>,
}

/// A decoded record: the record's offset, timestamp and key, and its payload as a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypedRecord<T> {
    /// Where the record stands in its stream.
    pub offset: Offset,
    /// When the record was made, in milliseconds since the Unix epoch.
    pub timestamp: Timestamp,
    /// The routing key.
    pub key: Bytes,
    /// The decoded payload.
    pub value: T,
}

impl<X, T> Typed<X, T, Bincode> {
    /// Wraps `inner` with the default codec.
    pub fn new(inner: X) -> Self {
        Typed::with_codec(inner, Bincode)
    }
}

impl<X, T, C> Typed<X, T, C> {
    /// Wraps `inner` with `codec`.
    pub fn with_codec(inner: X, codec: C) -> Self {
        Typed {
            inner,
            codec,
            _values: PhantomData,
        }
    }

    /// The wrapped publisher or subscriber.
    pub fn get_ref(&self) -> &X {
        &self.inner
    }

    /// The wrapped publisher or subscriber, mutably.
    pub fn get_mut(&mut self) -> &mut X {
        &mut self.inner
    }

    /// Unwraps the publisher or subscriber.
    pub fn into_inner(self) -> X {
        self.inner
    }
}

impl<X: Clone, T, C: Clone> Clone for Typed<X, T, C> {
    fn clone(&self) -> Self {
        Typed::with_codec(self.inner.clone(), self.codec.clone())
    }
}

impl<X: std::fmt::Debug, T, C> std::fmt::Debug for Typed<X, T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("inner", &self.inner)
            .field("type", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

impl<P: Publish, T: Serialize, C: Codec> Typed<P, T, C> {
    /// Encodes `value` and publishes it under `key`, blocking while the stream is full.
    pub fn publish(&self, key: &[u8], value: &T) -> Result<Offset> {
        let payload = self.codec.encode(value)?;
        self.inner.publish(Entry::new(key, &payload))
    }

    /// Encodes `value` and publishes it under `key` if there is room now.
    pub fn try_publish(&self, key: &[u8], value: &T) -> Result<Offset> {
        let payload = self.codec.encode(value)?;
        self.inner.try_publish(Entry::new(key, &payload))
    }

    /// Encodes and publishes `(key, value)` pairs as one batch.
    pub fn publish_batch<'k>(
        &self,
        items: impl IntoIterator<Item = (&'k [u8], &'k T)>,
    ) -> Result<Range<Offset>>
    where
        T: 'k,
    {
        let mut encoded = Vec::new();
        for (key, value) in items {
            encoded.push((key, self.codec.encode(value)?));
        }
        let entries: Vec<Entry<'_>> = encoded
            .iter()
            .map(|(key, payload)| Entry::new(key, payload))
            .collect();
        self.inner.publish_batch(&entries)
    }

    /// Closes the stream; see [`Publish::close`].
    pub fn close(&self) {
        self.inner.close();
    }
}

impl<S: Subscribe, T: DeserializeOwned, C: Codec> Typed<S, T, C> {
    /// The next value, blocking; [`Error::Closed`] at the end.
    pub fn recv(&mut self) -> Result<TypedRecord<T>> {
        let record = self.inner.recv()?;
        self.decode(record)
    }

    /// The next value, waiting at most `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<TypedRecord<T>> {
        let record = self.inner.recv_timeout(timeout)?;
        self.decode(record)
    }

    /// The next value if one is available now.
    pub fn try_recv(&mut self) -> Result<Option<TypedRecord<T>>> {
        match self.inner.try_recv()? {
            Some(record) => self.decode(record).map(Some),
            None => Ok(None),
        }
    }

    /// Commits the wrapped subscriber; see [`Subscribe::commit`].
    pub fn commit(&mut self) -> Result<()> {
        self.inner.commit()
    }

    fn decode(&self, record: Record) -> Result<TypedRecord<T>> {
        let value = self.codec.decode(&record.payload).map_err(|e| match e {
            Error::Codec { context, message } => Error::Codec {
                context,
                message: format!("record at offset {}: {message}", record.offset),
            },
            other => other,
        })?;
        Ok(TypedRecord {
            offset: record.offset,
            timestamp: record.timestamp,
            key: record.key,
            value,
        })
    }
}
