//! The Corefile: CoreDNS's configuration syntax, with the plugins weftd implements. Server
//! blocks (`zone[:port] ... { ... }`), one directive per line with arguments and an optional
//! `{ }` block of options, `#` comments, quoted strings and `{$ENV}` substitution. Anything
//! unknown or malformed is an error naming the line.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Corefile:{line}: {message}")]
pub struct CorefileError {
    pub line: usize,
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, CorefileError> {
    Err(CorefileError {
        line,
        message: message.into(),
    })
}

/// What Kubernetes ships as CoreDNS's Corefile; weftd uses it when given none.
pub const KUBERNETES_DEFAULT: &str = r#".:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
       max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
"#;

#[derive(Debug, Clone, PartialEq)]
pub struct Corefile {
    pub blocks: Vec<ServerBlock>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerBlock {
    /// Lowercase, fully qualified (`cluster.local.`, `.` for the root).
    pub zones: Vec<String>,
    pub port: u16,
    pub line: usize,
    pub plugins: Plugins,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plugins {
    pub errors: bool,
    pub log: bool,
    pub health: Option<Health>,
    pub ready: Option<SocketAddr>,
    pub prometheus: Option<SocketAddr>,
    pub kubernetes: Option<Kubernetes>,
    pub forward: Option<Forward>,
    pub cache: Option<Cache>,
    pub reload: Option<Reload>,
    pub loadbalance: bool,
    pub loop_detect: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub address: SocketAddr,
    pub lameduck: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodsMode {
    Disabled,
    Insecure,
    Verified,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Kubernetes {
    pub zones: Vec<String>,
    pub pods: PodsMode,
    pub ttl: u32,
    /// None: no fallthrough; Some(empty): for every zone; Some(zones): for those.
    pub fallthrough: Option<Vec<String>>,
    /// Empty: every namespace is exposed.
    pub namespaces: Vec<String>,
    pub endpoint_pod_names: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Random,
    RoundRobin,
    Sequential,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    pub from: String,
    pub to: Vec<SocketAddr>,
    pub except: Vec<String>,
    pub max_concurrent: Option<usize>,
    pub health_check: Duration,
    pub max_fails: u32,
    pub policy: Policy,
    pub force_tcp: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cache {
    /// Upper bound on a cached record's TTL.
    pub max_ttl: u32,
    pub success: CacheClass,
    pub denial: CacheClass,
    pub zones: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheClass {
    pub capacity: usize,
    pub max_ttl: u32,
    pub min_ttl: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reload {
    pub interval: Duration,
    pub jitter: Duration,
}

/// Normalises a zone: lowercase, with the trailing dot.
pub fn fqdn(zone: &str) -> String {
    let z = zone.trim().to_ascii_lowercase();
    if z.is_empty() || z == "." {
        ".".into()
    } else if z.ends_with('.') {
        z
    } else {
        format!("{z}.")
    }
}

/// Is `name` (a normalised FQDN) inside `zone`?
pub fn in_zone(name: &str, zone: &str) -> bool {
    zone == "."
        || name == zone
        || (name.ends_with(zone) && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

// ------------------------------------------------------------------ tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Open,
    Close,
    Newline,
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, CorefileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let mut chars = raw.chars().peekable();
        let mut word = String::new();
        let mut in_env = false;
        let flush = |word: &mut String, out: &mut Vec<(Tok, usize)>| -> Result<(), CorefileError> {
            if !word.is_empty() {
                out.push((Tok::Word(expand_env(word, line)?), line));
                word.clear();
            }
            Ok(())
        };
        while let Some(c) = chars.next() {
            match c {
                '#' => break,
                '"' => {
                    let mut quoted = String::new();
                    let mut closed = false;
                    while let Some(q) = chars.next() {
                        match q {
                            '\\' => {
                                if let Some(n) = chars.next() {
                                    quoted.push(n);
                                }
                            }
                            '"' => {
                                closed = true;
                                break;
                            }
                            q => quoted.push(q),
                        }
                    }
                    if !closed {
                        return err(line, "unterminated quoted string");
                    }
                    word.push_str(&quoted);
                }
                // `{$VAR}` is an environment variable, not a block.
                '{' if chars.peek() == Some(&'$') => {
                    in_env = true;
                    word.push('{');
                }
                '{' => {
                    flush(&mut word, &mut out)?;
                    out.push((Tok::Open, line));
                }
                '}' if in_env => {
                    in_env = false;
                    word.push('}');
                }
                '}' => {
                    flush(&mut word, &mut out)?;
                    out.push((Tok::Close, line));
                }
                c if c.is_whitespace() => flush(&mut word, &mut out)?,
                c => word.push(c),
            }
        }
        flush(&mut word, &mut out)?;
        out.push((Tok::Newline, line));
    }
    Ok(out)
}

fn expand_env(word: &str, line: usize) -> Result<String, CorefileError> {
    let mut out = String::new();
    let mut rest = word;
    while let Some(start) = rest.find("{$") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return err(
                line,
                format!("unterminated environment variable in {word:?}"),
            );
        };
        let var = &rest[start + 2..start + end];
        out.push_str(&std::env::var(var).unwrap_or_default());
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

// ------------------------------------------------------------------ structure

/// One directive line with its arguments and its optional block of option lines.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    line: usize,
    block: Vec<Directive>,
}

struct Cursor {
    toks: Vec<(Tok, usize)>,
    pos: usize,
}

impl Cursor {
    fn peek(&self) -> Option<&(Tok, usize)> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<(Tok, usize)> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn skip_newlines(&mut self) {
        while matches!(self.peek(), Some((Tok::Newline, _))) {
            self.pos += 1;
        }
    }
    fn last_line(&self) -> usize {
        self.toks.last().map(|t| t.1).unwrap_or(1)
    }

    /// Directives until the closing brace of the current block.
    fn directives(&mut self, opened_at: usize) -> Result<Vec<Directive>, CorefileError> {
        let mut out = Vec::new();
        loop {
            self.skip_newlines();
            match self.next() {
                None => {
                    return err(
                        self.last_line(),
                        format!("the block opened on line {opened_at} is not closed"),
                    );
                }
                Some((Tok::Close, _)) => return Ok(out),
                Some((Tok::Open, line)) => return err(line, "unexpected '{'"),
                Some((Tok::Newline, _)) => {}
                Some((Tok::Word(name), line)) => {
                    let mut args = Vec::new();
                    let mut block = Vec::new();
                    loop {
                        match self.peek().cloned() {
                            Some((Tok::Word(w), _)) => {
                                args.push(w);
                                self.pos += 1;
                            }
                            Some((Tok::Open, l)) => {
                                self.pos += 1;
                                block = self.directives(l)?;
                                break;
                            }
                            // A closing brace on the directive's own line ends the block too.
                            Some((Tok::Close, _)) | Some((Tok::Newline, _)) | None => break,
                        }
                    }
                    out.push(Directive {
                        name,
                        args,
                        line,
                        block,
                    });
                }
            }
        }
    }
}

/// Parses a Corefile.
pub fn parse(text: &str) -> Result<Corefile, CorefileError> {
    let mut c = Cursor {
        toks: tokenize(text)?,
        pos: 0,
    };
    let mut blocks = Vec::new();
    loop {
        c.skip_newlines();
        let Some((tok, line)) = c.next() else { break };
        let mut keys = Vec::new();
        let mut tok = tok;
        loop {
            match tok {
                Tok::Word(w) => {
                    keys.extend(w.split(',').filter(|k| !k.is_empty()).map(str::to_string))
                }
                Tok::Newline => {}
                Tok::Open => break,
                Tok::Close => return err(line, "unexpected '}'"),
            }
            match c.next() {
                Some((t, _)) => tok = t,
                None => return err(line, "a server block needs a '{'"),
            }
        }
        if keys.is_empty() {
            return err(
                line,
                "a server block needs at least one zone (for example `.:53`)",
            );
        }
        let directives = c.directives(line)?;
        let mut zones = Vec::new();
        let mut port = None;
        for k in &keys {
            let (z, p) = parse_key(k).map_err(|m| CorefileError { line, message: m })?;
            if port.is_some_and(|existing| existing != p) {
                return err(
                    line,
                    format!("all keys of a server block must use one port ({k})"),
                );
            }
            port = Some(p);
            zones.push(z);
        }
        let plugins = plugins(&directives, &zones)?;
        blocks.push(ServerBlock {
            zones,
            port: port.unwrap_or(53),
            line,
            plugins,
        });
    }
    if blocks.is_empty() {
        return err(1, "the Corefile has no server block");
    }
    for (i, a) in blocks.iter().enumerate() {
        for b in &blocks[i + 1..] {
            if a.port == b.port
                && let Some(z) = a.zones.iter().find(|z| b.zones.contains(z))
            {
                return err(
                    b.line,
                    format!(
                        "zone {z} on port {} is already served by the block on line {}",
                        b.port, a.line
                    ),
                );
            }
        }
    }
    Ok(Corefile { blocks })
}

fn parse_key(key: &str) -> Result<(String, u16), String> {
    let k = key.strip_prefix("dns://").unwrap_or(key);
    if let Some(scheme) = ["tls://", "https://", "grpc://", "quic://"]
        .iter()
        .find(|s| key.starts_with(**s))
    {
        return Err(format!(
            "{scheme} servers are not supported; use dns:// (plain DNS over UDP and TCP)"
        ));
    }
    let (zone, port) = match k.rsplit_once(':') {
        Some((z, p)) => (
            z,
            p.parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number in {key:?}"))?,
        ),
        None => (k, 53),
    };
    let zone = if zone.is_empty() { "." } else { zone };
    Ok((fqdn(zone), port))
}

fn listen_address(
    arg: Option<&String>,
    default_port: u16,
    line: usize,
) -> Result<SocketAddr, CorefileError> {
    let Some(a) = arg else {
        return Ok(SocketAddr::from(([0, 0, 0, 0], default_port)));
    };
    let (host, port) = a.rsplit_once(':').ok_or_else(|| CorefileError {
        line,
        message: format!("{a:?}: expected [HOST]:PORT"),
    })?;
    let port: u16 = port.parse().map_err(|_| CorefileError {
        line,
        message: format!("{a:?}: bad port"),
    })?;
    let ip: IpAddr = if host.is_empty() {
        [0, 0, 0, 0].into()
    } else {
        host.trim_matches(['[', ']'])
            .parse()
            .map_err(|_| CorefileError {
                line,
                message: format!("{a:?}: bad address"),
            })?
    };
    Ok(SocketAddr::new(ip, port))
}

fn duration(s: &str, line: usize) -> Result<Duration, CorefileError> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| CorefileError {
        line,
        message: format!("{s:?} is not a duration (e.g. 5s, 500ms)"),
    })?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" | "" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return err(line, format!("{s:?}: unknown duration unit {unit:?}")),
    };
    if secs < 0.0 || !secs.is_finite() {
        return err(line, format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn number<T: std::str::FromStr>(s: &str, what: &str, line: usize) -> Result<T, CorefileError> {
    s.parse().map_err(|_| CorefileError {
        line,
        message: format!("{s:?} is not a valid {what}"),
    })
}

fn no_args(d: &Directive) -> Result<(), CorefileError> {
    if d.args.is_empty() {
        Ok(())
    } else {
        err(d.line, format!("{} takes no arguments", d.name))
    }
}

fn no_block(d: &Directive) -> Result<(), CorefileError> {
    match d.block.first() {
        Some(o) => err(o.line, format!("{}: unknown option {:?}", d.name, o.name)),
        None => Ok(()),
    }
}

/// Upstreams of `forward`: addresses (`1.2.3.4`, `1.2.3.4:5353`, `dns://...`) or a resolv.conf.
fn upstreams(args: &[String], line: usize) -> Result<Vec<SocketAddr>, CorefileError> {
    let mut out = Vec::new();
    for a in args {
        if a.starts_with('/') {
            let text = std::fs::read_to_string(a).map_err(|e| CorefileError {
                line,
                message: format!("reading {a}: {e}"),
            })?;
            for l in text.lines() {
                let mut words = l.split_whitespace();
                if words.next() == Some("nameserver")
                    && let Some(ip) = words
                        .next()
                        .and_then(|w| w.split('%').next()?.parse::<IpAddr>().ok())
                {
                    out.push(SocketAddr::new(ip, 53));
                }
            }
            continue;
        }
        if a.starts_with("tls://") || a.starts_with("https://") {
            return err(line, format!("{a}: only plain DNS upstreams are supported"));
        }
        let a = a.strip_prefix("dns://").unwrap_or(a);
        let addr = if let Ok(sa) = a.parse::<SocketAddr>() {
            sa
        } else if let Ok(ip) = a.trim_matches(['[', ']']).parse::<IpAddr>() {
            SocketAddr::new(ip, 53)
        } else {
            return err(
                line,
                format!("{a:?} is not an upstream address (IP[:PORT] or a resolv.conf path)"),
            );
        };
        out.push(addr);
    }
    if out.is_empty() {
        return err(line, "forward needs at least one upstream");
    }
    Ok(out)
}

fn plugins(directives: &[Directive], block_zones: &[String]) -> Result<Plugins, CorefileError> {
    let mut p = Plugins::default();
    let mut seen = std::collections::BTreeSet::new();
    for d in directives {
        if !seen.insert(d.name.clone()) {
            return err(
                d.line,
                format!("{} is given twice in this server block", d.name),
            );
        }
        match d.name.as_str() {
            "errors" => {
                no_args(d)?;
                for o in &d.block {
                    if o.name != "consolidate" {
                        return err(o.line, format!("errors: unknown option {:?}", o.name));
                    }
                }
                p.errors = true;
            }
            "log" => {
                no_block(d)?;
                p.log = true;
            }
            "health" => {
                if d.args.len() > 1 {
                    return err(d.line, "health takes at most one address");
                }
                let mut h = Health {
                    address: listen_address(d.args.first(), 8080, d.line)?,
                    lameduck: Duration::ZERO,
                };
                for o in &d.block {
                    match (o.name.as_str(), o.args.as_slice()) {
                        ("lameduck", [v]) => h.lameduck = duration(v, o.line)?,
                        _ => {
                            return err(
                                o.line,
                                format!("health: unknown or malformed option {:?}", o.name),
                            );
                        }
                    }
                }
                p.health = Some(h);
            }
            "ready" => {
                no_block(d)?;
                if d.args.len() > 1 {
                    return err(d.line, "ready takes at most one address");
                }
                p.ready = Some(listen_address(d.args.first(), 8181, d.line)?);
            }
            "prometheus" => {
                no_block(d)?;
                if d.args.len() > 1 {
                    return err(d.line, "prometheus takes at most one address");
                }
                p.prometheus = Some(listen_address(d.args.first(), 9153, d.line)?);
            }
            "kubernetes" => p.kubernetes = Some(kubernetes(d, block_zones)?),
            "forward" => p.forward = Some(forward(d)?),
            "cache" => p.cache = Some(cache(d, block_zones)?),
            "reload" => {
                no_block(d)?;
                let interval = d
                    .args
                    .first()
                    .map(|a| duration(a, d.line))
                    .transpose()?
                    .unwrap_or(Duration::from_secs(30));
                let jitter = d
                    .args
                    .get(1)
                    .map(|a| duration(a, d.line))
                    .transpose()?
                    .unwrap_or(Duration::from_secs(15));
                if d.args.len() > 2 {
                    return err(d.line, "reload takes [INTERVAL] [JITTER]");
                }
                if interval < Duration::from_secs(2) {
                    return err(d.line, "reload interval must be at least 2s");
                }
                p.reload = Some(Reload { interval, jitter });
            }
            "loadbalance" => {
                no_block(d)?;
                match d.args.as_slice() {
                    [] => {}
                    [a] if a == "round_robin" => {}
                    _ => return err(d.line, "loadbalance supports only round_robin"),
                }
                p.loadbalance = true;
            }
            "loop" => {
                no_args(d)?;
                no_block(d)?;
                p.loop_detect = true;
            }
            other => {
                return err(
                    d.line,
                    format!(
                        "unknown directive {other:?} (weftd supports errors, log, health, ready, prometheus, kubernetes, forward, cache, reload, loadbalance, loop)"
                    ),
                );
            }
        }
    }
    Ok(p)
}

fn kubernetes(d: &Directive, block_zones: &[String]) -> Result<Kubernetes, CorefileError> {
    let zones: Vec<String> = if d.args.is_empty() {
        block_zones.to_vec()
    } else {
        d.args.iter().map(|z| fqdn(z)).collect()
    };
    let mut k = Kubernetes {
        zones,
        pods: PodsMode::Disabled,
        ttl: 5,
        fallthrough: None,
        namespaces: Vec::new(),
        endpoint_pod_names: false,
    };
    for o in &d.block {
        match o.name.as_str() {
            "pods" => {
                k.pods = match o.args.as_slice() {
                    [m] if m == "disabled" => PodsMode::Disabled,
                    [m] if m == "insecure" => PodsMode::Insecure,
                    [m] if m == "verified" => PodsMode::Verified,
                    _ => return err(o.line, "pods takes one of disabled, insecure, verified"),
                }
            }
            "ttl" => {
                let [v] = o.args.as_slice() else {
                    return err(o.line, "ttl takes one number of seconds");
                };
                let ttl: u32 = number(v, "TTL", o.line)?;
                if ttl > 3600 {
                    return err(o.line, "ttl must be between 0 and 3600");
                }
                k.ttl = ttl;
            }
            "fallthrough" => k.fallthrough = Some(o.args.iter().map(|z| fqdn(z)).collect()),
            "namespaces" => {
                if o.args.is_empty() {
                    return err(o.line, "namespaces needs at least one namespace");
                }
                k.namespaces = o.args.clone();
            }
            "endpoint_pod_names" => k.endpoint_pod_names = true,
            // Options about reaching the API server do not apply: weftd has its own source.
            "kubeconfig" | "endpoint" | "labels" | "namespace_labels" | "noendpoints"
            | "ignore" => {
                return err(
                    o.line,
                    format!(
                        "kubernetes: option {:?} is not supported by weftd (it reads the mesh's own config source)",
                        o.name
                    ),
                );
            }
            other => return err(o.line, format!("kubernetes: unknown option {other:?}")),
        }
    }
    Ok(k)
}

fn forward(d: &Directive) -> Result<Forward, CorefileError> {
    let [from, to @ ..] = d.args.as_slice() else {
        return err(d.line, "forward needs FROM and at least one upstream");
    };
    let mut f = Forward {
        from: fqdn(from),
        to: upstreams(to, d.line)?,
        except: Vec::new(),
        max_concurrent: None,
        health_check: Duration::from_millis(500),
        max_fails: 2,
        policy: Policy::Random,
        force_tcp: false,
    };
    for o in &d.block {
        match (o.name.as_str(), o.args.as_slice()) {
            ("except", zones) if !zones.is_empty() => {
                f.except = zones.iter().map(|z| fqdn(z)).collect()
            }
            ("max_concurrent", [n]) => f.max_concurrent = Some(number(n, "number", o.line)?),
            ("health_check", [v, ..]) => f.health_check = duration(v, o.line)?,
            ("max_fails", [n]) => f.max_fails = number(n, "number", o.line)?,
            ("force_tcp", []) => f.force_tcp = true,
            ("prefer_udp", []) => f.force_tcp = false,
            ("policy", [p]) => {
                f.policy = match p.as_str() {
                    "random" => Policy::Random,
                    "round_robin" => Policy::RoundRobin,
                    "sequential" => Policy::Sequential,
                    _ => return err(o.line, "policy is one of random, round_robin, sequential"),
                }
            }
            ("expire", [v]) => {
                duration(v, o.line)?;
            }
            _ => {
                return err(
                    o.line,
                    format!("forward: unknown or malformed option {:?}", o.name),
                );
            }
        }
    }
    Ok(f)
}

fn cache(d: &Directive, block_zones: &[String]) -> Result<Cache, CorefileError> {
    let mut args = d.args.iter();
    let mut max_ttl = 3600;
    let mut zones = Vec::new();
    if let Some(first) = args.next() {
        match first.parse::<u32>() {
            Ok(t) => max_ttl = t,
            Err(_) => zones.push(fqdn(first)),
        }
    }
    zones.extend(args.map(|z| fqdn(z)));
    if zones.is_empty() {
        zones = block_zones.to_vec();
    }
    let class = |ttl: u32| CacheClass {
        capacity: 9984,
        max_ttl: ttl,
        min_ttl: 5,
    };
    let mut c = Cache {
        max_ttl,
        success: class(max_ttl),
        denial: class(max_ttl.min(1800)),
        zones,
    };
    for o in &d.block {
        let target = match o.name.as_str() {
            "success" => &mut c.success,
            "denial" => &mut c.denial,
            "prefetch" | "serve_stale" | "disable" | "keepttl" => {
                return err(
                    o.line,
                    format!("cache: option {:?} is not supported yet", o.name),
                );
            }
            other => return err(o.line, format!("cache: unknown option {other:?}")),
        };
        let [cap, rest @ ..] = o.args.as_slice() else {
            return err(o.line, format!("{} CAPACITY [TTL] [MINTTL]", o.name));
        };
        target.capacity = number(cap, "capacity", o.line)?;
        if let Some(t) = rest.first() {
            target.max_ttl = number(t, "TTL", o.line)?;
        }
        if let Some(t) = rest.get(1) {
            target.min_ttl = number(t, "TTL", o.line)?;
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubernetes_default_parses() {
        let c = parse(KUBERNETES_DEFAULT).unwrap();
        let b = &c.blocks[0];
        assert_eq!((b.zones.as_slice(), b.port), (&[".".to_string()][..], 53));
        let k = b.plugins.kubernetes.as_ref().unwrap();
        assert_eq!(k.zones, ["cluster.local.", "in-addr.arpa.", "ip6.arpa."]);
        assert_eq!((k.pods, k.ttl), (PodsMode::Insecure, 30));
        assert_eq!(
            k.fallthrough.as_deref(),
            Some(&["in-addr.arpa.".to_string(), "ip6.arpa.".to_string()][..])
        );
        assert_eq!(
            b.plugins.health.as_ref().unwrap().lameduck,
            Duration::from_secs(5)
        );
        assert_eq!(b.plugins.prometheus, Some("0.0.0.0:9153".parse().unwrap()));
        assert_eq!(b.plugins.cache.as_ref().unwrap().max_ttl, 30);
        assert_eq!(
            b.plugins.forward.as_ref().unwrap().max_concurrent,
            Some(1000)
        );
        assert!(
            b.plugins.errors
                && b.plugins.loop_detect
                && b.plugins.loadbalance
                && b.plugins.reload.is_some()
        );
    }

    #[test]
    fn blocks_keys_ports_and_env() {
        let c = parse("cluster.local:1053 example.org:1053 {\n  kubernetes\n  forward . 127.0.0.1:5300 dns://[::1]:53\n}\n.:1053 {\n forward . 10.0.0.1\n}\n").unwrap();
        assert_eq!(c.blocks[0].zones, ["cluster.local.", "example.org."]);
        assert_eq!(c.blocks[0].port, 1053);
        assert_eq!(
            c.blocks[0].plugins.kubernetes.as_ref().unwrap().zones,
            ["cluster.local.", "example.org."]
        );
        assert_eq!(
            c.blocks[0].plugins.forward.as_ref().unwrap().to,
            [
                "127.0.0.1:5300".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(
            c.blocks[1].plugins.forward.as_ref().unwrap().to[0],
            "10.0.0.1:53".parse().unwrap()
        );
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                ".:53 {\n  errors\n  rewrite name a b\n}\n",
                3,
                "unknown directive \"rewrite\"",
            ),
            (
                ".:53 {\n  kubernetes cluster.local {\n    pods sometimes\n  }\n}\n",
                3,
                "pods takes one of",
            ),
            (
                ".:53 {\n  cache 30 {\n    success many\n  }\n}\n",
                3,
                "not a valid capacity",
            ),
            (
                ".:53 {\n  forward .\n}\n",
                2,
                "forward needs at least one upstream",
            ),
            (
                ".:53 {\n  forward\n}\n",
                2,
                "forward needs FROM and at least one upstream",
            ),
            (".:abc {\n}\n", 1, "not a port number"),
            (
                ".:53 {\n  health {\n    lameduck soon\n  }\n}\n",
                3,
                "not a duration",
            ),
            (".:53 {\n  errors\n", 2, "not closed"),
            (".:53 {\n  log\n  log\n}\n", 3, "given twice"),
            (".:53 {\n}\n.:53 {\n}\n", 3, "already served"),
            ("tls://.:853 {\n}\n", 1, "not supported"),
        ];
        for (text, line, needle) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn zones_match_on_label_boundaries() {
        assert!(in_zone("a.cluster.local.", "cluster.local."));
        assert!(in_zone("cluster.local.", "cluster.local."));
        assert!(!in_zone("acluster.local.", "cluster.local."));
        assert!(in_zone("anything.", "."));
    }
}
