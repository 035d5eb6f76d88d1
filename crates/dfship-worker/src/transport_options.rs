//! [`TransportOptions`]: TLS and message limits of a process's connections,
//! declared once for workers and for the `dfship` CLI's coordinator.

use std::path::PathBuf;

use clap::Args;
use datafusion::error::Result;
use dfship_distributed::{ChannelOptions, TlsConfig, DEFAULT_MAX_MESSAGE_BYTES};

/// TLS and message limits of connections between coordinator and workers.
#[derive(Debug, Clone, Args)]
pub struct TransportOptions {
    /// PEM certificate this process presents: a worker's server certificate
    /// (also presented to other workers it calls), or a coordinator's client
    /// certificate for workers that require one. Needs --tls-key.
    #[arg(long, env = "DFSHIP_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "DFSHIP_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate authority of the cluster: workers' certificates are
    /// verified against it (worker URLs are then https://), and a worker given
    /// it requires clients to present a certificate it signed (mutual TLS).
    #[arg(long, env = "DFSHIP_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The largest gRPC message accepted, either way (stage plans carry the
    /// Python UDF payloads, up to --max-payload-bytes each).
    #[arg(long, env = "DFSHIP_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

impl TransportOptions {
    /// The connection settings these options describe (reads the PEM files).
    pub fn channel_options(&self) -> Result<ChannelOptions> {
        Ok(ChannelOptions {
            max_message_bytes: self.max_message_bytes,
            tls: TlsConfig::from_files(
                self.tls_cert.as_deref(),
                self.tls_key.as_deref(),
                self.tls_ca.as_deref(),
            )?,
            ..ChannelOptions::default()
        })
    }
}
