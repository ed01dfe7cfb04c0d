//! weftd's TLS port (istiod's 15012): the same ADS and certificate services as the plaintext
//! port, behind TLS with a certificate the mesh CA issues to weftd itself. Clients may present
//! their workload certificate; the identity it proves travels with the connection
//! ([`SecureConnInfo`]) so the ADS server can hold a proxy to it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use super::{Authority, SpiffeId};

/// What the TLS port knows about a connection.
#[derive(Debug, Clone)]
pub struct SecureConnInfo {
    pub remote: Option<SocketAddr>,
    /// The SPIFFE identity of the client certificate, when one was presented and verified.
    pub peer_identity: Option<SpiffeId>,
}

/// A TLS connection handed to tonic.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: SecureConnInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = SecureConnInfo;
    fn connect_info(&self) -> SecureConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The SPIFFE identity in a certificate's URI SAN, if it has exactly that shape.
pub fn spiffe_of(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => SpiffeId::parse(u),
        _ => None,
    })
}

/// Builds the TLS configuration for the port from the CA's current state.
pub fn server_config(
    authority: &Authority,
    dns_names: &[String],
    ips: &[IpAddr],
    ttl: Duration,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let identity = SpiffeId {
        trust_domain: authority.options.trust_domain.clone(),
        namespace: "istio-system".into(),
        service_account: "weftd".into(),
    };
    let (chain_pem, key_pem) = authority.issue_serving(&identity, dns_names, ips, ttl)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(authority.roots_pem().as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TLS connections on `listener` and yields them to tonic. Handshakes run in their own
/// tasks (a slow client cannot hold up others) with a deadline. `config` is re-read for every
/// connection, so a renewed certificate or rotated root applies to new connections at once.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
) -> impl futures::Stream<Item = io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsConn>>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting on the TLS xDS port: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, "TLS handshake on the xDS port failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake on the xDS port timed out");
                        return;
                    }
                };
                let peer_identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| spiffe_of(c));
                let info = SecureConnInfo {
                    remote: Some(remote),
                    peer_identity,
                };
                let _ = tx.send(Ok(TlsConn { stream, info })).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Keeps the port's certificate fresh: re-issued at half its lifetime, and after a root
/// rotation (checked at the same time).
pub async fn renew(
    authority: Arc<RwLock<Authority>>,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    ttl: Duration,
) {
    loop {
        tokio::time::sleep((ttl / 2).max(Duration::from_secs(1))).await;
        let built = match authority.write() {
            Ok(mut ca) => {
                if let Err(e) = ca.rotate_if_due() {
                    tracing::error!("root rotation failed: {e}");
                }
                server_config(&ca, &dns_names, &ips, ttl)
            }
            Err(_) => return,
        };
        match built {
            Ok(c) => config.store(c),
            Err(e) => tracing::error!("renewing weftd's own certificate failed: {e:#}"),
        }
    }
}
