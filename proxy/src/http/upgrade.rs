//! HTTP/1.1 upgrades (WebSocket), when the connection manager's `upgrade_configs` allows them:
//! the request goes to one endpoint over a connection of its own (not the pool), and once the
//! upstream answers `101 Switching Protocols` both sides are spliced byte for byte until either
//! closes. Any other answer is passed back as a normal response. As Envoy's, the access log line
//! of an upgraded connection is written when the session ends: the bytes each way, and `DC`
//! (`downstream_remote_disconnect`) when the client ended it first, `SI`
//! (`stream_idle_timeout`) when no byte moved either way for the stream's idle timeout.

use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Empty, Full};
use hyper_util::rt::TokioIo;

use super::{ProxyBody, access_log, local_reply, milliseconds, names, tell_timeout};
use crate::cluster::Cluster;
use crate::cluster::UpstreamHead;

/// Where the request path leaves an upgrade's access log entry (a `101`'s extension): the
/// splice writes it when the session ends.
#[derive(Clone, Default)]
pub(crate) struct SessionLog(Arc<Mutex<Option<Pending>>>);

/// A log entry waiting for its session's end, and where it goes.
type Pending = (Box<access_log::Entry>, access_log::Loggers);

impl SessionLog {
    /// Leaves the entry for the splice (before the `101` goes out, so before the splice starts).
    pub(crate) fn hand_over(&self, entry: Box<access_log::Entry>, loggers: access_log::Loggers) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some((entry, loggers));
        }
    }

    /// Writes the line: `received` and `sent` are the session's bytes from the client and to it.
    fn write(&self, received: u64, sent: u64, end: SessionEnd) {
        let Some((mut entry, loggers)) = self.0.lock().ok().and_then(|mut s| s.take()) else {
            return;
        };
        entry.bytes_received += received;
        entry.bytes_sent += sent;
        match end {
            SessionEnd::Client => {
                entry.flags = "DC".into();
                entry.details = "downstream_remote_disconnect".into();
            }
            SessionEnd::Idle => {
                entry.flags = "SI".into();
                entry.details = "stream_idle_timeout".into();
            }
            SessionEnd::Upstream => {}
        }
        super::access_log::write(&mut entry, &loggers);
    }
}

/// How an upgraded session ended, for its log line.
#[derive(Clone, Copy)]
enum SessionEnd {
    Client,
    Upstream,
    /// No byte either way for the stream's idle timeout.
    Idle,
}

/// Is this an HTTP/1.1 WebSocket upgrade request?
pub fn is_websocket(version: http::Version, headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    version == http::Version::HTTP_11
        && has(header::UPGRADE, "websocket")
        && has(header::CONNECTION, "upgrade")
}

/// Forwards an upgrade request and, on 101, splices the two connections.
pub(crate) async fn forward(
    cluster: &Cluster,
    mut head: UpstreamHead,
    upgrade_header: HeaderValue,
    downstream: hyper::upgrade::OnUpgrade,
    action: &super::router::RouteAction,
    original: Option<std::net::SocketAddr>,
    hcm: &super::ConnectionManager,
) -> Response<ProxyBody> {
    let timed = hcm.envoy_headers;
    let timeout = action.timeout;
    // The route's idle timeout, else the connection manager's.
    let idle = action.idle_timeout.unwrap_or(hcm.timeouts.stream_idle);
    // As on other requests (unless `suppress_envoy_headers`): the upstream is told its time,
    // the answer says how long the upstream took.
    let since = timed.then(std::time::Instant::now);
    if timed {
        tell_timeout(&mut head.headers, timeout);
    }
    let Some(endpoint) = cluster.pick(original, &[], 1, None) else {
        cluster.stats.upstream_cx_none_healthy.inc();
        return super::no_healthy_upstream();
    };
    // The hop-by-hop headers were stripped for the upstream; an upgrade needs them back.
    head.headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    head.headers.insert(header::UPGRADE, upgrade_header);
    head.version = http::Version::HTTP_11;
    // For access logs: the host and connection every answer from here on came through.
    let mark = |mut resp: Response<ProxyBody>, local: Option<std::net::SocketAddr>| {
        super::Upstream::mark(&mut resp, Some(endpoint.address), cluster, local);
        resp
    };
    let stream = match endpoint.pool.connect().await {
        Ok(s) => s,
        Err(e) => {
            cluster.stats.upstream_cx_connect_fail.inc();
            return mark(super::upstream_failure(&e, false, None), None);
        }
    };
    let local = stream.local_addr();
    cluster.stats.upstream_cx_total.inc();
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        let resp = local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream handshake failed",
            "UF",
            "upstream_reset_before_response_started{remote_connection_failure}",
        );
        return mark(resp, local);
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut req = Request::new(Empty::<bytes::Bytes>::new());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    let sent = sender.send_request(req);
    let resp = match timeout {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r,
            Err(_) => {
                let resp = local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    "UT",
                    "response_timeout",
                );
                return mark(resp, local);
            }
        },
        None => sent.await,
    };
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let reset = crate::cluster::UpstreamError::Reset {
                addr: endpoint.address,
                source: e.into(),
            };
            return mark(super::upstream_failure(&reset, false, None), local);
        }
    };
    cluster.stats.upstream_rq_xx.record(resp.status().as_u16());
    if let Some(t) = since {
        resp.headers_mut().insert(
            names::X_ENVOY_UPSTREAM_SERVICE_TIME,
            milliseconds(t.elapsed()),
        );
    }
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        return mark(
            Response::from_parts(parts, Either::Left(Either::Left(body))),
            local,
        );
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let log = SessionLog::default();
    let session = log.clone();
    tokio::spawn(async move {
        let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
            session.write(0, 0, SessionEnd::Upstream);
            return;
        };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        let spliced = crate::idle::splice(&mut down, &mut up, idle).await;
        // What came from the upstream went to the client (all of it, unless the client left).
        let end = if spliced.idle {
            SessionEnd::Idle
        } else if spliced.first_end == Some(crate::idle::Side::A) {
            SessionEnd::Client
        } else {
            SessionEnd::Upstream
        };
        session.write(spliced.a_read, spliced.b_read, end);
    });
    let (parts, _) = resp.into_parts();
    let mut resp = mark(
        Response::from_parts(parts, Either::Right(Full::default())),
        local,
    );
    resp.extensions_mut().insert(log);
    resp
}
