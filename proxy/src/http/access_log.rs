//! Access logs (`HttpConnectionManager.access_log`): Envoy's file and stdout loggers with its
//! format strings (`%COMMAND%` operators, text or JSON). A line is written when the response has
//! been sent (its body finished or was dropped), with the bytes actually sent. Operators this
//! version cannot fill are rejected (NACKed) by name, never logged as a wrong value.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use http::HeaderMap;
use weft_xds_proto::envoy::config::accesslog::v3::{AccessLog as XdsAccessLog, access_log};
use weft_xds_proto::envoy::config::core::v3::{data_source, substitution_format_string};
use weft_xds_proto::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};
use weft_xds_proto::wkt::value::Kind as ValueKind;

/// Envoy's default access log format.
pub const ENVOY_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

const FILE_LOGGER: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";

#[derive(Debug, Clone, PartialEq)]
enum Op {
    StartTime,
    Req(String, Option<String>, Option<usize>),
    Resp(String, Option<String>, Option<usize>),
    Trailer(String, Option<String>, Option<usize>),
    GrpcStatus(GrpcFormat),
    Protocol,
    ResponseCode,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamClusterRaw,
    UpstreamLocalAddress,
    UpstreamTransportFailureReason,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    RequestedServerName,
    RouteName,
    DownstreamRemoteAddress,
    DownstreamLocalAddress,
}

/// How `%GRPC_STATUS(...)%` writes a status.
#[derive(Debug, Clone, Copy, PartialEq)]
enum GrpcFormat {
    /// `Unavailable` (the default).
    Camel,
    /// `UNAVAILABLE`.
    Snake,
    /// `14`.
    Number,
}

/// The gRPC status a map's `grpc-status` gives, as Envoy reads it: a value that is not a number
/// is Envoy's invalid code (written as 2^64-1).
pub(crate) fn grpc_status(map: &HeaderMap) -> Option<u64> {
    let v = map.get(super::names::GRPC_STATUS)?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX),
    )
}

/// gRPC's status names, as Envoy's `CAMEL_STRING` (`OK` too) and `SNAKE_STRING` write them.
const GRPC_NAMES: [(&str, &str); 17] = [
    ("OK", "OK"),
    ("Canceled", "CANCELLED"),
    ("Unknown", "UNKNOWN"),
    ("InvalidArgument", "INVALID_ARGUMENT"),
    ("DeadlineExceeded", "DEADLINE_EXCEEDED"),
    ("NotFound", "NOT_FOUND"),
    ("AlreadyExists", "ALREADY_EXISTS"),
    ("PermissionDenied", "PERMISSION_DENIED"),
    ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
    ("FailedPrecondition", "FAILED_PRECONDITION"),
    ("Aborted", "ABORTED"),
    ("OutOfRange", "OUT_OF_RANGE"),
    ("Unimplemented", "UNIMPLEMENTED"),
    ("Internal", "INTERNAL"),
    ("Unavailable", "UNAVAILABLE"),
    ("DataLoss", "DATA_LOSS"),
    ("Unauthenticated", "UNAUTHENTICATED"),
];

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Op(Op),
}

#[derive(Debug, Clone, PartialEq)]
enum Format {
    Text(Vec<Piece>),
    Json(Vec<(String, Vec<Piece>)>),
}

/// A value with its spaces as underscores, as Envoy logs details and failure reasons.
fn no_spaces(v: &str) -> String {
    v.replace(' ', "_")
}

/// What one request and its response left for the log.
#[derive(Debug, Default)]
pub struct Entry {
    pub start: Option<SystemTime>,
    pub started: Option<Instant>,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub request_headers: HeaderMap,
    pub response_headers: HeaderMap,
    /// The answer's trailers, when it had some.
    pub response_trailers: Option<HeaderMap>,
    pub status: u16,
    pub flags: String,
    pub bytes_received: u64,
    /// The count of a streamed request body, read when the line is written.
    pub received: Option<Arc<std::sync::atomic::AtomicU64>>,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    /// The cluster's `alt_stat_name` when it has one, else its name.
    pub upstream_cluster: Option<String>,
    /// The cluster's name, when `upstream_cluster` is its `alt_stat_name`.
    pub upstream_cluster_raw: Option<String>,
    /// The local address of the upstream connection that carried the answer.
    pub upstream_local: Option<SocketAddr>,
    /// Why the connection to the upstream failed, as Envoy words it ("delayed connect error:
    /// Connection refused").
    pub transport_failure: Option<String>,
    /// Envoy's response code details: `via_upstream`, or why the proxy answered itself.
    pub details: std::borrow::Cow<'static, str>,
    /// The SNI of the downstream TLS connection.
    pub requested_server_name: Option<Arc<str>>,
    pub route_name: Option<String>,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    /// The request's sampled Zipkin span, finished with the entry.
    pub span: Option<Box<super::zipkin::Span>>,
}

/// Writes the entry's lines and finishes its span: the request is done.
pub fn write(entry: &mut Entry, loggers: &Loggers) {
    for l in loggers.iter() {
        l.write(entry);
    }
    if let Some(span) = entry.span.take() {
        span.finish(entry);
    }
}

#[derive(Debug)]
pub struct AccessLog {
    format: Format,
    out: Mutex<std::fs::File>,
}

fn parse_op(name: &str) -> Result<Op, String> {
    // NAME, or NAME(ARGS) optionally followed by :MAX_LENGTH
    let (head, max) = match name.rsplit_once(':') {
        Some((h, m)) if h.ends_with(')') && m.chars().all(|c| c.is_ascii_digit()) => {
            (h, m.parse().ok())
        }
        _ => (name, None),
    };
    let header_args = |args: &str| {
        let (main, alt) = match args.split_once('?') {
            Some((m, a)) => (m.to_ascii_lowercase(), Some(a.to_ascii_lowercase())),
            None => (args.to_ascii_lowercase(), None),
        };
        (main, alt)
    };
    if let Some(args) = head.strip_prefix("REQ(").and_then(|r| r.strip_suffix(')')) {
        let (m, a) = header_args(args);
        return Ok(Op::Req(m, a, max));
    }
    if let Some(args) = head.strip_prefix("RESP(").and_then(|r| r.strip_suffix(')')) {
        let (m, a) = header_args(args);
        return Ok(Op::Resp(m, a, max));
    }
    if let Some(args) = head
        .strip_prefix("TRAILER(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (m, a) = header_args(args);
        return Ok(Op::Trailer(m, a, max));
    }
    if let Some(args) = head
        .strip_prefix("GRPC_STATUS(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Ok(Op::GrpcStatus(match args {
            "CAMEL_STRING" => GrpcFormat::Camel,
            "SNAKE_STRING" => GrpcFormat::Snake,
            "NUMBER" => GrpcFormat::Number,
            other => {
                return Err(format!(
                    "GRPC_STATUS format {other:?} is not one of CAMEL_STRING, SNAKE_STRING, NUMBER"
                ));
            }
        }));
    }
    Ok(match head {
        "START_TIME" => Op::StartTime,
        "GRPC_STATUS" => Op::GrpcStatus(GrpcFormat::Camel),
        "GRPC_STATUS_NUMBER" => Op::GrpcStatus(GrpcFormat::Number),
        "PROTOCOL" => Op::Protocol,
        "RESPONSE_CODE" => Op::ResponseCode,
        "RESPONSE_FLAGS" => Op::ResponseFlags,
        "BYTES_RECEIVED" => Op::BytesReceived,
        "BYTES_SENT" => Op::BytesSent,
        "DURATION" => Op::Duration,
        "UPSTREAM_HOST" => Op::UpstreamHost,
        "UPSTREAM_CLUSTER" => Op::UpstreamCluster,
        "UPSTREAM_CLUSTER_RAW" => Op::UpstreamClusterRaw,
        "UPSTREAM_LOCAL_ADDRESS" => Op::UpstreamLocalAddress,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Op::UpstreamTransportFailureReason,
        "RESPONSE_CODE_DETAILS" => Op::ResponseCodeDetails,
        "CONNECTION_TERMINATION_DETAILS" => Op::ConnectionTerminationDetails,
        "REQUESTED_SERVER_NAME" => Op::RequestedServerName,
        "ROUTE_NAME" => Op::RouteName,
        "DOWNSTREAM_REMOTE_ADDRESS" => Op::DownstreamRemoteAddress,
        "DOWNSTREAM_LOCAL_ADDRESS" => Op::DownstreamLocalAddress,
        other => {
            return Err(format!(
                "format operator %{other}% is not supported by this weft-proxy version"
            ));
        }
    })
}

fn parse_text(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        if i > 0 {
            out.push(Piece::Lit(rest[..i].to_string()));
        }
        let after = &rest[i + 1..];
        let Some(j) = after.find('%') else {
            return Err(format!("unterminated operator in {s:?}"));
        };
        if j == 0 {
            out.push(Piece::Lit("%".into()));
        } else {
            out.push(Piece::Op(parse_op(&after[..j])?));
        }
        rest = &after[j + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Lit(rest.to_string()));
    }
    Ok(out)
}

impl AccessLog {
    /// One `access_log` entry of a connection manager.
    pub fn from_xds(a: &XdsAccessLog) -> Result<AccessLog, String> {
        if a.filter.is_some() {
            return Err("access log filters are not supported yet".into());
        }
        let Some(access_log::ConfigType::TypedConfig(any)) = &a.config_type else {
            return Err("a typed_config is required".into());
        };
        if any.type_url != FILE_LOGGER {
            return Err(format!(
                "logger {} is not supported (the file logger is)",
                any.type_url
            ));
        }
        let f: FileAccessLog = weft_xds_proto::unpack(any).map_err(|e| e.to_string())?;
        #[allow(deprecated)]
        let format = match &f.access_log_format {
            None => Format::Text(parse_text(ENVOY_DEFAULT_FORMAT)?),
            Some(file_access_log::AccessLogFormat::LogFormat(sfs)) => {
                if !sfs.formatters.is_empty() || sfs.omit_empty_values {
                    return Err(
                        "log_format formatters and omit_empty_values are not supported".into(),
                    );
                }
                match &sfs.format {
                    Some(substitution_format_string::Format::TextFormatSource(ds)) => {
                        match &ds.specifier {
                            Some(data_source::Specifier::InlineString(s)) => {
                                Format::Text(parse_text(s)?)
                            }
                            _ => return Err("text_format_source must be an inline_string".into()),
                        }
                    }
                    Some(substitution_format_string::Format::TextFormat(s)) => {
                        Format::Text(parse_text(s)?)
                    }
                    Some(substitution_format_string::Format::JsonFormat(st)) => {
                        let mut fields = Vec::new();
                        for (k, v) in &st.fields {
                            let Some(ValueKind::StringValue(s)) = &v.kind else {
                                return Err(format!("json_format value of {k:?} must be a string"));
                            };
                            fields.push((k.clone(), parse_text(s)?));
                        }
                        Format::Json(fields)
                    }
                    None => Format::Text(parse_text(ENVOY_DEFAULT_FORMAT)?),
                }
            }
            Some(_) => {
                return Err(
                    "the deprecated format fields are not supported; use log_format".into(),
                );
            }
        };
        if f.path.is_empty() {
            return Err("a path is required".into());
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&f.path)
            .map_err(|e| format!("cannot open {:?}: {e}", f.path))?;
        Ok(AccessLog {
            format,
            out: Mutex::new(out),
        })
    }

    /// The value of one operator, `None` for Envoy's `-`.
    fn value(op: &Op, e: &Entry) -> Option<String> {
        let header = |map: &HeaderMap, main: &str, alt: &Option<String>, max: &Option<usize>| {
            let pseudo = |name: &str| {
                match name {
                    ":method" => Some(e.method.clone()),
                    ":path" => Some(e.path.clone()),
                    ":authority" => Some(e.authority.clone()),
                    _ => None,
                }
                // Not known (a request refused before its head was read): Envoy's `-`.
                .filter(|v| !v.is_empty())
            };
            let get = |name: &str| {
                pseudo(name).or_else(|| {
                    map.get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                })
            };
            let v = get(main).or_else(|| alt.as_deref().and_then(get))?;
            Some(match max {
                Some(m) => v.chars().take(*m).collect(),
                None => v,
            })
        };
        match op {
            Op::StartTime => e.start.map(|t| {
                let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                crate::time::rfc3339_millis(d)
            }),
            Op::Req(m, a, max) => header(&e.request_headers, m, a, max),
            Op::Resp(m, a, max) => header(&e.response_headers, m, a, max),
            Op::Trailer(m, a, max) => header(
                e.response_trailers.as_ref().unwrap_or(&HeaderMap::new()),
                m,
                a,
                max,
            ),
            Op::GrpcStatus(format) => {
                // Only for gRPC requests; from the trailers, else a trailers-only answer's
                // head, else what the HTTP status maps to.
                if !super::router::is_grpc(&e.request_headers) {
                    return None;
                }
                let status = e
                    .response_trailers
                    .as_ref()
                    .and_then(grpc_status)
                    .or_else(|| grpc_status(&e.response_headers))
                    .or_else(|| {
                        let http = http::StatusCode::from_u16(e.status).ok()?;
                        Some(u64::from(super::grpc_status_of(http)))
                    })?;
                let named = usize::try_from(status).ok().and_then(|i| GRPC_NAMES.get(i));
                Some(match (format, named) {
                    (GrpcFormat::Camel, Some((camel, _))) => camel.to_string(),
                    (GrpcFormat::Snake, Some((_, snake))) => snake.to_string(),
                    _ => status.to_string(),
                })
            }
            Op::Protocol => Some(e.protocol.to_string()),
            Op::ResponseCode => Some(e.status.to_string()),
            Op::ResponseFlags => Some(if e.flags.is_empty() {
                "-".into()
            } else {
                e.flags.clone()
            }),
            Op::BytesReceived => Some(e.bytes_received.to_string()),
            Op::BytesSent => Some(e.bytes_sent.to_string()),
            Op::Duration => e.started.map(|s| s.elapsed().as_millis().to_string()),
            Op::UpstreamHost => e.upstream_host.map(|a| a.to_string()),
            Op::UpstreamCluster => e.upstream_cluster.clone(),
            Op::UpstreamClusterRaw => e
                .upstream_cluster_raw
                .clone()
                .or_else(|| e.upstream_cluster.clone()),
            Op::UpstreamLocalAddress => e.upstream_local.map(|a| a.to_string()),
            // Envoy writes these two with their spaces as underscores.
            Op::UpstreamTransportFailureReason => e.transport_failure.as_deref().map(no_spaces),
            Op::ResponseCodeDetails => Some(e.details.as_ref())
                .filter(|d| !d.is_empty())
                .map(no_spaces),
            // Set by network filters that close a connection (Envoy's RBAC network filter);
            // weft-proxy's closes it before any HTTP request exists.
            Op::ConnectionTerminationDetails => None,
            Op::RequestedServerName => e.requested_server_name.as_deref().map(str::to_string),
            Op::RouteName => e.route_name.clone(),
            Op::DownstreamRemoteAddress => e.downstream_remote.map(|a| a.to_string()),
            Op::DownstreamLocalAddress => e.downstream_local.map(|a| a.to_string()),
        }
    }

    fn render(pieces: &[Piece], e: &Entry) -> String {
        let mut s = String::new();
        for p in pieces {
            match p {
                Piece::Lit(l) => s.push_str(l),
                Piece::Op(op) => s.push_str(&Self::value(op, e).unwrap_or_else(|| "-".into())),
            }
        }
        s
    }

    pub fn write(&self, e: &Entry) {
        let line = match &self.format {
            Format::Text(pieces) => Self::render(pieces, e),
            Format::Json(fields) => {
                let mut map = serde_json::Map::new();
                for (k, pieces) in fields {
                    // A lone operator keeps its type (numbers stay numbers), as Envoy's typed JSON.
                    let v = match pieces.as_slice() {
                        [Piece::Op(op)] => match Self::value(op, e) {
                            None => serde_json::Value::Null,
                            Some(v) => match (op, v.parse::<u64>()) {
                                (
                                    Op::ResponseCode
                                    | Op::GrpcStatus(GrpcFormat::Number)
                                    | Op::BytesReceived
                                    | Op::BytesSent
                                    | Op::Duration,
                                    Ok(n),
                                ) => serde_json::Value::from(n),
                                _ => serde_json::Value::String(v),
                            },
                        },
                        _ => serde_json::Value::String(Self::render(pieces, e)),
                    };
                    map.insert(k.clone(), v);
                }
                let mut s = serde_json::Value::Object(map).to_string();
                s.push('\n');
                s
            }
        };
        if let Ok(mut f) = self.out.lock() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// The loggers of one connection manager.
pub type Loggers = Arc<Vec<AccessLog>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_render_like_envoy() {
        let pieces = parse_text(ENVOY_DEFAULT_FORMAT).unwrap();
        let mut e = Entry {
            method: "GET".into(),
            path: "/a?b=1".into(),
            authority: "hello".into(),
            protocol: "HTTP/1.1",
            status: 503,
            flags: "UF".into(),
            bytes_sent: 91,
            ..Default::default()
        };
        e.request_headers
            .insert("user-agent", "curl/8".parse().unwrap());
        let line = AccessLog::render(&pieces, &e);
        assert!(
            line.starts_with(
                "[-] \"GET /a?b=1 HTTP/1.1\" 503 UF 0 91 - - \"-\" \"curl/8\" \"-\" \"hello\" \"-\""
            ),
            "{line}"
        );
        assert!(
            parse_text("%NOT_A_THING%")
                .unwrap_err()
                .contains("NOT_A_THING")
        );
        assert!(parse_text("100%% %REQ(X-A?X-B):3%").is_ok());
        let e2 = Entry {
            request_headers: [(
                "x-b".parse::<http::HeaderName>().unwrap(),
                "abcdef".parse().unwrap(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        assert_eq!(
            AccessLog::render(&parse_text("%REQ(X-A?X-B):3%").unwrap(), &e2),
            "abc"
        );
    }

    /// Istio's default line: details and failure reasons with underscores for spaces, the
    /// upstream connection's local address, the SNI, `-` for what is not known.
    #[test]
    fn istios_default_line_renders_every_operator() {
        let format = "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% \
                      %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" \
                      %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %REQUESTED_SERVER_NAME%";
        let pieces = parse_text(format).unwrap();
        let failed = Entry {
            status: 503,
            flags: "UF".into(),
            details: "upstream_reset_before_response_started{remote_connection_failure}".into(),
            transport_failure: Some("delayed connect error: Connection refused".into()),
            upstream_cluster: Some("outbound|80||a".into()),
            ..Default::default()
        };
        assert_eq!(
            AccessLog::render(&pieces, &failed),
            "503 UF upstream_reset_before_response_started{remote_connection_failure} - \
             \"delayed_connect_error:_Connection_refused\" outbound|80||a - -"
        );
        let answered = Entry {
            status: 200,
            details: "via_upstream".into(),
            upstream_cluster: Some("outbound|80||a".into()),
            upstream_local: Some("10.0.0.1:40000".parse().unwrap()),
            requested_server_name: Some("a.example".into()),
            ..Default::default()
        };
        assert_eq!(
            AccessLog::render(&pieces, &answered),
            "200 - via_upstream - \"-\" outbound|80||a 10.0.0.1:40000 a.example"
        );
        // Nothing known (the default entry): `-` everywhere but the status.
        assert_eq!(
            AccessLog::render(&pieces, &Entry::default()),
            "0 - - - \"-\" - - -"
        );
    }

    #[test]
    fn grpc_status_and_trailers_render_like_envoy() {
        let pieces = parse_text(
            "%GRPC_STATUS% %GRPC_STATUS(SNAKE_STRING)% %GRPC_STATUS(NUMBER)% \
             %GRPC_STATUS_NUMBER% %TRAILER(GRPC-MESSAGE?x-other):4%",
        )
        .unwrap();
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let grpc = map(&[("content-type", "application/grpc+proto")]);
        let entry = |status, head: &[_], trailers: Option<&[_]>| Entry {
            request_headers: grpc.clone(),
            status,
            response_headers: map(head),
            response_trailers: trailers.map(map),
            ..Default::default()
        };
        let cases = [
            // In the trailers, which win over the head.
            (
                entry(
                    200,
                    &[("grpc-status", "0")],
                    Some(&[("grpc-status", "14"), ("grpc-message", "down now")]),
                ),
                "Unavailable UNAVAILABLE 14 14 down",
            ),
            // Trailers-only.
            (
                entry(200, &[("grpc-status", "5")], None),
                "NotFound NOT_FOUND 5 5 -",
            ),
            // No status at all: what the HTTP status maps to.
            (entry(404, &[], None), "Unimplemented UNIMPLEMENTED 12 12 -"),
            (entry(200, &[], None), "Unknown UNKNOWN 2 2 -"),
            // A code past the known ones, and one that is not a number.
            (entry(200, &[("grpc-status", "99")], None), "99 99 99 99 -"),
            (
                entry(200, &[("grpc-status", "x")], None),
                "18446744073709551615 18446744073709551615 18446744073709551615 \
                 18446744073709551615 -",
            ),
            // Nothing answered.
            (entry(0, &[], None), "- - - - -"),
        ];
        for (e, want) in cases {
            assert_eq!(AccessLog::render(&pieces, &e), want, "{e:?}");
        }
        // Not a gRPC request: no status, even with one in the answer.
        let mut plain = entry(200, &[("grpc-status", "0")], None);
        plain.request_headers = map(&[("content-type", "application/grpc-web")]);
        assert_eq!(AccessLog::render(&pieces, &plain), "- - - - -");
        assert_eq!(
            parse_text("%GRPC_STATUS(LOUD)%").unwrap_err(),
            "GRPC_STATUS format \"LOUD\" is not one of CAMEL_STRING, SNAKE_STRING, NUMBER"
        );
    }
}
