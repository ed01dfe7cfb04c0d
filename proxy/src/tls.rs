//! TLS with rustls, from Envoy's `DownstreamTlsContext` (listeners) and `UpstreamTlsContext`
//! (clusters): certificates from files or inline PEM, or the workload's own certificate and the
//! mesh trust bundle by their Istio SDS names (`default`, `ROOTCA`; see `identity`); ALPN;
//! TLS 1.2-1.3; peer certificates checked against the trusted roots and, as Envoy's
//! `match_subject_alt_names` does, against the expected SANs (SPIFFE identities for mTLS).
//! Settings rustls cannot honour are rejected by field name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use weft_xds_proto::envoy::config::core::v3::{
    DataSource, TransportSocket, data_source, transport_socket,
};
use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    UpstreamTlsContext, common_tls_context, tls_parameters::TlsProtocol,
};
use weft_xds_proto::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

use crate::http::router::{StringRule, string_rule};

const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const RAW_BUFFER: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// Istio's SDS name of the workload certificate.
pub const SDS_DEFAULT: &str = "default";
/// Istio's SDS name of the mesh trust bundle.
pub const SDS_ROOTCA: &str = "ROOTCA";

type Fail = (String, String);

fn fail(field: &str, reason: impl Into<String>) -> Fail {
    (field.to_string(), reason.into())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem(ds: Option<&DataSource>, field: &str) -> Result<Vec<u8>, Fail> {
    match ds.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(f)) => {
            std::fs::read(f).map_err(|e| fail(field, format!("cannot read {f:?}: {e}")))
        }
        Some(data_source::Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        _ => Err(fail(field, "a filename or inline PEM is required")),
    }
}

fn pem_certs(bytes: &[u8], field: &str) -> Result<Vec<CertificateDer<'static>>, Fail> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| fail(field, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(fail(field, "no certificate in the PEM"));
    }
    Ok(certs)
}

/// An SDS secret reference: only Istio's two names, which the workload identity provides.
fn sds_name(s: &SdsSecretConfig, field: &str, want: &str) -> Result<(), Fail> {
    if s.name == want {
        Ok(())
    } else {
        Err(fail(
            field,
            format!(
                "SDS secret {:?} is not known; weft-proxy provides {SDS_DEFAULT:?} (the workload certificate) and {SDS_ROOTCA:?} (the mesh roots)",
                s.name
            ),
        ))
    }
}

/// Where our own certificate comes from.
#[derive(Debug, Clone)]
enum OwnCert {
    None,
    Static(Arc<rustls::sign::CertifiedKey>),
    Workload,
}

impl OwnCert {
    fn current(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match self {
            OwnCert::None => None,
            OwnCert::Static(k) => Some(k.clone()),
            OwnCert::Workload => crate::identity::global()
                .current()
                .map(|i| i.certified.clone()),
        }
    }
}

#[allow(deprecated)]
fn own_cert(common: &CommonTlsContext) -> Result<OwnCert, Fail> {
    if common.tls_certificate_provider_instance.is_some() {
        return Err(fail(
            "common_tls_context.tls_certificate_provider_instance",
            "not supported (certificates come from files, inline PEM or SDS \"default\")",
        ));
    }
    match (
        common.tls_certificates.as_slice(),
        common.tls_certificate_sds_secret_configs.as_slice(),
    ) {
        ([], []) => Ok(OwnCert::None),
        ([], [sds]) => {
            sds_name(
                sds,
                "common_tls_context.tls_certificate_sds_secret_configs[0].name",
                SDS_DEFAULT,
            )?;
            Ok(OwnCert::Workload)
        }
        ([cert], []) => {
            let f = "common_tls_context.tls_certificates[0]";
            let chain = pem_certs(
                &pem(
                    cert.certificate_chain.as_ref(),
                    &format!("{f}.certificate_chain"),
                )?,
                &format!("{f}.certificate_chain"),
            )?;
            let key_pem = pem(cert.private_key.as_ref(), &format!("{f}.private_key"))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                fail(
                    &format!("{f}.private_key"),
                    format!("not a PEM private key: {e}"),
                )
            })?;
            let signer = provider()
                .key_provider
                .load_private_key(key)
                .map_err(|e| fail(&format!("{f}.private_key"), e.to_string()))?;
            let certified = rustls::sign::CertifiedKey::new(chain, signer);
            certified.keys_match().map_err(|e| {
                fail(
                    f,
                    format!("the certificate and key do not go together: {e}"),
                )
            })?;
            Ok(OwnCert::Static(Arc::new(certified)))
        }
        ([_], [_]) => Err(fail(
            "common_tls_context.tls_certificates",
            "give certificates either inline/in files or by SDS, not both",
        )),
        _ => Err(fail(
            "common_tls_context.tls_certificates",
            "exactly one certificate is supported",
        )),
    }
}

/// Where the roots that peer certificates must chain to come from.
#[derive(Debug, Clone)]
enum Roots {
    /// Certificates from a file or inline PEM: the trust anchors, and the certificates as given
    /// (a peer presenting one of them itself, a self-signed server, is trusted as OpenSSL and
    /// so Envoy trust it).
    Static(
        Arc<rustls::RootCertStore>,
        Arc<Vec<CertificateDer<'static>>>,
    ),
    Workload,
}

impl Roots {
    fn current(&self) -> Option<Arc<rustls::RootCertStore>> {
        match self {
            Roots::Static(r, _) => Some(r.clone()),
            Roots::Workload => crate::identity::global()
                .current()
                .map(|i| i.root_store.clone()),
        }
    }
}

/// One `match_subject_alt_names` entry (a peer SAN, URI, DNS, IP or email, must match one):
/// the route matcher's string rule; regexes are not taken for SANs.
fn san_rule(m: &StringMatcher, field: &str) -> Result<StringRule, Fail> {
    match &m.match_pattern {
        Some(
            string_matcher::MatchPattern::Exact(_)
            | string_matcher::MatchPattern::Prefix(_)
            | string_matcher::MatchPattern::Suffix(_)
            | string_matcher::MatchPattern::Contains(_),
        ) => string_rule(m).map_err(|r| fail(field, r)),
        _ => Err(fail(
            field,
            "only exact, prefix, suffix and contains SAN matchers are supported",
        )),
    }
}

/// A subject alternative name of a certificate, by kind.
pub enum San {
    Uri(String),
    Dns(String),
    /// An IP address or an email.
    Other(String),
}

/// The subject alternative names of a certificate, in their order (URIs, DNS names, IPs,
/// emails; other kinds are left out).
pub fn sans(der: &[u8]) -> Vec<San> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(San::Uri(u.to_string())),
            GeneralName::DNSName(d) => Some(San::Dns(d.to_string())),
            GeneralName::RFC822Name(e) => Some(San::Other(e.to_string())),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| San::Other(std::net::IpAddr::from(a).to_string())),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| San::Other(std::net::IpAddr::from(a).to_string())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The subject alternative names of a certificate, as strings (URIs, DNS names, IPs, emails).
pub fn subject_alt_names(der: &[u8]) -> Vec<String> {
    sans(der)
        .into_iter()
        .map(|n| match n {
            San::Uri(s) | San::Dns(s) | San::Other(s) => s,
        })
        .collect()
}

/// The first SPIFFE URI SAN of a certificate (the peer's principal, Istio's
/// `source.principal` without the scheme is derived from it).
pub fn spiffe_id(der: &[u8]) -> Option<String> {
    subject_alt_names(der)
        .into_iter()
        .find(|s| s.starts_with("spiffe://"))
}

/// How a peer's certificate is checked.
#[derive(Debug)]
struct PeerCheck {
    /// None: the peer is not verified (an upstream context without a validation context, as
    /// Envoy does).
    roots: Option<Roots>,
    sans: Vec<StringRule>,
    supported: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl PeerCheck {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(());
        };
        let Some(store) = roots.current() else {
            return Err(rustls::Error::General(
                "no mesh roots yet (the workload certificate has not been issued)".into(),
            ));
        };
        let given =
            matches!(roots, Roots::Static(_, certs) if certs.iter().any(|c| c == end_entity));
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(webpki_error(e)))?;
        let verified = if given {
            // Trusted as given; only its validity period is left to check.
            let current = x509_parser::parse_x509_certificate(end_entity)
                .ok()
                .map(|(_, c)| {
                    let t = now.as_secs() as i64;
                    c.validity().not_before.timestamp() <= t
                        && t <= c.validity().not_after.timestamp()
                });
            match current {
                Some(true) => Ok(()),
                Some(false) => Err(webpki::Error::CertExpired {
                    time: now,
                    not_after: now,
                }),
                None => Err(webpki::Error::BadDer),
            }
        } else {
            cert.verify_for_usage(
                self.supported.all,
                &store.roots,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_| ())
        };
        verified.map_err(|e| rustls::Error::InvalidCertificate(webpki_error(e)))?;
        if !self.sans.is_empty() {
            let names = subject_alt_names(end_entity);
            if !names.iter().any(|n| self.sans.iter().any(|m| m.matches(n))) {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Other(rustls::OtherError(Arc::new(SanMismatch(
                        names,
                    )))),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct SanMismatch(Vec<String>);

impl std::fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer SANs {:?} match none expected", self.0)
    }
}

impl std::error::Error for SanMismatch {}

fn webpki_error(e: webpki::Error) -> rustls::CertificateError {
    use webpki::Error as E;
    match e {
        E::BadDer | E::BadDerTime => rustls::CertificateError::BadEncoding,
        E::CertExpired { .. } | E::InvalidCertValidity => rustls::CertificateError::Expired,
        E::CertNotValidYet { .. } => rustls::CertificateError::NotValidYet,
        E::UnknownIssuer => rustls::CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => rustls::CertificateError::BadSignature,
        other => rustls::CertificateError::Other(rustls::OtherError(Arc::new(other))),
    }
}

fn peer_check(
    validation: Option<&common_tls_context::ValidationContextType>,
) -> Result<Option<PeerCheck>, Fail> {
    use common_tls_context::ValidationContextType as V;
    let supported = provider().signature_verification_algorithms;
    let field = "common_tls_context.validation_context";
    let from_context = |v: &CertificateValidationContext,
                        field: &str,
                        roots: Option<Roots>|
     -> Result<PeerCheck, Fail> {
        #[allow(deprecated)]
        let unsupported = !v.verify_certificate_spki.is_empty()
            || !v.verify_certificate_hash.is_empty()
            || v.crl.is_some()
            || v.custom_validator_config.is_some()
            || v.only_verify_leaf_cert_crl
            || v.max_verify_depth.is_some();
        if unsupported {
            return Err(fail(
                field,
                "only trusted_ca and subject alt name matchers are supported",
            ));
        }
        let roots = match (roots, v.trusted_ca.as_ref()) {
            (Some(r), None) => r,
            (None, Some(ca)) => {
                let f = format!("{field}.trusted_ca");
                let mut store = rustls::RootCertStore::empty();
                let certs = pem_certs(&pem(Some(ca), &f)?, &f)?;
                for c in certs.iter().cloned() {
                    store.add(c).map_err(|e| fail(&f, e.to_string()))?;
                }
                Roots::Static(Arc::new(store), Arc::new(certs))
            }
            (Some(_), Some(_)) => {
                return Err(fail(
                    &format!("{field}.trusted_ca"),
                    "trusted_ca and an SDS validation context cannot both be given",
                ));
            }
            (None, None) => {
                return Err(fail(
                    &format!("{field}.trusted_ca"),
                    "trusted_ca is required",
                ));
            }
        };
        let mut sans = Vec::new();
        #[allow(deprecated)]
        for (i, m) in v.match_subject_alt_names.iter().enumerate() {
            sans.push(san_rule(
                m,
                &format!("{field}.match_subject_alt_names[{i}]"),
            )?);
        }
        for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
            let f = format!("{field}.match_typed_subject_alt_names[{i}]");
            let matcher = m
                .matcher
                .as_ref()
                .ok_or_else(|| fail(&f, "a matcher is required"))?;
            sans.push(san_rule(matcher, &f)?);
        }
        Ok(PeerCheck {
            roots: Some(roots),
            sans,
            supported,
        })
    };
    match validation {
        None => Ok(None),
        Some(V::ValidationContext(v)) => from_context(v, field, None).map(Some),
        Some(V::ValidationContextSdsSecretConfig(s)) => {
            sds_name(
                s,
                "common_tls_context.validation_context_sds_secret_config.name",
                SDS_ROOTCA,
            )?;
            Ok(Some(PeerCheck {
                roots: Some(Roots::Workload),
                sans: Vec::new(),
                supported,
            }))
        }
        Some(V::CombinedValidationContext(c)) => {
            let f = "common_tls_context.combined_validation_context";
            let sds = c
                .validation_context_sds_secret_config
                .as_ref()
                .ok_or_else(|| fail(f, "validation_context_sds_secret_config is required"))?;
            sds_name(
                sds,
                &format!("{f}.validation_context_sds_secret_config.name"),
                SDS_ROOTCA,
            )?;
            let default = c.default_validation_context.clone().unwrap_or_default();
            from_context(
                &default,
                &format!("{f}.default_validation_context"),
                Some(Roots::Workload),
            )
            .map(Some)
        }
        Some(_) => Err(fail(
            "common_tls_context.validation_context_type",
            "this validation context type is not supported",
        )),
    }
}

fn versions(
    common: &CommonTlsContext,
) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, Fail> {
    // rustls speaks TLS 1.2 and 1.3 only (no 1.0/1.1: Envoy's defaults do not offer them to
    // clients either); a maximum below 1.2 cannot be served.
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> =
        vec![&rustls::version::TLS13, &rustls::version::TLS12];
    let Some(p) = &common.tls_params else {
        return Ok(versions);
    };
    if !p.cipher_suites.is_empty()
        || !p.ecdh_curves.is_empty()
        || !p.signature_algorithms.is_empty()
    {
        return Err(fail(
            "common_tls_context.tls_params",
            "cipher suites, curves and signature algorithms are rustls's modern defaults; custom lists are not supported",
        ));
    }
    let max = TlsProtocol::try_from(p.tls_maximum_protocol_version).unwrap_or(TlsProtocol::TlsAuto);
    let min = TlsProtocol::try_from(p.tls_minimum_protocol_version).unwrap_or(TlsProtocol::TlsAuto);
    if matches!(max, TlsProtocol::TlSv10 | TlsProtocol::TlSv11) {
        return Err(fail(
            "common_tls_context.tls_params.tls_maximum_protocol_version",
            "TLS 1.0 and 1.1 are not supported",
        ));
    }
    if max == TlsProtocol::TlSv12 {
        versions = vec![&rustls::version::TLS12];
    }
    if min == TlsProtocol::TlSv13 {
        versions.retain(|v| v.version == rustls::ProtocolVersion::TLSv1_3);
    }
    if versions.is_empty() {
        return Err(fail(
            "common_tls_context.tls_params",
            "the minimum version is above the maximum",
        ));
    }
    Ok(versions)
}

fn common_checks(common: &CommonTlsContext) -> Result<(), Fail> {
    for (field, set) in [
        (
            "common_tls_context.custom_handshaker",
            common.custom_handshaker.is_some(),
        ),
        ("common_tls_context.key_log", common.key_log.is_some()),
    ] {
        if set {
            return Err(fail(field, "not supported by this weft-proxy version"));
        }
    }
    Ok(())
}

fn typed<'a>(
    ts: &'a TransportSocket,
    want: &str,
) -> Result<Option<&'a weft_xds_proto::wkt::Any>, Fail> {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return Err(fail("typed_config", "a typed_config is required"));
    };
    if any.type_url == RAW_BUFFER {
        return Ok(None);
    }
    if any.type_url != want {
        return Err(fail(
            "typed_config",
            format!(
                "transport socket {} is not supported ({want} and RawBuffer are)",
                any.type_url
            ),
        ));
    }
    Ok(Some(any))
}

/// Resolves our certificate per handshake, so a renewed workload certificate applies to the
/// next connection without rebuilding any config.
#[derive(Debug)]
struct Resolver(OwnCert);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.current()
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.current()
    }

    fn has_certs(&self) -> bool {
        !matches!(self.0, OwnCert::None)
    }
}

/// Presents the workload certificate as a TLS client (to weftd's TLS xDS port).
pub fn workload_client_cert() -> Arc<dyn rustls::client::ResolvesClientCert> {
    Arc::new(Resolver(OwnCert::Workload))
}

/// Verifies client certificates for a listener.
#[derive(Debug)]
struct ClientVerifier {
    check: PeerCheck,
    required: bool,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.check.supported)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.check.supported)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check.supported.supported_schemes()
    }
}

/// Verifies an upstream's certificate: chain and SANs, never the host name (as Envoy, which
/// checks only `match_subject_alt_names`).
#[derive(Debug)]
struct ServerVerifier(PeerCheck);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.supported)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.supported)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported.supported_schemes()
    }
}

/// A listener's TLS: the server configuration, and the same without ALPN for clients that
/// offer none of our protocols (BoringSSL, and so Envoy, then goes on without ALPN; rustls
/// alone would fail the handshake, and mesh clients offer `istio-peer-exchange`).
#[derive(Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    without_alpn: Arc<rustls::ServerConfig>,
    /// The certificate the handshakes present (for `x-forwarded-client-cert`'s `By`).
    own: OwnCert,
}

impl ServerTls {
    /// The configuration for a ClientHello that offers `offered` ALPN protocols.
    pub fn for_hello<'a>(
        &self,
        mut offered: impl Iterator<Item = &'a [u8]>,
    ) -> Arc<rustls::ServerConfig> {
        let ours = &self.config.alpn_protocols;
        if ours.is_empty() || offered.any(|p| ours.iter().any(|o| o == p)) {
            self.config.clone()
        } else {
            self.without_alpn.clone()
        }
    }

    /// The leaf certificate this listener presents now (the workload certificate follows its
    /// renewals).
    pub fn local_certificate(&self) -> Option<CertificateDer<'static>> {
        self.own.current().and_then(|k| k.cert.first().cloned())
    }

    /// Completes a TLS handshake on `stream`.
    pub async fn accept<S>(&self, stream: S) -> std::io::Result<tokio_rustls::server::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await?;
        let config = {
            let hello = start.client_hello();
            match hello.alpn() {
                Some(offered) => self.for_hello(offered),
                None => self.config.clone(),
            }
        };
        start.into_stream(config).await
    }
}

/// The TLS for a listener's transport socket (None: plaintext, a `RawBuffer` socket).
pub fn server_tls(ts: &TransportSocket) -> Result<Option<Arc<ServerTls>>, Fail> {
    let Some((config, own)) = server_parts(ts)? else {
        return Ok(None);
    };
    let mut without_alpn = (*config).clone();
    without_alpn.alpn_protocols.clear();
    Ok(Some(Arc::new(ServerTls {
        config,
        without_alpn: Arc::new(without_alpn),
        own,
    })))
}

/// The rustls server configuration for a listener's transport socket (None: plaintext, a
/// `RawBuffer` socket).
pub fn server_config(ts: &TransportSocket) -> Result<Option<Arc<rustls::ServerConfig>>, Fail> {
    Ok(server_parts(ts)?.map(|(config, _)| config))
}

/// The server configuration and where its certificate comes from.
fn server_parts(
    ts: &TransportSocket,
) -> Result<Option<(Arc<rustls::ServerConfig>, OwnCert)>, Fail> {
    let Some(any) = typed(ts, DOWNSTREAM_TLS)? else {
        return Ok(None);
    };
    let ctx: DownstreamTlsContext =
        weft_xds_proto::unpack(any).map_err(|e| fail("typed_config", e.to_string()))?;
    for (field, set) in [
        ("require_sni", ctx.require_sni.is_some_and(|b| b.value)),
        (
            "session_ticket_keys_type",
            ctx.session_ticket_keys_type.is_some(),
        ),
        ("ocsp_staple_policy", ctx.ocsp_staple_policy != 0),
    ] {
        if set {
            return Err(fail(field, "not supported by this weft-proxy version"));
        }
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    common_checks(&common)?;
    let own = own_cert(&common)?;
    if matches!(own, OwnCert::None) {
        return Err(fail(
            "common_tls_context.tls_certificates",
            "a listener needs a certificate (files, inline PEM or SDS \"default\")",
        ));
    }
    let versions = versions(&common)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| fail("common_tls_context.tls_params", e.to_string()))?;
    let require = ctx.require_client_certificate.is_some_and(|b| b.value);
    let builder = match peer_check(common.validation_context_type.as_ref())? {
        None if require => {
            return Err(fail(
                "require_client_certificate",
                "needs a validation context (trusted_ca or SDS \"ROOTCA\")",
            ));
        }
        None => builder.with_no_client_auth(),
        Some(check) => builder.with_client_cert_verifier(Arc::new(ClientVerifier {
            check,
            required: require,
        })),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Resolver(own.clone())));
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    Ok(Some((Arc::new(config), own)))
}

/// TLS towards an upstream: the client configuration and the SNI to send.
#[derive(Debug)]
pub struct UpstreamTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    /// The transport socket this was built from (equal sources: the same TLS).
    pub source: TransportSocket,
}

/// The TLS client for a cluster's (or a transport socket match's) transport socket. None: a
/// plaintext (`RawBuffer`) socket.
pub fn client_config(ts: &TransportSocket) -> Result<Option<Arc<UpstreamTls>>, Fail> {
    let Some(any) = typed(ts, UPSTREAM_TLS)? else {
        return Ok(None);
    };
    let ctx: UpstreamTlsContext =
        weft_xds_proto::unpack(any).map_err(|e| fail("typed_config", e.to_string()))?;
    if ctx.allow_renegotiation {
        return Err(fail(
            "allow_renegotiation",
            "renegotiation is not supported (rustls never renegotiates)",
        ));
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    common_checks(&common)?;
    let own = own_cert(&common)?;
    let versions = versions(&common)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| fail("common_tls_context.tls_params", e.to_string()))?;
    let check = peer_check(common.validation_context_type.as_ref())?.unwrap_or(PeerCheck {
        roots: None,
        sans: Vec::new(),
        supported: provider().signature_verification_algorithms,
    });
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier(check)));
    let mut config = builder.with_client_cert_resolver(Arc::new(Resolver(own)));
    config.alpn_protocols = common
        .alpn_protocols
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    // Envoy sends no SNI unless one is configured; rustls needs a name to build the hello,
    // so without one it sends none (an IP address name is never sent as SNI).
    let server_name = if ctx.sni.is_empty() {
        config.enable_sni = false;
        ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
    } else {
        ServerName::try_from(ctx.sni.clone()).map_err(|e| {
            fail(
                "sni",
                format!("{:?} is not a valid server name: {e}", ctx.sni),
            )
        })?
    };
    Ok(Some(Arc::new(UpstreamTls {
        config: Arc::new(config),
        server_name,
        source: ts.clone(),
    })))
}

/// What a ClientHello says about the server name.
#[derive(Debug, PartialEq, Eq)]
pub enum Sni {
    Found(String),
    /// A complete ClientHello without a server_name extension (or not a ClientHello).
    Absent,
    /// The bytes so far end before the ClientHello does.
    NeedMore,
}

/// The SNI of the TLS ClientHello at the start of `buf` (the first record), read without a TLS
/// library: record header, handshake header, version, random, session id, cipher suites,
/// compression methods, then the extensions up to `server_name` (type 0).
pub fn client_hello_sni(buf: &[u8]) -> Sni {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
        }
        fn u24(&mut self) -> Option<usize> {
            self.take(3)
                .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
        }
    }
    if buf.len() < 5 {
        return Sni::NeedMore;
    }
    if buf[0] != 0x16 {
        return Sni::Absent;
    }
    let record_len = usize::from(buf[3]) << 8 | usize::from(buf[4]);
    if buf.len() < 5 + record_len {
        return Sni::NeedMore;
    }
    let parse = || -> Option<Option<String>> {
        let mut r = Reader(&buf[5..5 + record_len]);
        if r.u8()? != 1 {
            return Some(None); // not a ClientHello
        }
        let _len = r.u24()?;
        r.take(2 + 32)?; // version, random
        let sid = r.u8()?;
        r.take(sid)?;
        let suites = r.u16()?;
        r.take(suites)?;
        let comp = r.u8()?;
        r.take(comp)?;
        let Some(ext_len) = r.u16() else {
            return Some(None); // no extensions
        };
        let mut ext = Reader(r.take(ext_len)?);
        while let Some(kind) = ext.u16() {
            let len = ext.u16()?;
            let data = ext.take(len)?;
            if kind != 0 {
                continue;
            }
            let mut d = Reader(data);
            let list = d.u16()?;
            let mut names = Reader(d.take(list)?);
            while let Some(name_type) = names.u8() {
                let n = names.u16()?;
                let name = names.take(n)?;
                if name_type == 0 {
                    return Some(std::str::from_utf8(name).ok().map(str::to_string));
                }
            }
        }
        Some(None)
    };
    match parse() {
        Some(Some(name)) => Sni::Found(name),
        // A ClientHello split over several records: the SNI was not in the first.
        _ => Sni::Absent,
    }
}

#[cfg(test)]
mod tests;
