//! `weft-proxy`: the weft sidecar binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "weft-proxy",
    version,
    about = "weft sidecar proxy, configured over Envoy xDS (ADS)"
)]
struct Args {
    /// Envoy-style bootstrap file (YAML or JSON) naming the node, admin address and ADS server.
    #[arg(short = 'c', long)]
    config_path: Option<PathBuf>,
    /// ADS server address (host:port), e.g. weftd's 127.0.0.1:15010.
    #[arg(long)]
    xds_address: Option<String>,
    /// Node id, Istio style: sidecar~<ip>~<workload>.<namespace>~<namespace>.svc.cluster.local
    #[arg(long)]
    node_id: Option<String>,
    /// Node cluster (Envoy's --service-cluster).
    #[arg(long, default_value = "weft")]
    service_cluster: String,
    /// Admin server address.
    #[arg(long)]
    admin_address: Option<SocketAddr>,
    /// Worker threads (as Envoy's --concurrency); default: the number of cores.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let mut startup = match (&args.config_path, &args.xds_address, &args.node_id) {
        (Some(path), _, _) => weft_proxy::bootstrap::from_file(path)?,
        (None, Some(xds), Some(id)) => {
            weft_proxy::bootstrap::from_flags(id, &args.service_cluster, xds)
        }
        _ => anyhow::bail!(
            "give either --config-path FILE, or both --xds-address HOST:PORT and --node-id ID"
        ),
    };
    if let Some(id) = &args.node_id {
        startup.node.id = id.clone();
    }
    if let Some(xds) = &args.xds_address {
        startup.xds_address = xds.clone();
    }
    let admin_address = args
        .admin_address
        .or(startup.admin_address)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 15000)));
    let workers = args
        .concurrency
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    // The main thread runs xDS and admin; listeners run on `workers` threads of their own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handles = weft_proxy::worker::start(workers).context("starting worker threads")?;
    rt.block_on(async move {
        let proxy = weft_proxy::state::Proxy::new(startup.bootstrap.clone(), handles);
        let admin = tokio::net::TcpListener::bind(admin_address)
            .await
            .with_context(|| format!("binding the admin address {admin_address}"))?;
        tracing::info!(admin = %admin_address, xds = %startup.xds_address, node = %startup.node.id, workers, "weft-proxy starting");
        tokio::spawn(weft_proxy::admin::serve(admin, proxy.clone()));
        let client = weft_proxy::xds::XdsClient::new(proxy, startup.node, &startup.xds_address);
        tokio::select! {
            _ = client.run() => {}
            _ = shutdown_signal() => tracing::info!("shutting down"),
        }
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
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
