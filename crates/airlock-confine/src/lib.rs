//! Confinement for the threads of Airlock's own process that parse guest bytes: the netstack
//! (ethernet frames, DNS, TLS, HTTP) and the virtio-fs servers (FUSE requests).
//!
//! Each such thread calls [`seccomp`] (and the fs server also [`landlock`]) before it reads
//! its first guest byte. Both act on the calling thread only and are inherited by the threads
//! it spawns, so the rest of Airlock (the CLI, the supervisor, QEMU's launcher) is unaffected.
//! A device thread that a hostile guest managed to take over still cannot execute a program,
//! fork, trace or read another process, change its credentials, mount, load kernel code or
//! (the fs server) open a file outside its share or an internet socket.
//!
//! The seccomp filter is a deny list, not an allow list: these threads run tokio, rustls,
//! glibc's resolver (which may `dlopen` NSS modules) and rust-vmm crates whose exact syscall
//! sets change between versions and libc builds; an allow list that misses one turns a
//! library update into a guest-triggered outage. The list holds every syscall these threads
//! never need that widens what a compromised thread could do.

use std::collections::BTreeMap;
use std::path::PathBuf;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which device thread is being confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The netstack and its proxies: needs internet sockets.
    Netstack,
    /// A virtio-fs server: needs only files under its share and the vhost-user socket.
    FsServer,
}

/// Why confinement could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The seccomp filter could not be built or installed.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
    /// The landlock ruleset could not be built or installed.
    #[error("cannot install the landlock ruleset: {0}")]
    Landlock(String),
}

/// Syscalls no device thread needs; each answers `EPERM`.
const DENIED: &[i64] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_mount_setattr,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capset,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_personality,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_uselib,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    // io_uring submissions are not seen by seccomp: a thread with a ring bypasses this filter.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

fn cond(arg: u8, op: SeccompCmpOp, val: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, val)
        .map_err(|e| Error::Seccomp(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conds).map_err(|e| Error::Seccomp(e.to_string()))
}

fn arch() -> Result<TargetArch, Error> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, on_match: u32) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(on_match),
        arch()?,
    )
    .map_err(|e| Error::Seccomp(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

/// The filter programs for `role`: the deny list (`EPERM`), then `clone3` answered `ENOSYS`
/// so that thread creation falls back to `clone`, whose flags a classic filter can inspect
/// (`clone3` passes them in memory).
fn programs(role: Role) -> Result<Vec<BpfProgram>, Error> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // New threads only: a clone without CLONE_THREAD is a new process.
    deny.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])?],
    );
    if role == Role::FsServer {
        // The fs server already holds its vhost-user socket; it never needs a new one other
        // than a unix socket (tracing writers may), and never an internet or netlink one.
        deny.insert(
            libc::SYS_socket,
            vec![rule(vec![cond(
                0,
                SeccompCmpOp::Ne,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    let clone3: BTreeMap<i64, Vec<SeccompRule>> =
        [(libc::SYS_clone3, Vec::new())].into_iter().collect();
    Ok(vec![
        compile(deny, libc::EPERM as u32)?,
        compile(clone3, libc::ENOSYS as u32)?,
    ])
}

/// Installs the seccomp filter for `role` on the calling thread (and sets its no_new_privs,
/// which seccomp requires of an unprivileged caller). Threads it creates afterwards inherit it.
pub fn seccomp(role: Role) -> Result<(), Error> {
    for p in programs(role)? {
        seccompiler::apply_filter(&p).map_err(|e| Error::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// A directory a confined fs server may reach, and how.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// The directory (its whole tree).
    pub path: PathBuf,
    /// Whether files under it may be changed.
    pub writable: bool,
}

/// What [`landlock`] achieved on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landlock {
    /// Every requested restriction is in force.
    Full,
    /// The kernel's landlock ABI is older than ours: some rights (e.g. TCP) are not restricted.
    Partial,
    /// The kernel has no landlock (or it is disabled): only seccomp confines the thread.
    Unavailable,
}

/// Restricts the calling thread (and threads it creates afterwards) to the trees in
/// `allowed`: no other file can be opened, created or executed, and with `no_tcp` (where the
/// kernel's landlock has network rules) no TCP port bound or connected. Best effort across
/// kernels: the result says how much is enforced; an error means the ruleset was refused.
pub fn landlock(allowed: &[Allowed], no_tcp: bool) -> Result<Landlock, Error> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let err = |e: landlock::RulesetError| Error::Landlock(e.to_string());
    let mut rs = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?;
    if no_tcp {
        rs = rs.handle_access(AccessNet::from_all(abi)).map_err(err)?;
    }
    let mut rs = rs.create().map_err(err)?;
    for a in allowed {
        let access = if a.writable {
            AccessFs::from_all(abi)
        } else {
            AccessFs::from_read(abi)
        };
        rs = rs
            .add_rules(path_beneath_rules([&a.path], access))
            .map_err(err)?;
    }
    let st = rs.restrict_self().map_err(err)?;
    Ok(match st.ruleset {
        RulesetStatus::FullyEnforced => Landlock::Full,
        RulesetStatus::PartiallyEnforced => Landlock::Partial,
        _ => Landlock::Unavailable,
    })
}

/// Applies both confinements for a virtio-fs server thread. Landlock that the kernel lacks is
/// logged, not fatal (seccomp still holds); a failure to install either filter is an error.
pub fn fs_server(allowed: &[Allowed]) -> Result<Landlock, Error> {
    let ll = landlock(allowed, true)?;
    if ll != Landlock::Full {
        tracing::debug!(?ll, "landlock is not fully available on this kernel");
    }
    seccomp(Role::FsServer)?;
    Ok(ll)
}

/// System trees the netstack reads after it starts: glibc's resolver configuration and the
/// NSS modules it loads (`/etc`, `/usr`, `/lib*`; `/run` for a systemd-resolved resolv.conf).
const NETSTACK_READS: &[&str] = &["/etc", "/usr", "/lib", "/lib64", "/run"];

/// Applies both confinements for the netstack thread: seccomp, and landlock allowing only
/// reads of [`NETSTACK_READS`] (nothing on the host can be written or created by it; its
/// audit file is opened before). TCP stays open: dialling upstreams is its job.
pub fn netstack() -> Result<Landlock, Error> {
    let allowed: Vec<Allowed> = NETSTACK_READS
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .map(|path| Allowed {
            path,
            writable: false,
        })
        .collect();
    let ll = landlock(&allowed, false)?;
    seccomp(Role::Netstack)?;
    Ok(ll)
}

/// What confinement this host gives device threads, tried on a throw-away thread: `Ok` with
/// the landlock level (seccomp held), or why it failed (sandboxes would fail to start too).
pub fn probe() -> Result<Landlock, Error> {
    let dir = std::env::temp_dir();
    std::thread::spawn(move || {
        fs_server(&[Allowed {
            path: dir,
            writable: false,
        }])
    })
    .join()
    .unwrap_or_else(|_| Err(Error::Seccomp("the probe thread panicked".into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    /// Runs `f` on a new thread (filters are per thread and cannot be removed).
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("thread panicked")
    }

    fn status_field(name: &str) -> String {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    }

    #[test]
    fn netstack_filter_blocks_exec_fork_and_ptrace_but_not_threads_or_sockets() {
        on_thread(|| {
            seccomp(Role::Netstack).unwrap();
            assert_eq!(status_field("Seccomp:"), "2");
            assert_eq!(status_field("NoNewPrivs:"), "1");
            let e = std::process::Command::new("/bin/true")
                .status()
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
            // SAFETY: a child, if the filter failed to stop the fork, exits at once.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe { libc::_exit(0) };
            }
            assert_eq!(pid, -1);
            // Reading our own memory through process_vm_readv: allowed without the filter.
            let src = [1u8; 8];
            let mut dst = [0u8; 8];
            let l = libc::iovec {
                iov_base: dst.as_mut_ptr().cast(),
                iov_len: 8,
            };
            let r = libc::iovec {
                iov_base: src.as_ptr() as *mut _,
                iov_len: 8,
            };
            // SAFETY: both iovecs point at live 8-byte buffers of this thread.
            let n = unsafe { libc::process_vm_readv(libc::getpid(), &l, 1, &r, 1, 0) };
            assert_eq!(n, -1);
            // The raw syscall: glibc's setuid() would also change the other (unfiltered)
            // threads and abort when this one refuses.
            // SAFETY: plain syscall.
            assert_eq!(unsafe { libc::syscall(libc::SYS_setuid, 0) }, -1);
            // Threads and internet sockets still work (the proxy needs both).
            let t = std::thread::spawn(|| 7).join().unwrap();
            assert_eq!(t, 7);
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            std::net::TcpStream::connect(a).unwrap();
        });
        // The whole netstack confinement: resolving still works, writing anywhere does not.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        on_thread(move || {
            let ll = netstack().unwrap();
            use std::net::ToSocketAddrs;
            assert!(("localhost", 80)
                .to_socket_addrs()
                .unwrap()
                .next()
                .is_some());
            if ll != Landlock::Unavailable {
                assert!(std::fs::write(d.join("planted"), "x").is_err());
            }
        });
        assert!(!dir.path().join("planted").exists());
        // The rest of the process is untouched.
        assert!(std::process::Command::new("/bin/true")
            .status()
            .unwrap()
            .success());
    }

    #[test]
    fn fs_server_reaches_only_its_share() {
        let share = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::fs::write(share.path().join("f"), "in").unwrap();
        let (sp, op) = (share.path().to_path_buf(), outside.path().to_path_buf());
        let ll = on_thread(move || {
            let ll = fs_server(&[Allowed {
                path: sp.clone(),
                writable: true,
            }])
            .unwrap();
            assert_eq!(std::fs::read_to_string(sp.join("f")).unwrap(), "in");
            std::fs::write(sp.join("new"), "x").unwrap();
            if ll != Landlock::Unavailable {
                let e = std::fs::read(op.join("secret")).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::PermissionDenied);
                assert!(std::fs::write(op.join("planted"), "x").is_err());
                assert!(std::fs::read("/etc/passwd").is_err());
            }
            assert!(std::net::TcpStream::connect("127.0.0.1:9").is_err());
            // SAFETY: plain syscall.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            assert_eq!(fd, -1);
            ll
        });
        assert!(!outside.path().join("planted").exists());
        // This machine's kernel has landlock; say so if a machine without it runs the tests.
        eprintln!("landlock: {ll:?}");
    }

    #[test]
    fn read_only_share_refuses_writes() {
        let share = tempfile::tempdir().unwrap();
        std::fs::write(share.path().join("f"), "in").unwrap();
        let sp = share.path().to_path_buf();
        let ll = on_thread(move || {
            let ll = landlock(
                &[Allowed {
                    path: sp.clone(),
                    writable: false,
                }],
                true,
            )
            .unwrap();
            assert_eq!(std::fs::read_to_string(sp.join("f")).unwrap(), "in");
            if ll != Landlock::Unavailable {
                assert!(std::fs::write(sp.join("f"), "changed").is_err());
            }
            ll
        });
        if ll != Landlock::Unavailable {
            assert_eq!(
                std::fs::read_to_string(share.path().join("f")).unwrap(),
                "in"
            );
        }
    }
}
