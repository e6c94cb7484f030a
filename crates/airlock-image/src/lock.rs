//! `flock(2)` helpers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Lock mode.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
}

/// An open lock file holding an `flock`; released when dropped (the fd is closed).
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn op(mode: Mode) -> libc::c_int {
    match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    }
}

impl FileLock {
    /// Opens (creating if needed) `path` and blocks until the lock is held.
    pub(crate) fn acquire(path: &Path, mode: Mode) -> io::Result<FileLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        flock(&file, op(mode))?;
        Ok(FileLock { _file: file })
    }

    /// Like [`FileLock::acquire`] but runs the blocking wait on tokio's blocking pool.
    pub(crate) async fn acquire_async(path: &Path, mode: Mode) -> io::Result<FileLock> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || FileLock::acquire(&path, mode))
            .await
            .map_err(io::Error::other)?
    }
}

/// Takes an exclusive lock on an already open file.
pub(crate) fn lock_file_exclusive(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_EX)
}

/// Tries to take an exclusive lock without blocking; `Ok(false)` if someone else holds one.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}
