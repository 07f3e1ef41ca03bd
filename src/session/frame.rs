//! Inbound frame reading and validation; outbound frame encoding.

use bytes::{Buf, BufMut, BytesMut};
use rsocket_rust::frame::Frame;
use rsocket_rust::utils::Writeable;
use tokio_util::codec::Decoder;

/// RSocket frame type numbers.
pub mod types {
    /// SETUP
    pub const SETUP: u16 = 0x01;
    /// LEASE
    pub const LEASE: u16 = 0x02;
    /// KEEPALIVE
    pub const KEEPALIVE: u16 = 0x03;
    /// REQUEST_RESPONSE
    pub const REQUEST_RESPONSE: u16 = 0x04;
    /// REQUEST_FNF
    pub const REQUEST_FNF: u16 = 0x05;
    /// REQUEST_STREAM
    pub const REQUEST_STREAM: u16 = 0x06;
    /// REQUEST_CHANNEL
    pub const REQUEST_CHANNEL: u16 = 0x07;
    /// REQUEST_N
    pub const REQUEST_N: u16 = 0x08;
    /// CANCEL
    pub const CANCEL: u16 = 0x09;
    /// PAYLOAD
    pub const PAYLOAD: u16 = 0x0A;
    /// ERROR
    pub const ERROR: u16 = 0x0B;
    /// METADATA_PUSH
    pub const METADATA_PUSH: u16 = 0x0C;
    /// RESUME
    pub const RESUME: u16 = 0x0D;
    /// RESUME_OK
    pub const RESUME_OK: u16 = 0x0E;
    /// EXT
    pub const EXT: u16 = 0x3F;
}

const FLAG_IGNORE: u16 = 0x200;
const FLAG_METADATA: u16 = 0x100;
const FLAG_RESUME_ENABLE: u16 = 0x80;

/// Why a connection's input is refused. Each one closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The frame's structure is invalid.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Reading the socket failed.
    #[error("read error: {0}")]
    Io(String),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e.to_string())
    }
}

/// One validated inbound frame.
#[derive(Debug)]
pub enum Inbound {
    /// A frame rsocket_rust decoded after our validation.
    Frame(Frame),
    /// An extension frame with the IGNORE flag: skipped as the spec says.
    Ignored,
}

fn malformed(msg: impl Into<String>) -> FrameError {
    FrameError::Malformed(msg.into())
}

/// Checks a frame (without its 3-byte length prefix) so that `Frame::decode` cannot panic and the
/// stream-id rules of the spec hold.
pub fn validate(b: &[u8]) -> Result<Option<u16>, FrameError> {
    if b.len() < 6 {
        return Err(malformed(format!(
            "frame of {} bytes is shorter than its 6-byte header",
            b.len()
        )));
    }
    let sid = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if sid & 0x8000_0000 != 0 {
        return Err(malformed("stream id has its reserved high bit set"));
    }
    let tf = u16::from_be_bytes([b[4], b[5]]);
    let (kind, flags) = (tf >> 10, tf & 0x03FF);
    let body = &b[6..];
    let conn_level = |name: &str| {
        if sid != 0 {
            Err(malformed(format!("{name} must be on stream 0, got {sid}")))
        } else {
            Ok(())
        }
    };
    let stream_level = |name: &str| {
        if sid == 0 {
            Err(malformed(format!("{name} on stream 0")))
        } else {
            Ok(())
        }
    };
    let need = |name: &str, n: usize| {
        if body.len() < n {
            Err(malformed(format!(
                "{name} body of {} bytes is shorter than {n}",
                body.len()
            )))
        } else {
            Ok(())
        }
    };
    let payload = |name: &str, rest: &[u8]| {
        if flags & FLAG_METADATA != 0 {
            if rest.len() < 3 {
                return Err(malformed(format!(
                    "{name}: metadata flag set but no metadata length"
                )));
            }
            let mlen = ((rest[0] as usize) << 16) | ((rest[1] as usize) << 8) | rest[2] as usize;
            if mlen > rest.len() - 3 {
                return Err(malformed(format!(
                    "{name}: metadata length {mlen} runs past the frame's end ({} bytes left)",
                    rest.len() - 3
                )));
            }
        }
        Ok(())
    };
    match kind {
        types::SETUP => {
            conn_level("SETUP")?;
            need("SETUP", 12)?;
            let mut rest = &body[12..];
            if flags & FLAG_RESUME_ENABLE != 0 {
                if rest.len() < 2 {
                    return Err(malformed("SETUP: resume token length missing"));
                }
                let tl = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                if rest.len() < 2 + tl {
                    return Err(malformed("SETUP: resume token runs past the frame's end"));
                }
                rest = &rest[2 + tl..];
            }
            for which in ["metadata", "data"] {
                let Some((&l, tail)) = rest.split_first() else {
                    return Err(malformed(format!(
                        "SETUP: {which} MIME type length missing"
                    )));
                };
                if tail.len() < l as usize {
                    return Err(malformed(format!(
                        "SETUP: {which} MIME type runs past the frame's end"
                    )));
                }
                rest = &tail[l as usize..];
            }
            payload("SETUP", rest)?;
        }
        types::LEASE => {
            conn_level("LEASE")?;
            need("LEASE", 8)?;
        }
        types::KEEPALIVE => {
            conn_level("KEEPALIVE")?;
            need("KEEPALIVE", 8)?;
        }
        types::REQUEST_RESPONSE | types::REQUEST_FNF => {
            stream_level("request")?;
            payload("request", body)?;
        }
        types::REQUEST_STREAM | types::REQUEST_CHANNEL => {
            stream_level("request")?;
            need("request", 4)?;
            payload("request", &body[4..])?;
        }
        types::REQUEST_N => {
            stream_level("REQUEST_N")?;
            need("REQUEST_N", 4)?;
            if u32::from_be_bytes([body[0], body[1], body[2], body[3]]) == 0 {
                return Err(malformed("REQUEST_N of 0"));
            }
        }
        types::CANCEL => stream_level("CANCEL")?,
        types::PAYLOAD => {
            stream_level("PAYLOAD")?;
            payload("PAYLOAD", body)?;
        }
        types::ERROR => need("ERROR", 4)?,
        types::METADATA_PUSH => conn_level("METADATA_PUSH")?,
        types::RESUME => {
            conn_level("RESUME")?;
            need("RESUME", 6)?;
            let tl = u16::from_be_bytes([body[4], body[5]]) as usize;
            need("RESUME", 6 + tl + 16)?;
        }
        types::RESUME_OK => {
            conn_level("RESUME_OK")?;
            need("RESUME_OK", 8)?;
        }
        types::EXT if flags & FLAG_IGNORE != 0 => return Ok(None),
        other => return Err(malformed(format!("unknown frame type 0x{other:02X}"))),
    }
    Ok(Some(kind))
}

/// A `tokio_util` decoder: 3-byte length prefix (checked against `max_frame` before the frame is
/// buffered), [`validate`], then rsocket_rust's `Frame::decode`.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A decoder refusing frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame }
    }
}

impl Decoder for FrameCodec {
    type Item = Inbound;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, FrameError> {
        if src.len() < 3 {
            return Ok(None);
        }
        let len = ((src[0] as usize) << 16) | ((src[1] as usize) << 8) | src[2] as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if src.len() < 3 + len {
            src.reserve(3 + len - src.len());
            return Ok(None);
        }
        src.advance(3);
        let mut frame = src.split_to(len);
        match validate(&frame)? {
            None => Ok(Some(Inbound::Ignored)),
            Some(_) => Frame::decode(&mut frame)
                .map(|f| Some(Inbound::Frame(f)))
                .map_err(|e| malformed(e.to_string())),
        }
    }
}

/// The longest frame the 3-byte length prefix can express: 16 MiB − 1 bytes (without the
/// prefix).
pub const MAX_FRAME_LEN: usize = 0xFF_FFFF;

/// A frame whose length does not fit the 3-byte prefix; nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes exceeds the RSocket limit of {MAX_FRAME_LEN} bytes")]
pub struct FrameTooLarge {
    /// Length of the frame (without the prefix).
    pub len: usize,
}

/// Appends `frame` with its 3-byte length prefix to `out`, or writes nothing and returns
/// [`FrameTooLarge`] if its length (every byte: header, metadata length, metadata, data) does
/// not fit the prefix. Returns the bytes appended.
pub fn try_encode_frame(frame: &Frame, out: &mut BytesMut) -> Result<usize, FrameTooLarge> {
    let len = frame.len();
    if len > MAX_FRAME_LEN {
        return Err(FrameTooLarge { len });
    }
    out.reserve(3 + len);
    out.put_uint(len as u64, 3);
    frame.write_to(out);
    Ok(3 + len)
}

/// [`try_encode_frame`] for test clients and tools: a frame too large to express is not written
/// (and is logged), so the stream is never corrupted. The broker uses [`try_encode_frame`].
pub fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    if let Err(e) = try_encode_frame(frame, out) {
        tracing::error!(error = %e, "frame not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rsocket_rust::frame::{Body, Payload, RequestResponse, Setup};
    use std::time::Duration;

    fn framed(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        encode_frame(f, &mut b);
        b
    }

    fn decode_all(mut b: BytesMut, max: usize) -> Result<Vec<Inbound>, FrameError> {
        let mut c = FrameCodec::new(max);
        let mut out = Vec::new();
        while let Some(f) = c.decode(&mut b)? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn round_trips_real_frames() {
        let setup = Setup::builder(0, 0)
            .set_keepalive(Duration::from_secs(20))
            .set_lifetime(Duration::from_secs(90))
            .set_data(Bytes::from_static(b"x"))
            .build();
        let req = RequestResponse::builder(1, 0)
            .set_metadata(Bytes::from_static(b"meta"))
            .set_data(Bytes::from_static(b"data"))
            .build();
        let mut b = framed(&setup);
        b.extend_from_slice(&framed(&req));
        let frames = decode_all(b, 1 << 20).unwrap();
        assert_eq!(frames.len(), 2);
        match &frames[1] {
            Inbound::Frame(f) => assert!(matches!(f.get_body_ref(), Body::RequestResponse(_))),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn partial_input_waits() {
        let f = Payload::builder(3, Frame::FLAG_NEXT)
            .set_data(Bytes::from_static(b"abc"))
            .build();
        let full = framed(&f);
        let mut c = FrameCodec::new(1024);
        let mut b = BytesMut::from(&full[..5]);
        assert!(c.decode(&mut b).unwrap().is_none());
        b.extend_from_slice(&full[5..]);
        assert!(c.decode(&mut b).unwrap().is_some());
    }

    #[test]
    fn refuses_oversize_prefix_before_buffering() {
        let b = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0, 0][..]);
        assert_eq!(
            decode_all(b, 1024).unwrap_err(),
            FrameError::TooLarge {
                len: 0xFF_FFFF,
                max: 1024
            }
        );
    }

    fn raw(sid: u32, kind: u16, flags: u16, body: &[u8]) -> BytesMut {
        let len = 6 + body.len();
        let mut b = BytesMut::new();
        b.put_uint(len as u64, 3);
        b.put_u32(sid);
        b.put_u16((kind << 10) | flags);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn refuses_malformed() {
        let cases = [
            raw(1, 0x30, 0, b""),                                          // unknown type
            raw(1, types::REQUEST_RESPONSE, FLAG_METADATA, &[0, 0, 9, 1]), // metadata past end
            raw(1, types::REQUEST_RESPONSE, FLAG_METADATA, &[0]),          // no metadata length
            raw(0, types::REQUEST_RESPONSE, 0, b"x"),                      // request on stream 0
            raw(1, types::KEEPALIVE, 0, &[0; 8]),                          // keepalive on a stream
            raw(0, types::KEEPALIVE, 0, &[0; 4]),                          // short keepalive
            raw(1, types::REQUEST_N, 0, &[0, 0, 0, 0]),                    // request_n of 0
            raw(0, types::SETUP, 0, &[0; 12]),                             // no mime types
            raw(
                0,
                types::SETUP,
                0,
                &[0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 200, b'a'],
            ), // mime past end
            raw(0, types::RESUME, 0, &[0, 1, 0, 0, 0, 9]),                 // token past end
            raw(0x8000_0001, types::CANCEL, 0, b""),                       // reserved bit
            raw(1, types::EXT, 0, b""),                                    // ext without ignore
        ];
        for (i, c) in cases.into_iter().enumerate() {
            assert!(
                matches!(decode_all(c, 1 << 20), Err(FrameError::Malformed(_))),
                "case {i}"
            );
        }
        let short = {
            let mut b = BytesMut::new();
            b.put_uint(2, 3);
            b.put_u16(0);
            b
        };
        assert!(decode_all(short, 1024).is_err());
    }

    #[test]
    fn every_byte_is_counted_and_oversize_frames_are_not_written() {
        // Payload frame: 6 header + 3 metadata length + metadata + data.
        let meta = Bytes::from(vec![1u8; 1000]);
        let fits = MAX_FRAME_LEN - 6 - 3 - meta.len();
        let f = Payload::builder(1, Frame::FLAG_NEXT)
            .set_metadata(meta.clone())
            .set_data(Bytes::from(vec![7u8; fits]))
            .build();
        let mut out = BytesMut::new();
        assert_eq!(try_encode_frame(&f, &mut out), Ok(3 + MAX_FRAME_LEN));
        assert_eq!(out.len(), 3 + MAX_FRAME_LEN);
        assert_eq!(&out[..3], &[0xFF, 0xFF, 0xFF]);
        let decoded = decode_all(out, MAX_FRAME_LEN).unwrap();
        assert_eq!(decoded.len(), 1);

        let too_big = Payload::builder(1, Frame::FLAG_NEXT)
            .set_metadata(meta)
            .set_data(Bytes::from(vec![7u8; fits + 1]))
            .build();
        let mut out = BytesMut::from(&b"abc"[..]);
        assert_eq!(
            try_encode_frame(&too_big, &mut out),
            Err(FrameTooLarge {
                len: MAX_FRAME_LEN + 1
            })
        );
        assert_eq!(&out[..], b"abc", "nothing written");
        encode_frame(&too_big, &mut out);
        assert_eq!(&out[..], b"abc", "nothing written");
    }

    #[test]
    fn ignorable_extension_is_skipped() {
        let out = decode_all(raw(1, types::EXT, FLAG_IGNORE, b"abcd"), 1024).unwrap();
        assert!(matches!(out[..], [Inbound::Ignored]));
    }

    #[test]
    fn fuzz_never_panics() {
        // A cheap deterministic fuzz: random bytes after a plausible header must never panic.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let mut body = vec![0u8; len];
            for x in body.iter_mut() {
                *x = next() as u8;
            }
            let kind = (next() % 0x40) as u16;
            let flags = (next() % 0x400) as u16;
            let sid = (next() % 3) as u32;
            let _ = decode_all(raw(sid, kind, flags, &body), 1 << 20);
        }
    }
}
