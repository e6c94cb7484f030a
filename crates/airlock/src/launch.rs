//! Turning user-level sandbox settings (CLI flags of `run -d`, or a JSON-RPC `create`) into a
//! [`SandboxSpec`], and the `airlock rpc` launcher.

use std::sync::Arc;

use airlock_rpc::server::{LaunchFuture, Launcher};
use airlock_rpc::wire::{self, RpcError};
use airlock_sandbox::{NetworkSpec, RootfsSource, Sandbox, SandboxSpec, SecretSpec};
use serde::{Deserialize, Serialize};

/// Everything needed to start a sandbox, as the supervisor receives it on its stdin (never in
/// argv or the environment: it holds secret values).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Launch {
    /// Image reference.
    pub image: Option<String>,
    /// Or a root filesystem path.
    pub rootfs: Option<std::path::PathBuf>,
    /// Platform to pull.
    pub platform: Option<String>,
    /// Registries reachable over plain HTTP.
    #[serde(default)]
    pub insecure_registry: Vec<String>,
    /// vCPUs.
    pub cpus: u32,
    /// RAM MiB.
    pub memory_mib: u32,
    /// Writable layer MiB.
    pub disk_mib: u64,
    /// Forced accelerator.
    pub accel: Option<String>,
    /// Hostname.
    pub hostname: Option<String>,
    /// Extra kernel words.
    #[serde(default)]
    pub kernel_args: Vec<String>,
    /// Boot instead of restoring a warm-start template.
    #[serde(default)]
    pub cold: bool,
    /// Start from this snapshot instead of an image.
    #[serde(default)]
    pub from: Option<String>,
    /// Network policy (secrets included).
    #[serde(default)]
    pub net: Net,
    /// Workspace mounts and volumes, as `-v` takes them.
    #[serde(default)]
    pub mounts: Vec<String>,
    /// File rules, as `--fs-rule` takes them.
    #[serde(default)]
    pub fs_rules: Vec<String>,
    /// `--share-quota` (default: the library's).
    #[serde(default)]
    pub share_quota_mib: Option<u64>,
    /// `--privileged`.
    #[serde(default)]
    pub privileged: bool,
}

/// Adds `-v` mounts and `--fs-rule` rules (their CLI text) to `spec`.
pub fn apply_mounts(
    spec: &mut SandboxSpec,
    mounts: &[String],
    rules: &[String],
) -> Result<(), String> {
    for m in mounts {
        match m.parse::<airlock_sandbox::Mount>()? {
            airlock_sandbox::Mount::Share(s) => spec.shares.push(s),
            airlock_sandbox::Mount::Volume(v) => spec.volumes.push(v),
        }
    }
    for r in rules {
        spec.fs_rules.push(
            r.parse::<airlock_sandbox::FsRule>()
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(())
}

/// uid:gid that owns shared files inside: the command's user when numeric, or found in the
/// `--rootfs` directory's /etc/passwd and /etc/group; otherwise root.
pub fn share_owner(user: Option<&str>, rootfs: Option<&std::path::Path>) -> (u32, u32) {
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return (0, 0);
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, Option<u32>)> {
        let text = std::fs::read_to_string(rootfs?.join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| {
                let id = f.get(field)?.parse().ok()?;
                Some((id, f.get(3).and_then(|g| g.parse().ok())))
            })?
        })
    };
    let (uid, pgid) = match u.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => match lookup("etc/passwd", u, 2) {
            Some((n, g)) => (n, g),
            None => {
                tracing::warn!(
                    "cannot resolve user {u} on the host: shared files appear owned by root"
                );
                return (0, 0);
            }
        },
    };
    let gid = match g {
        Some(g) => g
            .parse::<u32>()
            .ok()
            .or_else(|| lookup("etc/group", g, 2).map(|(n, _)| n))
            .unwrap_or(uid),
        None => pgid.unwrap_or(uid),
    };
    (uid, gid)
}

/// The network part of a [`Launch`]: the sandbox API's own typed spec, checked with
/// [`NetworkSpec::validate`] before anything is pulled or booted.
pub type Net = NetworkSpec;

/// One secret (its value lives only in memory and on the supervisor's stdin pipe).
pub type Secret = SecretSpec;

impl Launch {
    /// The sandbox spec (resolving, and pulling if needed, the image).
    pub async fn spec(&self) -> Result<SandboxSpec, String> {
        // The network first: a malformed rule or secret is reported before any pull.
        self.net.validate().map_err(|e| e.to_string())?;
        let rootfs = match (&self.rootfs, &self.image) {
            (Some(p), _) => RootfsSource::from_path(p).map_err(|e| e.to_string())?,
            (None, Some(name)) => {
                let (store, rec) = match crate::image::resolve(name)? {
                    Some(f) => f,
                    None => {
                        crate::image::pull(name, self.platform.as_deref(), &self.insecure_registry)
                            .await?;
                        crate::image::resolve(name)?
                            .ok_or_else(|| format!("{name}: not in the store after pulling"))?
                    }
                };
                RootfsSource::Oci {
                    store: store.root().to_path_buf(),
                    image: Box::new(rec),
                }
            }
            // The root comes from the snapshot; this placeholder is never opened.
            (None, None) if self.from.is_some() => RootfsSource::Dir("/".into()),
            (None, None) => return Err("give an image or a root filesystem".into()),
        };
        let mut spec = SandboxSpec::new(rootfs);
        spec.cpus = self.cpus;
        spec.memory_mib = self.memory_mib;
        spec.disk_mib = self.disk_mib;
        spec.hostname = self.hostname.clone();
        spec.privileged = self.privileged;
        spec.kernel_args = self.kernel_args.clone();
        spec.cold = self.cold;
        spec.from_snapshot = self.from.clone();
        spec.accel = match &self.accel {
            Some(a) => Some(a.parse().map_err(|e: String| e)?),
            None => None,
        };
        apply_mounts(&mut spec, &self.mounts, &self.fs_rules)?;
        if let Some(q) = self.share_quota_mib {
            spec.share_quota_mib = q;
        }
        spec.network = self.net.clone();
        Ok(spec)
    }

    /// A [`Launch`] from matchlock `create` parameters.
    pub fn from_create(p: wire::CreateParams) -> Result<Launch, RpcError> {
        let bad = RpcError::params;
        if p.network.as_ref().is_some_and(|n| n.interception.is_some())
            || p.vfs.as_ref().is_some_and(|v| v.interception.is_some())
        {
            return Err(bad(
                "network and VFS interception hooks are not supported by Airlock",
            ));
        }
        let cpus = match p.resources.cpus {
            Some(c) if !(c > 0.0 && c <= 64.0) => return Err(bad("cpus must be in (0, 64]")),
            Some(c) => c.ceil() as u32,
            None => airlock_sandbox::DEFAULT_CPUS,
        };
        let net = p.network.unwrap_or_default();
        let mut mounts = Vec::new();
        if let Some(v) = &p.vfs {
            for (guest, cfg) in &v.mounts {
                // matchlock's shape: {type: host_fs | overlay | memory, host_path, readonly}.
                let ty = cfg["type"].as_str().unwrap_or("memory");
                let host = cfg["host_path"].as_str().unwrap_or("");
                let ro = cfg["readonly"].as_bool().unwrap_or(false);
                mounts.push(match ty {
                    "host_fs" if !host.is_empty() => {
                        format!("{host}:{guest}:{}", if ro { "ro" } else { "rw" })
                    }
                    "overlay" if !host.is_empty() => format!("{host}:{guest}"),
                    _ => {
                        return Err(RpcError::params(format!(
                            "mount {guest}: type {ty:?} is not supported: Airlock shares host directories (host_fs with host_path, or overlay)"
                        )))
                    }
                });
            }
        }
        Ok(Launch {
            image: (!p.image.is_empty()).then_some(p.image),
            rootfs: p.rootfs.map(Into::into),
            platform: Some("linux/amd64".into()),
            insecure_registry: Vec::new(),
            cpus,
            memory_mib: p
                .resources
                .memory_mb
                .unwrap_or(airlock_sandbox::DEFAULT_MEMORY_MIB),
            disk_mib: p
                .resources
                .disk_size_mb
                .unwrap_or(airlock_sandbox::DEFAULT_DISK_MIB),
            accel: None,
            hostname: p.hostname.or(net.hostname.clone()),
            privileged: p.privileged,
            kernel_args: Vec::new(),
            cold: false,
            from: None,
            net: Net {
                disabled: net.no_network,
                allow_hosts: net.allowed_hosts,
                add_hosts: net
                    .add_hosts
                    .into_iter()
                    .map(|h| match h.ip.parse() {
                        Ok(ip) => Ok((h.host, ip)),
                        Err(_) => Err(RpcError::params(format!(
                            "add_hosts {}: {:?} is not an IP address",
                            h.host, h.ip
                        ))),
                    })
                    .collect::<Result<_, _>>()?,
                // block_private_ips=false opens every private range, as matchlock.
                allow_private: if net.block_private_ips == Some(false)
                    && net.allow_private.is_empty()
                {
                    vec!["0.0.0.0/0".into(), "::/0".into()]
                } else {
                    net.allow_private
                },
                secrets: net
                    .secrets
                    .into_iter()
                    .map(|(name, s)| Secret {
                        name,
                        value: s.value,
                        hosts: s.hosts,
                        placeholder: s.placeholder,
                        in_body: s.in_body,
                        allow_http: s.allow_http,
                    })
                    .collect(),
                upstream_ca: Vec::new(),
                audit_file: None,
            },
            mounts,
            fs_rules: Vec::new(),
            share_quota_mib: None,
        })
    }
}

/// `airlock rpc`'s launcher: sandboxes live in the rpc process itself, as matchlock's do.
pub struct RpcLauncher;

impl Launcher for RpcLauncher {
    fn launch(&self, params: wire::CreateParams) -> LaunchFuture {
        Box::pin(async move {
            let l = Launch::from_create(params)?;
            let spec = l
                .spec()
                .await
                .map_err(|e| RpcError::new(wire::VM_FAILED, e))?;
            Sandbox::start(spec)
                .await
                .map_err(|e| RpcError::new(wire::VM_FAILED, e.to_string()))
        })
    }
}

/// `airlock rpc`: JSON-RPC over stdio until stdin ends or `close`.
pub async fn rpc() -> i32 {
    let shared = airlock_rpc::server::Shared::rpc(Arc::new(RpcLauncher));
    let stdin = tokio::io::BufReader::with_capacity(256 * 1024, tokio::io::stdin());
    airlock_rpc::server::serve(shared, stdin, tokio::io::stdout()).await;
    0
}
