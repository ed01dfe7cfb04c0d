//! Property test: generated combinations of valid Istio objects (Services, WorkloadEntries,
//! DestinationRules with every traffic policy, VirtualServices with every match, action and
//! route option, delegates and TCP routes with `destinationSubnets`, ServiceEntries, exportTo,
//! a REGISTRY_ONLY or ALLOW_ANY Sidecar, with or without an `egressProxy`) are loaded by weftd
//! without rejection, and the xDS weftd generates from each is accepted (ACKed, never NACKed) by
//! a live stock Envoy 1.40 and by weft-proxy, each the client sidecar of its own mesh, once as a
//! plain sidecar and once as a captured one (INTERCEPTION_MODE REDIRECT). The cases come from a
//! seeded generator, so a failure names its case and seed and can be replayed;
//! WEFT_GENERATED_CASES sets how many (default 60 per proxy, half that captured),
//! WEFT_GENERATED_SEED the seed.

use std::time::Duration;

use weft_e2e::{Quickstart, get_json, wait_until};

/// xorshift64*: small, seeded, good enough to pick config shapes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn string_match(r: &mut Rng, value: &str) -> String {
    match r.below(3) {
        0 => format!("{{ exact: \"{value}\" }}"),
        1 => format!("{{ prefix: \"{value}\" }}"),
        _ => format!("{{ regex: \"{value}[a-z0-9-]*\" }}"),
    }
}

fn load_balancer(r: &mut Rng) -> String {
    if r.chance(60) {
        format!(
            "{{ simple: {} }}",
            r.pick(&[
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "LEAST_CONN",
                "RANDOM",
                "PASSTHROUGH"
            ])
        )
    } else {
        let key = match r.below(4) {
            0 => "httpHeaderName: x-user".to_string(),
            1 => format!(
                "httpCookie: {{ name: session, path: /, ttl: {}s }}",
                r.below(3600)
            ),
            2 => "useSourceIp: true".to_string(),
            _ => "httpQueryParameterName: user".to_string(),
        };
        let algo = match r.below(3) {
            0 => String::new(),
            1 => format!(", ringHash: {{ minimumRingSize: {} }}", 64 << r.below(6)),
            _ => format!(
                ", maglev: {{ tableSize: {} }}",
                r.pick(&["65537", "251", "5000011"])
            ),
        };
        format!("{{ consistentHash: {{ {key}{algo} }} }}")
    }
}

fn traffic_policy(r: &mut Rng) -> String {
    let mut parts = Vec::new();
    if r.chance(60) {
        parts.push(format!("loadBalancer: {}", load_balancer(r)));
    }
    if r.chance(50) {
        parts.push(format!(
            "connectionPool: {{ tcp: {{ maxConnections: {}, connectTimeout: {}ms }}, http: {{ http1MaxPendingRequests: {}, http2MaxRequests: {}, maxRequestsPerConnection: {}, maxRetries: {}, idleTimeout: {}s }} }}",
            1 + r.below(1000),
            1 + r.below(5000),
            1 + r.below(100),
            1 + r.below(1000),
            r.below(10),
            r.below(5),
            1 + r.below(300)
        ));
    }
    if r.chance(50) {
        parts.push(format!(
            "outlierDetection: {{ consecutive5xxErrors: {}, consecutiveGatewayErrors: {}, interval: {}s, baseEjectionTime: {}s, maxEjectionPercent: {}, minHealthPercent: {} }}",
            1 + r.below(10),
            1 + r.below(10),
            1 + r.below(30),
            1 + r.below(120),
            r.below(101),
            r.below(101)
        ));
    }
    if r.chance(25) {
        parts.push(format!(
            "portLevelSettings: [{{ port: {{ number: 8080 }}, loadBalancer: {} }}]",
            load_balancer(r)
        ));
    }
    format!("{{ {} }}", parts.join(", "))
}

fn destination_rule(r: &mut Rng, svc: &str) -> String {
    let mut subsets = "  - { name: v1, labels: { version: v1 } }\n".to_string();
    subsets.push_str("  - name: v2\n    labels: { version: v2 }\n");
    if r.chance(30) {
        subsets.push_str(&format!("    trafficPolicy: {}\n", traffic_policy(r)));
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: {svc}, namespace: default }}\nspec:\n  host: {svc}\n{}  trafficPolicy: {}\n  subsets:\n{subsets}",
        export_to(r),
        traffic_policy(r)
    )
}

/// A match, and whether its `uri` is a regex (a `rewrite.uri` needs prefix or exact matches).
fn http_match(r: &mut Rng) -> (String, bool) {
    let mut m = Vec::new();
    let mut regex_uri = false;
    if r.chance(60) {
        let uri = string_match(r, "/api");
        regex_uri = uri.contains("regex");
        m.push(format!("uri: {uri}"));
    }
    if r.chance(30) {
        m.push(format!(
            "headers: {{ x-user: {} }}",
            string_match(r, "jason")
        ));
    }
    if r.chance(20) {
        m.push(format!(
            "method: {{ exact: {} }}",
            r.pick(&["GET", "POST", "PUT"])
        ));
    }
    if r.chance(15) {
        m.push("authority: { prefix: gen }".into());
    }
    if r.chance(20) {
        m.push(format!(
            "queryParams: {{ track: {} }}",
            string_match(r, "beta")
        ));
    }
    if r.chance(15) {
        m.push(format!(
            "withoutHeaders: {{ x-canary: {} }}",
            string_match(r, "on")
        ));
    }
    if r.chance(15) {
        m.push("ignoreUriCase: true".into());
    }
    if r.chance(10) {
        m.push(format!("port: {}", r.pick(&["8080", "9999"])));
    }
    if r.chance(10) {
        m.push(format!(
            "sourceLabels: {{ app: {} }}",
            r.pick(&["client", "other"])
        ));
    }
    (format!("{{ {} }}", m.join(", ")), regex_uri)
}

fn http_route(r: &mut Rng, svc: &str, subsets: bool, others: &[String]) -> String {
    let mut out = String::new();
    let matches = r.below(3);
    let mut regex_uri = false;
    if matches > 0 {
        let list: Vec<String> = (0..matches)
            .map(|_| {
                let (m, regex) = http_match(r);
                regex_uri |= regex;
                m
            })
            .collect();
        out.push_str(&format!("  - match: [{}]\n", list.join(", ")));
    } else {
        out.push_str("  - name: catch-all\n");
    }
    let subset = |r: &mut Rng| {
        if subsets && r.chance(70) {
            format!(", subset: {}", r.pick(&["v1", "v2"]))
        } else {
            String::new()
        }
    };
    match r.below(10) {
        0 => {
            out.push_str(&format!(
                "    redirect: {{ uri: /moved, authority: moved.example, redirectCode: {} }}\n",
                r.pick(&["301", "302", "307", "308"])
            ));
            return out;
        }
        1 => {
            out.push_str(&format!(
                "    directResponse: {{ status: {}, body: {{ string: \"generated\" }} }}\n",
                200 + r.below(400)
            ));
            return out;
        }
        _ => {}
    }
    if r.chance(50) {
        let w = r.below(101);
        out.push_str(&format!(
            "    route:\n    - {{ destination: {{ host: {svc}{} }}, weight: {w} }}\n    - {{ destination: {{ host: {svc}{}, port: {{ number: 8080 }} }}, weight: {} }}\n",
            subset(r),
            subset(r),
            100 - w
        ));
    } else {
        out.push_str(&format!(
            "    route: [{{ destination: {{ host: {svc}{} }} }}]\n",
            subset(r)
        ));
    }
    if r.chance(40) {
        out.push_str(&format!("    timeout: {}ms\n", 1 + r.below(30_000)));
    }
    if r.chance(50) {
        let on: Vec<&str> = (0..1 + r.below(4))
            .map(|_| {
                r.pick(&[
                    "5xx",
                    "gateway-error",
                    "connect-failure",
                    "refused-stream",
                    "reset",
                    "retriable-4xx",
                    "503",
                    "cancelled",
                    "deadline-exceeded",
                    "unavailable",
                    "resource-exhausted",
                    "internal",
                ])
            })
            .collect();
        out.push_str(&format!(
            "    retries: {{ attempts: {}, perTryTimeout: {}ms, retryOn: \"{}\" }}\n",
            r.below(5),
            1 + r.below(5000),
            on.join(",")
        ));
    }
    if r.chance(25) {
        if r.chance(50) {
            out.push_str(&format!(
                "    fault: {{ delay: {{ fixedDelay: {}ms, percentage: {{ value: {}.5 }} }} }}\n",
                1 + r.below(5000),
                r.below(100)
            ));
        } else if r.chance(50) {
            out.push_str(&format!(
                "    fault: {{ abort: {{ httpStatus: {}, percentage: {{ value: {} }} }} }}\n",
                400 + r.below(200),
                r.below(101)
            ));
        } else {
            out.push_str(&format!(
                "    fault: {{ abort: {{ grpcStatus: {} }} }}\n",
                r.pick(&["UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "NOT_FOUND"])
            ));
        }
    }
    if r.chance(25) {
        if !regex_uri && r.chance(50) {
            out.push_str("    rewrite: { uri: /v2, authority: rewritten.example }\n");
        } else {
            out.push_str(
                "    rewrite: { uriRegexRewrite: { match: \"^/api/(.*)$\", rewrite: \"/\\\\1\" } }\n",
            );
        }
    }
    if r.chance(30) {
        out.push_str("    headers: { request: { set: { x-env: gen }, add: { x-trace: one }, remove: [x-secret] }, response: { set: { x-served: mesh }, remove: [server] } }\n");
    }
    if r.chance(20) && !others.is_empty() {
        let other = &others[r.below(others.len() as u64) as usize];
        out.push_str(&format!(
            "    mirror: {{ host: {other} }}\n    mirrorPercentage: {{ value: {} }}\n",
            r.below(101)
        ));
    }
    if r.chance(20) {
        out.push_str("    corsPolicy: { allowOrigins: [{ exact: \"https://app.example\" }, { regex: \"https://.*\\\\.example\" }], allowMethods: [GET, POST], allowHeaders: [x-user], exposeHeaders: [x-served], maxAge: 1h, allowCredentials: true }\n");
    }
    out
}

/// One case: services gen-0..gen-N on port 8080 (and sometimes a second port), with their
/// endpoints, rules and routes, plus ServiceEntries.
fn generate(r: &mut Rng, net: u8) -> String {
    let mut y = String::new();
    let services = 1 + r.below(4);
    let names: Vec<String> = (0..services).map(|i| format!("gen-{i}")).collect();
    for (i, svc) in names.iter().enumerate() {
        let second = match r.below(4) {
            0 => ", { name: grpc-api, port: 9090 }",
            1 => ", { name: tcp-db, port: 5432 }",
            2 => ", { name: http2-web, port: 8081, appProtocol: http2 }",
            _ => "",
        };
        y.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {svc}, namespace: default }}\nspec:\n  selector: {{ app: {svc} }}\n  ports: [{{ name: http, port: 8080 }}{second}]\n---\n"
        ));
        for e in 0..1 + r.below(3) {
            y.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{ name: {svc}-{e}, namespace: default }}\nspec: {{ address: 127.{net}.{}.{}, labels: {{ app: {svc}, version: v{} }}, ports: {{ http: {} }}, weight: {} }}\n---\n",
                2 + i,
                1 + e,
                1 + e % 2,
                9000 + r.below(1000),
                1 + r.below(5)
            ));
        }
        let subsets = r.chance(70);
        if subsets {
            y.push_str(&destination_rule(r, svc));
            y.push_str("---\n");
        }
        if r.chance(75) {
            let others: Vec<String> = names.iter().filter(|n| *n != svc).cloned().collect();
            let mut routes: String = (0..1 + r.below(3))
                .map(|_| http_route(r, svc, subsets, &others))
                .collect();
            if r.chance(25) {
                // Delegation: a prefix handed to a host-less VirtualService.
                let delegated: String = (0..1 + r.below(2))
                    .map(|_| http_route(r, svc, subsets, &others))
                    .collect();
                routes = format!(
                    "  - match: [{{ uri: {{ prefix: /delegated }} }}]\n    delegate: {{ name: {svc}-delegate }}\n{routes}"
                );
                y.push_str(&format!(
                    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: {svc}-delegate, namespace: default }}\nspec:\n  http:\n{delegated}---\n"
                ));
            }
            y.push_str(&format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: {svc}, namespace: default }}\nspec:\n  hosts: [{svc}]\n{}  http:\n{routes}---\n",
                export_to(r)
            ));
        }
    }
    for k in 0..r.below(3) {
        let (resolution, endpoints) = if r.chance(50) {
            ("STATIC", format!("[{{ address: 127.{net}.9.{} }}]", 1 + k))
        } else {
            ("DNS", "[{ address: localhost }]".to_string())
        };
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{ name: gen-ext-{k}, namespace: default }}\nspec:\n  hosts: [gen-ext-{k}.example.com]\n{}  location: {}\n  ports: [{{ number: 8080, name: http, protocol: HTTP }}]\n  resolution: {resolution}\n  endpoints: {endpoints}\n---\n",
            export_to(r),
            r.pick(&["MESH_EXTERNAL", "MESH_INTERNAL"])
        ));
    }
    if r.chance(30) {
        // TCP routes for the quickstart's TCP service, which the client has a listener for.
        let w = r.below(101);
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: hello-tcp, namespace: default }}\nspec:\n  host: hello-tcp\n  subsets: [{{ name: v1, labels: {{ version: v1 }} }}, {{ name: v2, labels: {{ version: v2 }} }}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: hello-tcp, namespace: default }}\nspec:\n  hosts: [hello-tcp]\n  tcp:\n  - match: [{{ port: {}{} }}]\n    route:\n    - {{ destination: {{ host: hello-tcp, subset: v1 }}, weight: {w} }}\n    - {{ destination: {{ host: hello-tcp, subset: v2 }}, weight: {} }}\n---\n",
            r.pick(&["7070", "7071"]),
            if r.chance(50) {
                ", destinationSubnets: [10.96.0.0/16, 192.0.2.7]"
            } else {
                ""
            },
            100 - w
        ));
    }
    // The client's Sidecar again (same egress listeners as the quickstart's, either outbound
    // policy), with inbound HTTP and TCP listeners for PeerAuthentication and
    // AuthorizationPolicy to shape.
    y.push_str(&format!(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{ name: client, namespace: default }}\nspec:\n  workloadSelector: {{ labels: {{ app: client }} }}\n  outboundTrafficPolicy: {{ {} }}\n  ingress:\n  - port: {{ number: 9090, protocol: HTTP, name: in-http }}\n    bind: 127.{net}.0.10\n    defaultEndpoint: 127.0.0.1:9\n  - port: {{ number: 9091, protocol: TCP, name: in-tcp }}\n    bind: 127.{net}.0.10\n    defaultEndpoint: 127.0.0.1:9\n  egress:\n  - port: {{ number: 8080, protocol: HTTP, name: egress-http }}\n    bind: 127.{net}.0.10\n    hosts: [\"./*\"]\n  - port: {{ number: 7070, protocol: TCP, name: egress-tcp }}\n    bind: 127.{net}.0.10\n    hosts: [\"./*\"]\n---\n",
        r.pick(&[
            "mode: REGISTRY_ONLY",
            "mode: ALLOW_ANY",
            "mode: ALLOW_ANY, egressProxy: { host: hello, port: { number: 8080 } }"
        ])
    ));
    y.push_str(&security(r));
    y
}

/// PeerAuthentication (mesh-wide, and sometimes for the client with a port-level mode) and up
/// to three AuthorizationPolicies with random actions, scopes and rules.
fn security(r: &mut Rng) -> String {
    let mode = |r: &mut Rng| r.pick(&["STRICT", "PERMISSIVE", "DISABLE", "UNSET"]);
    let mut y = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: default, namespace: istio-system }}\nspec: {{ mtls: {{ mode: {} }} }}\n---\n",
        mode(r)
    );
    if r.chance(40) {
        y.push_str(&format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{ name: client, namespace: default }}\nspec:\n  selector: {{ matchLabels: {{ app: client }} }}\n  mtls: {{ mode: {} }}\n  portLevelMtls: {{ \"9091\": {{ mode: {} }} }}\n---\n",
            mode(r),
            mode(r)
        ));
    }
    let list = |r: &mut Rng, pool: &[&str]| {
        let n = 1 + r.below(2) as usize;
        let v: Vec<String> = (0..n).map(|_| format!("\"{}\"", r.pick(pool))).collect();
        format!("[{}]", v.join(", "))
    };
    for p in 0..r.below(4) {
        let mut rules = String::new();
        for _ in 0..r.below(4) {
            let mut rule = String::from("  - ");
            let mut parts = Vec::new();
            if r.chance(60) {
                let (field, pool): (&str, &[&str]) = match r.below(6) {
                    0 => (
                        "principals",
                        &[
                            "cluster.local/ns/default/sa/client",
                            "cluster.local/ns/*",
                            "*",
                            "*/sa/admin",
                        ],
                    ),
                    1 => ("notPrincipals", &["cluster.local/ns/default/sa/hello", "*"]),
                    2 => ("namespaces", &["default", "prod-*", "*"]),
                    3 => ("ipBlocks", &["127.0.0.0/8", "10.0.0.1", "::1/128"]),
                    4 => ("notRemoteIpBlocks", &["192.168.0.0/16"]),
                    _ => ("requestPrincipals", &["issuer/subject", "*"]),
                };
                parts.push(format!(
                    "from: [{{ source: {{ {field}: {} }} }}]",
                    list(r, pool)
                ));
            }
            if r.chance(60) {
                let (field, pool): (&str, &[&str]) = match r.below(6) {
                    0 => ("methods", &["GET", "POST", "DELETE"]),
                    1 => ("paths", &["/admin", "/api/*", "*/secret", "*"]),
                    2 => ("notPaths", &["/health"]),
                    3 => ("ports", &["9090", "9091"]),
                    4 => ("hosts", &["hello", "*.example.com", "*"]),
                    _ => ("notMethods", &["OPTIONS"]),
                };
                parts.push(format!(
                    "to: [{{ operation: {{ {field}: {} }} }}]",
                    list(r, pool)
                ));
            }
            if r.chance(40) {
                let cond = match r.below(6) {
                    0 => "{ key: \"request.headers[x-user]\", values: [\"alice\", \"bob*\"] }",
                    1 => "{ key: source.ip, notValues: [\"10.0.0.0/8\"] }",
                    2 => "{ key: source.namespace, values: [default] }",
                    3 => "{ key: destination.port, values: [\"9090\"] }",
                    4 => "{ key: connection.sni, values: [\"*.example.com\"] }",
                    _ => {
                        "{ key: source.principal, values: [\"cluster.local/ns/default/sa/client\"] }"
                    }
                };
                parts.push(format!("when: [{cond}]"));
            }
            if parts.is_empty() {
                rule.push_str("{}");
            } else {
                rule.push_str(&parts.join("\n    "));
            }
            rules.push_str(&rule);
            rules.push('\n');
        }
        let selector = if r.chance(50) {
            "  selector: { matchLabels: { app: client } }\n"
        } else {
            ""
        };
        let rules = if rules.is_empty() && r.chance(50) {
            String::new()
        } else if rules.is_empty() {
            "  rules: []\n".into()
        } else {
            format!("  rules:\n{rules}")
        };
        y.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: gen-authz-{p}, namespace: {} }}\nspec:\n{selector}  action: {}\n{rules}---\n",
            r.pick(&["default", "istio-system"]),
            r.pick(&["ALLOW", "DENY", "AUDIT"])
        ));
    }
    y
}

/// Sometimes an `exportTo` line (the client lives in `default`).
fn export_to(r: &mut Rng) -> String {
    match r.below(6) {
        0 => "  exportTo: [\".\"]\n".into(),
        1 => "  exportTo: [\"*\"]\n".into(),
        2 => "  exportTo: [elsewhere]\n".into(),
        _ => String::new(),
    }
}

/// Waits until weftd served config generation `after + 1` or later, and returns it; fails with
/// the rejections if the generated config was not valid.
fn next_generation(q: &Quickstart, after: u64, case: &str) -> u64 {
    let configz = wait_until(Duration::from_secs(10), || {
        let c = get_json(q.debug(), "/debug/configz")?;
        (c["generation"].as_u64()? > after).then_some(c)
    })
    .unwrap_or_else(|| panic!("{}: weftd never loaded {case}", q.name));
    let rejected = configz["rejected"].as_array().cloned().unwrap_or_default();
    assert!(
        rejected.is_empty(),
        "{}: weftd rejected generated objects of {case}: {rejected:#?}",
        q.name
    );
    configz["generation"].as_u64().unwrap_or(0)
}

/// Waits until the client ACKed everything weftd sent it; panics on a NACK.
fn wait_acked(q: &Quickstart, case: &str, yaml: &str) {
    let node = q.node_id(10, "client");
    let mut stable = 0;
    let ok = wait_until(Duration::from_secs(15), || {
        let s = q.sync_of(&node)?;
        let types = s["types"].as_object()?.clone();
        for (t, st) in &types {
            if st["nacks"].as_u64().unwrap_or(0) > 0 {
                panic!(
                    "{}: {case}: the client NACKed {t}: {}\n--- config ---\n{yaml}",
                    q.name, st["last_nack"]
                );
            }
        }
        let all_acked = types
            .values()
            .all(|st| st["sent_nonce"] == st["acked_nonce"]);
        stable = if all_acked { stable + 1 } else { 0 };
        (stable >= 3).then_some(())
    });
    assert!(
        ok.is_some(),
        "{}: {case}: the client never ACKed: {:#}",
        q.name,
        q.sync_of(&node).unwrap_or_default()
    );
}

fn run(name: &str, net: u8, envoy: bool, seed: u64, cases: usize, captured: bool) {
    let mut q = Quickstart::new(name, net);
    // A captured client gets Istio's captured listeners instead (virtualOutbound and
    // virtualInbound bound on 0.0.0.0:15001 and :15006 with SO_REUSEPORT, so the halves can
    // run side by side); nothing is redirected here, only acceptance is checked.
    q.client_captured = captured;
    // The client runs with a mesh identity, so mTLS chains and auto mTLS clusters (SDS
    // secrets) are generated for it and must be accepted too.
    q.enable_identities();
    q.start_weftd();
    q.start_client(envoy);
    let mut generation = next_generation(&q, 0, "the quickstart");
    wait_acked(&q, "the quickstart", "");
    let mut rng = Rng(seed);
    for case in 0..cases {
        let yaml = generate(&mut rng, net);
        let label = format!("case {case} (seed {seed})");
        q.write_file("generated.yaml", &yaml);
        generation = next_generation(&q, generation, &label);
        wait_acked(&q, &label, &yaml);
    }
    if captured {
        // The captured listeners were what the client ACKed.
        let listeners = weft_e2e::get(q.admin(10), "/listeners").expect("client admin");
        assert!(
            listeners.body.contains("virtualOutbound") && listeners.body.contains("virtualInbound"),
            "{name}: the captured client has no captured listeners: {}",
            listeners.body
        );
    }
    eprintln!("{name}: {cases} generated configs, all ACKed");
}

#[test]
fn every_generated_config_is_accepted_by_envoy_and_by_weft_proxy() {
    let cases: usize = std::env::var("WEFT_GENERATED_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("WEFT_GENERATED_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    // WEFT_GENERATED_ONLY=envoy|weft runs one half (when replaying a failure).
    let only = std::env::var("WEFT_GENERATED_ONLY").unwrap_or_default();
    let envoy = (only != "weft")
        .then(|| std::thread::spawn(move || run("generated-envoy", 54, true, seed, cases, false)));
    // The same generator for a captured client (Istio's INTERCEPTION_MODE REDIRECT), half as
    // many cases, on other nets.
    let captured = cases / 2;
    let envoy_captured = (only != "weft").then(|| {
        std::thread::spawn(move || run("generated-envoy-cap", 83, true, seed ^ 1, captured, true))
    });
    let weft_captured = (only != "envoy").then(|| {
        std::thread::spawn(move || run("generated-weft-cap", 84, false, seed ^ 1, captured, true))
    });
    if only != "envoy" {
        run("generated-weft", 55, false, seed, cases, false);
    }
    for (half, handle) in [
        ("Envoy", envoy),
        ("captured Envoy", envoy_captured),
        ("captured weft-proxy", weft_captured),
    ] {
        if let Some(h) = handle {
            h.join()
                .unwrap_or_else(|_| panic!("the {half} half failed"));
        }
    }
}
