//! Consistent hashing (DestinationRule `loadBalancer.consistentHash`), through weft-proxy and
//! through a stock Envoy fed the same config by weftd: a header key on a ring hash, then a
//! generated cookie on maglev. Both proxies must keep each key on one backend and spread the keys
//! over both; which key lands where differs (each proxy has its own hash function, see
//! docs/envoy-differences.md), so the test compares the behaviour, not the mapping.
//! A retry goes to another host (Istio's `previous_hosts` predicate, which weftd sets as istiod
//! does), even when the key hashes it back to the backend that failed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use weft_e2e::{Client, Quickstart, wait_until};

const ROUTE_TO_SERVICE: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - route: [{ destination: { host: hello } }]
    retries: { attempts: 2, retryOn: 5xx }
"#;

fn rule(lb: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: hello, namespace: default }}
spec:
  host: hello
  trafficPolicy: {{ loadBalancer: {{ consistentHash: {lb} }} }}
  subsets:
  - {{ name: v1, labels: {{ version: v1 }} }}
  - {{ name: v2, labels: {{ version: v2 }} }}
"#
    )
}

#[derive(Debug, PartialEq)]
struct Seen {
    /// Per key: did every request reach the same backend?
    header_sticky: bool,
    header_backends_used: usize,
    /// When a key's own backend fails it, the retry is served by the other backend for at
    /// least three keys in four. Not all: each proxy steps to other points of its ring for
    /// another host (Envoy to the next points, weft-proxy to rehashed ones), and those can
    /// belong to the same host; without the predicate no key would move at all.
    retries_moved: bool,
    /// The Set-Cookie a first request gets, with the generated value blanked.
    cookie_set: String,
    cookie_sticky: bool,
    cookie_backends_used: usize,
}

fn backend(r: &weft_e2e::Response) -> String {
    r.header("x-echo-name").unwrap_or("-").to_string()
}

fn scenario(q: &Quickstart) -> Seen {
    let mut c = Client::new(q.egress());
    let mut by_user: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for round in 0..4 {
        for u in 0..24 {
            let user = format!("user-{u}");
            let r = c
                .request("GET", "hello", &format!("/r{round}"), &[("x-user", &user)])
                .expect("request");
            assert_eq!(r.status, 200, "{}", r.body);
            by_user.entry(user).or_default().insert(backend(&r));
        }
    }
    let header_sticky = by_user.values().all(|b| b.len() == 1);
    let header_backends_used = by_user.values().flatten().collect::<BTreeSet<_>>().len();
    let mut moved = 0;
    for (user, backends) in &by_user {
        let Some(own) = backends.iter().next() else {
            continue;
        };
        let r = c
            .request(
                "GET",
                "hello",
                &format!("/?fail_on={own}"),
                &[("x-user", user)],
            )
            .expect("request");
        if r.status == 200 && backend(&r) != *own {
            moved += 1;
        }
    }
    eprintln!(
        "retries moved to another host: {moved} of {}",
        by_user.len()
    );
    let retries_moved = moved * 4 >= by_user.len() * 3;

    q.write_file(
        "zz-hash.yaml",
        &rule("{ httpCookie: { name: user-session, path: /, ttl: 60s }, maglev: { tableSize: 65537 } }"),
    );
    // Until the new policy is in force, answers carry no cookie.
    let first = wait_until(Duration::from_secs(10), || {
        let r = Client::new(q.egress()).get("hello", "/").ok()?;
        r.header("set-cookie").is_some().then_some(r)
    })
    .expect("a generated cookie");
    let set = first.header("set-cookie").unwrap().to_string();
    let value = set.split('"').nth(1).unwrap_or("").to_string();
    let cookie_set = set.replace(&value, "<value>");
    let mut cookie_sticky = true;
    let mut used = BTreeSet::new();
    // Each "client" gets its cookie on a fresh connection (a new source port), then sticks.
    for _ in 0..16 {
        let mut fresh = Client::new(q.egress());
        let r = fresh.get("hello", "/").expect("request");
        let Some(set) = r.header("set-cookie") else {
            cookie_sticky = false;
            continue;
        };
        let v = set.split('"').nth(1).unwrap_or("").to_string();
        let cookie = format!("user-session=\"{v}\"");
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            let r = fresh
                .request("GET", "hello", "/", &[("cookie", &cookie)])
                .expect("request");
            assert!(
                r.header("set-cookie").is_none(),
                "a present cookie is not set again"
            );
            seen.insert(backend(&r));
        }
        cookie_sticky &= seen.len() == 1;
        used.extend(seen);
    }
    Seen {
        header_sticky,
        header_backends_used,
        retries_moved,
        cookie_set,
        cookie_sticky,
        cookie_backends_used: used.len(),
    }
}

fn run(name: &str, net: u8, envoy: bool) -> Seen {
    let mut q = Quickstart::new(name, net);
    q.write_file("virtual-service.yaml", ROUTE_TO_SERVICE);
    q.write_file("zz-hash.yaml", &rule("{ httpHeaderName: x-user }"));
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let seen = scenario(&q);
    eprintln!("{name}: {seen:?}");
    q.assert_client_nacked_nothing();
    seen
}

#[test]
fn weft_proxy_and_envoy_hash_consistently_alike() {
    let weft = run("hash-weft", 50, false);
    assert_eq!(
        weft,
        Seen {
            header_sticky: true,
            header_backends_used: 2,
            retries_moved: true,
            cookie_set: "user-session=\"<value>\"; Max-Age=60; Path=/; HttpOnly".into(),
            cookie_sticky: true,
            cookie_backends_used: 2,
        }
    );
    let envoy = run("hash-envoy", 51, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
