//! Starting a sandbox's VM: assets, state dir, root and writable disks, shares and volumes,
//! the template choice, the QEMU launch and, for a warm start, the restore. What comes out is
//! a [`Launched`] VM whose agent has not had `Init` yet: `Sandbox::finish` makes it a sandbox
//! (now, or when a [`crate::Pool`] hands it out).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use airlock_backend::{AccelChoice, Backend, DiskConfig, NicConfig, Vm, VmConfig};

use crate::warm::{template_for, warm_inputs, BuildCtx};
use crate::{
    accel_from_env, assets, boot, guest_kernel_args, image_disks, imagefs, qmp, restore, rootfs,
    shares, snapshot, state, template, Error, RootfsSource, SandboxSpec,
};

/// A VM that runs (booting, or restored) and waits for its agent's `Init`.
pub(crate) struct Launched {
    pub(crate) id: String,
    pub(crate) accel: AccelChoice,
    pub(crate) state: state::StateDir,
    pub(crate) vm: Box<dyn Vm>,
    /// The control channel.
    pub(crate) control: Control,
    /// Host end of the NIC, for the netstack the sandbox attaches.
    pub(crate) nic_host: Option<UnixStream>,
    pub(crate) monitor: Option<qmp::Monitor>,
    /// The template it was restored from; `None`: it boots cold.
    pub(crate) template: Option<String>,
    /// The template inputs it matched (what a pool compares claims against).
    pub(crate) inputs: Option<template::Inputs>,
    pub(crate) launch: Option<snapshot::LaunchInfo>,
    pub(crate) scratch: PathBuf,
    pub(crate) ram_file: Option<PathBuf>,
    pub(crate) fs_servers: Vec<airlock_fs::FsServer>,
    pub(crate) volume_leases: Vec<shares::VolumeLease>,
    pub(crate) share_mounts: Vec<airlock_proto::ShareMount>,
    pub(crate) volume_mounts: Vec<airlock_proto::VolumeMount>,
}

/// The host's side of a launched VM's control channel.
pub(crate) enum Control {
    /// The socket, not read yet: the agent's `Hello` (or, restored, its readiness) is ahead.
    Raw(UnixStream),
    /// A pooled VM that already had a throw-away `Init` and its warm-up: the claim's `Init`
    /// is a second one, and its streams start at `next_stream`.
    Started {
        conn: std::sync::Arc<crate::conn::Conn>,
        ctl: tokio::sync::mpsc::UnboundedReceiver<crate::conn::ControlEvent>,
        next_stream: u32,
        /// A second descriptor of the socket `conn` reads, for handing the VM to another
        /// process (see [`crate::handoff`]).
        raw: UnixStream,
        /// The guest kernel's release, from the warm-up's `Ready`.
        kernel: String,
    },
}

/// What [`launch`] came to.
pub(crate) enum Outcome {
    Up(Launched),
    /// The template could not be restored; it was removed, start over cold.
    RestoreFailed,
}

/// Launches the VM `spec` describes. `warm_allowed`: whether a template may be used (a
/// failed restore then removes it and says [`Outcome::RestoreFailed`]).
pub(crate) async fn launch(
    spec: &SandboxSpec,
    backend: &dyn Backend,
    warm_allowed: bool,
) -> Result<Outcome, Error> {
    tracing::debug!("preparing assets");
    let kernel = match &spec.kernel {
        Some(k) => k.clone(),
        None => assets::kernel()?,
    };
    let initrd = assets::initramfs(&assets::agent()?)?;
    tracing::debug!("kernel and initramfs found");
    let forced = match spec.accel {
        Some(a) => Some(a),
        None => accel_from_env()?,
    };
    let accel = airlock_backend::detect_accel(forced);
    let id = boot::sandbox_id(spec)?;
    let state = state::StateDir::create(&id)?;
    // A kept writable layer from an earlier run: booted as it is, never from a template.
    let reuse_disk = spec.writable_disk.as_ref().is_some_and(|d| d.exists());
    let base = match &spec.builder_target {
        Some(_) => None,
        None => Some(match &spec.rootfs {
            RootfsSource::Oci { store, image } => {
                state.set_image(&image.manifest_digest)?;
                // Boxed: building boots a (builder) sandbox itself.
                Box::pin(imagefs::build(store, image)).await?
            }
            src => {
                let src = src.clone();
                tokio::task::spawn_blocking(move || src.prepare())
                    .await
                    .map_err(|e| Error::Setup(e.to_string()))??
            }
        }),
    };
    tracing::debug!("root image ready");
    let has_nic = !spec.network.disabled;
    let (nic_host, nic) = match has_nic {
        true => {
            let (host, vm) = UnixStream::pair()?;
            let nic = NicConfig {
                fd: vm.into(),
                mac: airlock_net::stack::GUEST_MAC,
            };
            (Some(host), Some(nic))
        }
        false => (None, None),
    };
    let boot::Devices {
        disks,
        volume_leases,
        volume_mounts,
        fs_servers,
        fs_devices,
        share_mounts,
    } = boot::devices(spec, &state)?;
    let cmdline_extra = guest_kernel_args(accel.accel)
        .into_iter()
        .chain(spec.kernel_args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let warm = (warm_allowed && !reuse_disk)
        .then(|| {
            warm_inputs(
                spec,
                backend,
                &kernel,
                &initrd,
                base.as_deref(),
                accel.accel,
                &cmdline_extra,
                has_nic,
            )
        })
        .flatten();
    let template = match &warm {
        Some(inputs) => {
            let ctx = BuildCtx {
                backend,
                kernel: &kernel,
                initrd: &initrd,
                base: base.as_deref().unwrap_or(std::path::Path::new("")),
                spec,
                accel: accel.accel,
                cmdline_extra: &cmdline_extra,
                nic: has_nic,
                console_log: state.console_log(),
            };
            template_for(inputs, &ctx).await
        }
        None => None,
    };
    let scratch = match &spec.writable_disk {
        Some(d) => d.clone(),
        None => state.path().join("scratch.ext4"),
    };
    let mut vm_disks = match (&spec.builder_target, &base) {
        (Some(target), _) => vec![DiskConfig {
            path: target.clone(),
            read_only: false,
            serial: "airlock-target".into(),
        }],
        (None, Some(base)) => {
            let (s, mib) = (scratch.clone(), spec.disk_mib);
            let from = template.as_ref().map(|t| t.scratch());
            tokio::task::spawn_blocking(move || match from {
                _ if reuse_disk => Ok(()),
                Some(t) => template::copy_disk(&t, &s)
                    .map_err(|e| Error::Rootfs(format!("copy the template's writable disk: {e}"))),
                None => rootfs::create_scratch(&s, mib),
            })
            .await
            .map_err(|e| Error::Setup(e.to_string()))??;
            image_disks(base.clone(), scratch.clone())
        }
        (None, None) => Vec::new(),
    };
    vm_disks.extend(disks);
    tracing::debug!("writable disk ready");
    let disks = vm_disks;

    // Shared RAM on tmpfs (never written back to a disk), named for this sandbox.
    let ram_file =
        (!fs_devices.is_empty()).then(|| PathBuf::from(format!("/dev/shm/airlock-{id}.ram")));

    let (control, vm_end) = UnixStream::pair()?;
    let monitor = match backend.snapshot_binary() {
        Some(_) => Some(UnixStream::pair()?),
        None => None,
    };
    let incoming = match &template {
        Some(t) => Some(std::fs::File::open(t.state())?.into()),
        None => None,
    };
    // A restore must see the command line its template booted with.
    let cmdline_extra = match &template {
        Some(t) => t.boot_cmdline.clone(),
        None => cmdline_extra,
    };
    let cfg = VmConfig {
        cmdline_extra,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disks,
        nic,
        fs_devices,
        shared_memory_file: match &template {
            Some(t) => Some(t.ram()),
            None => ram_file.clone(),
        },
        memory_private: template.is_some(),
        monitor: monitor
            .as_ref()
            .map(|(_, vm)| vm.try_clone())
            .transpose()?
            .map(Into::into),
        incoming,
        #[cfg(feature = "bench-9p")]
        bench_9p: spec.bench_9p.clone(),
        ..VmConfig::new(
            kernel,
            initrd,
            vm_end.into(),
            state.console_log(),
            accel.accel,
        )
    };
    let monitor = monitor.map(|(host, _vm)| host);
    let launch = base.as_ref().map(|b| snapshot::LaunchInfo {
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        base: b.clone(),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_mib: spec.disk_mib,
        nic: cfg.nic.is_some(),
        cmdline: cfg.cmdline_extra.clone(),
        accel: accel.accel.to_string(),
        privileged: spec.privileged,
        pinned: if !spec.shares.is_empty() {
            Some("has shares".into())
        } else if !spec.volumes.is_empty() {
            Some("has volumes".into())
        } else {
            None
        },
    });
    tracing::debug!(%id, accel = %accel.accel, warm = template.is_some(), "starting sandbox");
    let vm = backend.launch(cfg)?;
    let mut monitor = monitor.map(qmp::Monitor::Raw);
    if let Some(t) = &template {
        let raw = match monitor.take() {
            Some(qmp::Monitor::Raw(s)) => Some(s),
            _ => None,
        };
        // Feed QEMU the saved device state; it resumes the guest by itself once loaded.
        match restore(raw, vm.incoming_fd()).await? {
            Ok(q) => monitor = Some(qmp::Monitor::Ready(q)),
            Err(why) if warm_allowed => {
                vm.kill();
                tracing::warn!(
                    "template {} could not be restored ({why}); removing it and booting cold",
                    t.key
                );
                template::remove(&t.key);
                return Ok(Outcome::RestoreFailed);
            }
            Err(why) => return Err(Error::Setup(format!("restore from template: {why}"))),
        }
    }
    let inputs = template.as_ref().and(warm);
    Ok(Outcome::Up(Launched {
        id,
        accel,
        state,
        vm,
        control: Control::Raw(control),
        nic_host,
        monitor,
        template: template.map(|t| t.key),
        inputs,
        launch,
        scratch,
        ram_file,
        fs_servers,
        volume_leases,
        share_mounts,
        volume_mounts,
    }))
}
