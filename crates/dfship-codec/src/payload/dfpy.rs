//! `DFPYUDF`, datafusion-python 55's format: the signature lives inside the
//! pickled tuple `(name, func, input_schema, return_schema, volatility)`, so
//! both directions need an interpreter, and decoding unpickles at once.

use bytes::Bytes;
use datafusion::error::Result;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};

use crate::callable;
use crate::error::UdfPayloadError;
use crate::function::PythonFunction;
use crate::options::CodecOptions;
use crate::pickled::{sha256, PickleContent, PickledCallable, PicklerVersions};
use crate::python;
use crate::signature::{volatility_from_str, volatility_str, UdfSignature};
use crate::wire::dfpy::family_name;
use crate::wire::{self, FunctionKind, WireFormat};

/// Pickles `(name, func, input_schema, return_schema, volatility)` behind the `DFPYUDF` header.
pub(crate) fn encode(function: &PythonFunction, _options: &CodecOptions) -> Result<Vec<u8>> {
    let signature = &function.signature;
    let input_schema = signature.input_schema_ipc()?;
    let return_schema = signature.return_schema_ipc()?;
    python::ensure_python()?;
    Python::attach(|py| {
        let func = function.callable.get(py, &signature.name)?;
        let pickle_error = |e: PyErr| UdfPayloadError::Pickle {
            name: signature.name.clone(),
            detail: python::describe_exception(py, &e),
        };
        let mut items = vec![
            PyString::new(py, &signature.name).into_any(),
            func,
            PyBytes::new(py, &input_schema).into_any(),
            PyBytes::new(py, &return_schema).into_any(),
        ];
        if function.kind == FunctionKind::Aggregate {
            items.push(PyBytes::new(py, &signature.state_schema_ipc()?).into_any());
        }
        items.push(PyString::new(py, volatility_str(signature.volatility)).into_any());
        let tuple = PyTuple::new(py, items).map_err(pickle_error)?;
        let pickle = python::dumps(py, tuple.as_any()).map_err(pickle_error)?;
        let local = python::local_versions(py).map_err(pickle_error)?;
        Ok(wire::dfpy::write_frame(
            function.kind,
            local.python_major,
            local.python_minor,
            &pickle,
        ))
    })
}

/// Unpickles the tuple (through the cache) and checks every element.
/// The format has no tag: the codec refuses it when a cluster key is set.
pub(crate) fn decode(name: &str, payload: Bytes, options: &CodecOptions) -> Result<PythonFunction> {
    let header = wire::dfpy::read_header(name, &payload)?;
    let kind = header.kind;
    let (python_major, python_minor) = (header.python_major, header.python_minor);
    let pickle = payload.slice(payload.len() - header.pickle.len()..);
    python::ensure_python()?;
    Python::attach(|py| {
        let local = python::local_versions(py).map_err(|e| UdfPayloadError::Unpickle {
            name: name.to_string(),
            detail: python::describe_exception(py, &e),
        })?;
        // DFPYUDF does not record the cloudpickle version: trust ours.
        let versions = PicklerVersions {
            python_major,
            python_minor,
            cloudpickle_major: local.cloudpickle_major,
        };
        let digest = sha256(&pickle);
        let pickled = PickledCallable::new(
            pickle,
            digest,
            versions,
            PickleContent::DataFusionPythonTuple,
        );
        let tuple = callable::load_pickle(py, options.cache(), &pickled, name)?;
        let (signature, func) = read_tuple(kind, name, &tuple)?;
        let mut function = PythonFunction::live(kind, signature, func)?;
        function.received = Some((WireFormat::DataFusionPython, payload.clone()));
        Ok(function)
    })
}

/// `(name, func, input_schema, return_schema, volatility)`, each checked.
fn read_tuple<'py>(
    kind: FunctionKind,
    name: &str,
    tuple: &Bound<'py, PyAny>,
) -> Result<(UdfSignature, Bound<'py, PyAny>), UdfPayloadError> {
    let malformed = |detail: String| UdfPayloadError::Malformed {
        name: name.to_string(),
        detail,
    };
    let family = family_name(kind);
    let layout = match kind {
        FunctionKind::Scalar => "name, func, input_schema, return_schema, volatility",
        FunctionKind::Aggregate => {
            "name, accumulator, input_schema, return_schema, state_schema, volatility"
        }
        FunctionKind::Window => "name, evaluator, input_schema, return_schema, volatility",
    };
    let arity = layout.split(", ").count();
    let tuple = tuple.cast::<PyTuple>().map_err(|_| {
        malformed(format!(
            "the {family} pickle holds a {} instead of a {arity}-tuple",
            type_name(tuple)
        ))
    })?;
    if tuple.len() != arity {
        return Err(malformed(format!(
            "the {family} tuple has {} elements instead of {arity} ({layout})",
            tuple.len()
        )));
    }
    let item = |index: usize| {
        tuple.get_item(index).map_err(|e| {
            malformed(format!(
                "cannot read element {index} of the {family} tuple: {e}"
            ))
        })
    };
    let wrong_type = |index: usize, expected: &str, found: &Bound<'py, PyAny>| {
        malformed(format!(
            "element {index} of the {family} tuple must be {expected}, found {}",
            type_name(found)
        ))
    };
    let found_name = item(0)?;
    let found_name = found_name
        .cast::<PyString>()
        .map_err(|_| wrong_type(0, "the name (str)", &found_name))?
        .to_string();
    if found_name != name {
        return Err(UdfPayloadError::NameMismatch {
            expected: name.to_string(),
            found: found_name,
        });
    }
    let func = item(1)?;
    if !func.is_callable() {
        return Err(wrong_type(1, "a callable", &func));
    }
    let input_schema = item(2)?;
    let input_schema = input_schema
        .cast::<PyBytes>()
        .map_err(|_| wrong_type(2, "the input schema (bytes)", &input_schema))?;
    let return_schema = item(3)?;
    let return_schema = return_schema
        .cast::<PyBytes>()
        .map_err(|_| wrong_type(3, "the return schema (bytes)", &return_schema))?;
    let volatility = item(arity - 1)?;
    let volatility = volatility
        .cast::<PyString>()
        .map_err(|_| wrong_type(arity - 1, "the volatility (str)", &volatility))?
        .to_string();
    let volatility = volatility_from_str(name, &volatility)?;
    let mut signature = UdfSignature::from_wire(
        name,
        input_schema.as_bytes(),
        return_schema.as_bytes(),
        volatility,
    )?;
    if kind == FunctionKind::Aggregate {
        let state_schema = item(4)?;
        let state_schema = state_schema
            .cast::<PyBytes>()
            .map_err(|_| wrong_type(4, "the state schema (bytes)", &state_schema))?;
        signature = signature.with_state_schema_ipc(state_schema.as_bytes())?;
    }
    Ok((signature, func))
}

fn type_name(object: &Bound<'_, PyAny>) -> String {
    object
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".to_string())
}
