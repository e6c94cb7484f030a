//! Secrets and their placeholders: the guest only ever sees a placeholder; the proxy swaps in
//! the value on requests to the hosts the secret is bound to and refuses requests that carry a
//! placeholder anywhere else.

use aho_corasick::{AhoCorasick, MatchKind};

use crate::policy::HostPattern;
use crate::proxy::ProxyError;

/// One secret as configured. `Debug` never shows the value.
#[derive(Clone)]
pub struct Secret {
    /// Environment variable name the guest sees (holding the placeholder).
    pub name: String,
    /// The real value; lives only in this process's memory.
    pub value: String,
    /// Hosts the value may be sent to.
    pub hosts: Vec<HostPattern>,
    /// Placeholder the guest sees; `None` generates a random one.
    pub placeholder: Option<String>,
    /// Also substitute in (bounded) request bodies.
    pub in_body: bool,
    /// Also substitute over plain HTTP, where the value crosses the network unencrypted
    /// (off: such a request is refused with a 403 that names the flag).
    pub allow_http: bool,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .field("placeholder", &self.placeholder)
            .field("in_body", &self.in_body)
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// Where in a request a placeholder was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A header value.
    Header,
    /// The path or query of the URL.
    Url,
    /// The request body.
    Body,
}

impl Location {
    /// Name used in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Header => "header",
            Location::Url => "url",
            Location::Body => "body",
        }
    }
}

struct Entry {
    name: String,
    value: Vec<u8>,
    hosts: Vec<HostPattern>,
    placeholder: String,
    in_body: bool,
    allow_http: bool,
}

/// The validated secrets of one sandbox, with a matcher over their placeholders.
pub struct Secrets {
    entries: Vec<Entry>,
    placeholders: Option<AhoCorasick>,
    values: Option<AhoCorasick>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| &e.name))
            .finish()
    }
}

/// Rewritten bytes and the indices of the secrets substituted in them.
pub type Rewritten = (Vec<u8>, Vec<usize>);

/// Shortest placeholder accepted: shorter ones would match ordinary text.
pub const MIN_PLACEHOLDER_LEN: usize = 8;

fn random_placeholder() -> Result<String, ProxyError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ProxyError("no randomness for a secret placeholder".into()))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("AIRLOCK_PLACEHOLDER_{hex}"))
}

impl Secrets {
    /// Validates secrets and generates missing placeholders.
    pub fn new(secrets: Vec<Secret>) -> Result<Secrets, ProxyError> {
        let mut entries: Vec<Entry> = Vec::with_capacity(secrets.len());
        for s in secrets {
            let err = |m: &str| ProxyError(format!("secret {}: {m}", s.name));
            let name_ok = !s.name.is_empty()
                && !s.name.as_bytes()[0].is_ascii_digit()
                && s.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                return Err(ProxyError(format!(
                    "secret name '{}' is not an environment variable name (use letters, digits, _)",
                    s.name
                )));
            }
            if entries.iter().any(|e| e.name == s.name) {
                return Err(err("given twice"));
            }
            if s.value.is_empty() {
                return Err(err("the value is empty"));
            }
            // CR, LF and NUL would let a substituted value split or end an HTTP header.
            if s.value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(err(
                    "the value contains a line break or NUL, which cannot go in an HTTP header",
                ));
            }
            if s.hosts.is_empty() {
                return Err(err(
                    "no hosts given: name the hosts the value may be sent to (e.g. api.example.com)",
                ));
            }
            let placeholder = match s.placeholder {
                Some(p) => {
                    if p.len() < MIN_PLACEHOLDER_LEN
                        || !p.bytes().all(|b| b.is_ascii_graphic())
                        || p.bytes().any(|b| b == b'%')
                    {
                        return Err(err(&format!(
                            "placeholder '{p}' must be at least {MIN_PLACEHOLDER_LEN} visible ASCII characters without spaces or '%'"
                        )));
                    }
                    p
                }
                None => random_placeholder()?,
            };
            if s.value.contains(&placeholder) || placeholder.contains(&s.value) {
                return Err(err("the placeholder and the value contain each other"));
            }
            if entries.iter().any(|e| {
                e.placeholder.contains(&placeholder) || placeholder.contains(&e.placeholder)
            }) {
                return Err(err(&format!(
                    "placeholder '{placeholder}' overlaps another secret's placeholder"
                )));
            }
            entries.push(Entry {
                name: s.name,
                value: s.value.into_bytes(),
                hosts: s.hosts,
                placeholder,
                in_body: s.in_body,
                allow_http: s.allow_http,
            });
        }
        let build = |pats: Vec<&[u8]>| -> Result<Option<AhoCorasick>, ProxyError> {
            if pats.is_empty() {
                return Ok(None);
            }
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(pats)
                .map(Some)
                .map_err(|e| ProxyError(format!("cannot build the placeholder matcher: {e}")))
        };
        let placeholders = build(entries.iter().map(|e| e.placeholder.as_bytes()).collect())?;
        let values = build(entries.iter().map(|e| e.value.as_slice()).collect())?;
        Ok(Secrets {
            entries,
            placeholders,
            values,
        })
    }

    /// Whether there are no secrets.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `(name, placeholder)` of each secret.
    pub fn placeholders(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.placeholder.clone()))
            .collect()
    }

    /// Whether secret `i` may be substituted over plain HTTP.
    pub fn allows_http(&self, i: usize) -> bool {
        self.entries[i].allow_http
    }

    /// Name of secret `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.entries[i].name
    }

    /// Whether some secret may be sent to `host` (normalised).
    pub fn bound_to(&self, host: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.hosts.iter().any(|p| p.matches(host)))
    }

    /// Whether some secret bound to `host` is substituted in bodies.
    pub fn in_body_for(&self, host: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.in_body && e.hosts.iter().any(|p| p.matches(host)))
    }

    fn is_bound(&self, i: usize, host: Option<&str>) -> bool {
        host.is_some_and(|h| self.entries[i].hosts.iter().any(|p| p.matches(h)))
    }

    /// Replaces the placeholders in `input` for a request to `host` (`None`: no name, so no
    /// secret is bound). In a header or URL, a placeholder of a secret not bound to `host` is an
    /// error carrying that secret's index; in a body it is left as is, as are placeholders of
    /// secrets without `in_body`. Returns `Ok(None)` when nothing was replaced, else the new
    /// bytes and the indices of the secrets substituted.
    pub fn rewrite(
        &self,
        input: &[u8],
        host: Option<&str>,
        loc: Location,
    ) -> Result<Option<Rewritten>, usize> {
        let Some(ac) = &self.placeholders else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let mut used = Vec::new();
        let mut last = 0;
        for m in ac.find_iter(input) {
            let i = m.pattern().as_usize();
            let bound = self.is_bound(i, host);
            let replace = match loc {
                Location::Header | Location::Url if !bound => return Err(i),
                Location::Header | Location::Url => true,
                Location::Body => bound && self.entries[i].in_body,
            };
            if !replace {
                continue;
            }
            out.extend_from_slice(&input[last..m.start()]);
            let value = &self.entries[i].value;
            if loc == Location::Url {
                percent_encode(value, &mut out);
            } else {
                out.extend_from_slice(value);
            }
            last = m.end();
            if !used.contains(&i) {
                used.push(i);
            }
        }
        if used.is_empty() {
            return Ok(None);
        }
        out.extend_from_slice(&input[last..]);
        Ok(Some((out, used)))
    }

    /// Index of the first secret whose placeholder occurs in `input`.
    pub fn find_placeholder(&self, input: &[u8]) -> Option<usize> {
        self.placeholders
            .as_ref()?
            .find(input)
            .map(|m| m.pattern().as_usize())
    }

    /// Replaces any secret value in `input` by its placeholder (for response headers, so an
    /// echoing server does not hand the value to the guest). `None` when there was none.
    pub fn scrub(&self, input: &[u8]) -> Option<Vec<u8>> {
        let ac = self.values.as_ref()?;
        ac.find(input)?;
        let reps: Vec<&[u8]> = self
            .entries
            .iter()
            .map(|e| e.placeholder.as_bytes())
            .collect();
        Some(ac.replace_all_bytes(input, &reps))
    }
}

impl Secrets {
    /// Overwrites every secret value in `buf` with `*` of the same length (response bodies:
    /// the length, hence Content-Length, stays right).
    pub fn mask(&self, buf: &mut [u8]) {
        let Some(ac) = &self.values else { return };
        let spans: Vec<(usize, usize)> =
            ac.find_iter(&*buf).map(|m| (m.start(), m.end())).collect();
        for (a, b) in spans {
            buf[a..b].fill(b'*');
        }
    }

    /// One step of streaming masking: masks `carry` + `data`, returns what can be passed on
    /// and leaves in `carry` the end that may begin a value (flush it when the stream ends).
    pub fn mask_chunk(&self, carry: &mut Vec<u8>, data: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(carry);
        buf.extend_from_slice(data);
        self.mask(&mut buf);
        let keep = self.partial_value_suffix(&buf);
        *carry = buf.split_off(buf.len() - keep);
        buf
    }

    /// Length of the longest end of `buf` that is the start (not the whole) of some value:
    /// bytes a streaming scrubber must hold back until the next chunk shows whether a value
    /// follows. Usually 0, so streamed responses (SSE) are not delayed.
    pub fn partial_value_suffix(&self, buf: &[u8]) -> usize {
        let mut keep = 0;
        for e in &self.entries {
            let max = (e.value.len() - 1).min(buf.len());
            for k in (keep + 1..=max).rev() {
                if buf.ends_with(&e.value[..k]) {
                    keep = k;
                    break;
                }
            }
        }
        keep
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a value keeps its bytes
/// through URL decoding and cannot change the URL's structure (hand-written: six lines).
fn percent_encode(value: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Secrets {
        Secrets::new(vec![
            Secret {
                name: "A".into(),
                value: "va lue".into(),
                hosts: vec!["a.example".parse().unwrap()],
                placeholder: Some("PH_AAAAAAAA".into()),
                in_body: true,
                allow_http: false,
            },
            Secret {
                name: "B".into(),
                value: "vb".into(),
                hosts: vec!["*.b.example".parse().unwrap()],
                placeholder: None,
                in_body: false,
                allow_http: false,
            },
        ])
        .unwrap()
    }

    #[test]
    fn substitutes_and_blocks() {
        let s = set();
        let (out, used) = s
            .rewrite(b"x PH_AAAAAAAA y", Some("a.example"), Location::Header)
            .unwrap()
            .unwrap();
        assert_eq!(out, b"x va lue y");
        assert_eq!(used, vec![0]);
        let (out, _) = s
            .rewrite(b"/p?k=PH_AAAAAAAA", Some("a.example"), Location::Url)
            .unwrap()
            .unwrap();
        assert_eq!(out, b"/p?k=va%20lue");
        assert_eq!(
            s.rewrite(b"PH_AAAAAAAA", Some("x.b.example"), Location::Header),
            Err(0)
        );
        assert_eq!(s.rewrite(b"PH_AAAAAAAA", None, Location::Url), Err(0));
        // Bodies: unbound placeholders are left alone, not blocked.
        assert_eq!(
            s.rewrite(b"PH_AAAAAAAA", Some("x.b.example"), Location::Body),
            Ok(None)
        );
        assert_eq!(
            s.rewrite(b"nothing", Some("a.example"), Location::Header),
            Ok(None)
        );
        let ph_b = s.placeholders()[1].1.clone();
        assert!(ph_b.starts_with("AIRLOCK_PLACEHOLDER_"));
        assert_eq!(
            s.rewrite(ph_b.as_bytes(), Some("x.b.example"), Location::Body),
            Ok(None)
        );
        assert_eq!(s.scrub(b"echo va lue!").unwrap(), b"echo PH_AAAAAAAA!");
        let mut b = b"x va lue vb va".to_vec();
        s.mask(&mut b);
        assert_eq!(b, b"x ****** ** va");
        assert_eq!(s.partial_value_suffix(b"x va"), 2);
        assert_eq!(s.partial_value_suffix(b"x v"), 1);
        assert_eq!(s.partial_value_suffix(b"x y"), 0);
    }

    #[test]
    fn rejects_bad_secrets() {
        let mk = |name: &str, value: &str, ph: Option<&str>| Secret {
            name: name.into(),
            value: value.into(),
            hosts: vec!["a.example".parse().unwrap()],
            placeholder: ph.map(Into::into),
            in_body: false,
            allow_http: false,
        };
        assert!(Secrets::new(vec![mk("1X", "v", None)]).is_err());
        assert!(Secrets::new(vec![mk("X", "", None)]).is_err());
        assert!(Secrets::new(vec![mk("X", "a\r\nb", None)]).is_err());
        assert!(Secrets::new(vec![mk("X", "v", Some("short"))]).is_err());
        let e = Secrets::new(vec![mk("X", "topsecret", Some("topsecret-ph"))]).unwrap_err();
        assert!(!e.to_string().contains("topsecret"));
        let dbg = format!("{:?}", mk("X", "hunter2hunter2", None));
        assert!(!dbg.contains("hunter2"));
    }
}
