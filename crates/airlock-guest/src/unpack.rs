//! Image layers applied onto the builder VM's target disk (the root of the agent after
//! `chroot`), with OCI whiteouts. Runs inside a throwaway VM as root, so ownership, modes,
//! setuid bits, xattrs, device nodes and hardlinks come out exactly as the layers say without
//! any privilege on the host; a hostile layer can only damage that VM and its own image.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

/// Relative form of an archive path: leading `/` and `./` dropped, `..` refused.
fn clean(p: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("layer path {} contains '..'", p.display()))
            }
            Component::Prefix(_) => return Err(format!("bad layer path {}", p.display())),
        }
    }
    Ok(out)
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// `rel` under `root`, refusing a parent directory that resolves outside `root` (through a
/// symlink). In the builder VM `root` is `/` after chroot, so this only matters when the
/// unpacker runs elsewhere (tests, fuzzing).
fn inside(root: &Path, rel: &Path) -> Result<PathBuf, String> {
    let dst = root.join(rel);
    if let Some(parent) = dst.parent() {
        if let (Ok(p), Ok(r)) = (parent.canonicalize(), root.canonicalize()) {
            if !p.starts_with(&r) {
                return Err(format!("{} resolves outside the image", rel.display()));
            }
        }
    }
    Ok(dst)
}

/// Applies one uncompressed layer tar read from `r` onto `root` (`/` in the builder VM).
/// Returns the number of entries applied.
pub fn apply_layer(r: impl Read, root: &Path) -> Result<u64, String> {
    let mut ar = tar::Archive::new(r);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    // Paths this layer created: an opaque whiteout hides only what lower layers put there.
    let mut ours: HashSet<PathBuf> = HashSet::new();
    let mut n = 0;
    for entry in ar.entries().map_err(|e| format!("reading layer: {e}"))? {
        let mut e = entry.map_err(|e| format!("reading layer: {e}"))?;
        let rel = clean(&e.path().map_err(|e| format!("bad path in layer: {e}"))?)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new(""));
        if name == b".wh..wh..opq" {
            // Checking a (nonexistent) child checks the directory itself.
            let dir = root.join(parent);
            inside(root, &parent.join(".wh..wh..opq"))?;
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for c in rd.flatten() {
                    let child = parent.join(c.file_name());
                    if !ours.contains(&child) {
                        remove_any(&inside(root, &child)?);
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            remove_any(&inside(
                root,
                &parent.join(std::ffi::OsStr::from_bytes(hidden)),
            )?);
            continue;
        }
        let dst = inside(root, &rel)?;
        let kind = e.header().entry_type();
        // A different kind of file at the same path replaces what a lower layer had.
        if let Ok(m) = std::fs::symlink_metadata(&dst) {
            if m.is_dir() != (kind == EntryType::Directory) {
                remove_any(&dst);
            }
        }
        match kind {
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let h = e.header();
                let mode = h.mode().map_err(|e| e.to_string())?;
                let fmt = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                if let Some(p) = dst.parent() {
                    let _ = std::fs::create_dir_all(p);
                }
                remove_any(&dst);
                let c = std::ffi::CString::new(dst.as_os_str().as_bytes())
                    .map_err(|e| e.to_string())?;
                let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
                // SAFETY: plain syscalls on a NUL-terminated path we own.
                unsafe {
                    if libc::mknod(
                        c.as_ptr(),
                        fmt | (mode & 0o7777),
                        libc::makedev(major, minor),
                    ) < 0
                    {
                        return Err(format!(
                            "mknod {}: {}",
                            dst.display(),
                            std::io::Error::last_os_error()
                        ));
                    }
                    libc::lchown(c.as_ptr(), uid, gid);
                    libc::chmod(c.as_ptr(), mode & 0o7777);
                }
            }
            _ => {
                let inside = e.unpack_in(root).map_err(|err| {
                    // tar's message names the path; the cause is in the source chain.
                    let cause = std::error::Error::source(&err).map(|c| c.to_string());
                    format!(
                        "unpacking {}: {err} {}",
                        rel.display(),
                        cause.unwrap_or_default()
                    )
                })?;
                if !inside {
                    return Err(format!("{} is outside the image", rel.display()));
                }
            }
        }
        ours.insert(rel);
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean(Path::new("/a/./b")).unwrap(), PathBuf::from("a/b"));
        assert_eq!(clean(Path::new("./")).unwrap(), PathBuf::new());
        assert!(clean(Path::new("a/../../etc")).is_err());
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_path(path).unwrap();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(if *kind == tar::EntryType::Regular {
                data.len() as u64
            } else {
                0
            });
            if *kind == tar::EntryType::Symlink {
                h.set_link_name(data).unwrap();
            }
            h.set_cksum();
            let body: &[u8] = if *kind == tar::EntryType::Regular {
                data.as_bytes()
            } else {
                &[]
            };
            b.append(&h, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_escapes_on_a_host_directory() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        apply_layer(
            &tar_of(&[
                ("d/", Directory, ""),
                ("d/a", Regular, "1"),
                ("d/b", Regular, "2"),
                ("e/", Directory, ""),
                ("e/x", Regular, "x"),
            ])[..],
            r,
        )
        .unwrap();
        apply_layer(
            &tar_of(&[
                ("d/.wh.a", Regular, ""),
                ("e/y", Regular, "y"),
                ("e/.wh..wh..opq", Regular, ""),
            ])[..],
            r,
        )
        .unwrap();
        assert!(!r.join("d/a").exists() && r.join("d/b").exists());
        assert!(
            !r.join("e/x").exists() && r.join("e/y").exists(),
            "opaque hides only lower layers"
        );
        // A symlink pointing out, then writes and whiteouts through it: refused, nothing outside touched.
        let link = outside.path().display().to_string();
        apply_layer(&tar_of(&[("out", Symlink, &link)])[..], r).unwrap();
        assert!(apply_layer(&tar_of(&[("out/new", Regular, "x")])[..], r).is_err());
        assert!(apply_layer(&tar_of(&[("out/.wh.victim", Regular, "")])[..], r).is_err());
        assert!(apply_layer(&tar_of(&[("out/.wh..wh..opq", Regular, "")])[..], r).is_err());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("victim")).unwrap(),
            "keep"
        );
        assert!(!outside.path().join("new").exists());
    }
}
