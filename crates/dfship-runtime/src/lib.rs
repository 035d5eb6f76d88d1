//! Where dfship's Python UDFs run: a pool of runner processes (or, in
//! in-process mode, interpreter threads), and the protocol the pool and its
//! runners speak.
//!
//! - [`protocol`]: the one definition of the messages, ops, error classes
//!   and byte layouts (the runner, `runner/dfship_runner.py`, declares the
//!   same numbers; a test holds them to each other).
//! - [`RunnerPool`]: the runners of one process, shared by every query;
//!   callers submit calls and wait for replies. A scheduler task owns all
//!   pool state: placement (idle runners, object affinity, per-function
//!   concurrency caps, async calls sharing a runner), timeouts, cancellation
//!   and replacement of runners that die.
//! - [`Launcher`]: how runners start (a child process, or a thread of this
//!   process's interpreter); [`landlock`]: each runner a Landlock domain of
//!   its own, closed to the files it may not touch (the cluster key);
//!   `confine`: each runner's process group, killed whole, that nothing it
//!   forks can leave.
//!
//! This crate knows nothing of DataFusion or of how a UDF is encoded: the
//! codec (`dfship-codec`) builds the calls and reads the replies.
//!
//! ```no_run
//! use std::sync::Arc;
//! use dfship_runtime::{Launcher, PoolConfig, ProcessSettings, RunnerPool};
//!
//! let pool = RunnerPool::new(PoolConfig::new(
//!     2,
//!     Launcher::Process(ProcessSettings {
//!         python: "python3".into(),
//!         memory_limit: None,
//!         env_remove: Vec::new(),
//!         user: None,
//!     }),
//! ));
//! pool.warm_up().expect("runners start");
//! assert_eq!(pool.stats().alive, 2);
//! ```

mod confine;
pub mod landlock;
mod launch;
mod pool;
pub mod protocol;
mod scheduler;

pub use launch::{
    describe_exit, InProcessRunner, Launcher, ProcessSettings, RunnerUser, RUNNER_SOURCE,
};
pub use pool::{
    CallError, CallSpec, CancelToken, FunctionSpec, Isolation, ObjectCall, OutputSink, PendingCall,
    PoolConfig, PoolStats, Reply, RunnerPool, DEFAULT_CALL_TIMEOUT, DEFAULT_FUNCTION_BUDGET,
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REPLY_BYTES, DEFAULT_REPLY_BYTES_IN_FLIGHT,
};
pub use protocol::{CallOutput, ErrorClass, OutputStream, RunnerVersions, PROTOCOL_VERSION};
