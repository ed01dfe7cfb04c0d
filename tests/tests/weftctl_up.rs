//! `weftctl up` on the repository's own quickstart (the README's first command): it starts
//! weftd, a sidecar per workload and each workload's app, routes the split, and stops every
//! process on SIGTERM.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use weft_e2e::{Client, Proc, bin, wait_until};

#[test]
fn up_runs_the_quickstart_and_stops_everything() {
    let root = std::env::temp_dir().join(format!("weft-e2e-up-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("quickstart");
    std::fs::create_dir_all(&dir).unwrap();
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
    for f in ["mesh.yaml", "virtual-service.yaml"] {
        std::fs::copy(example.join(f), dir.join(f)).unwrap();
    }
    let logs = root.join("logs");
    let mut up = Proc::start(
        "weftctl-up",
        &bin("weftctl"),
        &[
            "up",
            &dir.display().to_string(),
            "--log-dir",
            &logs.display().to_string(),
        ],
        &root,
    );

    let egress: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let mut c = Client::new(egress);
    // Workloads start one after another; apps bind their ports a moment after their sidecars.
    let started = wait_until(Duration::from_secs(30), || {
        up.logs().contains("Ctrl-C stops everything").then_some(())
    });
    assert!(
        started.is_some(),
        "weftctl up starts every workload:\n{}",
        up.logs()
    );
    let warm = wait_until(Duration::from_secs(10), || {
        (0..20)
            .all(|_| c.get("hello", "/").is_ok_and(|r| r.status == 200))
            .then_some(())
    });
    assert!(
        warm.is_some(),
        "the quickstart serves through the client sidecar"
    );
    let mut names = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let r = c.get("hello", "/").unwrap();
        assert_eq!(r.status, 200);
        *names
            .entry(r.header("x-echo-name").unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    assert!(
        names.get("hello-v1").copied().unwrap_or(0) > names.get("hello-v2").copied().unwrap_or(0),
        "80/20: {names:?}"
    );
    assert!(names.contains_key("hello-v2"), "{names:?}");
    // Every sidecar got a certificate for its service account (a join token from `up`), and
    // the sidecars talk mTLS (the quickstart's workloads carry the tlsMode label).
    let certs = weft_e2e::get_json("127.0.0.11:15000".parse().unwrap(), "/certs")
        .expect("hello-v1's sidecar admin");
    assert_eq!(
        certs["identity"],
        "spiffe://cluster.local/ns/default/sa/hello"
    );
    let stats = weft_e2e::get("127.0.0.10:15000".parse().unwrap(), "/config_dump")
        .expect("client sidecar admin")
        .body;
    assert!(
        stats.contains("tlsMode-istio"),
        "auto mTLS on the client's clusters"
    );
    let out = up.logs();
    for line in [
        "weftd",
        "workload client.default",
        "workload hello-v1.default",
        "listener 127.0.0.1_8080::127.0.0.1:8080",
        "sidecar admin http://127.0.0.11:15000",
    ] {
        assert!(out.contains(line), "`weftctl up` prints {line:?}:\n{out}");
    }

    Command::new("kill")
        .args(["-TERM", &up.pid().to_string()])
        .status()
        .unwrap();
    let stopped = wait_until(Duration::from_secs(15), || (!up.is_running()).then_some(()));
    assert!(stopped.is_some(), "weftctl up exits on SIGTERM");
    for addr in [
        "127.0.0.1:8080",
        "127.0.0.1:8081",
        "127.0.0.1:8082",
        "127.0.0.11:15000",
        "127.0.0.1:15010",
    ] {
        let addr: SocketAddr = addr.parse().unwrap();
        assert!(
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
            "{addr} still listening after stop"
        );
    }
}
