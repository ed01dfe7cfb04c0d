//! The connection manager's `tracing` without a provider, differentially: Envoy then decides per
//! request whether it is traced and writes the decision into `x-request-id` (its version digit:
//! `9` sampled, `a` forced, `b` asked by the client, `4` not traced), for every proxy after it.
//! One bootstrap (random sampling at 50% with a route that samples nothing, overall sampling at
//! 30%, no tracing, `always_set_request_id_in_response`), run by Envoy and by weft-proxy; the
//! request ids the backend receives for the same requests, the ids on the answers (a forced
//! trace returns it) and in the access logs, and the decisions counted in the stats must be the
//! same.

use std::net::SocketAddr;

use weft_e2e::Client;
use weft_e2e::standalone::{Flavor, Standalone};

const BASE: u16 = 18760;

/// (listener, HCM fields at 10 spaces)
const LISTENERS: [(&str, &str); 4] = [
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
];

const ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: /never }
                route: { cluster: echo }
                tracing: { random_sampling: { numerator: 0 } }
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
        resources.push_str(&Standalone::hcm_listener(
            name,
            &ip,
            BASE + i as u16,
            &format!("{hcm}{logger}{ROUTES}"),
            "",
            "",
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
    ];
    let mut seen: Vec<String> = cases
        .iter()
        .map(|(listener, path, headers)| {
            let addr: SocketAddr = format!("{ip}:{}", BASE + *listener as u16).parse().unwrap();
            let r = Client::new(addr)
                .request("GET", "svc", path, headers)
                .expect("the proxy answers");
            let seen = r
                .body
                .lines()
                .find_map(|l| l.trim().strip_prefix("x-request-id: "))
                .unwrap_or("(none)");
            let answered = r.header("x-request-id").unwrap_or("(none)");
            format!(
                "{} {path} {headers:?}: {} upstream {seen} answer {answered}",
                LISTENERS[*listener].0, r.status
            )
        })
        .collect();
    // Each request's line is written once its answer is sent.
    weft_e2e::wait_until(std::time::Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.lines().count() == cases.len()).then_some(())
    });
    seen.extend(
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
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
    for (w, e) in weft.iter().zip(&envoy) {
        assert_eq!(w, e, "weft-proxy, then Envoy");
    }
    assert_eq!(weft.len(), envoy.len());
    // The decisions themselves, as Envoy made them.
    let digit = |i: usize| {
        let id = weft[i].split(" upstream ").nth(1).unwrap();
        id.chars().nth(14).unwrap()
    };
    assert_eq!(digit(0), '9', "{}", weft[0]);
    assert_eq!(digit(1), '4', "{}", weft[1]);
    assert_eq!(digit(3), 'a', "{}", weft[3]);
    assert_eq!(digit(5), 'b', "{}", weft[5]);
    // A forced trace and `always_set_request_id_in_response` return the id; others do not.
    assert!(
        weft[3].ends_with("answer 00001388-0000-a000-8000-000000000002"),
        "{}",
        weft[3]
    );
    assert!(weft[0].ends_with("answer (none)"), "{}", weft[0]);
    assert!(weft[18].ends_with("answer client-chosen"), "{}", weft[18]);
    assert!(
        weft[19].starts_with("logged 00001387-0000-9000"),
        "{}",
        weft[19]
    );
    assert!(
        weft.contains(&"http.half.tracing.random_sampling: 3".to_string()),
        "{weft:#?}"
    );
}
