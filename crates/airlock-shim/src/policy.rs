//! Airlock policy from OCI annotations (`airlock.io/...`), parsed with the CLI's own rules
//! (`--allow-host`, `--add-host`, `--secret`) and validated as `airlock run` validates them,
//! before a VM boots.

use std::collections::HashMap;

use airlock_sandbox::NetworkSpec;

use crate::error::ShimError;

// The CLI's parsers for `--add-host NAME:IP` and `--secret NAME@HOSTS`, shared verbatim.
#[allow(dead_code)]
#[path = "../../airlock/src/netargs.rs"]
mod netargs;

/// The annotation prefix the shim owns; any other key under it is refused.
pub const PREFIX: &str = "airlock.io/";
/// Comma list of allow rules (`host`, `*.domain`, `host:port`, IP, CIDR).
pub const ALLOW_HOSTS: &str = "airlock.io/allow-hosts";
/// Comma list of `NAME:IP` pins.
pub const ADD_HOSTS: &str = "airlock.io/add-hosts";
/// `NAME@HOST[,HOST...]` entries separated by `;`: the value of the container's env var NAME
/// is the secret, the guest sees a placeholder.
pub const SECRETS: &str = "airlock.io/secrets";
/// Guest RAM in MiB (`1024`, `1024Mi`, `2Gi`).
pub const MEMORY: &str = "airlock.io/memory";
/// Virtual CPUs.
pub const CPUS: &str = "airlock.io/cpus";

const KNOWN: &[&str] = &[ALLOW_HOSTS, ADD_HOSTS, SECRETS, MEMORY, CPUS];

/// What a pod's annotations ask of its VM.
#[derive(Debug, Default)]
pub struct Policy {
    /// The sealed network (default: nothing reachable).
    pub network: NetworkSpec,
    /// Guest RAM, MiB.
    pub memory_mib: Option<u32>,
    /// Virtual CPUs.
    pub cpus: Option<u32>,
}

impl Policy {
    /// Names of the env vars holding secrets (dropped from the container's env: the guest
    /// gets their placeholders instead).
    pub fn secret_names(&self) -> Vec<String> {
        self.network
            .secrets
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }
}

fn bad(key: &str, why: impl std::fmt::Display) -> ShimError {
    ShimError::Invalid(format!("annotation {key}: {why}"))
}

fn list(v: &str, sep: char) -> impl Iterator<Item = &str> {
    v.split(sep).map(str::trim).filter(|s| !s.is_empty())
}

/// The policy in `annotations`; secret values come from `env` (the container's environment).
pub fn from_annotations(
    annotations: &HashMap<String, String>,
    env: &[(String, String)],
) -> Result<Policy, ShimError> {
    let mut keys: Vec<&String> = annotations
        .keys()
        .filter(|k| k.starts_with(PREFIX))
        .collect();
    keys.sort();
    if let Some(k) = keys.iter().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(
            k,
            format!("unknown Airlock annotation (known: {})", KNOWN.join(", ")),
        ));
    }
    let get = |k: &str| annotations.get(k).map(String::as_str);
    let mut p = Policy::default();
    if let Some(v) = get(ALLOW_HOSTS) {
        p.network.allow_hosts = list(v, ',').map(str::to_string).collect();
    }
    if let Some(v) = get(ADD_HOSTS) {
        for a in list(v, ',') {
            p.network
                .add_hosts
                .push(netargs::parse_add_host(a).map_err(|e| bad(ADD_HOSTS, e))?);
        }
    }
    if let Some(v) = get(SECRETS) {
        for s in list(v, ';') {
            // An inline value would sit in the bundle's config.json on disk: refused.
            let head = s.rsplit_once('@').map_or(s, |(h, _)| h);
            if head.contains('=') {
                return Err(bad(
                    SECRETS,
                    "give NAME@HOSTS and the value in the container's env var NAME (inline values would be stored in the spec)",
                ));
            }
            let lookup = |n: &str| {
                env.iter()
                    .rev()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            let spec = netargs::parse_secret(s, lookup).map_err(|e| {
                // The CLI's message talks about its own environment and flags.
                if e.contains("is not set") {
                    bad(
                        SECRETS,
                        format!("{head} is not set in the container's environment"),
                    )
                } else {
                    bad(SECRETS, e)
                }
            })?;
            if spec.value.is_empty() {
                return Err(bad(
                    SECRETS,
                    format!("{head} is empty in the container's environment"),
                ));
            }
            p.network.secrets.push(spec);
        }
    }
    if let Some(v) = get(MEMORY) {
        p.memory_mib = Some(parse_mib(v).map_err(|e| bad(MEMORY, e))?);
    }
    if let Some(v) = get(CPUS) {
        let n: u32 = v
            .trim()
            .parse()
            .map_err(|_| bad(CPUS, format!("{v:?} is not a whole number of CPUs")))?;
        if !(1..=64).contains(&n) {
            return Err(bad(CPUS, format!("{n}: give 1 to 64")));
        }
        p.cpus = Some(n);
    }
    // The same checks as `airlock run`: rules, pins, secret hosts.
    p.network
        .validate()
        .map_err(|e| ShimError::Invalid(format!("airlock.io annotations: {e}")))?;
    Ok(p)
}

/// Checks the annotations' syntax and rules without the container's environment (a CRI pod
/// sandbox has none: secret values come from its first container).
pub fn check_syntax(annotations: &HashMap<String, String>) -> Result<(), ShimError> {
    let names: Vec<(String, String)> = annotations
        .get(SECRETS)
        .map(|v| {
            list(v, ';')
                .filter_map(|s| s.rsplit_once('@').map(|(h, _)| h.to_string()))
                .map(|n| (n, "syntax-check-only".to_string()))
                .collect()
        })
        .unwrap_or_default();
    from_annotations(annotations, &names).map(drop)
}

/// `512`, `512Mi`, `512M`, `2Gi`, `2G` → MiB, 64 MiB to 1 TiB.
fn parse_mib(v: &str) -> Result<u32, String> {
    let v = v.trim();
    let (num, mul) = if let Some(n) = v.strip_suffix("Gi").or_else(|| v.strip_suffix('G')) {
        (n, 1024u64)
    } else if let Some(n) = v.strip_suffix("Mi").or_else(|| v.strip_suffix('M')) {
        (n, 1)
    } else {
        (v, 1)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{v:?}: give MiB, like 1024 or 1Gi"))?;
    let mib = n.saturating_mul(mul);
    if !(64..=1 << 20).contains(&mib) {
        return Err(format!("{v}: give 64 MiB to 1 TiB"));
    }
    Ok(mib as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_every_annotation() {
        let env = vec![("KEY".to_string(), "real-value".to_string())];
        let p = from_annotations(
            &ann(&[
                (ALLOW_HOSTS, "api.test, *.example.com"),
                (ADD_HOSTS, "api.test:127.0.0.1"),
                (SECRETS, "KEY@api.test"),
                (MEMORY, "1Gi"),
                (CPUS, "2"),
                ("other.io/x", "ignored"),
            ]),
            &env,
        )
        .unwrap();
        assert_eq!(p.network.allow_hosts, vec!["api.test", "*.example.com"]);
        assert_eq!(p.network.add_hosts[0].0, "api.test");
        assert_eq!(p.network.secrets[0].value, "real-value");
        assert_eq!(p.network.secrets[0].hosts, vec!["api.test"]);
        assert_eq!((p.memory_mib, p.cpus), (Some(1024), Some(2)));
        assert_eq!(p.secret_names(), vec!["KEY"]);
    }

    #[test]
    fn refuses_bad_input_clearly() {
        let env = vec![("KEY".to_string(), "v".to_string())];
        for (pairs, want) in [
            (
                vec![("airlock.io/allow-host", "x")],
                "unknown Airlock annotation",
            ),
            (vec![(ADD_HOSTS, "nohost")], "NAME:IP"),
            (vec![(ADD_HOSTS, "a:notanip")], "not an IP"),
            (vec![(SECRETS, "KEY")], "which hosts"),
            (vec![(SECRETS, "KEY=inline@h.test")], "inline"),
            (
                vec![(SECRETS, "MISSING@h.test")],
                "not set in the container",
            ),
            (vec![(MEMORY, "lots")], "MiB"),
            (vec![(MEMORY, "1")], "64 MiB"),
            (vec![(CPUS, "0")], "1 to 64"),
            (vec![(ALLOW_HOSTS, "a b")], "airlock.io annotations"),
        ] {
            let e = from_annotations(&ann(&pairs), &env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{pairs:?}: {e}");
            // No message ever carries a secret value.
            assert!(!e.contains("inline@h.test"), "{e}");
        }
    }
}
