//! weftd, the weft control plane: reads Istio and Kubernetes config (universal mode: a folder of
//! YAML), derives the mesh model, and serves every proxy its Envoy xDS over ADS. Also the home of
//! the config types, validation and generation that `weftctl` reuses.
//!
//! Layout follows the data flow: `config` (source, typed objects, validation) -> `model`
//! (services, endpoints, workloads) -> `generate` (per-proxy xDS) -> `xds` (ADS server).

pub mod config;
pub mod debug;
pub mod dns;
pub mod generate;
pub mod httpd;
pub mod model;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use config::source::{ConfigSnapshot, watch_dir};
use xds::{MeshSnapshot, StatusRegistry, XdsServer};

/// What `weftd` runs with.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_dir: PathBuf,
    pub xds_address: SocketAddr,
    pub debug_address: SocketAddr,
    pub poll_interval: Duration,
    /// How long a seen change is left to settle before the folder is reloaded.
    pub debounce: Duration,
    /// Mesh-wide settings (access logs, ...).
    pub settings: model::MeshSettings,
    /// The DNS server (None: off).
    pub dns: Option<dns::DnsOptions>,
}

/// Runs weftd until the process is stopped.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        opts.config_dir.is_dir(),
        "config folder {} does not exist or is not a folder",
        opts.config_dir.display()
    );
    let (config_tx, mut config_rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
    let (mesh_tx, mesh_rx) = watch::channel(Arc::new(MeshSnapshot::default()));
    let status = Arc::new(StatusRegistry::default());

    tokio::spawn(watch_dir(
        opts.config_dir.clone(),
        config_tx,
        opts.poll_interval,
        opts.debounce,
    ));
    if let Some(dns_opts) = opts.dns.clone() {
        // A Corefile that does not parse is a startup error. Failing to bind is fatal for a
        // Corefile the operator gave; for the built-in default (ports 53, 8080, 8181, 9153,
        // which may well be taken) it is logged and xDS keeps being served.
        dns::corefile_check(&dns_opts)?;
        let explicit = dns_opts.corefile.is_some();
        let config = config_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = dns::run(dns_opts, config).await {
                if explicit {
                    tracing::error!("DNS server failed: {e:#}");
                    std::process::exit(1);
                }
                tracing::error!(
                    "DNS server (built-in Corefile) not running: {e:#}; pass --corefile or --no-dns"
                );
            }
        });
    }
    // Derive the mesh model once per config change, off the xDS connections' path.
    let settings = opts.settings.clone();
    tokio::spawn(async move {
        while config_rx.changed().await.is_ok() {
            let snapshot = config_rx.borrow_and_update().clone();
            let started = std::time::Instant::now();
            let mut mesh = model::Mesh::build_shared(snapshot.config.clone());
            mesh.settings = settings.clone();
            tracing::debug!(
                generation = snapshot.generation,
                services = mesh.services.len(),
                took_ms = started.elapsed().as_secs_f64() * 1000.0,
                "mesh model built"
            );
            let before = mesh_tx.borrow().clone();
            mesh_tx.send_replace(Arc::new(MeshSnapshot::after(
                &before,
                mesh,
                snapshot.generation,
                snapshot.errors.clone(),
            )));
        }
    });

    let debug_state = debug::DebugState {
        status: status.clone(),
        mesh: mesh_rx.clone(),
    };
    let debug_listener = tokio::net::TcpListener::bind(opts.debug_address)
        .await
        .with_context(|| format!("binding the debug/monitoring port {}", opts.debug_address))?;
    tracing::info!(address = %opts.debug_address, "debug endpoints listening (/ready, /debug/syncz, /debug/configz)");
    tokio::spawn(debug::serve(debug_listener, debug_state));

    let xds_listener = tokio::net::TcpListener::bind(opts.xds_address)
        .await
        .with_context(|| format!("binding the xDS port {}", opts.xds_address))?;
    tracing::info!(address = %opts.xds_address, dir = %opts.config_dir.display(), "ADS server listening");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds_listener);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(XdsServer::new(mesh_rx, status).into_service())
        .serve_with_incoming(incoming)
        .await
        .context("serving ADS")?;
    Ok(())
}
