//! DestinationRule traffic policies, run against weft-proxy and against a stock Envoy as the
//! client sidecar (both fed by weftd): a circuit breaker that trips, and outlier detection that
//! ejects a failing host and lets it back on an interval tick once its ejection time is up.

use std::time::{Duration, Instant};

use weft_e2e::{Client, Quickstart};

const RULES: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hello, namespace: default }
spec:
  host: hello
  trafficPolicy:
    outlierDetection: { consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 100 }
  subsets:
  - name: v1
    labels: { version: v1 }
    trafficPolicy:
      connectionPool:
        tcp: { maxConnections: 1 }
        http: { http1MaxPendingRequests: 1, maxRequestsPerConnection: 1 }
  - name: v2
    labels: { version: v2 }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - match: [{ uri: { prefix: /cb } }]
    retries: { attempts: 0 }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /od } }]
    retries: { attempts: 0 }
    route: [{ destination: { host: hello } }]
"#;

#[derive(Debug)]
struct Outcomes {
    /// 10 concurrent slow requests through maxConnections 1 + 1 pending: (200s, overflow 503s).
    breaker: (usize, usize),
    /// Every overflow carried Envoy's `x-envoy-overloaded: true`.
    overflow_marked: bool,
    /// 500s seen over 20 sequential requests while hello-v1 fails every request.
    failures_before_ejection: usize,
    /// After ejection, every request is served by hello-v2.
    then_only_v2: bool,
    /// From the ejecting failure until hello-v1 serves again (ejection time 2 s, interval 1 s:
    /// Envoy lets a host back on the first interval tick after its time).
    returned_after: Duration,
}

fn scenario(q: &Quickstart) -> Outcomes {
    let egress = q.egress();
    let threads: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let r = Client::new(egress)
                    .get("hello", "/cb?delay_ms=600")
                    .unwrap();
                (r.status, r.header("x-envoy-overloaded").map(str::to_string))
            })
        })
        .collect();
    let results: Vec<(u16, Option<String>)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let overflow: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
    let overflow_marked = overflow.iter().all(|(_, h)| h.as_deref() == Some("true"));

    let mut c = Client::new(egress);
    let mut failures = 0;
    let mut names = Vec::new();
    let mut ejected_at = Instant::now();
    for _ in 0..20 {
        let r = c.get("hello", "/od?fail_on=hello-v1").unwrap();
        if r.status == 500 {
            failures += 1;
            ejected_at = Instant::now();
        }
        names.push(r.header("x-echo-name").unwrap_or("").to_string());
        // Envoy applies an ejection from its main thread: let it land before the next request.
        std::thread::sleep(Duration::from_millis(20));
    }
    let then_only_v2 = names[10..].iter().all(|n| n == "hello-v2");
    let returned_after = loop {
        let r = c.get("hello", "/od").unwrap();
        if r.header("x-echo-name") == Some("hello-v1")
            || ejected_at.elapsed() > Duration::from_secs(10)
        {
            break ejected_at.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcomes {
        breaker: (ok, overflow.len()),
        overflow_marked,
        failures_before_ejection: failures,
        then_only_v2,
        returned_after,
    }
}

fn run(name: &str, net: u8, envoy: bool) -> Outcomes {
    let mut q = Quickstart::new(name, net);
    q.write_file("virtual-service.yaml", RULES);
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let out = scenario(&q);
    eprintln!("{name}: {out:?}");
    q.assert_client_nacked_nothing();
    out
}

fn check(o: &Outcomes, who: &str) {
    assert!(
        o.breaker.0 >= 1 && o.breaker.1 >= 5 && o.breaker.0 + o.breaker.1 == 10,
        "{who}: circuit breaker {:?}",
        o.breaker
    );
    assert!(
        o.overflow_marked,
        "{who}: overflow responses carry x-envoy-overloaded"
    );
    assert_eq!(
        o.failures_before_ejection, 3,
        "{who}: 3 consecutive 5xx eject hello-v1"
    );
    assert!(o.then_only_v2, "{who}: the ejected host gets no traffic");
    assert!(
        (Duration::from_millis(1900)..Duration::from_millis(3600)).contains(&o.returned_after),
        "{who}: hello-v1 back after {:?} (ejection time 2 s, then the next 1 s tick)",
        o.returned_after
    );
}

#[test]
fn weft_proxy_and_envoy_agree_on_circuit_breaking_and_outlier_ejection() {
    let weft = run("policies-weft", 43, false);
    check(&weft, "weft-proxy");
    let envoy = run("policies-envoy", 44, true);
    check(&envoy, "Envoy");
    assert_eq!(
        weft.failures_before_ejection,
        envoy.failures_before_ejection
    );
}
