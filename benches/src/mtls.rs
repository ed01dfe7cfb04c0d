//! `weft-mtlsload`: what mutual TLS costs, weft against Envoy, in one run. For each proxy kind
//! a mesh of two sidecars (client and server, both weft-proxy or both Envoy with a weft agent
//! for its certificate), weftd with its CA, and an echo backend:
//! - keep-alive HTTP/1.1 through both sidecars (wrk, -c50): plaintext (PeerAuthentication
//!   DISABLE) and mTLS (STRICT); requests/s and the p99 that mTLS adds;
//! - new connections per second straight to the server sidecar's inbound port, each a full
//!   handshake with a client certificate and one request (plaintext: a TCP connect);
//! - the CA's signing rate (CreateCertificate calls per second, 4 at a time).
//!
//! Everything under test runs on CPU 0 (run the harness with `taskset -c 0`), load generators
//! on CPU 1. Run it with `benches/run-mtls.sh`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use weft_e2e::mesh::INBOUND_PORT;
use weft_e2e::{Quickstart, wait_until};

#[allow(dead_code)]
#[path = "load.rs"]
mod load;

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The handshake client: `handshake-client ADDR CERT_DIR|- SECS CONCURRENCY`, printing the
/// number of completed connections (each: connect, [mTLS handshake], one request).
fn handshake_client(args: &[String]) -> anyhow::Result<()> {
    let [addr, cert_dir, secs, conc] = args else {
        anyhow::bail!("handshake-client ADDR CERT_DIR|- SECS CONCURRENCY");
    };
    let addr: std::net::SocketAddr = addr.parse()?;
    let secs: u64 = secs.parse()?;
    let conc: usize = conc.parse()?;
    let config = if cert_dir == "-" {
        None
    } else {
        Some(Arc::new(client_config(Path::new(cert_dir))?))
    };
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            let (done, failed, stop, config) =
                (done.clone(), failed.clone(), stop.clone(), config.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match one_connection(addr, config.clone()) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!(
        "{} {}",
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

fn one_connection(
    addr: std::net::SocketAddr,
    config: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<()> {
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    let req = b"GET / HTTP/1.1\r\nhost: hello\r\nconnection: close\r\n\r\n";
    let mut buf = Vec::with_capacity(512);
    match config {
        None => {
            tcp.write_all(req)?;
            tcp.read_to_end(&mut buf)?;
        }
        Some(config) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(config, name)?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            tls.write_all(req)?;
            // A peer that closes without close_notify still delivered the answer.
            let _ = tls.read_to_end(&mut buf);
        }
    }
    anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "bad answer");
    Ok(())
}

/// Checks the server's handshake signatures but not its name (mesh certificates carry a
/// SPIFFE URI, not the IP we dial).
#[derive(Debug)]
struct AnyServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn client_config(dir: &Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> =
        rustls::pki_types::CertificateDer::pem_file_iter(dir.join("cert-chain.pem"))?
            .collect::<Result<_, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("key.pem"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(
            provider.signature_verification_algorithms,
        )))
        .with_client_auth_cert(chain, key)?;
    // Full handshakes only: no resumption.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

struct KindResult {
    plain_rps: f64,
    plain_p99: f64,
    mtls_rps: f64,
    mtls_p99: f64,
    plain_cps: f64,
    mtls_hps: f64,
}

fn set_mode(q: &Quickstart, mode: &str) {
    q.set_peer_authentication(mode);
    // Let every proxy take the change (config polling, debounce, push).
    std::thread::sleep(Duration::from_secs(2));
}

fn handshakes(inbound: &str, cert: Option<&Path>, secs: u64) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let cert = cert.map(|p| p.display().to_string()).unwrap_or("-".into());
    let out = Command::new("taskset")
        .args(["-c", "1"])
        .arg(exe)
        .args(["handshake-client", inbound, &cert, &secs.to_string(), "8"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let done: f64 = it.next().context("handshake client output")?.parse()?;
    let failed: u64 = it.next().context("handshake client output")?.parse()?;
    anyhow::ensure!(
        failed * 100 <= done as u64,
        "{failed} of {done} connections to {inbound} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(done / secs as f64)
}

fn measure(kind: &str, net: u8, secs: u64) -> anyhow::Result<KindResult> {
    let envoy = kind == "envoy";
    let mut q = Quickstart::new(&format!("mtlsbench-{kind}"), net);
    q.enable_identities();
    q.set_split(100, 0);
    set_mode(&q, "DISABLE");
    q.start_weftd();
    q.start_hello_with([envoy, envoy]);
    q.start_client(envoy);
    let inbound = format!("{}:{INBOUND_PORT}", q.ip(11));
    let egress = (format!("http://{}/", q.egress()), Some("hello"));
    wait_until(Duration::from_secs(10), || {
        weft_e2e::Client::new(q.egress())
            .get("hello", "/")
            .ok()
            .filter(|r| r.status == 200)
    })
    .context("the mesh serves plaintext")?;
    let plain = load::wrk(egress.clone(), secs)?;
    let plain_cps = handshakes(&inbound, None, secs)?;
    set_mode(&q, "STRICT");
    let cert = q.mesh_certificate("default", "client");
    wait_until(Duration::from_secs(10), || {
        weft_e2e::Client::new(q.egress())
            .get("hello", "/")
            .ok()
            .filter(|r| r.status == 200)
    })
    .context("the mesh serves mTLS")?;
    let mtls = load::wrk(egress, secs)?;
    let mtls_hps = handshakes(&inbound, Some(&cert), secs)?;
    Ok(KindResult {
        plain_rps: plain.rps,
        plain_p99: plain.p99_ms,
        mtls_rps: mtls.rps,
        mtls_p99: mtls.p99_ms,
        plain_cps,
        mtls_hps,
    })
}

/// CreateCertificate calls per second against a weftd, 4 in flight.
fn signing_rate(secs: u64) -> anyhow::Result<f64> {
    let mut q = Quickstart::new("mtlsbench-ca", 98);
    q.start_weftd();
    let token = q.token_file("client");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let token = std::fs::read_to_string(token)?.trim().to_string();
    let (_, csr) =
        weft_proxy::identity::key_and_csr("spiffe://cluster.local/ns/default/sa/client")?;
    let address = format!("http://{}", q.xds());
    let count = rt.block_on(async {
        // One HTTP/2 connection, as a sidecar keeps to weftd: this measures the CA, not TCP.
        let channel = tonic::transport::Endpoint::from_shared(address)?
            .connect()
            .await?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (channel, csr, token) = (channel.clone(), csr.clone(), token.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let mut req =
                            tonic::Request::new(weft_xds_proto::ca::IstioCertificateRequest {
                                csr: csr.clone(),
                                ..Default::default()
                            });
                        if let Ok(v) = format!("Bearer {token}").parse() {
                            req.metadata_mut().insert("authorization", v);
                        }
                        if weft_xds_proto::ca::create_certificate(channel.clone(), req)
                            .await
                            .is_ok()
                        {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap_or(0);
        }
        anyhow::Ok(total)
    })?;
    drop(q);
    Ok(count as f64 / secs as f64)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("handshake-client") {
        return handshake_client(&args[1..]);
    }
    let mut rounds = 3;
    let mut secs = 10;
    let mut ca_only = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => rounds = val()?.parse()?,
            "--duration" => secs = val()?.parse()?,
            "--ca-only" => ca_only = true,
            other => {
                anyhow::bail!("unknown flag {other}; flags: --rounds N --duration SECS --ca-only")
            }
        }
    }
    let mut results: Vec<(&str, KindResult)> = Vec::new();
    if ca_only {
        rounds = 0;
    }
    for round in 0..rounds {
        for (kind, net) in [("weft", 96u8), ("envoy", 97u8)] {
            let r =
                measure(kind, net, secs).with_context(|| format!("round {} {kind}", round + 1))?;
            println!(
                "round {} {kind:5}: keep-alive plaintext {:8.0} req/s p99 {:.2} ms | mTLS {:8.0} req/s p99 {:.2} ms | new connections/s plaintext {:6.0} mTLS {:6.0}",
                round + 1,
                r.plain_rps,
                r.plain_p99,
                r.mtls_rps,
                r.mtls_p99,
                r.plain_cps,
                r.mtls_hps
            );
            results.push((kind, r));
        }
    }
    let med = |kind: &str, f: fn(&KindResult) -> f64| {
        median(
            results
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    println!(
        "\nmedians over {rounds} rounds (two sidecars, one worker each, CPU 0; load on CPU 1)"
    );
    println!("| | weft | Envoy | weft/Envoy |");
    println!("| --- | --- | --- | --- |");
    type Metric = (&'static str, fn(&KindResult) -> f64);
    let metrics: [Metric; 6] = [
        ("keep-alive req/s, plaintext", |r| r.plain_rps),
        ("keep-alive req/s, mTLS", |r| r.mtls_rps),
        ("p99 ms, plaintext", |r| r.plain_p99),
        ("p99 ms, mTLS", |r| r.mtls_p99),
        ("new connections/s, plaintext", |r| r.plain_cps),
        ("new mTLS handshakes/s", |r| r.mtls_hps),
    ];
    for (name, f) in metrics {
        if results.is_empty() {
            break;
        }
        let (w, e) = (med("weft", f), med("envoy", f));
        println!("| {name} | {w:.2} | {e:.2} | {:.2} |", w / e);
    }
    if !results.is_empty() {
        let added = |k: &str| med(k, |r| r.mtls_p99) - med(k, |r| r.plain_p99);
        println!(
            "| p99 added by mTLS (difference of the medians), ms | {:.2} | {:.2} | |",
            added("weft"),
            added("envoy")
        );
    }
    let signs = signing_rate(secs)?;
    println!("\nCA: {signs:.0} CreateCertificate calls/s (4 in flight, P-256, one weftd)");
    Ok(())
}
