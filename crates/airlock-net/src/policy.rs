//! Allow rules and address checks: what the guest may reach.
//!
//! Rule syntax (`--allow-host`):
//! - `example.com` — that name, any TCP port; `example.com:22` — that port only;
//! - `*.example.com` — any name under it (not the apex itself);
//! - `*` — any public name (private, loopback, link-local, metadata ranges stay blocked);
//! - `203.0.113.7`, `[2001:db8::1]:443`, `198.51.100.0/24` — raw addresses, which no name
//!   rule (not even `*`) covers.
//!
//! Names are compared lowercase without a trailing dot.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// A rule that cannot be parsed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// Longest DNS name accepted (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;

/// Normalises a DNS name: lowercase, no trailing dot. `None` for names no rule can match
/// (empty, too long, empty labels, characters outside letters, digits, `-`, `_`).
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    for label in lower.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
    }
    Some(lower)
}

/// Which names a rule covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `*`: any name.
    Any,
    /// One name.
    Exact(String),
    /// `*.suffix`: names ending in `.suffix`.
    Suffix(String),
}

impl HostPattern {
    /// Whether `name` (already normalised) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(n) => n == name,
            HostPattern::Suffix(s) => {
                name.len() > s.len() + 1
                    && name.ends_with(s.as_str())
                    && name.as_bytes()[name.len() - s.len() - 1] == b'.'
            }
        }
    }
}

impl FromStr for HostPattern {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(rest) = s.strip_prefix("*.") {
            return normalize_name(rest)
                .map(HostPattern::Suffix)
                .ok_or_else(|| bad_host(s));
        }
        normalize_name(s)
            .map(HostPattern::Exact)
            .ok_or_else(|| bad_host(s))
    }
}

fn bad_host(s: &str) -> PolicyError {
    PolicyError(format!(
        "'{s}' is not a host name or pattern (use example.com, *.example.com, *, an IP or a CIDR)"
    ))
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(n) => f.write_str(n),
            HostPattern::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

/// What an allow rule names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuleTarget {
    /// Names.
    Host(HostPattern),
    /// Raw addresses.
    Net(IpNet),
}

/// One allow rule: a target and optionally one port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowRule {
    /// What it names.
    pub target: RuleTarget,
    /// The only port it allows (`None`: any).
    pub port: Option<u16>,
}

impl FromStr for AllowRule {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PolicyError("empty allow rule".into()));
        }
        // Bare address or CIDR (IPv6 included, which has colons of its own).
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(AllowRule {
                target: RuleTarget::Net(IpNet::from(ip)),
                port: None,
            });
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(AllowRule {
                target: RuleTarget::Net(net.trunc()),
                port: None,
            });
        }
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            return Ok(AllowRule {
                target: RuleTarget::Net(IpNet::from(sa.ip())),
                port: Some(nonzero_port(sa.port(), s)?),
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p.parse().map_err(|_| {
                    PolicyError(format!("'{s}': '{p}' is not a port number (1-65535)"))
                })?;
                (h, Some(nonzero_port(port, s)?))
            }
            None => (s, None),
        };
        if let Ok(net) = host.parse::<IpNet>() {
            return Ok(AllowRule {
                target: RuleTarget::Net(net.trunc()),
                port,
            });
        }
        if host.parse::<IpAddr>().is_ok() || looks_numeric(host) {
            return Err(PolicyError(format!(
                "'{s}' looks like an address but is not a valid one"
            )));
        }
        Ok(AllowRule {
            target: RuleTarget::Host(host.parse()?),
            port,
        })
    }
}

fn nonzero_port(p: u16, s: &str) -> Result<u16, PolicyError> {
    if p == 0 {
        Err(PolicyError(format!("'{s}': port 0 is not a port")))
    } else {
        Ok(p)
    }
}

/// Names made only of digits and dots are address forms (`1.2.3`, `0x7f.1`), never names.
fn looks_numeric(s: &str) -> bool {
    let last = s.rsplit('.').next().unwrap_or(s);
    !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || (last.len() > 2
                && last[..2].eq_ignore_ascii_case("0x")
                && last[2..].bytes().all(|b| b.is_ascii_hexdigit())))
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.target, self.port) {
            (RuleTarget::Host(h), None) => write!(f, "{h}"),
            (RuleTarget::Host(h), Some(p)) => write!(f, "{h}:{p}"),
            (RuleTarget::Net(n), p) => {
                let s = if n.prefix_len() == n.max_prefix_len() {
                    n.addr().to_string()
                } else {
                    n.to_string()
                };
                match (p, n.addr()) {
                    (None, _) => f.write_str(&s),
                    (Some(p), IpAddr::V6(_)) => write!(f, "[{s}]:{p}"),
                    (Some(p), IpAddr::V4(_)) => write!(f, "{s}:{p}"),
                }
            }
        }
    }
}

impl AllowRule {
    fn port_ok(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

/// Why an address may not be dialled, unless explicitly allowed; `None` for public addresses.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [169, 254, 169, 254] => "cloud metadata address",
        [0, ..] => "'this network' address",
        [10, ..] => "private address",
        [100, b, ..] if (64..128).contains(&b) => "carrier-grade NAT address",
        [127, ..] => "loopback address",
        [169, 254, ..] => "link-local address",
        [172, b, ..] if (16..32).contains(&b) => "private address",
        [192, 0, 0, _] => "IETF protocol assignment",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation address",
        [192, 168, ..] => "private address",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking address",
        [a, ..] if (224..240).contains(&a) => "multicast address",
        [a, ..] if a >= 240 => "reserved address",
        _ => return None,
    })
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(special_v4(v4).unwrap_or("IPv4-mapped address"));
    }
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 1] => "loopback address",
        [0, 0, 0, 0, 0, 0, 0, 0] => "unspecified address",
        [0x64, 0xff9b, ..] => "NAT64 address",
        [0, 0, 0, 0, 0, 0, ..] => "IPv4-compatible address",
        [a, ..] if a & 0xfe00 == 0xfc00 => "unique local address",
        [a, ..] if a & 0xffc0 == 0xfe80 => "link-local address",
        [a, ..] if a & 0xff00 == 0xff00 => "multicast address",
        [0x2001, 0xdb8, ..] => "documentation address",
        [0x2002, ..] => "6to4 address",
        [0x2001, 0, ..] => "Teredo address",
        _ => return None,
    })
}

/// The allow rules of one sandbox, plus pinned names and private ranges the user opened.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<AllowRule>,
    pins: HashMap<String, IpAddr>,
    allow_private: Vec<IpNet>,
}

/// A verdict on a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by this rule (its display form).
    Allow(String),
    /// Blocked, with the reason.
    Deny(String),
}

impl Policy {
    /// A policy from rule strings, `NAME:IP` pins and private CIDRs; errors say which input is bad.
    pub fn new(
        rules: &[String],
        pins: &[(String, IpAddr)],
        allow_private: &[String],
    ) -> Result<Policy, PolicyError> {
        let mut p = Policy::default();
        for r in rules {
            p.allow(r)?;
        }
        for (name, ip) in pins {
            let n = normalize_name(name)
                .ok_or_else(|| PolicyError(format!("--add-host: '{name}' is not a host name")))?;
            p.pins.insert(n, *ip);
        }
        for c in allow_private {
            let net = c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    PolicyError(format!(
                        "--allow-private: '{c}' is not a CIDR (e.g. 10.1.0.0/16)"
                    ))
                })?;
            p.allow_private.push(net.trunc());
        }
        Ok(p)
    }

    /// Adds a rule (no-op if present). Returns the parsed rule.
    pub fn allow(&mut self, rule: &str) -> Result<AllowRule, PolicyError> {
        let r: AllowRule = rule.parse()?;
        if !self.rules.contains(&r) {
            self.rules.push(r.clone());
        }
        Ok(r)
    }

    /// Removes a rule; whether it was there.
    pub fn remove(&mut self, rule: &str) -> Result<bool, PolicyError> {
        let r: AllowRule = rule.parse()?;
        let before = self.rules.len();
        self.rules.retain(|x| x != &r);
        Ok(self.rules.len() != before)
    }

    /// The rules, in the order added.
    pub fn rules(&self) -> &[AllowRule] {
        &self.rules
    }

    /// Whether no rule exists (nothing leaves the VM).
    pub fn is_sealed(&self) -> bool {
        self.rules.is_empty()
    }

    /// The address `name` is pinned to (`--add-host`).
    pub fn pinned(&self, name: &str) -> Option<IpAddr> {
        self.pins.get(name).copied()
    }

    /// Whether any rule covers `name` on some port (decides DNS answers).
    pub fn name_allowed(&self, name: &str) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(&r.target, RuleTarget::Host(h) if h.matches(name)))
    }

    /// Verdict on a connection to `name:port` (before resolving it).
    pub fn check_name(&self, name: &str, port: u16) -> Verdict {
        match self.rules.iter().find(|r| {
            matches!(&r.target, RuleTarget::Host(h) if h.matches(name)) && r.port_ok(port)
        }) {
            Some(r) => Verdict::Allow(r.to_string()),
            None if self.name_allowed(name) => {
                Verdict::Deny(format!("port {port} of {name} is not allowed"))
            }
            None => Verdict::Deny(format!("{name} is not an allowed host")),
        }
    }

    /// Whether an upstream address that `name` resolved to may be dialled: public addresses
    /// yes; special ranges only when pinned for that name or inside `--allow-private`.
    pub fn check_resolved(&self, name: &str, ip: IpAddr) -> Result<(), String> {
        if self.pinned(name) == Some(ip) {
            return Ok(());
        }
        match special_range(ip) {
            Some(why) if !self.private_allowed(ip) => Err(format!(
                "{name} resolved to {ip}, a {why} (allow with --allow-private or --add-host)"
            )),
            _ => Ok(()),
        }
    }

    fn private_allowed(&self, ip: IpAddr) -> bool {
        self.allow_private.iter().any(|n| n.contains(&ip))
    }

    /// Verdict on a connection to a raw address (not handed out by Airlock's DNS): only rules
    /// naming the address or a range holding it allow it, and special ranges additionally
    /// need `--allow-private` unless the rule names exactly that address.
    pub fn check_ip(&self, ip: IpAddr, port: u16) -> Verdict {
        let Some(r) = self.rules.iter().find(|r| {
            matches!(&r.target, RuleTarget::Net(n) if n.contains(&ip)) && r.port_ok(port)
        }) else {
            return Verdict::Deny(format!(
                "{ip}:{port} is a raw address no rule allows (allow the host name, or the address itself)"
            ));
        };
        let exact = matches!(&r.target, RuleTarget::Net(n) if n.prefix_len() == n.max_prefix_len());
        match special_range(ip) {
            Some(why) if !exact && !self.private_allowed(ip) => Verdict::Deny(format!(
                "{ip} is a {why}; rule {r} covers it only with --allow-private"
            )),
            _ => Verdict::Allow(r.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(rules: &[&str]) -> Policy {
        Policy::new(
            &rules.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &[],
            &[],
        )
        .unwrap()
    }

    #[test]
    fn parses_rules() {
        for (s, disp) in [
            ("Example.COM.", "example.com"),
            ("github.com:22", "github.com:22"),
            ("*.github.com", "*.github.com"),
            ("*", "*"),
            ("*:443", "*:443"),
            ("1.2.3.4", "1.2.3.4"),
            ("1.2.3.4:80", "1.2.3.4:80"),
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ] {
            assert_eq!(s.parse::<AllowRule>().unwrap().to_string(), disp, "{s}");
        }
        for bad in [
            "",
            "a..b",
            "host:0",
            "host:99999",
            "host:x",
            "*.",
            "a b",
            "1.2.3",
            "0x7f.1",
            "300.1.1.1",
            "exa$mple.com",
            &"a".repeat(300),
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn host_patterns() {
        let p = pol(&["api.example.com", "*.github.com", "gitlab.com:22"]);
        assert!(matches!(
            p.check_name("api.example.com", 443),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            p.check_name("x.api.example.com", 443),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            p.check_name("raw.github.com", 1),
            Verdict::Allow(_)
        ));
        assert!(matches!(p.check_name("github.com", 443), Verdict::Deny(_)));
        assert!(matches!(
            p.check_name("evilgithub.com", 443),
            Verdict::Deny(_)
        ));
        assert!(matches!(p.check_name("gitlab.com", 22), Verdict::Allow(_)));
        assert!(matches!(p.check_name("gitlab.com", 443), Verdict::Deny(_)));
        assert!(p.name_allowed("gitlab.com"));
        assert!(!p.name_allowed("example.com"));
    }

    #[test]
    fn special_ranges() {
        for ip in [
            "169.254.169.254",
            "127.0.0.1",
            "10.1.1.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(special_range(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111"] {
            assert!(special_range(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }

    #[test]
    fn raw_ips_need_an_address_rule() {
        let p = pol(&["*", "203.0.113.9:443", "10.0.0.0/8"]);
        assert!(matches!(
            p.check_ip("8.8.8.8".parse().unwrap(), 443),
            Verdict::Deny(_)
        ));
        // An exact address rule is explicit enough, even for a special range.
        assert!(matches!(
            p.check_ip("203.0.113.9".parse().unwrap(), 443),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            p.check_ip("203.0.113.9".parse().unwrap(), 80),
            Verdict::Deny(_)
        ));
        // A private range needs --allow-private as well.
        assert!(matches!(
            p.check_ip("10.0.0.1".parse().unwrap(), 80),
            Verdict::Deny(_)
        ));
        let p = Policy::new(&["10.0.0.0/8".into()], &[], &["10.0.0.0/16".into()]).unwrap();
        assert!(matches!(
            p.check_ip("10.0.0.1".parse().unwrap(), 80),
            Verdict::Allow(_)
        ));
        assert!(matches!(
            p.check_ip("10.1.0.1".parse().unwrap(), 80),
            Verdict::Deny(_)
        ));
    }

    #[test]
    fn resolved_addresses() {
        let p = Policy::new(
            &["*".into()],
            &[("pinned.test".into(), "127.0.0.1".parse().unwrap())],
            &["192.168.7.0/24".into()],
        )
        .unwrap();
        assert!(p
            .check_resolved("a.com", "93.184.216.34".parse().unwrap())
            .is_ok());
        assert!(p
            .check_resolved("a.com", "169.254.169.254".parse().unwrap())
            .is_err());
        assert!(p
            .check_resolved("pinned.test", "127.0.0.1".parse().unwrap())
            .is_ok());
        assert!(p
            .check_resolved("a.com", "127.0.0.1".parse().unwrap())
            .is_err());
        assert!(p
            .check_resolved("a.com", "192.168.7.3".parse().unwrap())
            .is_ok());
    }

    #[test]
    fn runtime_changes() {
        let mut p = pol(&[]);
        assert!(p.is_sealed());
        p.allow("example.com").unwrap();
        p.allow("example.com").unwrap();
        assert_eq!(p.rules().len(), 1);
        assert!(p.remove("EXAMPLE.com.").unwrap());
        assert!(p.is_sealed());
        assert!(!p.remove("example.com").unwrap());
    }
}
