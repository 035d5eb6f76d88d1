//! Loading Python UDF declarations from a file or module.
//!
//! A declaration is any object with a `__dfship_udf__` dict — what the
//! `dfship` Python package's `udf()`, `udaf()` and `udwf()` (function or
//! decorator form) produce: `{"kind": "scalar" | "aggregate" | "window"
//! (absent: scalar), "name", "func" (for aggregates and windows, the
//! accumulator or evaluator factory), "input_types": [pyarrow.DataType],
//! "return_type": pyarrow.DataType | pyarrow.Field, "state_types":
//! [pyarrow.DataType] (aggregates only), "volatility": "immutable" | "stable"
//! | "volatile", and optionally "batch_size", "concurrency", "max_in_flight"
//! (positive integers, see [`CallOptions`])}`. A scalar UDF's "func" may be
//! a class (one instance per runner) or `async`.
//! Functions defined in a file loaded this way belong to no importable
//! module, so cloudpickle ships them by value.

use std::num::{NonZeroU16, NonZeroU32};
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field};
use arrow::pyarrow::FromPyArrow;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{AggregateUDF, ScalarUDF, WindowUDF};
use datafusion::prelude::SessionContext;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::python::{self, describe_exception};
use crate::signature::volatility_from_str;
use crate::{CallOptions, PythonAggregateUdf, PythonScalarUdf, PythonWindowUdf, UdfSignature};

/// A declared Python UDF of any kind.
#[derive(Debug, Clone)]
pub enum PythonUdf {
    Scalar(ScalarUDF),
    Aggregate(AggregateUDF),
    Window(WindowUDF),
}

impl PythonUdf {
    pub fn name(&self) -> &str {
        match self {
            Self::Scalar(udf) => udf.name(),
            Self::Aggregate(udaf) => udaf.name(),
            Self::Window(udwf) => udwf.name(),
        }
    }

    /// Makes it callable by its name in `ctx`'s SQL and DataFrames.
    pub fn register(self, ctx: &SessionContext) {
        match self {
            Self::Scalar(udf) => ctx.register_udf(udf),
            Self::Aggregate(udaf) => ctx.register_udaf(udaf),
            Self::Window(udwf) => ctx.register_udwf(udwf),
        }
    }
}

/// Finds the declarations of a UDF file or module; a module-level
/// `__dfship_environment__ = dfship.Environment(...)` puts them all in that
/// environment (`python/dfship/environment.py`).
const COLLECT: &std::ffi::CStr = c"
seen = set()
found = []
environment = namespace.get('__dfship_environment__')
if environment is not None and not callable(getattr(environment, 'bind', None)):
    raise TypeError('__dfship_environment__ must be a dfship.Environment(py_modules=..., '
                    'working_dir=..., requirements=...), got ' + type(environment).__name__)
for value in list(namespace.values()):
    spec = getattr(value, '__dfship_udf__', None)
    if isinstance(spec, dict) and id(value) not in seen:
        seen.add(id(value))
        found.append(spec if environment is None else environment.bind(spec))
";

/// Runs the Python file at `path` and returns the UDFs it declares.
pub fn load_python_udfs_from_file(path: &Path) -> Result<Vec<PythonUdf>> {
    python::ensure_python()?;
    let shown = path.display().to_string();
    Python::attach(|py| {
        let namespace = py
            .import("runpy")
            .and_then(|runpy| {
                runpy.call_method1(
                    "run_path",
                    (
                        path.to_string_lossy().as_ref(),
                        None::<Py<PyAny>>,
                        "__dfship_udfs__",
                    ),
                )
            })
            .map_err(|e| load_error(&shown, &describe_exception(py, &e)))?;
        collect(py, &namespace, &shown)
    })
}

/// Imports `module` and returns the UDFs it declares at top level.
pub fn load_python_udfs_from_module(module: &str) -> Result<Vec<PythonUdf>> {
    python::ensure_python()?;
    Python::attach(|py| {
        let namespace = py
            .import(module)
            .and_then(|m| m.getattr("__dict__"))
            .map_err(|e| load_error(module, &describe_exception(py, &e)))?;
        collect(py, &namespace, module)
    })
}

fn load_error(source: &str, detail: &str) -> DataFusionError {
    DataFusionError::Plan(format!("cannot load Python UDFs from {source}: {detail}"))
}

fn collect(py: Python<'_>, namespace: &Bound<'_, PyAny>, source: &str) -> Result<Vec<PythonUdf>> {
    let globals = PyDict::new(py);
    globals
        .set_item("namespace", namespace)
        .and_then(|_| py.run(COLLECT, Some(&globals), None))
        .map_err(|e| load_error(source, &describe_exception(py, &e)))?;
    let found = globals
        .get_item("found")
        .ok()
        .flatten()
        .ok_or_else(|| load_error(source, "the declaration scan produced nothing"))?;
    let mut udfs = Vec::new();
    for spec in found
        .try_iter()
        .map_err(|e| load_error(source, &e.to_string()))?
    {
        let spec = spec.map_err(|e| load_error(source, &e.to_string()))?;
        udfs.push(
            declaration(&spec).map_err(|e| load_error(source, &describe_exception(py, &e)))??,
        );
    }
    if udfs.is_empty() {
        return Err(load_error(
            source,
            "it declares no UDF; declare them with `from dfship import udf, udaf, udwf` (function \
             or decorator form)",
        ));
    }
    Ok(udfs)
}

/// The UDF declared by `object`: a `dfship.udf(...)`, `dfship.udaf(...)` or
/// `dfship.udwf(...)` result (anything with a `__dfship_udf__` dict, see the
/// module docs).
pub fn python_udf_from_declaration(object: &Bound<'_, PyAny>) -> Result<PythonUdf> {
    let py = object.py();
    let what = || {
        object
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "the object".to_string())
    };
    let spec = object.getattr("__dfship_udf__").map_err(|_| {
        DataFusionError::Plan(format!(
            "{} is not a UDF declaration; create one with dfship.udf(func, input_types, \
             return_type, volatility), dfship.udaf(...) or dfship.udwf(...)",
            what()
        ))
    })?;
    declaration(&spec).map_err(|e| load_error(&what(), &describe_exception(py, &e)))?
}

/// One `__dfship_udf__` dict to a UDF (outer error: Python; inner: ours).
fn declaration(spec: &Bound<'_, PyAny>) -> PyResult<Result<PythonUdf>> {
    let name: String = spec.get_item("name")?.extract()?;
    let func = spec.get_item("func")?;
    let input_types = spec
        .get_item("input_types")?
        .try_iter()?
        .map(|t| t.and_then(|t| DataType::from_pyarrow_bound(&t)))
        .collect::<PyResult<Vec<_>>>()?;
    let return_type = spec.get_item("return_type")?;
    let return_field = match Field::from_pyarrow_bound(&return_type) {
        Ok(field) => field.with_name(name.clone()),
        // A type: as a nullable field, so an extension type keeps its
        // metadata (a bare DataType would be its storage type only).
        Err(_) => {
            let field = spec
                .py()
                .import("pyarrow")?
                .call_method1("field", (name.as_str(), &return_type))?;
            Field::from_pyarrow_bound(&field)?
        }
    };
    let options = call_options(spec)?;
    let volatility: String = spec.get_item("volatility")?.extract()?;
    let volatility = match volatility_from_str(&name, &volatility) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e.into())),
    };
    let signature = UdfSignature {
        name,
        input_types,
        return_field: Arc::new(return_field),
        volatility,
        state_fields: Vec::new(),
    };
    let kind: String = match spec.get_item("kind") {
        Ok(kind) => kind.extract()?,
        Err(_) => "scalar".to_string(),
    };
    let options = match options {
        Ok(options) => options,
        Err(e) => return Ok(Err(e)),
    };
    Ok(match kind.as_str() {
        "scalar" => PythonScalarUdf::new(signature, func)
            .map(|udf| PythonUdf::Scalar(udf.with_call_options(options).into_scalar_udf())),
        "aggregate" => {
            let state_types = spec
                .get_item("state_types")?
                .try_iter()?
                .map(|t| t.and_then(|t| DataType::from_pyarrow_bound(&t)))
                .collect::<PyResult<Vec<_>>>()?;
            PythonAggregateUdf::new(signature.with_state_types(state_types), func).map(|udaf| {
                PythonUdf::Aggregate(udaf.with_call_options(options).into_aggregate_udf())
            })
        }
        "window" => PythonWindowUdf::new(signature, func)
            .map(|udwf| PythonUdf::Window(udwf.with_call_options(options).into_window_udf())),
        other => Err(DataFusionError::Plan(format!(
            "UDF declaration '{}' has kind '{other}'; expected scalar, aggregate or window",
            signature.name
        ))),
    })
}

/// `batch_size`, `concurrency` and `max_in_flight` of a declaration (each
/// optional, a positive integer).
fn call_options(spec: &Bound<'_, PyAny>) -> PyResult<Result<CallOptions>> {
    let name: String = spec.get_item("name")?.extract()?;
    let number = |key: &str, max: u64| -> PyResult<Result<Option<u64>>> {
        let value = match spec.get_item(key) {
            Ok(value) if !value.is_none() => value,
            _ => return Ok(Ok(None)),
        };
        Ok(match value.extract::<u64>() {
            Ok(n) if n >= 1 && n <= max => Ok(Some(n)),
            _ => Err(DataFusionError::Plan(format!(
                "UDF '{name}': {key} must be an integer from 1 to {max}, got {}",
                value.repr().map(|r| r.to_string()).unwrap_or_default()
            ))),
        })
    };
    let batch_size = match number("batch_size", u64::from(u32::MAX))? {
        Ok(n) => n.and_then(|n| NonZeroU32::new(n as u32)),
        Err(e) => return Ok(Err(e)),
    };
    let concurrency = match number("concurrency", u64::from(u16::MAX))? {
        Ok(n) => n.and_then(|n| NonZeroU16::new(n as u16)),
        Err(e) => return Ok(Err(e)),
    };
    let max_in_flight = match number("max_in_flight", u64::from(u16::MAX))? {
        Ok(n) => n.and_then(|n| NonZeroU16::new(n as u16)),
        Err(e) => return Ok(Err(e)),
    };
    // The environment a context's `py_modules`/`working_dir`/`requirements`
    // make (`dfship/environment.py`): the 32 bytes that name it.
    let environment = match spec.get_item("environment") {
        Ok(value) if !value.is_none() => match value.extract::<Vec<u8>>() {
            Ok(bytes) if bytes.len() == 32 => {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&bytes);
                Some(digest)
            }
            _ => {
                return Ok(Err(DataFusionError::Plan(format!(
                    "UDF '{name}': environment must be the 32-byte SHA-256 of an environment \
                     (as dfship.ClusterContext sets it), got {}",
                    value.repr().map(|r| r.to_string()).unwrap_or_default()
                ))))
            }
        },
        _ => None,
    };
    Ok(Ok(CallOptions {
        batch_size,
        concurrency,
        max_in_flight,
        environment,
    }))
}
