//! weftd, the weft control plane: reads Istio and Kubernetes config (universal mode: a folder of
//! YAML), derives the mesh model, and serves every proxy its Envoy xDS over ADS. Also the home of
//! the config types, validation and generation that `weftctl` reuses.
//!
//! Layout follows the data flow: `config` (source, typed objects, validation) -> `model`
//! (services, endpoints, workloads) -> `generate` (per-proxy xDS) -> `xds` (ADS server).

pub mod ca;
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
    /// The mesh CA and the TLS port (None: no CA, plaintext xDS only).
    pub ca: Option<CaSettings>,
}

/// The CA and weftd's TLS port.
#[derive(Debug, Clone)]
pub struct CaSettings {
    pub ca: ca::CaOptions,
    /// istiod's 15012: ADS and the CA over TLS.
    pub secure_address: SocketAddr,
    /// Extra DNS names for weftd's own certificate (the Service names proxies dial).
    pub dns_names: Vec<String>,
}

/// Whether this process runs as root (effective UID 0).
pub fn running_as_root() -> bool {
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
            let before = mesh_tx.borrow().clone();
            let mut mesh = model::Mesh::build_after(&before.mesh, snapshot.config.clone());
            mesh.settings = settings.clone();
            tracing::debug!(
                generation = snapshot.generation,
                services = mesh.services.len(),
                took_ms = started.elapsed().as_secs_f64() * 1000.0,
                "mesh model built"
            );
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

    let ca_service = match &opts.ca {
        Some(settings) => Some(start_ca(settings, mesh_rx.clone(), status.clone()).await?),
        None => None,
    };

    let xds_listener = tokio::net::TcpListener::bind(opts.xds_address)
        .await
        .with_context(|| format!("binding the xDS port {}", opts.xds_address))?;
    tracing::info!(address = %opts.xds_address, dir = %opts.config_dir.display(), "ADS server listening");
    // No Nagle: a unary call (the CA) or a push waits on no delayed ACK.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(xds_listener),
        |s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(XdsServer::new(mesh_rx, status).into_service())
        .add_optional_service(ca_service)
        .serve_with_incoming(incoming)
        .await
        .context("serving ADS")?;
    Ok(())
}

/// Loads (or creates) the CA, starts the TLS port, and returns the certificate service for the
/// plaintext port.
async fn start_ca(
    settings: &CaSettings,
    mesh_rx: watch::Receiver<Arc<MeshSnapshot>>,
    status: Arc<StatusRegistry>,
) -> anyhow::Result<weft_xds_proto::ca::CertificateServer<ca::service::CaService>> {
    use std::sync::RwLock;
    let authority =
        ca::Authority::load_or_create(settings.ca.clone()).context("loading the mesh CA")?;
    let tokens = ca::token::TokenKey::load_or_create(&settings.ca.state_dir)
        .context("loading the join-token key")?;
    let authority = Arc::new(RwLock::new(authority));
    let service = Arc::new(ca::service::CaService::new(authority.clone(), Some(tokens)));
    let mut dns_names = vec![
        "istiod.istio-system.svc".to_string(),
        "weftd.istio-system.svc".to_string(),
        "localhost".to_string(),
    ];
    dns_names.extend(settings.dns_names.iter().cloned());
    let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    if !settings.secure_address.ip().is_unspecified() {
        ips.push(settings.secure_address.ip());
    }
    ips.dedup();
    let serving_ttl = Duration::from_secs(24 * 3600);
    let config = {
        let ca = authority
            .read()
            .map_err(|_| anyhow::anyhow!("CA state poisoned"))?;
        ca::secure::server_config(&ca, &dns_names, &ips, serving_ttl)?
    };
    let config = Arc::new(arc_swap::ArcSwap::new(config));
    tokio::spawn(ca::secure::renew(
        authority,
        config.clone(),
        dns_names,
        ips,
        serving_ttl,
    ));
    let listener = tokio::net::TcpListener::bind(settings.secure_address)
        .await
        .with_context(|| format!("binding the TLS xDS/CA port {}", settings.secure_address))?;
    tracing::info!(address = %settings.secure_address, trust_domain = %settings.ca.trust_domain, "TLS xDS and CA listening");
    let secure_service = weft_xds_proto::ca::CertificateServer::new(service.clone());
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(XdsServer::new(mesh_rx, status).into_service())
            .add_service(secure_service)
            .serve_with_incoming(ca::secure::incoming(listener, config))
            .await;
        if let Err(e) = served {
            tracing::error!("the TLS xDS/CA port stopped: {e}");
        }
    });
    Ok(weft_xds_proto::ca::CertificateServer::new(service))
}
