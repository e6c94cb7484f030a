//! Exec roots: commands run chrooted into a directory of the guest (a container's root
//! filesystem shared over virtio-fs), as a container runtime runs each container of a pod on
//! its own root. The VM is the isolation boundary; the chroot gives each container the
//! filesystem its image expects.
//!
//! Before the first command in a root, the agent mounts the API filesystems inside it (a fresh
//! proc, the VM's /dev and /sys recursively bound) and binds the VM's DNS configuration and
//! Airlock's CA bundle over the root's own, so name resolution and TLS through the sealed
//! network work as they do in the VM root.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};

/// Longest root path accepted from the host.
const MAX_ROOT_LEN: usize = 4096;
/// Most distinct roots prepared in one VM (each costs a few mounts).
const MAX_ROOTS: usize = 1024;

/// Roots whose mounts are in place.
static PREPARED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Checks a root path from the host: absolute, bounded, plain components only, not `/`.
pub fn validate(root: &str) -> Result<(), String> {
    if root.len() > MAX_ROOT_LEN || root.contains('\0') {
        return Err("exec root: path too long or contains NUL".into());
    }
    let plain = root.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    });
    if !plain {
        return Err(format!(
            "exec root {root:?} must be an absolute path other than / without . or .. components"
        ));
    }
    Ok(())
}

/// Mounts proc, dev and sys inside `root` (once per root), plus DNS and CA bindings.
pub fn prepare(root: &str) -> Result<(), String> {
    validate(root)?;
    let mut guard = PREPARED.lock().unwrap();
    let set = guard.get_or_insert_with(HashSet::new);
    if set.contains(root) {
        return Ok(());
    }
    if set.len() >= MAX_ROOTS {
        return Err(format!("exec root {root}: too many roots in this VM"));
    }
    let meta = std::fs::metadata(root).map_err(|e| format!("exec root {root}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("exec root {root}: not a directory"));
    }
    let inside = |p: &str| format!("{root}/{p}");
    let dir = |p: &str| -> Result<String, String> {
        let d = inside(p);
        // A symlink here would point the mount at a path of the VM, not of the container.
        if std::fs::symlink_metadata(&d).is_ok_and(|m| !m.is_dir()) {
            return Err(format!("exec root {root}: /{p} is not a directory"));
        }
        std::fs::create_dir_all(&d).map_err(|e| format!("exec root {root}: mkdir /{p}: {e}"))?;
        Ok(d)
    };
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(
        Some("proc"),
        dir("proc")?.as_str(),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("exec root {root}: mount proc: {e}"))?;
    for p in ["dev", "sys"] {
        mount(
            Some(format!("/{p}").as_str()),
            dir(p)?.as_str(),
            None::<&str>,
            bind,
            None::<&str>,
        )
        .map_err(|e| format!("exec root {root}: bind /{p}: {e}"))?;
    }
    bind_file(root, "/etc/resolv.conf");
    bind_ca(root);
    set.insert(root.to_string());
    Ok(())
}

/// Binds the VM's file at `path` over the root's (created empty if missing; a symlink in the
/// root is left alone). Best effort: a read-only root keeps its own file.
fn bind_file(root: &str, path: &str) {
    if std::fs::metadata(path).is_err() {
        return;
    }
    let target = format!("{root}{path}");
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return,
        Err(_) => {
            let parent = Path::new(&target).parent().map(Path::to_path_buf);
            if parent.is_none_or(|p| std::fs::create_dir_all(p).is_err())
                || std::fs::File::create(&target).is_err()
            {
                return;
            }
        }
    }
    let _ = mount(
        Some(path),
        target.as_str(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    );
}

/// When the sealed network intercepts TLS: the root's trust bundles get Airlock's CA, in a
/// bundle of its own at the path the agent's environment points at (`SSL_CERT_FILE` etc.), built
/// from the root's system bundle so the container keeps trusting what its image trusts.
fn bind_ca(root: &str) {
    let Ok(ca) = std::fs::read_to_string(crate::net::CA_FILE) else {
        return;
    };
    let mut system = String::new();
    for b in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ] {
        if let Ok(t) = std::fs::read_to_string(format!("{root}{b}")) {
            system = t;
            break;
        }
    }
    // The bundle lives on the VM's /run (tmpfs), bound into the root's /etc/ssl/airlock.
    let n = std::collections::hash_map::DefaultHasher::new();
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = n;
        root.hash(&mut h);
        h.finish()
    };
    let src = format!("/run/airlock/roots/{key:016x}");
    if std::fs::create_dir_all(&src).is_err()
        || std::fs::write(format!("{src}/ca.pem"), &ca).is_err()
        || std::fs::write(format!("{src}/bundle.pem"), format!("{system}\n{ca}")).is_err()
    {
        return;
    }
    let target = format!("{root}/etc/ssl/airlock");
    if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir())
        || std::fs::create_dir_all(&target).is_err()
    {
        return;
    }
    let _ = mount(
        Some(src.as_str()),
        target.as_str(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_must_be_plain_absolute_paths() {
        for ok in ["/run/airlock/pod/c1", "/a", "/a/b-c_d.e"] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        let long = format!("/{}", "a".repeat(5000));
        for bad in [
            "", "/", "a/b", "/a/../b", "/a/./b", "/a/..", "//a", "/a//b", "/a\0", &long,
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }
}
