//! Root filesystems: where the read-only base disk of a sandbox comes from, and its
//! per-sandbox writable disk.
//!
//! [`RootfsSource`] is the one seam every source goes through; OCI images join it as another
//! variant. Whatever the source, the result is a read-only ext4 (or erofs) file attached as the
//! base disk and shared by every sandbox that uses it.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::assets::{cache_dir, short_hash};
use crate::Error;

/// Where a sandbox's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsSource {
    /// A host directory; packed into a cached ext4 image (rebuilt when anything in it changes).
    Dir(PathBuf),
    /// An ext4 (or erofs) filesystem image, used as it is, read-only.
    Image(PathBuf),
    /// An OCI image from the store at `store`; its layers are applied once, inside a builder
    /// VM, into a cached ext4 image (see [`crate::imagefs`]).
    Oci {
        /// Image store directory.
        store: PathBuf,
        /// The stored image.
        image: Box<airlock_image::ImageRecord>,
    },
}

impl RootfsSource {
    /// A directory becomes [`RootfsSource::Dir`], a file [`RootfsSource::Image`].
    pub fn from_path(p: impl Into<PathBuf>) -> Result<RootfsSource, Error> {
        let p = p.into();
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => Ok(RootfsSource::Dir(p)),
            Ok(m) if m.is_file() => Ok(RootfsSource::Image(p)),
            Ok(_) => Err(Error::Rootfs(format!(
                "{}: not a directory or a filesystem image file",
                p.display()
            ))),
            Err(e) => Err(Error::Rootfs(format!("{}: {e}", p.display()))),
        }
    }

    /// The base disk image for this source, building it if needed.
    pub fn prepare(&self) -> Result<PathBuf, Error> {
        match self {
            RootfsSource::Image(p) => {
                check_fs_image(p)?;
                Ok(p.clone())
            }
            RootfsSource::Dir(d) => dir_image(d),
            RootfsSource::Oci { .. } => Err(Error::Rootfs(
                "OCI images are built asynchronously by Sandbox::start".into(),
            )),
        }
    }
}

impl RootfsSource {
    /// What identifies this root's content now (a tree's fingerprint, an image file's size
    /// and mtime, an OCI image's manifest), for telling whether a pooled VM has it.
    pub(crate) fn identity(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        match self {
            RootfsSource::Dir(d) => {
                let d = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
                match tree_fingerprint(&d) {
                    Ok((h, _, _)) => format!("dir:{}:{h}", d.display()),
                    Err(e) => format!("dir:{}:unreadable:{e}", d.display()),
                }
            }
            RootfsSource::Image(p) => {
                let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
                let m = std::fs::metadata(&p)
                    .map(|m| format!("{}.{}.{}", m.size(), m.mtime(), m.mtime_nsec()))
                    .unwrap_or_default();
                format!("image:{}:{m}", p.display())
            }
            RootfsSource::Oci { store, image } => {
                format!("oci:{}:{}", store.display(), image.manifest_digest)
            }
        }
    }
}

/// Accepts ext2/3/4 (magic at 1080) and erofs (magic at 1024), with a clear error otherwise.
fn check_fs_image(p: &Path) -> Result<(), Error> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(p).map_err(|e| Error::Rootfs(format!("{}: {e}", p.display())))?;
    let mut sb = [0u8; 1088];
    let ok = f.read_exact(&mut sb).is_ok();
    let ext4 = ok && sb[1080..1082] == [0x53, 0xEF];
    let erofs = ok && sb[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes();
    if ext4 || erofs {
        Ok(())
    } else {
        Err(Error::Rootfs(format!(
            "{} is not an ext4 or erofs filesystem image; pass a directory or make one with: mkfs.ext4 -d DIR FILE SIZE",
            p.display()
        )))
    }
}

/// Hash of a tree's names, types, modes, owners, sizes, mtimes and link targets: cheap to
/// compute and changes whenever the tree does.
fn tree_fingerprint(root: &Path) -> Result<(String, u64, u64), Error> {
    let mut h = Sha256::new();
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| Error::Rootfs(format!("read {}: {e}", dir.display())))?
            .filter_map(|e| e.ok())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p)
                .map_err(|err| Error::Rootfs(format!("stat {}: {err}", p.display())))?;
            let rel = p.strip_prefix(root).unwrap_or(&p);
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update(
                format!(
                    "\0{}:{}:{}:{}:{}:{}\n",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec()
                )
                .as_bytes(),
            );
            if m.file_type().is_symlink() {
                if let Ok(t) = std::fs::read_link(&p) {
                    h.update(t.as_os_str().as_encoded_bytes());
                }
            }
            files += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok((hex::encode(&h.finalize()[..8]), bytes, files))
}

/// Packs a directory into a cached ext4 image with `mkfs.ext4 -d` (rootless; ownership and
/// modes are copied from the tree, the image's root directory is owned by root).
fn dir_image(dir: &Path) -> Result<PathBuf, Error> {
    let (fp, bytes, files) = tree_fingerprint(dir)?;
    let cache = cache_dir().join("rootfs");
    let out = cache.join(format!("dir-{fp}.ext4"));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&cache)
        .map_err(|e| Error::Rootfs(format!("create {}: {e}", cache.display())))?;
    let inodes = files + files / 4 + 1024;
    let size = bytes + bytes / 4 + inodes * 256 + 32 * 1024 * 1024;
    let inodes = inodes.to_string();
    let size = format!("{}k", size.div_ceil(1024));
    let args = [
        "-E".into(),
        "root_owner=0:0".into(),
        "-N".into(),
        inodes.into(),
        "-d".into(),
        dir.as_os_str().to_owned(),
    ];
    mkfs_ext4(&args, &out, &size)
        .map_err(|e| Error::Rootfs(format!("packing {}: {e}", dir.display())))?;
    Ok(out)
}

/// A temporary name beside `out` that no other process or thread uses at the same time.
pub(crate) fn unique_tmp(out: &Path, what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    out.with_extension(format!("{what}{}-{n}", std::process::id()))
}

/// Moves the finished `tmp` to `out` unless `out` already exists, and never replaces it: a
/// cached image may be open by a running guest or named by a template whose page cache holds
/// its blocks, so a second builder's (differently laid out) copy must not take its place.
/// Returns whether `tmp` became `out` (`false`: another builder got there first).
pub(crate) fn publish_new(tmp: &Path, out: &Path) -> std::io::Result<bool> {
    let res = match std::fs::hard_link(tmp, out) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // A filesystem without hard links: a rename, still never over an existing file.
        Err(_) if !out.exists() => return std::fs::rename(tmp, out).map(|()| true),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(tmp);
    res
}

/// Runs `mkfs.ext4` (no journal, no reserved blocks, plus `args`) into a temporary file and
/// publishes it as `out` ([`publish_new`]), so readers never see a half-made image. Returns
/// whether this call made `out` (`false`: it already existed).
pub(crate) fn mkfs_ext4(
    args: &[std::ffi::OsString],
    out: &Path,
    size: &str,
) -> Result<bool, String> {
    let tmp = unique_tmp(out, "tmp");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-m", "0"])
        .args(args)
        .arg(&tmp)
        .arg(size)
        .output()
        .map_err(|e| format!("run mkfs.ext4: {e} (install it with: apt-get install e2fsprogs)"))?;
    if !st.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&st.stderr).trim()
        ));
    }
    publish_new(&tmp, out).map_err(|e| format!("publish {}: {e}", out.display()))
}

/// A pristine, empty, sparse ext4 of `size_mib`, made once and cached.
fn scratch_template(size_mib: u64) -> Result<PathBuf, Error> {
    let dir = cache_dir().join("scratch");
    let path = dir.join(format!(
        "empty-{size_mib}M-{}.ext4",
        short_hash(b"v3 ^has_journal metadata_csum_seed upper work")
    ));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Rootfs(format!("create {}: {e}", dir.display())))?;
    // The overlay's upper and work directories come made, so the guest only stats them (its
    // first ext4 write then happens in the overlay mount instead: a few ms net under TCG).
    let staging = unique_tmp(&path, "staging");
    let res = make_scratch_template(&staging, &path, size_mib);
    let _ = std::fs::remove_dir_all(&staging);
    res?;
    Ok(path)
}

/// [`scratch_template`]'s work: `staging` holds the tree mkfs copies in.
fn make_scratch_template(staging: &Path, path: &Path, size_mib: u64) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| {
        Error::Rootfs(format!(
            "scratch template staging {}: {e}",
            staging.display()
        ))
    };
    for d in [
        staging.to_path_buf(),
        staging.join("upper"),
        staging.join("work"),
    ] {
        std::fs::create_dir(&d).map_err(fail)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    }
    // metadata_csum_seed: the guest agent can then give each sandbox its own UUID while the
    // filesystem is mounted (checksums do not depend on it).
    let args = [
        "-O".into(),
        "metadata_csum_seed".into(),
        "-E".into(),
        "lazy_itable_init=1,nodiscard,root_owner=0:0".into(),
        "-L".into(),
        "airlock-scratch".into(),
        "-d".into(),
        staging.as_os_str().to_owned(),
    ];
    mkfs_ext4(&args, path, &format!("{size_mib}M"))
        .map_err(|e| Error::Rootfs(format!("scratch template: {e}")))?;
    Ok(())
}

/// Creates the sandbox's writable disk at `dest`: a sparse copy of the cached empty template.
pub fn create_scratch(dest: &Path, size_mib: u64) -> Result<(), Error> {
    let template = scratch_template(size_mib)?;
    sparse_copy(&template, dest)
        .map_err(|e| Error::Rootfs(format!("create scratch disk {}: {e}", dest.display())))
}

/// Copies only the data extents (SEEK_DATA/SEEK_HOLE). std::fs::copy would fill the holes of
/// a 5 GiB sparse image with zeros.
pub(crate) fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut s = std::fs::File::open(src)?;
    let len = s.metadata()?.len();
    let mut d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600) // a guest's disk: the user's only
        .open(dst)?;
    d.set_len(len)?;
    let fd = s.as_raw_fd();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        // SAFETY: lseek on a valid fd.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        s.seek(SeekFrom::Start(data as u64))?;
        d.seek(SeekFrom::Start(data as u64))?;
        let mut left = (end - data) as usize;
        while left > 0 {
            let want = left.min(buf.len());
            let n = s.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            d.write_all(&buf[..n])?;
            left -= n;
        }
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_new_never_replaces_an_existing_image() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("img.ext4");
        let (a, b) = (unique_tmp(&out, "tmp"), unique_tmp(&out, "tmp"));
        assert_ne!(a, b, "two builders in one process got one temporary name");
        std::fs::write(&a, "first").unwrap();
        std::fs::write(&b, "second").unwrap();
        assert!(publish_new(&a, &out).unwrap());
        assert!(!publish_new(&b, &out).unwrap());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "first");
        assert!(!a.exists() && !b.exists(), "temporary files left behind");
    }

    #[test]
    fn fingerprint_tracks_changes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), b"1").unwrap();
        let (a, _, n) = tree_fingerprint(t.path()).unwrap();
        assert_eq!(n, 1);
        std::fs::create_dir(t.path().join("d")).unwrap();
        let (b, _, _) = tree_fingerprint(t.path()).unwrap();
        assert_ne!(a, b);
        std::os::unix::fs::symlink("x", t.path().join("d/l")).unwrap();
        let (c, _, n) = tree_fingerprint(t.path()).unwrap();
        assert_ne!(b, c);
        assert_eq!(n, 3);
    }

    #[test]
    fn rejects_non_filesystem_image() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("x.img");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let e = RootfsSource::from_path(&f).unwrap().prepare().unwrap_err();
        assert!(e.to_string().contains("not an ext4"), "{e}");
        assert!(RootfsSource::from_path(t.path().join("missing")).is_err());
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("s");
        {
            let f = std::fs::File::create(&src).unwrap();
            f.set_len(64 << 20).unwrap();
            use std::os::unix::fs::FileExt;
            f.write_at(b"hello", 10 << 20).unwrap();
        }
        let dst = t.path().join("d");
        sparse_copy(&src, &dst).unwrap();
        let m = std::fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.blocks() * 512 < 1 << 20, "copy is not sparse");
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 5];
        std::fs::File::open(&dst)
            .unwrap()
            .read_exact_at(&mut b, 10 << 20)
            .unwrap();
        assert_eq!(&b, b"hello");
    }
}
