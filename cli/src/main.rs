//! `weftctl`: the weft mesh CLI.

mod echo;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Parser, Debug)]
#[command(name = "weftctl", version, about = "weft mesh CLI")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run universal mode on this host: weftd on DIR plus a sidecar (and app) per WorkloadEntry.
    Up {
        /// Folder of Kubernetes/Istio YAML.
        dir: PathBuf,
        /// weftd's ADS address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds_address: SocketAddr,
        /// weftd's debug address.
        #[arg(long, default_value = "127.0.0.1:15014")]
        debug_address: SocketAddr,
        /// Where process logs go (default: a fresh folder under the temp dir).
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// Worker threads per sidecar.
        #[arg(long, default_value_t = 1)]
        proxy_concurrency: usize,
        /// Run weftd's DNS server with this Corefile.
        #[arg(long)]
        corefile: Option<PathBuf>,
    },
    /// A tiny HTTP echo server: replies with its name and the request's method, path, headers.
    Echo {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "127.0.0.1")]
        address: std::net::IpAddr,
    },
    /// Workload certificates from the mesh CA (for tools and workloads without a sidecar).
    Cert {
        #[command(subcommand)]
        command: CertCmd,
    },
    /// Join tokens: the credential a workload outside Kubernetes shows the mesh CA.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Print weftctl's version.
    Version,
}

#[derive(Subcommand, Debug)]
enum CertCmd {
    /// Ask the CA for a certificate: a new key (key.pem, mode 0600) and the signed chain
    /// (cert-chain.pem) plus the trust bundle (root-cert.pem), written to --out-dir.
    Request {
        /// The CA: weftd's 15010, or its TLS port 15012 with --ca-root-cert.
        #[arg(long, default_value = "127.0.0.1:15010")]
        ca_address: String,
        /// Verify the CA's TLS certificate against this root (and use TLS).
        #[arg(long)]
        ca_root_cert: Option<PathBuf>,
        /// The name the CA's certificate must carry.
        #[arg(long, default_value = "istiod.istio-system.svc")]
        ca_server_name: String,
        /// A file holding the credential (join token or service-account token).
        #[arg(long)]
        token_file: PathBuf,
        /// The identity to ask for; default spiffe://<trust-domain>/ns/<namespace>/sa/<sa>.
        #[arg(long)]
        identity: Option<String>,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Send this PEM CSR as is (its key stays yours) instead of generating a key.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Requested lifetime (e.g. 1h); default: the CA's.
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Issue a join token for one namespace and service account (printed on stdout). Needs read
    /// access to weftd's state folder, where the signing key lives.
    Create {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// How long the token is valid (90s, 15m, 24h, 720h).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// weftd's --state-dir.
        #[arg(long, env = "WEFTD_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Up {
                dir,
                xds_address,
                debug_address,
                log_dir,
                proxy_concurrency,
                corefile,
            } => {
                let log_dir = log_dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("weft-up-{}", std::process::id()))
                });
                up::run(up::UpOptions {
                    dir,
                    xds_address,
                    debug_address,
                    log_dir,
                    proxy_concurrency: proxy_concurrency.max(1),
                    corefile,
                })
                .await
            }
            Cmd::Echo {
                port,
                name,
                address,
            } => echo::run(SocketAddr::new(address, port), name).await,
            Cmd::Cert {
                command:
                    CertCmd::Request {
                        ca_address,
                        ca_root_cert,
                        ca_server_name,
                        token_file,
                        identity,
                        namespace,
                        service_account,
                        trust_domain,
                        csr,
                        ttl,
                        out_dir,
                    },
            } => {
                let ttl = ttl
                    .map(|t| weft_control_plane::config::validate::parse_duration(&t))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
                let tls = match ca_root_cert {
                    Some(p) => Some(weft_proxy::identity::CaTls {
                        roots_pem: std::fs::read(&p)
                            .with_context(|| format!("reading {}", p.display()))?,
                        server_name: ca_server_name,
                    }),
                    None => None,
                };
                let ca = weft_proxy::identity::CaClient {
                    address: ca_address,
                    tls,
                    token: weft_proxy::identity::TokenSource::File(token_file),
                };
                let identity = identity.unwrap_or_else(|| {
                    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
                });
                std::fs::create_dir_all(&out_dir)
                    .with_context(|| format!("creating {}", out_dir.display()))?;
                let (key, csr_pem) = match csr {
                    Some(p) => (
                        None,
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("reading {}", p.display()))?,
                    ),
                    None => {
                        let (k, c) = weft_proxy::identity::key_and_csr(&identity)?;
                        (Some(k), c)
                    }
                };
                let mut chain = ca.sign(&csr_pem, ttl).await?;
                let roots = chain.pop().unwrap_or_default();
                use weft_control_plane::ca::write_private;
                write_private(&out_dir, "cert-chain.pem", chain.concat().as_bytes(), 0o644)?;
                write_private(&out_dir, "root-cert.pem", roots.as_bytes(), 0o644)?;
                if let Some(k) = key {
                    write_private(&out_dir, "key.pem", k.serialize_pem().as_bytes(), 0o600)?;
                }
                println!("{identity}: certificate written to {}", out_dir.display());
                Ok(())
            }
            Cmd::Token {
                command:
                    TokenCmd::Create {
                        namespace,
                        service_account,
                        ttl,
                        state_dir,
                    },
            } => {
                let ttl = weft_control_plane::config::validate::parse_duration(&ttl)
                    .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
                let dir = state_dir.unwrap_or_else(weft_control_plane::ca::default_state_dir);
                let key = weft_control_plane::ca::token::TokenKey::load(&dir)?;
                println!("{}", key.issue(&namespace, &service_account, ttl));
                Ok(())
            }
            Cmd::Version => {
                println!("weftctl {}", env!("CARGO_PKG_VERSION"));
                Ok(())
            }
        }
    })
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .context("connect timed out")??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub(crate) async fn http_get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    Ok(http_get(addr, path).await?.0)
}

pub(crate) async fn http_get_text(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    Ok(http_get(addr, path).await?.1)
}
