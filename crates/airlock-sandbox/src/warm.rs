//! Warm starts: whether a sandbox may restore a template, and building the template (a VM
//! booted and warmed up, then saved) when there is none yet.

use std::path::PathBuf;
use std::time::Duration;

use airlock_backend::{Accel, Backend, NicConfig, VmConfig};

use crate::{qmp, rootfs, template, SandboxSpec};

/// Whether the spec asks for the benchmark-only virtio-9p share (always false without the
/// `bench-9p` feature).
pub(crate) fn bench_9p(spec: &SandboxSpec) -> bool {
    #[cfg(feature = "bench-9p")]
    return spec.bench_9p.is_some();
    #[cfg(not(feature = "bench-9p"))]
    {
        let _ = spec;
        false
    }
}

/// The template inputs of a sandbox that may start warm; `None` (and why, in the debug log)
/// when it must boot.
#[allow(clippy::too_many_arguments)]
pub(crate) fn warm_inputs(
    spec: &SandboxSpec,
    backend: &dyn Backend,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    base: Option<&std::path::Path>,
    accel: Accel,
    cmdline: &str,
    nic: bool,
) -> Option<template::Inputs> {
    let why_cold = if spec.cold {
        "asked to (--cold)"
    } else if std::env::var_os("AIRLOCK_COLD").is_some_and(|v| !v.is_empty() && v != "0") {
        "AIRLOCK_COLD is set"
    } else if !spec.shares.is_empty() {
        "it has shares (vhost-user-fs cannot migrate in QEMU 7.2)"
    } else if !spec.volumes.is_empty() {
        "it has volumes"
    } else if spec.builder_target.is_some() || bench_9p(spec) {
        "it is an image builder or a benchmark VM"
    } else if backend.snapshot_binary().is_none() {
        "the backend cannot restore snapshots"
    } else {
        ""
    };
    if !why_cold.is_empty() {
        tracing::debug!("booting cold: {why_cold}");
        return None;
    }
    let bin = template::resolve_binary(&backend.snapshot_binary()?)?;
    let id = |p: &std::path::Path| template::FileId::of(p).ok();
    Some(template::Inputs {
        format: template::FORMAT,
        kernel: id(kernel)?,
        initrd: id(initrd)?,
        root: id(base?)?,
        qemu: id(&bin)?,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_mib: spec.disk_mib,
        nic,
        cmdline: template::key_cmdline(cmdline),
        accel: accel.to_string(),
        privileged: spec.privileged,
    })
}

/// What building a template needs from the sandbox being started.
pub(crate) struct BuildCtx<'a> {
    pub(crate) backend: &'a dyn Backend,
    pub(crate) kernel: &'a std::path::Path,
    pub(crate) initrd: &'a std::path::Path,
    pub(crate) base: &'a std::path::Path,
    pub(crate) spec: &'a SandboxSpec,
    pub(crate) accel: Accel,
    pub(crate) cmdline_extra: &'a str,
    pub(crate) nic: bool,
    pub(crate) console_log: PathBuf,
}

/// The template for `inputs`, built now if there is none; `None` (with a warning) when it
/// cannot be had, and the sandbox boots cold.
pub(crate) async fn template_for(
    inputs: &template::Inputs,
    ctx: &BuildCtx<'_>,
) -> Option<template::Template> {
    let i = inputs.clone();
    let found = tokio::task::spawn_blocking(move || {
        if let template::Lookup::Corrupt(why) = template::lookup(&i) {
            tracing::warn!(
                "template {} is damaged ({why}): removed it; booting cold to rebuild it",
                i.key()
            );
        }
        template::find_or_start(&i)
    })
    .await
    .ok()?;
    let builder = match found {
        Ok(Ok(t)) => return Some(t),
        Ok(Err(b)) => b,
        Err(why) => {
            tracing::warn!("cannot use templates ({why}); booting cold");
            return None;
        }
    };
    match build_template(&builder, ctx).await {
        Ok(()) => match builder.commit(ctx.cmdline_extra) {
            Ok(t) => Some(t),
            Err(why) => {
                tracing::warn!("cannot store the template ({why}); booting cold");
                None
            }
        },
        Err(why) => {
            tracing::warn!("cannot make a template ({why}); booting cold");
            None
        }
    }
}

/// Boots a VM for the template, warms it up ([`crate::warmup`]: a throw-away `Init`, a few
/// spawns, `reap`), then saves it (RAM stays in the file it was written to) and ends it.
async fn build_template(b: &template::Builder, ctx: &BuildCtx<'_>) -> Result<(), String> {
    let (scratch, mib) = (b.scratch(), ctx.spec.disk_mib);
    tokio::task::spawn_blocking(move || rootfs::create_scratch(&scratch, mib))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| e.to_string();
    let (host_end, vm_end) = std::os::unix::net::UnixStream::pair().map_err(io)?;
    let (mon_host, mon_vm) = std::os::unix::net::UnixStream::pair().map_err(io)?;
    // The NIC is part of the device set; its host end stays open (link up) but unread.
    let nic_pair = match ctx.nic {
        true => Some(std::os::unix::net::UnixStream::pair().map_err(io)?),
        false => None,
    };
    let cfg = VmConfig {
        cmdline_extra: ctx.cmdline_extra.to_string(),
        cpus: ctx.spec.cpus,
        memory_mib: ctx.spec.memory_mib,
        disks: crate::image_disks(ctx.base.to_path_buf(), b.scratch()),
        nic: match &nic_pair {
            Some((_, vm)) => Some(NicConfig {
                fd: vm.try_clone().map_err(io)?.into(),
                mac: airlock_net::stack::GUEST_MAC,
            }),
            None => None,
        },
        shared_memory_file: Some(b.ram()),
        monitor: Some(mon_vm.into()),
        ..VmConfig::new(
            ctx.kernel.to_path_buf(),
            ctx.initrd.to_path_buf(),
            vm_end.into(),
            ctx.console_log.clone(),
            ctx.accel,
        )
    };
    let vm = ctx.backend.launch(cfg).map_err(|e| e.to_string())?;
    host_end.set_nonblocking(true).map_err(io)?;
    let host = tokio::net::UnixStream::from_std(host_end).map_err(io)?;
    let (conn, mut ctl) = crate::conn::Conn::start(host);
    let init =
        crate::warmup::throwaway_init(ctx.nic, ctx.spec.privileged).map_err(|e| e.to_string())?;
    let warm_up = async {
        crate::handshake(&conn, &mut ctl, &init, ctx.spec.ready_timeout).await?;
        crate::warmup::run_execs(&conn, 1).await
    };
    let mut exit = vm.exit_watch();
    tokio::select! {
        r = warm_up => { r.map_err(|e| format!("its warm-up failed: {e}"))?; }
        _ = exit.wait_for(|e| e.is_some()) => return Err("the VM ended during its warm-up".into()),
    }
    let state = b.state();
    tokio::task::spawn_blocking(move || {
        let s = |e: qmp::QmpError| e.to_string();
        let mut q = qmp::Qmp::connect(mon_host).map_err(s)?;
        q.ignore_shared(true).map_err(s)?;
        let out =
            crate::state::private_file(&state).map_err(|e| format!("{}: {e}", state.display()))?;
        q.save(&out, Duration::from_secs(60)).map_err(s)?;
        out.sync_all().map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    vm.kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some())).await;
    drop(nic_pair);
    drop(conn);
    Ok(())
}
