//! A bounds-checked cursor over untrusted payload bytes: every read names what
//! it was reading, so truncation at any offset is a precise error, never a panic.

use crate::error::UdfPayloadError;

pub(crate) struct FrameReader<'n, 'a> {
    udf_name: &'n str,
    bytes: &'a [u8],
    offset: usize,
}

impl<'n, 'a> FrameReader<'n, 'a> {
    pub(crate) fn new(udf_name: &'n str, bytes: &'a [u8]) -> Self {
        Self {
            udf_name,
            bytes,
            offset: 0,
        }
    }

    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    pub(crate) fn take(
        &mut self,
        what: &'static str,
        len: usize,
    ) -> Result<&'a [u8], UdfPayloadError> {
        let available = self.bytes.len() - self.offset;
        if len > available {
            return Err(UdfPayloadError::Truncated {
                name: self.udf_name.to_string(),
                what,
                offset: self.offset,
                needed: len,
                available,
            });
        }
        let slice = &self.bytes[self.offset..self.offset + len];
        self.offset += len;
        Ok(slice)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, UdfPayloadError> {
        Ok(self.take(what, 1)?[0])
    }

    pub(crate) fn u16_le(&mut self, what: &'static str) -> Result<u16, UdfPayloadError> {
        let bytes = self.take(what, 2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn u32_le(&mut self, what: &'static str) -> Result<u32, UdfPayloadError> {
        let bytes = self.take(what, 4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], UdfPayloadError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }

    /// A `u32` little-endian length followed by that many bytes.
    pub(crate) fn length_prefixed(
        &mut self,
        what: &'static str,
    ) -> Result<&'a [u8], UdfPayloadError> {
        let len = self.u32_le(what)? as usize;
        self.take(what, len)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.offset..];
        self.offset = self.bytes.len();
        rest
    }

    pub(crate) fn expect_end(&self) -> Result<(), UdfPayloadError> {
        let trailing = self.bytes.len() - self.offset;
        if trailing == 0 {
            Ok(())
        } else {
            Err(UdfPayloadError::Malformed {
                name: self.udf_name.to_string(),
                detail: format!(
                    "{trailing} unexpected trailing bytes after offset {}",
                    self.offset
                ),
            })
        }
    }
}
