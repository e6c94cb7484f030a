//! What a sandbox may reach: the sealed-network part of a [`crate::SandboxSpec`].

use std::path::PathBuf;

/// Network policy of a sandbox. The default is sealed: a NIC whose only reachable peer is
/// Airlock itself (DNS answers NXDOMAIN, every connection is refused).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct NetworkSpec {
    /// No NIC at all (port forwards over the control channel still work).
    pub disabled: bool,
    /// Allow rules: `host`, `*.domain`, `host:port`, `*`, an IP, a CIDR, `IP:port`.
    pub allow_hosts: Vec<String>,
    /// Names pinned to addresses (`--add-host NAME:IP`); a pinned address may be private.
    pub add_hosts: Vec<(String, std::net::IpAddr)>,
    /// Private ranges upstream names may resolve to (`--allow-private CIDR`).
    pub allow_private: Vec<String>,
    /// Secrets: the guest sees only the placeholder; Airlock swaps in the value in flight.
    pub secrets: Vec<SecretSpec>,
    /// Extra PEM roots trusted for upstream TLS (beyond the host's).
    pub upstream_ca: Vec<PathBuf>,
    /// Append audit events as JSON lines to this file.
    pub audit_file: Option<PathBuf>,
}

/// One secret. Its value lives only in this process's memory.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SecretSpec {
    /// Environment variable name the guest sees (holding the placeholder).
    pub name: String,
    /// The real value. Never logged, never written anywhere, never sent to the guest.
    pub value: String,
    /// Host patterns the value may be sent to (same syntax as allow rules).
    pub hosts: Vec<String>,
    /// The placeholder the guest sees (default: generated per sandbox).
    #[serde(default)]
    pub placeholder: Option<String>,
    /// Also substitute inside request bodies (off by default).
    #[serde(default)]
    pub in_body: bool,
    /// Also substitute over plain HTTP (off by default: refused with a 403).
    #[serde(default)]
    pub allow_http: bool,
}

impl std::fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSpec")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .field("placeholder", &self.placeholder)
            .field("in_body", &self.in_body)
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// The netstack for `spec` (CA generated, rules checked), not yet attached to a NIC.
pub(crate) fn build(spec: &NetworkSpec) -> Result<airlock_net::Network, crate::Error> {
    let cfg = airlock_net::NetworkConfig {
        allow_hosts: spec.allow_hosts.clone(),
        add_hosts: spec.add_hosts.clone(),
        allow_private: spec.allow_private.clone(),
        secrets: spec.net_secrets()?,
        upstream_ca: spec.upstream_ca.clone(),
        audit_file: spec.audit_file.clone(),
    };
    airlock_net::Network::new(cfg).map_err(crate::Error::from)
}

impl NetworkSpec {
    /// Checks everything [`crate::Sandbox::start`] would refuse about the network (allow
    /// rules, pinned names, private ranges, secrets and their hosts, placeholders, CA files),
    /// without starting anything: callers run it before pulling an image or booting, so a
    /// typo costs nothing.
    pub fn validate(&self) -> Result<(), crate::Error> {
        let setup = |e: String| crate::Error::Setup(e);
        if self.disabled && (!self.allow_hosts.is_empty() || !self.secrets.is_empty()) {
            return Err(setup(
                "--no-network cannot be combined with allowed hosts or secrets".into(),
            ));
        }
        airlock_net::Policy::new(&self.allow_hosts, &self.add_hosts, &self.allow_private)
            .map_err(|e| setup(e.to_string()))?;
        airlock_net::secrets::Secrets::new(self.net_secrets()?)
            .map_err(|e| setup(e.to_string()))?;
        for c in &self.upstream_ca {
            if !c.is_file() {
                return Err(setup(format!("upstream CA {}: no such file", c.display())));
            }
        }
        Ok(())
    }

    /// The secrets as the netstack takes them (host patterns parsed).
    fn net_secrets(&self) -> Result<Vec<airlock_net::Secret>, crate::Error> {
        self.secrets
            .iter()
            .map(|s| {
                let hosts = s
                    .hosts
                    .iter()
                    .map(|h| h.parse::<airlock_net::HostPattern>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| crate::Error::Setup(format!("secret {}: {e}", s.name)))?;
                Ok(airlock_net::Secret {
                    name: s.name.clone(),
                    value: s.value.clone(),
                    hosts,
                    placeholder: s.placeholder.clone(),
                    in_body: s.in_body,
                    allow_http: s.allow_http,
                })
            })
            .collect()
    }
}

/// What the guest agent configures its NIC with.
pub(crate) fn guest_config() -> airlock_proto::NetInit {
    use airlock_net::stack;
    airlock_proto::NetInit {
        address: stack::GUEST,
        prefix: stack::PREFIX,
        gateway: stack::GATEWAY,
        mtu: stack::MTU as u32,
    }
}
