//! VirtualService delegation: how a root route's match and settings combine with each route of
//! the delegate VirtualService, as Istio merges them.

use std::collections::BTreeMap;

use crate::config::{HttpMatchRequest, HttpRoute, StringMatch};

/// The child route under the root route, or None when their matches cannot both hold.
pub fn merge_route(root: &HttpRoute, child: &HttpRoute) -> Option<HttpRoute> {
    let mut out = child.clone();
    out.delegate = None;
    if !root.matches.is_empty() {
        out.matches = if child.matches.is_empty() {
            root.matches.clone()
        } else {
            let merged: Vec<HttpMatchRequest> = root
                .matches
                .iter()
                .flat_map(|r| child.matches.iter().filter_map(move |c| merge_match(r, c)))
                .collect();
            if merged.is_empty() {
                return None;
            }
            merged
        };
    }
    // Settings the child leaves unset come from the root route.
    macro_rules! inherit {
        ($($f:ident),*) => { $( if out.$f.is_none() { out.$f = root.$f.clone(); } )* };
    }
    inherit!(
        timeout,
        retries,
        fault,
        headers,
        cors_policy,
        mirror,
        mirror_percentage,
        rewrite
    );
    if out.mirrors.is_empty() {
        out.mirrors = root.mirrors.clone();
    }
    Some(out)
}

/// The child's uri within the root's: the narrower of the two, None when they cannot both hold.
fn merge_uri(root: &StringMatch, child: &StringMatch) -> Option<StringMatch> {
    use StringMatch::*;
    match (root, child) {
        (Prefix(r), Prefix(c)) if c.starts_with(r.as_str()) => Some(child.clone()),
        (Prefix(r), Prefix(c)) if r.starts_with(c.as_str()) => Some(root.clone()),
        (Prefix(r), Exact(c)) if c.starts_with(r.as_str()) => Some(child.clone()),
        (Exact(r), Prefix(c)) if r.starts_with(c.as_str()) => Some(root.clone()),
        (Exact(r), Exact(c)) if r == c => Some(child.clone()),
        (a, b) if a == b => Some(child.clone()),
        _ => None,
    }
}

fn same_or_either<T: Clone + PartialEq>(r: &Option<T>, c: &Option<T>) -> Option<Option<T>> {
    match (r, c) {
        (Some(a), Some(b)) if a != b => None,
        (a, b) => Some(b.clone().or_else(|| a.clone())),
    }
}

fn union<V: Clone + PartialEq>(
    r: &BTreeMap<String, V>,
    c: &BTreeMap<String, V>,
) -> Option<BTreeMap<String, V>> {
    let mut out = r.clone();
    for (k, v) in c {
        match out.get(k) {
            Some(existing) if existing != v => return None,
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Some(out)
}

fn merge_match(r: &HttpMatchRequest, c: &HttpMatchRequest) -> Option<HttpMatchRequest> {
    let mut m = c.clone();
    m.uri = match (&r.uri, &c.uri) {
        (Some(a), Some(b)) => Some(merge_uri(a, b)?),
        (a, b) => b.clone().or_else(|| a.clone()),
    };
    m.scheme = same_or_either(&r.scheme, &c.scheme)?;
    m.method = same_or_either(&r.method, &c.method)?;
    m.authority = same_or_either(&r.authority, &c.authority)?;
    m.port = same_or_either(&r.port, &c.port)?;
    m.source_namespace = same_or_either(&r.source_namespace, &c.source_namespace)?;
    m.headers = union(&r.headers, &c.headers)?;
    m.without_headers = union(&r.without_headers, &c.without_headers)?;
    m.query_params = union(&r.query_params, &c.query_params)?;
    m.source_labels = union(&r.source_labels, &c.source_labels)?;
    if m.gateways.is_empty() {
        m.gateways = r.gateways.clone();
    }
    m.ignore_uri_case = r.ignore_uri_case || c.ignore_uri_case;
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(uri: StringMatch) -> HttpMatchRequest {
        HttpMatchRequest {
            uri: Some(uri),
            ..Default::default()
        }
    }

    #[test]
    fn child_matches_narrow_the_root_match_and_conflicts_drop() {
        let p = |s: &str| StringMatch::Prefix(s.into());
        let e = |s: &str| StringMatch::Exact(s.into());
        assert_eq!(
            merge_match(&m(p("/api")), &m(p("/api/v2"))).unwrap().uri,
            Some(p("/api/v2"))
        );
        assert_eq!(
            merge_match(&m(p("/api")), &m(e("/api/x"))).unwrap().uri,
            Some(e("/api/x"))
        );
        assert_eq!(
            merge_match(&m(p("/api/v2")), &m(p("/api"))).unwrap().uri,
            Some(p("/api/v2"))
        );
        assert!(merge_match(&m(p("/api")), &m(p("/web"))).is_none());
        let mut hdr = HttpMatchRequest::default();
        hdr.headers.insert("end-user".into(), e("jason"));
        let merged = merge_match(&m(p("/reviews")), &hdr).unwrap();
        assert_eq!(merged.uri, Some(p("/reviews")));
        assert_eq!(merged.headers.len(), 1);
        let mut other = HttpMatchRequest::default();
        other.headers.insert("end-user".into(), e("bob"));
        assert!(merge_match(&hdr, &other).is_none());
    }

    #[test]
    fn unset_child_settings_come_from_the_root() {
        let root = HttpRoute {
            timeout: Some("3s".into()),
            matches: vec![m(StringMatch::Prefix("/a".into()))],
            ..Default::default()
        };
        let child = HttpRoute {
            timeout: None,
            ..Default::default()
        };
        let merged = merge_route(&root, &child).unwrap();
        assert_eq!(merged.timeout.as_deref(), Some("3s"));
        assert_eq!(merged.matches, root.matches);
    }
}
