//! VirtualService redirects, rewrites and header edits, through weft-proxy and through a stock
//! Envoy as the client sidecar, fed the same config by weftd: what the client and the backend see
//! must be the same.

use weft_e2e::{Client, Quickstart};

const VS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: hello, namespace: default }
spec:
  hosts: [hello]
  http:
  - match: [{ uri: { prefix: /old } }]
    redirect: { uri: /new, redirectCode: 302 }
  - match: [{ uri: { prefix: /mirror } }]
    mirror: { host: hello, subset: v2 }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /cors } }]
    corsPolicy:
      allowOrigins: [{ exact: "https://app.example" }]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-echo-name]
      maxAge: 24h
      allowCredentials: true
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { prefix: /teapot } }]
    directResponse: { status: 418, body: { string: "short and stout" } }
  - match: [{ uri: { prefix: /bytes } }]
    directResponse: { status: 200, body: { bytes: "aGVsbG8=" } }
  - match: [{ uri: { prefix: /moved } }]
    redirect: { authority: example.com, scheme: https }
  - match: [{ uri: { prefix: /api/ } }]
    rewrite: { uri: /v2/ }
    headers:
      request: { set: { x-env: test }, add: { x-added: one }, remove: [x-secret] }
      response: { set: { x-served-by: mesh }, remove: [x-echo-attempt] }
    route: [{ destination: { host: hello, subset: v1 } }]
  - match: [{ uri: { regex: "/svc/[^/]+/.*" } }]
    rewrite: { uriRegexRewrite: { match: "^/svc/([^/]+)/(.*)$", rewrite: "/\\2/of/\\1" }, authority: rewritten.example }
    route: [{ destination: { host: hello, subset: v1 } }]
  - route: [{ destination: { host: hello, subset: v1 } }]
"#;

/// An answer's status, its access-control headers (sorted), and whether the backend answered.
type CorsView = (u16, Vec<(String, String)>, bool);

#[derive(Debug, PartialEq)]
struct Seen {
    old: (u16, String),
    moved: (u16, String),
    api_path: String,
    api_headers: Vec<(String, String)>,
    api_response: (Option<String>, bool),
    svc: (String, String),
    direct: (u16, String, String),
    /// (who answered, how many copies the v2 mirror saw).
    mirrored: (String, String),
    /// Preflight, actual, foreign-origin actual, foreign-origin preflight: status and the CORS
    /// headers of each answer (and whether the backend answered).
    cors: Vec<CorsView>,
}

fn echo(
    c: &mut Client,
    path: &str,
    extra: &[(&str, &str)],
) -> (weft_e2e::Response, serde_json::Value) {
    let mut headers = vec![("accept", "application/json")];
    headers.extend_from_slice(extra);
    let r = c.request("GET", "hello", path, &headers).unwrap();
    let v = serde_json::from_str(&r.body).unwrap_or_default();
    (r, v)
}

fn scenario(q: &Quickstart) -> Seen {
    let mut c = Client::new(q.egress());
    let r = c.get("hello", "/old?q=1").unwrap();
    let old = (r.status, r.header("location").unwrap_or("").to_string());
    let r = c.get("hello", "/moved/x").unwrap();
    let moved = (r.status, r.header("location").unwrap_or("").to_string());
    let (r, v) = echo(
        &mut c,
        "/api/users?id=7",
        &[("x-secret", "s"), ("x-added", "zero")],
    );
    let h = &v["headers"];
    let api_headers = ["x-env", "x-added", "x-secret", "x-envoy-original-path"]
        .iter()
        .map(|k| {
            (
                k.to_string(),
                h[*k].as_str().unwrap_or("<absent>").to_string(),
            )
        })
        .collect();
    let api_response = (
        r.header("x-served-by").map(str::to_string),
        r.header("x-echo-attempt").is_none(),
    );
    let (_, v) = echo(&mut c, "/svc/foo/bar", &[]);
    let svc = (
        v["path"].as_str().unwrap_or("").to_string(),
        v["headers"]["host"].as_str().unwrap_or("").to_string(),
    );
    let teapot = c.get("hello", "/teapot").unwrap();
    let bytes = c.get("hello", "/bytes").unwrap();
    let direct = (teapot.status, teapot.body, bytes.body);
    let id = format!("mirror-{}", q.name);
    let m = c
        .request("GET", "hello", "/mirror", &[("x-request-id", &id)])
        .unwrap();
    let path = format!("/echo/attempts?id={id}");
    let copies = weft_e2e::wait_until(std::time::Duration::from_secs(3), || {
        let n = weft_e2e::get(q.echo_addr(1), &path).ok()?.body;
        (n != "0").then_some(n)
    })
    .unwrap_or_else(|| "0".into());
    let mirrored = (m.header("x-echo-name").unwrap_or("").to_string(), copies);
    let cors_view = |r: weft_e2e::Response| {
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("access-control-"))
            .cloned()
            .collect();
        h.sort();
        (r.status, h, r.header("x-echo-name").is_some())
    };
    let app = ("origin", "https://app.example");
    let evil = ("origin", "https://evil.example");
    let ask = ("access-control-request-method", "POST");
    let cors = vec![
        cors_view(c.request("OPTIONS", "hello", "/cors", &[app, ask]).unwrap()),
        cors_view(c.request("GET", "hello", "/cors", &[app]).unwrap()),
        cors_view(c.request("GET", "hello", "/cors", &[evil]).unwrap()),
        cors_view(
            c.request("OPTIONS", "hello", "/cors", &[evil, ask])
                .unwrap(),
        ),
    ];
    Seen {
        old,
        moved,
        api_path: v_path(&mut c),
        api_headers,
        api_response,
        svc,
        direct,
        mirrored,
        cors,
    }
}

fn v_path(c: &mut Client) -> String {
    let (_, v) = echo(c, "/api/users?id=7", &[]);
    v["path"].as_str().unwrap_or("").to_string()
}

fn run(name: &str, net: u8, envoy: bool) -> Seen {
    let mut q = Quickstart::new(name, net);
    q.write_file("virtual-service.yaml", VS);
    q.start_weftd();
    q.start_hello();
    q.start_client(envoy);
    let seen = scenario(&q);
    eprintln!("{name}: {seen:?}");
    q.assert_client_nacked_nothing();
    seen
}

#[test]
fn weft_proxy_and_envoy_agree_on_redirects_rewrites_and_headers() {
    let weft = run("rewrites-weft", 45, false);
    assert_eq!(weft.old, (302, "http://hello/new?q=1".to_string()));
    assert_eq!(weft.moved, (301, "https://example.com/moved/x".to_string()));
    assert_eq!(weft.api_path, "/v2/users?id=7");
    assert_eq!(
        weft.api_headers,
        [
            ("x-env", "test"),
            ("x-added", "zero, one"),
            ("x-secret", "<absent>"),
            ("x-envoy-original-path", "/api/users?id=7")
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<Vec<_>>(),
        "set overwrites, add appends, remove removes"
    );
    assert_eq!(weft.api_response, (Some("mesh".to_string()), true));
    assert_eq!(
        weft.svc,
        ("/bar/of/foo".to_string(), "rewritten.example".to_string())
    );
    assert_eq!(
        weft.direct,
        (418, "short and stout".to_string(), "hello".to_string())
    );
    assert_eq!(
        weft.mirrored,
        ("hello-v1".to_string(), "1".to_string()),
        "v1 answers, v2 gets one shadow copy"
    );
    let envoy = run("rewrites-envoy", 46, true);
    assert_eq!(weft, envoy, "weft-proxy and Envoy differ");
}
