//! Workspace shares (virtio-fs), named volumes (ext4 disks) and file rules in a sandbox spec.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;

pub use airlock_fs::{FsEvent, FsEventSink, FsRule, Op as FsOp};
pub use airlock_proto::ShareMode;

use crate::Error;

/// Turns the spec's channel into the server's callback.
pub(crate) fn event_sink(tx: Option<tokio::sync::mpsc::Sender<FsEvent>>) -> Option<FsEventSink> {
    let tx = tx?;
    Some(std::sync::Arc::new(move |ev: FsEvent| {
        if tx.try_send(ev).is_err() {
            tracing::warn!("file-rule event dropped: the receiver is full or gone");
        }
    }))
}

/// A host directory shared into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Host directory.
    pub host: PathBuf,
    /// Absolute guest path.
    pub guest: String,
    /// Overlay (default), rw or ro.
    pub mode: ShareMode,
}

/// A named volume mounted into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// Volume name.
    pub name: String,
    /// Absolute guest path.
    pub guest: String,
}

/// One `-v` argument: a share or a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// `HOSTDIR:GUEST[:rw|:ro|:overlay]` (a host path contains `/` or starts with `.` or `~`).
    Share(Share),
    /// `NAME:GUEST`.
    Volume(VolumeMount),
}

fn check_guest(g: &str, arg: &str) -> Result<(), String> {
    if !g.starts_with('/') || g == "/" || g.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!(
            "-v {arg}: the guest path must be absolute and not / (like /workspace)"
        ));
    }
    Ok(())
}

impl FromStr for Mount {
    type Err = String;
    fn from_str(arg: &str) -> Result<Mount, String> {
        let parts: Vec<&str> = arg.split(':').collect();
        let (src, guest, mode) = match parts[..] {
            [s, g] => (s, g, None),
            [s, g, m] => (s, g, Some(m)),
            _ => {
                return Err(format!(
                    "-v {arg}: expected HOSTDIR:GUESTPATH[:rw|:ro] or VOLUME:GUESTPATH"
                ))
            }
        };
        check_guest(guest, arg)?;
        let is_path = src.contains('/') || src.starts_with('.') || src.starts_with('~');
        if !is_path {
            volume_name_ok(src).map_err(|e| format!("-v {arg}: {e}"))?;
            if mode.is_some() {
                return Err(format!("-v {arg}: volumes take no mode"));
            }
            return Ok(Mount::Volume(VolumeMount {
                name: src.into(),
                guest: guest.into(),
            }));
        }
        let mode = match mode {
            None | Some("overlay") => ShareMode::Overlay,
            Some("rw") => ShareMode::Rw,
            Some("ro") => ShareMode::Ro,
            Some(m) => return Err(format!("-v {arg}: unknown mode {m:?} (rw, ro or overlay)")),
        };
        let host = match src.strip_prefix("~/") {
            Some(rest) => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(rest),
            None => PathBuf::from(src),
        };
        Ok(Mount::Share(Share {
            host,
            guest: guest.into(),
            mode,
        }))
    }
}

/// Checks a volume name: 1–64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn volume_name_ok(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad volume name {name:?}: use 1-64 letters, digits, '_', '.', '-'"
        ))
    }
}

/// Default size of a new volume, MiB (sparse).
pub const DEFAULT_VOLUME_MIB: u64 = 1024;

/// A stored volume.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Size, MiB.
    pub size_mib: u64,
    /// Bytes actually used on the host (sparse file).
    pub used_bytes: u64,
    /// Whether a sandbox has it now.
    pub in_use: bool,
    /// The image file.
    pub path: PathBuf,
}

/// Where volumes live: `<data dir>/volumes`.
pub fn volumes_dir() -> Result<PathBuf, Error> {
    airlock_image::default_data_dir()
        .map(|d| d.join("volumes"))
        .ok_or_else(|| Error::Setup("no data directory: set AIRLOCK_DATA_DIR or HOME".into()))
}

fn volume_paths(name: &str) -> Result<(PathBuf, PathBuf), Error> {
    volume_name_ok(name).map_err(Error::Setup)?;
    let d = volumes_dir()?;
    Ok((
        d.join(format!("{name}.ext4")),
        d.join(format!("{name}.lock")),
    ))
}

/// Creates an empty sparse ext4 volume.
pub fn volume_create(name: &str, size_mib: u64) -> Result<VolumeInfo, Error> {
    if !(16..=16 * 1024 * 1024).contains(&size_mib) {
        return Err(Error::Setup(format!(
            "volume size {size_mib} MB is out of range (16 MB - 16 TB)"
        )));
    }
    let (img, _) = volume_paths(name)?;
    if img.exists() {
        return Err(Error::Setup(format!(
            "volume {name} already exists (remove it with: airlock volume rm {name})"
        )));
    }
    std::fs::create_dir_all(img.parent().unwrap())?;
    let args = [
        "-E",
        "lazy_itable_init=1,nodiscard,root_owner=0:0",
        "-L",
        "airlock-vol",
    ]
    .map(Into::into);
    if !crate::rootfs::mkfs_ext4(&args, &img, &format!("{size_mib}M")).map_err(Error::Setup)? {
        return Err(Error::Setup(format!(
            "volume {name} was created by someone else meanwhile (use it, or remove it with: airlock volume rm {name})"
        )));
    }
    volume_info(name)
}

fn volume_info(name: &str) -> Result<VolumeInfo, Error> {
    use std::os::unix::fs::MetadataExt;
    let (img, lock) = volume_paths(name)?;
    let m = std::fs::metadata(&img).map_err(|_| {
        Error::Setup(format!(
            "no volume {name} (create it with: airlock volume create {name})"
        ))
    })?;
    let in_use = match File::open(&lock) {
        Ok(f) => !try_lock(&f, false),
        Err(_) => false,
    };
    Ok(VolumeInfo {
        name: name.into(),
        size_mib: m.len() >> 20,
        used_bytes: m.blocks() * 512,
        in_use,
        path: img,
    })
}

/// All volumes, by name.
pub fn volume_list() -> Result<Vec<VolumeInfo>, Error> {
    let d = volumes_dir()?;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&d) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = n.strip_suffix(".ext4") {
            if volume_name_ok(name).is_ok() {
                out.push(volume_info(name)?);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes a volume; refused while a sandbox uses it.
pub fn volume_remove(name: &str) -> Result<(), Error> {
    let lease = VolumeLease::acquire(name)?;
    std::fs::remove_file(&lease.image)?;
    let _ = std::fs::remove_file(&lease.lock_path);
    Ok(())
}

fn try_lock(f: &File, keep: bool) -> bool {
    // SAFETY: flock on a valid fd.
    let ok = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 };
    if ok && !keep {
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
    }
    ok
}

/// Exclusive use of a volume (an flock held while the sandbox lives).
#[derive(Debug)]
pub struct VolumeLease {
    /// The ext4 image.
    pub image: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl VolumeLease {
    /// Takes the volume, or says who has it.
    pub fn acquire(name: &str) -> Result<VolumeLease, Error> {
        let (image, lock_path) = volume_paths(name)?;
        if !image.is_file() {
            return Err(Error::Setup(format!(
                "no volume {name} (create it with: airlock volume create {name})"
            )));
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        if !try_lock(&f, true) {
            return Err(Error::Setup(format!(
                "volume {name} is in use by another sandbox; a volume serves one sandbox at a time"
            )));
        }
        Ok(VolumeLease {
            image,
            lock_path,
            _lock: f,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mounts() {
        let m: Mount = "./app:/workspace".parse().unwrap();
        assert_eq!(
            m,
            Mount::Share(Share {
                host: "./app".into(),
                guest: "/workspace".into(),
                mode: ShareMode::Overlay
            })
        );
        let Mount::Share(s) = "/x:/w:rw".parse().unwrap() else {
            panic!()
        };
        assert_eq!(s.mode, ShareMode::Rw);
        let Mount::Share(s) = "/x:/w:ro".parse().unwrap() else {
            panic!()
        };
        assert_eq!(s.mode, ShareMode::Ro);
        assert_eq!(
            "cache:/data".parse::<Mount>().unwrap(),
            Mount::Volume(VolumeMount {
                name: "cache".into(),
                guest: "/data".into()
            })
        );
        for bad in [
            "/x",
            "/x:rel",
            "/x:/",
            "/x:/a/../b",
            "/x:/w:rx",
            "ca che:/d",
            "c:/d:rw",
            "a:b:c:d",
        ] {
            assert!(bad.parse::<Mount>().is_err(), "{bad}");
        }
    }
}

/// Most bytes of `share_diff` output the host accepts.
const MAX_DIFF_BYTES: usize = 64 << 20;

/// A change in an overlay share.
pub use airlock_proto::ShareChange;

impl crate::Sandbox {
    /// What the guest changed in its overlay shares (`added`, `modified`, `deleted` guest
    /// paths; directories that existed are not listed, their changed children are). Runs in
    /// the guest agent; the host tree is never touched.
    pub async fn share_diff(&self) -> Result<Vec<ShareChange>, Error> {
        self.builtin_json_lines("share-diff", MAX_DIFF_BYTES, "share diff")
            .await
    }

    /// Copies `guest_path` (a file or a directory tree) out of the sandbox to `host_dest`,
    /// which must not exist yet. Only regular files and directories are written on the host
    /// (symlinks, devices and anything else the guest sends are skipped and never created),
    /// each strictly inside `host_dest`; at most `max_bytes` are accepted. Modes are the
    /// guest's permission bits (never setuid/setgid/sticky, always owner read/write) less
    /// `umask` (`None`: this process's umask), as `cp` would give them.
    pub async fn copy_out(
        &self,
        guest_path: &str,
        host_dest: &std::path::Path,
        max_bytes: u64,
        umask: Option<u32>,
    ) -> Result<CopyOutSummary, Error> {
        let umask = umask.unwrap_or_else(process_umask) & 0o777;
        if host_dest.symlink_metadata().is_ok() {
            return Err(Error::Setup(format!(
                "{} already exists: give a new path",
                host_dest.display()
            )));
        }
        let parent = match host_dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tarball = tempfile_in(&parent)?;
        let mut spec = crate::ExecSpec::new([guest_path]);
        spec.builtin = Some("copy-out".into());
        let mut total = 0u64;
        let stderr = self
            .builtin_stream(spec, |chunk| {
                use std::io::Write;
                total += chunk.len() as u64;
                if total > max_bytes {
                    return Err(Error::Setup(format!(
                        "{guest_path} is larger than the {max_bytes}-byte limit"
                    )));
                }
                tarball.write_all(chunk).map_err(Error::Io)
            })
            .await?;
        if let Some(e) = stderr {
            return Err(Error::Setup(format!("copy out: {e}")));
        }
        let dest = host_dest.to_path_buf();
        let guest = guest_path.to_string();
        tokio::task::spawn_blocking(move || unpack_plain(tarball, &dest, umask, &guest))
            .await
            .map_err(|e| Error::Setup(e.to_string()))?
    }

    /// Copies host file or tree `host_src` into the sandbox at `guest_dest`, as `docker cp`
    /// does: into `guest_dest` when that is an existing directory, else as `guest_dest`.
    /// Symlinks go as symlinks; files arrive owned by root with their host modes. Returns the
    /// bytes sent.
    pub async fn copy_in(
        &self,
        host_src: &std::path::Path,
        guest_dest: &str,
    ) -> Result<u64, Error> {
        if !guest_dest.starts_with('/') {
            return Err(Error::Setup(format!(
                "{guest_dest}: give an absolute guest path"
            )));
        }
        let meta = std::fs::symlink_metadata(host_src)
            .map_err(|e| Error::Setup(format!("{}: {e}", host_src.display())))?;
        let name = host_src
            .file_name()
            .map(|n| n.to_os_string())
            .ok_or_else(|| {
                Error::Setup(format!("{}: name a file or directory", host_src.display()))
            })?;
        // Packed to an unnamed temporary file first: a tree that changes while being read is
        // then at least a tar tar can read back.
        let parent = std::env::temp_dir();
        let mut tarball = tempfile_in(&parent)?;
        let src = host_src.to_path_buf();
        let tarball = tokio::task::spawn_blocking(move || -> Result<File, Error> {
            use std::io::{Seek, SeekFrom};
            {
                let mut b = tar::Builder::new(&mut tarball);
                b.follow_symlinks(false);
                let r = if meta.is_dir() {
                    b.append_dir_all(&name, &src)
                } else {
                    b.append_path_with_name(&src, &name)
                };
                r.and_then(|()| b.finish())
                    .map_err(|e| Error::Setup(format!("{}: {e}", src.display())))?;
            }
            tarball.seek(SeekFrom::Start(0))?;
            Ok(tarball)
        })
        .await
        .map_err(|e| Error::Setup(e.to_string()))??;
        let mut exec = self
            .exec(crate::ExecSpec {
                argv: vec![guest_dest.to_string()],
                stdin: true,
                builtin: Some("copy-in".into()),
                ..Default::default()
            })
            .await?;
        let input = exec.input();
        let feed = crate::files::send_all(&input, tokio::fs::File::from_std(tarball));
        let drain = async {
            let mut stderr = Vec::new();
            loop {
                match exec.next().await? {
                    Some(crate::ExecEvent::Stderr(b)) if stderr.len() < 64 << 10 => {
                        stderr.extend_from_slice(&b)
                    }
                    Some(crate::ExecEvent::Exit(s)) => return Ok::<_, Error>((s, stderr)),
                    Some(crate::ExecEvent::Failed(f)) => return Err(Error::Exec(f)),
                    Some(_) => {}
                    None => return Err(Error::Protocol("copy-in ended without a status".into())),
                }
            }
        };
        let (sent, (status, stderr)) = tokio::try_join!(feed, drain)?;
        if status.code != Some(0) {
            return Err(Error::Setup(format!(
                "copy in: {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        Ok(sent)
    }

    /// Runs agent builtin `name` and parses its output, one JSON `T` a line; `what` names it in
    /// errors. The output comes from the guest: more than `max` bytes, or a bad line, is an
    /// error.
    pub(crate) async fn builtin_json_lines<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        max: usize,
        what: &str,
    ) -> Result<Vec<T>, Error> {
        let mut spec = crate::ExecSpec::new(Vec::<String>::new());
        spec.builtin = Some(name.into());
        let mut buf = Vec::new();
        let stderr = self
            .builtin_stream(spec, |chunk| {
                buf.extend_from_slice(chunk);
                if buf.len() > max {
                    return Err(Error::Protocol(format!(
                        "{what} larger than {} MiB",
                        max >> 20
                    )));
                }
                Ok(())
            })
            .await?;
        if let Some(e) = stderr {
            return Err(Error::Setup(format!("{what}: {e}")));
        }
        buf.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<T>(l)
                    .map_err(|e| Error::Protocol(format!("bad {what} line from the guest: {e}")))
            })
            .collect()
    }

    /// Runs a builtin, feeding stdout to `sink`; returns its stderr if it failed.
    pub(crate) async fn builtin_stream(
        &self,
        spec: crate::ExecSpec,
        mut sink: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<Option<String>, Error> {
        let mut e = self.exec(spec).await?;
        let mut err = Vec::new();
        loop {
            match e.next().await? {
                Some(crate::ExecEvent::Stdout(b)) => sink(&b)?,
                Some(crate::ExecEvent::Stderr(b)) => {
                    if err.len() < 64 << 10 {
                        err.extend_from_slice(&b);
                    }
                }
                Some(crate::ExecEvent::Exit(s)) => {
                    return Ok((s.code != Some(0))
                        .then(|| String::from_utf8_lossy(&err).trim().to_string()));
                }
                Some(crate::ExecEvent::Failed(f)) => return Err(Error::Exec(f)),
                Some(crate::ExecEvent::Started(_)) => {}
                None => return Err(Error::Protocol("builtin ended without a status".into())),
            }
        }
    }
}

/// What [`crate::Sandbox::copy_out`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyOutSummary {
    /// Regular files written.
    pub files: u64,
    /// Directories made.
    pub dirs: u64,
    /// Entries skipped (symlinks, devices, unsafe names).
    pub skipped: u64,
}

fn tempfile_in(dir: &std::path::Path) -> Result<File, Error> {
    // O_TMPFILE: never visible by name, gone when dropped.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(|e| Error::Setup(format!("temporary file in {}: {e}", dir.display())))
}

use std::os::unix::fs::OpenOptionsExt;

/// This process's umask, read without changing it (`umask(2)` would, for every thread).
pub fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// The host mode of a copied entry: the guest's permission bits, owner rw(x) kept so the user
/// can always clean up, special bits dropped, less `umask`.
fn copied_mode(guest_mode: u32, dir: bool, umask: u32) -> u32 {
    let owner = if dir { 0o700 } else { 0o600 };
    ((guest_mode & 0o777) | owner) & !umask
}

/// Makes directory `path` (its parent exists) with exactly `mode`: set through an fd opened
/// without following links, so the process umask and a swapped name change nothing.
fn make_dir(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        // Made earlier as a parent of something the archive listed first.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    d.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Unpacks only plain files and directories with relative, `..`-free names under `dest`.
/// Nothing else is created, so no entry can redirect a later one through a link; `dest` itself
/// is made only once the archive's top entry turns out to be a file or a directory.
fn unpack_plain(
    mut tarball: File,
    dest: &std::path::Path,
    umask: u32,
    guest_path: &str,
) -> Result<CopyOutSummary, Error> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::PermissionsExt;
    use std::path::Component;
    tarball.seek(SeekFrom::Start(0))?;
    let mut ar = tar::Archive::new(tarball);
    let mut sum = CopyOutSummary::default();
    let bad = |e: std::io::Error| Error::Protocol(format!("bad archive from the guest: {e}"));
    // Whether dest is a directory we made (so later entries may go inside it).
    let mut dest_dir = false;
    let mut first = true;
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let kind = entry.header().entry_type();
        let guest_mode = entry.header().mode().unwrap_or(0o644);
        let was_first = std::mem::replace(&mut first, false);
        // The archive's top entry is the copied thing itself; dest takes its place.
        let rel: PathBuf = path.components().skip(1).collect();
        let safe = path.components().all(|c| matches!(c, Component::Normal(_)));
        let top = rel.as_os_str().is_empty();
        if was_first && !(top && safe && (kind.is_dir() || kind.is_file())) {
            // A symlink, device or odd name at the top: nothing to copy, nothing made.
            return Err(Error::Setup(format!(
                "{guest_path} is not a regular file or directory in the sandbox (a symlink? \
                 copy the path it points to); nothing was copied"
            )));
        }
        if !safe || (!top && !dest_dir) {
            sum.skipped += 1;
            continue;
        }
        let target = if top {
            dest.to_path_buf()
        } else {
            dest.join(&rel)
        };
        if kind.is_dir() {
            if let Some(p) = target.parent().filter(|_| !top) {
                mkdirs(dest, p, umask)?;
            }
            make_dir(&target, copied_mode(guest_mode, true, umask))?;
            dest_dir |= top;
            sum.dirs += 1;
        } else if kind.is_file() {
            if let Some(p) = target.parent().filter(|_| !top) {
                mkdirs(dest, p, umask)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)?;
            std::io::copy(&mut entry, &mut f)?;
            f.set_permissions(std::fs::Permissions::from_mode(copied_mode(
                guest_mode, false, umask,
            )))?;
            sum.files += 1;
        } else {
            sum.skipped += 1;
        }
    }
    if first {
        return Err(Error::Protocol(format!(
            "the sandbox sent nothing for {guest_path}; nothing was copied"
        )));
    }
    Ok(sum)
}

/// Makes the missing directories between `dest` (exists) and `dir`, as `mkdir -p` would.
fn mkdirs(dest: &std::path::Path, dir: &std::path::Path, umask: u32) -> std::io::Result<()> {
    if dir == dest || dir.is_dir() {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        mkdirs(dest, p, umask)?;
    }
    make_dir(dir, 0o777 & !umask | 0o700)
}
