//! The steps of a cold or warm start that do not need the VM yet: checking the spec, choosing
//! the id, and making the devices a sandbox's shares and volumes need.

use airlock_backend::DiskConfig;

use crate::{is_id, new_id, shares, state, Error, SandboxSpec, ShareMode};

/// Refuses a spec no VM could run, before anything is prepared.
pub(crate) fn check(spec: &SandboxSpec) -> Result<(), Error> {
    if spec.cpus == 0 || spec.cpus > 64 {
        return Err(Error::Setup(format!(
            "--cpus {} is out of range (1-64)",
            spec.cpus
        )));
    }
    if spec.memory_mib < 64 {
        return Err(Error::Setup(format!(
            "--memory {} MiB is too small (at least 64)",
            spec.memory_mib
        )));
    }
    Ok(())
}

/// The spec's id if it gave a valid one, else a fresh one.
pub(crate) fn sandbox_id(spec: &SandboxSpec) -> Result<String, Error> {
    match &spec.id {
        Some(id) if is_id(id) => Ok(id.clone()),
        Some(id) => Err(Error::Setup(format!(
            "{id:?} is not a sandbox id (12 lowercase hex digits)"
        ))),
        None => Ok(new_id()),
    }
}

/// What shares and volumes add to a VM, and what must live as long as it.
pub(crate) struct Devices {
    /// Volume disks (after the root and writable ones).
    pub(crate) disks: Vec<DiskConfig>,
    /// Held volume locks.
    pub(crate) volume_leases: Vec<shares::VolumeLease>,
    /// Where the agent mounts each volume.
    pub(crate) volume_mounts: Vec<airlock_proto::VolumeMount>,
    /// One virtio-fs server per share.
    pub(crate) fs_servers: Vec<airlock_fs::FsServer>,
    /// Their vhost-user devices.
    pub(crate) fs_devices: Vec<airlock_backend::FsDevice>,
    /// Where and how the agent mounts each share.
    pub(crate) share_mounts: Vec<airlock_proto::ShareMount>,
}

/// Leases the spec's volumes and starts a virtio-fs server per share (sockets in `state`).
pub(crate) fn devices(spec: &SandboxSpec, state: &state::StateDir) -> Result<Devices, Error> {
    let mut disks = Vec::new();
    let mut volume_leases = Vec::new();
    let mut volume_mounts = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let lease = shares::VolumeLease::acquire(&v.name)?;
        let serial = format!("airlock-vol{i}");
        disks.push(DiskConfig {
            path: lease.image.clone(),
            read_only: false,
            serial: serial.clone(),
        });
        volume_mounts.push(airlock_proto::VolumeMount {
            serial,
            target: v.guest.clone(),
        });
        volume_leases.push(lease);
    }
    let mut fs_servers = Vec::new();
    let mut fs_devices = Vec::new();
    let mut share_mounts = Vec::new();
    // SAFETY: geteuid/getegid cannot fail.
    let host_ids = unsafe { (libc::geteuid(), libc::getegid()) };
    for (i, sh) in spec.shares.iter().enumerate() {
        let tag = format!("airlock-fs{i}");
        let socket = state.path().join(format!("fs{i}.sock"));
        let cfg = airlock_fs::ShareConfig {
            host_dir: sh.host.clone(),
            guest_path: sh.guest.clone(),
            tag: tag.clone(),
            access: match sh.mode {
                ShareMode::Rw => airlock_fs::Access::ReadWrite,
                ShareMode::Ro | ShareMode::Overlay => airlock_fs::Access::ReadOnly,
            },
            ids: airlock_fs::IdMap {
                host: host_ids,
                guest: spec.share_owner,
            },
            rules: spec.fs_rules.clone(),
            quota: (sh.mode == ShareMode::Rw)
                .then_some(spec.share_quota_mib.saturating_mul(1 << 20)),
        };
        fs_servers.push(
            airlock_fs::FsServer::start(cfg, &socket, shares::event_sink(spec.fs_events.clone()))
                .map_err(|e| Error::Setup(e.to_string()))?,
        );
        fs_devices.push(airlock_backend::FsDevice {
            socket,
            tag: tag.clone(),
        });
        share_mounts.push(airlock_proto::ShareMount {
            tag,
            target: sh.guest.clone(),
            mode: sh.mode,
        });
    }
    Ok(Devices {
        disks,
        volume_leases,
        volume_mounts,
        fs_servers,
        fs_devices,
        share_mounts,
    })
}
