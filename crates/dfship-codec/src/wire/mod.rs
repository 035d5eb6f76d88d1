//! Byte layouts of inline Python UDF payloads.
//!
//! - [`inline`]: `DFSHIPU` (scalar), `DFSHIPA` (aggregate), `DFSHIPW`
//!   (window): this project's own frames (written by default).
//! - [`dfpy`]: `DFPYUDF`/`DFPYUDA`/`DFPYUDW` v1, datafusion-python 55's
//!   payloads (read, and written on request for receivers that are
//!   datafusion-python).

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

/// What kind of function a payload holds; each kind has its own magic in
/// both families (`DFSHIPU`/`DFSHIPA`/`DFSHIPW`, `DFPYUDF`/`DFPYUDA`/`DFPYUDW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FunctionKind {
    Scalar,
    Aggregate,
    Window,
}

impl FunctionKind {
    /// "scalar", "aggregate", "window".
    pub fn describe(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Aggregate => "aggregate",
            Self::Window => "window",
        }
    }

    /// "a scalar function", "an aggregate function", "a window function".
    pub fn a_function(self) -> &'static str {
        match self {
            Self::Scalar => "a scalar function",
            Self::Aggregate => "an aggregate function",
            Self::Window => "a window function",
        }
    }

    const ALL: [FunctionKind; 3] = [Self::Scalar, Self::Aggregate, Self::Window];
}

/// Which family a payload belongs to, judged from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Inline(FunctionKind),
    DataFusionPython(FunctionKind),
    Unknown,
}

pub(crate) fn family_of(bytes: &[u8]) -> Family {
    for kind in FunctionKind::ALL {
        if bytes.starts_with(inline::magic(kind)) {
            return Family::Inline(kind);
        }
        if bytes.starts_with(dfpy::magic(kind)) {
            return Family::DataFusionPython(kind);
        }
    }
    Family::Unknown
}

/// The first bytes of a payload, printable, for error messages.
pub(crate) fn describe_prefix(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    format!("{:?}", head.escape_ascii().to_string())
}
