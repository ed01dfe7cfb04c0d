//! `weftd`: the weft control plane binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "weftd",
    version,
    about = "weft control plane: Istio config in, Envoy xDS out"
)]
struct Args {
    /// Folder of Kubernetes/Istio YAML (universal mode); watched and reloaded on change.
    #[arg(long, env = "WEFTD_CONFIG_DIR")]
    config_dir: PathBuf,
    /// Address of the plaintext ADS server (istiod's port 15010).
    #[arg(long, default_value = "0.0.0.0:15010")]
    xds_address: SocketAddr,
    /// Address of the monitoring/debug endpoints (istiod's port 15014).
    #[arg(long, default_value = "0.0.0.0:15014")]
    debug_address: SocketAddr,
    /// How often the config folder is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let opts = weft_control_plane::Options {
            config_dir: args.config_dir,
            xds_address: args.xds_address,
            debug_address: args.debug_address,
            poll_interval: Duration::from_millis(args.poll_ms.max(10)),
        };
        tokio::select! {
            r = weft_control_plane::run(opts) => r,
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted, shutting down"); Ok(()) }
        }
    })
}

fn init_tracing(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
