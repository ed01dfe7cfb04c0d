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
    /// The credential for the mesh CA: a file holding a join token (`weftctl token create`) or
    /// a Kubernetes service-account token. Without one (or --ca-token) the proxy has no
    /// workload certificate and mTLS contexts fail their handshakes.
    #[arg(long, env = "WEFT_CA_TOKEN_FILE", group = "ca_token_or_file")]
    ca_token_file: Option<PathBuf>,
    /// The CA credential itself (prefer --ca-token-file: arguments are visible in `ps`).
    #[arg(
        long,
        env = "WEFT_CA_TOKEN",
        hide_env_values = true,
        conflicts_with = "ca_token_file"
    )]
    ca_token: Option<String>,
    /// The CA's address (default: the xDS address; weftd serves both).
    #[arg(long)]
    ca_address: Option<String>,
    /// Talk TLS to the CA (weftd's 15012), verifying it against this root certificate.
    #[arg(long)]
    ca_root_cert: Option<PathBuf>,
    /// The name the CA's certificate must carry (also weftd's name on the TLS xDS port).
    #[arg(long, default_value = "istiod.istio-system.svc")]
    ca_server_name: String,
    /// Talk to the xDS server over TLS (weftd's 15012), verifying it against this root and
    /// authenticating with the workload certificate (needs a CA token).
    #[arg(long, requires = "ca_token_or_file")]
    xds_root_cert: Option<PathBuf>,
    /// Trust domain of the workload identity.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Namespace of the workload identity (default: the node's NAMESPACE metadata, or the
    /// namespace in the node id).
    #[arg(long)]
    namespace: Option<String>,
    /// Service account of the workload identity (default: the node's SERVICE_ACCOUNT
    /// metadata, else "default").
    #[arg(long)]
    service_account: Option<String>,
    /// Requested certificate lifetime in seconds (default: the CA's, 24 h for weftd).
    #[arg(long)]
    cert_ttl_s: Option<u64>,
    /// Serve the workload certificate and roots over SDS on this Unix socket (for an Envoy
    /// next to this process: its bootstrap's `sds-grpc` cluster).
    #[arg(long)]
    sds_socket: Option<PathBuf>,
    /// Run only the agent (certificate and SDS, plus admin): no xDS, no listeners. With
    /// --sds-socket this is what Istio's pilot-agent does for Envoy.
    #[arg(long, requires = "sds_socket")]
    agent_only: bool,
    /// How the workload's traffic reaches this proxy, sent as the node's INTERCEPTION_MODE
    /// metadata: REDIRECT after `weft-proxy iptables` (weftd then serves the captured
    /// listeners: virtualOutbound on 15001 and a listener per destination port), NONE (the
    /// default) when the workload calls the proxy's bound listeners itself.
    #[arg(long, value_parser = ["NONE", "REDIRECT"])]
    interception_mode: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Capture this network namespace's outbound TCP for the sidecar with iptables (REDIRECT
    /// to the virtualOutbound port), as Istio's istio-iptables does. Run as root before the
    /// workload starts; the proxy then runs as --proxy-uid and declares
    /// `INTERCEPTION_MODE: REDIRECT` in its node metadata.
    Iptables(IptablesArgs),
}

#[derive(clap::Args, Debug)]
struct IptablesArgs {
    /// The port connections are redirected to (the proxy's virtualOutbound listener).
    #[arg(short = 'p', long, default_value_t = 15001)]
    proxy_port: u16,
    /// The uid the proxy runs as: its own connections are let through.
    #[arg(short = 'u', long, default_value = "1337")]
    proxy_uid: Option<u32>,
    /// The gid the proxy runs as: its connections are let through too.
    #[arg(short = 'g', long)]
    proxy_gid: Option<u32>,
    /// Destination ports never captured, comma-separated.
    #[arg(short = 'o', long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Destination IPv4 ranges never captured, comma-separated CIDRs.
    #[arg(short = 'x', long, value_delimiter = ',')]
    exclude_outbound_ip_ranges: Vec<String>,
    /// The port inbound connections are redirected to (the proxy's virtualInbound listener).
    #[arg(long, default_value_t = 15006)]
    inbound_capture_port: u16,
    /// Inbound ports to capture: `*` for all (the default), a comma-separated list, or an
    /// empty string for none.
    #[arg(short = 'b', long, default_value = "*")]
    inbound_ports: String,
    /// Inbound ports never captured, comma-separated (e.g. 22).
    #[arg(short = 'd', long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules this command set up.
    #[arg(long)]
    clean: bool,
    /// The iptables program.
    #[arg(long, default_value = "iptables")]
    iptables: String,
}

fn iptables(a: &IptablesArgs) -> anyhow::Result<()> {
    use weft_proxy::iptables::{Capture, run};
    let inbound_ports = match a.inbound_ports.trim() {
        "" => None,
        "*" => Some(Vec::new()),
        list => Some(
            list.split(',')
                .map(|p| {
                    p.trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| {
                            anyhow::anyhow!("--inbound-ports: {p:?} is not a port (1-65535)")
                        })
                })
                .collect::<anyhow::Result<Vec<u16>>>()?,
        ),
    };
    let capture = Capture {
        inbound_port: a.inbound_capture_port,
        inbound_ports,
        exclude_inbound_ports: a.exclude_inbound_ports.clone(),
        proxy_port: a.proxy_port,
        proxy_uid: a.proxy_uid,
        proxy_gid: a.proxy_gid,
        exclude_ports: a.exclude_outbound_ports.clone(),
        exclude_ranges: a.exclude_outbound_ip_ranges.clone(),
    };
    let cleanup = Capture::cleanup();
    let setup = if a.clean { Vec::new() } else { capture.rules() };
    if !a.clean {
        capture.check().map_err(|e| anyhow::anyhow!(e))?;
    }
    if a.dry_run {
        for args in cleanup.iter().chain(&setup) {
            println!("{} {}", a.iptables, args.join(" "));
        }
        return Ok(());
    }
    // Whatever an earlier run left is removed first, so running it twice is harmless.
    run(&a.iptables, &cleanup, true)?;
    run(&a.iptables, &setup, false)
}

/// The SPIFFE identity this proxy asks for.
fn workload_identity(args: &Args, node: &weft_xds_proto::envoy::config::core::v3::Node) -> String {
    let meta = |key: &str| {
        node.metadata
            .as_ref()
            .and_then(|m| m.fields.get(key))
            .and_then(|v| match &v.kind {
                Some(weft_xds_proto::wkt::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
    };
    // sidecar~<ip>~<workload>.<ns>~<ns>.svc.cluster.local
    let from_id = node
        .id
        .split('~')
        .nth(3)
        .and_then(|d| d.split('.').next())
        .map(str::to_string);
    let ns = args
        .namespace
        .clone()
        .or_else(|| meta("NAMESPACE"))
        .or(from_id)
        .unwrap_or_else(|| "default".into());
    let sa = args
        .service_account
        .clone()
        .or_else(|| meta("SERVICE_ACCOUNT"))
        .unwrap_or_else(|| "default".into());
    format!("spiffe://{}/ns/{ns}/sa/{sa}", args.trust_domain)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Iptables(a)) = &args.command {
        return iptables(a);
    }
    init_tracing(&args.log_format);
    // The JSON mapping is needed for the bootstrap and /config_dump only: build it for each
    // use rather than keep its ~7 MiB for the life of the sidecar.
    weft_xds_proto::json::release_pool_after_use();
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
        startup.xds_address = Some(xds.clone());
    }
    if let Some(mode) = &args.interception_mode {
        use weft_xds_proto::wkt::{Value, value::Kind};
        let value = Value {
            kind: Some(Kind::StringValue(mode.clone())),
        };
        for node in std::iter::once(&mut startup.node).chain(startup.bootstrap.node.as_mut()) {
            node.metadata
                .get_or_insert_with(Default::default)
                .fields
                .insert("INTERCEPTION_MODE".into(), value.clone());
        }
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
    // What Zipkin spans say of this proxy: its node, and the host's address (Envoy's local info).
    weft_proxy::http::zipkin::set_local_node(weft_proxy::http::zipkin::LocalNode {
        id: startup.node.id.clone(),
        cluster: startup.node.cluster.clone(),
        ipv4: weft_proxy::http::zipkin::host_ipv4(),
    });
    rt.block_on(async move {
        let proxy = weft_proxy::state::Proxy::new(startup.bootstrap.clone(), handles);
        let admin = tokio::net::TcpListener::bind(admin_address)
            .await
            .with_context(|| format!("binding the admin address {admin_address}"))?;
        let xds_address = startup.xds_address.clone().unwrap_or_default();
        tracing::info!(admin = %admin_address, xds = %xds_address, node = %startup.node.id, workers, "weft-proxy starting");
        tokio::spawn(weft_proxy::admin::serve(admin, proxy.clone()));
        let token = match (&args.ca_token_file, &args.ca_token) {
            (Some(f), _) => Some(weft_proxy::identity::TokenSource::File(f.clone())),
            (None, Some(t)) => Some(weft_proxy::identity::TokenSource::Inline(t.clone())),
            (None, None) => None,
        };
        if let Some(token) = token {
            // The CA is on the xDS port unless told otherwise: TLS there too when xDS is.
            let ca_root = args.ca_root_cert.as_ref().or(if args.ca_address.is_none() {
                args.xds_root_cert.as_ref()
            } else {
                None
            });
            let tls = match ca_root {
                Some(path) => Some(weft_proxy::identity::CaTls {
                    roots_pem: std::fs::read(path)
                        .with_context(|| format!("reading --ca-root-cert {}", path.display()))?,
                    server_name: args.ca_server_name.clone(),
                }),
                None => None,
            };
            let ca = weft_proxy::identity::CaClient {
                address: args
                    .ca_address
                    .clone()
                    .or_else(|| startup.xds_address.clone())
                    .context("--ca-address is needed: the bootstrap has no ADS server to take it from")?,
                tls,
                token,
            };
            let identity = workload_identity(&args, &startup.node);
            tracing::info!(%identity, ca = %ca.address, "obtaining the workload certificate");
            tokio::spawn(weft_proxy::identity::global().clone().maintain(
                ca,
                identity,
                args.cert_ttl_s.map(std::time::Duration::from_secs),
            ));
        }
        if let Some(path) = args.sds_socket.clone() {
            let identity = weft_proxy::identity::global().clone();
            tokio::spawn(async move {
                if let Err(e) = weft_proxy::sds::serve(path, identity).await {
                    tracing::error!("SDS server stopped: {e:#}");
                    std::process::exit(1);
                }
            });
        }
        if args.agent_only {
            proxy.set_state(weft_proxy::state::ServerState::Live);
            shutdown_signal().await;
            tracing::info!("shutting down");
            return Ok(());
        }
        let mut client =
            weft_proxy::xds::XdsClient::new(proxy.clone(), startup.node, &xds_address);
        client
            .apply_static()
            .await
            .map_err(|r| anyhow::anyhow!("static_resources: {r}"))?;
        if startup.xds_address.is_none() {
            // Static resources only: the config is complete as it is.
            tracing::info!("static config applied; proxy is LIVE (no ADS server configured)");
            proxy.set_state(weft_proxy::state::ServerState::Live);
            shutdown_signal().await;
            tracing::info!("shutting down");
            return Ok(());
        }
        if let Some(path) = &args.xds_root_cert {
            client.tls = Some(weft_proxy::identity::CaTls {
                roots_pem: std::fs::read(path)
                    .with_context(|| format!("reading --xds-root-cert {}", path.display()))?,
                server_name: args.ca_server_name.clone(),
            });
        }
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
