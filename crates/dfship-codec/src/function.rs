//! [`PythonFunction`]: what every kind of Python UDF holds — its kind, its
//! signature, its callable (live or pickled), and the payload it arrived in —
//! so the formats in [`crate::payload`] encode and decode all kinds alike.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::error::{DataFusionError, Result};
use pyo3::prelude::*;

use crate::call_options::CallOptions;
use crate::callable::PythonCallable;
use crate::signature::UdfSignature;
use crate::wire::{FunctionKind, WireFormat};

#[derive(Debug, Clone)]
pub(crate) struct PythonFunction {
    pub kind: FunctionKind,
    pub signature: UdfSignature,
    pub callable: Arc<PythonCallable>,
    pub options: CallOptions,
    /// The payload this function was decoded from, if any: re-encoding it
    /// in the same format sends the same bytes.
    pub received: Option<(WireFormat, Bytes)>,
    /// What the runner pool is given to run it (built on first call).
    pub(crate) spec: std::sync::OnceLock<Arc<dfship_runtime::FunctionSpec>>,
    /// The task this instance serves, on a worker (see `task_binding`).
    pub(crate) task: std::sync::OnceLock<dfship_runtime::CancelToken>,
    /// That task's id (its calls' output is kept under its query).
    pub(crate) task_id: std::sync::OnceLock<String>,
}

impl PythonFunction {
    /// A function made in this process from a live Python object, which must
    /// be callable (a function, or for aggregates and windows a factory).
    pub(crate) fn live(
        kind: FunctionKind,
        signature: UdfSignature,
        callable: Bound<'_, PyAny>,
    ) -> Result<Self> {
        if !callable.is_callable() {
            let what = match kind {
                FunctionKind::Scalar => "a callable",
                FunctionKind::Aggregate => "an accumulator class or a function returning one",
                FunctionKind::Window => "a window evaluator class or a function returning one",
            };
            return Err(DataFusionError::Plan(format!(
                "the Python {} UDF '{}' must be given {what}, got an object of type {}",
                kind.describe(),
                signature.name,
                callable
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            )));
        }
        Ok(Self {
            kind,
            signature,
            callable: Arc::new(PythonCallable::from_live(callable)),
            options: CallOptions::default(),
            received: None,
            spec: Default::default(),
            task: Default::default(),
            task_id: Default::default(),
        })
    }

    /// This function, called with `options`.
    pub(crate) fn with_options(self, options: CallOptions) -> Self {
        Self {
            options,
            spec: Default::default(),
            ..self
        }
    }

    /// Binds this instance to a task; the first binding holds.
    pub(crate) fn bind_task(&self, token: &dfship_runtime::CancelToken, id: &str) {
        if self.task.set(token.clone()).is_ok() {
            let _ = self.task_id.set(id.to_string());
        }
    }

    /// The id of the task this instance serves, once bound.
    pub(crate) fn task_id(&self) -> Option<&str> {
        self.task_id.get().map(String::as_str)
    }

    pub(crate) fn received(&self, format: WireFormat) -> Option<&Bytes> {
        self.received
            .as_ref()
            .filter(|(received_format, _)| *received_format == format)
            .map(|(_, bytes)| bytes)
    }

    pub(crate) fn digest(&self) -> Option<[u8; 32]> {
        self.callable.digest().copied()
    }

    /// The shape of an evaluation's answer, sent with the call: an empty
    /// batch whose one field, `result`, is the return field.
    pub(crate) fn answer_shape(&self) -> Result<arrow::array::RecordBatch> {
        let returns = &self.signature.return_field;
        Ok(arrow::array::RecordBatch::try_new(
            Arc::new(arrow::datatypes::Schema::new(vec![returns
                .as_ref()
                .clone()
                .with_name("result")])),
            vec![arrow::array::new_empty_array(returns.data_type())],
        )?)
    }

    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.signature == other.signature
            && self.options == other.options
            && self.callable.same_as(&other.callable)
    }
}

/// What every Python UDF type (`PythonScalarUdf`, `PythonAggregateUdf`,
/// `PythonWindowUdf`) has the same way, given a `function: PythonFunction`
/// field: equality by signature and callable, a hash by signature, and the
/// accessors of its signature, digest and function.
macro_rules! python_function_type {
    ($type:ty) => {
        impl PartialEq for $type {
            fn eq(&self, other: &Self) -> bool {
                self.function.same_as(&other.function)
            }
        }

        impl Eq for $type {}

        impl std::hash::Hash for $type {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.function.signature.hash(state);
            }
        }

        impl $type {
            /// The name, types and volatility it is shipped with.
            pub fn udf_signature(&self) -> &$crate::signature::UdfSignature {
                &self.function.signature
            }

            /// The SHA-256 of the pickled callable, once it has been pickled or received.
            pub fn digest(&self) -> Option<[u8; 32]> {
                self.function.digest()
            }

            pub(crate) fn function(&self) -> &$crate::function::PythonFunction {
                &self.function
            }

            /// How the engine calls it (batch size, concurrency, async calls in flight).
            pub fn call_options(&self) -> $crate::call_options::CallOptions {
                self.function.options
            }

            /// This UDF, called with `options`; they travel with it to every worker.
            pub fn with_call_options(self, options: $crate::call_options::CallOptions) -> Self {
                let function = std::sync::Arc::try_unwrap(self.function)
                    .unwrap_or_else(|shared| (*shared).clone());
                Self::from_function(function.with_options(options))
            }
        }
    };
}

pub(crate) use python_function_type;
