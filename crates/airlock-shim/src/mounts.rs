//! Host mounts: a container's rootfs (the snapshot mounts containerd passes in Create, done
//! here as runc's shim does them) bound into the pod directory the VM shares over virtio-fs.
//!
//! One virtio-fs share per pod, made at boot (microvm cannot hot-plug devices): the pod
//! directory `<run>/<namespace>/<pod>/c`. Each container's rootfs is bind-mounted at
//! `c/<container id>` on the host; the share server resolves names with `openat` from the
//! share root, which crosses into a mount below it, so the guest sees each new container at
//! `/containers/<id>` without any new device.

use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::ShimError;

/// Where pod directories live on the host (a tmpfs on most systems: gone at reboot).
pub const RUN_DIR: &str = "/run/airlock-shim";

/// The host directory of pod `pod` in containerd namespace `ns`.
pub fn pod_dir(ns: &str, pod: &str) -> PathBuf {
    Path::new(RUN_DIR).join(ns).join(pod)
}

fn host(what: String) -> ShimError {
    ShimError::Host(what)
}

/// Mounts containerd's rootfs mounts on `target` (in order: usually one overlay).
pub async fn mount_rootfs(mounts: &[Mount], target: &Path) -> Result<(), ShimError> {
    for m in mounts {
        containerd_shim::util::mount_rootfs(m, target)
            .await
            .map_err(|e| host(format!("mount {} on {}: {e}", m.type_, target.display())))?;
    }
    Ok(())
}

/// Bind-mounts `src` at `dst` (created), recursively.
pub fn bind(src: &Path, dst: &Path) -> Result<(), ShimError> {
    std::fs::create_dir_all(dst).map_err(|e| host(format!("mkdir {}: {e}", dst.display())))?;
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| host(format!("bind {} on {}: {e}", src.display(), dst.display())))
}

/// Detaches whatever is mounted at `p` (nothing mounted is fine).
pub fn unmount(p: &Path) {
    // Repeat: a path may carry stacked mounts.
    for _ in 0..8 {
        if umount2(p, MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// Whether `p` is a directory with anything in it (a rootfs that exists).
pub fn non_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some())
}

/// The directory the VM boots from: nothing but mount points (containers bring their own
/// userland). Made once under `cache`, atomically, so concurrent shims agree on it and the
/// cached ext4 image built from it stays valid.
pub fn vm_root(cache: &Path) -> Result<PathBuf, ShimError> {
    let dir = cache.join("shim-vmroot-v1");
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).map_err(|e| host(format!("mkdir {}: {e}", cache.display())))?;
    let tmp = cache.join(format!(".shim-vmroot.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let r = (|| -> std::io::Result<()> {
        for d in ["etc", "tmp", "proc", "sys", "dev", "run", "mnt", "containers", "root"] {
            std::fs::create_dir_all(tmp.join(d))?;
        }
        std::fs::write(tmp.join("etc/passwd"), "root:x:0:0:root:/root:/bin/false\n")?;
        std::fs::write(tmp.join("etc/group"), "root:x:0:\n")?;
        std::fs::write(tmp.join(".complete"), "")?;
        Ok(())
    })();
    r.map_err(|e| host(format!("{}: {e}", tmp.display())))?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another shim made it first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if dir.join(".complete").exists() {
        Ok(dir)
    } else {
        Err(host(format!("{}: could not create the VM root", dir.display())))
    }
}
