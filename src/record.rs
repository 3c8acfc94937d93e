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

/// `time` as a [`Timestamp`] (milliseconds since the Unix epoch, rounded down); a time
/// before 1970 is 0, and one past the year 584 million `u64::MAX`.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use cauce::record::{system_time, timestamp_of};
///
/// let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
/// assert_eq!(timestamp_of(t), 1_700_000_000_123);
/// assert_eq!(system_time(1_700_000_000_123), t);
/// ```
pub fn timestamp_of(time: SystemTime) -> Timestamp {
    time.duration_since(UNIX_EPOCH).map(millis).unwrap_or(0)
}

/// `d` in whole milliseconds, `u64::MAX` for a duration longer than that: what a
/// duration of an option adds to or takes from a [`Timestamp`].
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The [`SystemTime`] a [`Timestamp`] stands for (the Unix epoch plus that many
/// milliseconds; the latest time the platform can hold for one beyond it).
pub fn system_time(timestamp: Timestamp) -> SystemTime {
    let since = std::time::Duration::from_millis(timestamp);
    UNIX_EPOCH
        .checked_add(since)
        .unwrap_or_else(|| latest_system_time(since))
}

/// The latest [`SystemTime`] at or before `UNIX_EPOCH + since`: halves the step until
/// it fits (a platform's `SystemTime` can be narrower than `u64` milliseconds).
fn latest_system_time(since: std::time::Duration) -> SystemTime {
    let mut at = UNIX_EPOCH;
    let mut step = since;
    while !step.is_zero() {
        match at.checked_add(step) {
            Some(next) => at = next,
            None => step /= 2,
        }
    }
    at
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
    /// The record's [`timestamp`](Record::timestamp) as a [`SystemTime`].
    pub fn time(&self) -> SystemTime {
        system_time(self.timestamp)
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_and_system_times_convert_both_ways_at_the_edges() {
        assert_eq!(timestamp_of(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(system_time(0), UNIX_EPOCH);
        for t in [1, 1_700_000_000_123, u64::MAX / 2, u64::MAX] {
            assert_eq!(timestamp_of(system_time(t)), t, "{t}");
        }
        let late = latest_system_time(Duration::from_millis(u64::MAX));
        assert_eq!(timestamp_of(late), u64::MAX);
    }
}
