//! Length-prefixed messages on a byte stream (a QUIC stream): a u32 little-endian length,
//! then that many bytes of one protobuf message.
//!
//! The length is checked against the caller's limit (normally
//! [`MAX_MESSAGE_BYTES`](crate::limits::MAX_MESSAGE_BYTES)) before a byte of the body is
//! allocated or read, so a hostile peer cannot make the reader allocate more than that.
//! [`frame_len`] is the check alone, for async readers that read the header themselves.

use std::io::{self, Read, Write};

use prost::Message;
use thiserror::Error;

/// Bytes of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// Why a frame could not be written or read.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The peer announced (or we were about to send) a message over the limit: permanent.
    #[error("frame of {len} bytes is over the limit of {max}")]
    Oversized { len: usize, max: usize },
    /// The stream ended inside a frame: the peer went away mid-message.
    #[error("stream ended inside a frame: {got} of {want} {part} bytes")]
    Truncated {
        part: &'static str,
        got: usize,
        want: usize,
    },
    /// The body is not a valid message: permanent.
    #[error("frame body: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The stream failed (transient as far as the protocol is concerned).
    #[error("stream: {0}")]
    Io(#[from] io::Error),
}

/// The body length a frame header announces, if it is within `max`.
pub fn frame_len(header: [u8; HEADER_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    Ok(len)
}

/// Appends `msg` as one frame to `out`.
pub fn encode_frame<M: Message>(msg: &M, max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > max || u32::try_from(len).is_err() {
        return Err(FrameError::Oversized { len, max });
    }
    out.reserve(HEADER_BYTES + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(out)
        .map_err(|e| io::Error::other(format!("encoding a frame: {e}")))?;
    Ok(())
}

/// Writes `msg` as one frame.
pub fn write_frame<M: Message, W: Write>(w: &mut W, msg: &M, max: usize) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_frame(msg, max, &mut buf)?;
    w.write_all(&buf)?;
    Ok(())
}

/// Reads `want` bytes into `buf`; returns how many it got before the end of the stream.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame. `Ok(None)` at a clean end of stream (between frames).
pub fn read_frame<M: Message + Default, R: Read>(
    r: &mut R,
    max: usize,
) -> Result<Option<M>, FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    match read_full(r, &mut header)? {
        0 => return Ok(None),
        HEADER_BYTES => {}
        got => {
            return Err(FrameError::Truncated {
                part: "header",
                got,
                want: HEADER_BYTES,
            })
        }
    }
    let len = frame_len(header, max)?;
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body)?;
    if got < len {
        return Err(FrameError::Truncated {
            part: "body",
            got,
            want: len,
        });
    }
    Ok(Some(M::decode(body.as_slice())?))
}

/// Splits one frame off the front of `buf`: the message and the bytes it took, or
/// `Ok(None)` if `buf` does not hold a whole frame yet.
pub fn decode_frame<M: Message + Default>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(M, usize)>, FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let len = frame_len(*header, max)?;
    let Some(body) = rest.get(..len) else {
        return Ok(None);
    };
    Ok(Some((M::decode(body)?, HEADER_BYTES + len)))
}
