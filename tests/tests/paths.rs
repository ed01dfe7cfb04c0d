//! Path normalization, differentially: one bootstrap with static resources, run by Envoy and by
//! weft-proxy, with a listener for each setting (`normalize_path` as Istio's BASE, with
//! `merge_slashes`, each `path_with_escaped_slashes_action`, and none). Every tricky request
//! target (dot segments, escaped dots and slashes, backslashes, escaped unreserved characters,
//! queries) must give the same status, `location`, path at the backend, and logged path; a
//! route and an RBAC rule on `/admin` must hold for every spelling of `/admin`.

use std::time::Duration;

use weft_e2e::standalone::{Flavor, Standalone};
use weft_e2e::{Client, wait_until};

const BASE: u16 = 18500;

/// (listener, HCM fields at 10 spaces)
const LISTENERS: [(&str, &str); 6] = [
    ("plain", ""),
    ("base", "          normalize_path: true\n"),
    (
        "merge",
        "          normalize_path: true\n          merge_slashes: true\n",
    ),
    (
        "reject",
        "          normalize_path: true\n          path_with_escaped_slashes_action: REJECT_REQUEST\n",
    ),
    (
        "forward",
        "          normalize_path: true\n          merge_slashes: true\n          path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD\n",
    ),
    (
        "redirect",
        "          normalize_path: true\n          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n",
    ),
];

const TARGETS: [&str; 22] = [
    "/",
    "/app/",
    "/app/../admin",
    "/app//",
    "/app/%2f",
    "/app%2f/",
    "/xyz%30..//abc",
    "/app/%2E./admin",
    r"/app\admin",
    r"/app/\/\/\admin",
    "/%2Fapp%5cadmin%5Cabc",
    r"/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\abc",
    "/app//../admin",
    "/app//../../admin",
    "/a/b/..?x=/../y",
    "/..",
    "/a/./b/.",
    "/100%",
    "/%61dmin",
    "/admin/.",
    "//admin",
    "/public/%2e%2e/admin?q=1",
];

/// A route on exactly `/admin`, the rest to the backend (YAML at 10 spaces).
const ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - { match: { path: /admin }, direct_response: { status: 418, body: { inline_string: "the admin route" } } }
              - { match: { prefix: / }, route: { cluster: echo } }
"#;

/// RBAC denying everything under `/admin/` (an HTTP filter, YAML at 10 spaces).
const RBAC_ADMIN: &str = r#"          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  admin-subtree:
                    permissions: [{ url_path: { path: { prefix: /admin/ } } }]
                    principals: [{ any: true }]
"#;

fn resources(ip: &str, backend: std::net::SocketAddr, logs: &std::path::Path) -> String {
    let mut out = String::from("  listeners:\n");
    for (i, (name, hcm)) in LISTENERS.iter().enumerate() {
        let port = BASE + i as u16;
        let log = Standalone::access_log(
            &logs.join(format!("access-{name}.log")),
            "%REQ(X-CASE)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS%",
        );
        let hcm = format!("{hcm}{log}{ROUTES}");
        out.push_str(&Standalone::hcm_listener(
            name, ip, port, &hcm, RBAC_ADMIN, "",
        ));
    }
    out.push_str(&format!(
        "  clusters:\n  - name: echo\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment: {}\n",
        Standalone::load_assignment("echo", &[backend])
    ));
    out
}

/// Per (listener, target): status, location, the path the backend saw; then the logged lines.
fn run(flavor: Flavor, net: u8) -> (Vec<String>, Vec<String>) {
    let mut s = Standalone::new("paths", net, flavor);
    let backend = s.backend("echo");
    let dir = s.dir.clone();
    s.start(&resources(&s.ip(), backend, &dir));
    let mut seen = Vec::new();
    for (i, (name, _)) in LISTENERS.iter().enumerate() {
        let addr = format!("{}:{}", s.ip(), BASE + i as u16).parse().unwrap();
        for (n, target) in TARGETS.iter().enumerate() {
            let raw = format!(
                "GET {target} HTTP/1.1\r\nhost: svc\r\naccept: application/json\r\nx-case: {name}.{n}\r\nconnection: close\r\n\r\n"
            );
            let r = Client::new(addr)
                .send_raw(raw.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {name} {target}: {e}", flavor.name()));
            let path = serde_json::from_str::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v["path"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("(answered: {:?})", r.body));
            seen.push(format!(
                "{name} {target} -> {} location={} path={path}",
                r.status,
                r.header("location").unwrap_or("-")
            ));
        }
    }
    let total = LISTENERS.len() * TARGETS.len();
    let logged = wait_until(Duration::from_secs(10), || {
        let mut lines = Vec::new();
        for (name, _) in LISTENERS {
            let text = std::fs::read_to_string(dir.join(format!("access-{name}.log"))).ok()?;
            lines.extend(text.lines().map(str::to_string));
        }
        (lines.len() >= total).then_some(lines)
    })
    .unwrap_or_else(|| panic!("{}: access log lines\n{}", flavor.name(), s.logs()));
    (seen, logged)
}

#[test]
fn paths_are_normalized_as_envoy_normalizes_them() {
    let weft = run(Flavor::Weft, 88);
    let envoy = run(Flavor::Envoy, 89);
    let mut differ = 0;
    for (w, e) in weft.0.iter().zip(&envoy.0) {
        if w == e {
            println!("  {w}");
        } else {
            differ += 1;
            println!("! weft  {w}\n! envoy {e}");
        }
    }
    let (mut wl, mut el) = (weft.1.clone(), envoy.1.clone());
    wl.sort();
    el.sort();
    for (w, e) in wl.iter().zip(&el) {
        if w != e {
            differ += 1;
            println!("! log weft {w:<50} envoy {e}");
        }
    }
    assert_eq!(differ, 0, "weft-proxy and Envoy differ (see above)");
    // Every spelling of the admin route reaches it once normalized, never without.
    let status = |listener: &str, target: &str| {
        weft.0
            .iter()
            .find(|l| l.starts_with(&format!("{listener} {target} -> ")))
            .and_then(|l| l.split(" -> ").nth(1))
            .and_then(|r| r.split(' ').next())
            .unwrap_or_default()
            .to_string()
    };
    for target in [
        "/app/../admin",
        "/app/%2E./admin",
        "/%61dmin",
        "/app//../../admin",
    ] {
        assert_eq!(status("base", target), "418", "{target}");
        assert_ne!(status("plain", target), "418", "{target}");
    }
    // The RBAC rule on /admin/ holds for `/public/%2e%2e/admin`'s normalized form only if the
    // path ends up under /admin/: `/admin/.` does.
    assert_eq!(status("base", "/admin/."), "403");
}
