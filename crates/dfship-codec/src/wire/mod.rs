//! Byte layouts of inline Python UDF payloads.
//!
//! - [`inline`]: `DFSHIPU`, this project's own frame (written by default).
//! - [`dfpy`]: `DFPYUDF` v1, datafusion-python 55's scalar UDF payload (read,
//!   and written on request for receivers that are datafusion-python).

pub mod dfpy;
pub mod inline;
pub(crate) mod reader;

/// Which format the codec writes inline payloads in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireFormat {
    /// `DFSHIPU`: signature outside the pickle, digest, optional HMAC tag.
    #[default]
    Inline,
    /// `DFPYUDF` v1, for plans that datafusion-python 55 must read.
    DataFusionPython,
}

/// Which family a payload belongs to, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Inline,
    DataFusionPython,
    Unknown,
}

pub(crate) fn family_of(bytes: &[u8]) -> Family {
    if bytes.starts_with(inline::INLINE_MAGIC) {
        Family::Inline
    } else if bytes.starts_with(dfpy::DFPY_MAGIC) {
        Family::DataFusionPython
    } else {
        Family::Unknown
    }
}

/// The first bytes of a payload, printable, for error messages.
pub(crate) fn describe_prefix(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    format!("{:?}", head.escape_ascii().to_string())
}
