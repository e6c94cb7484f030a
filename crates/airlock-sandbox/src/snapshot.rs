//! User snapshots: a running sandbox captured whole (memory, device state, writable layer) under
//! a name, and sandboxes started from it.
//!
//! `<cache>/snapshots/<name>/` holds `state` (QEMU's migration stream, guest RAM included: a
//! sandbox's RAM is not in a file the snapshot could keep), `scratch.ext4` and
//! `manifest.json`. The source keeps running. A sandbox started from a snapshot is told it
//! resumed ([`airlock_proto::Resume`]): it gets a new id, hostname, machine-id, RNG seed,
//! clock, network stack and CA; its processes and files are the snapshot's; streams of the old
//! host (a running exec's output) are dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_backend::{Accel, Backend, NicConfig, VmConfig};
use serde::{Deserialize, Serialize};

use crate::{conn, network, qmp, state, template, Error, Sandbox, SandboxSpec};

/// How a sandbox was launched: what a snapshot of it must reproduce.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LaunchInfo {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub base: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    pub nic: bool,
    pub cmdline: String,
    pub accel: String,
    /// Shares or volumes: vhost-user-fs cannot migrate, a volume is one sandbox's at a time.
    pub pinned: Option<String>,
    /// `--privileged`: without it the agent gave up the dangerous capabilities for good.
    #[serde(default)]
    pub privileged: bool,
}

/// `manifest.json` of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Id of the sandbox it was taken from.
    pub source: String,
    /// When, seconds since the epoch.
    pub created_unix: u64,
    /// Guest kernel release.
    pub kernel_release: String,
    #[serde(flatten)]
    launch: LaunchInfo,
    first_stream: u32,
    state_size: u64,
    scratch_size: u64,
}

impl SnapshotInfo {
    /// Virtual CPUs of the snapshotted sandbox.
    pub fn cpus(&self) -> u32 {
        self.launch.cpus
    }
    /// Its guest RAM, MiB.
    pub fn memory_mib(&self) -> u32 {
        self.launch.memory_mib
    }
}

/// `<cache>/snapshots`.
pub fn snapshots_dir() -> PathBuf {
    crate::assets::cache_dir().join("snapshots")
}

/// Why a snapshot could not be taken, found or started.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The name is not a valid snapshot name.
    #[error("snapshot name {0:?}: use 1-64 letters, digits, '.', '_' or '-' (not a leading '.')")]
    BadName(String),
    /// No snapshot has this name.
    #[error("no snapshot named {0} (take one with: airlock snapshot ID {0})")]
    NotFound(String),
    /// A snapshot of this name exists already.
    #[error("a snapshot named {0} exists: remove it first (airlock snapshot --rm {0})")]
    Exists(String),
    /// Its files are unreadable or incomplete.
    #[error("snapshot {name} is damaged ({why}): remove it with airlock snapshot --rm {name}")]
    Damaged {
        /// The snapshot.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A kernel, initrd or image it was taken on is gone.
    #[error("snapshot {name} needs {} which is gone (the image or kernel was removed)", .path.display())]
    Missing {
        /// The snapshot.
        name: String,
        /// The missing file.
        path: PathBuf,
    },
    /// This sandbox, or this start, cannot use snapshots (the message says why).
    #[error("{0}")]
    Refused(String),
    /// The VMM failed to save or restore the state.
    #[error("snapshot: {0}")]
    Vmm(String),
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.into()).into())
    }
}

/// Every snapshot.
pub fn list() -> Vec<SnapshotInfo> {
    let mut v: Vec<SnapshotInfo> = std::fs::read_dir(snapshots_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| std::fs::read(e.path().join("manifest.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Removes snapshot `name`.
pub fn remove(name: &str) -> Result<(), Error> {
    check_name(name)?;
    let dir = snapshots_dir().join(name);
    if !dir.is_dir() {
        return Err(SnapshotError::NotFound(name.into()).into());
    }
    let trash = snapshots_dir().join(format!(".rm-{name}-{}", std::process::id()));
    std::fs::rename(&dir, &trash)?;
    std::fs::remove_dir_all(&trash)?;
    Ok(())
}

fn load(name: &str) -> Result<(PathBuf, SnapshotInfo), Error> {
    check_name(name)?;
    let dir = snapshots_dir().join(name);
    let bytes = std::fs::read(dir.join("manifest.json"))
        .map_err(|_| SnapshotError::NotFound(name.into()))?;
    let info: SnapshotInfo =
        serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Damaged {
            name: name.into(),
            why: format!("bad manifest: {e}"),
        })?;
    let size = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len()).ok();
    if size("state") != Some(info.state_size) || size("scratch.ext4") != Some(info.scratch_size) {
        return Err(SnapshotError::Damaged {
            name: name.into(),
            why: "a file is missing or has the wrong size".into(),
        }
        .into());
    }
    for p in [&info.launch.kernel, &info.launch.initrd, &info.launch.base] {
        if !p.is_file() {
            return Err(SnapshotError::Missing {
                name: name.into(),
                path: p.clone(),
            }
            .into());
        }
    }
    Ok((dir, info))
}

impl Sandbox {
    /// Captures this running sandbox (memory, device state, writable layer) as snapshot
    /// `name`; the sandbox keeps running. Start copies with [`SandboxSpec::from_snapshot`].
    pub async fn snapshot(&self, name: &str) -> Result<SnapshotInfo, Error> {
        check_name(name)?;
        let Some(launch) = self.launch.clone() else {
            return Err(SnapshotError::Refused("this sandbox cannot be snapshotted".into()).into());
        };
        if let Some(why) = &launch.pinned {
            return Err(SnapshotError::Refused(format!(
                "sandbox {} {why}, which cannot be snapshotted (vhost-user-fs cannot migrate in QEMU 7.2; a volume belongs to one sandbox at a time)",
                self.id
            ))
            .into());
        }
        let root = snapshots_dir();
        std::fs::create_dir_all(&root)?;
        let dest = root.join(name);
        if dest.exists() {
            return Err(SnapshotError::Exists(name.into()).into());
        }
        let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp)?;
        // Guest memory and files: the user's only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
        let r = self.capture(&tmp).await;
        let r = r.and_then(|()| {
            let info = SnapshotInfo {
                name: name.to_string(),
                source: self.id.clone(),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                kernel_release: self.kernel_release.clone(),
                launch,
                first_stream: self.next_stream.load(Ordering::Relaxed),
                state_size: std::fs::metadata(tmp.join("state"))?.len(),
                scratch_size: std::fs::metadata(tmp.join("scratch.ext4"))?.len(),
            };
            let json = serde_json::to_vec_pretty(&info).map_err(std::io::Error::other)?;
            crate::assets::write_atomic(&tmp.join("manifest.json"), &json)?;
            std::fs::rename(&tmp, &dest).map_err(|e| {
                SnapshotError::Vmm(format!("store snapshot {name}: {e} (taken concurrently?)"))
            })?;
            Ok(info)
        });
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }

    async fn capture(&self, dir: &Path) -> Result<(), Error> {
        // No host frame may be half-delivered at the pause, or a copy's agent would hold a
        // partial frame: stop the writer, then wait until QEMU has read all it was given.
        let gate = self.conn.write_gate.clone().lock_owned().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.conn.unsent() > 0 {
            if std::time::Instant::now() > deadline {
                return Err(SnapshotError::Refused(
                    "the guest is not reading its control channel; cannot snapshot".into(),
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mon = self.monitor.lock().unwrap().take();
        let Some(mut mon) = mon else {
            return Err(SnapshotError::Refused("this sandbox has no VMM monitor".into()).into());
        };
        let (state, scratch_src, scratch_dst) = (
            dir.join("state"),
            self.scratch.clone(),
            dir.join("scratch.ext4"),
        );
        let (mon, r) = tokio::task::spawn_blocking(move || {
            let r = (|| -> Result<(), String> {
                let s = |e: qmp::QmpError| e.to_string();
                let q = mon.session().map_err(s)?;
                q.ignore_shared(false).map_err(s)?;
                let out = crate::state::private_file(&state).map_err(|e| e.to_string())?;
                let saved = q.save(&out, Duration::from_secs(300)).map_err(s);
                // Copy the disk while the guest is paused (QEMU flushed it for migration).
                let copied = saved.and_then(|()| {
                    template::copy_disk(&scratch_src, &scratch_dst).map_err(|e| e.to_string())
                });
                let resumed = q
                    .execute("cont", serde_json::json!({}))
                    .map(drop)
                    .map_err(s);
                copied
                    .and(resumed)
                    .and(out.sync_all().map_err(|e| e.to_string()))
            })();
            (mon, r)
        })
        .await
        .map_err(|e| SnapshotError::Vmm(e.to_string()))?;
        *self.monitor.lock().unwrap() = Some(mon);
        drop(gate);
        Ok(r.map_err(SnapshotError::Vmm)?)
    }
}

/// Starts a sandbox from snapshot `name` (see [`SandboxSpec::from_snapshot`]).
pub(crate) async fn start(
    spec: SandboxSpec,
    name: &str,
    backend: &dyn Backend,
) -> Result<Sandbox, Error> {
    if !spec.shares.is_empty() || !spec.volumes.is_empty() {
        return Err(SnapshotError::Refused(
            "a sandbox started from a snapshot cannot add shares or volumes".into(),
        )
        .into());
    }
    let (dir, info) = load(name)?;
    let l = info.launch.clone();
    if l.nic == spec.network.disabled {
        return Err(SnapshotError::Refused(format!(
            "snapshot {name} was taken {} a network; start it {}",
            if l.nic { "with" } else { "without" },
            if l.nic {
                "without --no-network"
            } else {
                "with --no-network"
            }
        ))
        .into());
    }
    if spec.privileged && !l.privileged {
        return Err(SnapshotError::Refused(format!(
            "snapshot {name} was taken without --privileged and its guest gave up those capabilities for good: start it without --privileged"
        ))
        .into());
    }
    let accel: Accel = l.accel.parse().map_err(Error::Setup)?;
    let id = crate::new_id();
    let state = state::StateDir::create(&id)?;
    let scratch = state.path().join("scratch.ext4");
    {
        let (src, dst) = (dir.join("scratch.ext4"), scratch.clone());
        tokio::task::spawn_blocking(move || template::copy_disk(&src, &dst))
            .await
            .map_err(|e| Error::Setup(e.to_string()))?
            .map_err(|e| Error::Setup(format!("copy the snapshot's writable disk: {e}")))?;
    }
    let network = if l.nic {
        Some(network::build(&spec.network)?)
    } else {
        None
    };
    let nic = match &network {
        Some(net) => {
            let (host, vm) = std::os::unix::net::UnixStream::pair()?;
            net.start(host)?;
            Some(NicConfig {
                fd: vm.into(),
                mac: airlock_net::stack::GUEST_MAC,
            })
        }
        None => None,
    };
    let (host_end, vm_end) = std::os::unix::net::UnixStream::pair()?;
    host_end.set_nonblocking(true)?;
    let host_end = tokio::net::UnixStream::from_std(host_end)?;
    let (mon_host, mon_vm) = std::os::unix::net::UnixStream::pair()?;
    let cfg = VmConfig {
        cmdline_extra: l.cmdline.clone(),
        cpus: l.cpus,
        memory_mib: l.memory_mib,
        disks: crate::image_disks(l.base.clone(), scratch),
        nic,
        monitor: Some(mon_vm.into()),
        incoming: Some(std::fs::File::open(dir.join("state"))?.into()),
        ..VmConfig::new(
            l.kernel.clone(),
            l.initrd.clone(),
            vm_end.into(),
            state.console_log(),
            accel,
        )
    };
    let vm = backend.launch(cfg)?;
    let fd = vm
        .incoming_fd()
        .ok_or_else(|| Error::Setup("backend lost the snapshot fd".into()))?;
    let q = tokio::task::spawn_blocking(move || {
        let mut q = qmp::Qmp::connect(mon_host)?;
        q.ignore_shared(false)?;
        q.restore(fd, Duration::from_secs(120))?;
        Ok::<_, qmp::QmpError>(q)
    })
    .await
    .map_err(|e| Error::Setup(e.to_string()))?
    .map_err(|e| Error::Setup(format!("restore snapshot {name}: {e}")))?;

    let (nonce, marker) = crate::resume_marker();
    let state_scratch = state.path().join("scratch.ext4");
    let (conn, mut ctl) = conn::Conn::start_after(host_end, Some(marker));
    let mut launch = l.clone();
    launch.pinned = None;
    let sb = Sandbox {
        id: id.clone(),
        accel: airlock_backend::AccelChoice {
            accel,
            reason: format!("as snapshot {name}"),
        },
        conn: conn.clone(),
        vm,
        state,
        next_stream: Arc::new(AtomicU32::new(info.first_stream.max(1))),
        kernel_release: info.kernel_release.clone(),
        network,
        _fs: Vec::new(),
        _volumes: Vec::new(),
        ram_file: None,
        monitor: std::sync::Mutex::new(Some(qmp::Monitor::Ready(q))),
        template: None,
        launch: Some(launch),
        scratch: state_scratch,
        pooled: false,
    };
    sb.watch_vm();
    crate::resume(
        &sb,
        &mut ctl,
        &spec,
        nonce,
        info.first_stream,
        spec.ready_timeout,
    )
    .await?;
    Ok(sb)
}
