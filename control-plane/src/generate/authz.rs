//! AuthorizationPolicy -> Envoy RBAC on a workload's inbound listeners, as Istio builds it:
//! one RBAC filter per action, DENY before ALLOW (CUSTOM is refused by validation), AUDIT as a
//! LOG filter. No ALLOW policy means everything not denied is allowed; an ALLOW policy whose
//! rules match nothing denies everything.
//!
//! Each rule is a policy named `ns[<ns>]-policy[<name>]-rule[<i>]`: its permissions are the
//! OR of its `to` operations (each an AND of its fields) AND its destination conditions; its
//! principals the OR of its `from` sources AND its source conditions. On TCP chains
//! HTTP-only fields (hosts, methods, paths, request headers, request principals) cannot be
//! evaluated: an ALLOW rule using them is left out (it allows nothing), a DENY rule drops them
//! (it denies more), as Istio does.

use std::collections::HashMap;

use weft_xds_proto::envoy::config::core::v3::CidrRange;
use weft_xds_proto::envoy::config::listener::v3::{Filter, filter};
use weft_xds_proto::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, SourcedMetadata, permission, principal, rbac,
};
use weft_xds_proto::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use weft_xds_proto::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_filter,
};
use weft_xds_proto::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use weft_xds_proto::envoy::r#type::matcher::v3::{
    MetadataMatcher, PathMatcher, RegexMatcher, StringMatcher, ValueMatcher, metadata_matcher,
    path_matcher, string_matcher, value_matcher,
};
use weft_xds_proto::wkt::UInt32Value;
use weft_xds_proto::{pack, unpack};

use crate::config::{AuthorizationPolicySpec, AuthzAction, AuthzRule, Labels, Object};
use crate::model::{Mesh, ROOT_NAMESPACE, selector_matches};

/// The policies that apply to a workload: the root namespace's mesh-wide ones (and those whose
/// selector picks it), its namespace's namespace-wide ones and those whose selector picks it.
fn applicable<'a>(
    mesh: &'a Mesh,
    namespace: &str,
    labels: &Labels,
) -> Vec<&'a Object<AuthorizationPolicySpec>> {
    mesh.config
        .authorization_policies
        .iter()
        .filter(|p| p.namespace == namespace || p.namespace == ROOT_NAMESPACE)
        .filter(|p| match &p.spec.selector {
            None => true,
            Some(s) if s.match_labels.is_empty() => true,
            Some(s) => selector_matches(&s.match_labels, labels),
        })
        .map(|p| &**p)
        .collect()
}

/// Istio's authorization string match: `*` (any, here: presence), `prefix*`, `*suffix`, exact.
fn wild(v: &str, prefix: &str, ignore_case: bool) -> Option<StringMatcher> {
    use string_matcher::MatchPattern as M;
    let pattern = if v == "*" {
        return None;
    } else if let Some(p) = v.strip_suffix('*') {
        M::Prefix(format!("{prefix}{p}"))
    } else if let Some(s) = v.strip_prefix('*') {
        M::Suffix(s.to_string())
    } else {
        M::Exact(format!("{prefix}{v}"))
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case,
    })
}

fn regex(r: String) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    if ids.len() == 1 {
        return ids.into_iter().next().unwrap_or_default();
    }
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    if ids.is_empty() {
        return any_id();
    }
    if ids.len() == 1 {
        return ids.into_iter().next().unwrap_or_default();
    }
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
    }
}

fn not_id(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn any_id() -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Any(true)),
    }
}

fn or_rules(rules: Vec<Permission>) -> Permission {
    if rules.len() == 1 {
        return rules.into_iter().next().unwrap_or_default();
    }
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn and_rules(rules: Vec<Permission>) -> Permission {
    if rules.is_empty() {
        return any_rule();
    }
    if rules.len() == 1 {
        return rules.into_iter().next().unwrap_or_default();
    }
    Permission {
        rule: Some(permission::Rule::AndRules(permission::Set { rules })),
    }
}

fn not_rule(p: Permission) -> Permission {
    Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    }
}

fn any_rule() -> Permission {
    Permission {
        rule: Some(permission::Rule::Any(true)),
    }
}

fn cidr(v: &str) -> CidrRange {
    let (ip, len) = crate::config::validate::parse_cidr(v)
        .unwrap_or((std::net::IpAddr::from([0, 0, 0, 0]), 32));
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(UInt32Value {
            value: u32::from(len),
        }),
    }
}

/// A peer identity (`<td>/ns/<ns>/sa/<sa>`, wildcards allowed), matched on the mTLS SAN.
fn principal_id(v: &str) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(
                    wild(v, "spiffe://", false).unwrap_or_else(|| regex(".+".into())),
                ),
            },
        )),
    }
}

/// A peer namespace, from its SPIFFE identity.
fn namespace_id(v: &str) -> Principal {
    let ns = if v == "*" {
        "[^/]+".to_string()
    } else if let Some(p) = v.strip_suffix('*') {
        format!("{}[^/]*", escape(p))
    } else if let Some(s) = v.strip_prefix('*') {
        format!("[^/]*{}", escape(s))
    } else {
        escape(v)
    };
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(regex(format!(".*/ns/{ns}/.*"))),
            },
        )),
    }
}

/// The JWT principal (`requestPrincipals`): metadata only a JWT filter sets.
fn request_principal_id(v: &str) -> Principal {
    let value = wild(v, "", false).unwrap_or_else(|| regex(".+".into()));
    Principal {
        identifier: Some(principal::Identifier::SourcedMetadata(SourcedMetadata {
            metadata_source: 0, // DYNAMIC
            metadata_matcher: Some(MetadataMatcher {
                filter: "istio_authn".into(),
                path: vec![metadata_matcher::PathSegment {
                    segment: Some(metadata_matcher::path_segment::Segment::Key(
                        "request.auth.principal".into(),
                    )),
                }],
                value: Some(ValueMatcher {
                    match_pattern: Some(value_matcher::MatchPattern::StringMatch(value)),
                }),
                ..Default::default()
            }),
        })),
    }
}

fn header(name: &str, v: &str, ignore_case: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(match wild(v, "", ignore_case) {
            Some(m) => header_matcher::HeaderMatchSpecifier::StringMatch(m),
            None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        }),
        ..Default::default()
    }
}

fn header_rule(name: &str, v: &str, ignore_case: bool) -> Permission {
    Permission {
        rule: Some(permission::Rule::Header(header(name, v, ignore_case))),
    }
}

fn path_rule(v: &str) -> Permission {
    match wild(v, "", false) {
        None => any_rule(),
        Some(m) => Permission {
            rule: Some(permission::Rule::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(m)),
            })),
        },
    }
}

fn port_rule(v: &str) -> Permission {
    Permission {
        rule: Some(permission::Rule::DestinationPort(v.parse().unwrap_or(0))),
    }
}

/// `values` as an OR and `not_values` as NOT(OR), ANDed (either may be empty).
fn field<T>(
    values: &[String],
    not_values: &[String],
    f: impl Fn(&str) -> T,
) -> Vec<(bool, Vec<T>)> {
    let mut out = Vec::new();
    if !values.is_empty() {
        out.push((false, values.iter().map(|v| f(v)).collect()));
    }
    if !not_values.is_empty() {
        out.push((true, not_values.iter().map(|v| f(v)).collect()));
    }
    out
}

fn ids(parts: Vec<(bool, Vec<Principal>)>) -> Vec<Principal> {
    parts
        .into_iter()
        .map(|(negate, v)| if negate { not_id(or_ids(v)) } else { or_ids(v) })
        .collect()
}

fn rules(parts: Vec<(bool, Vec<Permission>)>) -> Vec<Permission> {
    parts
        .into_iter()
        .map(|(negate, v)| {
            if negate {
                not_rule(or_rules(v))
            } else {
                or_rules(v)
            }
        })
        .collect()
}

/// Whether a rule reads anything only HTTP has.
fn uses_http(rule: &AuthzRule) -> bool {
    rule.to.iter().any(|t| {
        let o = &t.operation;
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    }) || rule.from.iter().any(|f| {
        !(f.source.request_principals.is_empty() && f.source.not_request_principals.is_empty())
    }) || rule.when.iter().any(|c| c.key.starts_with("request."))
}

/// One rule as an Envoy policy; `http`: the chain is HTTP (else HTTP-only fields are dropped).
fn rule_policy(rule: &AuthzRule, td: &str, http: bool) -> Policy {
    let mut from_ors = Vec::new();
    for f in &rule.from {
        let s = &f.source;
        let mut and = Vec::new();
        and.extend(ids(field(&s.principals, &s.not_principals, principal_id)));
        let sa = |v: &str| match v.split_once('/') {
            Some((ns, sa)) => principal_id(&format!("{td}/ns/{ns}/sa/{sa}")),
            None => principal_id(&format!("{td}/ns/default/sa/{v}")),
        };
        and.extend(ids(field(&s.service_accounts, &s.not_service_accounts, sa)));
        and.extend(ids(field(&s.namespaces, &s.not_namespaces, namespace_id)));
        let direct = |v: &str| Principal {
            identifier: Some(principal::Identifier::DirectRemoteIp(cidr(v))),
        };
        let remote = |v: &str| Principal {
            identifier: Some(principal::Identifier::RemoteIp(cidr(v))),
        };
        and.extend(ids(field(&s.ip_blocks, &s.not_ip_blocks, direct)));
        and.extend(ids(field(
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            remote,
        )));
        if http {
            and.extend(ids(field(
                &s.request_principals,
                &s.not_request_principals,
                request_principal_id,
            )));
        }
        from_ors.push(and_ids(and));
    }
    let mut to_ors = Vec::new();
    for t in &rule.to {
        let o = &t.operation;
        let mut and = Vec::new();
        if http {
            and.extend(rules(field(&o.hosts, &o.not_hosts, |v| {
                header_rule(":authority", v, true)
            })));
            and.extend(rules(field(&o.methods, &o.not_methods, |v| {
                header_rule(":method", v, false)
            })));
            and.extend(rules(field(&o.paths, &o.not_paths, path_rule)));
        }
        and.extend(rules(field(&o.ports, &o.not_ports, port_rule)));
        to_ors.push(and_rules(and));
    }
    let mut perm_and = vec![if to_ors.is_empty() {
        any_rule()
    } else {
        or_rules(to_ors)
    }];
    let mut who_and = vec![if from_ors.is_empty() {
        any_id()
    } else {
        or_ids(from_ors)
    }];
    for c in &rule.when {
        let (vals, nots) = (&c.values, &c.not_values);
        match c.key.as_str() {
            "source.ip" => who_and.extend(ids(field(vals, nots, |v| Principal {
                identifier: Some(principal::Identifier::DirectRemoteIp(cidr(v))),
            }))),
            "remote.ip" => who_and.extend(ids(field(vals, nots, |v| Principal {
                identifier: Some(principal::Identifier::RemoteIp(cidr(v))),
            }))),
            "source.namespace" => who_and.extend(ids(field(vals, nots, namespace_id))),
            "source.principal" => who_and.extend(ids(field(vals, nots, principal_id))),
            "destination.ip" => perm_and.extend(rules(field(vals, nots, |v| Permission {
                rule: Some(permission::Rule::DestinationIp(cidr(v))),
            }))),
            "destination.port" => perm_and.extend(rules(field(vals, nots, port_rule))),
            "connection.sni" => perm_and.extend(rules(field(vals, nots, |v| Permission {
                rule: Some(permission::Rule::RequestedServerName(
                    wild(v, "", false).unwrap_or_else(|| regex(".+".into())),
                )),
            }))),
            key => {
                if let Some(name) = key
                    .strip_prefix("request.headers[")
                    .and_then(|k| k.strip_suffix(']'))
                    && http
                {
                    perm_and.extend(rules(field(vals, nots, |v| header_rule(name, v, false))));
                }
            }
        }
    }
    Policy {
        permissions: vec![and_rules(perm_and)],
        principals: vec![and_ids(who_and)],
        ..Default::default()
    }
}

/// The RBAC configs for a workload's inbound chain, in filter order: DENY, ALLOW, AUDIT (LOG).
/// Empty when no policy applies.
pub fn rbac_for(mesh: &Mesh, namespace: &str, labels: &Labels, http: bool) -> Vec<Rbac> {
    let td = mesh.settings.trust_domain();
    let policies = applicable(mesh, namespace, labels);
    let mut out = Vec::new();
    for (action, envoy_action) in [
        (AuthzAction::Deny, rbac::Action::Deny),
        (AuthzAction::Allow, rbac::Action::Allow),
        (AuthzAction::Audit, rbac::Action::Log),
    ] {
        let of_action: Vec<_> = policies
            .iter()
            .filter(|p| p.spec.action.unwrap_or(AuthzAction::Allow) == action)
            .collect();
        if of_action.is_empty() {
            continue;
        }
        let mut map = HashMap::new();
        for p in of_action {
            for (i, rule) in p.spec.rules.iter().flatten().enumerate() {
                if !http && action == AuthzAction::Allow && uses_http(rule) {
                    continue; // cannot match on TCP: allows nothing
                }
                map.insert(
                    format!("ns[{}]-policy[{}]-rule[{i}]", p.namespace, p.name()),
                    rule_policy(rule, td, http),
                );
            }
        }
        if map.is_empty() && action != AuthzAction::Allow {
            continue; // a DENY or AUDIT that matches nothing changes nothing
        }
        out.push(Rbac {
            action: envoy_action as i32,
            policies: map,
            ..Default::default()
        });
    }
    out
}

/// Puts the RBAC filters in front of an inbound HTTP connection manager's filters.
pub fn add_http_rbac(hcm_filter: &mut Filter, rules: &[Rbac]) {
    let Some(filter::ConfigType::TypedConfig(any)) = &hcm_filter.config_type else {
        return;
    };
    let Ok(mut hcm) = unpack::<HttpConnectionManager>(any) else {
        return;
    };
    let rbac: Vec<HttpFilter> = rules
        .iter()
        .map(|r| HttpFilter {
            name: "envoy.filters.http.rbac".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(&HttpRbac {
                rules: Some(r.clone()),
                ..Default::default()
            }))),
            ..Default::default()
        })
        .collect();
    hcm.http_filters.splice(0..0, rbac);
    hcm_filter.config_type = Some(filter::ConfigType::TypedConfig(pack(&hcm)));
}

/// The network RBAC filters for an inbound TCP chain (they go before the TCP proxy).
pub fn network_rbac(rules: &[Rbac], stat_prefix: &str) -> Vec<Filter> {
    rules
        .iter()
        .map(|r| Filter {
            name: "envoy.filters.network.rbac".into(),
            config_type: Some(filter::ConfigType::TypedConfig(pack(&NetworkRbac {
                rules: Some(r.clone()),
                stat_prefix: format!("{stat_prefix}."),
                ..Default::default()
            }))),
        })
        .collect()
}
