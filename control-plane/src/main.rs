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
    /// After a change is seen, wait this long for the folder to settle (an editor's save, a
    /// copy of several files) before reloading; Istio's PILOT_DEBOUNCE_AFTER is 100 ms too.
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// Have every proxy write access logs to this path (Istio's meshConfig.accessLogFile, e.g.
    /// /dev/stdout); off by default.
    #[arg(long)]
    access_log_file: Option<String>,
    /// Access log encoding: TEXT (Envoy's default line) or JSON (Istio's keys).
    #[arg(long, default_value = "TEXT", value_parser = ["TEXT", "JSON"])]
    access_log_encoding: String,
    /// Corefile for the DNS server (default: the Corefile Kubernetes ships for CoreDNS).
    #[arg(long, conflicts_with = "no_dns")]
    corefile: Option<PathBuf>,
    /// Serve every DNS server block on this port instead of the Corefile's (default: the
    /// Corefile's; 15053 for the built-in one when not running as root).
    #[arg(long)]
    dns_port: Option<u16>,
    /// Do not run the DNS server.
    #[arg(long)]
    no_dns: bool,
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
    let dns = (!args.no_dns).then(|| {
        let unprivileged = args.corefile.is_none() && !running_as_root();
        weft_control_plane::dns::DnsOptions {
            corefile: args.corefile.clone(),
            port_override: args.dns_port.or(unprivileged.then_some(15053)),
        }
    });
    rt.block_on(async {
        let opts =
            weft_control_plane::Options {
                config_dir: args.config_dir,
                xds_address: args.xds_address,
                debug_address: args.debug_address,
                poll_interval: Duration::from_millis(args.poll_ms.max(10)),
                debounce: Duration::from_millis(args.debounce_ms),
                settings: weft_control_plane::model::MeshSettings {
                    access_log: args.access_log_file.clone().filter(|p| !p.is_empty()).map(
                        |path| weft_control_plane::model::AccessLogSettings {
                            path,
                            json: args.access_log_encoding == "JSON",
                        },
                    ),
                },
                dns: dns.clone(),
            };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = weft_control_plane::run(opts) => return r,
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // health { lameduck }: report unhealthy, keep answering for a while, then exit.
        if let Some(d) = &dns {
            let wait = weft_control_plane::dns::begin_lameduck(d);
            if !wait.is_zero() {
                tracing::info!("shutting down after lameduck {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
        tracing::info!("shutting down");
        Ok(())
    })
}

fn running_as_root() -> bool {
    // /proc/self/status: "Uid: real effective saved fs".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
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
