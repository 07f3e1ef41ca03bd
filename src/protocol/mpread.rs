//! A small MessagePack reader for hand-written decoders of hot messages (the broker's `publish`
//! requests, the SDK's delivered batches): it reads only the forms our encoders write, cuts
//! `bin` values out of the frame without copying, and answers `None` for anything else, so
//! the caller can leave that input to serde, which decides.

use bytes::Bytes;
use std::collections::BTreeMap;

/// A cursor over one frame.
pub struct Reader<'a> {
    frame: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `frame`.
    pub fn new(frame: &'a Bytes) -> Self {
        Reader { frame, pos: 0 }
    }

    /// Whether every byte was read.
    pub fn at_end(&self) -> bool {
        self.pos == self.frame.len()
    }

    /// The frame's length, for capping reservations made from counts read.
    pub fn remaining(&self) -> usize {
        self.frame.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let frame: &'a [u8] = self.frame;
        let bytes = frame.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn byte(&mut self) -> Option<u8> {
        let b = *self.frame.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// A length after a marker: `fix` forms carry it in the marker's low bits.
    fn len(&mut self, marker: u8) -> Option<usize> {
        match marker {
            // fixmap, fixarray
            0x80..=0x9f => Some(usize::from(marker & 0x0f)),
            0xa0..=0xbf => Some(usize::from(marker & 0x1f)),
            0xc4 | 0xd9 => self.byte().map(usize::from),
            0xc5 | 0xda | 0xdc | 0xde => Some(usize::from(u16::from_be_bytes(self.be()?))),
            0xc6 | 0xdb | 0xdd | 0xdf => usize::try_from(u32::from_be_bytes(self.be()?)).ok(),
            _ => None,
        }
    }

    /// A map header: its number of entries.
    pub fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            m @ (0x80..=0x8f | 0xde | 0xdf) => self.len(m),
            _ => None,
        }
    }

    /// An array header: its number of items.
    pub fn array_len(&mut self) -> Option<usize> {
        match self.byte()? {
            m @ (0x90..=0x9f | 0xdc | 0xdd) => self.len(m),
            _ => None,
        }
    }

    /// An array whose items `item` reads, each taking more than 8 bytes (so a bogus count
    /// cannot reserve much).
    pub fn array_of<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let n = self.array_len()?;
        let mut list = Vec::with_capacity(n.min(self.remaining() / 8));
        for _ in 0..n {
            list.push(item(self)?);
        }
        Some(list)
    }

    /// A `str`'s raw bytes (not checked as UTF-8: for comparing field names).
    pub fn str_bytes(&mut self) -> Option<&'a [u8]> {
        let n = match self.byte()? {
            m @ (0xa0..=0xbf | 0xd9..=0xdb) => self.len(m)?,
            _ => return None,
        };
        self.take(n)
    }

    /// A `str` as a `String`.
    pub fn string(&mut self) -> Option<String> {
        std::str::from_utf8(self.str_bytes()?)
            .ok()
            .map(str::to_owned)
    }

    /// `nil` (read) or a `str`.
    pub fn opt_string(&mut self) -> Option<Option<String>> {
        if self.frame.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            Some(None)
        } else {
            self.string().map(Some)
        }
    }

    /// `nil` (read) or a `str`, as a slice of the frame (no copy).
    pub fn opt_shared_str(&mut self) -> Option<Option<crate::SharedStr>> {
        if self.frame.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            return Some(None);
        }
        let n = self.str_bytes()?.len();
        let start = self.pos.checked_sub(n)?;
        crate::SharedStr::from_utf8(self.frame.slice(start..self.pos))
            .ok()
            .map(Some)
    }

    /// A non-negative integer.
    pub fn uint(&mut self) -> Option<u64> {
        Some(match self.byte()? {
            b @ 0x00..=0x7f => u64::from(b),
            0xcc => u64::from(self.byte()?),
            0xcd => u64::from(u16::from_be_bytes(self.be()?)),
            0xce => u64::from(u32::from_be_bytes(self.be()?)),
            0xcf => u64::from_be_bytes(self.be()?),
            _ => return None,
        })
    }

    /// A `bin` value, as a slice of the frame (no copy).
    pub fn bin(&mut self) -> Option<Bytes> {
        let n = match self.byte()? {
            m @ 0xc4..=0xc6 => self.len(m)?,
            _ => return None,
        };
        let start = self.pos;
        self.take(n)?;
        Some(self.frame.slice(start..start + n))
    }

    /// A map of `str` to `str`; `None` for a repeated name too (let serde decide what that
    /// means).
    pub fn headers(&mut self) -> Option<BTreeMap<String, String>> {
        let mut headers = BTreeMap::new();
        for _ in 0..self.map_len()? {
            let name = self.string()?;
            let value = self.string()?;
            if headers.insert(name, value).is_some() {
                return None;
            }
        }
        Some(headers)
    }
}

/// Sets `slot` once: `None` (give up) for a repeated field or a value that did not read.
pub fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}
