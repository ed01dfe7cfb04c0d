//! Zipkin spans (`tracing.provider` `envoy.tracers.zipkin`), differentially: one bootstrap with
//! an egress (OUTBOUND) and an ingress (INBOUND) listener, both sampling every request and
//! reporting to a collector this test runs, is run by Envoy and by weft-proxy. For the same
//! requests (new traces, B3 contexts in multiple headers and in `b3`, one that does not parse,
//! sampled or not by the client, a decorated route, a failing cluster), the B3 headers the
//! backend receives (as relations: new, the client's, shared) and the spans the collector gets
//! (kind, name, ids as relations, `shared`, the tags, the report's request) must be the same.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use weft_e2e::Client;
use weft_e2e::collector::zipkin as collector;
use weft_e2e::standalone::{Flavor, Standalone, differing_lines};

const BASE: u16 = 18820;
const TRACE: &str = "463ac35c9f6413ad48485a3953bb6124";
const SPAN: &str = "a2fb4a1d1a96d312";
const PARENT: &str = "1111111111111111";
/// The client's trace on the listener with upstream spans.
const TRACE2: &str = "5b8efff798038103d269b633813fc60c";

const ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: /dec }
                route: { cluster: echo }
                decorator: { operation: my-op }
              - { match: { prefix: /fail }, route: { cluster: dead } }
              - { match: { prefix: /slow }, route: { cluster: echo, timeout: 0.2s } }
              - match: { prefix: /retry }
                route: { cluster: echo, retry_policy: { retry_on: 5xx, num_retries: 1, retry_back_off: { base_interval: 0.01s } } }
              - { match: { prefix: / }, route: { cluster: echo } }
"#;

/// The listeners' custom tags (YAML at 12 spaces, under `tracing`): with two of the request's
/// metadata, as Istio's dry-run policy tags, which no filter here writes.
const TAGS: &str = r#"            custom_tags:
            - { tag: lit, literal: { value: v1 } }
            - { tag: hdr, request_header: { name: x-tag, default_value: none } }
            - tag: istio.authorization.dry_run.allow_policy.name
              metadata: { kind: { request: {} }, metadata_key: { key: envoy.filters.http.rbac, path: [{ key: istio_dry_run_allow_shadow_effective_policy_id }] } }
            - tag: meta
              metadata: { kind: { request: {} }, metadata_key: { key: envoy.filters.http.rbac, path: [{ key: x }] }, default_value: dflt }
"#;

/// (listener: 0 egress, 1 ingress, 2 egress with `spawn_upstream_span`; path; headers), each
/// request with its own id. Nine are sampled on listeners 0 and 1: not 6, 8 and 9, whose
/// context says not, nor 10 and 13, whose contexts do not parse.
type Case = (usize, &'static str, Vec<(&'static str, &'static str)>);

fn cases() -> Vec<Case> {
    let multi = vec![("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut h = multi.clone();
        h.extend_from_slice(extra);
        h
    };
    vec![
        (0, "/a/b?q=1", vec![("x-tag", "t1")]),
        (
            1,
            "/in",
            with(&[("x-b3-parentspanid", PARENT), ("x-b3-sampled", "1")]),
        ),
        (0, "/out", with(&[("x-b3-sampled", "1")])),
        (0, "/dec", vec![]),
        (0, "/fail", vec![]),
        (1, "/root", vec![]),
        (0, "/b3", vec![("b3", "0")]),
        (
            1,
            "/single",
            vec![(
                "b3",
                "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
            )],
        ),
        (0, "/unsampled", vec![("x-b3-sampled", "0")]),
        (
            0,
            "/debug",
            with(&[("x-b3-flags", "1"), ("x-b3-sampled", "0")]),
        ),
        (
            0,
            "/bad",
            vec![("x-b3-traceid", "zz"), ("x-b3-spanid", SPAN)],
        ),
        // Request bodies, their size in the span: one of known length, one streamed.
        (0, "/post", vec![]),
        (1, "/chunked", vec![]),
        // A sign is not a hex digit.
        (
            0,
            "/plus",
            vec![("x-b3-traceid", "+23456789abcdef0"), ("x-b3-spanid", SPAN)],
        ),
        // Upstream spans: a new trace, a client's context, a retried attempt (two upstream
        // spans), no endpoint (none), the single header, and unsampled (context passed on).
        (2, "/spawn", vec![]),
        (
            2,
            "/spawn-client",
            vec![
                ("x-b3-traceid", TRACE2),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", "1"),
            ],
        ),
        (2, "/retry?fail=1", vec![]),
        (2, "/fail", vec![]),
        (2, "/spawn-b3", vec![("b3", "1")]),
        (2, "/spawn-unsampled", vec![("x-b3-sampled", "0")]),
        // The route's timeout ends the attempt while it waits: canceled, no answer.
        (2, "/slow?delay_ms=1000", vec![]),
    ]
}

/// An id as what it is to the request: the client's trace/span/parent, the request's new
/// trace id, or new.
fn relation(v: &str, names: &BTreeMap<String, String>) -> String {
    names.get(v).cloned().unwrap_or_else(|| {
        if v.len() == 32 || v.len() == 16 {
            format!("new{}", v.len() * 4)
        } else {
            format!("odd {v}")
        }
    })
}

fn run(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("zipkin", net, flavor);
    let echo = s.backend("echo");
    let (zipkin, reports) = collector();
    let ip = s.ip();
    let mut resources = String::from("  listeners:\n");
    for (i, direction) in ["OUTBOUND", "INBOUND", "OUTBOUND"].into_iter().enumerate() {
        let tracing = if i == 2 {
            weft_e2e::collector::hcm_tracing(&format!(
                "{TAGS}            spawn_upstream_span: true\n"
            ))
        } else {
            weft_e2e::collector::hcm_tracing(TAGS)
        };
        let listener = Standalone::hcm_listener(
            &format!("l{i}"),
            &ip,
            BASE + i as u16,
            &format!("{tracing}{ROUTES}"),
            "",
            "",
        );
        resources.push_str(&listener.replacen(
            "\n",
            &format!("\n    traffic_direction: {direction}\n"),
            1,
        ));
    }
    resources.push_str("  clusters:\n");
    resources.push_str(&Standalone::static_cluster("echo", &[echo], ""));
    resources.push_str(&Standalone::static_cluster("dead", &[], ""));
    resources.push_str(&Standalone::static_cluster("zipkin", &[zipkin], ""));
    s.start(&resources);
    // The readiness checks are not traced (the admin port), but drop anything reported so far.
    std::thread::sleep(Duration::from_millis(200));
    reports.lock().unwrap().clear();
    let mut seen = Vec::new();
    let mut names_of: Vec<BTreeMap<String, String>> = Vec::new();
    // Upstream spans carry no request id: their trace tells their case.
    let mut case_of_trace: BTreeMap<String, usize> = BTreeMap::new();
    for (n, (listener, path, headers)) in cases().into_iter().enumerate() {
        let id = format!("00000000-0000-4000-8000-0000000000{n:02}");
        let mut headers = headers.clone();
        headers.push(("x-request-id", Box::leak(id.into_boxed_str())));
        let addr: SocketAddr = format!("{ip}:{}", BASE + listener as u16).parse().unwrap();
        let mut client = Client::new(addr);
        let r = match path {
            "/post" | "/chunked" => {
                let framing = if path == "/post" {
                    "content-length: 11\r\n\r\nhello world"
                } else {
                    "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                };
                let raw = format!(
                    "POST {path} HTTP/1.1\r\nhost: svc:8080\r\nx-request-id: {}\r\n{framing}",
                    headers.last().expect("the id").1
                );
                client.send_raw(raw.as_bytes())
            }
            _ => client.request("GET", "svc:8080", path, &headers),
        }
        .expect("the proxy answers");
        let echoed = |name: &str| r.echoed(name);
        let mut names = BTreeMap::from([
            (TRACE.to_string(), "client-trace".to_string()),
            (TRACE[16..].to_string(), "client-trace-low".to_string()),
            (SPAN.to_string(), "client-span".to_string()),
            (PARENT.to_string(), "client-parent".to_string()),
            ("80f198ee56343ba864fe8b2a57d3eff7".into(), "b3-trace".into()),
            (TRACE2.into(), "client-trace2".into()),
            ("e457b5a2e4d86bd1".into(), "b3-span".into()),
            ("05e3ac9a4f6e3b90".into(), "b3-parent".into()),
        ]);
        // The new trace id of this request, once seen upstream.
        let upstream_trace = echoed("x-b3-traceid")
            .or_else(|| echoed("b3").and_then(|b| b.split('-').next().map(str::to_string)));
        if let Some(t) = upstream_trace
            .clone()
            .filter(|t| !names.contains_key(t) && (t.len() == 16 || t.len() == 32))
        {
            names.insert(t, "new-trace".into());
        }
        if listener == 2
            && let Some(t) = &upstream_trace
        {
            case_of_trace.insert(t.clone(), n);
        }
        let mut line = format!("{n} {path}: {}", r.status);
        for h in [
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
            "x-b3-flags",
        ] {
            if let Some(v) = echoed(h) {
                let v = if h == "x-b3-sampled" || h == "x-b3-flags" {
                    v
                } else {
                    relation(&v, &names)
                };
                line.push_str(&format!(" {h}={v}"));
            }
        }
        if let Some(b3) = echoed("b3") {
            let parts: Vec<String> = b3
                .split('-')
                .map(|p| {
                    if p.len() == 1 {
                        p.to_string()
                    } else {
                        relation(p, &names)
                    }
                })
                .collect();
            line.push_str(&format!(" b3={}", parts.join("-")));
        }
        seen.push(line);
        names_of.push(names);
    }
    // Nine requests are sampled on listeners 0 and 1, six on listener 2 with six upstream
    // spans: five are sent at once, the rest within the flush interval.
    let spans = weft_e2e::collector::spans(&reports, 21, Duration::from_secs(20));
    let mut reported: Vec<String> = Vec::new();
    // An answer the upstream never gave (the route's timeout) echoes no trace: the request's
    // own span tells it.
    for span in &spans {
        if let (Some(id), Some(trace)) = (
            span["tags"]["guid:x-request-id"].as_str(),
            span["traceId"].as_str(),
        ) && let Ok(n) = id[id.len() - 2..].parse::<usize>()
            && cases()[n].0 == 2
        {
            case_of_trace.entry(trace.to_string()).or_insert(n);
        }
    }
    for span in &spans {
        let tags = span["tags"].as_object().expect("tags");
        let n: usize = match tags.get("guid:x-request-id").and_then(|v| v.as_str()) {
            Some(id) => id[id.len() - 2..].parse().expect("case number"),
            None => {
                let trace = span["traceId"].as_str().unwrap_or_default();
                *case_of_trace
                    .get(trace)
                    .unwrap_or_else(|| panic!("a span of no case: {span}"))
            }
        };
        let names = &names_of[n];
        let text = |k: &str| span[k].as_str().map(str::to_string);
        let rel = |k: &str| text(k).map_or("-".into(), |v| relation(&v, names));
        let mut line = format!(
            "span {n}: {} {} trace={} id={} parent={} shared={}",
            span["kind"],
            span["name"],
            rel("traceId"),
            rel("id"),
            rel("parentId"),
            span["shared"]
        );
        let end = span["annotations"][0]["timestamp"].as_u64().unwrap_or(0);
        let (start, duration) = (
            span["timestamp"].as_u64().unwrap_or(0),
            span["duration"].as_u64().unwrap_or(0),
        );
        line.push_str(&format!(
            " timed={} annotation={} endpoint={}",
            start > 0 && end >= start + duration.saturating_sub(1000),
            span["annotations"][0]["value"],
            span["localEndpoint"]["serviceName"]
        ));
        for (k, v) in tags {
            let v = v.as_str().unwrap_or_default();
            let v = match k.as_str() {
                // Sizes of the echo's answer (which lists the headers each proxy adds).
                "response_size" => if v.parse::<u64>().unwrap_or(0) > 0 {
                    "n"
                } else {
                    "0"
                }
                .into(),
                "guid:x-request-id" => v[v.len() - 4..].to_string(),
                // The upstream's port differs from run to run.
                "upstream_address" | "peer.address" => {
                    v.rsplit_once(':').map_or(v, |(ip, _)| ip).to_string()
                }
                _ => v.to_string(),
            };
            line.push_str(&format!(" {k}={v}"));
        }
        reported.push(line);
    }
    reported.sort();
    seen.extend(reported);
    // Envoy's `tracing.zipkin.*` counters (the reports' own count depends on how spans are
    // buffered, see docs/envoy-differences.md).
    for stat in [
        "spans_sent",
        "reports_dropped",
        "reports_failed",
        "reports_skipped_no_cluster",
    ] {
        seen.push(format!(
            "tracing.zipkin.{stat}: {}",
            s.stat(&format!("tracing.zipkin.{stat}"))
        ));
    }
    let mut requests: Vec<String> = reports
        .lock()
        .unwrap()
        .iter()
        .map(|(r, _)| r.clone())
        .collect();
    requests.dedup();
    seen.extend(requests.into_iter().map(|r| format!("report {r}")));
    seen
}

#[test]
fn zipkin_spans_and_b3_headers_are_envoys() {
    let weft = run(Flavor::Weft, 142);
    let envoy = run(Flavor::Envoy, 143);
    let differ = differing_lines(&weft, &envoy);
    assert_eq!(differ, 0, "weft-proxy and Envoy differ (see above)");
    let spans = weft.iter().filter(|l| l.starts_with("span ")).count();
    assert_eq!(spans, 21, "{weft:#?}");
    assert!(
        weft.contains(&"tracing.zipkin.spans_sent: 21".to_string()),
        "{weft:#?}"
    );
    for n in [11, 12] {
        let body = format!("span {n}:");
        assert!(
            weft.iter()
                .any(|l| l.starts_with(&body) && l.contains(" request_size=11 ")),
            "{weft:#?}"
        );
    }
    let line = |start: &str| {
        weft.iter()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line {start:?} in {weft:#?}"))
            .clone()
    };
    // An egress child of the client's span; an ingress span sharing the client's.
    assert!(
        line("2 /out").contains("x-b3-traceid=client-trace x-b3-spanid=new64 x-b3-parentspanid=client-span x-b3-sampled=1"),
        "{weft:#?}"
    );
    assert!(line("span 1:").contains(
        "\"SERVER\" \"svc:8080\" trace=client-trace id=client-span parent=client-parent shared=true"
    ));
    assert!(line("span 3:").contains("\"my-op\""));
    assert!(
        line("span 4:").contains(" error=true ") && line("span 4:").contains("response_flags=UH")
    );
    assert!(line("span 0:").contains(" hdr=t1 ") && line("span 0:").contains(" lit=v1 "));
    assert!(line("span 0:").contains(" meta=dflt ") && !line("span 0:").contains("dry_run"));
    // `x-b3-sampled: 0` wins over `x-b3-flags: 1`: not reported.
    assert!(line("9 /debug").contains("x-b3-sampled=0"), "{weft:#?}");
    assert!(!weft.iter().any(|l| l.starts_with("span 9:")));
    // The broken context: passed on as it came, nothing added, nothing reported.
    assert!(
        line("10 /bad").ends_with(": 200 x-b3-traceid=odd zz x-b3-spanid=client-span"),
        "{}",
        line("10 /bad")
    );
    assert!(
        line("report ")
            .contains("POST /api/v2/spans HTTP/1.1 host=zipkin content-type=application/json")
    );
    // `spawn_upstream_span`: the upstream gets the attempt's span, a child of the request's
    // SERVER span; a retried attempt is canceled, the next one counts the retry.
    assert!(
        line("14 /spawn:").contains("x-b3-spanid=new64 x-b3-parentspanid=new-trace"),
        "{weft:#?}"
    );
    assert!(
        line("span 14:").contains(
            "\"CLIENT\" \"router echo egress\" trace=new-trace id=new64 parent=new-trace"
        )
    );
    let retried: Vec<&String> = weft
        .iter()
        .filter(|l| l.starts_with("span 16: \"CLIENT\""))
        .collect();
    assert_eq!(retried.len(), 2, "{weft:#?}");
    assert!(
        retried
            .iter()
            .any(|l| l.contains(" canceled=true ") && l.contains("http.status_code=503"))
    );
    assert!(
        retried
            .iter()
            .any(|l| l.contains(" retry.count=1 ") && l.contains("http.status_code=200"))
    );
    assert!(
        weft.iter().any(|l| l.starts_with("span 20: \"CLIENT\"")
            && l.contains(" canceled=true ")
            && l.contains(" http.status_code=0 ")),
        "{weft:#?}"
    );
}
