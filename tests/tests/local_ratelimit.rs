//! The local rate limit filter, run by weft-proxy and by a stock Envoy on one static bootstrap:
//! the filter's own bucket, a route's replacing it (with another status), a virtual host's
//! shared by its routes, a route where the limit is enabled but not enforced, and descriptors
//! (buckets per request header value, per a virtual host's generic key) made by routes' and
//! virtual hosts' `rate_limits`, and buckets per downstream connection
//! (`local_rate_limit_per_downstream_connection`), and `x-ratelimit-*` and `retry-after`
//! headers (`enable_x_ratelimit_headers`, `enable_retry_after_header`). Status codes, headers, bodies and counters must be the same.

use std::net::SocketAddr;

use weft_e2e::{Client, Flavor, Standalone};

const PORT: u16 = 8080;
const LRL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

fn limit(prefix: &str, max: u32, status: Option<u16>, enforced: u32, extra: &str) -> String {
    let status = status
        .map(|s| format!(", status: {{ code: {s} }}"))
        .unwrap_or_default();
    format!(
        r#"{{ "@type": {LRL}, stat_prefix: {prefix}, token_bucket: {{ max_tokens: {max}, tokens_per_fill: 1, fill_interval: 60s }}, filter_enabled: {{ default_value: {{ numerator: 100 }} }}, filter_enforced: {{ default_value: {{ numerator: {enforced} }} }}{status}{extra} }}"#
    )
}

fn resources(ip: &str, backend: SocketAddr) -> String {
    let filter = limit(
        "listener_rl",
        4,
        None,
        100,
        ", response_headers_to_add: [{ header: { key: x-local-rate-limit, value: 'true' } }]",
    );
    let per_route = limit("route_rl", 2, Some(503), 100, "");
    let shadow = limit(
        "shadow_rl",
        1,
        None,
        0,
        ", request_headers_to_add_when_not_enforced: [{ header: { key: x-rl-shadow, value: 'over' } }]",
    );
    let vhost = limit("vhost_rl", 3, None, 100, "");
    // The answers tell of the bucket (a token a minute: the next is 60 s away).
    let told = limit(
        "xrl_rl",
        2,
        None,
        100,
        ", enable_x_ratelimit_headers: DRAFT_VERSION_03",
    );
    // A refused request is told when to come back.
    let retry_after = limit(
        "retry_rl",
        1,
        None,
        100,
        ", enable_retry_after_header: true",
    );
    // Two tokens for each downstream connection.
    let per_connection = limit(
        "conn_rl",
        2,
        None,
        100,
        ", local_rate_limit_per_downstream_connection: true",
    );
    // gRPC clients refused: UNAVAILABLE (429's), or RESOURCE_EXHAUSTED when asked.
    let grpc = limit("grpc_rl", 1, None, 100, "");
    let exhausted = limit(
        "exhausted_rl",
        1,
        None,
        100,
        ", rate_limited_as_resource_exhausted: true",
    );
    // One default bucket of 10; `client: alpha` has 2 tokens, the virtual host's key 3.
    let descriptors = limit(
        "desc_rl",
        10,
        None,
        100,
        ", descriptors: [{ entries: [{ key: client, value: alpha }], token_bucket: { max_tokens: 2, tokens_per_fill: 1, fill_interval: 60s } }, { entries: [{ key: generic_key, value: vh }], token_bucket: { max_tokens: 3, tokens_per_fill: 1, fill_interval: 60s } }]",
    );
    // Routes with a limit of their own, in match order (`/grpc-exhausted` before `/grpc`).
    let limited: String = [
        ("/route", &per_route),
        ("/grpc-exhausted", &exhausted),
        ("/grpc", &grpc),
        ("/shadow", &shadow),
        ("/told", &told),
        ("/retry-after", &retry_after),
        ("/conn", &per_connection),
    ]
    .iter()
    .map(|(prefix, rl)| {
        format!(
            "              - match: {{ prefix: {prefix} }}\n                route: {{ cluster: backend }}\n                typed_per_filter_config:\n                  envoy.filters.http.local_ratelimit: {rl}\n"
        )
    })
    .collect();
    let listener = Standalone::http_listener(
        ip,
        PORT,
        &format!(
            r#"          route_config:
            virtual_hosts:
            - name: shared
              domains: [shared.local]
              typed_per_filter_config:
                envoy.filters.http.local_ratelimit: {vhost}
              routes:
              - match: {{ prefix: /a }}
                route: {{ cluster: backend }}
              - match: {{ prefix: /b }}
                route: {{ cluster: backend }}
            - name: descriptors
              domains: [desc.local]
              rate_limits: [{{ actions: [{{ generic_key: {{ descriptor_value: vh }} }}] }}]
              typed_per_filter_config:
                envoy.filters.http.local_ratelimit: {descriptors}
              routes:
              - match: {{ prefix: /hdr }}
                route:
                  cluster: backend
                  rate_limits: [{{ actions: [{{ request_headers: {{ header_name: x-client, descriptor_key: client }} }}] }}]
              - match: {{ prefix: /match }}
                route:
                  cluster: backend
                  rate_limits: [{{ actions: [{{ header_value_match: {{ descriptor_value: post, headers: [{{ name: ":method", string_match: {{ exact: POST }} }}] }} }}] }}]
              - match: {{ prefix: /vh }}
                route: {{ cluster: backend }}
            - name: all
              domains: ["*"]
              routes:
{limited}              - match: {{ prefix: / }}
                route: {{ cluster: backend }}
"#
        ),
        &format!(
            r#"          - name: envoy.filters.http.local_ratelimit
            typed_config: {filter}
"#
        ),
    );
    format!(
        "{listener}  clusters:\n{}",
        Standalone::static_cluster("backend", &[backend], "")
    )
}

/// One answer, reduced to what both proxies must agree on.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    /// Body of a local reply (empty for the backend's answers).
    body: String,
    ratelimited: Option<String>,
    custom: Option<String>,
    /// Whether the backend saw the not-enforced header.
    shadow_header: bool,
    /// A gRPC local reply's status and message.
    grpc: Option<(String, String)>,
    /// `x-ratelimit-limit`, `-remaining` and `-reset`.
    told: Option<(String, String, String)>,
    retry_after: Option<String>,
}

fn burst(c: &mut Client, host: &str, paths: &[&str]) -> Vec<Answer> {
    let requests: Vec<(&str, &[(&str, &str)])> = paths.iter().map(|p| (*p, &[][..])).collect();
    burst_with(c, host, &requests)
}

/// As `burst`, each request with its own headers.
fn burst_with(c: &mut Client, host: &str, requests: &[(&str, &[(&str, &str)])]) -> Vec<Answer> {
    requests
        .iter()
        .map(|(p, headers)| {
            let r = c.request("GET", host, p, headers).unwrap();
            let from_backend = r.header("x-echo-name").is_some();
            Answer {
                status: r.status,
                body: if from_backend {
                    String::new()
                } else {
                    r.body.clone()
                },
                ratelimited: r.header("x-envoy-ratelimited").map(str::to_string),
                custom: r.header("x-local-rate-limit").map(str::to_string),
                shadow_header: from_backend && r.body.contains("x-rl-shadow: over"),
                grpc: (!from_backend).then(|| {
                    let h = |n| r.header(n).unwrap_or_default().to_string();
                    (h("grpc-status"), h("grpc-message"))
                }),
                retry_after: r.header("retry-after").map(str::to_string),
                told: r.header("x-ratelimit-limit").map(|limit| {
                    let h = |n| r.header(n).unwrap_or_default().to_string();
                    (
                        limit.to_string(),
                        h("x-ratelimit-remaining"),
                        h("x-ratelimit-reset"),
                    )
                }),
            }
        })
        .collect()
}

#[derive(Debug, PartialEq)]
struct Outcomes {
    listener: Vec<Answer>,
    route: Vec<Answer>,
    shadow: Vec<Answer>,
    vhost: Vec<Answer>,
    descriptors: Vec<Answer>,
    grpc: Vec<Answer>,
    /// Three requests on the first connection, three on a second, one more on the first.
    per_connection: Vec<Answer>,
    told: Vec<Answer>,
    stats: Vec<(String, u64)>,
}

fn run(flavor: Flavor, net: u8) -> Outcomes {
    let mut s = Standalone::new("local-ratelimit", net, flavor);
    let backend = s.backend("backend");
    s.start(&resources(&s.ip(), backend));
    let mut c = Client::new(format!("{}:{PORT}", s.ip()).parse().unwrap());
    let six = ["/x"; 6];
    let listener = burst(&mut c, "svc", &six);
    let route = burst(&mut c, "svc", &["/route"; 4]);
    let shadow = burst(&mut c, "svc", &["/shadow"; 3]);
    let vhost = burst(&mut c, "shared.local", &["/a", "/b", "/a", "/b"]);
    let alpha: &[(&str, &str)] = &[("x-client", "alpha")];
    let beta: &[(&str, &str)] = &[("x-client", "beta")];
    let descriptors = burst_with(
        &mut c,
        "desc.local",
        &[
            ("/hdr", alpha),
            ("/hdr", alpha),
            ("/hdr", alpha),
            ("/hdr", beta),
            ("/vh", &[]),
            ("/vh", &[]),
            ("/vh", &[]),
            ("/vh", &[]),
            ("/match", &[]),
            ("/match", &[]),
            ("/match", &[]),
            ("/match", &[]),
            ("/match", &[]),
        ],
    );
    let as_grpc: &[(&str, &str)] = &[("content-type", "application/grpc")];
    let grpc = burst_with(
        &mut c,
        "svc",
        &[
            ("/grpc/pkg.S/M", as_grpc),
            ("/grpc/pkg.S/M", as_grpc),
            ("/grpc-exhausted/pkg.S/M", as_grpc),
            ("/grpc-exhausted/pkg.S/M", as_grpc),
        ],
    );
    let mut told = burst(&mut c, "svc", &["/told"; 3]);
    told.extend(burst(&mut c, "svc", &["/retry-after"; 2]));
    let mut per_connection = burst(&mut c, "svc", &["/conn"; 3]);
    let mut second = Client::new(format!("{}:{PORT}", s.ip()).parse().unwrap());
    per_connection.extend(burst(&mut second, "svc", &["/conn"; 3]));
    per_connection.extend(burst(&mut c, "svc", &["/conn"]));
    let mut stats = Vec::new();
    for prefix in [
        "listener_rl",
        "route_rl",
        "shadow_rl",
        "vhost_rl",
        "desc_rl",
        "conn_rl",
        "xrl_rl",
        "retry_rl",
    ] {
        for stat in ["enabled", "enforced", "rate_limited", "ok"] {
            let name = format!("{prefix}.http_local_rate_limit.{stat}");
            stats.push((name.clone(), s.stat(&name)));
        }
    }
    let out = Outcomes {
        listener,
        route,
        shadow,
        vhost,
        descriptors,
        grpc,
        per_connection,
        told,
        stats,
    };
    eprintln!("{}: {out:#?}", flavor.name());
    out
}

#[test]
fn weft_proxy_and_envoy_rate_limit_alike() {
    let weft = run(Flavor::Weft, 92);
    let statuses = |a: &[Answer]| a.iter().map(|x| x.status).collect::<Vec<_>>();
    assert_eq!(statuses(&weft.listener), [200, 200, 200, 200, 429, 429]);
    assert_eq!(statuses(&weft.route), [200, 200, 503, 503]);
    assert_eq!(statuses(&weft.shadow), [200, 200, 200]);
    assert_eq!(
        weft.shadow
            .iter()
            .map(|a| a.shadow_header)
            .collect::<Vec<_>>(),
        [false, true, true],
        "requests over a limit that is not enforced pass with the extra header"
    );
    assert_eq!(statuses(&weft.vhost), [200, 200, 200, 429]);
    // `client: alpha` runs out after 2, `beta` has no descriptor of its own; the virtual host's
    // key (its `rate_limits`, for a route without its own) after 3; a GET makes no `post`
    // descriptor. Every request that passed took from the default bucket of 10: 4 of the 5
    // last pass.
    assert_eq!(
        statuses(&weft.descriptors),
        [
            200, 200, 429, 200, 200, 200, 200, 429, 200, 200, 200, 200, 429
        ]
    );
    assert_eq!(
        statuses(&weft.per_connection),
        [200, 200, 429, 200, 200, 429, 429],
        "each connection has two tokens of its own"
    );
    let told: Vec<_> = weft
        .told
        .iter()
        .map(|a| (a.status, a.told.clone(), a.retry_after.as_deref()))
        .collect();
    let t = |r: &str, s: &str| Some(("2".to_string(), r.to_string(), s.to_string()));
    assert_eq!(
        told,
        [
            (200, t("1", "0"), None),
            (200, t("0", "60"), None),
            (429, t("0", "60"), None),
            (200, None, None),
            (429, None, Some("60")),
        ],
        "the bucket's size, whole tokens left, seconds to the next one; when to come back"
    );
    let limited = &weft.listener[4];
    assert_eq!(limited.body, "local_rate_limited");
    assert_eq!(
        limited.ratelimited, None,
        "Envoy 1.40 sends no x-envoy-ratelimited for local limits"
    );
    assert_eq!(limited.custom.as_deref(), Some("true"));
    let grpc: Vec<_> = weft
        .grpc
        .iter()
        .map(|a| (a.status, a.grpc.clone()))
        .collect();
    let refused = |code: &str| Some((code.to_string(), "local_rate_limited".to_string()));
    assert_eq!(grpc[1], (200, refused("14")), "{grpc:?}");
    assert_eq!(grpc[3], (200, refused("8")), "{grpc:?}");
    let envoy = run(Flavor::Envoy, 93);
    assert_eq!(weft, envoy);
}
