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

/// Applies one uncompressed layer tar read from `r` onto `/`. Returns the number of entries.
pub fn apply_layer(r: impl Read) -> Result<u64, String> {
    let root = Path::new("/");
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
            if let Ok(rd) = std::fs::read_dir(root.join(parent)) {
                for c in rd.flatten() {
                    let child = parent.join(c.file_name());
                    if !ours.contains(&child) {
                        remove_any(&root.join(child));
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            remove_any(&root.join(parent).join(std::ffi::OsStr::from_bytes(hidden)));
            continue;
        }
        let dst = root.join(&rel);
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
                e.unpack_in(root)
                    .map_err(|err| format!("unpacking {}: {err}", rel.display()))?;
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
