//! What the connection manager does to a request's forwarding headers before anything routes
//! it, as Envoy's does: `x-forwarded-for` and the trusted client address (`use_remote_address`,
//! `xff_num_trusted_hops`, `skip_xff_append`), `x-forwarded-proto`, internal requests
//! (`internal_address_config`, `x-envoy-internal`, `x-envoy-external-address`), `x-request-id`
//! (`generate_request_id`, `preserve_external_request_id`) and `x-forwarded-client-cert`
//! (`forward_client_cert_details`, `set_current_client_cert_details`).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};

use crate::listener::{Downstream, TlsPeer};
use crate::rbac::Cidr;

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
const EXTERNAL_ADDRESS: HeaderName = HeaderName::from_static("x-envoy-external-address");
/// Removed from edge requests (an external client must not claim them).
const EDGE_REMOVED: [&str; 3] = [
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
];

/// `forward_client_cert_details`: what happens to `x-forwarded-client-cert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    /// Removed (the default).
    Sanitize,
    /// Passed on as the client sent it, on mTLS connections only.
    ForwardOnly,
    /// This hop's element appended to the client's, on mTLS connections only.
    AppendForward,
    /// Replaced by this hop's element, on mTLS connections only.
    SanitizeSet,
    /// Passed on as the client sent it, whatever the connection.
    AlwaysForwardOnly,
}

/// `set_current_client_cert_details`: what this hop's element says of the client certificate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Details {
    subject: bool,
    uri: bool,
    cert: bool,
    chain: bool,
    dns: bool,
}

/// A connection manager's forwarding settings.
#[derive(Debug)]
pub struct Forwarding {
    use_remote_address: bool,
    trusted_hops: u32,
    skip_xff_append: bool,
    /// `internal_address_config.cidr_ranges`: unset, no address is internal (Envoy's default
    /// since it stopped trusting RFC 1918 addresses implicitly).
    internal: Vec<Cidr>,
    pub client_cert: ClientCert,
    details: Details,
    generate_request_id: bool,
    preserve_external_request_id: bool,
    /// `always_set_request_id_in_response`: every answer carries the request's id.
    pub always_set_request_id: bool,
}

impl Default for Forwarding {
    fn default() -> Self {
        Forwarding {
            use_remote_address: false,
            trusted_hops: 0,
            skip_xff_append: false,
            internal: Vec::new(),
            client_cert: ClientCert::Sanitize,
            details: Details::default(),
            generate_request_id: true,
            preserve_external_request_id: false,
            always_set_request_id: false,
        }
    }
}

/// Where a request comes from, as the connection manager decided.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin {
    /// The request counts as internal: Envoy's control headers and the route configuration's
    /// internal-only headers stay.
    pub internal: bool,
    /// The trusted client address (from `x-forwarded-for`, else the connection's peer): RBAC's
    /// `remote_ip` and the access log's downstream remote address.
    pub remote: Option<IpAddr>,
    /// `remote` came from `x-forwarded-for` (logged with port 0, as Envoy logs it).
    pub forwarded: bool,
    /// The client sent `x-envoy-*` headers (which the request path strips, see
    /// `strip_envoy_controls`).
    pub envoy_headers: bool,
}

impl Forwarding {
    /// Reads the settings; a field weft-proxy does not implement is refused, named.
    pub fn from_xds(hcm: &HttpConnectionManager) -> Result<Forwarding, (&'static str, String)> {
        use http_connection_manager::ForwardClientCertDetails as F;
        let refuse = |field: &'static str, what: &str| {
            Err((
                field,
                format!("{what} is not supported by this weft-proxy version"),
            ))
        };
        if !hcm.original_ip_detection_extensions.is_empty() {
            return refuse(
                "original_ip_detection_extensions",
                "client address detection by extension",
            );
        }
        if hcm.forward_client_cert_matcher.is_some() {
            return refuse(
                "forward_client_cert_matcher",
                "choosing the client certificate mode by matcher",
            );
        }
        if hcm.forward_proto_config.is_some() {
            return refuse("forward_proto_config", "x-forwarded-port/host settings");
        }
        if hcm.append_x_forwarded_port {
            return refuse("append_x_forwarded_port", "x-forwarded-port");
        }
        if !hcm.via.is_empty() {
            return refuse("via", "the via header");
        }
        if hcm.add_user_agent.as_ref().is_some_and(|b| b.value) {
            return refuse("add_user_agent", "x-envoy-downstream-service-cluster");
        }
        let client_cert = match F::try_from(hcm.forward_client_cert_details) {
            Ok(F::Sanitize) => ClientCert::Sanitize,
            Ok(F::ForwardOnly) => ClientCert::ForwardOnly,
            Ok(F::AppendForward) => ClientCert::AppendForward,
            Ok(F::SanitizeSet) => ClientCert::SanitizeSet,
            Ok(F::AlwaysForwardOnly) => ClientCert::AlwaysForwardOnly,
            Err(_) => {
                return Err((
                    "forward_client_cert_details",
                    format!("unknown value {}", hcm.forward_client_cert_details),
                ));
            }
        };
        let details = match &hcm.set_current_client_cert_details {
            None => Details::default(),
            Some(d) => {
                if d.issuer {
                    return refuse(
                        "set_current_client_cert_details.issuer",
                        "the certificate's issuer in x-forwarded-client-cert",
                    );
                }
                Details {
                    subject: d.subject.as_ref().is_some_and(|b| b.value),
                    uri: d.uri,
                    cert: d.cert,
                    chain: d.chain,
                    dns: d.dns,
                }
            }
        };
        let mut internal = Vec::new();
        if let Some(c) = &hcm.internal_address_config {
            for (i, r) in c.cidr_ranges.iter().enumerate() {
                internal.push(
                    Cidr::from_xds(r).map_err(|e| {
                        ("internal_address_config.cidr_ranges", format!("[{i}]: {e}"))
                    })?,
                );
            }
        }
        Ok(Forwarding {
            use_remote_address: hcm.use_remote_address.as_ref().is_some_and(|b| b.value),
            trusted_hops: hcm.xff_num_trusted_hops,
            skip_xff_append: hcm.skip_xff_append,
            internal,
            client_cert,
            details,
            generate_request_id: hcm.generate_request_id.as_ref().is_none_or(|b| b.value),
            preserve_external_request_id: hcm.preserve_external_request_id,
            always_set_request_id: hcm.always_set_request_id_in_response,
        })
    }

    /// This hop's `x-forwarded-client-cert` element for a connection's client certificate,
    /// made once per connection: `None` when the mode adds none.
    pub fn client_cert_element(&self, peer: &TlsPeer) -> Option<HeaderValue> {
        if !matches!(
            self.client_cert,
            ClientCert::AppendForward | ClientCert::SanitizeSet
        ) {
            return None;
        }
        let leaf = peer.chain.first()?;
        let mut parts: Vec<String> = Vec::new();
        if let Some(local) = &peer.local {
            for uri in sans(local).uris {
                parts.push(format!("By={uri}"));
            }
        }
        parts.push(format!(
            "Hash={}",
            hex(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref())
        ));
        let peer_sans = sans(leaf);
        if self.details.cert {
            parts.push(format!("Cert=\"{}\"", url_encode(&pem(leaf))));
        }
        if self.details.chain {
            let chain: String = peer.chain.iter().map(|c| pem(c)).collect();
            parts.push(format!("Chain=\"{}\"", url_encode(&chain)));
        }
        if self.details.subject {
            parts.push(format!("Subject=\"{}\"", subject_rfc2253(leaf)));
        }
        if self.details.uri {
            if peer_sans.uris.is_empty() {
                parts.push("URI=".into());
            }
            for uri in &peer_sans.uris {
                parts.push(format!("URI={uri}"));
            }
        }
        if self.details.dns {
            for dns in &peer_sans.dns {
                parts.push(format!("DNS={dns}"));
            }
        }
        HeaderValue::from_str(&parts.join(";")).ok()
    }

    /// Applies the settings to a request from `down` (`element`: the connection's own
    /// `x-forwarded-client-cert` element, see [`Forwarding::client_cert_element`]).
    pub fn apply(
        &self,
        headers: &mut HeaderMap,
        down: &Downstream,
        element: Option<&HeaderValue>,
    ) -> Origin {
        let peer = down.peer.map(|p| p.ip());
        let proto = HeaderValue::from_static(if down.tls { "https" } else { "http" });
        let present = Present::of(headers);
        let (remote, single, forwarded) = if self.use_remote_address {
            let single = !present.xff;
            let trusted = match self.trusted_hops {
                0 => None,
                n => last_xff(headers, n - 1).0,
            };
            if !self.skip_xff_append
                && let Some(ip) = peer
            {
                // A loopback peer is a local client: Envoy names this host instead.
                let ip = if ip.is_loopback() {
                    local_address()
                } else {
                    ip
                };
                append_xff(headers, ip);
            }
            // Behind trusted proxies, the first of them said which scheme the client used.
            if self.trusted_hops == 0 || !present.xfp {
                headers.insert(super::names::X_FORWARDED_PROTO, proto);
            }
            let forwarded = trusted.is_some();
            (trusted.or(peer), single, forwarded)
        } else {
            let found = if present.xff {
                last_xff(headers, self.trusted_hops)
            } else {
                (None, false)
            };
            if !present.xfp {
                headers.insert(super::names::X_FORWARDED_PROTO, proto);
            }
            (found.0, found.1, found.0.is_some())
        };
        let internal =
            single && remote.is_some_and(|ip| self.internal.iter().any(|c| c.contains(ip)));
        let remote = remote.or(peer);
        let edge = !internal && self.use_remote_address;
        if internal {
            headers.insert(INTERNAL, HeaderValue::from_static("true"));
        } else {
            if present.internal {
                headers.remove(INTERNAL);
            }
            if edge {
                for name in EDGE_REMOVED {
                    headers.remove(name);
                }
                if let Some(ip) = remote
                    && let Ok(v) = HeaderValue::from_str(&ip.to_string())
                {
                    headers.insert(EXTERNAL_ADDRESS, v);
                }
            }
        }
        if self.generate_request_id
            && ((edge && !self.preserve_external_request_id) || !present.request_id)
        {
            headers.insert(super::names::X_REQUEST_ID, super::request_id());
        }
        if present.xfcc || element.is_some() {
            self.client_cert(headers, down, element);
        }
        Origin {
            internal,
            remote,
            forwarded,
            envoy_headers: present.envoy,
        }
    }

    fn client_cert(
        &self,
        headers: &mut HeaderMap,
        down: &Downstream,
        element: Option<&HeaderValue>,
    ) {
        let mutual = down.tls_peer.is_some();
        match self.client_cert {
            ClientCert::AlwaysForwardOnly => {}
            ClientCert::ForwardOnly if mutual => {}
            ClientCert::AppendForward if mutual => {
                let Some(mine) = element else { return };
                let joined = match headers.get(XFCC) {
                    Some(theirs) if !theirs.is_empty() => {
                        let mut v = theirs.as_bytes().to_vec();
                        v.push(b',');
                        v.extend_from_slice(mine.as_bytes());
                        HeaderValue::from_bytes(&v).ok()
                    }
                    _ => Some(mine.clone()),
                };
                if let Some(v) = joined {
                    headers.insert(XFCC, v);
                }
            }
            ClientCert::SanitizeSet if mutual => match element {
                Some(mine) => {
                    headers.insert(XFCC, mine.clone());
                }
                None => {
                    headers.remove(XFCC);
                }
            },
            _ => {
                headers.remove(XFCC);
            }
        }
    }
}

/// Which of the headers this module reads a request has: one pass over the names instead of a
/// lookup for each (most requests have none of them).
#[derive(Default)]
struct Present {
    xff: bool,
    xfp: bool,
    xfcc: bool,
    internal: bool,
    request_id: bool,
    /// Any `x-envoy-*` name.
    envoy: bool,
}

impl Present {
    fn of(headers: &HeaderMap) -> Present {
        let mut p = Present::default();
        for name in headers.keys() {
            match name.as_str() {
                "x-forwarded-for" => p.xff = true,
                "x-forwarded-proto" => p.xfp = true,
                "x-forwarded-client-cert" => p.xfcc = true,
                "x-request-id" => p.request_id = true,
                n if n.starts_with("x-envoy-") => {
                    p.envoy = true;
                    p.internal |= n == "x-envoy-internal";
                }
                _ => {}
            }
        }
        p
    }
}

/// The address `x-forwarded-for` names after skipping `skip` entries from its end, and whether
/// the header held that one address only (as Envoy: several headers are one list, a
/// malformed entry gives none).
fn last_xff(headers: &HeaderMap, skip: u32) -> (Option<IpAddr>, bool) {
    let mut all = headers.get_all(XFF).iter();
    let Some(first) = all.next() else {
        return (None, false);
    };
    let joined;
    let list = if all.next().is_none() {
        first.to_str()
    } else {
        joined = headers
            .get_all(XFF)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect::<Vec<_>>()
            .join(",");
        Ok(joined.as_str())
    };
    let Ok(mut list) = list else {
        return (None, false);
    };
    for _ in 0..skip {
        match list.rfind(',') {
            Some(i) => list = &list[..i],
            None => return (None, false),
        }
    }
    let (entry, single) = match list.rfind(',') {
        Some(i) if i + 1 < list.len() => (&list[i + 1..], false),
        Some(_) => (list, false),
        None => (list, skip == 0),
    };
    match entry.trim().parse::<IpAddr>() {
        Ok(ip) => (Some(ip), single),
        Err(_) => (None, false),
    }
}

/// Appends `ip` to `x-forwarded-for` (a comma, no space, as Envoy).
fn append_xff(headers: &mut HeaderMap, ip: IpAddr) {
    let value = match headers.get(XFF) {
        Some(v) if !v.is_empty() => format!("{},{ip}", String::from_utf8_lossy(v.as_bytes())),
        _ => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(XFF, v);
    }
}

/// This host's address as Envoy's node knows it: the first non-loopback IPv4 address of its
/// interfaces, else 127.0.0.1.
fn local_address() -> IpAddr {
    static ADDRESS: OnceLock<IpAddr> = OnceLock::new();
    *ADDRESS.get_or_init(|| first_interface_v4().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)))
}

fn first_interface_v4() -> Option<IpAddr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let ip = ifa.address?.as_sockaddr_in()?.ip();
        (!ip.is_loopback()).then_some(IpAddr::V4(ip))
    })
}

struct Sans {
    uris: Vec<String>,
    dns: Vec<String>,
}

/// A certificate's URI and DNS names, in their order.
fn sans(der: &[u8]) -> Sans {
    use crate::tls::San;
    let mut out = Sans {
        uris: Vec::new(),
        dns: Vec::new(),
    };
    for name in crate::tls::sans(der) {
        match name {
            San::Uri(u) => out.uris.push(u),
            San::Dns(d) => out.dns.push(d),
            San::Other(_) => {}
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A certificate in PEM, lines of 64 characters.
fn pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

/// Percent-encodes all but RFC 3986's unreserved characters, upper-case hex (as Envoy's
/// `urlEncodedPemEncodedPeerCertificate`).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A certificate's subject as OpenSSL prints it with `XN_FLAG_RFC2253` (Envoy's
/// `subjectPeerCertificate`): the last RDN first, `,` between RDNs, `+` inside one, short
/// attribute names, RFC 2253 escapes, bytes past ASCII as `\XX`, unknown attributes as
/// `OID=#<DER in hex>`. Empty for a certificate with no subject.
fn subject_rfc2253(der: &[u8]) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return String::new();
    };
    let rdns: Vec<_> = cert.subject().iter().collect();
    let mut out = String::new();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            match (short_name(&oid), atv.as_str()) {
                (Some(name), Ok(value)) => {
                    out.push_str(name);
                    out.push('=');
                    escape_2253(value, &mut out);
                }
                (name, _) => {
                    out.push_str(name.unwrap_or(&oid));
                    out.push_str("=#");
                    let any = atv.attr_value();
                    out.push_str(&hex(&der_of(any.header.tag().0, any.data)));
                }
            }
        }
    }
    out
}

/// The DER of a primitive universal value: its tag, length and content.
fn der_of(tag: u32, data: &[u8]) -> Vec<u8> {
    let mut v = vec![u8::try_from(tag).unwrap_or(0)];
    let len = data.len();
    if len < 0x80 {
        v.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        v.push(0x80 | bytes.len() as u8);
        v.extend(bytes);
    }
    v.extend_from_slice(data);
    v
}

fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.17" => "postalCode",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.46" => "dnQualifier",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

fn escape_2253(value: &str, out: &mut String) {
    let bytes = value.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let special = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i + 1 == bytes.len() && b == b' ');
        if special {
            out.push('\\');
            out.push(char::from(b));
        } else if !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn down(peer: &str, tls_peer: Option<TlsPeer>) -> Downstream {
        Downstream {
            peer: Some(peer.parse().unwrap()),
            tls: tls_peer.is_some(),
            tls_peer: tls_peer.map(std::sync::Arc::new),
            ..Default::default()
        }
    }

    fn hcm(yaml_like: impl FnOnce(&mut HttpConnectionManager)) -> Forwarding {
        let mut h = HttpConnectionManager::default();
        yaml_like(&mut h);
        Forwarding::from_xds(&h).unwrap()
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn xff_is_read_from_the_right_skipping_trusted_hops() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1, 2.2.2.2,3.3.3.3")]);
        assert_eq!(last_xff(&h, 0), (Some("3.3.3.3".parse().unwrap()), false));
        assert_eq!(last_xff(&h, 1), (Some("2.2.2.2".parse().unwrap()), false));
        assert_eq!(last_xff(&h, 2), (Some("1.1.1.1".parse().unwrap()), false));
        assert_eq!(last_xff(&h, 3), (None, false));
        let one = headers(&[("x-forwarded-for", " 10.0.0.1 ")]);
        assert_eq!(last_xff(&one, 0), (Some("10.0.0.1".parse().unwrap()), true));
        let bad = headers(&[("x-forwarded-for", "1.1.1.1,not-an-ip")]);
        assert_eq!(last_xff(&bad, 0), (None, false));
        assert_eq!(last_xff(&HeaderMap::new(), 0), (None, false));
    }

    #[test]
    fn without_remote_address_xff_is_kept_and_decides_the_client() {
        let f = hcm(|h| {
            h.internal_address_config = Some(http_connection_manager::InternalAddressConfig {
                cidr_ranges: vec![weft_xds_proto::envoy::config::core::v3::CidrRange {
                    address_prefix: "10.0.0.0".into(),
                    prefix_len: Some(weft_xds_proto::wkt::UInt32Value { value: 8 }),
                }],
                ..Default::default()
            })
        });
        let mut h = headers(&[
            ("x-forwarded-for", "10.1.2.3"),
            ("x-forwarded-proto", "https"),
            ("x-envoy-internal", "false"),
        ]);
        let o = f.apply(&mut h, &down("127.0.0.1:5000", None), None);
        assert!(o.internal && o.forwarded);
        assert_eq!(o.remote, Some("10.1.2.3".parse().unwrap()));
        assert_eq!(get(&h, "x-forwarded-for"), Some("10.1.2.3"));
        // A client's x-forwarded-proto is kept when the remote address is not used.
        assert_eq!(get(&h, "x-forwarded-proto"), Some("https"));
        assert_eq!(get(&h, "x-envoy-internal"), Some("true"));
        assert!(h.contains_key("x-request-id"));
        // Two addresses: external, and the spoofed x-envoy-internal goes.
        let mut h = headers(&[
            ("x-forwarded-for", "10.9.9.9,10.1.2.3"),
            ("x-envoy-internal", "true"),
        ]);
        let o = f.apply(&mut h, &down("127.0.0.1:5000", None), None);
        assert!(!o.internal);
        assert_eq!(get(&h, "x-envoy-internal"), None);
        assert_eq!(get(&h, "x-forwarded-proto"), Some("http"));
        assert_eq!(get(&h, "x-envoy-external-address"), None);
    }

    #[test]
    fn edge_requests_append_the_peer_and_name_the_external_address() {
        let f =
            hcm(|h| h.use_remote_address = Some(weft_xds_proto::wkt::BoolValue { value: true }));
        let mut h = headers(&[
            ("x-forwarded-for", "8.8.8.8"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "client-chosen"),
            ("x-envoy-decorator-operation", "spoofed"),
        ]);
        let o = f.apply(&mut h, &down("192.0.2.7:4000", None), None);
        assert!(!o.internal);
        assert_eq!(o.remote, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(get(&h, "x-forwarded-for"), Some("8.8.8.8,192.0.2.7"));
        assert_eq!(get(&h, "x-forwarded-proto"), Some("http"));
        assert_eq!(get(&h, "x-envoy-external-address"), Some("192.0.2.7"));
        assert_eq!(get(&h, "x-envoy-decorator-operation"), None);
        assert_ne!(get(&h, "x-request-id"), Some("client-chosen"));
        // One trusted hop: the client is the address that hop appended.
        let f = hcm(|h| {
            h.use_remote_address = Some(weft_xds_proto::wkt::BoolValue { value: true });
            h.xff_num_trusted_hops = 1;
            h.skip_xff_append = true;
            h.preserve_external_request_id = true;
        });
        let mut h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-request-id", "client-chosen"),
        ]);
        let o = f.apply(&mut h, &down("192.0.2.7:4000", None), None);
        assert_eq!(o.remote, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(get(&h, "x-forwarded-for"), Some("203.0.113.9"));
        assert_eq!(get(&h, "x-envoy-external-address"), Some("203.0.113.9"));
        assert_eq!(get(&h, "x-request-id"), Some("client-chosen"));
    }

    fn cert(uri: &str, dn: &[(rcgen::DnType, &str)]) -> (Vec<u8>, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["svc.example".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        (params.self_signed(&key).unwrap().der().to_vec(), key)
    }

    #[test]
    fn the_client_certificate_element_says_what_envoy_says() {
        let (client, _) = cert(
            "spiffe://cluster.local/ns/a/sa/client",
            &[
                (rcgen::DnType::CountryName, "US"),
                (rcgen::DnType::OrganizationName, "Acme, Inc."),
                (rcgen::DnType::CommonName, " é#x "),
            ],
        );
        let (server, _) = cert("spiffe://cluster.local/ns/b/sa/server", &[]);
        let peer = TlsPeer {
            chain: vec![client.clone().into()],
            local: Some(server.into()),
        };
        let f = hcm(|h| {
            h.forward_client_cert_details =
                http_connection_manager::ForwardClientCertDetails::AppendForward as i32;
            h.set_current_client_cert_details =
                Some(http_connection_manager::SetCurrentClientCertDetails {
                    subject: Some(weft_xds_proto::wkt::BoolValue { value: true }),
                    uri: true,
                    dns: true,
                    ..Default::default()
                });
        });
        let element = f.client_cert_element(&peer).unwrap();
        let hash = hex(ring::digest::digest(&ring::digest::SHA256, &client).as_ref());
        assert_eq!(
            element.to_str().unwrap(),
            format!(
                "By=spiffe://cluster.local/ns/b/sa/server;Hash={hash};Subject=\"CN=\\ \\C3\\A9#x\\ ,O=Acme\\, Inc.,C=US\";URI=spiffe://cluster.local/ns/a/sa/client;DNS=svc.example"
            )
        );
        // Appended to the client's own on mTLS; removed on a plaintext connection.
        let mtls = down("127.0.0.1:1", Some(peer));
        let mut h = headers(&[("x-forwarded-client-cert", "By=earlier")]);
        f.apply(&mut h, &mtls, Some(&element));
        assert_eq!(
            get(&h, "x-forwarded-client-cert").unwrap(),
            format!("By=earlier,{}", element.to_str().unwrap())
        );
        let mut h = headers(&[("x-forwarded-client-cert", "By=spoofed")]);
        f.apply(&mut h, &down("127.0.0.1:1", None), None);
        assert_eq!(get(&h, "x-forwarded-client-cert"), None);
        // The default mode removes it everywhere; ALWAYS_FORWARD_ONLY keeps it everywhere.
        let mut h = headers(&[("x-forwarded-client-cert", "By=spoofed")]);
        Forwarding::default().apply(&mut h, &mtls, None);
        assert_eq!(get(&h, "x-forwarded-client-cert"), None);
        let always = hcm(|h| {
            h.forward_client_cert_details =
                http_connection_manager::ForwardClientCertDetails::AlwaysForwardOnly as i32
        });
        let mut h = headers(&[("x-forwarded-client-cert", "By=kept")]);
        always.apply(&mut h, &down("127.0.0.1:1", None), None);
        assert_eq!(get(&h, "x-forwarded-client-cert"), Some("By=kept"));
    }

    #[test]
    fn unsupported_fields_are_refused_by_name() {
        let mut h = HttpConnectionManager {
            via: "weft".into(),
            ..Default::default()
        };
        assert_eq!(Forwarding::from_xds(&h).unwrap_err().0, "via");
        h.via.clear();
        h.set_current_client_cert_details =
            Some(http_connection_manager::SetCurrentClientCertDetails {
                issuer: true,
                ..Default::default()
            });
        assert_eq!(
            Forwarding::from_xds(&h).unwrap_err().0,
            "set_current_client_cert_details.issuer"
        );
        h.set_current_client_cert_details = None;
        h.forward_client_cert_details = 9;
        assert_eq!(
            Forwarding::from_xds(&h).unwrap_err().0,
            "forward_client_cert_details"
        );
    }

    #[test]
    fn pem_and_url_encoding() {
        assert_eq!(url_encode("a b/\n-_.~Z"), "a%20b%2F%0A-_.~Z");
        let p = pem(&[0u8; 60]);
        assert!(p.starts_with("-----BEGIN CERTIFICATE-----\nAAAA"));
        assert_eq!(p.lines().nth(1).unwrap().len(), 64);
        assert!(p.ends_with("-----END CERTIFICATE-----\n"));
    }
}
