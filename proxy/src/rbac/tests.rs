use super::*;
use weft_xds_proto::envoy::config::rbac::v3::permission::Set as PermSet;
use weft_xds_proto::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use weft_xds_proto::wkt::UInt32Value;

fn exact(s: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(s.into())),
        ..Default::default()
    }
}

fn authenticated(name: &str) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(exact(name)),
            },
        )),
    }
}

fn port(p: u32) -> Permission {
    Permission {
        rule: Some(permission::Rule::DestinationPort(p)),
    }
}

fn down(principal: Option<&str>, peer: &str, local: &str) -> Downstream {
    Downstream {
        peer: Some(peer.parse().unwrap()),
        local: Some(local.parse().unwrap()),
        tls: principal.is_some(),
        principal: principal.map(Into::into),
        sni: None,
        tls_peer: None,
        ..Default::default()
    }
}

fn engine(action: rbac::Action, policies: Vec<(&str, Policy)>) -> Engine {
    Engine::from_xds(
        Some(&XdsRbac {
            action: action as i32,
            policies: policies
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ..Default::default()
        }),
        "rules",
    )
    .unwrap()
}

#[test]
fn cidr_ranges() {
    let c = Cidr::from_xds(&CidrRange {
        address_prefix: "10.1.0.0".into(),
        prefix_len: Some(UInt32Value { value: 16 }),
    })
    .unwrap();
    assert!(c.contains("10.1.200.3".parse().unwrap()));
    assert!(!c.contains("10.2.0.1".parse().unwrap()));
    assert!(
        c.contains("::ffff:10.1.0.9".parse().unwrap()),
        "v4-mapped v6"
    );
    let all = Cidr::from_xds(&CidrRange {
        address_prefix: "0.0.0.0".into(),
        prefix_len: Some(UInt32Value { value: 0 }),
    })
    .unwrap();
    assert!(all.contains("192.168.1.1".parse().unwrap()));
    assert!(
        Cidr::from_xds(&CidrRange {
            address_prefix: "10.0.0.0".into(),
            prefix_len: Some(UInt32Value { value: 33 }),
        })
        .is_err()
    );
}

#[test]
fn allow_deny_and_log() {
    let client = "spiffe://cluster.local/ns/default/sa/client";
    let policy = Policy {
        permissions: vec![port(9080)],
        principals: vec![authenticated(client)],
        ..Default::default()
    };
    let allow = engine(rbac::Action::Allow, vec![("p", policy.clone())]);
    let deny = engine(rbac::Action::Deny, vec![("p", policy.clone())]);
    let log = engine(rbac::Action::Log, vec![("p", policy)]);
    let me = down(Some(client), "127.0.0.1:5000", "127.0.0.2:9080");
    let other = down(
        Some("spiffe://cluster.local/ns/default/sa/x"),
        "127.0.0.1:5000",
        "127.0.0.2:9080",
    );
    let plain = down(None, "127.0.0.1:5000", "127.0.0.2:9080");
    let wrong_port = down(Some(client), "127.0.0.1:5000", "127.0.0.2:9090");
    let input = |d| Input {
        down: d,
        request: None,
        remote: None,
    };
    assert!(allow.allows(&input(&me)));
    assert!(!allow.allows(&input(&other)));
    assert!(
        !allow.allows(&input(&plain)),
        "no certificate: not authenticated"
    );
    assert!(!allow.allows(&input(&wrong_port)));
    assert!(!deny.allows(&input(&me)));
    assert!(deny.allows(&input(&other)));
    assert!(log.allows(&input(&me)) && log.allows(&input(&other)));
    assert_eq!(allow.denied.get(), 3);
    // The policy named in Envoy's response code details: the DENY policy that matched, or
    // `none` when no ALLOW policy did.
    assert_eq!(deny.denies(&input(&me)), Some("p"));
    assert_eq!(allow.denies(&input(&other)), Some("none"));
    assert_eq!(allow.denies(&input(&me)), None);
    // An ALLOW filter without policies denies everything; a filter without rules allows.
    assert!(!engine(rbac::Action::Allow, vec![]).allows(&input(&me)));
    assert!(Engine::from_xds(None, "rules").unwrap().allows(&input(&me)));
}

#[test]
fn combinators_and_http_rules() {
    let not_port = Permission {
        rule: Some(permission::Rule::NotRule(Box::new(port(9080)))),
    };
    let and = Permission {
        rule: Some(permission::Rule::AndRules(PermSet {
            rules: vec![
                not_port,
                Permission {
                    rule: Some(permission::Rule::UrlPath(
                        weft_xds_proto::envoy::r#type::matcher::v3::PathMatcher {
                            rule: Some(
                                weft_xds_proto::envoy::r#type::matcher::v3::path_matcher::Rule::Path(
                                    exact("/admin"),
                                ),
                            ),
                        },
                    )),
                },
            ],
        })),
    };
    let p = Policy {
        permissions: vec![and],
        principals: vec![Principal {
            identifier: Some(principal::Identifier::Any(true)),
        }],
        ..Default::default()
    };
    let e = engine(rbac::Action::Deny, vec![("admin", p)]);
    let headers = http::HeaderMap::new();
    let view = |path| RequestView {
        method: "GET",
        authority: "hello",
        path_and_query: path,
        headers: &headers,
    };
    let d = down(None, "127.0.0.1:1", "127.0.0.2:9090");
    let admin = view("/admin?x=1");
    let other = view("/other");
    assert!(
        !e.allows(&Input {
            down: &d,
            request: Some(&admin),
            remote: None,
        }),
        "path without query"
    );
    assert!(e.allows(&Input {
        down: &d,
        request: Some(&other),
        remote: None,
    }));
    // On a TCP connection the path rule cannot match.
    assert!(e.allows(&Input {
        down: &d,
        request: None,
        remote: None,
    }));
}

#[test]
fn unsupported_rules_are_refused_by_field() {
    let p = Policy {
        permissions: vec![Permission { rule: None }],
        principals: vec![],
        ..Default::default()
    };
    let err = Engine::from_xds(
        Some(&XdsRbac {
            policies: [("bad".to_string(), p)].into(),
            ..Default::default()
        }),
        "rules",
    )
    .unwrap_err();
    assert_eq!(err.0, "rules.policies[bad].permissions[0]");
}
