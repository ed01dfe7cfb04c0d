//! The connection manager's `tracing` without a provider, differentially: Envoy then decides per
//! request whether it is traced and writes the decision into `x-request-id` (its version digit:
//! `9` sampled, `a` forced, `b` asked by the client, `4` not traced), for every proxy after it.
//! One bootstrap (random sampling at 50% with a route that samples nothing, overall sampling at
//! 30%, no tracing, `always_set_request_id_in_response`, egress and ingress listeners with routes'
//! decorators), run by Envoy and by weft-proxy; the
//! request ids the backend receives for the same requests, the ids on the answers (a forced
//! trace returns it) and in the access logs, the `x-envoy-decorator-operation` sent upstream and
//! answered, and the decisions counted in the stats must be the same.

use std::net::SocketAddr;

use weft_e2e::Client;
use weft_e2e::standalone::{Flavor, Standalone, differing_lines, line_starting};

const BASE: u16 = 18760;

/// (listener, HCM fields at 10 spaces)
const LISTENERS: [(&str, &str); 6] = [
    (
        "half",
        "          tracing: { random_sampling: { value: 50 } }\n          internal_address_config: { cidr_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] }\n",
    ),
    (
        "overall",
        "          tracing: { overall_sampling: { value: 30 } }\n",
    ),
    (
        "none",
        "          internal_address_config: { cidr_ranges: [{ address_prefix: 10.0.0.0, prefix_len: 8 }] }\n",
    ),
    (
        "answer-id",
        "          always_set_request_id_in_response: true\n",
    ),
    // `traffic_direction` OUTBOUND and INBOUND (see `run`).
    ("egress", "          tracing: {}\n"),
    ("ingress", "          tracing: {}\n"),
];

const ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: /never }
                route: { cluster: echo }
                tracing: { random_sampling: { numerator: 0 } }
              - match: { prefix: /decorated }
                route: { cluster: echo }
                decorator: { operation: svc-op }
              - match: { prefix: /quiet }
                route: { cluster: echo }
                decorator: { operation: quiet-op, propagate: false }
              - { match: { prefix: / }, route: { cluster: echo } }
"#;

/// 0x1387 = 4999 and 0x1388 = 5000 (of 10,000), 0x3e7 = 999.
const UNDER: &str = "00001387-0000-4000-8000-000000000001";
const AT: &str = "00001388-0000-4000-8000-000000000002";
const LOW: &str = "000003e7-0000-4000-8000-000000000003";
const AT_SAMPLED: &str = "00001388-0000-9000-8000-000000000004";

/// The listener (index into `LISTENERS`), the path and the request's headers.
type Case<'a> = (usize, &'a str, Vec<(&'a str, &'a str)>);

fn run(flavor: Flavor, net: u8) -> Vec<String> {
    let mut s = Standalone::new("tracing", net, flavor);
    let backend = s.backend("echo");
    let ip = s.ip();
    let log = s.dir.join("access.log");
    let logger = Standalone::access_log(&log, "%REQ(X-REQUEST-ID)% %RESP(X-REQUEST-ID)%");
    let mut resources = String::from("  listeners:\n");
    for (i, (name, hcm)) in LISTENERS.iter().enumerate() {
        let listener = Standalone::hcm_listener(
            name,
            &ip,
            BASE + i as u16,
            &format!("{hcm}{logger}{ROUTES}"),
            "",
            "",
        );
        let direction = match *name {
            "egress" => "OUTBOUND",
            "ingress" => "INBOUND",
            _ => "UNSPECIFIED",
        };
        resources.push_str(&listener.replacen(
            "\n",
            &format!("\n    traffic_direction: {direction}\n"),
            1,
        ));
    }
    resources.push_str(&format!(
        "  clusters:\n  - name: echo\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: {}\n",
        Standalone::load_assignment("echo", &[backend])
    ));
    s.start(&resources);
    let before: Vec<u64> = stat_names().iter().map(|n| s.stat(n)).collect();
    let internal = ("x-forwarded-for", "10.1.2.3");
    let force = ("x-envoy-force-trace", "yes");
    let client = ("x-client-trace-id", "client-1");
    let op = ("x-envoy-decorator-operation", "client-op");
    let id = ("x-request-id", UNDER);
    let cases: Vec<Case> = vec![
        (0, "/", vec![("x-request-id", UNDER)]),
        (0, "/", vec![("x-request-id", AT)]),
        (0, "/never", vec![("x-request-id", UNDER)]),
        (0, "/", vec![("x-request-id", AT), force, internal]),
        (0, "/", vec![("x-request-id", AT), force]),
        (0, "/never", vec![("x-request-id", AT), client]),
        (0, "/", vec![("x-request-id", AT_SAMPLED)]),
        (0, "/", vec![("x-request-id", "abc")]),
        (0, "/", vec![("x-request-id", "00001387-short")]),
        (
            0,
            "/",
            vec![("x-request-id", "zz001387-0000-4000-8000-000000000005")],
        ),
        (1, "/", vec![("x-request-id", LOW)]),
        (1, "/", vec![("x-request-id", AT)]),
        (1, "/", vec![("x-request-id", AT_SAMPLED)]),
        (1, "/never", vec![("x-request-id", LOW)]),
        (2, "/", vec![("x-request-id", UNDER)]),
        (2, "/", vec![("x-request-id", AT), force, internal]),
        (2, "/", vec![("x-request-id", AT), force]),
        (3, "/", vec![("x-request-id", AT)]),
        (3, "/", vec![("x-request-id", "client-chosen")]),
        (4, "/decorated", vec![id]),
        (4, "/decorated", vec![id, op]),
        (4, "/", vec![id, op]),
        (4, "/quiet", vec![id]),
        (5, "/decorated", vec![id]),
        (5, "/decorated", vec![id, op]),
        (5, "/", vec![id, op]),
        (5, "/quiet", vec![id]),
        (2, "/decorated", vec![id, op]),
    ];
    let mut seen: Vec<String> = cases
        .iter()
        .map(|(listener, path, headers)| {
            let addr: SocketAddr = format!("{ip}:{}", BASE + *listener as u16).parse().unwrap();
            let r = Client::new(addr)
                .request("GET", "svc", path, headers)
                .expect("the proxy answers");
            let echoed = |name: &str| r.echoed(name);
            let seen = echoed("x-request-id").unwrap_or_else(|| "(none)".into());
            let answered = r.header("x-request-id").unwrap_or("(none)");
            let op_seen = echoed("x-envoy-decorator-operation").unwrap_or_else(|| "-".into());
            let op_answered = r.header("x-envoy-decorator-operation").unwrap_or("-");
            format!(
                "{} {path} {headers:?}: {} upstream {seen} answer {answered} operation {op_seen} {op_answered}",
                LISTENERS[*listener].0, r.status
            )
        })
        .collect();
    // Each request's line is written once its answer is sent.
    seen.extend(
        s.log_lines(&log, cases.len())
            .into_iter()
            .map(|l| format!("logged {l}")),
    );
    // The decisions counted (`http.<prefix>.tracing.*`) for the cases (the harness's own
    // readiness requests, with random ids, are counted before).
    for (name, before) in stat_names().into_iter().zip(before) {
        seen.push(format!("{name}: {}", s.stat(&name) - before));
    }
    seen
}

fn stat_names() -> Vec<String> {
    let mut names = Vec::new();
    for (listener, _) in LISTENERS {
        for stat in [
            "random_sampling",
            "service_forced",
            "client_enabled",
            "not_traceable",
        ] {
            names.push(format!("http.{listener}.tracing.{stat}"));
        }
    }
    names
}

#[test]
fn the_trace_decision_in_the_request_id_is_envoys() {
    let weft = run(Flavor::Weft, 122);
    let envoy = run(Flavor::Envoy, 123);
    let differ = differing_lines(&weft, &envoy);
    assert_eq!(differ, 0, "weft-proxy and Envoy differ (see above)");
    // The decisions themselves, as Envoy made them.
    let digit = |i: usize| {
        let id = weft[i].split(" upstream ").nth(1).unwrap();
        id.chars().nth(14).unwrap()
    };
    let line = |start: &str| line_starting(&weft, start);
    assert_eq!(digit(0), '9', "{}", weft[0]);
    assert_eq!(digit(1), '4', "{}", weft[1]);
    assert_eq!(digit(3), 'a', "{}", weft[3]);
    assert_eq!(digit(5), 'b', "{}", weft[5]);
    // A forced trace and `always_set_request_id_in_response` return the id; others do not.
    assert!(
        weft[3].contains("answer 00001388-0000-a000-8000-000000000002 "),
        "{}",
        weft[3]
    );
    assert!(weft[0].contains("answer (none) "), "{}", weft[0]);
    assert!(weft[18].contains("answer client-chosen "), "{}", weft[18]);
    let logged = line("logged ");
    assert!(logged.starts_with("logged 00001387-0000-9000"), "{logged}");
    // Decorator operations: upstream from the egress listener, back to the client from the
    // ingress one (unless the client sent its own, which is removed).
    let decorated = format!("/decorated [(\"x-request-id\", \"{UNDER}\")]");
    assert!(line(&format!("egress {decorated}")).ends_with("operation svc-op -"));
    assert!(line(&format!("ingress {decorated}")).ends_with("operation - svc-op"));
    assert!(
        line(&format!("ingress {}, (", decorated.trim_end_matches(']'))).ends_with("operation - -")
    );
    assert!(
        weft.contains(&"http.half.tracing.random_sampling: 3".to_string()),
        "{weft:#?}"
    );
}
