use bytes::Bytes;

use super::CodecErrorKind;

/// A bounds-checked cursor over a message. Every read says what it was reading, so that a short
/// message produces an error naming the field it ends in.
pub(super) struct Reader {
    buf: Bytes,
    pos: usize,
}

type Result<T> = std::result::Result<T, CodecErrorKind>;

impl Reader {
    pub(super) fn new(buf: Bytes) -> Reader {
        Reader { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8]> {
        if self.remaining() < n {
            return Err(CodecErrorKind::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    pub(super) fn i16(&mut self, what: &'static str) -> Result<i16> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn i32(&mut self, what: &'static str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64> {
        Ok(self.u64(what)? as i64)
    }

    /// A slice of the message sharing its buffer (no copy).
    pub(super) fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes> {
        if self.remaining() < n {
            return Err(CodecErrorKind::Truncated(what));
        }
        let s = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(s)
    }

    /// A length-prefixed (Int32) byte string.
    pub(super) fn len_bytes(&mut self, what: &'static str) -> Result<Bytes> {
        let len = self.i32(what)?;
        let n = usize::try_from(len).map_err(|_| CodecErrorKind::NegativeLength { what, len })?;
        self.bytes(n, what)
    }

    pub(super) fn rest(&mut self) -> Bytes {
        let s = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        s
    }

    /// A null-terminated UTF-8 string.
    pub(super) fn cstr(&mut self, what: &'static str) -> Result<String> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(CodecErrorKind::Unterminated(what))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| CodecErrorKind::InvalidUtf8(what))?;
        let s = s.to_owned();
        self.pos += end + 1;
        Ok(s)
    }

    pub(super) fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(CodecErrorKind::TrailingBytes(n)),
        }
    }
}
