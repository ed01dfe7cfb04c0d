//! `weft-load`: the load harness of BENCHMARKING.md. In each round it measures, back to back and
//! on the same machine, the same route served directly by nginx, through weft-proxy and through
//! Envoy (both fed by weftd over ADS, one worker each), and through nginx as a reverse proxy;
//! HTTP/1.1 keep-alive with wrk and h2c with h2load. The proxy under test and the backend share
//! CPU 0, the load generator runs on CPU 1. It prints medians over the rounds, the per-round
//! ratios weft/Envoy and proxy/direct, and each proxy's RSS idle and after load.
//!
//! Run it with `benches/run.sh` (installs wrk, h2load, nginx and Envoy, builds release binaries).

mod load;
mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;

struct Args {
    rounds: usize,
    duration_s: u64,
    h2_requests: u64,
    body_bytes: usize,
    envoy: PathBuf,
    bin_dir: PathBuf,
    /// The weft-proxy binary under test (default: next to weft-load).
    weft_proxy: Option<PathBuf>,
    /// Only load weft-proxy, then stop it cleanly: the training run of a profile-guided build.
    train: bool,
    /// Zipkin tracing on both sidecars, this percentage of requests sampled (weftd
    /// `--trace-sampling`); spans go to the backend.
    trace_sampling: Option<f64>,
    work_dir: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let exe = std::env::current_exe()?;
    let mut a = Args {
        rounds: 3,
        duration_s: 10,
        h2_requests: 200_000,
        body_bytes: 100,
        envoy: PathBuf::from(std::env::var("WEFT_ENVOY").unwrap_or_else(|_| "envoy".into())),
        bin_dir: exe.parent().context("exe dir")?.to_path_buf(),
        weft_proxy: None,
        train: false,
        trace_sampling: None,
        work_dir: std::env::temp_dir().join(format!("weft-load-{}", std::process::id())),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => a.rounds = val()?.parse()?,
            "--duration" => a.duration_s = val()?.parse()?,
            "--h2-requests" => a.h2_requests = val()?.parse()?,
            "--body-bytes" => a.body_bytes = val()?.parse()?,
            "--envoy" => a.envoy = PathBuf::from(val()?),
            "--weft-proxy" => a.weft_proxy = Some(PathBuf::from(val()?)),
            "--train" => a.train = true,
            "--trace-sampling" => a.trace_sampling = Some(val()?.parse()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(a)
}

const USAGE: &str = "usage: weft-load [--rounds N] [--duration SECS] [--h2-requests N] \
[--body-bytes N] [--envoy PATH] [--weft-proxy PATH] [--trace-sampling PCT] [--train]\n\
Direct vs weft-proxy vs Envoy vs nginx as a reverse proxy, pinned, in rounds (defaults: 3 \
rounds, 10 s, 200000 h2 requests, 100-byte bodies, envoy from WEFT_ENVOY or PATH, weft-proxy \
next to weft-load). --train loads weft-proxy alone (HTTP/1.1, then h2c) and stops it with \
SIGTERM: the training run of scripts/build-proxy-pgo.sh.";

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.work_dir)?;
    let weft_proxy = args
        .weft_proxy
        .clone()
        .unwrap_or_else(|| args.bin_dir.join("weft-proxy"));
    let envoy = (!args.train).then_some(args.envoy.as_path());
    let mut env = targets::Environment::start(
        &args.work_dir,
        &args.bin_dir,
        &weft_proxy,
        envoy,
        args.body_bytes,
        args.trace_sampling,
    )?;
    if args.train {
        let t = "weft-proxy";
        let r = load::wrk(env.http1_url(t), args.duration_s)?;
        eprintln!("training: http1 {:.0} req/s", r.rps);
        let r = load::h2load(env.h2_url(t), args.h2_requests)?;
        eprintln!("training: h2c {:.0} req/s", r.rps);
        env.stop();
        return Ok(());
    }
    let idle_rss = env.rss_by_target();
    let hz = weft_benches::clock_ticks_per_second();
    // CPU microseconds per request of the target's own processes during a run: (all, system).
    let cpu_us = |before: (u64, u64), after: (u64, u64), requests: f64| {
        let us = |ticks: u64| ticks as f64 * 1e6 / hz / requests;
        let system = after.1.saturating_sub(before.1);
        (
            us((after.0 + after.1).saturating_sub(before.0 + before.1)),
            us(system),
        )
    };

    // results[(protocol, target)] = per-round measurements
    let mut results: BTreeMap<(&'static str, &'static str), Vec<load::Result>> = BTreeMap::new();
    for round in 1..=args.rounds {
        eprintln!("round {round}/{}", args.rounds);
        for t in targets::TARGETS {
            let before = env.cpu_ticks(t);
            let mut r = load::wrk(env.http1_url(t), args.duration_s)?;
            (r.cpu_us, r.sys_us) = cpu_us(before, env.cpu_ticks(t), r.requests);
            eprintln!(
                "  http1 {:<14} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  cpu {:>6.1} us/req (sys {:.1})",
                t, r.rps, r.p50_ms, r.p99_ms, r.cpu_us, r.sys_us
            );
            results.entry(("http1", t)).or_default().push(r);
        }
        for t in targets::TARGETS {
            let before = env.cpu_ticks(t);
            let mut r = load::h2load(env.h2_url(t), args.h2_requests)?;
            (r.cpu_us, r.sys_us) = cpu_us(before, env.cpu_ticks(t), r.requests);
            eprintln!(
                "  h2c   {:<14} {:>9.0} req/s  mean {:>7.3} ms  cpu {:>6.1} us/req (sys {:.1})",
                t, r.rps, r.p50_ms, r.cpu_us, r.sys_us
            );
            results.entry(("h2c", t)).or_default().push(r);
        }
    }
    let loaded_rss = env.rss_by_target();
    env.stop();

    println!(
        "\nweft-load: {} rounds, wrk -t1 -c50 -d{}s / h2load -n {} -c 50 -m 10, {}-byte body{}; medians",
        args.rounds,
        args.duration_s,
        args.h2_requests,
        args.body_bytes,
        match args.trace_sampling {
            Some(pct) => format!(", Zipkin spans of {pct}% of requests (weft-proxy and Envoy)"),
            None => String::new(),
        }
    );
    for proto in ["http1", "h2c"] {
        println!("\n{proto}:\n");
        if proto == "http1" {
            println!(
                "| target | req/s | p50 ms | p99 ms | vs direct | CPU us/req | of it kernel | RSS idle MiB | RSS after load MiB |"
            );
            println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        } else {
            println!(
                "| target | req/s | mean latency ms | vs direct | CPU us/req | of it kernel | RSS idle MiB | RSS after load MiB |"
            );
            println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        }
        let direct = &results[&(proto, "direct")];
        for t in targets::TARGETS {
            let rs = &results[&(proto, t)];
            let vs_direct = median(rs.iter().zip(direct).map(|(r, d)| r.rps / d.rps).collect());
            let rss = |m: &BTreeMap<&str, f64>| {
                m.get(t)
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into())
            };
            let cpu = median(rs.iter().map(|r| r.cpu_us).collect());
            let sys = median(rs.iter().map(|r| r.sys_us).collect());
            if proto == "http1" {
                println!(
                    "| {t} | {:.0} | {:.3} | {:.3} | {:.2} | {:.1} | {:.1} | {} | {} |",
                    median(rs.iter().map(|r| r.rps).collect()),
                    median(rs.iter().map(|r| r.p50_ms).collect()),
                    median(rs.iter().map(|r| r.p99_ms).collect()),
                    vs_direct,
                    cpu,
                    sys,
                    rss(&idle_rss),
                    rss(&loaded_rss)
                );
            } else {
                println!(
                    "| {t} | {:.0} | {:.3} | {:.2} | {:.1} | {:.1} | {} | {} |",
                    median(rs.iter().map(|r| r.rps).collect()),
                    median(rs.iter().map(|r| r.p50_ms).collect()),
                    vs_direct,
                    cpu,
                    sys,
                    rss(&idle_rss),
                    rss(&loaded_rss)
                );
            }
        }
        let weft = &results[&(proto, "weft-proxy")];
        let envoy = &results[&(proto, "envoy")];
        let nginx = &results[&(proto, "nginx-proxy")];
        let per_round: Vec<f64> = weft.iter().zip(envoy).map(|(w, e)| w.rps / e.rps).collect();
        let vs_nginx: Vec<f64> = weft.iter().zip(nginx).map(|(w, n)| w.rps / n.rps).collect();
        println!(
            "\nweft/Envoy req/s per round: {:?} (median {:.2}); weft/nginx-proxy: median {:.2}",
            per_round
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>(),
            median(per_round.clone()),
            median(vs_nginx)
        );
        // The proxies share CPU 0 with the backend, whose own cost is in every request/s figure;
        // CPU per request is the proxy's cost alone.
        let cpu_ratio: Vec<f64> = weft
            .iter()
            .zip(envoy)
            .map(|(w, e)| e.cpu_us / w.cpu_us)
            .collect();
        let cpu_vs_nginx: Vec<f64> = weft
            .iter()
            .zip(nginx)
            .map(|(w, n)| n.cpu_us / w.cpu_us)
            .collect();
        println!(
            "CPU per request, Envoy/weft: median {:.2}; nginx-proxy/weft: median {:.2}",
            median(cpu_ratio),
            median(cpu_vs_nginx)
        );
        if proto == "http1" {
            let p99: Vec<f64> = weft
                .iter()
                .zip(envoy)
                .map(|(w, e)| w.p99_ms / e.p99_ms)
                .collect();
            println!("weft/Envoy p99 per round: median {:.2}", median(p99));
        }
    }
    Ok(())
}
