//! The network flags of `run`: allow rules, pinned names, secrets, audit.

use std::net::IpAddr;
use std::path::PathBuf;

use airlock_sandbox::{NetworkSpec, SecretSpec};
use clap::Args;

/// Sealed-network options (nothing leaves the VM unless allowed here).
#[derive(Args, Debug, Clone, Default)]
pub struct NetArgs {
    /// Allow connections to HOST (`example.com`, `*.example.com`, `example.com:22`, `*`, an IP
    /// or CIDR). Without any, nothing leaves the sandbox.
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_hosts: Vec<String>,
    /// No NIC at all (port forwards still work).
    #[arg(long = "no-network", conflicts_with_all = ["allow_hosts", "secrets"])]
    pub no_network: bool,
    /// Resolve NAME to IP (which may then be private, e.g. a server on the host's loopback).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_hosts: Vec<String>,
    /// Let allowed names resolve into this private range (e.g. a corporate network).
    #[arg(long = "allow-private", value_name = "CIDR")]
    pub allow_private: Vec<String>,
    /// A secret the guest sees only as a placeholder: `NAME@HOST[,HOST...]` takes the value
    /// from this environment's NAME; `NAME=VALUE@HOSTS` gives it inline (visible in `ps`).
    #[arg(long = "secret", value_name = "NAME@HOSTS")]
    pub secrets: Vec<String>,
    /// The placeholder the guest sees for a secret (default: generated).
    #[arg(long = "secret-placeholder", value_name = "NAME=PLACEHOLDER")]
    pub placeholders: Vec<String>,
    /// Also substitute this secret inside request bodies.
    #[arg(long = "secret-in-body", value_name = "NAME")]
    pub in_body: Vec<String>,
    /// Also substitute this secret over plain HTTP, where it crosses the network unencrypted
    /// (without it such a request gets a 403 naming this flag).
    #[arg(long = "secret-allow-http", value_name = "NAME")]
    pub allow_http: Vec<String>,
    /// Trust this PEM CA for upstream TLS as well as the host's roots.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Append audit events (DNS, connections, HTTP requests, substitutions) as JSON lines.
    #[arg(long = "audit", value_name = "FILE")]
    pub audit: Option<PathBuf>,
}

impl NetArgs {
    /// The network part of the sandbox spec; errors say which flag is wrong and how.
    pub fn to_spec(&self) -> Result<NetworkSpec, String> {
        let mut spec = NetworkSpec {
            disabled: self.no_network,
            allow_hosts: self.allow_hosts.clone(),
            allow_private: self.allow_private.clone(),
            upstream_ca: self.upstream_ca.clone(),
            audit_file: self.audit.clone(),
            ..Default::default()
        };
        for a in &self.add_hosts {
            spec.add_hosts.push(parse_add_host(a)?);
        }
        for s in &self.secrets {
            spec.secrets
                .push(parse_secret(s, |n| std::env::var(n).ok())?);
        }
        for p in &self.placeholders {
            let (name, ph) = p
                .split_once('=')
                .ok_or_else(|| format!("--secret-placeholder {p}: expected NAME=PLACEHOLDER"))?;
            let s = spec
                .secrets
                .iter_mut()
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    format!("--secret-placeholder {name}: no --secret {name}@HOSTS given")
                })?;
            if ph.len() < 8 {
                return Err(format!(
                    "--secret-placeholder {name}: use at least 8 characters, so it cannot occur by chance"
                ));
            }
            s.placeholder = Some(ph.to_string());
        }
        for n in &self.in_body {
            named(&mut spec.secrets, "--secret-in-body", n)?.in_body = true;
        }
        for n in &self.allow_http {
            named(&mut spec.secrets, "--secret-allow-http", n)?.allow_http = true;
        }
        for c in &self.upstream_ca {
            if !c.is_file() {
                return Err(format!("--upstream-ca {}: no such file", c.display()));
            }
        }
        // Every rule checked now, before anything is pulled or booted.
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }
}

/// The secret a per-secret switch (`flag NAME`) names; it must be given by `--secret`.
fn named<'a>(
    secrets: &'a mut [SecretSpec],
    flag: &str,
    n: &str,
) -> Result<&'a mut SecretSpec, String> {
    secrets
        .iter_mut()
        .find(|s| s.name == n)
        .ok_or_else(|| format!("{flag} {n}: no --secret {n}@HOSTS given"))
}

/// `NAME:IP` (the IP may be IPv6, which has colons of its own).
pub fn parse_add_host(a: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = a
        .split_once(':')
        .ok_or_else(|| format!("--add-host {a}: expected NAME:IP"))?;
    let ip = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map_err(|_| format!("--add-host {a}: '{ip}' is not an IP address"))?;
    if name.is_empty() {
        return Err(format!("--add-host {a}: expected NAME:IP"));
    }
    Ok((name.to_string(), ip))
}

/// `NAME@HOSTS` or `NAME=VALUE@HOSTS` (the value may itself hold `@`: hosts follow the last).
pub fn parse_secret(
    s: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<SecretSpec, String> {
    let (head, hosts) = s.rsplit_once('@').ok_or_else(|| {
        format!(
            "--secret {}: say which hosts may receive it: NAME@HOST[,HOST...]",
            redact(s)
        )
    })?;
    let (name, value) = match head.split_once('=') {
        Some((n, v)) => (n.to_string(), v.to_string()),
        None => {
            let v = lookup(head).ok_or_else(|| {
                format!("--secret {head}@{hosts}: {head} is not set in this environment (export it, or use NAME=VALUE@HOSTS)")
            })?;
            (head.to_string(), v)
        }
    };
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "--secret: '{}' is not a valid variable name (letters, digits, _)",
            redact(&name)
        ));
    }
    if value.is_empty() {
        return Err(format!("--secret {name}: the value is empty"));
    }
    let hosts: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    if hosts.is_empty() {
        return Err(format!(
            "--secret {name}: say which hosts may receive it: {name}@HOST[,HOST...]"
        ));
    }
    Ok(SecretSpec {
        name,
        value,
        hosts,
        placeholder: None,
        in_body: false,
        allow_http: false,
    })
}

/// An error message must not echo a value: keep only what precedes `=`.
fn redact(s: &str) -> String {
    match s.split_once('=') {
        Some((n, _)) => format!("{n}=…"),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        let env = |n: &str| (n == "KEY").then(|| "from-env".to_string());
        let s = parse_secret("KEY@api.example.com,*.example.org", env).unwrap();
        assert_eq!(s.value, "from-env");
        assert_eq!(s.hosts, ["api.example.com", "*.example.org"]);
        let s = parse_secret("TOK=a@b=c@api.example.com", env).unwrap();
        assert_eq!((s.name.as_str(), s.value.as_str()), ("TOK", "a@b=c"));
        assert_eq!(s.hosts, ["api.example.com"]);
        for bad in ["KEY", "UNSET@h", "KEY@", "=v@h", "BAD-NAME=v@h", "K=@h"] {
            assert!(parse_secret(bad, env).is_err(), "{bad}");
        }
        // Errors never echo a value.
        let e = parse_secret("TOK=hunter2", env).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse_secret("B-D=hunter2@h", env).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn add_hosts() {
        assert_eq!(
            parse_add_host("api.test:127.0.0.1").unwrap(),
            ("api.test".into(), "127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_add_host("v6.test:::1").unwrap().1,
            "::1".parse::<IpAddr>().unwrap()
        );
        assert!(parse_add_host("api.test").is_err());
        assert!(parse_add_host("api.test:nope").is_err());
        assert!(parse_add_host(":1.2.3.4").is_err());
    }
}
