//! The chunk format (see the docs of `segment`): headers, CRCs, group-record bodies, and the
//! file helpers that write and check them.

use bytes::Bytes;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

pub(super) const MAGIC: u32 = 0x534C_4331;

pub(super) const GROUP_MAGIC: u32 = 0x534C_4731;

/// Chunk header length.
pub const HEADER: usize = 24;

/// Largest chunk body accepted when reading (guards against a corrupt length).
pub(super) const MAX_BODY: usize = 64 * 1024 * 1024;

/// Zeros, written from here.
pub(super) static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

pub(super) fn header_of(
    magic: u32,
    first: u64,
    count: u32,
    body_len: usize,
    body: &[Bytes],
) -> [u8; HEADER] {
    let mut crc = crc32fast::Hasher::new();
    for part in body {
        crc.update(part);
    }
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&magic.to_be_bytes());
    h[4..8].copy_from_slice(&(body_len as u32).to_be_bytes());
    h[8..16].copy_from_slice(&first.to_be_bytes());
    h[16..20].copy_from_slice(&count.to_be_bytes());
    h[20..24].copy_from_slice(&crc.finalize().to_be_bytes());
    h
}

/// Writes the chunk header and its parts with as few `writev` calls as the kernel allows.
pub(super) fn write_all_parts(
    file: &mut File,
    head: &[u8],
    parts: &[Bytes],
) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(head));
    slices.extend(parts.iter().map(|p| IoSlice::new(p)));
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = file.write_vectored(&rest[..rest.len().min(512)])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// The pieces of bytes `from..to` of the chunk `head ++ parts`, each with its offset from
/// `from`.
pub(super) fn chunk_range<'a>(
    head: &'a [u8],
    parts: &'a [Bytes],
    from: usize,
    to: usize,
) -> impl Iterator<Item = (usize, &'a [u8])> {
    let mut at = 0usize;
    std::iter::once(head)
        .chain(parts.iter().map(|p| &p[..]))
        .filter_map(move |part| {
            let (lo, hi) = (at.max(from), (at + part.len()).min(to));
            let piece = (lo < hi).then(|| (lo - from, &part[lo - at..hi - at]));
            at += part.len();
            piece
        })
}

/// Writes bytes `from..to` of the chunk `head ++ parts` at `pos` of `file` (through the page
/// cache).
pub(super) fn write_chunk_range(
    file: &File,
    pos: u64,
    head: &[u8],
    parts: &[Bytes],
    from: usize,
    to: usize,
) -> std::io::Result<()> {
    chunk_range(head, parts, from, to)
        .try_for_each(|(rel, piece)| file.write_all_at(piece, pos + rel as u64))
}

/// A group chunk's body: `name_len u16 | name | record`.
pub(super) fn group_body(name: &str, record: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(2 + name.len() + record.len());
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(record);
    Bytes::from(b)
}

pub(super) fn parse_group_body(body: &[u8]) -> Option<(String, Bytes)> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let name = std::str::from_utf8(body.get(2..2 + n)?).ok()?;
    Some((name.to_string(), Bytes::copy_from_slice(&body[2 + n..])))
}

/// Writes zeros over `from..to` of `file` (not durable until the next sync).
pub(super) fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Whether `from..to` of `file` holds only zeros.
pub(super) fn is_zero(file: &File, from: u64, to: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; ZEROS.len()];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

/// Store time of the messages of the chunk at `pos` (its first record's: every message of a
/// chunk comes from one publish), read without checking the CRC; `None` if it is not a chunk
/// of messages.
pub(super) fn chunk_time(file: &File, pos: u64) -> std::io::Result<Option<u64>> {
    // header | version u8 | count u32 | record_len u32 | crc u32 | timestamp_ms u64
    const AT: usize = 1 + 4 + 4 + 4;
    let mut h = [0u8; HEADER];
    file.read_exact_at(&mut h, pos)?;
    match parse_header(&h) {
        Some(hd) if !hd.group && hd.body_len >= AT + 8 => {
            let mut ts = [0u8; 8];
            file.read_exact_at(&mut ts, pos + (HEADER + AT) as u64)?;
            Ok(Some(u64::from_be_bytes(ts)))
        }
        _ => Ok(None),
    }
}

pub(super) struct Header {
    /// A group record rather than messages.
    pub(super) group: bool,
    pub(super) body_len: usize,
    pub(super) first: u64,
    pub(super) count: u32,
    pub(super) crc: u32,
}

/// Reads the body of the chunk at `pos` into `body`; whether it passes its CRC.
pub(super) fn read_body(
    file: &File,
    pos: u64,
    hd: &Header,
    body: &mut Vec<u8>,
) -> std::io::Result<bool> {
    body.resize(hd.body_len, 0);
    file.read_exact_at(body, pos + HEADER as u64)?;
    Ok(crc32fast::hash(body) == hd.crc)
}

pub(super) fn parse_header(h: &[u8; HEADER]) -> Option<Header> {
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let group = match u32_at(0) {
        MAGIC => false,
        GROUP_MAGIC => true,
        _ => return None,
    };
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[8..16]);
    // Any length: a body longer than can be loaded is skipped whole, not taken for the end of
    // the log (older versions could write group records past `MAX_BODY`).
    Some(Header {
        group,
        body_len: u32_at(4) as usize,
        first: u64::from_be_bytes(first),
        count: u32_at(16),
        crc: u32_at(20),
    })
}

/// Whether the body of the chunk at `pos` passes its CRC, read a piece at a time (for bodies
/// too long to load whole).
pub(super) fn body_crc_ok(file: &File, pos: u64, hd: &Header) -> std::io::Result<bool> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let (mut at, end) = (pos + HEADER as u64, pos + (HEADER + hd.body_len) as u64);
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        crc.update(&buf[..n]);
        at += n as u64;
    }
    Ok(crc.finalize() == hd.crc)
}
