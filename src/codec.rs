//! Codecs: typed values to and from payload bytes.
//!
//! Stores and streams carry bytes; a [`Codec`] is how typed layers (typed publishers,
//! handlers' requests, responses and states) turn values into those bytes and back. The
//! default is [`Bincode`] (bincode 1.3.3 through serde). Any other serde format can take
//! its place by implementing the two methods.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Turns typed values into payload bytes and back.
///
/// A codec must be deterministic: the same value encodes to the same bytes, and
/// `decode(encode(v)) == v`. Bytes a codec cannot decode are an [`Error::Codec`], never a
/// panic (but see [`Bincode`]'s limits for two shapes of type).
pub trait Codec: Send + Sync + 'static {
    /// Appends the encoding of `value` to `out`.
    fn encode_into<T: Serialize + ?Sized>(&self, value: &T, out: &mut Vec<u8>) -> Result<()>;

    /// Decodes a value from exactly `bytes`.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T>;

    /// The encoding of `value` as a new vector.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_into(value, &mut out)?;
        Ok(out)
    }
}

/// The default codec: bincode 1.3.3 with its default (fixed-width, little-endian)
/// options, through serde.
///
/// Decoding refuses trailing bytes and any length prefix larger than the input, so
/// garbage cannot make it allocate more than the input's size. Two shapes of type are
/// beyond what bincode 1 can check, and matter only for bytes from outside (every
/// payload the crate writes itself is checksummed, and decodes as it was encoded):
/// - a recursive type (`enum List { Nil, Cons(Box<List>) }`) nests once per few bytes
///   of input, with no depth limit: a few megabytes of crafted bytes overflow the
///   decoding thread's stack, which aborts the process;
/// - a collection of zero-sized values (`Vec<()>`, `Vec<PhantomData<T>>`) reads no
///   bytes per element, so a crafted length of 2^64 loops for that long.
///
/// To decode such types from untrusted bytes, implement [`Codec`]'s two methods over a
/// format that bounds nesting (`serde_json` stops at a depth of 128), or check the
/// bytes before they reach the typed layer.
///
/// ```
/// use cauce::{Bincode, Codec};
/// let bytes = Bincode.encode(&("alice", 3u32)).unwrap();
/// let back: (String, u32) = Bincode.decode(&bytes).unwrap();
/// assert_eq!(back, ("alice".to_string(), 3));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bincode;

impl Codec for Bincode {
    fn encode_into<T: Serialize + ?Sized>(&self, value: &T, out: &mut Vec<u8>) -> Result<()> {
        bincode::serialize_into(out, value).map_err(|e| Error::Codec {
            context: "encode",
            message: e.to_string(),
        })
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        use bincode::Options;
        // The same encoding as `bincode::deserialize`, plus two checks it lacks: no
        // trailing bytes, and no length prefix larger than the input (so garbage cannot
        // make it allocate gigabytes).
        bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .with_limit(bytes.len() as u64)
            .deserialize(bytes)
            .map_err(|e| Error::Codec {
                context: "decode",
                message: bincode_message(&e),
            })
    }
}

/// What went wrong in bincode's words, but for running out of bytes: bincode reads from
/// a slice that ends as an I/O error whose message is empty ("io error: ").
fn bincode_message(e: &bincode::Error) -> String {
    match &**e {
        bincode::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the bytes end before the value does (cut short, or written as another type)"
                .to_string()
        }
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let v = vec![(1u64, "a".to_string()), (2, "bb".to_string())];
        let bytes = Bincode.encode(&v).unwrap();
        let back: Vec<(u64, String)> = Bincode.decode(&bytes).unwrap();
        assert_eq!(back, v);
        let err = Bincode
            .decode::<Vec<(u64, String)>>(&[0xff; 9])
            .unwrap_err();
        assert!(matches!(err, Error::Codec { .. }), "{err}");
    }

    #[test]
    fn bytes_that_end_too_soon_say_so() {
        let bytes = Bincode.encode(&(1u64, 2u64)).unwrap();
        let err = Bincode.decode::<(u64, u64)>(&bytes[..12]).unwrap_err();
        assert!(
            err.to_string()
                .contains("the bytes end before the value does"),
            "{err}"
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = Bincode.encode(&7u32).unwrap();
        bytes.push(0);
        assert!(Bincode.decode::<u32>(&bytes).is_err());
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // A vector claiming u64::MAX elements in 8 bytes of input.
        let bytes = u64::MAX.to_le_bytes();
        assert!(Bincode.decode::<Vec<u8>>(&bytes).is_err());
    }
}
