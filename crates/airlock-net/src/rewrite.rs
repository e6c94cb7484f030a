//! Request-head checks and rewriting: the Host / :authority must name the connection's server,
//! placeholders are replaced in header values and the URL path and query, and a placeholder of a
//! secret not bound to the host refuses the request. Pure functions over `http` types, so they
//! can be fuzzed without a network.
//!
//! **Threat notes.** Every input here comes from the guest (request target, header names and
//! values) and is parsed already by `http`/hyper; this module must never panic on any of it
//! (fuzz target `http_rewrite`), never grow a head without bound (a replacement is at most the
//! secret's length per placeholder occurrence, and heads are capped by the proxy), and never
//! substitute a secret for a host it is not bound to: the host is taken only from the URI
//! authority and the Host header, which must agree, after normalisation (case, trailing dot,
//! port).

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};

use crate::policy::normalize_name;
use crate::secrets::{Location, Secrets};

/// A placeholder that was replaced: (secret index, where).
pub type Substitution = (usize, Location);

/// Why a request was refused (already phrased for the audit log and the 403 body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// The host name a request is addressed to: the URI authority (HTTP/2 `:authority`, or an
/// absolute-form HTTP/1 target) and the Host header must agree; port dropped, normalised.
/// `Err` when they disagree or a name is malformed; `Ok(None)` when neither is present.
pub fn request_host(uri: &Uri, headers: &HeaderMap) -> Result<Option<String>, Refused> {
    let from_uri = uri.authority().map(|a| a.host().to_string());
    let from_header = match headers.get_all(http::header::HOST).iter().count() {
        0 => None,
        1 => {
            let v = headers[http::header::HOST]
                .to_str()
                .map_err(|_| Refused("malformed Host header".into()))?;
            let a: http::uri::Authority = v
                .parse()
                .map_err(|_| Refused("malformed Host header".into()))?;
            Some(a.host().to_string())
        }
        _ => return Err(Refused("more than one Host header".into())),
    };
    let norm = |h: String| -> Result<String, Refused> {
        let h = h.trim_start_matches('[').trim_end_matches(']').to_string();
        if h.parse::<std::net::IpAddr>().is_ok() {
            return Ok(h);
        }
        normalize_name(&h).ok_or_else(|| Refused(format!("malformed host name '{h}'")))
    };
    let a = from_uri.map(norm).transpose()?;
    let b = from_header.map(norm).transpose()?;
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err(Refused(format!(
            "request names two hosts ({a} in the URL, {b} in Host)"
        ))),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

/// Replaces placeholders in the header values and the path and query of a request to `host`
/// (`None`: no secret is bound). Substituted header values are marked sensitive (never indexed
/// by HPACK). On refusal nothing useful is left in the head; drop it.
pub fn rewrite_head(
    uri: &mut Uri,
    headers: &mut HeaderMap,
    host: Option<&str>,
    secrets: &Secrets,
) -> Result<Vec<Substitution>, Refused> {
    let mut subs: Vec<Substitution> = Vec::new();
    if secrets.is_empty() {
        return Ok(subs);
    }
    let refuse = |i: usize, loc: Location| {
        Refused(format!(
            "placeholder of secret {} in the {} of a request to {}, a host it is not bound to",
            secrets.name(i),
            loc.as_str(),
            host.unwrap_or("an address without a name")
        ))
    };
    // URL path and query.
    if let Some(pq) = uri.path_and_query() {
        if let Some((new, used)) = secrets
            .rewrite(pq.as_str().as_bytes(), host, Location::Url)
            .map_err(|i| refuse(i, Location::Url))?
        {
            let pq = PathAndQuery::try_from(new)
                .map_err(|_| Refused("the URL is invalid after substitution".into()))?;
            let mut parts = std::mem::take(uri).into_parts();
            parts.path_and_query = Some(pq);
            *uri = Uri::from_parts(parts)
                .map_err(|_| Refused("the URL is invalid after substitution".into()))?;
            subs.extend(used.into_iter().map(|i| (i, Location::Url)));
        }
    }
    // Authority (userinfo is already refused by `http`; a placeholder in the host part can
    // only be an attempt to smuggle it).
    if let Some(a) = uri.authority() {
        if let Some(i) = secrets.find_placeholder(a.as_str().as_bytes()) {
            return Err(refuse(i, Location::Url));
        }
    }
    // Headers: names can hold no value, so a placeholder there is refused outright.
    let mut changed: Vec<(HeaderName, usize, HeaderValue)> = Vec::new();
    for (idx, (name, value)) in headers.iter().enumerate() {
        if let Some(i) = secrets.find_placeholder(name.as_str().as_bytes()) {
            return Err(refuse(i, Location::Header));
        }
        if let Some((new, used)) = secrets
            .rewrite(value.as_bytes(), host, Location::Header)
            .map_err(|i| refuse(i, Location::Header))?
        {
            let mut v = HeaderValue::from_bytes(&new)
                .map_err(|_| Refused("a header is invalid after substitution".into()))?;
            v.set_sensitive(true);
            changed.push((name.clone(), idx, v));
            subs.extend(used.into_iter().map(|i| (i, Location::Header)));
        }
    }
    if !changed.is_empty() {
        // Rebuild so repeated headers keep their order.
        let old = std::mem::take(headers);
        let mut it = changed.into_iter().peekable();
        for (idx, (name, value)) in old.iter().enumerate() {
            let v = match it.peek() {
                Some((_, i, _)) if *i == idx => it.next().unwrap().2,
                _ => value.clone(),
            };
            headers.append(name.clone(), v);
        }
    }
    Ok(subs)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus those named in `Connection`; they describe one
/// connection and must not be forwarded. `keep_upgrade` keeps `Connection`/`Upgrade` for a
/// WebSocket handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if keep_upgrade && n == http::header::UPGRADE {
            continue;
        }
        headers.remove(&n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "transfer-encoding",
        "trailer",
    ] {
        headers.remove(n);
    }
    // `te: trailers` is the one TE value HTTP/2 allows (gRPC needs it).
    let te_trailers = headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(http::header::TE);
    }
    if !keep_upgrade {
        headers.remove(http::header::CONNECTION);
        headers.remove(http::header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Secret;

    fn secrets() -> Secrets {
        Secrets::new(vec![
            Secret {
                name: "TOKEN".into(),
                value: "s3cr3t/v".into(),
                hosts: vec!["api.example.com".parse().unwrap()],
                placeholder: Some("PH_TOKEN_1234".into()),
                in_body: false,
                allow_http: false,
            },
            Secret {
                name: "OTHER".into(),
                value: "other-v".into(),
                hosts: vec!["other.example".parse().unwrap()],
                placeholder: Some("PH_OTHER_1234".into()),
                in_body: false,
                allow_http: false,
            },
        ])
        .unwrap()
    }

    #[test]
    fn rewrites_headers_and_url() {
        let s = secrets();
        let mut uri: Uri = "/x/PH_TOKEN_1234?k=PH_TOKEN_1234".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer PH_TOKEN_1234".parse().unwrap());
        h.append("cookie", "a=1".parse().unwrap());
        h.append("cookie", "t=PH_TOKEN_1234".parse().unwrap());
        let subs = rewrite_head(&mut uri, &mut h, Some("api.example.com"), &s).unwrap();
        assert_eq!(subs.len(), 3);
        assert_eq!(uri.to_string(), "/x/s3cr3t%2Fv?k=s3cr3t%2Fv");
        assert_eq!(h["authorization"], "Bearer s3cr3t/v");
        assert!(h["authorization"].is_sensitive());
        let c: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(c, ["a=1", "t=s3cr3t/v"]);
    }

    #[test]
    fn refuses_unbound() {
        let s = secrets();
        let mut uri: Uri = "/?k=PH_OTHER_1234".parse().unwrap();
        let e =
            rewrite_head(&mut uri, &mut HeaderMap::new(), Some("api.example.com"), &s).unwrap_err();
        assert!(e.0.contains("OTHER"), "{e:?}");
        assert!(!e.0.contains("other-v"));
        let mut uri: Uri = "/".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-k", "PH_TOKEN_1234".parse().unwrap());
        assert!(rewrite_head(&mut uri, &mut h, None, &s).is_err());
    }

    #[test]
    fn host_checks() {
        let mut h = HeaderMap::new();
        h.insert("host", "API.example.com:443".parse().unwrap());
        let u: Uri = "/".parse().unwrap();
        assert_eq!(
            request_host(&u, &h).unwrap().as_deref(),
            Some("api.example.com")
        );
        let u: Uri = "https://evil.example/".parse().unwrap();
        assert!(request_host(&u, &h).is_err());
        h.append("host", "x".parse().unwrap());
        assert!(request_host(&"/".parse().unwrap(), &h).is_err());
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-foo".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("x-bar", "2".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("te") && h.contains_key("x-bar"));
    }
}
