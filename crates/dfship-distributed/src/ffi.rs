//! Loading FFI scalar UDFs (datafusion-ffi `FFI_ScalarUDF`), which travel by
//! name: every worker and the coordinator load the same UDF themselves.
//!
//! A spec names where the UDF comes from:
//! - `PATH:SYMBOL`: a shared library exporting `extern "C" fn SYMBOL() -> FFI_ScalarUDF`
//!   (PATH contains a `/` or ends in `.so`/`.dylib`);
//! - `MODULE:ATTRIBUTE`: a Python object with a `__datafusion_scalar_udf__()`
//!   method returning a `PyCapsule` named `datafusion_scalar_udf` (the
//!   datafusion-ffi convention of Python packages exporting UDFs).

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::config::Extensions;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion_ffi::udf::FFI_ScalarUDF;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

/// The capsule name datafusion-ffi's Python convention uses.
pub const SCALAR_UDF_CAPSULE: &std::ffi::CStr = c"datafusion_scalar_udf";

/// Loads the FFI UDF named by `spec` (see the module docs).
pub fn load_ffi_udf(spec: &str) -> Result<Arc<ScalarUDF>> {
    let (source, symbol) = spec.rsplit_once(':').ok_or_else(|| {
        DataFusionError::Configuration(format!(
            "FFI UDF spec '{spec}' must be PATH/TO/LIB.so:SYMBOL or python.module:attribute"
        ))
    })?;
    let ffi = if source.contains('/') || source.ends_with(".so") || source.ends_with(".dylib") {
        from_library(spec, source, symbol)?
    } else {
        from_python(spec, source, symbol)?
    };
    let implementation: Arc<dyn ScalarUDFImpl> = (&ffi).into();
    Ok(Arc::new(ScalarUDF::new_from_impl(WithoutConfigExtensions(
        implementation,
    ))))
}

/// Calls an FFI UDF with the session's config extensions removed.
///
/// datafusion-ffi 55 copies every config entry, extensions included (e.g.
/// datafusion-distributed's `distributed.*` keys), into the base options it
/// hands across the boundary, and the library side rebuilds them with
/// `ConfigOptions::set`, which fails on a namespace it does not know
/// ("could not find config namespace for key …"). Base options still cross.
#[derive(Debug)]
struct WithoutConfigExtensions(Arc<dyn ScalarUDFImpl>);

impl PartialEq for WithoutConfigExtensions {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for WithoutConfigExtensions {}

impl std::hash::Hash for WithoutConfigExtensions {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name().hash(state);
    }
}

impl ScalarUDFImpl for WithoutConfigExtensions {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn aliases(&self) -> &[String] {
        self.0.aliases()
    }

    fn signature(&self) -> &Signature {
        self.0.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.0.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.0.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.0.coerce_types(arg_types)
    }

    fn short_circuits(&self) -> bool {
        self.0.short_circuits()
    }

    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if args.config_options.extensions.iter().next().is_some() {
            let mut options = args.config_options.as_ref().clone();
            options.extensions = Extensions::new();
            args.config_options = Arc::new(options);
        }
        self.0.invoke_with_args(args)
    }
}

fn from_library(spec: &str, path: &str, symbol: &str) -> Result<FFI_ScalarUDF> {
    let error = |what: String| {
        DataFusionError::Configuration(format!("cannot load FFI UDF '{spec}': {what}"))
    };
    // SAFETY: loading a library runs its initializers; the operator chose it.
    let library = unsafe { libloading::Library::new(path) }
        .map_err(|e| error(format!("cannot open the shared library ({e})")))?;
    let ffi = {
        // SAFETY: the symbol's type is the documented contract of a spec.
        let export: libloading::Symbol<'_, extern "C" fn() -> FFI_ScalarUDF> =
            unsafe { library.get(symbol.as_bytes()) }
                .map_err(|e| error(format!("the library has no symbol '{symbol}' ({e})")))?;
        export()
    };
    // The UDF's code lives in the library: keep it loaded for the process.
    std::mem::forget(library);
    Ok(ffi)
}

fn from_python(spec: &str, module: &str, attribute: &str) -> Result<FFI_ScalarUDF> {
    dfship_codec::ensure_python()?;
    Python::attach(|py| {
        let error = |what: String| {
            DataFusionError::Configuration(format!("cannot load FFI UDF '{spec}': {what}"))
        };
        let object = py
            .import(module)
            .and_then(|m| m.getattr(attribute))
            .map_err(|e| error(format!("{e}")))?;
        let capsule = object
            .call_method0("__datafusion_scalar_udf__")
            .map_err(|e| {
                error(format!(
                    "{module}.{attribute} does not export a datafusion FFI scalar UDF ({e})"
                ))
            })?;
        let capsule = capsule.cast::<PyCapsule>().map_err(|_| {
            error("__datafusion_scalar_udf__() did not return a PyCapsule".to_string())
        })?;
        let pointer = capsule
            .pointer_checked(Some(SCALAR_UDF_CAPSULE))
            .map_err(|e| {
                error(format!(
                    "the capsule is not named 'datafusion_scalar_udf' ({e})"
                ))
            })?;
        // SAFETY: a capsule of that name holds an FFI_ScalarUDF by convention;
        // cloning goes through its own clone function.
        let ffi = unsafe { pointer.cast::<FFI_ScalarUDF>().as_ref() }.clone();
        Ok(ffi)
    })
}
