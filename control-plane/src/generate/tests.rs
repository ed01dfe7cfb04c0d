use super::*;
use crate::config::ConfigSet;
use weft_xds_proto::envoy::config::core::v3::Node;
use weft_xds_proto::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weft_xds_proto::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use weft_xds_proto::unpack;

pub(crate) const QUICKSTART: &str = r#"
apiVersion: v1
kind: Service
metadata: { name: hello, namespace: default }
spec:
  selector: { app: hello }
  ports: [{ name: http, port: 8080 }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: hello-v1 }
spec: { address: 127.0.0.11, labels: { app: hello, version: v1 }, ports: { http: 9080 } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: hello-v2 }
spec: { address: 127.0.0.12, labels: { app: hello, version: v2 }, ports: { http: 9080 } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: client }
spec: { address: 127.0.0.10, labels: { app: client } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hello }
spec:
  host: hello
  subsets: [{ name: v1, labels: { version: v1 } }, { name: v2, labels: { version: v2 } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello }
spec:
  hosts: [hello]
  http:
  - route:
    - { destination: { host: hello, subset: v1 }, weight: 80 }
    - { destination: { host: hello, subset: v2 }, weight: 20 }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: client }
spec:
  workloadSelector: { labels: { app: client } }
  egress:
  - port: { number: 8080, protocol: HTTP, name: egress-http }
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: hello-v1 }
spec:
  workloadSelector: { labels: { app: hello, version: v1 } }
  ingress:
  - port: { number: 9080, protocol: HTTP, name: http }
    bind: 127.0.0.11
    defaultEndpoint: 127.0.0.1:8081
  egress: [{ hosts: ["./*"] }]
"#;

/// The config of `yaml` (one file), sorted as the folder loader sorts it; every object valid.
pub(crate) fn config(yaml: &str) -> ConfigSet {
    let mut set = ConfigSet::default();
    let errors = set.add_file(std::path::Path::new("test.yaml"), yaml);
    assert!(errors.is_empty(), "{errors:?}");
    set.sort();
    set
}

fn mesh() -> Mesh {
    Mesh::build(&config(QUICKSTART))
}

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        ..Default::default()
    }
}

#[test]
fn client_gets_weighted_routes_and_subset_clusters() {
    let mesh = mesh();
    let proxy = ProxyNode::identify(
        &node("sidecar~127.0.0.10~client.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    assert_eq!(proxy.workload.as_ref().unwrap().name, "client");
    let g = generate(&mesh, &proxy);
    let clusters: Vec<&String> = g.of_type(type_url::CLUSTER).unwrap().keys().collect();
    assert_eq!(
        clusters,
        [
            "outbound|8080|v1|hello.default.svc.cluster.local",
            "outbound|8080|v2|hello.default.svc.cluster.local",
            "outbound|8080||hello.default.svc.cluster.local",
        ]
    );
    let listeners: Vec<&String> = g.of_type(type_url::LISTENER).unwrap().keys().collect();
    assert_eq!(listeners, ["127.0.0.1_8080"]);
    let rc: RouteConfiguration =
        unpack(&g.of_type(type_url::ROUTE_CONFIGURATION).unwrap()["8080"].any).unwrap();
    let vh = &rc.virtual_hosts[0];
    assert!(
        vh.domains.contains(&"hello".to_string()) && vh.domains.contains(&"hello:8080".to_string())
    );
    let Some(route::Action::Route(action)) = &vh.routes[0].action else {
        panic!("no route action")
    };
    let Some(route_action::ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier
    else {
        panic!("not weighted")
    };
    let weights: Vec<(String, u32)> = wc
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.unwrap().value))
        .collect();
    assert_eq!(
        weights,
        [
            (
                "outbound|8080|v1|hello.default.svc.cluster.local".to_string(),
                80
            ),
            (
                "outbound|8080|v2|hello.default.svc.cluster.local".to_string(),
                20
            )
        ]
    );
    let cla: ClusterLoadAssignment =
        unpack(&g.of_type(type_url::CLUSTER_LOAD_ASSIGNMENT).unwrap()["outbound|8080|v2|hello.default.svc.cluster.local"].any).unwrap();
    assert_eq!(
        cla.endpoints[0].lb_endpoints.len(),
        1,
        "the v2 subset has exactly the v2 workload"
    );
}

#[test]
fn server_gets_its_inbound_listener_and_cluster() {
    let mesh = mesh();
    let proxy = ProxyNode::identify(
        &node("sidecar~127.0.0.11~hello-v1.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    let g = generate(&mesh, &proxy);
    assert!(
        g.of_type(type_url::LISTENER)
            .unwrap()
            .contains_key("127.0.0.11_9080")
    );
    assert!(
        g.of_type(type_url::CLUSTER)
            .unwrap()
            .contains_key("inbound|9080||")
    );
}

#[test]
fn versions_change_only_with_content() {
    let mesh = mesh();
    let proxy = ProxyNode::identify(
        &node("sidecar~127.0.0.10~client.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    let a = generate(&mesh, &proxy);
    let b = generate(&mesh, &proxy);
    assert_eq!(
        a.type_version(type_url::CLUSTER, None),
        b.type_version(type_url::CLUSTER, None)
    );
    let other = ProxyNode::identify(
        &node("sidecar~127.0.0.11~hello-v1.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    let c = generate(&mesh, &other);
    assert_ne!(
        a.type_version(type_url::LISTENER, None),
        c.type_version(type_url::LISTENER, None)
    );
}

#[test]
fn timeouts_retries_and_faults_translate_as_istio_does() {
    let yaml = QUICKSTART.replace(
        "  - route:\n    - { destination: { host: hello, subset: v1 }, weight: 80 }",
        "  - match: [{ uri: { prefix: /f } }]\n    timeout: 1.5s\n    retries: { attempts: 3, perTryTimeout: 500ms, retryOn: \"gateway-error,409\" }\n    fault: { delay: { fixedDelay: 2s, percentage: { value: 12.5 } }, abort: { grpcStatus: UNAVAILABLE } }\n    route: [{ destination: { host: hello, subset: v1 } }]\n  - route:\n    - { destination: { host: hello, subset: v1 }, weight: 80 }",
    );
    let mesh = Mesh::build(&config(&yaml));
    let proxy = ProxyNode::identify(
        &node("sidecar~127.0.0.10~client.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    let g = generate(&mesh, &proxy);
    let rc: RouteConfiguration =
        unpack(&g.of_type(type_url::ROUTE_CONFIGURATION).unwrap()["8080"].any).unwrap();
    let routes = &rc.virtual_hosts[0].routes;
    let Some(route::Action::Route(a)) = &routes[0].action else {
        panic!()
    };
    assert_eq!(a.timeout.unwrap().seconds, 1);
    assert_eq!(a.timeout.unwrap().nanos, 500_000_000);
    let rp = a.retry_policy.as_ref().unwrap();
    assert_eq!(rp.retry_on, "gateway-error,retriable-status-codes");
    assert_eq!(rp.retriable_status_codes, [409]);
    assert_eq!(rp.num_retries.unwrap().value, 3);
    assert_eq!(rp.per_try_timeout.unwrap().nanos, 500_000_000);
    assert_eq!(
        rp.retry_host_predicate[0].name,
        "envoy.retry_host_predicates.previous_hosts"
    );
    let fault: weft_xds_proto::envoy::extensions::filters::http::fault::v3::HttpFault =
        unpack(&routes[0].typed_per_filter_config["envoy.filters.http.fault"]).unwrap();
    assert_eq!(
        fault.delay.unwrap().percentage.unwrap().numerator,
        125_000,
        "12.5% in millionths"
    );
    let abort = fault.abort.unwrap();
    assert_eq!(
        abort.percentage.unwrap().numerator,
        1_000_000,
        "unset percentage: 100%"
    );
    assert!(matches!(
        abort.error_type,
        Some(weft_xds_proto::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType::GrpcStatus(14))
    ));
    // A route without retries gets Istio's default policy; its timeout stays disabled.
    let Some(route::Action::Route(d)) = &routes[1].action else {
        panic!()
    };
    let dp = d.retry_policy.as_ref().unwrap();
    assert_eq!(
        dp.retry_on,
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    );
    assert_eq!(
        (
            dp.num_retries.unwrap().value,
            dp.retriable_status_codes.as_slice()
        ),
        (2, &[503][..])
    );
    assert_eq!(d.timeout.unwrap().seconds, 0);
}

#[test]
fn an_endpoint_only_change_regenerates_exactly_what_a_full_generation_would() {
    let client = node("sidecar~127.0.0.10~client.default~default.svc.cluster.local");
    let before = mesh();
    let proxy = ProxyNode::identify(&client, &before).unwrap();
    let old = generate(&before, &proxy);
    let moved = QUICKSTART.replace("address: 127.0.0.12", "address: 127.0.0.42");
    let set = config(&moved);
    let after = Mesh::build(&set);
    assert!(after.same_structure(&before), "only an endpoint moved");
    let proxy = ProxyNode::identify(&client, &after).unwrap();
    let incremental = regenerate_endpoints(&after, &proxy, &old);
    assert_eq!(incremental, generate(&after, &proxy));
    // The mesh as weftd builds it after such a change shares the untouched services; updating
    // only the load assignments of the others gives the same again.
    let shared = Mesh::build_after(&before, std::sync::Arc::new(set.clone()));
    let touched: std::collections::HashSet<String> = shared
        .services_changed_since(&before)
        .into_iter()
        .map(str::to_string)
        .collect();
    assert_eq!(
        touched,
        ["hello.default.svc.cluster.local".to_string()].into()
    );
    let some = regenerate_some_endpoints(&shared, &proxy, &old, Some(&touched));
    assert_eq!(some, generate(&shared, &proxy));
    assert_ne!(
        incremental.type_version(type_url::CLUSTER_LOAD_ASSIGNMENT, None),
        old.type_version(type_url::CLUSTER_LOAD_ASSIGNMENT, None)
    );
    for t in [
        type_url::CLUSTER,
        type_url::LISTENER,
        type_url::ROUTE_CONFIGURATION,
    ] {
        assert_eq!(incremental.type_version(t, None), old.type_version(t, None));
    }
    // A weight edit is structural: everything is generated again.
    let reweighted = QUICKSTART
        .replace("weight: 80", "weight: 70")
        .replace("weight: 20", "weight: 30");
    let set = config(&reweighted);
    assert!(!Mesh::build(&set).same_structure(&before));
}

#[test]
fn type_versions_of_a_subscribed_subset() {
    let mesh = mesh();
    let proxy = ProxyNode::identify(
        &node("sidecar~127.0.0.10~client.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    let g = generate(&mesh, &proxy);
    let t = type_url::CLUSTER_LOAD_ASSIGNMENT;
    let all: std::collections::BTreeSet<String> = g.of_type(t).unwrap().keys().cloned().collect();
    assert_eq!(g.type_version(t, Some(&all)), g.type_version(t, None));
    let mut some = all.clone();
    some.pop_first();
    some.insert("not-a-cluster".into());
    assert_ne!(g.type_version(t, Some(&some)), g.type_version(t, None));
    let mut again = some.clone();
    again.remove("not-a-cluster");
    assert_eq!(
        g.type_version(t, Some(&some)),
        g.type_version(t, Some(&again)),
        "names without a resource do not count"
    );
}

#[test]
fn export_to_hides_rules_and_service_entries_from_other_namespaces() {
    let extra = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hello-private, namespace: team-a }
spec:
  host: hello.default.svc.cluster.local
  exportTo: ["."]
  subsets: [{ name: private, labels: { version: v1 } }]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: hidden, namespace: default }
spec:
  hosts: [hidden.example.com]
  exportTo: [team-a]
  ports: [{ number: 80, name: http, protocol: HTTP }]
  resolution: STATIC
  endpoints: [{ address: 127.0.0.99 }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: a-client, namespace: team-a }
spec: { address: 127.0.0.50, labels: { app: a-client } }
"#;
    let set = config(&format!("{QUICKSTART}{extra}"));
    let mesh = Mesh::build(&set);
    let clusters = |id: &str| -> Vec<String> {
        let proxy = ProxyNode::identify(&node(id), &mesh).unwrap();
        generate(&mesh, &proxy)
            .of_type(type_url::CLUSTER)
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let default = clusters("sidecar~127.0.0.10~client.default~default.svc.cluster.local");
    // The default namespace sees hello's own rule (subsets v1, v2), not team-a's private one,
    // and not the ServiceEntry exported only to team-a.
    assert!(default.contains(&"outbound|8080|v1|hello.default.svc.cluster.local".to_string()));
    assert!(
        !default.iter().any(|c| c.contains("|private|")),
        "{default:?}"
    );
    assert!(
        !default.iter().any(|c| c.contains("hidden.example.com")),
        "{default:?}"
    );
    // team-a prefers its own rule and sees the entry.
    let team_a = clusters("sidecar~127.0.0.50~a-client.team-a~team-a.svc.cluster.local");
    assert!(team_a.contains(&"outbound|8080|private|hello.default.svc.cluster.local".to_string()));
    assert!(!team_a.iter().any(|c| c.contains("|v2|")), "{team_a:?}");
    assert!(team_a.contains(&"outbound|80||hidden.example.com".to_string()));
}

/// The `server_name` of the HTTP connection manager in a generated listener's first chain.
fn server_name(g: &Generated, listener: &str) -> String {
    hcm_of(g, listener).server_name
}

/// The HTTP connection manager of a listener's first filter chain.
fn hcm_of(
    g: &Generated,
    listener: &str,
) -> weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager
{
    use weft_xds_proto::envoy::config::listener::v3::{Listener, filter};
    let l: Listener = unpack(&g.of_type(type_url::LISTENER).unwrap()[listener].any).unwrap();
    let chain = l
        .filter_chains
        .first()
        .or(l.default_filter_chain.as_ref())
        .unwrap();
    let Some(filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else {
        panic!("{listener}: no typed config");
    };
    unpack(any).unwrap()
}

#[test]
fn tracing_reports_to_a_zipkin_cluster_as_istio_does() {
    use weft_xds_proto::envoy::config::cluster::v3::{Cluster, cluster};
    use weft_xds_proto::envoy::config::trace::v3::{ZipkinConfig, tracing::http::ConfigType};
    use weft_xds_proto::envoy::r#type::tracing::v3::custom_tag;
    let mut mesh = mesh();
    let server = ProxyNode::identify(
        &node("sidecar~127.0.0.11~hello-v1.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    // Off unless asked for.
    let g = generate(&mesh, &server);
    assert!(hcm_of(&g, "127.0.0.11_9080").tracing.is_none());
    assert!(!g.of_type(type_url::CLUSTER).unwrap().contains_key("zipkin"));
    mesh.settings.tracing =
        Some(crate::model::TracingSettings::parse("zipkin.istio-system:9411", 2.5).unwrap());
    let g = generate(&mesh, &server);
    let t = hcm_of(&g, "127.0.0.11_9080").tracing.expect("tracing");
    assert_eq!(t.random_sampling.unwrap().value, 2.5);
    let tags: Vec<(String, String)> = t
        .custom_tags
        .iter()
        .map(|c| match &c.r#type {
            Some(custom_tag::Type::Literal(l)) => (c.tag.clone(), l.value.clone()),
            // Istio's dry-run tags: the RBAC filter's shadow results in the request's metadata.
            Some(custom_tag::Type::Metadata(m)) => {
                let key = m.metadata_key.as_ref().expect("key");
                assert!(matches!(
                    m.kind.as_ref().and_then(|k| k.kind.as_ref()),
                    Some(weft_xds_proto::envoy::r#type::metadata::v3::metadata_kind::Kind::Request(_))
                ));
                let Some(weft_xds_proto::envoy::r#type::metadata::v3::metadata_key::path_segment::Segment::Key(path)) =
                    &key.path[0].segment
                else {
                    panic!("{key:?}")
                };
                (c.tag.clone(), format!("{}/{path}", key.key))
            }
            _ => panic!("{c:?}"),
        })
        .collect();
    let tag = |k: &str, v: &str| (k.to_string(), v.to_string());
    let rbac = "envoy.filters.http.rbac/istio_dry_run";
    assert_eq!(
        tags,
        [
            tag(
                "istio.authorization.dry_run.allow_policy.name",
                &format!("{rbac}_allow_shadow_effective_policy_id")
            ),
            tag(
                "istio.authorization.dry_run.allow_policy.result",
                &format!("{rbac}_allow_shadow_engine_result")
            ),
            tag(
                "istio.authorization.dry_run.deny_policy.name",
                &format!("{rbac}_deny_shadow_effective_policy_id")
            ),
            tag(
                "istio.authorization.dry_run.deny_policy.result",
                &format!("{rbac}_deny_shadow_engine_result")
            ),
            tag("istio.canonical_revision", "v1"),
            tag("istio.canonical_service", "hello"),
            tag("istio.mesh_id", "cluster.local"),
            tag("istio.namespace", "default"),
        ]
    );
    let provider = t.provider.unwrap();
    assert_eq!(provider.name, "envoy.tracers.zipkin");
    let Some(ConfigType::TypedConfig(any)) = &provider.config_type else {
        panic!("no typed config");
    };
    let z: ZipkinConfig = unpack(any).unwrap();
    assert_eq!(
        (z.collector_cluster.as_str(), z.collector_endpoint.as_str()),
        ("zipkin", "/api/v2/spans")
    );
    assert!(z.trace_id_128bit);
    assert_eq!(z.shared_span_context.map(|b| b.value), Some(false));
    let c: Cluster = unpack(&g.of_type(type_url::CLUSTER).unwrap()["zipkin"].any).unwrap();
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32
        ))
    );
    // Bad settings are refused with the reason.
    for (address, sampling) in [
        ("zipkin", 1.0),
        ("zipkin:0", 1.0),
        (":9411", 1.0),
        ("z:9411", 101.0),
    ] {
        assert!(crate::model::TracingSettings::parse(address, sampling).is_err());
    }
    let ip = crate::model::TracingSettings::parse("127.0.0.1:9411", 1.0).unwrap();
    let c = crate::generate::build::zipkin_cluster(&ip);
    assert_eq!(
        c.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32
        ))
    );
}

#[test]
fn inbound_listeners_answer_as_istio_envoy_outbound_as_envoy() {
    let mesh = mesh();
    let server = ProxyNode::identify(
        &node("sidecar~127.0.0.11~hello-v1.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    assert_eq!(
        server_name(&generate(&mesh, &server), "127.0.0.11_9080"),
        "istio-envoy"
    );
    let client = ProxyNode::identify(
        &node("sidecar~127.0.0.10~client.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    let g = generate(&mesh, &client);
    let outbound = g
        .of_type(type_url::LISTENER)
        .unwrap()
        .keys()
        .find(|k| k.starts_with("0.0.0.0_") || k.contains("_8080"))
        .cloned()
        .expect("an outbound listener");
    // Envoy's default ("envoy"), as Istio leaves it on outbound listeners.
    assert_eq!(server_name(&g, &outbound), "");
}

#[test]
fn a_destination_rules_tcp_settings_reach_the_tcp_proxy_and_the_cluster() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: { name: db, namespace: default }
spec:
  selector: { app: db }
  ports: [{ name: tcp, port: 5432 }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: db }
spec: { address: 127.0.0.21, labels: { app: db } }
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: client }
spec: { address: 127.0.0.10, labels: { app: client } }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db }
spec:
  host: db
  trafficPolicy:
    connectionPool:
      tcp:
        idleTimeout: 90s
        maxConnectionDuration: 30s
        tcpKeepalive: { time: 7s, interval: 1500ms, probes: 4 }
    portLevelSettings:
    - port: { number: 5433 }
      connectionPool: { tcp: { idleTimeout: 5s } }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: client }
spec:
  workloadSelector: { labels: { app: client } }
  egress:
  - port: { number: 5432, protocol: TCP, name: egress-tcp }
    bind: 127.0.0.1
    captureMode: NONE
    hosts: ["./*"]
"#;
    use weft_xds_proto::envoy::config::listener::v3::{Listener, filter};
    use weft_xds_proto::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
    let mesh = Mesh::build(&config(yaml));
    let proxy = ProxyNode::identify(
        &node("sidecar~127.0.0.10~client.default~default.svc.cluster.local"),
        &mesh,
    )
    .unwrap();
    let g = generate(&mesh, &proxy);
    let l: Listener =
        unpack(&g.of_type(type_url::LISTENER).unwrap()["127.0.0.1_5432"].any).unwrap();
    let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type
    else {
        panic!("no typed config");
    };
    let tcp: TcpProxy = unpack(any).unwrap();
    assert_eq!(tcp.idle_timeout.map(|d| d.seconds), Some(90));
    // `maxConnectionDuration` ages the cluster's upstream connections, as istiod writes it.
    use weft_xds_proto::envoy::config::cluster::v3::Cluster;
    use weft_xds_proto::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
    let c: Cluster = unpack(
        &g.of_type(type_url::CLUSTER).unwrap()["outbound|5432||db.default.svc.cluster.local"].any,
    )
    .unwrap();
    let opts: HttpProtocolOptions = unpack(
        &c.typed_extension_protocol_options
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"],
    )
    .unwrap();
    let common = opts.common_http_protocol_options.unwrap();
    assert_eq!(common.max_connection_duration.map(|d| d.seconds), Some(30));
    // `tcpKeepalive` becomes the cluster's upstream socket keepalive, in whole seconds.
    let k = c
        .upstream_connection_options
        .unwrap()
        .tcp_keepalive
        .unwrap();
    assert_eq!(k.keepalive_time.map(|v| v.value), Some(7));
    assert_eq!(k.keepalive_interval.map(|v| v.value), Some(1));
    assert_eq!(k.keepalive_probes.map(|v| v.value), Some(4));
    // Keepalive values the kernel cannot take are refused with their field.
    for (from, to, field) in [
        ("probes: 4", "probes: 200", "tcpKeepalive.probes"),
        ("time: 7s", "time: 10h", "tcpKeepalive.time"),
        ("interval: 1500ms", "interval: 0s", "tcpKeepalive.interval"),
        ("probes: 4", "probs: 4", "tcpKeepalive"),
    ] {
        let bad = yaml.replace(from, to);
        let mut set = ConfigSet::default();
        let errors = set.add_file(std::path::Path::new("bad.yaml"), &bad);
        assert!(
            errors.iter().any(|e| e.to_string().contains(field)),
            "{to}: {errors:?}"
        );
    }
    // An idle timeout that is not a duration is refused with its field.
    let bad = yaml.replace("idleTimeout: 90s", "idleTimeout: soon");
    let mut set = ConfigSet::default();
    let errors = set.add_file(std::path::Path::new("bad.yaml"), &bad);
    assert!(
        errors
            .iter()
            .any(|e| e.to_string().contains("connectionPool.tcp.idleTimeout")),
        "{errors:?}"
    );
}
