//! Request path normalization, as Envoy's connection manager does it before any filter or route
//! sees the path (and the upstream gets the normalized path): `normalize_path` (RFC 3986 dot
//! segments, `\` as `/`, percent-encoded unreserved characters decoded, the canonicalization
//! Envoy borrows from Chromium's URL library), `merge_slashes`, and
//! `path_with_escaped_slashes_action` for `%2F` and `%5C`. Istio turns `normalize_path` on for
//! every listener (`meshConfig.pathNormalization` BASE, the default) so that an authorization
//! rule on `/admin` also holds for `/public/../admin`.

use std::borrow::Cow;

use weft_xds_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::PathWithEscapedSlashesAction,
};

/// What happens to `%2F` and `%5C` (escaped `/` and `\`) in a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    Keep,
    Reject,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

/// A connection manager's path settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathNormalization {
    normalize: bool,
    merge_slashes: bool,
    escaped_slashes: EscapedSlashes,
}

/// What to do with a request after normalization.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalized<'a> {
    /// Go on with this path (and query).
    Path(Cow<'a, str>),
    /// Answer 400 (`REJECT_REQUEST` on an escaped slash); the request's path is this one (its
    /// slashes unescaped, as Envoy leaves it for the access log).
    Reject(String),
    /// Answer a redirect to this path (`UNESCAPE_AND_REDIRECT`).
    Redirect(String),
}

impl PathNormalization {
    pub fn from_xds(
        hcm: &HttpConnectionManager,
    ) -> Result<PathNormalization, (&'static str, String)> {
        if hcm.path_normalization_options.is_some() {
            return Err((
                "path_normalization_options",
                "is not supported by this weft-proxy version (normalize_path and merge_slashes are)"
                    .into(),
            ));
        }
        let escaped_slashes =
            match PathWithEscapedSlashesAction::try_from(hcm.path_with_escaped_slashes_action) {
                // Envoy's implementation-specific default is to keep them.
                Ok(
                    PathWithEscapedSlashesAction::ImplementationSpecificDefault
                    | PathWithEscapedSlashesAction::KeepUnchanged,
                ) => EscapedSlashes::Keep,
                Ok(PathWithEscapedSlashesAction::RejectRequest) => EscapedSlashes::Reject,
                Ok(PathWithEscapedSlashesAction::UnescapeAndRedirect) => {
                    EscapedSlashes::UnescapeAndRedirect
                }
                Ok(PathWithEscapedSlashesAction::UnescapeAndForward) => {
                    EscapedSlashes::UnescapeAndForward
                }
                Err(_) => {
                    return Err((
                        "path_with_escaped_slashes_action",
                        format!("unknown value {}", hcm.path_with_escaped_slashes_action),
                    ));
                }
            };
        Ok(PathNormalization {
            normalize: hcm.normalize_path.as_ref().is_some_and(|b| b.value),
            merge_slashes: hcm.merge_slashes,
            escaped_slashes,
        })
    }

    /// Nothing to do for any path.
    pub fn is_off(&self) -> bool {
        !self.normalize && !self.merge_slashes && self.escaped_slashes == EscapedSlashes::Keep
    }

    /// Whether `path_and_query` may change at all: a path without `%`, `\`, `.` (and, merging
    /// slashes, without `//`) is already normal, which most are. One pass up to the query.
    pub fn may_change(&self, path_and_query: &str) -> bool {
        let mut last = 0u8;
        for &c in path_and_query.as_bytes() {
            match c {
                b'?' => return false,
                b'%' | b'\\' | b'.' => return true,
                b'/' if self.merge_slashes && last == b'/' => return true,
                _ => {}
            }
            last = c;
        }
        false
    }

    /// The request target after normalization (`path_and_query`: the path and its query; the
    /// query is left as it is).
    pub fn apply<'a>(&self, path_and_query: &'a str) -> Normalized<'a> {
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        // `*` (OPTIONS) and other non-paths are left alone.
        if !path.starts_with('/') {
            return Normalized::Path(Cow::Borrowed(path_and_query));
        }
        let mut out = Cow::Borrowed(path);
        let escaped = self.escaped_slashes != EscapedSlashes::Keep && has_escaped_slash(&out);
        if escaped {
            out = Cow::Owned(unescape_slashes(&out));
            if self.escaped_slashes == EscapedSlashes::Reject {
                return Normalized::Reject(format!("{out}{query}"));
            }
        }
        if self.normalize
            && let Some(p) = canonical(&out)
        {
            out = Cow::Owned(p);
        }
        if self.merge_slashes && out.contains("//") {
            out = Cow::Owned(merge_slashes(&out));
        }
        if escaped && self.escaped_slashes == EscapedSlashes::UnescapeAndRedirect {
            return Normalized::Redirect(format!("{out}{query}"));
        }
        match out {
            Cow::Borrowed(_) => Normalized::Path(Cow::Borrowed(path_and_query)),
            Cow::Owned(p) if p == path => Normalized::Path(Cow::Borrowed(path_and_query)),
            Cow::Owned(p) => Normalized::Path(Cow::Owned(p + query)),
        }
    }
}

fn has_escaped_slash(path: &str) -> bool {
    let b = path.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
                || (w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c')))
    })
}

/// `%2F` to `/` and `%5C` to `\` (any case).
fn unescape_slashes(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let (h, l) = (b[i + 1], b[i + 2]);
            if h == b'2' && l.eq_ignore_ascii_case(&b'f') {
                out.push(b'/');
                i += 3;
                continue;
            }
            if h == b'5' && l.eq_ignore_ascii_case(&b'c') {
                out.push(b'\\');
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| path.to_string())
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut last_slash = false;
    for c in path.chars() {
        if c == '/' && last_slash {
            continue;
        }
        last_slash = c == '/';
        out.push(c);
    }
    out
}

/// Decoded when percent-encoded: the characters a path never needs escaped.
fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// Escaped on the way through: what a path may not carry as it is.
fn must_escape(c: u8) -> bool {
    c <= 0x20 || c >= 0x7f || matches!(c, b'"' | b'#' | b'<' | b'>' | b'?' | b'`' | b'{' | b'}')
}

fn hex_value(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// The canonical form of a path that starts with `/`: `None` when it already is.
fn canonical(path: &str) -> Option<String> {
    let b = path.as_bytes();
    // Most paths need nothing: no escape, backslash or dot segment candidate.
    if !b
        .iter()
        .any(|&c| c == b'%' || c == b'\\' || c == b'.' || must_escape(c))
    {
        return None;
    }
    let mut flat: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\\' => flat.push(b'/'),
            b'%' => match (
                b.get(i + 1).copied().and_then(hex_value),
                b.get(i + 2).copied().and_then(hex_value),
            ) {
                (Some(h), Some(l)) => {
                    let decoded = h * 16 + l;
                    if unreserved(decoded) {
                        flat.push(decoded);
                    } else {
                        flat.extend_from_slice(&b[i..i + 3]);
                    }
                    i += 3;
                    continue;
                }
                // Not an escape: the percent passes as it is.
                _ => flat.push(b'%'),
            },
            c if must_escape(c) => {
                flat.extend_from_slice(format!("%{c:02X}").as_bytes());
            }
            c => flat.push(c),
        }
        i += 1;
    }
    // Dot segments: `.` goes, `..` takes the segment before it (never above the root); a path
    // that ends in one ends with a slash.
    let mut segments: Vec<&[u8]> = Vec::new();
    let parts: Vec<&[u8]> = flat[1..].split(|c| *c == b'/').collect();
    let mut trailing = false;
    for (n, part) in parts.iter().enumerate() {
        let last = n + 1 == parts.len();
        match *part {
            b"." => trailing = last,
            b".." => {
                segments.pop();
                trailing = last;
            }
            p => segments.push(p),
        }
    }
    let mut out = Vec::with_capacity(flat.len());
    for s in &segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    let out = String::from_utf8(out).ok()?;
    (out != path).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> PathNormalization {
        PathNormalization {
            normalize: true,
            merge_slashes: false,
            escaped_slashes: EscapedSlashes::Keep,
        }
    }

    fn path(n: &PathNormalization, p: &str) -> String {
        match n.apply(p) {
            Normalized::Path(p) => p.into_owned(),
            other => format!("{other:?}"),
        }
    }

    /// Istio's own expectations for its BASE normalization (Envoy's `normalize_path`).
    #[test]
    fn istio_base_normalization() {
        let n = base();
        for (from, to) in [
            ("/", "/"),
            ("/app/", "/app/"),
            ("/app/../admin", "/admin"),
            ("/app", "/app"),
            ("/app//", "/app//"),
            ("/app/%2f", "/app/%2f"),
            ("/app%2f/", "/app%2f/"),
            ("/xyz%30..//abc", "/xyz0..//abc"),
            ("/app/%2E./admin", "/admin"),
            (r"/app\admin", "/app/admin"),
            (r"/app/\/\/\admin", "/app//////admin"),
            ("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc"),
            (
                r"/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\abc",
                "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
            ),
            ("/app//../admin", "/app/admin"),
            ("/app//../../admin", "/admin"),
            ("/a/b/..?x=/../y", "/a/?x=/../y"),
            ("/..", "/"),
            ("/a/./b/.", "/a/b/"),
            ("/100%", "/100%"),
        ] {
            assert_eq!(path(&n, from), to, "{from}");
            if from != to {
                assert!(n.may_change(from), "{from}");
            }
        }
        assert!(!n.may_change("/a/b?x=%2e."));
        assert!(!n.may_change("//a"));
    }

    #[test]
    fn merging_and_escaped_slashes() {
        let merge = PathNormalization {
            merge_slashes: true,
            ..base()
        };
        assert_eq!(path(&merge, "/app//../admin"), "/app/admin");
        assert_eq!(path(&merge, "//a///b/?q=//"), "/a/b/?q=//");
        let reject = PathNormalization {
            escaped_slashes: EscapedSlashes::Reject,
            ..base()
        };
        assert_eq!(
            reject.apply("/a%2Fb/%2e?q"),
            Normalized::Reject("/a/b/%2e?q".into())
        );
        assert_eq!(path(&reject, "/a/b"), "/a/b");
        let forward = PathNormalization {
            escaped_slashes: EscapedSlashes::UnescapeAndForward,
            merge_slashes: true,
            ..base()
        };
        assert_eq!(path(&forward, "/a%2F..%2f%5cb"), "/b");
        let redirect = PathNormalization {
            escaped_slashes: EscapedSlashes::UnescapeAndRedirect,
            ..base()
        };
        assert_eq!(
            redirect.apply("/a%2fb?x"),
            Normalized::Redirect("/a/b?x".into())
        );
        assert!(
            PathNormalization {
                normalize: false,
                merge_slashes: false,
                escaped_slashes: EscapedSlashes::Keep
            }
            .is_off()
        );
    }
}
