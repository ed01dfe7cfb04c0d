//! Route matches on a runtime fraction and on gRPC requests, through Envoy 1.40 and weft-proxy
//! on one bootstrap: 0% never matches, 100% always, two routes with the same share see one
//! draw per request (the second gets nothing the first did not take), a share's requests fall
//! within the binomial bounds, `grpc` matches gRPC content types only (not gRPC-Web), and a
//! direct response reaches a gRPC client as `grpc-message`.

use weft_e2e::{Client, Flavor, Standalone, binomial_bounds};

const PORT: u16 = 8080;
/// Requests sent to the shared routes.
const N: usize = 300;

fn direct(body: &str) -> String {
    format!("direct_response: {{ status: 200, body: {{ inline_string: {body} }} }}")
}

fn share(prefix: &str, percent: u32, body: &str) -> String {
    format!(
        "              - match: {{ prefix: {prefix}, runtime_fraction: {{ default_value: {{ numerator: {percent} }}, runtime_key: routing.{body} }} }}\n                {}\n",
        direct(body)
    )
}

fn resources(ip: &str) -> String {
    let routes = [
        share("/never", 0, "never"),
        format!(
            "              - match: {{ prefix: /never }}\n                {}\n",
            direct("after-never")
        ),
        share("/always", 100, "always"),
        share("/split", 30, "first"),
        share("/split", 30, "second"),
        format!(
            "              - match: {{ prefix: /rpc, grpc: {{}} }}\n                {}\n",
            direct("grpc")
        ),
        format!(
            "              - match: {{ prefix: / }}\n                {}\n",
            direct("rest")
        ),
    ]
    .concat();
    Standalone::http_listener(
        ip,
        PORT,
        &format!(
            "          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n{routes}"
        ),
        "",
    )
}

/// The body each request got (which route answered), and how many of the split requests each
/// route took.
fn scenario(flavor: Flavor, net: u8) -> (Vec<String>, [usize; 3]) {
    let mut s = Standalone::new("runtime-fraction", net, flavor);
    s.start(&resources(&s.ip()));
    let mut c = Client::new(format!("{}:{PORT}", s.ip()).parse().expect("addr"));
    let mut answered = |path: &str, headers: &[(&str, &str)]| {
        let r = c.request("GET", "svc", path, headers).expect("an answer");
        assert_eq!(r.status, 200, "{}: {path}", flavor.name());
        // A gRPC client gets a direct response's body as `grpc-message`.
        match (r.header("grpc-status"), r.header("grpc-message")) {
            (Some(status), Some(m)) => format!("grpc-status {status}, grpc-message {m}"),
            (Some(status), None) => format!("grpc-status {status}, no message"),
            _ => r.body,
        }
    };
    let mut fixed = Vec::new();
    for _ in 0..5 {
        fixed.push(answered("/never", &[]));
        fixed.push(answered("/always", &[]));
    }
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc-web",
        "text/plain",
    ] {
        let body = answered("/rpc", &[("content-type", content_type)]);
        fixed.push(format!("{content_type}: {body}"));
    }
    let mut split = [0; 3];
    for _ in 0..N {
        match answered("/split", &[]).as_str() {
            "first" => split[0] += 1,
            "second" => split[1] += 1,
            _ => split[2] += 1,
        }
    }
    (fixed, split)
}

#[test]
fn runtime_fractions_and_grpc_matches_as_in_envoy() {
    let (weft, weft_split) = scenario(Flavor::Weft, 126);
    let (envoy, envoy_split) = scenario(Flavor::Envoy, 127);
    assert_eq!(weft, envoy, "weft-proxy (left) and Envoy (right) differ");
    assert_eq!(
        &weft[..4],
        ["after-never", "always", "after-never", "always"]
    );
    assert_eq!(
        weft[10..],
        [
            "application/grpc: grpc-status 2, grpc-message grpc",
            "application/grpc+proto: grpc-status 2, grpc-message grpc",
            "application/grpc-web: rest",
            "text/plain: rest"
        ]
    );
    let (lo, hi) = binomial_bounds(N, 0.3);
    for (name, split) in [("weft-proxy", weft_split), ("envoy", envoy_split)] {
        assert!(
            (lo..=hi).contains(&split[0]),
            "{name}: {split:?} outside {lo}..={hi}"
        );
        assert_eq!(split[1], 0, "{name}: one draw per request: {split:?}");
    }
}
