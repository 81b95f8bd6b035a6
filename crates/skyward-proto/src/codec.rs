//! Framing and the one serde codec of the project.
//!
//! A frame is a 4-byte little-endian length followed by that many bytes of a postcard-encoded
//! message. The codec is chosen here and only here (postcard: maintained, serde-based, a documented
//! stable wire format; see docs/architecture.md), so swapping it touches this file alone.

use crate::error::ProtocolError;
use serde::Serialize;
use serde::de::DeserializeOwned;

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

    /// Next whole frame's payload, if one is buffered.
    pub fn next_payload(&mut self) -> Result<Option<&[u8]>, ProtocolError> {
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
            return Ok(None);
        }
        let begin = self.start + HEADER_LEN;
        self.start = begin + len;
        Ok(Some(&self.buf[begin..begin + len]))
    }

    /// Next whole frame decoded as `T`.
    pub fn next<T: DeserializeOwned>(&mut self, what: &'static str) -> Result<Option<T>, ProtocolError> {
        match self.next_payload()? {
            None => Ok(None),
            Some(payload) => match postcard::from_bytes(payload) {
                Ok(v) => Ok(Some(v)),
                Err(e) => {
                    self.poisoned = true;
                    Err(ProtocolError::Malformed { what, reason: e.to_string() })
                }
            },
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
}
