//! Envoy's RBAC filters (`envoy.filters.http.rbac`, `envoy.filters.network.rbac`), which is how
//! Istio's AuthorizationPolicy reaches a proxy: each filter holds policies and an action.
//! ALLOW lets a request through only when a policy matches, DENY refuses it when one matches,
//! LOG lets everything through. A policy matches when one of its permissions (what is asked
//! for: path, method, host, port, SNI, ...) and one of its principals (who asks: the peer's
//! mTLS identity, source IP, headers, ...) match.
//!
//! Metadata matchers (Istio's `requestPrincipals`, from JWT authentication) never match here:
//! weft has no JWT filter to set that metadata, as an Envoy without one would see it too.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use weft_xds_proto::envoy::config::core::v3::CidrRange;
use weft_xds_proto::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac as XdsRbac, permission, principal, rbac,
};

use crate::http::router::{HeaderMatch, RequestView, StringRule, header_match, string_rule};
use crate::listener::Downstream;

/// What a permission or principal can look at.
pub struct Input<'a> {
    pub down: &'a Downstream,
    /// None on a TCP connection (network RBAC): header and path rules never match.
    pub request: Option<&'a RequestView<'a>>,
    /// The trusted client address the connection manager found (`x-forwarded-for`): what
    /// `remote_ip` matches. None: the connection's peer.
    pub remote: Option<std::net::IpAddr>,
}

impl Input<'_> {
    fn path(&self) -> Option<&str> {
        self.request
            .map(|r| r.path_and_query.split('?').next().unwrap_or(""))
    }
}

/// An address prefix (`CidrRange`): RBAC's address rules and listeners' `prefix_ranges`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub ip: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn from_xds(c: &CidrRange) -> Result<Cidr, String> {
        let ip: IpAddr = c
            .address_prefix
            .parse()
            .map_err(|_| format!("{:?} is not an IP address", c.address_prefix))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = c.prefix_len.map(|l| l.value).unwrap_or(0);
        if len > max {
            return Err(format!("prefix length {len} is above {max}"));
        }
        Ok(Cidr { ip, len: len as u8 })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 peer matches IPv4 ranges, as Envoy does.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.ip, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug)]
enum Perm {
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Any,
    Header(HeaderMatch),
    Path(StringRule),
    DestinationIp(Cidr),
    DestinationPort(u32),
    DestinationPortRange(i64, i64),
    /// A metadata matcher: nothing here sets the metadata it reads.
    Metadata,
    Not(Box<Perm>),
    Sni(StringRule),
}

#[derive(Debug)]
enum Who {
    And(Vec<Who>),
    Or(Vec<Who>),
    Any,
    /// Authenticated by mTLS; the principal (SPIFFE URI) must match when a matcher is given.
    Authenticated(Option<StringRule>),
    DirectRemoteIp(Cidr),
    RemoteIp(Cidr),
    Header(HeaderMatch),
    Path(StringRule),
    Metadata,
    Not(Box<Who>),
}

fn perm(p: &Permission, field: &str) -> Result<Perm, (String, String)> {
    use permission::Rule as R;
    let bad = |r: String| (field.to_string(), r);
    #[allow(deprecated)]
    Ok(match &p.rule {
        Some(R::AndRules(s)) => Perm::And(perms(&s.rules, &format!("{field}.and_rules"))?),
        Some(R::OrRules(s)) => Perm::Or(perms(&s.rules, &format!("{field}.or_rules"))?),
        Some(R::Any(true)) => Perm::Any,
        Some(R::Any(false)) | None => return Err(bad("a permission rule is required".into())),
        Some(R::Header(h)) => Perm::Header(header_match(h).map_err(bad)?),
        Some(R::UrlPath(pm)) => match &pm.rule {
            Some(weft_xds_proto::envoy::r#type::matcher::v3::path_matcher::Rule::Path(m)) => {
                Perm::Path(string_rule(m).map_err(bad)?)
            }
            None => return Err(bad("url_path needs a path matcher".into())),
        },
        Some(R::DestinationIp(c)) => Perm::DestinationIp(Cidr::from_xds(c).map_err(bad)?),
        Some(R::DestinationPort(p)) => Perm::DestinationPort(*p),
        Some(R::DestinationPortRange(r)) => {
            Perm::DestinationPortRange(i64::from(r.start), i64::from(r.end))
        }
        Some(R::Metadata(_)) => Perm::Metadata,
        Some(R::NotRule(n)) => Perm::Not(Box::new(perm(n, &format!("{field}.not_rule"))?)),
        Some(R::RequestedServerName(m)) => Perm::Sni(string_rule(m).map_err(bad)?),
        Some(_) => {
            return Err(bad(
                "this permission rule is not supported (and/or/not, any, header, url_path, destination ip/port, requested_server_name, metadata are)"
                    .into(),
            ));
        }
    })
}

fn perms(ps: &[Permission], field: &str) -> Result<Vec<Perm>, (String, String)> {
    ps.iter()
        .enumerate()
        .map(|(i, p)| perm(p, &format!("{field}[{i}]")))
        .collect()
}

fn who(p: &Principal, field: &str) -> Result<Who, (String, String)> {
    use principal::Identifier as I;
    let bad = |r: String| (field.to_string(), r);
    #[allow(deprecated)]
    Ok(match &p.identifier {
        Some(I::AndIds(s)) => Who::And(whos(&s.ids, &format!("{field}.and_ids"))?),
        Some(I::OrIds(s)) => Who::Or(whos(&s.ids, &format!("{field}.or_ids"))?),
        Some(I::Any(true)) => Who::Any,
        Some(I::Any(false)) | None => return Err(bad("a principal identifier is required".into())),
        Some(I::Authenticated(a)) => Who::Authenticated(
            a.principal_name
                .as_ref()
                .map(string_rule)
                .transpose()
                .map_err(bad)?,
        ),
        Some(I::SourceIp(c)) | Some(I::DirectRemoteIp(c)) => {
            Who::DirectRemoteIp(Cidr::from_xds(c).map_err(bad)?)
        }
        Some(I::RemoteIp(c)) => Who::RemoteIp(Cidr::from_xds(c).map_err(bad)?),
        Some(I::Header(h)) => Who::Header(header_match(h).map_err(bad)?),
        Some(I::UrlPath(pm)) => match &pm.rule {
            Some(weft_xds_proto::envoy::r#type::matcher::v3::path_matcher::Rule::Path(m)) => {
                Who::Path(string_rule(m).map_err(bad)?)
            }
            None => return Err(bad("url_path needs a path matcher".into())),
        },
        Some(I::Metadata(_)) | Some(I::SourcedMetadata(_)) => Who::Metadata,
        Some(I::NotId(n)) => Who::Not(Box::new(who(n, &format!("{field}.not_id"))?)),
        Some(_) => {
            return Err(bad(
                "this principal identifier is not supported (and/or/not, any, authenticated, direct_remote_ip, remote_ip, header, url_path, metadata are)"
                    .into(),
            ));
        }
    })
}

fn whos(ps: &[Principal], field: &str) -> Result<Vec<Who>, (String, String)> {
    ps.iter()
        .enumerate()
        .map(|(i, p)| who(p, &format!("{field}[{i}]")))
        .collect()
}

impl Perm {
    fn matches(&self, input: &Input<'_>) -> bool {
        match self {
            Perm::And(v) => v.iter().all(|p| p.matches(input)),
            Perm::Or(v) => v.iter().any(|p| p.matches(input)),
            Perm::Any => true,
            Perm::Header(h) => input.request.is_some_and(|r| h.matches(r)),
            Perm::Path(m) => input.path().is_some_and(|p| m.matches(p)),
            Perm::DestinationIp(c) => input.down.local.is_some_and(|a| c.contains(a.ip())),
            Perm::DestinationPort(p) => input.down.local.is_some_and(|a| u32::from(a.port()) == *p),
            Perm::DestinationPortRange(lo, hi) => input
                .down
                .local
                .is_some_and(|a| (*lo..*hi).contains(&i64::from(a.port()))),
            Perm::Metadata => false,
            Perm::Not(p) => !p.matches(input),
            Perm::Sni(m) => input.down.sni.as_deref().is_some_and(|s| m.matches(s)),
        }
    }
}

impl Who {
    fn matches(&self, input: &Input<'_>) -> bool {
        let ip = |a: Option<SocketAddr>| a.map(|a| a.ip());
        match self {
            Who::And(v) => v.iter().all(|p| p.matches(input)),
            Who::Or(v) => v.iter().any(|p| p.matches(input)),
            Who::Any => true,
            Who::Authenticated(m) => match (&input.down.principal, m) {
                (Some(p), Some(m)) => m.matches(p),
                (Some(_), None) => true,
                // Without a client certificate nothing is authenticated.
                (None, _) => false,
            },
            Who::DirectRemoteIp(c) => ip(input.down.peer).is_some_and(|a| c.contains(a)),
            Who::RemoteIp(c) => input
                .remote
                .or_else(|| ip(input.down.peer))
                .is_some_and(|a| c.contains(a)),
            Who::Header(h) => input.request.is_some_and(|r| h.matches(r)),
            Who::Path(m) => input.path().is_some_and(|p| m.matches(p)),
            Who::Metadata => false,
            Who::Not(p) => !p.matches(input),
        }
    }
}

#[derive(Debug)]
struct CompiledPolicy {
    permissions: Vec<Perm>,
    principals: Vec<Who>,
}

impl CompiledPolicy {
    fn matches(&self, input: &Input<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(input))
            && self.principals.iter().any(|p| p.matches(input))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
}

/// One RBAC filter's rules.
#[derive(Debug)]
pub struct Engine {
    action: Action,
    /// None: the filter has no rules (everything passes, as in Envoy).
    policies: Option<BTreeMap<String, CompiledPolicy>>,
    pub allowed: crate::stats::Counter,
    pub denied: crate::stats::Counter,
}

impl Engine {
    /// Compiles a filter's `rules` (None: no rules).
    pub fn from_xds(rules: Option<&XdsRbac>, field: &str) -> Result<Engine, (String, String)> {
        let Some(r) = rules else {
            return Ok(Engine {
                action: Action::Allow,
                policies: None,
                allowed: Default::default(),
                denied: Default::default(),
            });
        };
        let action = match rbac::Action::try_from(r.action) {
            Ok(rbac::Action::Allow) => Action::Allow,
            Ok(rbac::Action::Deny) => Action::Deny,
            Ok(rbac::Action::Log) => Action::Log,
            Err(_) => {
                return Err((
                    format!("{field}.action"),
                    format!("unknown action {}", r.action),
                ));
            }
        };
        if r.audit_logging_options.is_some() {
            return Err((
                format!("{field}.audit_logging_options"),
                "audit loggers are not supported".into(),
            ));
        }
        let mut policies = BTreeMap::new();
        for (name, p) in &r.policies {
            policies.insert(
                name.clone(),
                policy(p, &format!("{field}.policies[{name}]"))?,
            );
        }
        Ok(Engine {
            action,
            policies: Some(policies),
            allowed: Default::default(),
            denied: Default::default(),
        })
    }

    /// Whether the filter lets the request (or connection) through; also counts it.
    pub fn allows(&self, input: &Input<'_>) -> bool {
        self.denies(input).is_none()
    }

    /// None when the filter lets the request (or connection) through, else the policy that
    /// denied it as Envoy names it in response code details: the matching DENY policy, or
    /// `none` when no ALLOW policy matched. Counts the decision.
    pub fn denies(&self, input: &Input<'_>) -> Option<&str> {
        let Some(policies) = &self.policies else {
            self.allowed.inc();
            return None;
        };
        let matched = policies.iter().find(|(_, p)| p.matches(input));
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        if allowed {
            self.allowed.inc();
            return None;
        }
        self.denied.inc();
        let policy = matched.map(|(n, _)| n.as_str()).unwrap_or("none");
        tracing::debug!(
            policy,
            principal = input.down.principal.as_deref().unwrap_or(""),
            "RBAC: access denied"
        );
        Some(policy)
    }
}

fn policy(p: &Policy, field: &str) -> Result<CompiledPolicy, (String, String)> {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return Err((
            format!("{field}.condition"),
            "CEL conditions are not supported".into(),
        ));
    }
    Ok(CompiledPolicy {
        permissions: perms(&p.permissions, &format!("{field}.permissions"))?,
        principals: whos(&p.principals, &format!("{field}.principals"))?,
    })
}

/// The HTTP filter's type URL.
pub const HTTP_FILTER: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
/// The network filter's type URL.
pub const NETWORK_FILTER: &str =
    "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

/// The HTTP RBAC filter's config.
pub fn http_filter(
    cfg: &weft_xds_proto::envoy::extensions::filters::http::rbac::v3::Rbac,
) -> Result<Engine, (String, String)> {
    if cfg.shadow_rules.is_some() || cfg.matcher.is_some() || cfg.shadow_matcher.is_some() {
        return Err((
            "shadow_rules".into(),
            "shadow rules and matcher trees are not supported".into(),
        ));
    }
    Engine::from_xds(cfg.rules.as_ref(), "rules")
}

/// The network RBAC filter's config.
pub fn network_filter(
    cfg: &weft_xds_proto::envoy::extensions::filters::network::rbac::v3::Rbac,
) -> Result<Engine, (String, String)> {
    if cfg.shadow_rules.is_some() || cfg.matcher.is_some() || cfg.shadow_matcher.is_some() {
        return Err((
            "shadow_rules".into(),
            "shadow rules and matcher trees are not supported".into(),
        ));
    }
    if cfg.delay_deny.is_some() {
        return Err(("delay_deny".into(), "not supported".into()));
    }
    Engine::from_xds(cfg.rules.as_ref(), "rules")
}

#[cfg(test)]
mod tests;
