//! `weft-dnsload`: weftd's DNS server against Knot DNS serving the same names as a static zone,
//! 10,000 services, one server thread each, pinned to CPU 0 with dnsperf on CPU 1, in rounds.
//! Prints queries/s (saturating load), latency percentiles (at a fixed rate below both
//! servers' limits, from dnsperf's per-query log) and RSS.
//!
//! Run it with `benches/run-dns.sh` (installs dnsperf and knot, builds weftd in release).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const SERVICES: usize = 10_000;
const WEFT_PORT: u16 = 15353;
const KNOT_PORT: u16 = 15354;

fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
}

fn name(i: usize) -> String {
    format!("svc-{i}.ns-{}.svc.cluster.local", i % 10)
}

fn write_inputs(dir: &Path) -> anyhow::Result<()> {
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    let mut yaml = String::new();
    let mut zone = String::from(
        "$ORIGIN cluster.local.\n$TTL 5\n@ SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n@ NS ns.dns\nns.dns A 127.0.0.1\n",
    );
    let mut queries = String::new();
    for i in 0..SERVICES {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: svc-{i}, namespace: ns-{} }}\nspec: {{ clusterIP: {}, ports: [{{ name: http, port: 80 }}] }}\n",
            i % 10,
            ip(i)
        ));
        zone.push_str(&format!("svc-{i}.ns-{}.svc A {}\n", i % 10, ip(i)));
        queries.push_str(&format!("{} A\n", name(i)));
    }
    std::fs::write(config.join("services.yaml"), yaml)?;
    std::fs::write(dir.join("cluster.local.zone"), zone)?;
    std::fs::write(dir.join("queries.txt"), queries)?;
    std::fs::write(
        dir.join("Corefile"),
        format!("cluster.local:{WEFT_PORT} {{\n  kubernetes cluster.local\n}}\n"),
    )?;
    let d = dir.display();
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n  listen: 127.0.0.1@{KNOT_PORT}\n  rundir: {d}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n  user: root:root\ndatabase:\n  storage: {d}/knot-db\ntemplate:\n  - id: default\n    storage: {d}\n    semantic-checks: off\nzone:\n  - domain: cluster.local\n    file: cluster.local.zone\nlog:\n  - target: stderr\n    any: warning\n"
        ),
    )?;
    Ok(())
}

fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    cmd.stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {name}"))
}

fn wait_answering(port: u16, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+short",
                "+time=1",
                "+tries=1",
                &name(SERVICES - 1),
            ])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == ip(SERVICES - 1) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "server on port {port} did not answer; logs in {}",
        dir.display()
    )
}

fn rss_mib(pid: u32) -> f64 {
    weft_benches::rss_kib(pid) as f64 / 1024.0
}

fn dnsperf(dir: &Path, port: u16, extra: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
        ])
        .arg(dir.join("queries.txt"))
        .args(extra)
        .output()
        .context("running dnsperf (benches/run-dns.sh installs it)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(out: &str, key: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Latency percentiles (ms) from dnsperf -v lines (`... <latency seconds>` last column).
fn percentiles(out: &str) -> (f64, f64, usize) {
    let mut lat: Vec<f64> = out
        .lines()
        .filter(|l| l.contains(" NOERROR ") || l.contains(" NXDOMAIN "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
            * 1000.0
    };
    (p(0.5), p(0.99), lat.len())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn main() -> anyhow::Result<()> {
    let mut rounds = 3;
    let mut seconds = 10;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            "--duration" => seconds = it.next().context("--duration SECS")?.parse()?,
            other => bail!("unknown flag {other}; flags: --rounds N --duration SECS"),
        }
    }
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("weft-dnsload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    write_inputs(&dir)?;

    let mut weftd = spawn(
        &dir,
        "weftd",
        Command::new("taskset")
            .args(["-c", "0"])
            .arg(bin_dir.join("weftd"))
            .env("TOKIO_WORKER_THREADS", "1")
            .arg("--config-dir")
            .arg(dir.join("config"))
            .arg("--no-ca")
            .arg("--corefile")
            .arg(dir.join("Corefile"))
            .args([
                "--xds-address",
                "127.0.0.1:25110",
                "--debug-address",
                "127.0.0.1:25114",
            ]),
    )?;
    let mut knot = spawn(
        &dir,
        "knotd",
        Command::new("taskset")
            .args(["-c", "0", "knotd", "-c"])
            .arg(dir.join("knot.conf")),
    )?;
    let result = (|| -> anyhow::Result<()> {
        wait_answering(WEFT_PORT, &dir)?;
        wait_answering(KNOT_PORT, &dir)?;
        let idle = (rss_mib(weftd.id()), rss_mib(knot.id()));
        let d = seconds.to_string();
        let (mut w_qps, mut k_qps, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            let w = field(
                &dnsperf(&dir, WEFT_PORT, &["-l", &d])?,
                "Queries per second:",
            );
            let k = field(
                &dnsperf(&dir, KNOT_PORT, &["-l", &d])?,
                "Queries per second:",
            );
            eprintln!("round {round}/{rounds}: weftd {w:.0} q/s, knot {k:.0} q/s");
            w_qps.push(w);
            k_qps.push(k);
            ratio.push(w / k);
        }
        // Latency at a fixed load both sustain: half of weftd's median throughput.
        let rate = ((median(w_qps.clone()) / 2.0) as u64).max(1000).to_string();
        let (wp50, wp99, wn) =
            percentiles(&dnsperf(&dir, WEFT_PORT, &["-l", "5", "-Q", &rate, "-v"])?);
        let (kp50, kp99, kn) =
            percentiles(&dnsperf(&dir, KNOT_PORT, &["-l", "5", "-Q", &rate, "-v"])?);
        let loaded = (rss_mib(weftd.id()), rss_mib(knot.id()));
        println!(
            "\nweft-dnsload: {SERVICES} services, {rounds} rounds of dnsperf -l {seconds} (saturating), latency at {rate} q/s for 5 s; one server thread, CPU 0; dnsperf on CPU 1\n"
        );
        println!(
            "| server | queries/s (median) | p50 ms | p99 ms | RSS idle MiB | RSS after MiB |"
        );
        println!("| --- | --- | --- | --- | --- | --- |");
        println!(
            "| weftd | {:.0} | {wp50:.3} | {wp99:.3} | {:.1} | {:.1} |",
            median(w_qps.clone()),
            idle.0,
            loaded.0
        );
        println!(
            "| Knot DNS | {:.0} | {kp50:.3} | {kp99:.3} | {:.1} | {:.1} |",
            median(k_qps.clone()),
            idle.1,
            loaded.1
        );
        println!(
            "\nweftd/Knot per round: {:?} (median {:.2}); latency samples: weftd {wn}, knot {kn}",
            ratio.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>(),
            median(ratio.clone())
        );
        Ok(())
    })();
    let _ = weftd.kill();
    let _ = knot.kill();
    let _ = weftd.wait();
    let _ = knot.wait();
    result
}
