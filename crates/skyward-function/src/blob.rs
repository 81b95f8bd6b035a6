//! [`Blob`]: immutable bytes that large arguments travel in without a copy per hop.

use bytes::Bytes;
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use skyward_proto::codec;
use std::fmt;
use std::ops::{Deref, RangeBounds};

/// Immutable, cheaply cloned bytes for large function arguments (model weights, a dataset shard).
///
/// On the wire a `Blob` is the same as `Vec<u8>` under `serde_bytes` (`serde_bytes::ByteBuf`),
/// so a function can switch between them without changing its callers' encoding. The difference
/// is in the executor: an owned buffer is a copy of the call's arguments, while a `Blob` of 64 KiB
/// or more *refers to them*. Arguments that reached the node through shared memory (a node on the
/// caller's machine) are then read where the caller wrote them, once for every node of a
/// broadcast; arguments that came over the network are read in the buffer they were received in.
/// A `Blob` keeps the buffer it refers to alive: the whole arguments it came with (a shared-memory
/// mapping of the caller's object, or the received frame), not only its own bytes. To keep a
/// large blob past its call without the rest, copy it ([`Blob::copy_from_slice`]).
///
/// ```
/// # use skyward_function::Blob;
/// let weights = Blob::from(vec![1u8, 2, 3]);
/// let again = weights.clone(); // no copy
/// assert_eq!(&again[..], &[1, 2, 3]);
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Blob(Bytes);

impl Blob {
    /// An empty blob.
    pub const fn new() -> Self {
        Self(Bytes::new())
    }

    /// A blob of `data`, copied into memory of its own.
    pub fn copy_from_slice(data: &[u8]) -> Self {
        Self(Bytes::copy_from_slice(data))
    }

    /// A blob of `range` within this one (no copy).
    ///
    /// # Panics
    ///
    /// When `range` does not lie within the blob, like slicing a `[u8]`.
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Self {
        Self(self.0.slice(range))
    }

    /// The bytes as [`bytes::Bytes`] (no copy).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for Blob {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Blob {
    /// Takes the vector's memory (no copy).
    fn from(data: Vec<u8>) -> Self {
        Self(Bytes::from(data))
    }
}

impl From<Bytes> for Blob {
    fn from(data: Bytes) -> Self {
        Self(data)
    }
}

impl From<&'static [u8]> for Blob {
    fn from(data: &'static [u8]) -> Self {
        Self(Bytes::from_static(data))
    }
}

impl From<Blob> for Bytes {
    fn from(blob: Blob) -> Self {
        blob.0
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        codec::shared_bytes::serialize(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_bytes(BlobVisitor)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Blob, E> {
        // Only large blobs refer to the arguments: a small one kept past the call (in an actor's
        // state, say) must not hold a large buffer alive.
        let shared = (v.len() >= codec::SHARED_MIN).then(|| codec::shared_slice(v)).flatten();
        Ok(Blob(shared.unwrap_or_else(|| Bytes::copy_from_slice(v))))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob::copy_from_slice(v))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob::from(v))
    }

    /// Self-describing formats may hand bytes over as a string (as `serde_bytes::ByteBuf` takes).
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Blob, E> {
        Ok(Blob::copy_from_slice(v.as_bytes()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Blob, E> {
        Ok(Blob::from(v.into_bytes()))
    }

    /// Formats without a byte type (JSON) write bytes as a sequence of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Blob::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_is_that_of_serde_bytes() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let ours = codec::to_bytes(&(7u32, Blob::from(data.clone()))).unwrap();
        let theirs = codec::to_bytes(&(7u32, serde_bytes::ByteBuf::from(data.clone()))).unwrap();
        assert_eq!(ours, theirs);
        let (n, back): (u32, Blob) = codec::from_bytes(&theirs, "args").unwrap();
        assert_eq!((n, &back[..]), (7, &data[..]));
    }

    #[test]
    fn a_large_blob_refers_to_the_buffer_it_was_decoded_from() {
        let data: Vec<u8> = (0..codec::SHARED_MIN as u32 + 5).map(|i| (i % 251) as u8).collect();
        let frame = Bytes::from(codec::to_bytes(&(1u8, Blob::from(data.clone()))).unwrap());
        let (_, blob): (u8, Blob) = codec::from_shared(&frame, "args").unwrap();
        assert_eq!(&blob[..], &data[..]);
        let (start, end) = (frame.as_ptr() as usize, frame.as_ptr() as usize + frame.len());
        assert!(blob.as_ptr() as usize >= start && blob.as_ptr() as usize + blob.len() <= end, "the blob was copied");
    }

    #[test]
    fn a_small_blob_or_one_from_a_plain_slice_is_a_copy() {
        let small = Bytes::from(codec::to_bytes(&Blob::from(vec![9u8; 100])).unwrap());
        let blob: Blob = codec::from_shared(&small, "args").unwrap();
        assert_eq!(&blob[..], &[9u8; 100][..]);
        let inside = small.as_ptr() as usize..small.as_ptr() as usize + small.len();
        assert!(!inside.contains(&(blob.as_ptr() as usize)), "a small blob holds the frame");

        let large = codec::to_bytes(&Blob::from(vec![3u8; codec::SHARED_MIN])).unwrap();
        let blob: Blob = codec::from_bytes(&large, "args").unwrap();
        assert_eq!(blob.len(), codec::SHARED_MIN);
        let inside = large.as_ptr() as usize..large.as_ptr() as usize + large.len();
        assert!(!inside.contains(&(blob.as_ptr() as usize)), "a blob borrowed a slice it cannot keep");
    }

    #[test]
    fn formats_without_bytes_round_trip_too() {
        let json = serde_json::to_string(&Blob::from(vec![1u8, 2, 255])).unwrap();
        let back: Blob = serde_json::from_str(&json).unwrap();
        assert_eq!(&back[..], &[1, 2, 255]);
    }
}
