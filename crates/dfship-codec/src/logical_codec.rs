//! [`PythonUdfLogicalCodec`]: the Python UDF codec on the logical side.
//!
//! datafusion-python 55 writes `DFPYUDF` payloads into logical plans too
//! (`DataFrame.logical_plan().to_bytes()`), so reading its logical plans needs
//! a `LogicalExtensionCodec` that hands UDFs to [`PythonUdfCodec`]. Plan
//! nodes and table providers of its own are declined with an error saying
//! what is supported. It sits beside the physical codec as datafusion-python
//! keeps its two Python codecs side by side.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::TableReference;
use datafusion::datasource::TableProvider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Extension, LogicalPlan, ScalarUDF};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::PhysicalExtensionCodec;

use crate::codec::PythonUdfCodec;

/// Reads and writes Python scalar UDFs in logical plans, with the options of
/// the [`PythonUdfCodec`] it wraps.
///
/// ```
/// use std::sync::Arc;
/// use dfship_codec::{PythonUdfCodec, PythonUdfLogicalCodec};
///
/// let logical = PythonUdfLogicalCodec::new(Arc::new(PythonUdfCodec::default()));
/// ```
#[derive(Debug, Clone)]
pub struct PythonUdfLogicalCodec(Arc<PythonUdfCodec>);

impl PythonUdfLogicalCodec {
    pub fn new(codec: Arc<PythonUdfCodec>) -> Self {
        Self(codec)
    }

    pub fn physical(&self) -> &Arc<PythonUdfCodec> {
        &self.0
    }
}

fn unsupported(what: &str) -> DataFusionError {
    DataFusionError::NotImplemented(format!(
        "this plan contains {what}, which only datafusion-python itself can decode; plans that \
         run on the cluster read files (Parquet, CSV, JSON) at paths every worker can reach, and \
         call built-in functions and Python scalar UDFs"
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
        self.0.try_decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> Result<()> {
        self.0.try_encode_udf(node, buf)
    }
}
