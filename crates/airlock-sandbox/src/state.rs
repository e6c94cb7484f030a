//! Per-sandbox state directories: `<runtime dir>/<id>/` holds the console log and the writable
//! disk, and a `lock` file the owning process keeps locked. A directory whose lock can be taken
//! belongs to a process that died (kill -9) and is removed by the next sandbox start.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::Error;

/// `AIRLOCK_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/airlock`, else `/tmp/airlock-<uid>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AIRLOCK_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("airlock");
    }
    // SAFETY: getuid cannot fail.
    PathBuf::from(format!("/tmp/airlock-{}", unsafe { libc::getuid() }))
}

/// [`runtime_dir`], created if missing and checked to be private: every caller that writes under
/// it goes through here. Under a shared `/tmp` another local user could pre-create it and read
/// or write the guest's disk, so one not ours, not a real directory, or open to group/other is
/// refused rather than used.
pub fn private_runtime_dir() -> Result<PathBuf, Error> {
    let dir = runtime_dir();
    private_dir(&dir).map_err(Error::Setup)?;
    Ok(dir)
}

/// Creates `dir` (mode 0700, parents as needed) if missing, then checks with lstat that it is a
/// directory (not a symlink), owned by this user, that nobody else may write in. One of ours
/// that others may only read or enter (a `mkdir` under umask 022) is tightened to 0700.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
    }
    // The mode is given at mkdir, so there is no moment at which the directory is open.
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("create {}: {e}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let problem = if m.file_type().is_symlink() {
        "is a symlink".to_string()
    } else if !m.is_dir() {
        "is not a directory".to_string()
    } else if m.uid() != me {
        format!("is owned by uid {}, not by you (uid {me})", m.uid())
    } else if m.mode() & 0o022 != 0 {
        // Others could have planted entries in it already: tightening now would be too late.
        format!(
            "has mode {:o}: group/other may write in it",
            m.mode() & 0o7777
        )
    } else if m.mode() & 0o077 != 0 {
        // Ours, and nobody else could add to it: close it (through an fd that is known to be
        // this very directory, so a swap between the check and the chmod changes nothing).
        return tighten(dir, &m);
    } else {
        return Ok(());
    };
    Err(format!(
        "refusing the runtime directory {}: it {problem}, so another user could read or \
         change sandbox disks and sockets. Remove it (or `chmod 700` it if it is yours), or set \
         AIRLOCK_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a private directory",
        dir.display()
    ))
}

/// Sets mode 0700 on `dir`, opened without following symlinks and checked to be the inode `m`
/// describes.
fn tighten(dir: &Path, m: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| format!("open {}: {e}", dir.display()))?;
    let now = f
        .metadata()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    if (now.dev(), now.ino(), now.uid()) != (m.dev(), m.ino(), m.uid()) {
        return Err(format!(
            "{} changed while being checked; try again",
            dir.display()
        ));
    }
    f.set_permissions(std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod 700 {}: {e}", dir.display()))
}

/// Creates a new file readable and writable by this user only, whatever the umask.
pub fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a valid fd.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A sandbox's state directory, removed on drop.
pub struct StateDir {
    path: PathBuf,
    /// `None` for a directory adopted from a pool holder, which keeps it locked.
    _lock: Option<File>,
}

impl StateDir {
    /// Creates `<runtime dir>/<id>` (mode 0700) and locks it; sweeps directories of dead owners.
    pub fn create(id: &str) -> Result<StateDir, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let root = private_runtime_dir()?;
        sweep(&root);
        let path = root.join(id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::Setup(format!("create {}: {e}", path.display())))?;
        // Locked before it gets the name a concurrent sweep looks for, or another sandbox
        // starting at the same moment could take the lock first and remove this directory.
        let lock = private_file(&path.join("lock.new"))?;
        // QEMU opens the console log without a mode of its own; made here it is private.
        private_file(&path.join("console.log"))?;
        if !try_lock(&lock) {
            return Err(Error::Setup(format!(
                "{} is locked by another process",
                path.display()
            )));
        }
        std::fs::rename(path.join("lock.new"), path.join("lock"))?;
        Ok(StateDir {
            path,
            _lock: Some(lock),
        })
    }

    /// Takes over `<runtime dir>/<id>` of a sandbox claimed from a pool held by another
    /// process: that process keeps the lock (and removes the directory when the claim ends);
    /// this one removes it when dropped, too.
    pub(crate) fn adopt(id: &str) -> Result<StateDir, Error> {
        if !crate::is_id(id) {
            return Err(Error::Protocol(format!(
                "pool holder sent a bad sandbox id {id:?}"
            )));
        }
        let path = private_runtime_dir()?.join(id);
        if !path.join("lock").is_file() {
            return Err(Error::Setup(format!(
                "{} is not a sandbox state directory",
                path.display()
            )));
        }
        Ok(StateDir { path, _lock: None })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records which image the sandbox runs, so `image rm` can refuse it while in use.
    pub fn set_image(&self, manifest_digest: &str) -> std::io::Result<()> {
        use std::io::Write;
        private_file(&self.path.join("image"))?.write_all(manifest_digest.as_bytes())
    }

    /// The guest console log.
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// The last `n` lines of the console log.
    pub fn console_tail(&self, n: usize) -> String {
        let bytes = std::fs::read(self.console_log()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Ids of live sandboxes (their owner holds the lock) using each image manifest digest.
pub fn images_in_use() -> std::collections::HashMap<String, Vec<String>> {
    let mut used: std::collections::HashMap<String, Vec<String>> = Default::default();
    let Ok(entries) = std::fs::read_dir(runtime_dir()) else {
        return used;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(digest) = std::fs::read_to_string(p.join("image")) else {
            continue;
        };
        let Ok(f) = File::open(p.join("lock")) else {
            continue;
        };
        if !try_lock(&f) {
            used.entry(digest.trim().to_string())
                .or_default()
                .push(e.file_name().to_string_lossy().into_owned());
        }
    }
    used
}

/// Removes state directories whose owner is gone.
pub(crate) fn sweep(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(f) = File::open(p.join("lock")) else {
            continue;
        };
        if try_lock(&f) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}
