//! The workload's identity, as Istio's agent keeps it: a private key generated here (it never
//! leaves the process), a certificate for `spiffe://<td>/ns/<ns>/sa/<sa>` from the mesh CA
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, authenticated with a join token
//! or a Kubernetes service-account token), renewed at about 80% of its lifetime with jitter and
//! retries, and swapped atomically: handshakes after a renewal use the new certificate, open
//! connections keep theirs.
//!
//! TLS contexts in xDS name these secrets as Istio does: `default` (the workload certificate)
//! and `ROOTCA` (the mesh trust bundle); [`Identity`] resolves both.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use weft_xds_proto::ca::{IstioCertificateRequest, create_certificate};

/// Where the CA is and how to reach it.
#[derive(Debug, Clone)]
pub struct CaClient {
    /// host:port of the CA (weftd's 15010, or 15012 with `tls`).
    pub address: String,
    /// TLS to the CA: the roots to verify it with and the name to verify.
    pub tls: Option<CaTls>,
    /// The credential, re-read for every request (projected tokens are rotated by kubelet).
    pub token: TokenSource,
}

#[derive(Debug, Clone)]
pub struct CaTls {
    pub roots_pem: Vec<u8>,
    pub server_name: String,
}

#[derive(Debug, Clone)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

impl TokenSource {
    fn read(&self) -> anyhow::Result<String> {
        match self {
            TokenSource::Inline(t) => Ok(t.trim().to_string()),
            TokenSource::File(p) => Ok(std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading the CA token {}: {e}", p.display()))?
                .trim()
                .to_string()),
        }
    }
}

/// A signed certificate and its key.
pub struct Issued {
    pub identity: String,
    pub key: rcgen::KeyPair,
    /// Workload certificate first, then intermediates (no roots).
    pub chain: Vec<CertificateDer<'static>>,
    pub chain_pem: String,
    /// The trust bundle (PEM; every root the CA currently trusts).
    pub roots_pem: String,
    pub roots: Vec<CertificateDer<'static>>,
    /// The roots as rustls trust anchors, built once.
    pub root_store: Arc<rustls::RootCertStore>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The rustls form of the key and chain, built once.
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A new P-256 key and a CSR for `identity` (its only SAN, as a URI; empty subject).
pub fn key_and_csr(identity: &str) -> anyhow::Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names =
        vec![rcgen::SanType::URI(identity.try_into().map_err(|e| {
            anyhow::anyhow!("{identity} is not a valid URI SAN: {e:?}")
        })?)];
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

fn validity(der: &[u8]) -> anyhow::Result<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("the CA's certificate does not parse: {e}"))?;
    let v = cert.validity();
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

/// A gRPC channel to weftd at `address` (host:port): plaintext, or TLS verified against
/// `tls` and, with `workload_cert`, presenting the workload certificate.
pub async fn channel(
    endpoint: tonic::transport::Endpoint,
    address: &str,
    tls: Option<&CaTls>,
    workload_cert: bool,
) -> anyhow::Result<tonic::transport::Channel> {
    let Some(tls) = tls else {
        return Ok(endpoint.connect().await?);
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&tls.roots_pem) {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
    .with_root_certificates(roots);
    let mut config = if workload_cert {
        builder.with_client_cert_resolver(crate::tls::workload_client_cert())
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())?;
    let address = address.to_string();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let (connector, name, address) = (connector.clone(), name.clone(), address.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&address).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}

impl CaClient {
    /// Opens a channel to the CA (TLS when configured; the credential is the token, so no
    /// client certificate, which the first request could not have anyway).
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15));
        channel(endpoint, &self.address, self.tls.as_ref(), false).await
    }

    /// Sends `csr` (for `identity`) and returns the CA's chain: leaf, intermediates, bundle.
    pub async fn sign(&self, csr: &str, ttl: Option<Duration>) -> anyhow::Result<Vec<String>> {
        let token = self.token.read()?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr.to_string(),
            validity_duration: ttl.map(|d| d.as_secs() as i64).unwrap_or(0),
            metadata: None,
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().map_err(|_| {
                anyhow::anyhow!("the CA token has characters not allowed in a header")
            })?,
        );
        let channel = self.channel().await?;
        let response = create_certificate(channel, request)
            .await
            .map_err(|s| anyhow::anyhow!("the CA refused ({:?}): {}", s.code(), s.message()))?;
        anyhow::ensure!(
            response.cert_chain.len() >= 2,
            "the CA answered {} PEM blocks; a chain needs the certificate and the roots",
            response.cert_chain.len()
        );
        Ok(response.cert_chain)
    }

    /// A new key, a CSR for `identity`, and the CA's certificate for it.
    pub async fn issue(&self, identity: &str, ttl: Option<Duration>) -> anyhow::Result<Issued> {
        let (key, csr) = key_and_csr(identity)?;
        let mut chain_pem = self.sign(&csr, ttl).await?;
        let roots_pem = chain_pem.pop().unwrap_or_default();
        let chain_pem = chain_pem.concat();
        issued(identity, key, chain_pem, roots_pem)
    }
}

/// Checks and assembles what the CA returned.
pub fn issued(
    identity: &str,
    key: rcgen::KeyPair,
    chain_pem: String,
    roots_pem: String,
) -> anyhow::Result<Issued> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(roots_pem.as_bytes()).collect::<Result<_, _>>()?;
    anyhow::ensure!(!chain.is_empty(), "the CA returned no certificate");
    anyhow::ensure!(!roots.is_empty(), "the CA returned no root");
    let (not_before, not_after) = validity(&chain[0])?;
    let mut root_store = rustls::RootCertStore::empty();
    for r in &roots {
        root_store.add(r.clone())?;
    }
    let private = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider.key_provider.load_private_key(private)?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(chain.clone(), signer));
    certified
        .keys_match()
        .map_err(|e| anyhow::anyhow!("the CA's certificate is not for our key: {e}"))?;
    Ok(Issued {
        identity: identity.to_string(),
        key,
        chain,
        chain_pem,
        roots_pem,
        roots,
        root_store: Arc::new(root_store),
        not_before,
        not_after,
        certified,
    })
}

/// The process's workload identity (empty until `maintain` obtains a certificate). One per
/// process: every TLS context naming the SDS secrets `default` and `ROOTCA` reads it.
pub fn global() -> &'static Arc<Identity> {
    static IDENTITY: std::sync::OnceLock<Arc<Identity>> = std::sync::OnceLock::new();
    IDENTITY.get_or_init(|| Arc::new(Identity::default()))
}

/// The workload identity a proxy holds, renewed in the background.
pub struct Identity {
    current: ArcSwapOption<Issued>,
    /// Signals every swap (the SDS server pushes the new secrets).
    changed: tokio::sync::watch::Sender<u64>,
    /// Bumped on every swap (a certificate or trust bundle change).
    pub generation: std::sync::atomic::AtomicU64,
    pub renewals: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("current", &self.current.load())
            .finish()
    }
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            current: Default::default(),
            changed: tokio::sync::watch::Sender::new(0),
            generation: Default::default(),
            renewals: Default::default(),
            failures: Default::default(),
        }
    }
}

impl Identity {
    /// A receiver that sees every certificate change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn current(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }

    pub fn set(&self, issued: Issued) {
        self.current.store(Some(Arc::new(issued)));
        let g = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.changed.send_replace(g);
    }

    /// When to renew: at 80% of the lifetime, minus up to 5% jitter (so replicas started
    /// together do not renew together).
    pub fn renew_at(issued: &Issued) -> SystemTime {
        let life = issued
            .not_after
            .duration_since(issued.not_before)
            .unwrap_or_default();
        let jitter = life.mul_f64(fastrand::f64() * 0.05);
        issued.not_before + life.mul_f64(0.8) - jitter
    }

    /// Obtains the certificate, then keeps renewing it. Failures are retried with
    /// exponential backoff (1 s .. 30 s); the current certificate keeps serving meanwhile.
    pub async fn maintain(self: Arc<Self>, ca: CaClient, identity: String, ttl: Option<Duration>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            match ca.issue(&identity, ttl).await {
                Ok(issued) => {
                    let next = Self::renew_at(&issued);
                    tracing::info!(
                        identity = %identity,
                        expires_in_s = issued.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                        renew_in_s = next.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                        "workload certificate obtained"
                    );
                    if self.current().is_some() {
                        self.renewals
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.set(issued);
                    backoff = Duration::from_secs(1);
                    let wait = next
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(Duration::from_secs(1));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    self.failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(identity = %identity, retry_in_ms = backoff.as_millis() as u64, "getting a workload certificate failed: {e:#}");
                    let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}
