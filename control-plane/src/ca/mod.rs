//! The mesh certificate authority: a root of trust (generated on first start, or an operator's
//! CA plugged in from a folder in Istio's `cacerts` layout), workload certificates carrying the
//! SPIFFE identity `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` as their only (URI) SAN, and the
//! Istio-compatible `CreateCertificate` service in [`service`]. Credentials are checked in
//! [`token`] (universal mode join tokens) and [`tokenreview`] (Kubernetes service-account tokens).
//!
//! State folder layout (the same file names as Istio's plugged-in CA):
//! `ca-cert.pem` (the signing certificate), `ca-key.pem` (its key, mode 0600), `root-cert.pem`
//! (the trust bundle: the active root first, a retiring root after it during a rotation) and
//! `cert-chain.pem` (the signing certificate up to its root).

pub mod secure;
pub mod service;
pub mod token;
pub mod tokenreview;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

/// weftd's state folder when none is given: /var/lib/weftd as root, else
/// ~/.local/state/weftd.
pub fn default_state_dir() -> PathBuf {
    if crate::running_as_root() {
        return PathBuf::from("/var/lib/weftd");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/state/weftd"))
        .unwrap_or_else(|| PathBuf::from(".weftd"))
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl SpiffeId {
    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`, the only shape Istio issues.
    pub fn parse(uri: &str) -> Option<SpiffeId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (td, ns_key, ns, sa_key, sa) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if parts.next().is_some() || ns_key != "ns" || sa_key != "sa" {
            return None;
        }
        if [td, ns, sa].iter().any(|s| s.is_empty()) {
            return None;
        }
        Some(SpiffeId {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("the CSR is malformed: {0}")]
    MalformedCsr(String),
    #[error(
        "the CSR asks for {asked}, but the credential proves {proven}; a workload can only get a certificate for its own identity"
    )]
    WrongIdentity { asked: String, proven: String },
    #[error("requested validity {asked_s}s is above the maximum workload certificate TTL {max_s}s")]
    TtlTooLong { asked_s: i64, max_s: u64 },
    #[error("requested validity {0}s is negative")]
    NegativeTtl(i64),
    #[error("signing failed: {0}")]
    Signing(String),
}

fn state_err(path: &Path, reason: impl fmt::Display) -> CaError {
    CaError::State {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// How the CA is set up.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    /// Where a generated root is kept (created with mode 0700; keys 0600).
    pub state_dir: PathBuf,
    /// An operator's CA in Istio's layout; when set, nothing is generated or rotated.
    pub plugged_dir: Option<PathBuf>,
    /// Lifetime of a generated root (Istio's default is 10 years).
    pub root_ttl: Duration,
    /// A generated root is replaced once less than this fraction of its lifetime is left; the
    /// old root stays in the trust bundle until it expires.
    pub rotate_at_remaining: f64,
    /// Workload certificate lifetime when a request asks for none (Istio: 24 h).
    pub default_ttl: Duration,
    /// The longest workload certificate the CA signs (Istio: 90 days).
    pub max_ttl: Duration,
}

impl CaOptions {
    pub fn new(trust_domain: &str, state_dir: &Path) -> CaOptions {
        CaOptions {
            trust_domain: trust_domain.to_string(),
            state_dir: state_dir.to_path_buf(),
            plugged_dir: None,
            root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
            rotate_at_remaining: 0.2,
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// The signing half of the CA.
pub struct Authority {
    pub options: CaOptions,
    issuer: Issuer<'static, KeyPair>,
    issuer_not_after: OffsetDateTime,
    /// The signing certificate and the intermediates up to (not including) the root.
    chain: Vec<String>,
    /// The trust bundle, one PEM string (active root first).
    roots: String,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.options.trust_domain)
            .field("issuer_not_after", &self.issuer_not_after)
            .finish_non_exhaustive()
    }
}

const CA_CERT: &str = "ca-cert.pem";
const CA_KEY: &str = "ca-key.pem";
const ROOT_CERT: &str = "root-cert.pem";
const CERT_CHAIN: &str = "cert-chain.pem";
/// A staged root (rotation step 1): trusted, not yet signing.
const NEXT_CERT: &str = "next-ca-cert.pem";
const NEXT_KEY: &str = "next-ca-key.pem";

fn read(dir: &Path, name: &str) -> Result<String, CaError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| state_err(&path, e))
}

/// Writes `contents` to `dir/name` atomically, created with `mode` (so a key is never readable
/// by others, not even for a moment).
pub fn write_private(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| state_err(&tmp, e))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| state_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| state_err(&path, e))
}

pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| state_err(dir, e))?;
    }
    Ok(())
}

fn pem_certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| state_err(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(state_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn to_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

fn not_after(der: &[u8], path: &Path) -> Result<OffsetDateTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| state_err(path, format!("not an X.509 certificate: {e}")))?;
    Ok(cert.validity().not_after.to_datetime())
}

fn not_before(der: &[u8], path: &Path) -> Result<OffsetDateTime, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| state_err(path, format!("not an X.509 certificate: {e}")))?;
    Ok(cert.validity().not_before.to_datetime())
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn now() -> OffsetDateTime {
    OffsetDateTime::from(SystemTime::now())
}

impl Authority {
    /// Loads the CA: the plugged-in folder when configured, else the state folder's root, else
    /// a new root (written to the state folder). A generated root close to its end is rotated.
    pub fn load_or_create(options: CaOptions) -> Result<Authority, CaError> {
        if let Some(dir) = options.plugged_dir.clone() {
            return Self::load(options, &dir);
        }
        let dir = options.state_dir.clone();
        ensure_private_dir(&dir)?;
        let mut ca = if dir.join(CA_KEY).exists() {
            Self::load(options, &dir)?
        } else {
            let ca = Self::generate(options)?;
            ca.persist()?;
            tracing::info!(target: "weftd::audit", dir = %dir.display(), trust_domain = %ca.options.trust_domain, "generated a new mesh root CA");
            ca
        };
        ca.rotate_if_due()?;
        Ok(ca)
    }

    fn load(options: CaOptions, dir: &Path) -> Result<Authority, CaError> {
        let cert_pem = read(dir, CA_CERT)?;
        let key_pem = read(dir, CA_KEY)?;
        let roots = read(dir, ROOT_CERT)?;
        let chain_pem = match read(dir, CERT_CHAIN) {
            Ok(c) => c,
            Err(_) => cert_pem.clone(),
        };
        let key_path = dir.join(CA_KEY);
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| state_err(&key_path, format!("not a usable private key: {e}")))?;
        let cert_path = dir.join(CA_CERT);
        let cert = pem_certs(&cert_pem, &cert_path)?;
        let root_certs = pem_certs(&roots, &dir.join(ROOT_CERT))?;
        let chain_certs = pem_certs(&chain_pem, &dir.join(CERT_CHAIN))?;
        let issuer = Issuer::from_ca_cert_der(&cert[0], key)
            .map_err(|e| state_err(&cert_path, format!("not a CA certificate: {e}")))?;
        // The chain the CA hands out stops below the roots (they travel separately).
        let chain = chain_certs
            .iter()
            .filter(|c| !root_certs.contains(c))
            .map(|c| to_pem(c))
            .collect();
        Ok(Authority {
            issuer_not_after: not_after(&cert[0], &cert_path)?,
            options,
            issuer,
            chain,
            roots,
        })
    }

    fn root_params(trust_domain: &str, ttl: Duration) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let start = now() - time::Duration::minutes(5);
        params.not_before = start;
        params.not_after = start + time::Duration::try_from(ttl).unwrap_or(time::Duration::DAY);
        params.serial_number = Some(random_serial());
        params
    }

    /// A new self-signed root.
    fn generate(options: CaOptions) -> Result<Authority, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let params = Self::root_params(&options.trust_domain, options.root_ttl);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let roots = to_pem(cert.der());
        Ok(Authority {
            issuer_not_after: params.not_after,
            issuer: Issuer::new(params, key),
            chain: Vec::new(),
            roots,
            options,
        })
    }

    fn persist(&self) -> Result<(), CaError> {
        let dir = &self.options.state_dir;
        let active_root = self.active_root_pem();
        write_private(
            dir,
            CA_KEY,
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )?;
        write_private(dir, CA_CERT, active_root.as_bytes(), 0o644)?;
        write_private(dir, CERT_CHAIN, active_root.as_bytes(), 0o644)?;
        write_private(dir, ROOT_CERT, self.roots.as_bytes(), 0o644)
    }

    fn active_root_pem(&self) -> String {
        CertificateDer::pem_slice_iter(self.roots.as_bytes())
            .next()
            .and_then(Result::ok)
            .map(|c| to_pem(&c))
            .unwrap_or_default()
    }

    /// Rotates a generated root in two steps, so that no workload ever meets a certificate
    /// its trust bundle cannot verify:
    /// 1. when less than `rotate_at_remaining` of the active root's life is left, a new root is
    ///    made and added to the trust bundle, but the old one keeps signing; workloads pick up
    ///    the bundle with their next certificate;
    /// 2. once every certificate signed before that has been renewed (`max_ttl` later), the
    ///    new root signs. The old root stays in the bundle until it expires.
    ///
    /// Returns whether anything changed. A plugged-in CA is rotated by its owner, not here.
    pub fn rotate_if_due(&mut self) -> Result<bool, CaError> {
        if self.options.plugged_dir.is_some() {
            return Ok(false);
        }
        let dir = self.options.state_dir.clone();
        let path = dir.join(ROOT_CERT);
        let roots = pem_certs(&self.roots, &path)?;
        let still_valid = |certs: &[CertificateDer<'static>]| -> Result<String, CaError> {
            let mut out = String::new();
            for r in certs {
                if not_after(r, &path)? > now() {
                    out.push_str(&to_pem(r));
                }
            }
            Ok(out)
        };
        if dir.join(NEXT_KEY).exists() {
            let next_pem = read(&dir, NEXT_CERT)?;
            let next = pem_certs(&next_pem, &dir.join(NEXT_CERT))?;
            let staged = not_before(&next[0], &dir.join(NEXT_CERT))? + time::Duration::minutes(5);
            let wait =
                time::Duration::try_from(self.options.max_ttl).unwrap_or(time::Duration::DAY);
            if now() < staged + wait {
                return Ok(false);
            }
            // Step 2: the staged root signs; the bundle lists it first.
            let others: Vec<_> = roots.into_iter().filter(|r| *r != next[0]).collect();
            let bundle = format!("{}{}", to_pem(&next[0]), still_valid(&others)?);
            let key = read(&dir, NEXT_KEY)?;
            write_private(&dir, CA_KEY, key.as_bytes(), 0o600)?;
            write_private(&dir, CA_CERT, next_pem.as_bytes(), 0o644)?;
            write_private(&dir, CERT_CHAIN, next_pem.as_bytes(), 0o644)?;
            write_private(&dir, ROOT_CERT, bundle.as_bytes(), 0o644)?;
            let _ = std::fs::remove_file(dir.join(NEXT_CERT));
            std::fs::remove_file(dir.join(NEXT_KEY))
                .map_err(|e| state_err(&dir.join(NEXT_KEY), e))?;
            *self = Self::load(self.options.clone(), &dir)?;
            tracing::info!(target: "weftd::audit", dir = %dir.display(), "the new mesh root CA signs from now on; the old root stays trusted until it expires");
            return Ok(true);
        }
        let active = &roots[0];
        let (start, end) = (not_before(active, &path)?, not_after(active, &path)?);
        let life = (end - start).as_seconds_f64();
        let left = (end - now()).as_seconds_f64();
        if life <= 0.0 || left > life * self.options.rotate_at_remaining {
            return Ok(false);
        }
        // Step 1: a new root joins the bundle (after the active one, which still signs).
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let cert = Self::root_params(&self.options.trust_domain, self.options.root_ttl)
            .self_signed(&key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let bundle = format!("{}{}", still_valid(&roots)?, to_pem(cert.der()));
        write_private(&dir, NEXT_KEY, key.serialize_pem().as_bytes(), 0o600)?;
        write_private(&dir, NEXT_CERT, to_pem(cert.der()).as_bytes(), 0o644)?;
        write_private(&dir, ROOT_CERT, bundle.as_bytes(), 0o644)?;
        self.roots = bundle;
        tracing::info!(target: "weftd::audit", dir = %dir.display(), old_root_expires = %end, "staged a new mesh root CA: it is trusted now and signs once every workload has renewed");
        Ok(true)
    }

    /// The trust bundle (PEM, active root first).
    pub fn roots_pem(&self) -> &str {
        &self.roots
    }

    /// Signs `csr_pem` for `identity`. The CSR must be well formed, correctly self-signed and
    /// ask for nothing but `identity` (one URI SAN); the certificate is built from the CA's own
    /// template, so nothing else the CSR asks for (CA bit, key usages, names) is honoured.
    /// Returns the chain: workload certificate, intermediates, trust bundle last.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested_ttl_s: i64,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::MalformedCsr(csr_error(&e)))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
                other => format!("{other:?}"),
            })
            .collect();
        let want = identity.to_string();
        if asked.len() != 1 || asked[0] != want {
            return Err(CaError::WrongIdentity {
                asked: if asked.is_empty() {
                    "no identity (the CSR has no URI SAN)".into()
                } else {
                    asked.join(", ")
                },
                proven: want,
            });
        }
        if csr.params.is_ca != IsCa::NoCa && !matches!(csr.params.is_ca, IsCa::ExplicitNoCa) {
            return Err(CaError::MalformedCsr(
                "the CSR asks for a CA certificate; workload certificates cannot sign".into(),
            ));
        }
        let ttl = match requested_ttl_s {
            s if s < 0 => return Err(CaError::NegativeTtl(s)),
            0 => self.options.default_ttl,
            s if (s as u64) > self.options.max_ttl.as_secs() => {
                return Err(CaError::TtlTooLong {
                    asked_s: s,
                    max_s: self.options.max_ttl.as_secs(),
                });
            }
            s => Duration::from_secs(s as u64),
        };
        let params = self.leaf_params(&want, ttl)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut out = vec![to_pem(cert.der())];
        out.extend(self.chain.iter().cloned());
        out.push(self.roots.clone());
        Ok(out)
    }
}

impl Authority {
    /// The CA's template for a certificate it issues: `identity` as the URI SAN and nothing
    /// in the subject, digital signature and key encipherment for server and client auth, a
    /// random serial, valid from a minute ago (clock skew between hosts, as Istio does) for
    /// `ttl`, never past the signing certificate.
    fn leaf_params(&self, identity: &str, ttl: Duration) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.try_into().map_err(|e| {
                CaError::Signing(format!("{identity}: {e:?}"))
            })?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = now() - time::Duration::minutes(1);
        params.not_after = (now() + time::Duration::try_from(ttl).unwrap_or(time::Duration::DAY))
            .min(self.issuer_not_after);
        Ok(params)
    }

    /// A certificate for weftd itself (the TLS xDS/CA port): a fresh key, the given DNS names
    /// and IPs plus weftd's own SPIFFE identity. Returns the chain (leaf, intermediates) and
    /// the PKCS#8 key, both PEM.
    pub fn issue_serving(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut params = self.leaf_params(&identity.to_string(), ttl)?;
        for d in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|e| CaError::Signing(format!("{d}: {e:?}")))?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut chain = to_pem(cert.der());
        for c in &self.chain {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn csr_error(e: &rcgen::Error) -> String {
    match e {
        rcgen::Error::CouldNotParseCertificationRequest => {
            "not a PEM-encoded PKCS#10 certificate request".into()
        }
        rcgen::Error::InvalidCertificationRequestSignature => {
            "its signature does not verify with its own public key".into()
        }
        rcgen::Error::UnsupportedExtension => {
            "it requests an extension the CA does not sign (only subjectAltName, key usage, extended key usage and basic constraints are understood)".into()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
