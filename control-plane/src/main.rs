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
    /// How often the config folder is also polled for changes, in milliseconds (changes are
    /// seen at once through inotify where it works; polling covers where it does not).
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// The folder must be quiet this long before a change is loaded, so a burst of writes (an
    /// editor's save, a copy of several files) is one reload. With inotify the wait starts over
    /// at each write (1 s at most in all); without it, it is a fixed wait after the change is
    /// polled. Istio's PILOT_DEBOUNCE_AFTER is 100 ms, for bursts of Kubernetes API events.
    #[arg(long, default_value_t = 20)]
    debounce_ms: u64,
    /// Have every proxy write access logs to this path (Istio's meshConfig.accessLogFile, e.g.
    /// /dev/stdout); off by default.
    #[arg(long)]
    access_log_file: Option<String>,
    /// Access log encoding: TEXT (Envoy's default line) or JSON (Istio's keys).
    #[arg(long, default_value = "TEXT", value_parser = ["TEXT", "JSON"])]
    access_log_encoding: String,
    /// How proxies normalize request paths before authorization and routing (Istio's
    /// meshConfig.pathNormalization): NONE, BASE (RFC 3986, the default), MERGE_SLASHES, or
    /// DECODE_AND_MERGE_SLASHES.
    #[arg(long, default_value = "BASE", value_parser = ["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"])]
    path_normalization: String,
    /// Have every proxy report Zipkin spans to this collector, HOST:PORT (Istio's
    /// meshConfig.enableTracing with defaultConfig.tracing.zipkin.address, e.g.
    /// zipkin.istio-system:9411); off by default.
    #[arg(long)]
    zipkin_address: Option<String>,
    /// The percentage of requests traced when --zipkin-address is set (Istio's
    /// defaultConfig.tracing.sampling).
    #[arg(long, default_value_t = 1.0)]
    trace_sampling: f64,
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
    /// Where weftd keeps its state: the generated root CA (keys mode 0600) and the join-token
    /// key. Default: /var/lib/weftd as root, else ~/.local/state/weftd.
    #[arg(long, env = "WEFTD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The mesh's trust domain: workload identities are spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// A plugged-in CA in Istio's layout (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem) instead of a generated root.
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Lifetime of workload certificates when the request asks for none (e.g. 24h, 90m, 120s).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    workload_cert_ttl: Duration,
    /// The longest workload certificate the CA signs.
    #[arg(long, default_value = "2160h", value_parser = parse_duration)]
    max_workload_cert_ttl: Duration,
    /// Address of the TLS port serving ADS and the CA (istiod's 15012).
    #[arg(long, default_value = "0.0.0.0:15012")]
    secure_xds_address: SocketAddr,
    /// Extra DNS names for weftd's own certificate on the TLS port (repeatable).
    #[arg(long = "tls-dns-name")]
    tls_dns_names: Vec<String>,
    /// Run without the CA and the TLS port.
    #[arg(long)]
    no_ca: bool,
}

/// A duration as Istio writes them (`90s`, `15m`, `24h`), above zero.
fn parse_duration(s: &str) -> Result<Duration, String> {
    match weft_control_plane::config::validate::parse_duration(s)? {
        d if d.is_zero() => Err("a duration must be above zero".into()),
        d => Ok(d),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracing = args
        .zipkin_address
        .as_deref()
        .map(|a| weft_control_plane::model::TracingSettings::parse(a, args.trace_sampling))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    init_tracing(&args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dns = (!args.no_dns).then(|| {
        let unprivileged = args.corefile.is_none() && !weft_control_plane::running_as_root();
        weft_control_plane::dns::DnsOptions {
            corefile: args.corefile.clone(),
            port_override: args.dns_port.or(unprivileged.then_some(15053)),
        }
    });
    rt.block_on(async {
        let opts = weft_control_plane::Options {
            config_dir: args.config_dir,
            xds_address: args.xds_address,
            debug_address: args.debug_address,
            poll_interval: Duration::from_millis(args.poll_ms.max(10)),
            debounce: Duration::from_millis(args.debounce_ms),
            settings: weft_control_plane::model::MeshSettings {
                access_log: args
                    .access_log_file
                    .clone()
                    .filter(|p| !p.is_empty())
                    .map(|path| weft_control_plane::model::AccessLogSettings {
                        path,
                        json: args.access_log_encoding == "JSON",
                    }),
                trust_domain: args.trust_domain.clone(),
                path_normalization: weft_control_plane::model::PathNormalization::parse(
                    &args.path_normalization,
                )
                .unwrap_or_default(),
                tracing,
            },
            dns: dns.clone(),
            ca: (!args.no_ca).then(|| {
                let state_dir = args
                    .state_dir
                    .clone()
                    .unwrap_or_else(weft_control_plane::ca::default_state_dir);
                let mut ca = weft_control_plane::ca::CaOptions::new(&args.trust_domain, &state_dir);
                ca.plugged_dir = args.ca_dir.clone();
                ca.default_ttl = args.workload_cert_ttl;
                ca.max_ttl = args.max_workload_cert_ttl.max(args.workload_cert_ttl);
                weft_control_plane::CaSettings {
                    ca,
                    secure_address: args.secure_xds_address,
                    dns_names: args.tls_dns_names.clone(),
                }
            }),
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
