//! A small blocking HTTP/1.1 client with keep-alive, enough to drive traffic through proxies
//! and read admin/debug endpoints without pulling an async stack into the tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A request header as `weftctl echo` saw it: the echo backend lists the request's headers
    /// in its answer, one `name: value` a line.
    pub fn echoed(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}: ");
        self.body
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .map(str::to_string)
    }
}

/// One keep-alive connection, reopened when the server closes it.
pub struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client { addr, conn: None }
    }

    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<Response> {
        self.request("GET", host, path, &[])
    }

    pub fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Response> {
        // A reused connection may have been closed by the server: retry once on a fresh one.
        let reused = self.conn.is_some();
        match self.try_request(method, host, path, headers) {
            Err(_) if reused => {
                self.conn = None;
                self.try_request(method, host, path, headers)
            }
            r => r,
        }
    }

    /// The open connection, or a new one.
    fn connection(&mut self) -> std::io::Result<&mut BufReader<TcpStream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        Ok(self.conn.as_mut().expect("connected"))
    }

    /// Sends `raw` (a whole request, head and body, as written) and reads the answer.
    pub fn send_raw(&mut self, raw: &[u8]) -> std::io::Result<Response> {
        let conn = self.connection()?;
        conn.get_mut().write_all(raw)?;
        let resp = read_response(conn);
        if resp.is_err() {
            self.conn = None;
        }
        resp
    }

    fn try_request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Response> {
        let conn = self.connection()?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        conn.get_mut().write_all(req.as_bytes())?;
        let resp = read_response(conn);
        if resp.is_err()
            || resp
                .as_ref()
                .is_ok_and(|r| r.header("connection") == Some("close"))
        {
            self.conn = None;
        }
        resp
    }
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
}

fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&line))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad(l))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(&line))?;
            if size == 0 {
                line.clear();
                r.read_line(&mut line)?;
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A one-off GET on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    Client::new(addr).get(&addr.to_string(), path)
}

/// A one-off GET whose body is JSON.
pub fn get_json(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let r = get(addr, path).ok()?;
    serde_json::from_str(&r.body).ok()
}
