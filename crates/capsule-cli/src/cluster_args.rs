//! How `capsule daemon --nats` and `capsule worker` reach a cluster: one set of options.

use std::path::PathBuf;
use std::time::Duration;

use capsule_cluster::ClusterOptions;
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// A NATS credentials file (JWT and NKey).
    #[arg(long, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// Root certificates (PEM) to trust for TLS to NATS.
    #[arg(long, value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for TLS to NATS; needs `--nats-tls-key`.
    #[arg(long, value_name = "FILE", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The key of `--nats-tls-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS.
    #[arg(long)]
    pub nats_require_tls: bool,
    /// How long a worker may go without a sign of life before its call goes to another worker
    /// (set by the first client that creates the queue).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::run_args::parse_duration)]
    pub ack_wait: Duration,
    /// Calls that may wait in the queue; beyond them, callers wait (set by the first client
    /// that creates the queue).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub queue_limit: i64,
}

impl ClusterArgs {
    pub fn options(&self, url: &str, name: String) -> ClusterOptions {
        ClusterOptions {
            credentials: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_client: self.nats_tls_cert.clone().zip(self.nats_tls_key.clone()),
            require_tls: self.nats_require_tls,
            ack_wait: self.ack_wait,
            queue_limit: self.queue_limit,
            ..ClusterOptions::new(url, name)
        }
    }
}

/// This host's name, for telling workers apart.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "host".into(), |name| name.trim().to_string())
}
