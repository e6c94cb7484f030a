//! Guest-controlled request heads and bodies through the proxy's Host check, placeholder
//! substitution and refusal, and hop-by-hop stripping. Must never panic, and a request that is
//! let through must carry no placeholder at all in its URL or headers (bound ones replaced,
//! unbound ones refused).
#![no_main]

use airlock_net::rewrite::{request_host, rewrite_head, strip_hop_by_hop};
use airlock_net::secrets::{Location, Secret, Secrets};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Uri;
use libfuzzer_sys::fuzz_target;

// Values are lowercase and placeholders uppercase, so a substituted value can never complete
// a placeholder with its neighbours: any placeholder left after rewriting is a real miss.
fn secrets() -> &'static Secrets {
    static S: std::sync::OnceLock<Secrets> = std::sync::OnceLock::new();
    S.get_or_init(build)
}

fn build() -> Secrets {
    let s = |name: &str, value: &str, host: &str, ph: &str, in_body: bool| Secret {
        name: name.into(),
        value: value.into(),
        hosts: vec![host.parse().unwrap()],
        placeholder: Some(ph.into()),
        in_body,
        allow_http: false,
    };
    Secrets::new(vec![
        s("A", "value a/?#&=", "a.example", "PH_AAAAAAAA", true),
        s("B", "valueb", "*.b.example", "PH_BBBBBBBB", false),
        s("C", "c", "*", "PH_CCCCCCCCC", false),
    ])
    .unwrap()
}

const HOSTS: [Option<&str>; 4] = [None, Some("a.example"), Some("x.b.example"), Some("z.example")];
const VALUES: [&str; 3] = ["value a/?#&=", "valueb", "c"];
const PHS: [&str; 3] = ["PH_AAAAAAAA", "PH_BBBBBBBB", "PH_CCCCCCCCC"];

fn has_placeholder(b: &[u8]) -> bool {
    PHS.iter().any(|p| b.windows(p.len()).any(|w| w == p.as_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let host = HOSTS[(sel & 3) as usize];
    let secrets = secrets();
    let mut lines = rest.split(|&b| b == b'\n');
    let Some(uri) = lines.next().and_then(|l| Uri::try_from(l).ok()) else { return };
    let mut headers = HeaderMap::new();
    for l in lines.by_ref().take(64) {
        let Some(colon) = l.iter().position(|&b| b == b':') else { break };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&l[..colon]),
            HeaderValue::from_bytes(&l[colon + 1..]),
        ) {
            headers.append(n, v);
        }
    }
    let body: Vec<u8> = lines.flatten().copied().collect();

    let _ = request_host(&uri, &headers);
    let mut uri2 = uri.clone();
    let mut h2 = headers.clone();
    if let Ok(subs) = rewrite_head(&mut uri2, &mut h2, host, secrets) {
        if host.is_none() {
            assert!(subs.is_empty());
        }
        if let Some(pq) = uri2.path_and_query() {
            assert!(!has_placeholder(pq.as_str().as_bytes()));
        }
        for (n, v) in &h2 {
            assert!(!has_placeholder(n.as_str().as_bytes()));
            assert!(!has_placeholder(v.as_bytes()));
        }
        strip_hop_by_hop(&mut h2, sel & 4 != 0);
    }
    if let Ok(Some((out, used))) = secrets.rewrite(&body, host, Location::Body) {
        assert!(!used.is_empty());
        assert!(out.len() <= body.len() * 12 + 12);
    }
    let _ = secrets.scrub(&body);

    // Streaming masking of a response body cut at fuzzer-chosen points: same length, and no
    // value survives, wherever the cuts fall.
    let step = 1 + (sel >> 3) as usize;
    let mut carry = Vec::new();
    let mut masked = Vec::new();
    for chunk in body.chunks(step) {
        masked.extend(secrets.mask_chunk(&mut carry, chunk));
        assert!(carry.len() < 16);
    }
    masked.extend(carry);
    assert_eq!(masked.len(), body.len());
    for v in VALUES {
        assert!(!masked.windows(v.len()).any(|w| w == v.as_bytes()));
    }
});
