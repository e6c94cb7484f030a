//! Docker-style image references.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The registry used when a reference names none.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A fully qualified image reference: registry, repository, and a tag and/or a digest.
///
/// Parsing follows Docker's rules:
///
/// | input | result |
/// | --- | --- |
/// | `alpine` | `docker.io/library/alpine:latest` |
/// | `user/app` | `docker.io/user/app:latest` |
/// | `localhost:5000/app:v1` | `localhost:5000/app:v1` |
/// | `ghcr.io/o/app@sha256:…` | `ghcr.io/o/app@sha256:…` (no tag) |
/// | `app:v1@sha256:…` | `docker.io/library/app:v1@sha256:…` (digest wins when pulling) |
///
/// The first path component is a registry host only if it contains `.` or `:`, is
/// `localhost`, or contains upper-case letters (which repositories never may).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses a reference string. Never panics; every malformed input yields
    /// [`Error::InvalidReference`] (or [`Error::InvalidDigest`]).
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty reference"));
        }
        if input.trim() != input || input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }

        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                validate_digest(digest).map_err(|_| {
                    bad("digest must be sha256: followed by 64 lowercase hex digits")
                })?;
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        if rest.is_empty() {
            return Err(bad("missing repository name"));
        }

        // A tag is a ':' after the last '/'.
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|s| colon > s) => {
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(|r| bad(&r))?;
        }
        if name.is_empty() {
            return Err(bad("missing repository name"));
        }

        let (registry, path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                validate_registry(first).map_err(|r| bad(&r))?;
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DEFAULT_REGISTRY.to_string()
        } else {
            registry
        };
        validate_path(&path).map_err(|r| bad(&r))?;
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(bad("repository name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The registry host, with port if any (`docker.io`, `127.0.0.1:5000`, `[::1]:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path inside the registry (`library/alpine`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` is filled in when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:…`), if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// A copy of this reference pinned to `digest` with the tag dropped.
    pub fn with_digest(&self, digest: &str) -> Result<Self> {
        validate_digest(digest)?;
        Ok(Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        })
    }

    /// The registry host without its port (brackets of IPv6 literals removed).
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// True if the registry is a loopback host: `localhost`, `127.0.0.0/8` or `[::1]`.
    pub fn is_loopback(&self) -> bool {
        is_loopback_registry(&self.registry)
    }

    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (_, Some(d)) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.clone(),
            ),
            (Some(t), None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
            ),
            (None, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                DEFAULT_TAG.to_string(),
            ),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Reference::parse(s)
    }
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits.
pub(crate) fn validate_digest(digest: &str) -> Result<()> {
    match digest.split_once(':') {
        Some(("sha256", hex))
            if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            Ok(())
        }
        _ => Err(Error::InvalidDigest(digest.to_string())),
    }
}

fn validate_tag(tag: &str) -> std::result::Result<(), String> {
    if tag.is_empty() {
        return Err("empty tag".into());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err("tag longer than 128 characters".into());
    }
    let mut chars = tag.chars();
    let first = chars.next().unwrap_or('-');
    if !(first.is_ascii_alphanumeric() || first == '_') {
        return Err(format!(
            "tag {tag:?} must start with a letter, digit or '_'"
        ));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(format!(
            "tag {tag:?} may only contain letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

fn validate_registry(registry: &str) -> std::result::Result<(), String> {
    let err = || format!("invalid registry host {registry:?}");
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(err)?;
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(err());
        }
        match after {
            "" => (None, None),
            p => (None, Some(p.strip_prefix(':').ok_or_else(err)?)),
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty()
            || host.split('.').any(|label| {
                label.is_empty()
                    || label.starts_with('-')
                    || label.ends_with('-')
                    || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
        {
            return Err(err());
        }
    }
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || port.parse::<u16>().is_err() {
            return Err(format!("invalid port in registry {registry:?}"));
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() {
        return Err("missing repository name".into());
    }
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("repository name {path:?} must be lowercase"));
    }
    for component in path.split('/') {
        validate_component(component)
            .map_err(|r| format!("invalid repository path component {component:?}: {r}"))?;
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn validate_component(c: &str) -> std::result::Result<(), &'static str> {
    if c.is_empty() {
        return Err("empty component");
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("must start and end with a lowercase letter or digit");
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return Err("separators must be '.', '_', '__' or dashes");
        }
    }
    Ok(())
}

pub(crate) fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = host_of(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.repository(), "library/alpine");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.digest(), None);
        assert_eq!(
            p("alpine:3.19").to_string(),
            "docker.io/library/alpine:3.19"
        );
        assert_eq!(p("user/app").to_string(), "docker.io/user/app:latest");
        assert_eq!(p("user/app:v1").to_string(), "docker.io/user/app:v1");
        assert_eq!(
            p("docker.io/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            p("index.docker.io/library/alpine").to_string(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(p("a/b/c/d").to_string(), "docker.io/a/b/c/d:latest");
    }

    #[test]
    fn registries_and_ports() {
        let r = p("localhost:5000/name:tag");
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "name");
        assert_eq!(r.tag(), Some("tag"));
        assert!(r.is_loopback());
        let r = p("127.0.0.1:5000/test/bb:1");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "test/bb");
        assert_eq!(r.host(), "127.0.0.1");
        assert!(r.is_loopback());
        assert!(p("127.8.9.10/x").is_loopback());
        let r = p("[::1]:5000/x/y:z");
        assert_eq!(r.registry(), "[::1]:5000");
        assert_eq!(r.host(), "::1");
        assert!(r.is_loopback());
        assert!(p("localhost/app").is_loopback());
        assert_eq!(p("localhost/app").registry(), "localhost");
        let r = p("ghcr.io/org/app");
        assert_eq!(r.registry(), "ghcr.io");
        assert_eq!(r.repository(), "org/app");
        assert!(!r.is_loopback());
        assert!(!p("192.168.1.2:5000/app").is_loopback());
        assert_eq!(
            p("registry.example.com:443/a/b:c").host(),
            "registry.example.com"
        );
        // A dotted first component is a registry even without a port.
        assert_eq!(p("quay.io/app").repository(), "app");
        // An upper-case first component is treated as a registry host.
        assert_eq!(p("MyHost/app").registry(), "MyHost");
    }

    #[test]
    fn digests() {
        let r = p(&format!("alpine@{D}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{D}"));
        let r = p(&format!("alpine:3@{D}"));
        assert_eq!(r.tag(), Some("3"));
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.to_string(), format!("docker.io/library/alpine:3@{D}"));
        let r = p(&format!("localhost:5000/a/b:t@{D}"));
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.tag(), Some("t"));
        let r = p(&format!("localhost:5000/a/b@{D}"));
        assert_eq!(r.tag(), None);
        assert_eq!(
            r.with_digest(D).unwrap().to_string(),
            format!("localhost:5000/a/b@{D}")
        );
    }

    #[test]
    fn roundtrip_display() {
        for s in [
            "docker.io/library/alpine:latest",
            "127.0.0.1:5000/test/bb:1",
            "ghcr.io/a/b-c_d.e__f:v1.2-rc_3",
        ] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(p(&p(s).to_string()), p(s));
        }
    }

    #[test]
    fn rejects_bad_input() {
        let bad = [
            "",
            " ",
            "alpine ",
            "Alpine",
            "user/App",
            "alpine:",
            "alpine:-tag",
            "alpine:ta/g",
            ":tag",
            "@sha256:abc",
            "alpine@sha256:abc",
            "alpine@md5:0123",
            &format!("alpine@{}", D.to_uppercase()),
            "alpine@",
            "/alpine",
            "alpine/",
            "a//b",
            "a..b",
            "-a",
            "a-",
            "a___b",
            "host:99999/app",
            "host:port/app",
            "[::1/app",
            "[zz]:1/app",
            "bad_host.com:5000/app",
            "localhost:5000/",
            "a\nb",
            "ålpine",
            &format!("x/{}", "a".repeat(300)),
            &format!("alpine:{}", "t".repeat(129)),
        ];
        for s in bad {
            match Reference::parse(s) {
                Err(Error::InvalidReference { .. }) | Err(Error::InvalidDigest(_)) => {}
                other => panic!("{s:?} should be rejected, got {other:?}"),
            }
        }
        let msg = Reference::parse("User/App").unwrap_err().to_string();
        assert!(msg.contains("lowercase"), "{msg}");
    }

    #[test]
    fn separators() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a1.b2_c3__d4-e5"] {
            p(ok);
        }
        for bad in ["a._b", "a.-b", "a..b", "a_-b"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn never_panics_on_garbage() {
        let samples = [
            "@", ":", "/", "[", "]", "[]:/", "a:b:c", "a@b@c", "::::", "[:::]/x",
        ];
        for s in samples {
            let _ = Reference::parse(s);
        }
        // Every prefix of a valid reference either parses or errors.
        let full = format!("[::1]:5000/a/b:c@{D}");
        for i in 0..=full.len() {
            if full.is_char_boundary(i) {
                let _ = Reference::parse(&full[..i]);
            }
        }
    }
}
