//! [`PythonUdfLogicalCodec`]: the Python UDF codec on the logical side.
//!
//! datafusion-python 55 writes `DFPYUDF` payloads into logical plans too
//! (`DataFrame.logical_plan().to_bytes()`), so reading its logical plans needs
//! a `LogicalExtensionCodec` that hands UDFs to [`PythonUdfCodec`]. Plan
//! nodes and table providers of its own are declined with an error saying
//! what is supported. It sits beside the physical codec as datafusion-python
//! keeps its two Python codecs side by side.

use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::TableReference;
use datafusion::datasource::TableProvider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{AggregateUDF, Extension, LogicalPlan, ScalarUDF, WindowUDF};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::PhysicalExtensionCodec;

use crate::codec::PythonUdfCodec;
use crate::error::UdfPayloadError;

/// Reads and writes Python UDFs (scalar, aggregate, window) in logical plans, with the options of
/// the [`PythonUdfCodec`] it wraps.
///
/// ```
/// use std::sync::Arc;
/// use dfship_codec::{PythonUdfCodec, PythonUdfLogicalCodec};
///
/// let logical = PythonUdfLogicalCodec::new(Arc::new(PythonUdfCodec::default()));
/// ```
#[derive(Debug, Clone)]
pub struct PythonUdfLogicalCodec {
    codec: Arc<PythonUdfCodec>,
    /// The first payload error a UDF decode raised; see
    /// [`PythonUdfLogicalCodec::take_udf_error`].
    udf_error: Arc<Mutex<Option<UdfPayloadError>>>,
}

impl PythonUdfLogicalCodec {
    pub fn new(codec: Arc<PythonUdfCodec>) -> Self {
        Self {
            codec,
            udf_error: Arc::default(),
        }
    }

    pub fn physical(&self) -> &Arc<PythonUdfCodec> {
        &self.codec
    }

    /// The first payload error raised while decoding a UDF, if any, and
    /// forgets it.
    ///
    /// datafusion-proto 55 reads logical expressions through its own error
    /// type, whose `Display` prints a wrapped `DataFusionError` with `{:?}`
    /// (datafusion-proto-common `from_proto::Error`): a refused payload
    /// reaches the caller as `Plan("DataFusion error: External(Unsigned {
    /// name: \"band\" })")`. The caller of a logical decode asks here for
    /// the error as it was raised, with its sentence and kind.
    pub fn take_udf_error(&self) -> Option<UdfPayloadError> {
        self.udf_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

impl PythonUdfLogicalCodec {
    /// `result`, remembering its payload error (see [`Self::take_udf_error`]).
    fn remembered<T>(&self, result: Result<T>) -> Result<T> {
        result.inspect_err(|error| {
            if let Some(refused) = UdfPayloadError::find(error) {
                let mut first = self.udf_error.lock().unwrap_or_else(|p| p.into_inner());
                first.get_or_insert_with(|| refused.clone());
            }
        })
    }
}

fn unsupported(what: &str) -> DataFusionError {
    DataFusionError::NotImplemented(format!(
        "this plan contains {what}, which only datafusion-python itself can decode; plans that \
         run on the cluster read files (Parquet, CSV, JSON) at paths every worker can reach, and \
         call built-in functions and Python scalar, aggregate and window UDFs"
    ))
}

impl LogicalExtensionCodec for PythonUdfLogicalCodec {
    fn try_decode(
        &self,
        _buf: &[u8],
        _inputs: &[LogicalPlan],
        _ctx: &TaskContext,
    ) -> Result<Extension> {
        Err(unsupported("a custom logical plan node"))
    }

    fn try_encode(&self, _node: &Extension, _buf: &mut Vec<u8>) -> Result<()> {
        Err(unsupported("a custom logical plan node"))
    }

    fn try_decode_table_provider(
        &self,
        _buf: &[u8],
        _table_ref: &TableReference,
        _schema: SchemaRef,
        _ctx: &TaskContext,
    ) -> Result<Arc<dyn TableProvider>> {
        Err(unsupported("a custom or in-memory table"))
    }

    fn try_encode_table_provider(
        &self,
        _table_ref: &TableReference,
        _node: Arc<dyn TableProvider>,
        _buf: &mut Vec<u8>,
    ) -> Result<()> {
        Err(unsupported("a custom or in-memory table"))
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> Result<Arc<ScalarUDF>> {
        self.remembered(self.codec.try_decode_udf(name, buf))
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.codec.try_encode_udf(node, buf)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> Result<Arc<AggregateUDF>> {
        self.remembered(self.codec.try_decode_udaf(name, buf))
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.codec.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> Result<Arc<WindowUDF>> {
        self.remembered(self.codec.try_decode_udwf(name, buf))
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.codec.try_encode_udwf(node, buf)
    }
}
