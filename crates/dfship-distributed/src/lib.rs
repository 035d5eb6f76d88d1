//! Python UDFs inline across datafusion-distributed 4.0 stages.
//!
//! - [`encoder`]: the encode-side codec composition that gets past the
//!   codec-ordering trap (read its module docs first).
//! - [`channel`]: the `ChannelResolver`/`WorkerChannel` wrapper that applies it.
//! - [`explain`]: the distributed plan and how its UDFs travel, as text.
//! - [`ffi`]: loading FFI UDFs (shared library or Python capsule), which travel by name.
//! - [`leaf`]: an even split of file scans over tasks (works around an upstream planning error).
//! - [`prebuilt`]: running datafusion-python's serialized logical/physical plans distributed.
//! - [`routing`]: reproducible round-robin task routing.
//! - [`session`]: worker session builder and coordinator context builder.

pub mod channel;
pub mod encoder;
pub mod explain;
pub mod ffi;
pub mod leaf;
pub mod prebuilt;
pub mod routing;
pub mod session;

pub use channel::{encode_stage_plan, ChannelOptions, InlineUdfChannel, InlineUdfChannelResolver};
pub use encoder::{EncoderStats, InlineUdfEncoder};
pub use ffi::load_ffi_udf;
pub use session::{ClusterContextBuilder, InlineUdfs, PythonWorkerSessionBuilder, StaticWorkers};
