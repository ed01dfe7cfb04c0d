//! `weft-proxy iptables`: the netfilter rules that capture a workload's TCP for its sidecar
//! (what Istio's `istio-iptables` sets up for REDIRECT interception). In the `nat` table:
//! - OUTPUT sends TCP to the chain WEFT_OUTPUT, which lets through the proxy's own traffic (its
//!   uid or gid), loopback destinations and the excluded ports and ranges, and redirects the
//!   rest to the proxy's virtualOutbound port (15001), where `use_original_dst` hands each
//!   connection to the listener of its original destination;
//! - PREROUTING sends TCP arriving from outside to WEFT_INBOUND, which redirects the inbound
//!   ports (all, or a list) but the excluded ones to virtualInbound (15006), where the original
//!   destination port picks the filter chain.
//!
//! Run it in the workload's network namespace, as root, before the workload starts; `--clean`
//! removes the rules again. IPv4 only: ip6tables is not set up.

use std::process::Command;

/// Where and how to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// The proxy's virtualOutbound port.
    pub proxy_port: u16,
    /// The uid the proxy runs as: its own connections are not captured.
    pub proxy_uid: Option<u32>,
    /// The gid the proxy runs as, as an alternative (or in addition) to the uid.
    pub proxy_gid: Option<u32>,
    /// Destination ports never captured (e.g. 22).
    pub exclude_ports: Vec<u16>,
    /// Destination ranges never captured (CIDRs or addresses), e.g. the node's metadata server.
    pub exclude_ranges: Vec<String>,
    /// The proxy's virtualInbound port.
    pub inbound_port: u16,
    /// Inbound ports captured: None captures none, an empty list every port.
    pub inbound_ports: Option<Vec<u16>>,
    /// Inbound ports never captured (e.g. 22, or the proxy's admin and metrics ports).
    pub exclude_inbound_ports: Vec<u16>,
}

const OUTPUT_CHAIN: &str = "WEFT_OUTPUT";
const REDIRECT_CHAIN: &str = "WEFT_REDIRECT";
const INBOUND_CHAIN: &str = "WEFT_INBOUND";
const IN_REDIRECT_CHAIN: &str = "WEFT_IN_REDIRECT";

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

impl Capture {
    /// Refuses a setup that would capture the proxy's own connections (a loop) or names a
    /// range iptables cannot take.
    pub fn check(&self) -> Result<(), String> {
        if self.proxy_uid.is_none() && self.proxy_gid.is_none() {
            return Err(
                "give --proxy-uid or --proxy-gid: the proxy's own connections must not be captured"
                    .into(),
            );
        }
        if self.proxy_port == 0 || self.inbound_port == 0 {
            return Err("--proxy-port and --inbound-capture-port must be 1-65535".into());
        }
        for r in &self.exclude_ranges {
            let (ip, len) = r.split_once('/').unwrap_or((r, "32"));
            let ok = ip.parse::<std::net::Ipv4Addr>().is_ok()
                && len.parse::<u8>().is_ok_and(|l| l <= 32);
            if !ok {
                return Err(format!(
                    "--exclude-outbound-ip-ranges: {r:?} is not an IPv4 address or CIDR"
                ));
            }
        }
        Ok(())
    }

    /// The `iptables` invocations (arguments only) that set the capture up, in order.
    pub fn rules(&self) -> Vec<Vec<String>> {
        let port = self.proxy_port.to_string();
        let mut r = vec![
            args(&["-t", "nat", "-N", REDIRECT_CHAIN]),
            args(&[
                "-t",
                "nat",
                "-A",
                REDIRECT_CHAIN,
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &port,
            ]),
            args(&["-t", "nat", "-N", OUTPUT_CHAIN]),
            args(&["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]),
        ];
        let ret = |matcher: &[&str]| {
            let mut a = args(&["-t", "nat", "-A", OUTPUT_CHAIN]);
            a.extend(matcher.iter().map(|s| s.to_string()));
            a.extend(args(&["-j", "RETURN"]));
            a
        };
        if let Some(uid) = self.proxy_uid {
            r.push(ret(&["-m", "owner", "--uid-owner", &uid.to_string()]));
        }
        if let Some(gid) = self.proxy_gid {
            r.push(ret(&["-m", "owner", "--gid-owner", &gid.to_string()]));
        }
        r.push(ret(&["-d", "127.0.0.1/32"]));
        for p in &self.exclude_ports {
            r.push(ret(&["-p", "tcp", "--dport", &p.to_string()]));
        }
        for range in &self.exclude_ranges {
            r.push(ret(&["-d", range]));
        }
        r.push(args(&[
            "-t",
            "nat",
            "-A",
            OUTPUT_CHAIN,
            "-j",
            REDIRECT_CHAIN,
        ]));
        let Some(ports) = &self.inbound_ports else {
            return r;
        };
        let inbound = self.inbound_port.to_string();
        r.extend([
            args(&["-t", "nat", "-N", IN_REDIRECT_CHAIN]),
            args(&[
                "-t",
                "nat",
                "-A",
                IN_REDIRECT_CHAIN,
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &inbound,
            ]),
            args(&["-t", "nat", "-N", INBOUND_CHAIN]),
            args(&[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "-j",
                INBOUND_CHAIN,
            ]),
        ]);
        let inbound_rule = |port: Option<u16>, target: &str| {
            let mut a = args(&["-t", "nat", "-A", INBOUND_CHAIN, "-p", "tcp"]);
            if let Some(p) = port {
                a.extend(args(&["--dport", &p.to_string()]));
            }
            a.extend(args(&["-j", target]));
            a
        };
        for p in &self.exclude_inbound_ports {
            r.push(inbound_rule(Some(*p), "RETURN"));
        }
        if ports.is_empty() {
            r.push(inbound_rule(None, IN_REDIRECT_CHAIN));
        } else {
            for p in ports {
                r.push(inbound_rule(Some(*p), IN_REDIRECT_CHAIN));
            }
        }
        r
    }

    /// The invocations that undo `rules` (each may fail when nothing is there to remove).
    pub fn cleanup() -> Vec<Vec<String>> {
        vec![
            args(&["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]),
            args(&["-t", "nat", "-F", OUTPUT_CHAIN]),
            args(&["-t", "nat", "-X", OUTPUT_CHAIN]),
            args(&["-t", "nat", "-F", REDIRECT_CHAIN]),
            args(&["-t", "nat", "-X", REDIRECT_CHAIN]),
            args(&[
                "-t",
                "nat",
                "-D",
                "PREROUTING",
                "-p",
                "tcp",
                "-j",
                INBOUND_CHAIN,
            ]),
            args(&["-t", "nat", "-F", INBOUND_CHAIN]),
            args(&["-t", "nat", "-X", INBOUND_CHAIN]),
            args(&["-t", "nat", "-F", IN_REDIRECT_CHAIN]),
            args(&["-t", "nat", "-X", IN_REDIRECT_CHAIN]),
        ]
    }
}

/// Runs `iptables` with each argument list; the first failure stops and is reported with the
/// command that failed and what iptables said.
pub fn run(program: &str, invocations: &[Vec<String>], ignore_errors: bool) -> anyhow::Result<()> {
    for a in invocations {
        let out = Command::new(program)
            .args(a)
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run {program}: {e} (is iptables installed?)"))?;
        if !out.status.success() && !ignore_errors {
            anyhow::bail!(
                "{program} {} failed: {}",
                a.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture() -> Capture {
        Capture {
            proxy_port: 15001,
            proxy_uid: Some(1337),
            proxy_gid: None,
            exclude_ports: vec![22],
            exclude_ranges: vec!["169.254.169.254".into()],
            inbound_port: 15006,
            inbound_ports: Some(Vec::new()),
            exclude_inbound_ports: vec![15000],
        }
    }

    #[test]
    fn the_proxy_and_exclusions_return_before_the_redirect() {
        let lines: Vec<String> = capture().rules().iter().map(|a| a.join(" ")).collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing from {lines:#?}"))
        };
        let redirect = at("-A WEFT_OUTPUT -j WEFT_REDIRECT");
        for earlier in [
            "--uid-owner 1337 -j RETURN",
            "-d 127.0.0.1/32 -j RETURN",
            "--dport 22 -j RETURN",
            "-d 169.254.169.254 -j RETURN",
        ] {
            assert!(at(earlier) < redirect, "{earlier} after the redirect");
        }
        assert!(
            lines.contains(&"-t nat -A WEFT_REDIRECT -p tcp -j REDIRECT --to-ports 15001".into())
        );
        assert!(at("-N WEFT_OUTPUT") < at("-A OUTPUT -p tcp -j WEFT_OUTPUT"));
        // Inbound: every port but the excluded ones goes to 15006.
        assert!(
            at("-A WEFT_INBOUND -p tcp --dport 15000 -j RETURN")
                < at("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT")
        );
        assert!(
            lines
                .contains(&"-t nat -A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006".into())
        );
        assert!(at("-A PREROUTING -p tcp -j WEFT_INBOUND") > at("-N WEFT_INBOUND"));
    }

    #[test]
    fn inbound_capture_takes_the_ports_it_is_given_or_none() {
        let mut c = capture();
        c.inbound_ports = Some(vec![8080, 9090]);
        let lines: Vec<String> = c.rules().iter().map(|a| a.join(" ")).collect();
        for p in [8080, 9090] {
            let rule = format!("-t nat -A WEFT_INBOUND -p tcp --dport {p} -j WEFT_IN_REDIRECT");
            assert!(lines.contains(&rule), "{lines:#?}");
        }
        assert!(
            !lines
                .iter()
                .any(|l| l.ends_with("-A WEFT_INBOUND -p tcp -j WEFT_IN_REDIRECT"))
        );
        c.inbound_ports = None;
        assert!(!c.rules().iter().any(|a| a.join(" ").contains("WEFT_IN")));
    }

    #[test]
    fn a_setup_that_would_capture_the_proxy_is_refused() {
        let mut c = capture();
        c.proxy_uid = None;
        assert!(c.check().unwrap_err().contains("--proxy-uid"));
        let mut c = capture();
        c.exclude_ranges = vec!["10.0.0.0/40".into()];
        assert!(c.check().unwrap_err().contains("10.0.0.0/40"));
        assert!(capture().check().is_ok());
    }
}
