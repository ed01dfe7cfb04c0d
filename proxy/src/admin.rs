//! The admin server (port 15000), Envoy-compatible where tools rely on it: `/ready`,
//! `/server_info`, `/config_dump` (Envoy's JSON shape), `/clusters` (Envoy's text format),
//! `/listeners`, `/stats` and `/stats/prometheus`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weft_xds_proto::envoy::admin::v3::{
    BootstrapConfigDump, ClustersConfigDump, ConfigDump, EndpointsConfigDump, ListenersConfigDump,
    RoutesConfigDump, clusters_config_dump, endpoints_config_dump, listeners_config_dump,
    routes_config_dump,
};
use weft_xds_proto::type_url;
use weft_xds_proto::wkt::Timestamp;

use crate::listener::NetworkFilter;
use crate::state::{Accepted, Proxy, ServerState};
use crate::stats::label;

pub async fn serve(listener: tokio::net::TcpListener, proxy: Arc<Proxy>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(handle(&proxy, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

fn handle<B>(proxy: &Proxy, req: Request<B>) -> Response<Full<Bytes>> {
    let text = |s: String| reply(StatusCode::OK, "text/plain; charset=UTF-8", s);
    match (req.method(), req.uri().path()) {
        (_, "/ready") => match proxy.state() {
            ServerState::Live => text("LIVE\n".into()),
            ServerState::Initializing => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "PRE_INITIALIZING\n".into()),
        },
        (_, "/server_info") => json(&server_info(proxy)),
        (_, "/config_dump") => match config_dump(proxy) {
            Ok(v) => reply(StatusCode::OK, "application/json", v),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("cannot render config: {e}\n")),
        },
        (_, "/clusters") => text(clusters(proxy)),
        (_, "/certs") => json(&certs()),
        (_, "/listeners") => text(proxy.listeners.list().into_iter().map(|(n, a)| format!("{n}::{a}\n")).collect()),
        (_, "/stats/prometheus") => reply(StatusCode::OK, "text/plain; version=0.0.4", prometheus(proxy)),
        (_, "/stats") => text(plain_stats(proxy)),
        (&Method::POST, "/quitquitquit") => {
            tokio::spawn(async {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                std::process::exit(0);
            });
            text("OK\n".into())
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "admin commands: /ready /server_info /config_dump /clusters /listeners /stats /stats/prometheus /quitquitquit (POST)\n".into(),
        ),
    }
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(v).unwrap_or_default(),
    )
}

fn server_info(proxy: &Proxy) -> serde_json::Value {
    let uptime = SystemTime::now()
        .duration_since(proxy.started)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let node = proxy
        .bootstrap
        .node
        .as_ref()
        .map(|n| n.id.clone())
        .unwrap_or_default();
    serde_json::json!({
        "version": format!("weft-proxy/{}", env!("CARGO_PKG_VERSION")),
        "state": match proxy.state() { ServerState::Live => "LIVE", ServerState::Initializing => "PRE_INITIALIZING" },
        "uptime_current_epoch": format!("{uptime}s"),
        "node": { "id": node },
    })
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn config_dump(proxy: &Proxy) -> Result<String, weft_xds_proto::JsonError> {
    let accepted = proxy
        .accepted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let of = |t: &str| -> Vec<(String, Accepted)> {
        accepted
            .get(t)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let last_version = |t: &str| {
        of(t)
            .iter()
            .map(|(_, a)| (a.last_updated, a.version.clone()))
            .max()
            .map(|(_, v)| v)
            .unwrap_or_default()
    };
    let bootstrap = BootstrapConfigDump {
        bootstrap: Some(proxy.bootstrap.clone()),
        last_updated: Some(timestamp(proxy.started)),
    };
    let statics = proxy.bootstrap.static_resources.clone().unwrap_or_default();
    let clusters = ClustersConfigDump {
        version_info: last_version(type_url::CLUSTER),
        static_clusters: statics
            .clusters
            .iter()
            .map(|c| clusters_config_dump::StaticCluster {
                cluster: Some(weft_xds_proto::pack(c)),
                last_updated: Some(timestamp(proxy.started)),
            })
            .collect(),
        dynamic_active_clusters: of(type_url::CLUSTER)
            .into_iter()
            .map(|(_, a)| clusters_config_dump::DynamicCluster {
                version_info: a.version,
                cluster: Some(a.resource),
                last_updated: Some(timestamp(a.last_updated)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let listeners = ListenersConfigDump {
        version_info: last_version(type_url::LISTENER),
        static_listeners: statics
            .listeners
            .iter()
            .map(|l| listeners_config_dump::StaticListener {
                listener: Some(weft_xds_proto::pack(l)),
                last_updated: Some(timestamp(proxy.started)),
            })
            .collect(),
        dynamic_listeners: of(type_url::LISTENER)
            .into_iter()
            .map(|(name, a)| listeners_config_dump::DynamicListener {
                name,
                active_state: Some(listeners_config_dump::DynamicListenerState {
                    version_info: a.version,
                    listener: Some(a.resource),
                    last_updated: Some(timestamp(a.last_updated)),
                }),
                ..Default::default()
            })
            .collect(),
    };
    let routes = RoutesConfigDump {
        dynamic_route_configs: of(type_url::ROUTE_CONFIGURATION)
            .into_iter()
            .map(|(_, a)| routes_config_dump::DynamicRouteConfig {
                version_info: a.version,
                route_config: Some(a.resource),
                last_updated: Some(timestamp(a.last_updated)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let endpoints = EndpointsConfigDump {
        dynamic_endpoint_configs: of(type_url::CLUSTER_LOAD_ASSIGNMENT)
            .into_iter()
            .map(|(_, a)| endpoints_config_dump::DynamicEndpointConfig {
                version_info: a.version,
                endpoint_config: Some(a.resource),
                last_updated: Some(timestamp(a.last_updated)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let dump = ConfigDump {
        configs: vec![
            weft_xds_proto::pack(&bootstrap),
            weft_xds_proto::pack(&clusters),
            weft_xds_proto::pack(&listeners),
            weft_xds_proto::pack(&routes),
            weft_xds_proto::pack(&endpoints),
            weft_xds_proto::pack(&secrets_dump()),
        ],
    };
    weft_xds_proto::to_json_text(&dump)
}

/// The workload certificate and the trust bundle as Envoy's SecretsConfigDump shows SDS
/// secrets (`default`, `ROOTCA`); the private key is redacted, as Envoy does.
fn secrets_dump() -> weft_xds_proto::envoy::admin::v3::SecretsConfigDump {
    use weft_xds_proto::envoy::admin::v3::secrets_config_dump::DynamicSecret;
    use weft_xds_proto::envoy::config::core::v3::{DataSource, data_source};
    use weft_xds_proto::envoy::extensions::transport_sockets::tls::v3::{
        CertificateValidationContext, Secret, TlsCertificate, secret,
    };
    let Some(id) = crate::identity::global().current() else {
        return Default::default();
    };
    let inline = |s: &str| {
        Some(DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(s.as_bytes().to_vec())),
            ..Default::default()
        })
    };
    let version = id
        .not_before
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default();
    let updated = Some(timestamp(id.not_before));
    let entry = |name: &str, s: secret::Type| DynamicSecret {
        name: name.to_string(),
        version_info: version.clone(),
        last_updated: updated,
        secret: Some(weft_xds_proto::pack(&Secret {
            name: name.to_string(),
            r#type: Some(s),
        })),
        ..Default::default()
    };
    weft_xds_proto::envoy::admin::v3::SecretsConfigDump {
        dynamic_active_secrets: vec![
            entry(
                crate::tls::SDS_DEFAULT,
                secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(&id.chain_pem),
                    private_key: inline("[redacted]"),
                    ..Default::default()
                }),
            ),
            entry(
                crate::tls::SDS_ROOTCA,
                secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(&id.roots_pem),
                    ..Default::default()
                }),
            ),
        ],
        ..Default::default()
    }
}

/// Envoy's `/certs`: the certificates in use, with SANs, serial and validity.
fn certs() -> serde_json::Value {
    let Some(id) = crate::identity::global().current() else {
        return serde_json::json!({ "certificates": [] });
    };
    let describe = |der: &[u8]| {
        let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else {
            return serde_json::json!({ "path": "<inline>", "error": "unparsable" });
        };
        let v = c.validity();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let sans: Vec<serde_json::Value> = crate::tls::subject_alt_names(der)
            .into_iter()
            .map(|s| {
                if s.contains("://") {
                    serde_json::json!({ "uri": s })
                } else {
                    serde_json::json!({ "dns": s })
                }
            })
            .collect();
        serde_json::json!({
            "path": "<inline>",
            "serial_number": format!("{:x}", c.serial),
            "subject_alt_names": sans,
            "days_until_expiration": ((v.not_after.timestamp() - now).max(0) / 86400).to_string(),
            "valid_from": v.not_before.to_datetime().unix_timestamp().to_string(),
            "expiration_time": v.not_after.to_datetime().unix_timestamp().to_string(),
            "seconds_until_expiration": (v.not_after.timestamp() - now).max(0).to_string(),
        })
    };
    serde_json::json!({
        "certificates": [{
            "ca_cert": id.roots.iter().map(|c| describe(c)).collect::<Vec<_>>(),
            "cert_chain": id.chain.iter().map(|c| describe(c)).collect::<Vec<_>>(),
        }],
        "identity": id.identity,
        "renewals": id_renewals(),
    })
}

fn id_renewals() -> u64 {
    crate::identity::global()
        .renewals
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// Envoy's `/clusters` text: `cluster::host:port::stat::value` lines.
/// The local rate limit filters' counters (`<stat_prefix>.http_local_rate_limit.*`), from the
/// connection managers' configs and the routes' and virtual hosts' (each config once).
fn rate_limit_stats(
    proxy: &Proxy,
    chains: &[Arc<crate::listener::ListenerConfig>],
    v: &mut Vec<Stat>,
) {
    use crate::http::local_ratelimit::LocalRateLimit;
    let snapshot = proxy.snapshot();
    let mut configs: Vec<&Arc<LocalRateLimit>> = Vec::new();
    let mut tables: Vec<&crate::http::router::RouteTable> =
        snapshot.routes.values().map(|t| t.as_ref()).collect();
    for chain in chains.iter().flat_map(|l| l.chains.iter()) {
        if let NetworkFilter::Http(h) = &chain.filter {
            configs.extend(h.local_rate_limit.iter());
            if let crate::http::RouteSource::Static(t) = &h.routes {
                tables.push(t);
            }
        }
    }
    for t in tables {
        for vh in t.virtual_hosts() {
            configs.extend(vh.routes.iter().filter_map(|r| r.local_rate_limit.as_ref()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for c in configs {
        if !seen.insert(Arc::as_ptr(c)) {
            continue;
        }
        let s = &c.stats;
        for (stat, prom_name, value) in [
            (
                "enabled",
                "envoy_http_local_rate_limit_enabled",
                s.enabled.get(),
            ),
            (
                "enforced",
                "envoy_http_local_rate_limit_enforced",
                s.enforced.get(),
            ),
            (
                "rate_limited",
                "envoy_http_local_rate_limit_rate_limited",
                s.rate_limited.get(),
            ),
            ("ok", "envoy_http_local_rate_limit_ok", s.ok.get()),
        ] {
            v.push(Stat {
                prom_name,
                labels: vec![("envoy_local_http_ratelimit_prefix", c.stat_prefix.clone())],
                value: value as i64,
                plain: format!("{}.http_local_rate_limit.{stat}", c.stat_prefix),
                counter: true,
            });
        }
    }
}

/// Envoy's `/clusters` health flags: `healthy`, or each reason the host is not.
fn health_flags(e: &crate::cluster::Endpoint) -> String {
    let mut flags = String::new();
    if e.health.active.is_failed() {
        flags.push_str("/failed_active_hc");
    }
    if e.health.active.is_pending() {
        flags.push_str("/pending_active_hc");
    }
    if e.health.is_ejected() {
        flags.push_str("/failed_outlier_check");
    }
    if flags.is_empty() {
        flags.push_str("healthy");
    }
    flags
}

fn clusters(proxy: &Proxy) -> String {
    let snapshot = proxy.snapshot();
    let mut names: Vec<&String> = snapshot.clusters.keys().collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let c = &snapshot.clusters[name];
        let _ = writeln!(out, "{name}::observability_name::{name}");
        for e in c.hosts() {
            let a = e.address;
            let s = &e.stats;
            let p = &e.pool.stats;
            let _ = writeln!(out, "{name}::{a}::cx_active::{}", p.cx_active.get());
            let _ = writeln!(
                out,
                "{name}::{a}::cx_connect_fail::{}",
                p.cx_connect_fail.get()
            );
            let _ = writeln!(out, "{name}::{a}::cx_total::{}", p.cx_total.get());
            let _ = writeln!(out, "{name}::{a}::rq_active::{}", s.rq_active.get());
            let _ = writeln!(out, "{name}::{a}::rq_error::{}", s.rq_error.get());
            let _ = writeln!(out, "{name}::{a}::rq_success::{}", s.rq_success.get());
            let _ = writeln!(out, "{name}::{a}::rq_total::{}", s.rq_total.get());
            let _ = writeln!(out, "{name}::{a}::hostname::");
            let _ = writeln!(out, "{name}::{a}::health_flags::{}", health_flags(&e));
            let _ = writeln!(out, "{name}::{a}::weight::{}", e.weight);
        }
    }
    out
}

/// All stats as (Envoy stat name with tags, value) for both renderings.
struct Stat {
    prom_name: &'static str,
    labels: Vec<(&'static str, String)>,
    value: i64,
    plain: String,
    counter: bool,
}

fn collect(proxy: &Proxy) -> Vec<Stat> {
    let mut v = Vec::new();
    let snapshot = proxy.snapshot();
    let mut names: Vec<&String> = snapshot.clusters.keys().collect();
    names.sort();
    for name in names {
        let c = &snapshot.clusters[name];
        // Clusters that share an `alt_stat_name` share their stats (summed below), as they
        // share Envoy's stats scope.
        let name = &c.stat_name;
        let s = &c.stats;
        let eps = c.endpoints.load();
        let hosts = c.hosts();
        let cx_total: u64 = c.retired_cx_total.get()
            + hosts
                .iter()
                .map(|e| e.pool.stats.cx_total.get())
                .sum::<u64>();
        let cx_active: i64 = hosts.iter().map(|e| e.pool.stats.cx_active.get()).sum();
        let lb = || vec![("envoy_cluster_name", name.clone())];
        for (stat, value, counter) in [
            ("upstream_rq_total", s.upstream_rq_total.get() as i64, true),
            ("upstream_rq_active", s.upstream_rq_active.get(), false),
            (
                "upstream_rq_timeout",
                s.upstream_rq_timeout.get() as i64,
                true,
            ),
            (
                "upstream_rq_per_try_timeout",
                s.upstream_rq_per_try_timeout.get() as i64,
                true,
            ),
            (
                "upstream_rq_max_duration_reached",
                s.upstream_rq_max_duration_reached.get() as i64,
                true,
            ),
            ("upstream_rq_retry", s.upstream_rq_retry.get() as i64, true),
            (
                "upstream_rq_pending_overflow",
                s.upstream_rq_pending_overflow.get() as i64,
                true,
            ),
            (
                "retry_or_shadow_abandoned",
                s.retry_or_shadow_abandoned.get() as i64,
                true,
            ),
            (
                "upstream_rq_retry_overflow",
                s.upstream_rq_retry_overflow.get() as i64,
                true,
            ),
            (
                "outlier_detection_ejections_total",
                s.outlier_ejections.get() as i64,
                true,
            ),
            ("upstream_cx_total", cx_total as i64, true),
            ("upstream_cx_active", cx_active, false),
            (
                "upstream_cx_connect_fail",
                s.upstream_cx_connect_fail.get() as i64,
                true,
            ),
            (
                "upstream_cx_none_healthy",
                s.upstream_cx_none_healthy.get() as i64,
                true,
            ),
            ("update_success", s.update_success.get() as i64, true),
            ("membership_total", eps.all().len() as i64, false),
            (
                "membership_healthy",
                eps.all().iter().filter(|e| e.health.is_usable()).count() as i64,
                false,
            ),
        ] {
            v.push(Stat {
                prom_name: prom(stat),
                labels: lb(),
                value,
                plain: format!("cluster.{name}.{stat}"),
                counter,
            });
        }
        if c.health_check.is_some() {
            let h = &c.health_stats;
            for (stat, prom_name, value, counter) in [
                (
                    "attempt",
                    "envoy_cluster_health_check_attempt",
                    h.attempt.get() as i64,
                    true,
                ),
                (
                    "success",
                    "envoy_cluster_health_check_success",
                    h.success.get() as i64,
                    true,
                ),
                (
                    "failure",
                    "envoy_cluster_health_check_failure",
                    h.failure.get() as i64,
                    true,
                ),
                (
                    "network_failure",
                    "envoy_cluster_health_check_network_failure",
                    h.network_failure.get() as i64,
                    true,
                ),
                (
                    "healthy",
                    "envoy_cluster_health_check_healthy",
                    eps.all()
                        .iter()
                        .filter(|e| !e.health.active.is_failed())
                        .count() as i64,
                    false,
                ),
            ] {
                v.push(Stat {
                    prom_name,
                    labels: lb(),
                    value,
                    plain: format!("cluster.{name}.health_check.{stat}"),
                    counter,
                });
            }
        }
        for class in 1..=5 {
            let mut labels = lb();
            labels.insert(0, ("envoy_response_code_class", class.to_string()));
            v.push(Stat {
                prom_name: "envoy_cluster_upstream_rq_xx",
                labels,
                value: s.upstream_rq_xx.get(class) as i64,
                plain: format!("cluster.{name}.upstream_rq_{class}xx"),
                counter: true,
            });
        }
    }
    // Chains of one listener that share a stat prefix (PERMISSIVE mTLS: a TLS and a plaintext
    // chain) share their stats, as Envoy's scopes do: duplicates are summed below.
    let chains: Vec<_> = proxy.listeners.configs();
    rate_limit_stats(proxy, &chains, &mut v);
    for chain in chains.iter().flat_map(|l| l.chains.iter()) {
        match &chain.filter {
            NetworkFilter::Http(h) => {
                let p = &h.stat_prefix;
                let s = &h.stats;
                let lb = || vec![("envoy_http_conn_manager_prefix", p.clone())];
                for (stat, value, counter) in [
                    (
                        "downstream_cx_total",
                        s.downstream_cx_total.get() as i64,
                        true,
                    ),
                    ("downstream_cx_active", s.downstream_cx_active.get(), false),
                    (
                        "downstream_rq_total",
                        s.downstream_rq_total.get() as i64,
                        true,
                    ),
                    ("downstream_rq_active", s.downstream_rq_active.get(), false),
                    ("no_route", s.no_route.get() as i64, true),
                    ("no_cluster", s.no_cluster.get() as i64, true),
                    ("rbac_denied", s.rbac_denied.get() as i64, true),
                    (
                        "downstream_rq_idle_timeout",
                        s.downstream_rq_idle_timeout.get() as i64,
                        true,
                    ),
                    (
                        "downstream_rq_timeout",
                        s.downstream_rq_timeout.get() as i64,
                        true,
                    ),
                    (
                        "downstream_rq_header_timeout",
                        s.downstream_rq_header_timeout.get() as i64,
                        true,
                    ),
                    (
                        "downstream_rq_max_duration_reached",
                        s.downstream_rq_max_duration_reached.get() as i64,
                        true,
                    ),
                    (
                        "tracing_random_sampling",
                        s.tracing_random_sampling.get() as i64,
                        true,
                    ),
                    (
                        "tracing_service_forced",
                        s.tracing_service_forced.get() as i64,
                        true,
                    ),
                    (
                        "tracing_client_enabled",
                        s.tracing_client_enabled.get() as i64,
                        true,
                    ),
                    (
                        "tracing_not_traceable",
                        s.tracing_not_traceable.get() as i64,
                        true,
                    ),
                    (
                        "tracing_health_check",
                        s.tracing_health_check.get() as i64,
                        true,
                    ),
                ] {
                    let plain = stat
                        .replacen("rbac_", "rbac.", 1)
                        .replacen("tracing_", "tracing.", 1);
                    v.push(Stat {
                        prom_name: prom_http(stat),
                        labels: lb(),
                        value,
                        plain: format!("http.{p}.{plain}"),
                        counter,
                    });
                }
                for class in 1..=5 {
                    let mut labels = lb();
                    labels.insert(0, ("envoy_response_code_class", class.to_string()));
                    v.push(Stat {
                        prom_name: "envoy_http_downstream_rq_xx",
                        labels,
                        value: s.downstream_rq_xx.get(class) as i64,
                        plain: format!("http.{p}.downstream_rq_{class}xx"),
                        counter: true,
                    });
                }
            }
            NetworkFilter::Tcp(t) => {
                let p = &t.stat_prefix;
                let s = &t.stats;
                for (stat, value, counter) in [
                    (
                        "downstream_cx_total",
                        s.downstream_cx_total.get() as i64,
                        true,
                    ),
                    ("downstream_cx_active", s.downstream_cx_active.get(), false),
                    (
                        "downstream_cx_rx_bytes_total",
                        s.downstream_cx_rx_bytes_total.get() as i64,
                        true,
                    ),
                    (
                        "downstream_cx_tx_bytes_total",
                        s.downstream_cx_tx_bytes_total.get() as i64,
                        true,
                    ),
                    ("idle_timeout", s.idle_timeout.get() as i64, true),
                ] {
                    v.push(Stat {
                        prom_name: prom_tcp(stat),
                        labels: vec![("envoy_tcp_prefix", p.clone())],
                        value,
                        plain: format!("tcp.{p}.{stat}"),
                        counter,
                    });
                }
            }
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut merged: Vec<Stat> = Vec::with_capacity(v.len());
    for stat in v {
        match seen.get(&stat.plain) {
            Some(&i) => merged[i].value += stat.value,
            None => {
                seen.insert(stat.plain.clone(), merged.len());
                merged.push(stat);
            }
        }
    }
    let mut v = merged;
    let z = &crate::http::zipkin::STATS;
    if z.in_use.load(std::sync::atomic::Ordering::Relaxed) {
        for (stat, counter) in [
            ("spans_sent", &z.spans_sent),
            ("timer_flushed", &z.timer_flushed),
            ("reports_skipped_no_cluster", &z.reports_skipped_no_cluster),
            ("reports_sent", &z.reports_sent),
            ("reports_dropped", &z.reports_dropped),
            ("reports_failed", &z.reports_failed),
        ] {
            v.push(Stat {
                prom_name: prom_zipkin(stat),
                labels: vec![],
                value: counter.get() as i64,
                plain: format!("tracing.zipkin.{stat}"),
                counter: true,
            });
        }
    }
    let live = i64::from(proxy.state() == ServerState::Live);
    v.push(Stat {
        prom_name: "envoy_server_live",
        labels: vec![],
        value: live,
        plain: "server.live".into(),
        counter: false,
    });
    let uptime = SystemTime::now()
        .duration_since(proxy.started)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    v.push(Stat {
        prom_name: "envoy_server_uptime",
        labels: vec![],
        value: uptime,
        plain: "server.uptime".into(),
        counter: false,
    });
    v
}

macro_rules! prom_names {
    ($fn:ident, $prefix:literal, [$($stat:literal),* $(,)?]) => {
        fn $fn(stat: &str) -> &'static str {
            match stat {
                $($stat => concat!($prefix, $stat),)*
                _ => concat!($prefix, "unknown"),
            }
        }
    };
}
prom_names!(
    prom,
    "envoy_cluster_",
    [
        "upstream_rq_total",
        "upstream_rq_active",
        "upstream_rq_timeout",
        "upstream_rq_per_try_timeout",
        "upstream_rq_max_duration_reached",
        "upstream_rq_retry",
        "upstream_rq_pending_overflow",
        "upstream_rq_retry_overflow",
        "retry_or_shadow_abandoned",
        "outlier_detection_ejections_total",
        "upstream_cx_total",
        "upstream_cx_active",
        "upstream_cx_connect_fail",
        "upstream_cx_none_healthy",
        "update_success",
        "membership_total",
        "membership_healthy",
    ]
);
prom_names!(
    prom_http,
    "envoy_http_",
    [
        "downstream_cx_total",
        "downstream_cx_active",
        "downstream_rq_total",
        "downstream_rq_active",
        "no_route",
        "no_cluster",
        "rbac_denied",
        "downstream_rq_idle_timeout",
        "downstream_rq_timeout",
        "downstream_rq_header_timeout",
        "downstream_rq_max_duration_reached",
        "tracing_random_sampling",
        "tracing_service_forced",
        "tracing_client_enabled",
        "tracing_not_traceable",
        "tracing_health_check",
    ]
);
prom_names!(
    prom_zipkin,
    "envoy_tracing_zipkin_",
    [
        "spans_sent",
        "timer_flushed",
        "reports_skipped_no_cluster",
        "reports_sent",
        "reports_dropped",
        "reports_failed",
    ]
);
prom_names!(
    prom_tcp,
    "envoy_tcp_",
    [
        "downstream_cx_total",
        "downstream_cx_active",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_tx_bytes_total",
        "idle_timeout",
    ]
);

fn prometheus(proxy: &Proxy) -> String {
    let mut stats = collect(proxy);
    // The text format wants every sample of a metric family together, under one TYPE line.
    stats.sort_by_key(|s| s.prom_name);
    let mut out = String::new();
    let mut last_name = "";
    for s in &stats {
        if s.prom_name != last_name {
            let _ = writeln!(
                out,
                "# TYPE {} {}",
                s.prom_name,
                if s.counter { "counter" } else { "gauge" }
            );
            last_name = s.prom_name;
        }
        let labels: Vec<String> = s
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(out, "{} {}", s.prom_name, s.value);
        } else {
            let _ = writeln!(out, "{}{{{}}} {}", s.prom_name, labels.join(","), s.value);
        }
    }
    out
}

fn plain_stats(proxy: &Proxy) -> String {
    let mut lines: Vec<String> = collect(proxy)
        .into_iter()
        .map(|s| format!("{}: {}", s.plain, s.value))
        .collect();
    lines.sort();
    lines.join("\n") + "\n"
}
