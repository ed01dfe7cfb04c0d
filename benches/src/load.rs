//! Running the load generators (pinned to CPU 1) and reading their reports.

use std::process::Command;

use anyhow::{Context, bail};

#[derive(Debug, Clone, Copy)]
pub struct Result {
    pub rps: f64,
    /// For h2load, which reports no percentiles: the mean request time.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Requests completed.
    pub requests: f64,
    /// CPU time of the target's own processes per request, in microseconds (filled in by the
    /// caller, which knows the processes).
    pub cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel (system time).
    pub sys_us: f64,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("taskset")
        .args(["-c", "1", program])
        .args(args)
        .output()
        .with_context(|| {
            format!("running {program} (is it installed? benches/run.sh installs it)")
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{program} failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

/// A duration as wrk or h2load prints it (`229.00us`, `1.20ms`, `2.00s`), in milliseconds.
pub fn parse_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

pub fn wrk((url, authority): (String, Option<&str>), duration_s: u64) -> anyhow::Result<Result> {
    let d = format!("{duration_s}s");
    let host = authority.map(|a| format!("Host: {a}"));
    let mut args = vec!["-t1", "-c50", "-d", &d, "--latency"];
    if let Some(h) = &host {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = run("wrk", &args)?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors against {url}:\n{out}");
    }
    let pct = |p: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(parse_ms)
    };
    let rps = out
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{out}"))?;
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no request count in wrk output:\n{out}"))?;
    Ok(Result {
        rps,
        p50_ms: pct("50%").unwrap_or(f64::NAN),
        p99_ms: pct("99%").unwrap_or(f64::NAN),
        requests,
        cpu_us: f64::NAN,
        sys_us: f64::NAN,
    })
}

pub fn h2load((url, authority): (String, Option<&str>), requests: u64) -> anyhow::Result<Result> {
    let n = requests.to_string();
    let host = authority.map(|a| format!(":authority: {a}"));
    let mut args = vec!["-n", &n, "-c", "50", "-m", "10"];
    if let Some(h) = &host {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let out = run("h2load", &args)?;
    let done_ok = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .is_some_and(|l| l.contains(&format!("{n} succeeded")));
    if !done_ok {
        bail!("h2load saw failures against {url}:\n{out}");
    }
    let rps = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no req/s in h2load output:\n{out}"))?;
    let mean = out
        .lines()
        .find(|l| l.trim_start().starts_with("time for request:"))
        .and_then(|l| l.split_whitespace().nth(5))
        .and_then(parse_ms)
        .unwrap_or(f64::NAN);
    Ok(Result {
        rps,
        p50_ms: mean,
        p99_ms: f64::NAN,
        requests: requests as f64,
        cpu_us: f64::NAN,
        sys_us: f64::NAN,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_ms;

    #[test]
    fn durations() {
        assert_eq!(parse_ms("229.00us"), Some(0.229));
        assert_eq!(parse_ms("1.50ms"), Some(1.5));
        assert_eq!(parse_ms("2.00s"), Some(2000.0));
        assert_eq!(parse_ms("x"), None);
    }
}
