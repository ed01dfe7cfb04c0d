//! What a route changes about a request or answers instead of forwarding it: path rewrites
//! (`prefix_rewrite`, `regex_rewrite`), authority rewrites (`host_rewrite_literal`), redirects,
//! and request/response header edits (`*_headers_to_add`, `*_headers_to_remove`).

use http::header::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;
use weft_xds_proto::envoy::config::core::v3::{
    HeaderValueOption, header_value_option::HeaderAppendAction,
};
use weft_xds_proto::envoy::config::route::v3::{RedirectAction, redirect_action};
use weft_xds_proto::envoy::r#type::matcher::v3::RegexMatchAndSubstitute;

#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Replace the part of the path the route's prefix (or exact path) matched.
    Prefix { matched: usize, with: String },
    /// Replace every match of the pattern; `$1`-style groups (converted from Envoy's `\1`).
    Regex {
        pattern: Regex,
        substitution: String,
    },
}

impl PathRewrite {
    /// Rewrites a path-and-query, keeping the query.
    pub fn apply(&self, path_and_query: &str) -> String {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let new_path = match self {
            PathRewrite::Prefix { matched, with } => {
                let rest = path.get(*matched..).unwrap_or("");
                format!("{with}{rest}")
            }
            PathRewrite::Regex {
                pattern,
                substitution,
            } => pattern
                .replace_all(path, substitution.as_str())
                .into_owned(),
        };
        match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        }
    }
}

pub fn regex_rewrite(r: &RegexMatchAndSubstitute) -> Result<PathRewrite, String> {
    let pattern = r.pattern.as_ref().ok_or("regex_rewrite needs a pattern")?;
    let pattern = Regex::new(&pattern.regex)
        .map_err(|e| format!("invalid regex {:?}: {e}", pattern.regex))?;
    // Envoy (RE2) numbers groups \1..\9 in the substitution; Rust's regex writes ${1}.
    let mut substitution = String::new();
    let mut chars = r.substitution.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                substitution.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => substitution.push_str("$$"),
            _ => substitution.push(c),
        }
    }
    Ok(PathRewrite::Regex {
        pattern,
        substitution,
    })
}

/// How an added header combines with one already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Append {
    Always,
    AddIfAbsent,
    Overwrite,
    OverwriteIfExists,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    add: Vec<(HeaderName, HeaderValue, Append)>,
    remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn from_xds(add: &[HeaderValueOption], remove: &[String]) -> Result<HeaderEdits, String> {
        let mut edits = HeaderEdits::default();
        for (i, opt) in add.iter().enumerate() {
            let h = opt
                .header
                .as_ref()
                .ok_or(format!("[{i}]: a header is required"))?;
            let name = HeaderName::from_bytes(h.key.as_bytes())
                .map_err(|_| format!("[{i}]: invalid header name {:?}", h.key))?;
            let raw = if h.raw_value.is_empty() {
                h.value.as_bytes().to_vec()
            } else {
                h.raw_value.clone()
            };
            if raw.contains(&b'%') {
                return Err(format!(
                    "[{i}]: header value substitution (%...%) is not supported yet"
                ));
            }
            let value = HeaderValue::from_bytes(&raw)
                .map_err(|_| format!("[{i}]: invalid value for {:?}", h.key))?;
            #[allow(deprecated)]
            let mode = match opt.append.map(|b| b.value) {
                Some(true) => Append::Always,
                Some(false) => Append::Overwrite,
                None => match HeaderAppendAction::try_from(opt.append_action) {
                    Ok(HeaderAppendAction::AppendIfExistsOrAdd) => Append::Always,
                    Ok(HeaderAppendAction::AddIfAbsent) => Append::AddIfAbsent,
                    Ok(HeaderAppendAction::OverwriteIfExistsOrAdd) => Append::Overwrite,
                    Ok(HeaderAppendAction::OverwriteIfExists) => Append::OverwriteIfExists,
                    Err(_) => {
                        return Err(format!(
                            "[{i}]: unknown append_action {}",
                            opt.append_action
                        ));
                    }
                },
            };
            edits.add.push((name, value, mode));
        }
        for (i, r) in remove.iter().enumerate() {
            edits.remove.push(
                HeaderName::from_bytes(r.as_bytes())
                    .map_err(|_| format!("remove[{i}]: invalid header name {r:?}"))?,
            );
        }
        Ok(edits)
    }

    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }

    /// Removals first, then additions (as Envoy).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value, mode) in &self.add {
            let present = headers.contains_key(name);
            match mode {
                Append::Always => {
                    headers.append(name.clone(), value.clone());
                }
                Append::AddIfAbsent if !present => {
                    headers.insert(name.clone(), value.clone());
                }
                Append::Overwrite => {
                    headers.insert(name.clone(), value.clone());
                }
                Append::OverwriteIfExists if present => {
                    headers.insert(name.clone(), value.clone());
                }
                _ => {}
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Redirect {
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u32>,
    path: Option<String>,
    prefix: Option<(usize, String)>,
    status: u16,
    strip_query: bool,
}

impl Redirect {
    /// `matched_prefix`: the length of the route's prefix match, for `prefix_rewrite`.
    pub fn from_xds(
        r: &RedirectAction,
        matched_prefix: Option<usize>,
    ) -> Result<Redirect, (String, String)> {
        let scheme = match &r.scheme_rewrite_specifier {
            Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
                Some("https".to_string())
            }
            Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) if !s.is_empty() => {
                Some(s.to_ascii_lowercase())
            }
            _ => None,
        };
        let (path, prefix) = match &r.path_rewrite_specifier {
            None => (None, None),
            Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
            Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(p)) => match matched_prefix {
                Some(n) => (None, Some((n, p.clone()))),
                None => {
                    return Err((
                        "redirect.prefix_rewrite".into(),
                        "needs a prefix or exact path match".into(),
                    ));
                }
            },
            Some(_) => {
                return Err((
                    "redirect.regex_rewrite".into(),
                    "regex redirects are not supported yet".into(),
                ));
            }
        };
        let status = match redirect_action::RedirectResponseCode::try_from(r.response_code) {
            Ok(redirect_action::RedirectResponseCode::MovedPermanently) => 301,
            Ok(redirect_action::RedirectResponseCode::Found) => 302,
            Ok(redirect_action::RedirectResponseCode::SeeOther) => 303,
            Ok(redirect_action::RedirectResponseCode::TemporaryRedirect) => 307,
            Ok(redirect_action::RedirectResponseCode::PermanentRedirect) => 308,
            Err(_) => {
                return Err((
                    "redirect.response_code".into(),
                    format!("unknown code {}", r.response_code),
                ));
            }
        };
        Ok(Redirect {
            scheme,
            host: Some(r.host_redirect.clone()).filter(|h| !h.is_empty()),
            port: Some(r.port_redirect).filter(|p| *p != 0),
            path,
            prefix,
            status,
            strip_query: r.strip_query,
        })
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The `location` for a request to `authority` + `path_and_query`.
    pub fn location(&self, authority: &str, path_and_query: &str) -> String {
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let (orig_host, orig_port) = split_authority(authority);
        let host = self.host.as_deref().unwrap_or(orig_host);
        let port = match (self.port, self.host.is_some(), self.scheme.is_some()) {
            (Some(p), _, _) => Some(p.to_string()),
            // A new host or scheme drops the request's port (it belonged to the old one).
            (None, false, false) => orig_port.map(str::to_string),
            _ => None,
        };
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let mut new_path = match (&self.path, &self.prefix) {
            (Some(p), _) => p.clone(),
            (None, Some((n, with))) => format!("{with}{}", path.get(*n..).unwrap_or("")),
            _ => path.to_string(),
        };
        let path_has_query = new_path.contains('?');
        if let Some(q) = query.filter(|_| !self.strip_query && !path_has_query) {
            new_path.push('?');
            new_path.push_str(q);
        }
        match port {
            Some(p) => format!("{scheme}://{host}:{p}{new_path}"),
            None => format!("{scheme}://{host}{new_path}"),
        }
    }
}

/// `host:port` -> (host, Some(port)); IPv6 literals keep their brackets.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    let port_at = if authority.starts_with('[') {
        authority.find("]:").map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    match port_at {
        Some(i)
            if authority[i + 1..].chars().all(|c| c.is_ascii_digit())
                && i + 1 < authority.len() =>
        {
            (&authority[..i], Some(&authority[i + 1..]))
        }
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_regex_rewrites_keep_the_query() {
        let p = PathRewrite::Prefix {
            matched: 4,
            with: "/v2".into(),
        };
        assert_eq!(p.apply("/api/users?x=1"), "/v2/users?x=1");
        let r = regex_rewrite(&RegexMatchAndSubstitute {
            pattern: Some(weft_xds_proto::envoy::r#type::matcher::v3::RegexMatcher {
                regex: "^/service/([^/]+)(/.*)$".into(),
                ..Default::default()
            }),
            substitution: "\\2/instance/\\1".into(),
        })
        .unwrap();
        assert_eq!(r.apply("/service/foo/v1/api?q"), "/v1/api/instance/foo?q");
    }

    #[test]
    fn redirect_locations() {
        let r = Redirect {
            scheme: None,
            host: None,
            port: None,
            path: Some("/new".into()),
            prefix: None,
            status: 301,
            strip_query: false,
        };
        assert_eq!(
            r.location("hello:8080", "/old?a=b"),
            "http://hello:8080/new?a=b"
        );
        let r = Redirect {
            scheme: Some("https".into()),
            host: Some("example.com".into()),
            port: None,
            path: None,
            prefix: None,
            status: 308,
            strip_query: true,
        };
        assert_eq!(r.location("hello:8080", "/p?a=b"), "https://example.com/p");
    }

    #[test]
    fn header_edits_follow_append_actions() {
        let opt = |k: &str, v: &str, a: i32| HeaderValueOption {
            header: Some(weft_xds_proto::envoy::config::core::v3::HeaderValue {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            append_action: a,
            ..Default::default()
        };
        let e = HeaderEdits::from_xds(
            &[opt("x-a", "1", 0), opt("x-b", "2", 2), opt("x-c", "3", 1)],
            &["x-gone".into()],
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-a", "0".parse().unwrap());
        h.insert("x-b", "0".parse().unwrap());
        h.insert("x-c", "0".parse().unwrap());
        h.insert("x-gone", "0".parse().unwrap());
        e.apply(&mut h);
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert_eq!(h["x-b"], "2");
        assert_eq!(h["x-c"], "0");
        assert!(!h.contains_key("x-gone"));
        assert!(
            HeaderEdits::from_xds(&[opt("x-d", "%DOWNSTREAM_REMOTE_ADDRESS%", 0)], &[]).is_err()
        );
    }
}
