//! The exec fast path: `posix_spawn` (glibc's clone(CLONE_VM | CLONE_VFORK)) for the common
//! command, root without a terminal, instead of std's fork. Under TCG a fork copies the
//! agent's page tables through the emulated MMU, which made it the largest part of an exec's
//! round trip; vfork-style spawning shares them until the exec.
//!
//! std's `Command` would pick posix_spawn itself only without `pre_exec`, uid/gid changes and a
//! search `PATH` in the new environment, and (in a static binary) without a working directory:
//! every exec here has some of those, so the call is made directly. Anything this path cannot
//! do (a terminal, another user, a script without `#!`) goes through `Command` as before.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where a spawned command's standard streams go: our ends of its pipes are returned.
pub struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// Our end of its stdin, when it reads one.
    pub stdin: Option<OwnedFd>,
    /// Our end of its stdout.
    pub stdout: OwnedFd,
    /// Our end of its stderr.
    pub stderr: OwnedFd,
}

/// The program `argv0` names: itself when it holds a `/`, else the first executable regular
/// file of that name on `path` (the new environment's `PATH`, as execvp would search it).
pub fn find_program(argv0: &str, path: &str) -> Option<PathBuf> {
    if argv0.contains('/') {
        return Some(PathBuf::from(argv0));
    }
    path.split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| Path::new(d).join(argv0))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn cstr(s: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn check(r: libc::c_int) -> io::Result<()> {
    // posix_spawn* return the error number instead of setting errno.
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// RAII owners of the spawn attribute objects.
struct Attrs(libc::posix_spawnattr_t, libc::posix_spawn_file_actions_t);

impl Drop for Attrs {
    fn drop(&mut self) {
        // SAFETY: both were initialised by `spawn` before an `Attrs` was made.
        unsafe {
            libc::posix_spawnattr_destroy(&mut self.0);
            libc::posix_spawn_file_actions_destroy(&mut self.1);
        }
    }
}

/// Spawns `program` with `argv` and exactly `env`, in `cwd`, in a session of its own, with
/// default signal dispositions and an empty signal mask, stdio on fresh pipes (stdin from
/// /dev/null unless `stdin`). The caller's credentials and capabilities are inherited.
pub fn spawn(
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    stdin: bool,
) -> io::Result<Spawned> {
    let prog = cstr(program)?;
    let args: Vec<CString> = argv.iter().map(cstr).collect::<io::Result<_>>()?;
    let envs: Vec<CString> = env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}")))
        .collect::<io::Result<_>>()?;
    let cwd = cstr(cwd)?;
    let mut argp: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr() as *mut _).collect();
    argp.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = envs.iter().map(|e| e.as_ptr() as *mut _).collect();
    envp.push(std::ptr::null_mut());

    let (in_r, in_w) = if stdin {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        (std::fs::File::open("/dev/null")?.into(), None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;

    // SAFETY: the attribute objects are initialised before use and destroyed by `Attrs`; every
    // pointer handed to posix_spawn (program, argv, envp, cwd) outlives the call, and the fds
    // named in the file actions are open until it returns.
    unsafe {
        let mut a = Attrs(std::mem::zeroed(), std::mem::zeroed());
        check(libc::posix_spawnattr_init(&mut a.0))?;
        if let Err(e) = check(libc::posix_spawn_file_actions_init(&mut a.1)) {
            libc::posix_spawnattr_destroy(&mut a.0);
            return Err(e);
        }
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigemptyset(&mut none);
        check(libc::posix_spawnattr_setsigdefault(&mut a.0, &all))?;
        check(libc::posix_spawnattr_setsigmask(&mut a.0, &none))?;
        let flags = libc::POSIX_SPAWN_SETSID as i32
            | libc::POSIX_SPAWN_SETSIGDEF as i32
            | libc::POSIX_SPAWN_SETSIGMASK as i32;
        check(libc::posix_spawnattr_setflags(
            &mut a.0,
            flags as libc::c_short,
        ))?;
        for (fd, to) in [
            (in_r.as_raw_fd(), 0),
            (out_w.as_raw_fd(), 1),
            (err_w.as_raw_fd(), 2),
        ] {
            check(libc::posix_spawn_file_actions_adddup2(&mut a.1, fd, to))?;
        }
        check(libc::posix_spawn_file_actions_addchdir_np(
            &mut a.1,
            cwd.as_ptr(),
        ))?;
        let mut pid: libc::pid_t = 0;
        check(libc::posix_spawn(
            &mut pid,
            prog.as_ptr(),
            &a.1,
            &a.0,
            argp.as_ptr(),
            envp.as_ptr(),
        ))?;
        Ok(Spawned {
            pid,
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn finds_programs_as_execvp_would() {
        assert_eq!(find_program("/x/y", ""), Some(PathBuf::from("/x/y")));
        assert_eq!(find_program("./y", ""), Some(PathBuf::from("./y")));
        assert_eq!(
            find_program("sh", "/nonexistent:/bin"),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(find_program("no-such-program-here", "/bin:/usr/bin"), None);
        // A directory or a non-executable file is not a program.
        assert_eq!(find_program("tmp", "/"), None);
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "x").unwrap();
        assert_eq!(find_program("f", d.path().to_str().unwrap()), None);
    }

    #[test]
    fn spawns_with_exactly_the_env_cwd_and_a_new_session() {
        let env = vec![("A".to_string(), "1".to_string())];
        let argv: Vec<String> = [
            "sh",
            "-c",
            "echo $A $(pwd) $$ $(cut -d' ' -f6 /proc/$$/stat); cat; echo err >&2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = spawn(Path::new("/bin/sh"), &argv, &env, "/tmp", true).unwrap();
        {
            use std::io::Write;
            let mut w = std::fs::File::from(s.stdin.unwrap());
            w.write_all(b"in\n").unwrap();
        }
        let mut out = String::new();
        std::fs::File::from(s.stdout)
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        std::fs::File::from(s.stderr)
            .read_to_string(&mut err)
            .unwrap();
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        assert_eq!(unsafe { libc::waitpid(s.pid, &mut status, 0) }, s.pid);
        // The sixth field of /proc/PID/stat is the session: its own (setsid).
        assert_eq!(out, format!("1 /tmp {0} {0}\nin\n", s.pid));
        assert_eq!(err, "err\n");
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        let e = spawn(Path::new("/nonexistent/x"), &argv, &env, "/", false)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
