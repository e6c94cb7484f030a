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

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a valid fd.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A sandbox's state directory, removed on drop.
pub struct StateDir {
    path: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates `<runtime dir>/<id>` (mode 0700) and locks it; sweeps directories of dead owners.
    pub fn create(id: &str) -> Result<StateDir, Error> {
        let root = runtime_dir();
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::Setup(format!("create {}: {e}", root.display())))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700));
        sweep(&root);
        let path = root.join(id);
        std::fs::create_dir(&path)
            .map_err(|e| Error::Setup(format!("create {}: {e}", path.display())))?;
        // Locked before it gets the name a concurrent sweep looks for, or another sandbox
        // starting at the same moment could take the lock first and remove this directory.
        let lock = File::create(path.join("lock.new"))?;
        if !try_lock(&lock) {
            return Err(Error::Setup(format!(
                "{} is locked by another process",
                path.display()
            )));
        }
        std::fs::rename(path.join("lock.new"), path.join("lock"))?;
        Ok(StateDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records which image the sandbox runs, so `image rm` can refuse it while in use.
    pub fn set_image(&self, manifest_digest: &str) -> std::io::Result<()> {
        std::fs::write(self.path.join("image"), manifest_digest)
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
