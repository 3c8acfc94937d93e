//! Streams: the channels every part of cauce talks through.
//!
//! (Being built: see the streams issue.)
