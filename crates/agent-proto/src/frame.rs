//! Framing: how messages and data travel on the byte stream.
//!
//! ```text
//! frame   = len:u32be kind:u8 payload      (len counts kind + payload)
//! kind 1  = control: payload is one JSON message
//! kind 2  = data:    payload is id:u64be channel:u8 bytes
//! ```
//!
//! Decoding never trusts the peer: `len` is checked against
//! [`MAX_FRAME_LEN`] (the largest legal frame: a full data chunk) before
//! anything is allocated, a data frame's bytes against [`MAX_DATA_CHUNK`]
//! and a control payload against [`MAX_CONTROL_LEN`], in both directions,
//! and every malformed frame is a [`FrameError`], never a panic.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest data chunk in one data frame: a sender cuts its streams into
/// chunks of at most this, and a receiver refuses a larger one.
pub const MAX_DATA_CHUNK: usize = 256 * 1024;
/// Largest accepted control (JSON) payload.
pub const MAX_CONTROL_LEN: usize = 256 * 1024;
/// Size of the frame header (`len`).
pub const HEADER_LEN: usize = 4;

const KIND_CONTROL: u8 = 1;
const KIND_DATA: u8 = 2;
const DATA_HEADER_LEN: usize = 9;

/// Largest accepted frame (kind byte plus payload), in bytes: the larger
/// of a full data chunk with its header and a control payload at its cap.
pub const MAX_FRAME_LEN: usize = {
    let data = 1 + DATA_HEADER_LEN + MAX_DATA_CHUNK;
    let control = 1 + MAX_CONTROL_LEN;
    if data > control {
        data
    } else {
        control
    }
};

/// Errors of encoding or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended inside a frame.
    #[error("frame i/o")]
    Io(#[source] io::Error),
    /// A frame (or a data chunk) larger than its cap.
    #[error("frame of {0} bytes is over the limit ({MAX_FRAME_LEN} bytes; data chunks {MAX_DATA_CHUNK})")]
    TooLarge(usize),
    /// A control message larger than its cap.
    #[error("control message of {0} bytes is over the limit of {MAX_CONTROL_LEN} bytes")]
    ControlTooLarge(usize),
    /// A frame without even a kind byte, or a data frame without its header.
    #[error("truncated frame")]
    Truncated,
    /// A kind byte this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A data frame with a channel number this version does not know.
    #[error("unknown data channel {0}")]
    UnknownChannel(u8),
    /// A control payload that is not a valid message.
    #[error("malformed control message")]
    Json(#[source] serde_json::Error),
}

/// The byte streams a data frame can belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    /// Standard input of an exec (host → guest).
    Stdin = 0,
    /// Standard output of an exec, or the TTY's output (guest → host).
    Stdout = 1,
    /// Standard error of an exec (guest → host).
    Stderr = 2,
    /// Contents of the current regular file of a file-tree stream.
    File = 3,
}

impl TryFrom<u8> for Channel {
    type Error = FrameError;
    fn try_from(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            3 => Channel::File,
            n => return Err(FrameError::UnknownChannel(n)),
        })
    }
}

/// A chunk of one byte stream of a request. An empty chunk means end of
/// stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// Id of the request this stream belongs to.
    pub id: u64,
    /// Which stream.
    pub channel: Channel,
    /// The bytes (at most [`MAX_DATA_CHUNK`]).
    pub bytes: Vec<u8>,
}

/// One decoded frame: a control message of type `M` or a data chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<M> {
    /// A JSON control message.
    Control(M),
    /// A data chunk.
    Data(Data),
}

/// Checks a frame header and returns the body length that follows it.
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Truncated);
    }
    Ok(len)
}

/// Decodes a frame body (kind byte and payload, without the length header).
pub fn decode_body<M: DeserializeOwned>(body: &[u8]) -> Result<Frame<M>, FrameError> {
    let (&kind, payload) = body.split_first().ok_or(FrameError::Truncated)?;
    match kind {
        KIND_CONTROL => {
            if payload.len() > MAX_CONTROL_LEN {
                return Err(FrameError::ControlTooLarge(payload.len()));
            }
            serde_json::from_slice(payload)
                .map(Frame::Control)
                .map_err(FrameError::Json)
        }
        KIND_DATA => {
            if payload.len() < DATA_HEADER_LEN {
                return Err(FrameError::Truncated);
            }
            if payload.len() - DATA_HEADER_LEN > MAX_DATA_CHUNK {
                return Err(FrameError::TooLarge(payload.len() - DATA_HEADER_LEN));
            }
            let mut id = [0u8; 8];
            id.copy_from_slice(&payload[..8]);
            let channel = Channel::try_from(payload[8])?;
            Ok(Frame::Data(Data {
                id: u64::from_be_bytes(id),
                channel,
                bytes: payload[DATA_HEADER_LEN..].to_vec(),
            }))
        }
        k => Err(FrameError::UnknownKind(k)),
    }
}

/// Decodes one whole frame (header included) from the start of `buf`.
/// Returns `Ok(None)` when `buf` does not hold a whole frame yet, otherwise
/// the frame and how many bytes it used. Pure: the entry point for fuzzing.
pub fn decode<M: DeserializeOwned>(buf: &[u8]) -> Result<Option<(Frame<M>, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(&buf[..HEADER_LEN]);
    let len = body_len(header)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, HEADER_LEN + len)))
}

/// Encodes a control message as a frame.
pub fn encode_control<M: Serialize>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    out.push(KIND_CONTROL);
    serde_json::to_writer(&mut out, msg).map_err(FrameError::Json)?;
    let payload = out.len() - HEADER_LEN - 1;
    if payload > MAX_CONTROL_LEN {
        return Err(FrameError::ControlTooLarge(payload));
    }
    finish(out)
}

/// Encodes a data chunk as a frame. `bytes` must be at most
/// [`MAX_DATA_CHUNK`] long.
pub fn encode_data(id: u64, channel: Channel, bytes: &[u8]) -> Result<Vec<u8>, FrameError> {
    if bytes.len() > MAX_DATA_CHUNK {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + 1 + DATA_HEADER_LEN + bytes.len());
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.push(KIND_DATA);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(channel as u8);
    out.extend_from_slice(bytes);
    finish(out)
}

fn finish(mut out: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads one frame from a blocking stream. `Ok(None)` on a clean end of
/// stream before the first header byte.
pub fn read_frame<M: DeserializeOwned, R: Read>(r: &mut R) -> Result<Option<Frame<M>>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = body_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(FrameError::Io)?;
    decode_body(&body).map(Some)
}

/// Writes one already-encoded frame to a blocking stream.
pub fn write_frame<W: Write>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame).map_err(FrameError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn control_round_trip() {
        let f = encode_control(&serde_json::json!({"type": "ping"})).unwrap();
        let (frame, used) = decode::<Value>(&f).unwrap().unwrap();
        assert_eq!(used, f.len());
        assert_eq!(frame, Frame::Control(serde_json::json!({"type": "ping"})));
    }

    #[test]
    fn data_round_trip_and_partial_input() {
        let f = encode_data(42, Channel::Stderr, b"hello").unwrap();
        for cut in 0..f.len() {
            assert!(decode::<Value>(&f[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let (frame, _) = decode::<Value>(&f).unwrap().unwrap();
        let want = Data {
            id: 42,
            channel: Channel::Stderr,
            bytes: b"hello".to_vec(),
        };
        assert_eq!(frame, Frame::Data(want));
    }

    #[test]
    fn rejects_oversized_header_before_allocating() {
        let mut buf = (u32::MAX).to_be_bytes().to_vec();
        buf.push(KIND_DATA);
        assert!(matches!(
            decode::<Value>(&buf),
            Err(FrameError::TooLarge(_))
        ));
        let mut r = io::Cursor::new(buf);
        assert!(matches!(
            read_frame::<Value, _>(&mut r),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn rejects_bad_kind_channel_and_truncation() {
        let table: &[(&[u8], &str)] = &[
            (&[0, 0, 0, 0], "truncated"),
            (&[0, 0, 0, 1, 9], "unknown frame kind"),
            (&[0, 0, 0, 3, 2, 0, 0], "truncated"),
            (
                &[0, 0, 0, 10, 2, 0, 0, 0, 0, 0, 0, 0, 1, 7],
                "unknown data channel",
            ),
            (&[0, 0, 0, 3, 1, b'{', b'x'], "malformed"),
        ];
        for (input, want) in table {
            let err = decode::<Value>(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn data_frames_over_the_documented_chunk_are_refused_both_ways() {
        // A peer-built data frame one byte over MAX_DATA_CHUNK: the frame
        // cap alone (1 MiB before) let it through.
        let mut f = Vec::new();
        let len = 1 + DATA_HEADER_LEN + MAX_DATA_CHUNK + 1;
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.push(KIND_DATA);
        f.extend_from_slice(&7u64.to_be_bytes());
        f.push(Channel::Stdout as u8);
        f.resize(HEADER_LEN + len, 0xab);
        assert!(
            matches!(decode::<Value>(&f), Err(FrameError::TooLarge(_))),
            "decode"
        );
        let mut r = io::Cursor::new(f.clone());
        assert!(matches!(
            read_frame::<Value, _>(&mut r),
            Err(FrameError::TooLarge(_))
        ));
        // The largest legal chunk still goes through.
        let ok = encode_data(7, Channel::Stdin, &vec![1u8; MAX_DATA_CHUNK]).unwrap();
        let (frame, used) = decode::<Value>(&ok).unwrap().unwrap();
        assert_eq!(used, ok.len());
        assert!(matches!(frame, Frame::Data(d) if d.bytes.len() == MAX_DATA_CHUNK));
        // A frame larger than any legal one is refused from its header,
        // before its body is read or allocated.
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(body_len(header), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn control_messages_keep_their_own_cap() {
        let big = "x".repeat(MAX_CONTROL_LEN);
        let err = encode_control(&serde_json::json!({ "pad": big })).unwrap_err();
        assert!(err.to_string().contains("control message"), "{err}");
        let fits = "x".repeat(MAX_CONTROL_LEN - 16);
        let f = encode_control(&serde_json::json!({ "p": fits })).unwrap();
        assert!(decode::<Value>(&f).unwrap().is_some());
    }

    #[test]
    fn refuses_to_encode_oversized_chunk() {
        let big = vec![0u8; MAX_DATA_CHUNK + 1];
        assert!(encode_data(1, Channel::Stdout, &big).is_err());
    }

    #[test]
    fn read_frame_reports_clean_eof_and_midframe_eof() {
        let mut empty = io::Cursor::new(Vec::new());
        assert!(read_frame::<Value, _>(&mut empty).unwrap().is_none());
        let f = encode_data(1, Channel::Stdout, b"abc").unwrap();
        let mut cut = io::Cursor::new(f[..f.len() - 1].to_vec());
        assert!(matches!(
            read_frame::<Value, _>(&mut cut),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in for the fuzz target: every prefix of a few
        // pseudo-random buffers decodes to a value or an error.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut buf = Vec::new();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            if buf.len() >= 4 {
                buf[0] = 0;
                buf[1] = 0;
            }
            let _ = decode::<Value>(&buf);
            x = x.wrapping_add(1);
        }
    }
}
