use std::path::Path;

use super::*;

/// Istio's sample config (../shared/testdata/istio beside the checkout, or $WEFT_ISTIO_TESTDATA).
/// None (and a loud note) where a checkout has no shared folder beside it.
fn istio_testdata() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var("WEFT_ISTIO_TESTDATA")
            .ok()
            .map(std::path::PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/istio")),
        Some(std::path::PathBuf::from("/work/shared/testdata/istio")),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("bookinfo").is_dir());
    if found.is_none() {
        eprintln!("NOTE: Istio test data not found (set WEFT_ISTIO_TESTDATA); skipping this test");
    }
    found
}

fn parse(text: &str) -> (ConfigSet, Vec<ConfigError>) {
    let mut set = ConfigSet::default();
    let errors = set.add_file(Path::new("t.yaml"), text);
    (set, errors)
}

#[test]
fn bookinfo_services_load_and_other_kinds_are_skipped() {
    let Some(data) = istio_testdata() else { return };
    let text = std::fs::read_to_string(data.join("bookinfo/bookinfo.yaml")).expect("bookinfo.yaml");
    let (set, errors) = parse(&text);
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<&str> = set.services.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["details", "ratings", "reviews", "productpage"]);
}

#[test]
fn bookinfo_subset_rules_and_simple_virtual_services_load() {
    let Some(data) = istio_testdata() else { return };
    let dir = data.join("bookinfo/networking");
    for f in [
        "destination-rule-all.yaml",
        "virtual-service-all-v1.yaml",
        "virtual-service-reviews-80-20.yaml",
        "virtual-service-reviews-test-v2.yaml",
    ] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        let (_, errors) = parse(&text);
        assert!(errors.is_empty(), "{f}: {errors:?}");
    }
}

#[test]
fn a_bad_object_is_named_with_its_field_and_the_rest_still_loads() {
    let (set, errors) = parse(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: bad, namespace: shop }
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: { host: reviews, subset: v1 }
      weight: "eighty"
---
apiVersion: v1
kind: Service
metadata: { name: good }
spec: { ports: [{ name: http, port: 80 }] }
"#,
    );
    assert_eq!(set.services.len(), 1);
    assert_eq!(errors.len(), 1);
    let e = &errors[0];
    assert_eq!(e.object, "VirtualService/shop/bad");
    assert_eq!(e.field, "spec.http[0].route[0].weight");
    assert!(
        e.to_string().contains(
            "t.yaml (document 1): VirtualService/shop/bad: field spec.http[0].route[0].weight"
        ),
        "{e}"
    );
}

#[test]
fn weights_must_sum_to_100() {
    let (_, errors) = parse(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: { name: split }
spec:
  hosts: [hello]
  http:
  - route:
    - { destination: { host: hello, subset: v1 }, weight: 80 }
    - { destination: { host: hello, subset: v2 }, weight: 30 }
"#,
    );
    assert_eq!(errors[0].field, "spec.http[0].route");
    assert!(errors[0].reason.contains("110"), "{}", errors[0].reason);
}

#[test]
fn unsupported_fields_are_rejected_not_ignored() {
    let (set, errors) = parse(
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: { name: retries }
spec:
  hosts: [hello]
  http:
  - route: [{ destination: { host: hello } }]
    retriez: { attempts: 3 }
"#,
    );
    assert!(set.virtual_services.is_empty());
    assert_eq!(errors[0].field, "spec.http[0].retriez");
    assert!(errors[0].reason.contains("retriez"), "{}", errors[0].reason);
}

#[test]
fn bad_regex_bad_sidecar_and_bad_yaml_are_precise() {
    let (_, errors) = parse(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: re }
spec:
  hosts: [hello]
  http:
  - match: [{ uri: { regex: "/(unclosed" } }]
    route: [{ destination: { host: hello } }]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: sc }
spec:
  ingress: [{ port: { number: 9080 }, defaultEndpoint: "10.0.0.1:80" }]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: { name: Bad_Name }
spec: { address: 127.0.0.1 }
---
: not yaml: [
"#,
    );
    assert_eq!(errors[0].field, "spec.http[0].match[0].uri.regex");
    assert_eq!(errors[1].field, "spec.ingress[0].defaultEndpoint");
    assert_eq!(errors[2].field, "metadata.name");
    assert!(
        errors[3].reason.starts_with("invalid YAML"),
        "{}",
        errors[3].reason
    );
}

#[test]
fn every_analyzer_input_loads_or_is_rejected_without_panicking() {
    let Some(data) = istio_testdata() else { return };
    let dir = data.join("analyze");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut set = ConfigSet::default();
        for e in set.add_file(&path, &text) {
            assert!(
                !e.reason.is_empty() && !e.object.is_empty()
                    || e.reason.starts_with("invalid YAML")
                    || e.object.is_empty(),
                "{e}"
            );
        }
    }
}

#[test]
fn resilience_fields_are_validated_by_path() {
    let vs = |route_extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: r }}\nspec:\n  hosts: [hello]\n  http:\n  - route: [{{ destination: {{ host: hello }} }}]\n    {route_extra}\n"
        )
    };
    let cases = [
        ("timeout: soon", "spec.http[0].timeout", "not a duration"),
        ("timeout: 0s", "spec.http[0].timeout", "at least 1ms"),
        (
            "retries: { attempts: -1 }",
            "spec.http[0].retries.attempts",
            "negative",
        ),
        (
            "retries: { attempts: 2, retryOn: \"5xx,teapot\" }",
            "spec.http[0].retries.retryOn",
            "\"teapot\"",
        ),
        (
            "retries: { attempts: 2, perTryTimeout: 2 }",
            "spec.http[0].retries.perTryTimeout",
            "",
        ),
        (
            "fault: { abort: { httpStatus: 700 } }",
            "spec.http[0].fault.abort.httpStatus",
            "200-599",
        ),
        (
            "fault: { abort: { grpcStatus: NOPE } }",
            "spec.http[0].fault.abort.grpcStatus",
            "gRPC status",
        ),
        (
            "fault: { delay: { fixedDelay: 1s, percentage: { value: 120 } } }",
            "spec.http[0].fault.delay.percentage.value",
            "0-100",
        ),
        ("fault: {}", "spec.http[0].fault", "delay or an abort"),
    ];
    for (extra, field, reason) in cases {
        let (set, errors) = parse(&vs(extra));
        assert!(set.virtual_services.is_empty(), "{extra}");
        assert_eq!(errors[0].field, field, "{extra}: {}", errors[0]);
        assert!(errors[0].reason.contains(reason), "{extra}: {}", errors[0]);
    }
    let (set, errors) = parse(&vs(
        "timeout: 1.5s\n    retries: { attempts: 3, perTryTimeout: 500ms, retryOn: \"gateway-error,503\" }\n    fault: { delay: { fixedDelay: 7s, percent: 10 } }",
    ));
    assert!(
        errors.is_empty() && set.virtual_services.len() == 1,
        "{errors:?}"
    );
}

#[test]
fn consistent_hash_settings_are_checked_field_by_field() {
    let rule = |lb: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: r }}\nspec:\n  host: hello\n  trafficPolicy: {{ loadBalancer: {lb} }}\n"
        )
    };
    let cases = [
        (
            "{ consistentHash: { httpHeaderName: x-user, useSourceIp: true } }",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "exactly one hash key",
        ),
        (
            "{ simple: ROUND_ROBIN, consistentHash: { useSourceIp: true } }",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "alternatives",
        ),
        (
            "{ consistentHash: { httpHeaderName: x-user, maglev: { tableSize: 65536 } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "prime",
        ),
        (
            "{ consistentHash: { httpCookie: { name: s, ttl: soon } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            "soon",
        ),
        (
            "{ consistentHash: { httpHeaderName: \"bad header\" } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            "not a valid header name",
        ),
        (
            "{ consistentHash: { httpQueryParameterName: u, ringHash: { minimumRingSize: 0 } } }",
            "spec.trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize",
            "out of range",
        ),
    ];
    for (lb, field, reason) in cases {
        let (set, errors) = parse(&rule(lb));
        assert!(set.destination_rules.is_empty(), "{lb}");
        assert_eq!(errors[0].field, field, "{lb}: {}", errors[0]);
        assert!(errors[0].reason.contains(reason), "{lb}: {}", errors[0]);
    }
    let (set, errors) = parse(&rule(
        "{ consistentHash: { httpCookie: { name: s, path: /, ttl: 0s }, ringHash: { minimumRingSize: 2048 } } }",
    ));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(set.destination_rules.len(), 1);
}

#[test]
fn tcp_and_tls_routes_load_and_bad_tls_routes_and_subnet_matches_are_refused_with_reasons() {
    let (set, errors) = parse(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: db }
spec:
  hosts: [db]
  tcp:
  - match: [{ port: 5432, sourceLabels: { app: api } }]
    route:
    - { destination: { host: db, subset: primary }, weight: 90 }
    - { destination: { host: db, subset: replica }, weight: 10 }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: sni }
spec:
  hosts: ["*.example.com"]
  tls:
  - match: [{ sniHosts: [a.example.com, "*.b.example.com"] }]
    route: [{ destination: { host: a.example.com } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: sni-bad }
spec:
  hosts: ["*.example.com"]
  tls:
  - match: [{ port: 443 }]
    route: [{ destination: { host: a.example.com } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: subnets }
spec:
  hosts: [db]
  tcp:
  - match: [{ destinationSubnets: [10.0.0.0/8, 10.1.2.3/33] }]
    route: [{ destination: { host: db } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: weights }
spec:
  hosts: [db]
  tcp:
  - route:
    - { destination: { host: db, subset: a }, weight: 50 }
    - { destination: { host: db, subset: b }, weight: 20 }
"#,
    );
    assert_eq!(set.virtual_services.len(), 2);
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.tls[0].match[0].sniHosts",
            "spec.tcp[0].match[0].destinationSubnets[1]",
            "spec.tcp[0].route"
        ]
    );
    assert!(errors[0].reason.contains("SNI"), "{}", errors[0]);
    assert!(errors[2].reason.contains("70"), "{}", errors[2]);
}

#[test]
fn gateway_tls_modes_are_checked_as_istio_does() {
    let gateway = |server: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{ name: g }}\nspec:\n  selector: {{ istio: ingressgateway }}\n  servers:\n  - {server}\n"
        )
    };
    for (server, field, reason) in [
        (
            "{ port: { number: 443, name: https, protocol: HTTPS }, hosts: [a.example], tls: { mode: OPTIONAL_MUTUAL, serverCertificate: /c, privateKey: /k } }",
            "spec.servers[0].tls.caCertificates",
            "caCertificates",
        ),
        (
            "{ port: { number: 443, name: https, protocol: HTTPS }, hosts: [a.example], tls: { mode: ISTIO_MUTUAL, serverCertificate: /c } }",
            "spec.servers[0].tls",
            "workload certificate",
        ),
        (
            "{ port: { number: 443, name: https, protocol: HTTPS }, hosts: [\"*.local\"], tls: { mode: AUTO_PASSTHROUGH } }",
            "spec.servers[0].tls.mode",
            "TLS server",
        ),
        (
            "{ port: { number: 53, name: udp, protocol: UDP }, hosts: [\"*\"] }",
            "spec.servers[0].port.protocol",
            "UDP",
        ),
    ] {
        let (_, errors) = parse(&gateway(server));
        assert_eq!(errors.len(), 1, "{server}: {errors:?}");
        assert_eq!(errors[0].field, field, "{server}");
        assert!(
            errors[0].reason.contains(reason),
            "{server}: {}",
            errors[0].reason
        );
    }
    for ok in [
        "{ port: { number: 443, name: https, protocol: HTTPS }, hosts: [a.example], tls: { mode: OPTIONAL_MUTUAL, serverCertificate: /c, privateKey: /k, caCertificates: /ca } }",
        "{ port: { number: 15443, name: tls, protocol: TLS }, hosts: [\"*.local\"], tls: { mode: AUTO_PASSTHROUGH } }",
        "{ port: { number: 27017, name: mongo, protocol: MONGO }, hosts: [\"*\"] }",
        "{ port: { number: 443, name: tls, protocol: TLS }, hosts: [a.example], tls: { mode: ISTIO_MUTUAL } }",
    ] {
        let (_, errors) = parse(&gateway(ok));
        assert!(errors.is_empty(), "{ok}: {errors:?}");
    }
}
