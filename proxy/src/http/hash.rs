//! Route hash policies (`RouteAction.hash_policy`): the request's hash for the ring hash and
//! maglev load balancers, from a header, a cookie (generated with a TTL when absent, as Envoy
//! does), the client's IP address or a query parameter. Several policies combine as in Envoy: each
//! new hash is mixed into the previous one, and a `terminal` policy that produced a hash ends the
//! list.

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderValue;
use weft_xds_proto::envoy::config::route::v3::route_action::HashPolicy as XdsHashPolicy;
use weft_xds_proto::envoy::config::route::v3::route_action::hash_policy::PolicySpecifier;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Header(http::HeaderName),
    Cookie {
        name: String,
        path: String,
        /// With a TTL, a request without the cookie gets one generated (and set on the answer).
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    pub key: Key,
    pub terminal: bool,
}

pub fn from_xds(policies: &[XdsHashPolicy]) -> Result<Vec<HashPolicy>, (String, String)> {
    let mut out = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        let field = |f: &str| format!("hash_policy[{i}].{f}");
        let key = match &p.policy_specifier {
            Some(PolicySpecifier::Header(h)) => {
                if h.regex_rewrite.is_some() {
                    return Err((field("header.regex_rewrite"), "not supported yet".into()));
                }
                Key::Header(
                    http::HeaderName::from_bytes(h.header_name.as_bytes()).map_err(|_| {
                        (
                            field("header.header_name"),
                            format!("{:?} is not a valid header name", h.header_name),
                        )
                    })?,
                )
            }
            Some(PolicySpecifier::Cookie(c)) => {
                if c.name.is_empty() {
                    return Err((field("cookie.name"), "a cookie name is required".into()));
                }
                if !c.attributes.is_empty() {
                    return Err((field("cookie.attributes"), "not supported yet".into()));
                }
                Key::Cookie {
                    name: c.name.clone(),
                    path: c.path.clone(),
                    ttl: c.ttl.as_ref().map(crate::duration),
                }
            }
            Some(PolicySpecifier::ConnectionProperties(c)) => {
                if !c.source_ip {
                    return Err((
                        field("connection_properties.source_ip"),
                        "must be true (the only connection property)".into(),
                    ));
                }
                Key::SourceIp
            }
            Some(PolicySpecifier::QueryParameter(q)) => {
                if q.name.is_empty() {
                    return Err((field("query_parameter.name"), "a name is required".into()));
                }
                Key::QueryParameter(q.name.clone())
            }
            Some(PolicySpecifier::FilterState(_)) => {
                return Err((field("filter_state"), "not supported".into()));
            }
            None => return Err((field("policy_specifier"), "a hash key is required".into())),
        };
        out.push(HashPolicy {
            key,
            terminal: p.terminal,
        });
    }
    Ok(out)
}

/// A 64-bit hash with good mixing (FNV-1a, then MurmurHash3's finalizer).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
    h ^ (h >> 33)
}

fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

fn query_param<'a>(uri: &'a http::Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The request's hash (None when no policy applies: the balancer then picks at random) and a
/// `Set-Cookie` value when a cookie had to be generated.
/// `peer`: the client's address, for the source IP policy and generated cookies.
pub fn compute(
    policies: &[HashPolicy],
    parts: &http::request::Parts,
    peer: Option<SocketAddr>,
) -> (Option<u64>, Option<HeaderValue>) {
    let mut hash: Option<u64> = None;
    let mut set_cookie = None;
    for p in policies {
        let new = match &p.key {
            Key::Header(name) => {
                let values: Vec<&[u8]> = parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                (!values.is_empty()).then(|| {
                    // Several values hash together, in order, as Envoy does.
                    values
                        .iter()
                        .map(|v| hash64(v))
                        .fold(0u64, |acc, h| acc.rotate_left(1) ^ h)
                })
            }
            Key::Cookie { name, path, ttl } => match cookie(&parts.headers, name) {
                Some(v) => Some(hash64(v.as_bytes())),
                None => ttl.and_then(|ttl| {
                    // A value derived from the client's address, so it lands where this
                    // client's later requests (carrying the cookie) will.
                    let peer = peer?;
                    let value = format!("{:016x}", hash64(peer.to_string().as_bytes()));
                    let mut header = format!("{name}=\"{value}\"");
                    if !ttl.is_zero() {
                        header.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                    }
                    if !path.is_empty() {
                        header.push_str(&format!("; Path={path}"));
                    }
                    header.push_str("; HttpOnly");
                    set_cookie = HeaderValue::from_str(&header).ok();
                    Some(hash64(value.as_bytes()))
                }),
            },
            Key::SourceIp => peer.map(|p| hash64(p.ip().to_string().as_bytes())),
            Key::QueryParameter(name) => {
                query_param(&parts.uri, name).map(|v| hash64(v.as_bytes()))
            }
        };
        if let Some(n) = new {
            hash = Some(hash.map_or(n, |h| h.rotate_left(1) ^ n));
        }
        if p.terminal && hash.is_some() {
            break;
        }
    }
    (hash, set_cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// The client's address.
    fn peer() -> Option<SocketAddr> {
        Some("10.0.0.7:41000".parse().unwrap())
    }

    fn policy(key: Key) -> Vec<HashPolicy> {
        vec![HashPolicy {
            key,
            terminal: false,
        }]
    }

    #[test]
    fn each_key_hashes_its_own_part_of_the_request() {
        let h = policy(Key::Header(http::HeaderName::from_static("x-user")));
        let a = compute(&h, &parts("/", &[("x-user", "jason")]), peer()).0;
        assert_eq!(
            a,
            compute(&h, &parts("/other", &[("x-user", "jason")]), peer()).0
        );
        assert_ne!(a, compute(&h, &parts("/", &[("x-user", "bob")]), peer()).0);
        assert_eq!(compute(&h, &parts("/", &[]), peer()).0, None);
        let q = policy(Key::QueryParameter("u".into()));
        assert_eq!(
            compute(&q, &parts("/?a=1&u=7", &[]), peer()).0,
            Some(hash64(b"7"))
        );
        assert_eq!(compute(&q, &parts("/?a=1", &[]), peer()).0, None);
        let ip = policy(Key::SourceIp);
        assert_eq!(
            compute(&ip, &parts("/", &[]), peer()).0,
            Some(hash64(b"10.0.0.7"))
        );
    }

    #[test]
    fn a_missing_cookie_with_a_ttl_is_generated_and_then_hashes_the_same() {
        let c = policy(Key::Cookie {
            name: "session".into(),
            path: "/".into(),
            ttl: Some(Duration::from_secs(60)),
        });
        let (first, set) = compute(&c, &parts("/", &[]), peer());
        let set = set.expect("a cookie is set").to_str().unwrap().to_string();
        assert!(
            set.starts_with("session=\"") && set.contains("Max-Age=60; Path=/; HttpOnly"),
            "{set}"
        );
        let value = set.split('"').nth(1).unwrap();
        let cookie = format!("other=1; session=\"{value}\"");
        let (again, none) = compute(&c, &parts("/", &[("cookie", &cookie)]), peer());
        assert_eq!(first, again);
        assert!(none.is_none());
        let no_ttl = policy(Key::Cookie {
            name: "session".into(),
            path: String::new(),
            ttl: None,
        });
        assert_eq!(compute(&no_ttl, &parts("/", &[]), peer()), (None, None));
    }

    #[test]
    fn terminal_policies_stop_the_list_once_they_hash() {
        let both = vec![
            HashPolicy {
                key: Key::Header(http::HeaderName::from_static("x-a")),
                terminal: true,
            },
            HashPolicy {
                key: Key::Header(http::HeaderName::from_static("x-b")),
                terminal: false,
            },
        ];
        let only_a = compute(&both, &parts("/", &[("x-a", "1"), ("x-b", "2")]), peer()).0;
        assert_eq!(only_a, Some(hash64(b"1")));
        let only_b = compute(&both, &parts("/", &[("x-b", "2")]), peer()).0;
        assert_eq!(only_b, Some(hash64(b"2")));
    }
}
