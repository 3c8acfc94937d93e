//! Records: what every stream and store carries.
//!
//! A [`Record`] is an offset, a timestamp, a key and a payload, the payload being opaque
//! bytes (a [`Codec`](crate::Codec) turns typed values into them). An [`Entry`] is the
//! same without the offset: what you hand to a store or a stream, which gives it one.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The position of a record in a stream or store: 0 for the first record, one more for
/// each record after it. Offsets never go back and are never reused; retention and
/// compaction may leave gaps.
pub type Offset = u64;

/// Milliseconds since the Unix epoch.
pub type Timestamp = u64;

/// The current time as a [`Timestamp`]. A clock set before 1970 reads as 0.
pub fn now() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        // Not `as_millis`: its u128 division was a visible part of a submit.
        .map(|d| d.as_secs() * 1000 + u64::from(d.subsec_millis()))
        .unwrap_or(0)
}

/// A record as stored or delivered: an offset, a timestamp, a key and a payload.
///
/// `key` and `payload` are [`Bytes`], so cloning a record, or fanning it out to many
/// subscribers, copies no data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    /// Where the record stands in its stream or store.
    pub offset: Offset,
    /// When the record was made, in milliseconds since the Unix epoch.
    pub timestamp: Timestamp,
    /// The routing key (may be empty).
    pub key: Bytes,
    /// The payload.
    pub payload: Bytes,
}

impl Record {
    /// The record as an [`Entry`], to append or publish it elsewhere with its timestamp.
    pub fn as_entry(&self) -> Entry<'_> {
        Entry {
            timestamp: self.timestamp,
            key: &self.key,
            payload: &self.payload,
        }
    }
}

/// A record to be appended or published: it gets its offset from the store or stream.
///
/// An entry borrows its bytes, so appending copies them once, into the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry<'a> {
    /// When the record was made, in milliseconds since the Unix epoch.
    pub timestamp: Timestamp,
    /// The routing key (may be empty).
    pub key: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> Entry<'a> {
    /// An entry stamped with the current time.
    pub fn new(key: &'a [u8], payload: &'a [u8]) -> Self {
        Entry {
            timestamp: now(),
            key,
            payload,
        }
    }

    /// An entry with an explicit timestamp (replays and tests).
    pub fn with_timestamp(timestamp: Timestamp, key: &'a [u8], payload: &'a [u8]) -> Self {
        Entry {
            timestamp,
            key,
            payload,
        }
    }

    /// This entry as an owned [`Record`] at `offset` (copies the bytes).
    pub fn to_record(&self, offset: Offset) -> Record {
        Record {
            offset,
            timestamp: self.timestamp,
            key: Bytes::copy_from_slice(self.key),
            payload: Bytes::copy_from_slice(self.payload),
        }
    }
}
