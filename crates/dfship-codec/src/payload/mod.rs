//! The Python work of each inline payload format, one module per format,
//! each with the same shape: `encode(udf, options)` writes the payload for a
//! [`PythonScalarUdf`](crate::PythonScalarUdf), `decode(name, payload,
//! options)` rebuilds one. The byte layouts they fill live in [`crate::wire`];
//! dispatch, strict mode and size limits live in [`crate::codec`].

pub(crate) mod dfpy;
pub(crate) mod inline;
