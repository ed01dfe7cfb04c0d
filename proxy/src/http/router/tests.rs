use super::*;
use weft_xds_proto::envoy::config::route::v3::{RouteMatch, WeightedCluster, weighted_cluster};
use weft_xds_proto::wkt::{BoolValue, UInt32Value};

fn action(cluster: &str) -> Option<route::Action> {
    Some(route::Action::Route(XdsRouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    }))
}

fn rt(m: RouteMatch, cluster: &str) -> XdsRoute {
    XdsRoute {
        r#match: Some(m),
        action: action(cluster),
        ..Default::default()
    }
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}

fn table() -> RouteTable {
    let header = HeaderMatcher {
        name: "end-user".into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact("jason".into())),
                ignore_case: false,
            },
        )),
        ..Default::default()
    };
    let rc = RouteConfiguration {
        name: "8080".into(),
        virtual_hosts: vec![
            XdsVirtualHost {
                name: "reviews".into(),
                domains: vec!["reviews".into(), "reviews:8080".into()],
                routes: vec![
                    rt(
                        RouteMatch {
                            headers: vec![header],
                            ..prefix("/")
                        },
                        "v2",
                    ),
                    rt(
                        RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Path("/exact".into())),
                            ..Default::default()
                        },
                        "exact",
                    ),
                    rt(
                        RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::SafeRegex(
                                RegexMatcher {
                                    regex: "/r/[0-9]+".into(),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        },
                        "regex",
                    ),
                    rt(
                        RouteMatch {
                            case_sensitive: Some(BoolValue { value: false }),
                            ..prefix("/API")
                        },
                        "api",
                    ),
                    rt(prefix("/"), "v1"),
                ],
                ..Default::default()
            },
            XdsVirtualHost {
                name: "wild".into(),
                domains: vec!["*.example.com".into()],
                routes: vec![rt(prefix("/"), "wild")],
                ..Default::default()
            },
            XdsVirtualHost {
                name: "any".into(),
                domains: vec!["*".into()],
                routes: vec![rt(prefix("/"), "any")],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    RouteTable::from_xds(&rc).unwrap()
}

fn cluster_for(t: &RouteTable, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<String> {
    request_cluster(t, "GET", host, path, headers)
}

fn request_cluster(
    t: &RouteTable,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<String> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    t.route(&RequestView {
        method,
        authority: host,
        path_and_query: path,
        headers: &h,
    })
    .map(|r| match &r.action {
        Action::Forward(a) => a.cluster.pick().to_string(),
        Action::Redirect(_) => "redirect".to_string(),
        Action::Direct { .. } => "direct".to_string(),
    })
}

#[test]
fn matches_in_envoy_order() {
    let t = table();
    assert_eq!(
        cluster_for(&t, "reviews", "/x", &[("end-user", "jason")]).as_deref(),
        Some("v2")
    );
    assert_eq!(
        cluster_for(&t, "reviews:8080", "/x", &[("end-user", "mary")]).as_deref(),
        Some("v1")
    );
    assert_eq!(
        cluster_for(&t, "reviews", "/exact?q=1", &[]).as_deref(),
        Some("exact")
    );
    assert_eq!(
        cluster_for(&t, "reviews", "/exact/more", &[]).as_deref(),
        Some("v1")
    );
    assert_eq!(
        cluster_for(&t, "reviews", "/r/123", &[]).as_deref(),
        Some("regex")
    );
    assert_eq!(
        cluster_for(&t, "reviews", "/r/123x", &[]).as_deref(),
        Some("v1"),
        "safe_regex is a full match"
    );
    assert_eq!(
        cluster_for(&t, "reviews", "/api/v1", &[]).as_deref(),
        Some("api")
    );
    assert_eq!(
        cluster_for(&t, "REVIEWS", "/", &[]).as_deref(),
        Some("v1"),
        "domains are case-insensitive"
    );
    assert_eq!(
        cluster_for(&t, "a.example.com", "/", &[]).as_deref(),
        Some("wild")
    );
    assert_eq!(cluster_for(&t, "other", "/", &[]).as_deref(), Some("any"));
}

#[test]
fn weighted_clusters_split_proportionally() {
    let choice = ClusterChoice::Weighted {
        clusters: vec![("a".into(), 80), ("b".into(), 20)],
        total: 100,
    };
    let a = (0..10_000).filter(|_| choice.pick() == "a").count();
    assert!((7_600..8_400).contains(&a), "{a}");
}

#[test]
fn unsupported_route_features_are_rejected_by_field() {
    let table_of = |edit: &dyn Fn(&mut XdsRouteAction)| {
        let mut r = rt(prefix("/"), "c");
        if let Some(route::Action::Route(a)) = &mut r.action {
            edit(a);
        }
        RouteTable::from_xds(&RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![XdsVirtualHost {
                name: "vh".into(),
                domains: vec!["*".into()],
                routes: vec![r],
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    let secs = |s| {
        Some(weft_xds_proto::wkt::Duration {
            seconds: s,
            nanos: 0,
        })
    };
    type Edit<'a> = &'a dyn Fn(&mut XdsRouteAction);
    let cases: [(&str, Edit<'_>); 4] = [
        ("hash_policy", &|a| a.hash_policy = vec![Default::default()]),
        ("cluster_not_found_response_code", &|a| {
            a.cluster_not_found_response_code = 1
        }),
        ("upgrade_configs", &|a| {
            a.upgrade_configs = vec![Default::default()]
        }),
        ("internal_redirect_policy", &|a| {
            a.internal_redirect_policy = Some(Default::default())
        }),
    ];
    for (field, edit) in cases {
        let err = table_of(edit).unwrap_err().to_string();
        assert!(
            err.contains(&format!("virtual_hosts[0].routes[0].route.{field}")),
            "{err}"
        );
    }
    // A route's idle timeout is read: set, and zero (none at all).
    let idle = |t: &RouteTable| match &t.virtual_hosts[0].routes[0].action {
        Action::Forward(a) => a.idle_timeout,
        _ => panic!("a route"),
    };
    let t = table_of(&|a| a.idle_timeout = secs(7)).unwrap();
    assert_eq!(idle(&t), Some(Some(Duration::from_secs(7))));
    let t = table_of(&|a| a.idle_timeout = secs(0)).unwrap();
    assert_eq!(idle(&t), Some(None));
    assert_eq!(idle(&table_of(&|_| {}).unwrap()), None);
}

#[test]
fn unsupported_virtual_host_features_are_rejected_by_field() {
    let with = |edit: &dyn Fn(&mut XdsVirtualHost)| {
        let mut vh = XdsVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![rt(prefix("/"), "c")],
            ..Default::default()
        };
        edit(&mut vh);
        let rc = RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![vh],
            ..Default::default()
        };
        RouteTable::from_xds(&rc).unwrap_err().to_string()
    };
    let err = with(&|vh| vh.hedge_policy = Some(Default::default()));
    assert!(err.contains("virtual_hosts[0].hedge_policy"), "{err}");
    let err = with(&|vh| vh.response_headers_to_remove = vec!["x-a".into()]);
    assert!(
        err.contains("virtual_hosts[0].response_headers_to_remove"),
        "{err}"
    );
    let err = with(&|vh| vh.routes[0].request_body_buffer_limit = Some(Default::default()));
    assert!(
        err.contains("virtual_hosts[0].routes[0].request_body_buffer_limit"),
        "{err}"
    );
}

#[test]
fn attempt_counts_come_from_the_virtual_host() {
    let rc = |request: bool, response: bool| RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![XdsVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![rt(prefix("/"), "c")],
            include_request_attempt_count: request,
            include_attempt_count_in_response: response,
            ..Default::default()
        }],
        ..Default::default()
    };
    let flags = |request, response| {
        let table = RouteTable::from_xds(&rc(request, response)).unwrap();
        let h = http::HeaderMap::new();
        let route = table
            .route(&RequestView {
                method: "GET",
                authority: "a",
                path_and_query: "/",
                headers: &h,
            })
            .unwrap();
        match &route.action {
            Action::Forward(a) => (a.attempt_header, a.attempts_in_response),
            _ => panic!("not a forward"),
        }
    };
    assert_eq!(flags(true, false), (true, false));
    assert_eq!(flags(false, true), (false, true));
    assert_eq!(flags(false, false), (false, false));
}

#[test]
fn internal_only_headers_are_read_and_checked() {
    let mut rc = RouteConfiguration {
        name: "80".into(),
        internal_only_headers: vec!["x-internal".into()],
        ..Default::default()
    };
    let table = RouteTable::from_xds(&rc).unwrap();
    assert_eq!(table.internal_only, ["x-internal"]);
    rc.internal_only_headers.push("bad header".into());
    let err = RouteTable::from_xds(&rc).unwrap_err().to_string();
    assert!(err.contains("internal_only_headers[1]"), "{err}");
}

#[test]
fn zero_total_weight_and_duplicate_domains_are_rejected() {
    let wc = XdsRoute {
        r#match: Some(prefix("/")),
        action: Some(route::Action::Route(XdsRouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                WeightedCluster {
                    clusters: vec![weighted_cluster::ClusterWeight {
                        name: "a".into(),
                        weight: Some(UInt32Value { value: 0 }),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        })),
        ..Default::default()
    };
    let rc = RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![XdsVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![wc],
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(
        RouteTable::from_xds(&rc)
            .unwrap_err()
            .to_string()
            .contains("weighted_clusters")
    );
    let dup = RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![
            XdsVirtualHost {
                name: "a".into(),
                domains: vec!["x".into()],
                ..Default::default()
            },
            XdsVirtualHost {
                name: "b".into(),
                domains: vec!["x".into()],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    assert!(
        RouteTable::from_xds(&dup)
            .unwrap_err()
            .to_string()
            .contains("already used")
    );
}

#[test]
fn pseudo_headers_and_query_parameters_match_as_in_envoy() {
    use weft_xds_proto::envoy::config::route::v3::{
        HeaderMatcher, QueryParameterMatcher, header_matcher, query_parameter_matcher,
    };
    use weft_xds_proto::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
    let exact = |s: &str| StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(s.into())),
        ..Default::default()
    };
    let header = |name: &str, v: &str, invert: bool| HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(exact(v))),
        invert_match: invert,
        ..Default::default()
    };
    let route = |name: &str, m: RouteMatch| XdsRoute {
        name: name.into(),
        r#match: Some(m),
        action: Some(route::Action::Route(XdsRouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(name.into())),
            ..Default::default()
        })),
        ..Default::default()
    };
    let prefix = || Some(route_match::PathSpecifier::Prefix("/".into()));
    let rc = RouteConfiguration {
        name: "r".into(),
        virtual_hosts: vec![XdsVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![
                route(
                    "post-to-api",
                    RouteMatch {
                        path_specifier: prefix(),
                        headers: vec![
                            header(":method", "POST", false),
                            header(":authority", "api.example", false),
                        ],
                        ..Default::default()
                    },
                ),
                route(
                    "beta-users",
                    RouteMatch {
                        path_specifier: prefix(),
                        query_parameters: vec![QueryParameterMatcher {
                            name: "user".into(),
                            query_parameter_match_specifier: Some(
                                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                                    exact("a b"),
                                ),
                            ),
                        }],
                        ..Default::default()
                    },
                ),
                route(
                    "not-internal",
                    RouteMatch {
                        path_specifier: prefix(),
                        headers: vec![header("x-internal", "yes", true)],
                        ..Default::default()
                    },
                ),
                route(
                    "rest",
                    RouteMatch {
                        path_specifier: prefix(),
                        ..Default::default()
                    },
                ),
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let t = RouteTable::from_xds(&rc).unwrap();
    let hit = |method: &str, host: &str, path: &str, headers: &[(&str, &str)]| {
        request_cluster(&t, method, host, path, headers).unwrap()
    };
    assert_eq!(hit("POST", "api.example", "/x", &[]), "post-to-api");
    assert_eq!(
        hit("GET", "api.example", "/x", &[("x-internal", "yes")]),
        "rest"
    );
    assert_eq!(
        hit(
            "GET",
            "other",
            "/x?z=1&user=a%20b",
            &[("x-internal", "yes")]
        ),
        "beta-users",
        "query values are percent-decoded"
    );
    assert_eq!(
        hit("GET", "other", "/x?user=a", &[("x-internal", "no")]),
        "not-internal"
    );
    assert_eq!(
        hit("GET", "other", "/x?user=a", &[]),
        "rest",
        "an inverted value match does not match a missing header (Envoy)"
    );
}

#[test]
fn runtime_fractions_share_one_draw_and_grpc_matches_grpc_only() {
    use weft_xds_proto::envoy::config::core::v3::RuntimeFractionalPercent;
    use weft_xds_proto::envoy::r#type::v3::FractionalPercent;
    let share = |percent: u32| RouteMatch {
        runtime_fraction: Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: percent,
                denominator: 0,
            }),
            runtime_key: "routing.share".into(),
        }),
        ..prefix("/")
    };
    let grpc = RouteMatch {
        grpc: Some(Default::default()),
        ..prefix("/")
    };
    let t = RouteTable::from_xds(&RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![XdsVirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![
                rt(share(0), "never"),
                rt(grpc, "grpc"),
                rt(share(40), "first"),
                rt(share(40), "second"),
                rt(share(100), "rest"),
            ],
            ..Default::default()
        }],
        ..Default::default()
    })
    .unwrap();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..2000 {
        let c = cluster_for(&t, "a", "/", &[]).unwrap();
        *counts.entry(c).or_insert(0) += 1;
    }
    // Both 40% routes see the same draw: the second never gets what the first did not.
    assert_eq!(counts.get("never"), None);
    assert_eq!(counts.get("second"), None);
    assert_eq!(counts.get("grpc"), None);
    let first = counts["first"];
    assert!((650..=950).contains(&first), "{counts:?}");
    assert_eq!(first + counts["rest"], 2000);
    for (content_type, cluster) in [
        ("application/grpc", "grpc"),
        ("application/grpc+proto", "grpc"),
        ("application/grpc;charset=utf-8", "grpc"),
        ("application/grpc-web", "rest"),
        ("application/json", "rest"),
    ] {
        let got = (0..50)
            .map(|_| cluster_for(&t, "a", "/", &[("content-type", content_type)]).unwrap())
            .find(|c| c != "first");
        assert_eq!(got.as_deref(), Some(cluster), "{content_type}");
    }
}

#[test]
fn grpc_timeouts_are_read_capped_and_written_as_envoy_does() {
    let ms = Duration::from_millis;
    assert_eq!(parse_grpc_timeout(b"250m"), Some(ms(250)));
    assert_eq!(parse_grpc_timeout(b"2S"), Some(ms(2000)));
    assert_eq!(parse_grpc_timeout(b"1M"), Some(ms(60_000)));
    assert_eq!(parse_grpc_timeout(b"1H"), Some(ms(3_600_000)));
    // Sub-millisecond units round up.
    assert_eq!(parse_grpc_timeout(b"1500u"), Some(ms(2)));
    assert_eq!(parse_grpc_timeout(b"1n"), Some(ms(1)));
    for bad in [&b""[..], b"m", b"123456789m", b"12x", b"-1m", b"1.5S"] {
        assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
    }
    assert_eq!(grpc_timeout_value(ms(1500)), "1500m");
    assert_eq!(grpc_timeout_value(ms(100_000_000)), "100000S");
    let mut h = HeaderMap::new();
    let capped = GrpcTimeout {
        max: Some(ms(1000)),
        offset: None,
    };
    let uncapped = GrpcTimeout {
        max: None,
        offset: Some(ms(50)),
    };
    // No header: the cap, or no timeout at all.
    assert_eq!(capped.of(&h), Some(ms(1000)));
    assert_eq!(uncapped.of(&h), None);
    h.insert("grpc-timeout", "300m".parse().unwrap());
    assert_eq!(capped.of(&h), Some(ms(300)));
    assert_eq!(uncapped.of(&h), Some(ms(250)));
    h.insert("grpc-timeout", "5S".parse().unwrap());
    assert_eq!(capped.of(&h), Some(ms(1000)));
    // An offset that would leave nothing is not taken.
    h.insert("grpc-timeout", "40m".parse().unwrap());
    assert_eq!(uncapped.of(&h), Some(ms(40)));
}

#[test]
fn a_stream_duration_takes_the_grpc_timeout_when_told_to() {
    let ms = Duration::from_millis;
    let mut h = HeaderMap::new();
    let plain = StreamDuration {
        max: Some(ms(500)),
        grpc_header_max: None,
        grpc_header_offset: None,
    };
    let header = StreamDuration {
        max: None,
        grpc_header_max: Some(ms(300)),
        grpc_header_offset: Some(ms(20)),
    };
    let hcm = Some(ms(900));
    assert_eq!(plain.of(&h, hcm), Some(ms(500)));
    assert_eq!(header.of(&h, None), None, "no header, no max: no limit");
    assert_eq!(header.of(&h, hcm), hcm, "no max: the connection manager's");
    let zero = StreamDuration {
        max: Some(Duration::ZERO),
        ..plain
    };
    assert_eq!(
        zero.of(&h, hcm),
        None,
        "zero: none, nor the connection manager's"
    );
    h.insert("grpc-timeout", "100m".parse().unwrap());
    assert_eq!(
        plain.of(&h, hcm),
        Some(ms(500)),
        "the header is read only when asked"
    );
    assert_eq!(header.of(&h, hcm), Some(ms(80)));
    h.insert("grpc-timeout", "9S".parse().unwrap());
    assert_eq!(header.of(&h, hcm), Some(ms(280)), "capped, then the offset");
    h.insert("grpc-timeout", "10m".parse().unwrap());
    assert_eq!(
        header.of(&h, hcm),
        Some(ms(0)),
        "an offset over the time leaves none"
    );
}
