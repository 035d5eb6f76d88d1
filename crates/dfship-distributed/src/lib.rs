//! Python UDFs inline across datafusion-distributed 4.0 stages.
//!
//! Modules, one concern each (all private; the surface is the `pub use` list):
//! - `encoder`: the encode-side codec composition that gets past the
//!   codec-ordering trap, and all the encoding the shim does (read its docs first).
//! - `channel`: transport only — the `ChannelResolver`/`WorkerChannel` that
//!   hands plans to the encoder; gRPC channels with timeouts and keepalive.
//! - `worker_errors`: how errors coming back from workers are worded.
//! - `session`: the worker session builder and the coordinator context builder.
//! - `worker_server`: the gRPC server every worker runs, with its layers.
//! - `health`: a worker's HTTP endpoint for operators (/livez, /readyz, /metrics).
//! - `drain`: a worker's graceful drain (probes answered "draining", open tasks counted).
//! - `rpc_auth`: every RPC to a keyed worker proves the cluster key.
//! - `tls`: TLS (rustls) for channels and servers; certificates for local clusters.
//! - `message_limit`: a bound on the messages a channel receives.
//! - `payloads`: large pickles handed to each worker once, across queries
//!   (the worker's payload service and the coordinator's tracker).
//! - `task_lifetime`: stopping a task's Python calls when its query ends.
//! - `prebuilt`: datafusion-python's serialized logical/physical plans, run distributed.
//! - `explain`: the distributed plan and how its UDFs travel, as text.
//! - `ffi`: loading FFI UDFs (shared library or Python capsule), which travel by name.
//! - `leaf`: an even split of file scans over tasks (works around an upstream planning error).
//! - `routing`: reproducible round-robin task routing over the live workers.
//! - `membership`: the coordinator's live view of its workers (probes, losses).
//! - `retry`: a query that lost a worker planned again on the others; staged COPY.
//! - `watch`: a query's timeout and cancellation, and its UDFs' output
//!   brought back to the client.

mod analyze;
mod channel;
mod connection_limit;
mod drain;
mod encoder;
mod explain;
mod ffi;
mod health;
mod leaf;
mod membership;
mod message_limit;
mod object_stores;
mod payloads;
mod prebuilt;
mod progress;
mod query_span;
mod retry;
mod routing;
mod rpc_auth;
mod session;
mod signed_body;
mod staged_copy;
mod task_lifetime;
mod tls;
mod watch;
mod watched_connector;
mod worker_errors;
mod worker_server;

pub use analyze::explain_analyze;
pub use channel::{
    ChannelOptions, InlineUdfChannel, InlineUdfChannelResolver, DEFAULT_MAX_MESSAGE_BYTES,
};
pub use connection_limit::{
    preface_timeouts, refused_connections, refused_connections_per_ip, DEFAULT_MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_IP, PREFACE_TIMEOUT,
};
pub use drain::{Drain, DrainLayer, DrainOptions};
pub use encoder::{EncoderStats, InlineUdfEncoder};
pub use explain::{describe_udfs, explain_plan};
pub use ffi::{load_ffi_udf, SCALAR_UDF_CAPSULE};
pub use health::{
    metrics, refused_health_connections, serve_health, HEALTH_IO_TIMEOUT, HEALTH_MAX_CONNECTIONS,
};
pub use membership::{Membership, MembershipOptions, WorkerHealth, WorkerSource};
pub use object_stores::{runtime_env_with_object_stores, LazyObjectStores, StorageOptions};
pub use payloads::{PayloadServer, PayloadStats, PAYLOAD_SERVICE};
pub use prebuilt::{dataframe_from_logical_bytes, dataframe_from_physical_bytes};
pub use progress::{stages_of, ProgressCallback, QueryProgress, StageProgress};
pub use query_span::{QuerySpanLayer, QUERY_HEADER};
pub use retry::{
    collect, collect_with, collect_with_progress, CollectOptions, QueryRetry, RetryPolicy,
    RetryStats, PROGRESS_INTERVAL,
};
pub use rpc_auth::{
    challenge_endpoint, hello_requests, refused_requests, HelloCounts, RpcAuthLayer,
    RpcAuthenticator, SignedChannel, WorkerId, AUTH_HEADER, HELLO_BURST, HELLO_HEADER, HELLO_PATH,
    HELLO_RATE_PER_SECOND, IDENTITY_CHANGED_HEADER, IDENTITY_HEADER, MAX_CLOCK_SKEW,
};
pub use session::{ClusterContextBuilder, InlineUdfs, PythonWorkerSessionBuilder, StaticWorkers};
pub use task_lifetime::{TaskLifetimeLayer, TASK_ID_HEADER};
pub use tls::{generate_tls_files, write_cluster_key_file, GeneratedTls, TlsConfig};
pub use watch::{print_output_to_stderr, OutputCallback, QueryOptions, UdfOutput, OUTPUT_HEADER};
pub use worker_server::{serve_worker, serve_worker_with_drain, MAX_CONCURRENT_STREAMS};
