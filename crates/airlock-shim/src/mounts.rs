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
        for d in [
            "etc",
            "tmp",
            "proc",
            "sys",
            "dev",
            "run",
            "mnt",
            "containers",
            "root",
        ] {
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
        Err(host(format!(
            "{}: could not create the VM root",
            dir.display()
        )))
    }
}

/// A bind mount of the OCI spec (a volume: `hostPath`, `emptyDir`, `configMap`, `secret`,
/// CRI's `/etc/hosts`, `ctr run --mount type=bind,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Host source (absolute).
    pub source: PathBuf,
    /// Destination inside the container's root (absolute there).
    pub destination: String,
    /// Read-only.
    pub readonly: bool,
}

/// Destinations the VM provides itself (its own /proc, /dev, /sys, and Airlock's DNS).
fn vm_provided(dest: &str) -> bool {
    let d = dest.trim_end_matches('/');
    ["/proc", "/sys", "/dev"]
        .iter()
        .any(|p| d == *p || d.starts_with(&format!("{p}/")))
        || d == "/etc/resolv.conf"
}

/// The spec's mounts the shim honours: bind mounts of host paths. Everything else (proc,
/// sysfs, tmpfs, devpts, mqueue, cgroup) the VM provides on its own.
pub fn volumes(mounts: &[crate::spec::Mount]) -> Result<Vec<Volume>, ShimError> {
    let mut v = Vec::new();
    for m in mounts {
        let bind = m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind");
        if !bind || vm_provided(&m.destination) {
            continue;
        }
        let d = &m.destination;
        if !d.starts_with('/') || d.split('/').any(|c| c == "..") || d.len() > 4096 {
            return Err(ShimError::Invalid(format!(
                "mount destination {d:?} is not a plain absolute path"
            )));
        }
        if !m.source.starts_with('/') {
            return Err(ShimError::Invalid(format!(
                "mount source {:?} is not absolute",
                m.source
            )));
        }
        v.push(Volume {
            source: PathBuf::from(&m.source),
            destination: d.clone(),
            readonly: m.options.iter().any(|o| o == "ro"),
        });
    }
    Ok(v)
}

fn open_how(flags: i32) -> libc::open_how {
    // SAFETY: open_how is plain old data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    // Symlinks and `..` resolve as if `root` were `/`: a link planted in the rootfs (by
    // the image, or by a guest: the share is writable) cannot point a host mount elsewhere.
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    how
}

/// `openat2(root, rel, O_PATH | flags, RESOLVE_IN_ROOT)`.
fn open_in_root(
    root: &std::fs::File,
    rel: &str,
    flags: i32,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let c = std::ffi::CString::new(rel).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let how = open_how(libc::O_PATH | flags);
    // SAFETY: valid fd, NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `dest` exist inside `root` (directories along the way, the last as a directory or
/// an empty file like `source`), every step resolved inside the root.
fn make_in_root(root: &std::fs::File, dest: &str, dir: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let parts: Vec<&str> = dest
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    for (i, name) in parts.iter().enumerate() {
        let prefix = parts[..=i].join("/");
        if open_in_root(root, &prefix, 0).is_ok() {
            continue;
        }
        let parent = if i == 0 {
            open_in_root(root, ".", libc::O_DIRECTORY)?
        } else {
            open_in_root(root, &parts[..i].join("/"), libc::O_DIRECTORY)?
        };
        // O_PATH fds cannot create: reopen the parent for real through /proc.
        let pdir = std::fs::File::open(format!("/proc/self/fd/{}", parent.as_raw_fd()))?;
        let c = std::ffi::CString::new(*name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let last = i + 1 == parts.len();
        // SAFETY: plain *at calls on an fd we own with a NUL-terminated name.
        let r = unsafe {
            if last && !dir {
                let fd = libc::openat(
                    pdir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC
                        | libc::O_WRONLY,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                fd
            } else {
                libc::mkdirat(pdir.as_raw_fd(), c.as_ptr(), 0o755)
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Bind-mounts each volume at its destination inside `rootfs` (resolved inside it), before
/// the rootfs is bound into the pod share, so the guest sees them below the container's root.
/// On error the ones already made are undone.
pub fn mount_volumes(rootfs: &Path, volumes: &[Volume]) -> Result<(), ShimError> {
    use std::os::fd::AsRawFd;
    let root =
        std::fs::File::open(rootfs).map_err(|e| host(format!("open {}: {e}", rootfs.display())))?;
    let mut done = Vec::new();
    for v in volumes {
        let r = (|| -> Result<(), String> {
            let meta =
                std::fs::metadata(&v.source).map_err(|e| format!("{}: {e}", v.source.display()))?;
            make_in_root(&root, &v.destination, meta.is_dir()).map_err(|e| e.to_string())?;
            let rel = v.destination.trim_start_matches('/');
            let target = open_in_root(&root, if rel.is_empty() { "." } else { rel }, 0)
                .map_err(|e| e.to_string())?;
            let at = format!("/proc/self/fd/{}", target.as_raw_fd());
            mount(
                Some(&v.source),
                at.as_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| format!("bind: {e}"))?;
            done.push(v.destination.clone());
            if v.readonly {
                // The new mount is what the path resolves to now.
                let t = open_in_root(&root, rel, 0).map_err(|e| e.to_string())?;
                let at = format!("/proc/self/fd/{}", t.as_raw_fd());
                mount(
                    None::<&str>,
                    at.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| format!("read-only: {e}"))?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            unmount_volumes(rootfs, &done);
            return Err(host(format!(
                "mount {} at {}: {e}",
                v.source.display(),
                v.destination
            )));
        }
    }
    Ok(())
}

/// Detaches the volumes mounted in `rootfs` (deepest last made first), each resolved inside
/// the root, so a link the guest planted cannot make the shim unmount a host path.
pub fn unmount_volumes(rootfs: &Path, destinations: &[String]) {
    use std::os::fd::AsRawFd;
    let Ok(root) = std::fs::File::open(rootfs) else {
        return;
    };
    for d in destinations.iter().rev() {
        let rel = d.trim_start_matches('/');
        if let Ok(t) = open_in_root(&root, rel, 0) {
            let _ = umount2(
                format!("/proc/self/fd/{}", t.as_raw_fd()).as_str(),
                MntFlags::MNT_DETACH,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        // An absolute link and a `..` chain both stay inside the root.
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("up")).unwrap();
        let outside = d.path().join("outside-marker");
        let f = std::fs::File::open(&root).unwrap();
        make_in_root(&f, "/abs/airlock-shim-test-dir", true).unwrap();
        assert!(root.join("etc/airlock-shim-test-dir").is_dir());
        assert!(!Path::new("/etc/airlock-shim-test-dir").exists());
        make_in_root(&f, "/up/outside-marker", false).unwrap();
        assert!(root.join("outside-marker").is_file());
        assert!(!outside.exists());
    }

    #[test]
    fn only_host_binds_outside_the_vm_paths_are_volumes() {
        let m = |dest: &str, kind: &str, opts: &[&str]| crate::spec::Mount {
            destination: dest.into(),
            kind: kind.into(),
            source: "/src".into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
        };
        let v = volumes(&[
            m("/proc", "proc", &[]),
            m("/dev/shm", "bind", &["rbind"]),
            m("/etc/resolv.conf", "bind", &["rbind", "ro"]),
            m("/etc/hosts", "bind", &["rbind", "ro"]),
            m("/data", "none", &["rbind", "rw"]),
            m("/tmp", "tmpfs", &[]),
        ])
        .unwrap();
        assert_eq!(
            v.iter()
                .map(|v| (v.destination.as_str(), v.readonly))
                .collect::<Vec<_>>(),
            vec![("/etc/hosts", true), ("/data", false)]
        );
        assert!(volumes(&[m("/a/../b", "bind", &[])]).is_err());
    }
}
