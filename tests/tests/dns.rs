//! weftd's DNS server driven by the real `dig`: every record kind, a truncated UDP answer
//! retried over TCP, `forward` to an upstream resolver on loopback (a second weftd), config
//! changes visible within a second, and the health/ready/metrics endpoints.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use weft_e2e::{Proc, bin, free_port, wait_until};

fn dig(port: u16, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig is installed by scripts/test.sh (bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(port: u16, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = dig(port, &[args, &["+short"]].concat())
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn weftd(name: &str, dir: &Path, config: &Path, corefile: &str, log_dir: &Path) -> Proc {
    let cf = dir.join(format!("{name}.Corefile"));
    std::fs::write(&cf, corefile).unwrap();
    let (xds, debug) = (
        format!("127.0.0.1:{}", free_port("127.0.0.1")),
        format!("127.0.0.1:{}", free_port("127.0.0.1")),
    );
    Proc::start(
        name,
        &bin("weftd"),
        &[
            "--config-dir",
            &config.display().to_string(),
            "--xds-address",
            &xds,
            "--debug-address",
            &debug,
            "--corefile",
            &cf.display().to_string(),
            "--poll-ms",
            "50",
            "--no-ca",
        ],
        log_dir,
    )
}

fn dns_port() -> u16 {
    free_port("0.0.0.0")
}

const MESH: &str = r#"apiVersion: v1
kind: Service
metadata: { name: web, namespace: default }
spec: { clusterIP: 10.96.0.10, ports: [{ name: http, port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: web6, namespace: default }
spec: { clusterIP: "fd00::10", ports: [{ name: http, port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: outside, namespace: default }
spec: { type: ExternalName, externalName: web.default.svc.upstream.test }
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: prod }
spec: { clusterIP: None, ports: [{ name: mysql, port: 3306 }] }
---
apiVersion: v1
kind: Endpoints
metadata: { name: db, namespace: prod }
subsets: [{ addresses: [{ ip: 10.1.0.5, hostname: db-0 }, { ip: 10.1.0.6 }], ports: [{ name: mysql, port: 3306 }] }]
"#;

#[test]
fn dig_sees_every_record_kind_truncation_forwarding_and_changes() {
    let root = std::env::temp_dir().join(format!("weft-e2e-dns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (config, upconfig, logs) = (
        root.join("config"),
        root.join("upstream"),
        root.join("logs"),
    );
    for d in [&config, &upconfig, &logs] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut mesh = MESH.to_string();
    mesh.push_str("---\napiVersion: v1\nkind: Service\nmetadata: { name: big, namespace: prod }\nspec: { clusterIP: None, ports: [{ name: http, port: 80 }] }\n---\napiVersion: v1\nkind: Endpoints\nmetadata: { name: big, namespace: prod }\nsubsets:\n- addresses:\n");
    for i in 1..=80 {
        mesh.push_str(&format!("  - {{ ip: 10.2.0.{i} }}\n"));
    }
    std::fs::write(config.join("mesh.yaml"), mesh).unwrap();
    std::fs::write(
        upconfig.join("mesh.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: { name: web, namespace: default }\nspec: { clusterIP: 10.200.0.1, ports: [{ name: http, port: 80 }] }\n",
    )
    .unwrap();

    let (up_port, port, health, ready, metrics) = (
        dns_port(),
        dns_port(),
        free_port("127.0.0.1"),
        free_port("127.0.0.1"),
        free_port("127.0.0.1"),
    );
    let _upstream = weftd(
        "upstream",
        &root,
        &upconfig,
        &format!(".:{up_port} {{\n  kubernetes upstream.test\n}}\n"),
        &logs,
    );
    let corefile = format!(
        ".:{port} {{\n  errors\n  health 127.0.0.1:{health}\n  ready 127.0.0.1:{ready}\n  prometheus 127.0.0.1:{metrics}\n  kubernetes cluster.local in-addr.arpa ip6.arpa {{\n    pods insecure\n    fallthrough in-addr.arpa ip6.arpa\n  }}\n  forward . 127.0.0.1:{up_port}\n  cache 30\n  loop\n  loadbalance\n}}\n"
    );
    let main = weftd("weftd", &root, &config, &corefile, &logs);
    let ready_addr = format!("127.0.0.1:{ready}").parse().unwrap();
    wait_until(Duration::from_secs(10), || {
        weft_e2e::get(ready_addr, "/ready")
            .ok()
            .filter(|r| r.status == 200)
    })
    .expect("DNS ready");

    assert_eq!(
        short(port, &["web.default.svc.cluster.local", "A"]),
        ["10.96.0.10"]
    );
    assert_eq!(
        short(port, &["web6.default.svc.cluster.local", "AAAA"]),
        ["fd00::10"]
    );
    assert_eq!(
        short(port, &["_http._tcp.web.default.svc.cluster.local", "SRV"]),
        ["0 100 80 web.default.svc.cluster.local."]
    );
    assert_eq!(
        short(port, &["-x", "10.96.0.10"]),
        ["web.default.svc.cluster.local."]
    );
    assert_eq!(
        short(port, &["db.prod.svc.cluster.local", "A"]),
        ["10.1.0.5", "10.1.0.6"]
    );
    assert_eq!(
        short(port, &["db-0.db.prod.svc.cluster.local", "A"]),
        ["10.1.0.5"]
    );
    assert_eq!(
        short(port, &["_mysql._tcp.db.prod.svc.cluster.local", "SRV"]),
        [
            "0 50 3306 10-1-0-6.db.prod.svc.cluster.local.",
            "0 50 3306 db-0.db.prod.svc.cluster.local."
        ]
    );
    assert_eq!(
        short(port, &["dns-version.cluster.local", "TXT"]),
        ["\"1.1.0\""]
    );
    assert_eq!(
        short(port, &["10-9-8-7.default.pod.cluster.local", "A"]),
        ["10.9.8.7"],
        "pods insecure"
    );
    // ExternalName: the CNAME, then its target resolved through forward.
    assert_eq!(
        short(port, &["outside.default.svc.cluster.local", "A"]),
        ["10.200.0.1", "web.default.svc.upstream.test."]
    );
    // forward to the upstream on loopback.
    assert_eq!(
        short(port, &["web.default.svc.upstream.test", "A"]),
        ["10.200.0.1"]
    );
    // Negative answers: status and the SOA.
    let nx = dig(port, &["nope.default.svc.cluster.local", "A"]);
    assert!(
        nx.contains("status: NXDOMAIN")
            && nx.contains("IN\tSOA\tns.dns.cluster.local. hostmaster.cluster.local."),
        "{nx}"
    );
    let nodata = dig(port, &["web.default.svc.cluster.local", "AAAA"]);
    assert!(
        nodata.contains("status: NOERROR")
            && nodata.contains("ANSWER: 0")
            && nodata.contains("SOA"),
        "{nodata}"
    );
    assert!(
        dig(port, &["cluster.local", "AXFR"]).contains("Transfer failed"),
        "AXFR is refused"
    );

    // 80 endpoints do not fit in 512 bytes: dig gets TC over UDP and retries over TCP.
    let big = dig(port, &["+noedns", "big.prod.svc.cluster.local", "A"]);
    assert!(big.contains("Truncated, retrying in TCP mode"), "{big}");
    assert!(big.contains("ANSWER: 80"), "{big}");

    // A new Service in the folder answers within a second.
    let started = Instant::now();
    std::fs::write(config.join("new.yaml"), "apiVersion: v1\nkind: Service\nmetadata: { name: fresh, namespace: default }\nspec: { clusterIP: 10.96.7.7, ports: [{ name: http, port: 80 }] }\n").unwrap();
    let seen = wait_until(Duration::from_secs(3), || {
        (short(port, &["fresh.default.svc.cluster.local", "A"]) == ["10.96.7.7"])
            .then(|| started.elapsed())
    });
    let took = seen.expect("the new Service answers");
    assert!(
        took < Duration::from_secs(1),
        "new Service visible after {took:?}"
    );

    let health_addr = format!("127.0.0.1:{health}").parse().unwrap();
    assert_eq!(weft_e2e::get(health_addr, "/health").unwrap().body, "OK");
    let m = weft_e2e::get(format!("127.0.0.1:{metrics}").parse().unwrap(), "/metrics")
        .unwrap()
        .body;
    for name in [
        "coredns_dns_requests_total{",
        "coredns_dns_responses_total{",
        "coredns_dns_request_duration_seconds_bucket{",
        "coredns_cache_hits_total{",
        "coredns_cache_misses_total{",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert!(m.contains("rcode=\"NXDOMAIN\""), "{m}");
    drop(main);
}

#[test]
fn a_bad_corefile_is_a_startup_error_naming_the_line() {
    let root = std::env::temp_dir().join(format!("weft-e2e-dns-bad-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let cf = root.join("Corefile");
    std::fs::write(
        &cf,
        ".:15353 {\n  kubernetes cluster.local\n  frobnicate yes\n}\n",
    )
    .unwrap();
    let out = Command::new(bin("weftd"))
        .args([
            "--config-dir",
            &root.display().to_string(),
            "--corefile",
            &cf.display().to_string(),
            "--xds-address",
            "127.0.0.1:0",
            "--debug-address",
            "127.0.0.1:0",
            "--no-ca",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Corefile:3: unknown directive \"frobnicate\""),
        "{err}"
    );
}

#[test]
fn reload_picks_up_a_changed_corefile_and_lameduck_delays_shutdown() {
    let root = std::env::temp_dir().join(format!("weft-e2e-dns-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (config, logs) = (root.join("config"), root.join("logs"));
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("mesh.yaml"), MESH).unwrap();
    let (port, health) = (dns_port(), free_port("127.0.0.1"));
    let corefile = |ttl: u32| {
        format!(
            ".:{port} {{\n  health 127.0.0.1:{health} {{\n    lameduck 1s\n  }}\n  kubernetes cluster.local {{\n    ttl {ttl}\n  }}\n  reload 2s 0s\n}}\n"
        )
    };
    let mut weftd = weftd("weftd", &root, &config, &corefile(5), &logs);
    let ttl = || {
        let out = dig(
            port,
            &["+noall", "+answer", "web.default.svc.cluster.local", "A"],
        );
        out.split_whitespace()
            .nth(1)
            .and_then(|t| t.parse::<u32>().ok())
    };
    wait_until(Duration::from_secs(10), || (ttl() == Some(5)).then_some(()))
        .expect("serving with ttl 5");
    std::fs::write(root.join("weftd.Corefile"), corefile(7)).unwrap();
    wait_until(Duration::from_secs(10), || (ttl() == Some(7)).then_some(()))
        .expect("the reloaded Corefile's ttl 7");

    // SIGTERM: /health turns 503 while weftd keeps answering for the lameduck second, then exits.
    let health_addr = format!("127.0.0.1:{health}").parse().unwrap();
    assert_eq!(weft_e2e::get(health_addr, "/health").unwrap().status, 200);
    Command::new("kill")
        .args(["-TERM", &weftd.pid().to_string()])
        .status()
        .unwrap();
    let lameduck = wait_until(Duration::from_secs(2), || {
        weft_e2e::get(health_addr, "/health")
            .ok()
            .filter(|r| r.status == 503)
    });
    assert!(lameduck.is_some(), "health reports 503 during lameduck");
    assert_eq!(ttl(), Some(7), "still answering during lameduck");
    let exited = wait_until(Duration::from_secs(5), || {
        (!weftd.is_running()).then_some(())
    });
    assert!(exited.is_some(), "weftd exits after lameduck");
}

#[test]
fn a_forwarding_loop_is_detected_and_stops_the_server() {
    let root = std::env::temp_dir().join(format!("weft-e2e-dns-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (config, logs) = (root.join("config"), root.join("logs"));
    std::fs::create_dir_all(&config).unwrap();
    let port = dns_port();
    let mut weftd = weftd(
        "weftd",
        &root,
        &config,
        &format!(".:{port} {{\n  forward . 127.0.0.1:{port}\n  loop\n}}\n"),
        &logs,
    );
    let exited = wait_until(Duration::from_secs(15), || {
        (!weftd.is_running()).then_some(())
    });
    assert!(
        exited.is_some(),
        "weftd stops when its forward plugin loops back to itself"
    );
    let log = weftd.logs();
    assert!(log.contains("Loop") && log.contains("detected"), "{log}");
}
