//! Framing and the one serde codec of the project.
//!
//! A frame is a 4-byte little-endian length followed by that many bytes of a postcard-encoded
//! message. The codec is chosen here and only here (postcard: maintained, serde-based, a documented
//! stable wire format; see docs/architecture.md), so swapping it touches this file alone.

use crate::error::ProtocolError;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::cell::RefCell;

/// Default upper bound for one frame: room for a 1 GiB argument (model weights, a dataset shard)
/// plus its framing; frames only come from peers that passed mutual TLS, and a garbage length
/// prefix is still refused before anything is allocated for it.
pub const DEFAULT_MAX_FRAME: usize = (1 << 30) + (1 << 20);

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Encode `value` with the project's codec.
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    postcard::to_stdvec(value).map_err(|e| ProtocolError::Malformed { what: "value", reason: e.to_string() })
}

/// Decode a value encoded by [`to_bytes`]. `what` names the expected type in the error.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, ProtocolError> {
    postcard::from_bytes(bytes).map_err(|e| ProtocolError::Malformed { what, reason: e.to_string() })
}

/// Byte fields at least this long (in a [`shared_bytes`] field) are not copied into a frame
/// built by [`frame_chunks`], and a frame at least this long is decoded without copying such
/// fields out of it. Below it, a copy is cheaper than a separate chunk.
pub const SHARED_MIN: usize = 64 * 1024;

thread_local! {
    /// While [`frame_chunks`] encodes: the large [`shared_bytes`] fields met so far.
    static ENCODING: RefCell<Option<Vec<Bytes>>> = const { RefCell::new(None) };
    /// While a frame held as `Bytes` is decoded: that frame, so [`shared_bytes`] fields borrow it.
    static DECODING: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Whether `part` lies inside `whole` (same memory, not equal contents).
fn within(whole: &Bytes, part: &[u8]) -> bool {
    let (start, end) = (whole.as_ptr() as usize, whole.as_ptr() as usize + whole.len());
    let (p, q) = (part.as_ptr() as usize, part.as_ptr() as usize + part.len());
    p >= start && q <= end
}

/// While [`from_shared`] decodes: `part` as a slice of the frame being decoded (no copy), when
/// `part` lies inside it; `None` otherwise (decoding from a plain slice, or bytes from elsewhere).
pub fn shared_slice(part: &[u8]) -> Option<Bytes> {
    DECODING.with(|d| d.borrow().as_ref().filter(|frame| within(frame, part)).map(|frame| frame.slice_ref(part)))
}

/// serde `with` module for large byte fields held as [`Bytes`] (task arguments): the same wire
/// format as `serde_bytes`, but a frame built by [`frame_chunks`] refers to the field instead of
/// copying it, and a large frame decoded by [`FrameDecoder`] lends the field its own memory. A
/// 256 MiB broadcast argument is then encoded once, whatever the number of nodes, and each hop
/// (quinn, the worker, the executor socket) holds one copy, not three.
pub mod shared_bytes {
    use super::{Bytes, ENCODING, SHARED_MIN};
    use serde::{Deserializer, Serializer};

    /// Serialize as bytes; noted for [`super::frame_chunks`] when large.
    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        if bytes.len() >= SHARED_MIN {
            ENCODING.with(|e| {
                if let Some(shared) = e.borrow_mut().as_mut() {
                    shared.push(bytes.clone());
                }
            });
        }
        serializer.serialize_bytes(bytes)
    }

    /// Deserialize bytes, borrowing the frame being decoded when it is held as `Bytes`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_bytes(Visitor)
    }

    struct Visitor;

    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
            Ok(super::shared_slice(v).unwrap_or_else(|| Bytes::copy_from_slice(v)))
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }
    }
}

/// A frame being built by [`frame_chunks`]: owned bytes, and the large shared fields between them.
enum Piece {
    Own(Vec<u8>),
    Shared(Bytes),
}

struct ChunkFlavor {
    pieces: Vec<Piece>,
    current: Vec<u8>,
}

impl postcard::ser_flavors::Flavor for ChunkFlavor {
    type Output = Vec<Piece>;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.current.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if data.len() >= SHARED_MIN {
            let whole = ENCODING.with(|e| e.borrow().as_ref().and_then(|shared| shared.iter().find(|b| within(b, data)).cloned()));
            if let Some(whole) = whole {
                self.pieces.push(Piece::Own(std::mem::take(&mut self.current)));
                self.pieces.push(Piece::Shared(whole.slice_ref(data)));
                return Ok(());
            }
        }
        self.current.extend_from_slice(data);
        Ok(())
    }

    fn finalize(mut self) -> postcard::Result<Vec<Piece>> {
        self.pieces.push(Piece::Own(self.current));
        Ok(self.pieces)
    }
}

/// A frame built by [`frame_chunks`].
#[derive(Debug)]
pub enum Frame {
    /// The whole frame in one buffer (no large shared field: the common, small case).
    Whole(Vec<u8>),
    /// Chunks to write in order; the large shared fields are chunks of their own.
    Chunks(Vec<Bytes>),
}

impl Frame {
    /// The frame as chunks to write in order.
    pub fn into_chunks(self) -> Vec<Bytes> {
        match self {
            Frame::Whole(v) => vec![Bytes::from(v)],
            Frame::Chunks(c) => c,
        }
    }
}

/// One frame holding `message`: large [`shared_bytes`] fields become chunks of their own that
/// share the field's memory (no copy); everything else is copied. A message without such fields
/// gives [`Frame::Whole`], the same bytes as [`frame`].
pub fn frame_chunks<T: Serialize + ?Sized>(message: &T) -> Result<Frame, ProtocolError> {
    ENCODING.with(|e| *e.borrow_mut() = Some(Vec::new()));
    let mut current = Vec::with_capacity(64);
    current.extend_from_slice(&[0; HEADER_LEN]);
    let result = postcard::serialize_with_flavor(message, ChunkFlavor { pieces: Vec::new(), current });
    ENCODING.with(|e| *e.borrow_mut() = None);
    let mut pieces = result.map_err(|e| ProtocolError::Malformed { what: "outgoing", reason: e.to_string() })?;
    let total: usize = pieces
        .iter()
        .map(|p| match p {
            Piece::Own(v) => v.len(),
            Piece::Shared(b) => b.len(),
        })
        .sum();
    let len = total - HEADER_LEN;
    let len32 = u32::try_from(len).map_err(|_| ProtocolError::FrameTooLarge { len, max: u32::MAX as usize })?;
    if let Some(Piece::Own(head)) = pieces.first_mut() {
        head[..HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
    }
    if let [Piece::Own(_)] = pieces.as_slice()
        && let Some(Piece::Own(whole)) = pieces.pop()
    {
        return Ok(Frame::Whole(whole));
    }
    Ok(Frame::Chunks(
        pieces
            .into_iter()
            .filter_map(|p| match p {
                Piece::Own(v) if v.is_empty() => None,
                Piece::Own(v) => Some(Bytes::from(v)),
                Piece::Shared(b) => Some(b),
            })
            .collect(),
    ))
}

/// The frame this thread decodes, for as long as the value lives; then the one decoded before it
/// (a nested decode), also when a `Deserialize` panics: a frame left behind would keep its
/// memory alive on this thread.
struct Decoding(Option<Bytes>);

impl Decoding {
    fn start(frame: &Bytes) -> Self {
        Decoding(DECODING.with(|d| d.borrow_mut().replace(frame.clone())))
    }
}

impl Drop for Decoding {
    fn drop(&mut self) {
        let previous = self.0.take();
        DECODING.with(|d| *d.borrow_mut() = previous);
    }
}

/// Decode `frame` (a frame's payload held as `Bytes`): [`shared_bytes`] fields borrow its memory.
/// A frame shorter than [`SHARED_MIN`] holds no field worth sharing: it is decoded as a slice.
pub fn from_shared<T: DeserializeOwned>(frame: &Bytes, what: &'static str) -> Result<T, ProtocolError> {
    if frame.len() < SHARED_MIN {
        return from_bytes(frame, what);
    }
    let _restore = Decoding::start(frame);
    postcard::from_bytes(frame).map_err(|e| ProtocolError::Malformed { what, reason: e.to_string() })
}

/// Append one frame holding `message` to `out`.
pub fn encode_frame<T: Serialize + ?Sized>(message: &T, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let encoded = postcard::to_extend(message, std::mem::take(out))
        .map_err(|e| ProtocolError::Malformed { what: "outgoing", reason: e.to_string() })?;
    *out = encoded;
    let len = out.len() - start - HEADER_LEN;
    let len32 = u32::try_from(len).map_err(|_| ProtocolError::FrameTooLarge { len, max: u32::MAX as usize })?;
    out[start..start + HEADER_LEN].copy_from_slice(&len32.to_le_bytes());
    Ok(())
}

/// Encode `message` as a single frame.
pub fn frame<T: Serialize + ?Sized>(message: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::with_capacity(64);
    encode_frame(message, &mut out)?;
    Ok(out)
}

/// Reads a frame's announced length from its header, refusing lengths over `max`.
pub fn frame_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(ProtocolError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Incremental frame decoder: push bytes as they arrive, pop whole messages.
///
/// After an error the decoder is poisoned: the stream is out of sync and must be closed.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max: usize,
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder that refuses frames over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), start: 0, max, poisoned: false }
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Change the frame size limit (e.g. raise it once a peer is authenticated).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Take the bytes buffered beyond the frames already returned (for a stream that switches
    /// from frames to raw bytes).
    pub fn take_remaining(&mut self) -> Vec<u8> {
        let rest = self.buf[self.start..].to_vec();
        self.buf.clear();
        self.start = 0;
        rest
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Where the next whole frame's payload lies in `buf`, if one is buffered.
    fn next_range(&mut self) -> Result<Option<std::ops::Range<usize>>, ProtocolError> {
        if self.poisoned {
            return Err(ProtocolError::Malformed { what: "stream", reason: "decoder poisoned by an earlier error".into() });
        }
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let header: [u8; HEADER_LEN] = avail[..HEADER_LEN].try_into().expect("checked length");
        let len = match frame_len(header, self.max) {
            Ok(len) => len,
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        };
        if avail.len() < HEADER_LEN + len {
            // Room for the rest of the frame at once, so a large frame is not regrown.
            let missing = HEADER_LEN + len - avail.len();
            self.buf.reserve(missing);
            return Ok(None);
        }
        let begin = self.start + HEADER_LEN;
        self.start = begin + len;
        Ok(Some(begin..begin + len))
    }

    /// Next whole frame's payload, if one is buffered.
    pub fn next_payload(&mut self) -> Result<Option<&[u8]>, ProtocolError> {
        Ok(self.next_range()?.map(|range| &self.buf[range]))
    }

    /// Next whole frame decoded as `T`.
    ///
    /// A frame of [`SHARED_MIN`] bytes or more is decoded from the buffer handed over as `Bytes`:
    /// its [`shared_bytes`] fields keep that memory instead of a copy (the bytes after the frame,
    /// usually none, are copied into a new buffer).
    pub fn next<T: DeserializeOwned>(&mut self, what: &'static str) -> Result<Option<T>, ProtocolError> {
        let Some(range) = self.next_range()? else { return Ok(None) };
        let decoded = if range.len() >= SHARED_MIN {
            let whole = Bytes::from(std::mem::take(&mut self.buf));
            self.buf = whole[range.end..].to_vec();
            self.start = 0;
            from_shared(&whole.slice(range), what)
        } else {
            postcard::from_bytes(&self.buf[range]).map_err(|e| ProtocolError::Malformed { what, reason: e.to_string() })
        };
        match decoded {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{TaskId, ToWorker};

    #[test]
    fn frames_round_trip_when_split_at_every_byte() {
        let msgs = vec![ToWorker::Heartbeat { seq: 7 }, ToWorker::Ack { task: TaskId(3) }, ToWorker::Shutdown];
        let mut wire = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut wire).unwrap();
        }
        let mut dec = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for b in &wire {
            dec.push(std::slice::from_ref(b));
            while let Some(m) = dec.next::<ToWorker>("ToWorker").unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    fn submit(args: Bytes) -> ToWorker {
        use crate::message::{BinaryHash, TaskKind, TaskSpec};
        let kind = TaskKind::Function { name: "m::f".into(), binary: BinaryHash([1; 32]), args: args.into(), streaming: false };
        ToWorker::Submit { task: TaskId(9), spec: Box::new(TaskSpec { kind, members: None, info: None, initial_credit: 4 }) }
    }

    fn args_of(message: &ToWorker) -> &Bytes {
        match message {
            ToWorker::Submit { spec, .. } => match &spec.kind {
                crate::message::TaskKind::Function { args: crate::message::Args::Inline(args), .. } => args,
                other => panic!("not a function: {other:?}"),
            },
            other => panic!("not a submit: {other:?}"),
        }
    }

    #[test]
    fn large_arguments_are_shared_into_the_frame_and_out_of_it() {
        let args = Bytes::from((0..SHARED_MIN * 3).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let message = submit(args.clone());
        let chunks = frame_chunks(&message).unwrap().into_chunks();
        // Same bytes as the copying encoder, and the arguments are a chunk of their own that is
        // the caller's memory.
        assert_eq!(chunks.concat(), frame(&message).unwrap());
        assert!(chunks.iter().any(|c| c.as_ptr() == args.as_ptr() && c.len() == args.len()), "arguments were copied");

        // Decoded from a buffer of several reads, with a small frame after it.
        let mut wire = chunks.concat();
        encode_frame(&ToWorker::Heartbeat { seq: 1 }, &mut wire).unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        for piece in wire.chunks(40_000) {
            dec.push(piece);
            while let Some(m) = dec.next::<ToWorker>("ToWorker").unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![message, ToWorker::Heartbeat { seq: 1 }]);
        assert_eq!(dec.buffered(), 0);

        // Decoded in place: the arguments are the decoder's own buffer, not a copy out of it.
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&wire);
        let (base, len) = (dec.buf.as_ptr() as usize, dec.buf.len());
        let first = dec.next::<ToWorker>("ToWorker").unwrap().expect("a whole frame");
        let decoded = args_of(&first);
        assert_eq!(decoded, &args);
        let at = decoded.as_ptr() as usize;
        assert!(at >= base && at + decoded.len() <= base + len, "arguments were copied out of the frame");
        assert_eq!(dec.next::<ToWorker>("ToWorker").unwrap(), Some(ToWorker::Heartbeat { seq: 1 }));
    }

    #[test]
    fn small_arguments_make_one_chunk() {
        let message = submit(Bytes::from_static(b"tiny"));
        let Frame::Whole(whole) = frame_chunks(&message).unwrap() else { panic!("small frames are whole") };
        assert_eq!(whole, frame(&message).unwrap());
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&1000u32.to_le_bytes());
        let err = dec.next::<ToWorker>("ToWorker").unwrap_err();
        assert_eq!(err, ProtocolError::FrameTooLarge { len: 1000, max: 16 });
        assert!(dec.next::<ToWorker>("ToWorker").is_err(), "decoder stays poisoned");
    }

    #[test]
    fn garbage_is_a_malformed_error_not_a_panic() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let err = dec.next::<ToWorker>("ToWorker").unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed { what: "ToWorker", .. }), "{err:?}");
    }

    /// Deserializes like `u8`, but panics when it sees 0xff.
    struct Touchy;

    impl<'de> serde::Deserialize<'de> for Touchy {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let b = u8::deserialize(deserializer)?;
            assert_ne!(b, 0xff, "touchy");
            Ok(Touchy)
        }
    }

    #[test]
    fn a_decode_leaves_no_frame_behind_even_when_it_panics() {
        let big = vec![7u8; SHARED_MIN];
        let frame = Bytes::from(to_bytes(&(serde_bytes::Bytes::new(&big), 0xffu8)).unwrap());
        let outcome = std::panic::catch_unwind(|| from_shared::<(serde_bytes::ByteBuf, Touchy)>(&frame, "test"));
        assert!(outcome.is_err(), "the Deserialize panicked");
        assert!(shared_slice(&frame[10..20]).is_none(), "the panicked decode left its frame on the thread");
        assert!(DECODING.with(|d| d.borrow().is_none()));

        // A nested decode puts the outer frame back: the outer decode's later fields still borrow it.
        let inner = Bytes::from(to_bytes(&serde_bytes::Bytes::new(&big)).unwrap());
        let _outer = Decoding::start(&frame);
        let _: serde_bytes::ByteBuf = from_shared(&inner, "inner").unwrap();
        assert!(shared_slice(&frame[10..20]).is_some(), "the nested decode dropped the outer frame");
    }
}
