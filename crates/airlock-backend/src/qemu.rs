//! QEMU `-M microvm` backend.
//!
//! One QEMU process per sandbox, started with only the devices a sandbox needs, `-nodefaults`,
//! `-no-user-config` and `-sandbox on` (seccomp). It never outlives Airlock: the thread that
//! spawns it stays parked in `wait()` for its whole life, and the child has
//! `PR_SET_PDEATHSIG(SIGKILL)`, so even `kill -9` of Airlock takes QEMU down. It runs in its
//! own process group so a terminal's Ctrl-C reaches Airlock (which forwards it to the guest
//! process), not the VM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{Accel, Backend, BackendError, Vm, VmConfig, VmExit, CONTROL_PORT_NAME};

/// Kernel command line every sandbox gets: quiet, fast, and a reboot that ends QEMU.
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet reboot=t panic=-1 i8042.noaux i8042.nomux \
i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check rdinit=/init";

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// QEMU binary (`AIRLOCK_QEMU`, else `qemu-system-x86_64` from PATH).
    pub binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: std::env::var_os("AIRLOCK_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
        }
    }
}

impl Qemu {
    /// The first line of `qemu --version`, or why it could not be run.
    pub fn version(&self) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", self.binary.display()))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string())
    }

    /// The argument vector for `cfg`, with the control channel at fd `control_fd` and the
    /// NIC's socket (if `cfg.nic`) at `nic_fd`.
    pub fn args(cfg: &VmConfig, control_fd: RawFd, nic_fd: Option<RawFd>) -> Vec<String> {
        Qemu::args_with(cfg, control_fd, nic_fd, None)
    }

    /// [`Qemu::args`] with the QMP monitor socket at `monitor_fd`.
    pub fn args_with(
        cfg: &VmConfig,
        control_fd: RawFd,
        nic_fd: Option<RawFd>,
        monitor_fd: Option<RawFd>,
    ) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        // The CMOS RTC stays on: without it the guest kernel's wall-clock read at boot spins
        // ~1 s on the update-in-progress bit of an absent chip. The guest has no RTC driver
        // (kernel/config), so the fifth virtio-mmio transport's legacy IRQ 8 has no other
        // claimant; the guest clock comes from the host in `Init`.
        let machine = "microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=on";
        push(&["-M", machine]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ]);
        let cpus = cfg.cpus.max(1).to_string();
        match cfg.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg if cfg.cpus > 1 => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
            Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        let mem = format!("{}M", cfg.memory_mib);
        push(&["-smp", &cpus, "-m", &mem]);
        // vhost-user backends map guest RAM, so it must be a shared file mapping; snapshots
        // want a file too: written through (share=on) when one is taken, mapped
        // copy-on-write (share=off) when restored, and skipped by migration (x-ignore-shared).
        if let Some(f) = &cfg.shared_memory_file {
            let share = if cfg.memory_private { "off" } else { "on" };
            let obj = format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share={share}",
                qemu_escape(&f.to_string_lossy())
            );
            push(&["-object", &obj, "-machine", "memory-backend=mem"]);
        } else {
            // Named like the file backend, so a snapshot of any sandbox (its RAM block is
            // "mem" either way) restores into this form.
            let obj = format!("memory-backend-ram,id=mem,size={mem}");
            push(&["-object", &obj, "-machine", "memory-backend=mem"]);
        }
        let cmdline = format!("{BASE_CMDLINE} {}", cfg.cmdline_extra);
        push(&[
            "-kernel",
            &cfg.kernel.to_string_lossy(),
            "-initrd",
            &cfg.initrd.to_string_lossy(),
        ]);
        push(&["-append", cmdline.trim()]);
        let con = format!(
            "file,id=con,path={}",
            qemu_escape(&cfg.console_log.to_string_lossy())
        );
        push(&["-chardev", &con, "-serial", "chardev:con"]);
        let ctl = format!("socket,id=ctl,fd={control_fd}");
        let port = format!("virtserialport,chardev=ctl,name={CONTROL_PORT_NAME}");
        // max_ports=2 (port 0 is reserved for a console, ours is 1): at QEMU's default of 31
        // the guest's virtio_console probe sets up 64 virtqueues (33 ms under TCG, 7-21 with 2).
        push(&[
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &ctl,
            "-device",
            &port,
        ]);
        for (i, d) in cfg.disks.iter().enumerate() {
            let ro = if d.read_only { "on" } else { "off" };
            let drive = format!(
                "id=d{i},file={},format=raw,if=none,readonly={ro},discard=unmap",
                qemu_escape(&d.path.to_string_lossy())
            );
            let dev = format!("virtio-blk-device,drive=d{i},serial={}", d.serial);
            push(&["-drive", &drive, "-device", &dev]);
        }
        for (i, fs) in cfg.fs_devices.iter().enumerate() {
            let chr = format!(
                "socket,id=fs{i},path={}",
                qemu_escape(&fs.socket.to_string_lossy())
            );
            let dev = format!(
                "vhost-user-fs-device,chardev=fs{i},tag={}",
                qemu_escape(&fs.tag)
            );
            push(&["-chardev", &chr, "-device", &dev]);
        }
        #[cfg(feature = "bench-9p")]
        if let Some((dir, tag)) = &cfg.bench_9p {
            let fsdev = format!(
                "local,id=p9,path={},security_model=none",
                qemu_escape(&dir.to_string_lossy())
            );
            let dev = format!("virtio-9p-device,fsdev=p9,mount_tag={}", qemu_escape(tag));
            push(&["-fsdev", &fsdev, "-device", &dev]);
        }
        // The RNG is the one device a guest can do without (RDRAND, jitter entropy): it
        // yields its transport when shares and volumes need them all.
        if wants_rng(cfg) {
            push(&["-device", "virtio-rng-device"]);
        }
        if let (Some(nic), Some(fd)) = (&cfg.nic, nic_fd) {
            let m = nic.mac;
            let netdev = format!("stream,id=n0,server=off,addr.type=fd,addr.str={fd}");
            let dev = format!(
                "virtio-net-device,netdev=n0,mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            );
            push(&["-netdev", &netdev, "-device", &dev]);
        }
        if let Some(fd) = monitor_fd {
            let chr = format!("socket,id=mon,fd={fd}");
            push(&["-chardev", &chr, "-mon", "chardev=mon,mode=control"]);
        }
        if cfg.incoming.is_some() {
            push(&["-incoming", "defer"]);
        }
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        a
    }
}

/// virtio-mmio transports `-M microvm` offers without ACPI.
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// Devices a sandbox cannot run without: control port, disks, shares, NIC.
fn essential_devices(cfg: &VmConfig) -> usize {
    #[cfg(feature = "bench-9p")]
    let bench_9p = usize::from(cfg.bench_9p.is_some());
    #[cfg(not(feature = "bench-9p"))]
    let bench_9p = 0;
    1 + cfg.disks.len() + cfg.fs_devices.len() + bench_9p + usize::from(cfg.nic.is_some())
}

fn wants_rng(cfg: &VmConfig) -> bool {
    essential_devices(cfg) < MAX_VIRTIO_DEVICES
}

/// virtio-mmio devices [`Qemu::args`] creates: control port, disks, shares, NIC, and the RNG
/// when a transport is left for it.
pub fn virtio_device_count(cfg: &VmConfig) -> usize {
    essential_devices(cfg) + usize::from(wants_rng(cfg))
}

/// QEMU's option syntax doubles commas inside values.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn cvt(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

struct QemuVm {
    pid: u32,
    pidfd: OwnedFd,
    exit: tokio::sync::watch::Receiver<Option<VmExit>>,
    incoming: Option<RawFd>,
}

impl Vm for QemuVm {
    fn incoming_fd(&self) -> Option<i32> {
        self.incoming
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn pidfd(&self) -> Option<i32> {
        Some(self.pidfd.as_raw_fd())
    }

    fn kill(&self) {
        if self.exit.borrow().is_none() {
            crate::pidfd_kill(self.pidfd.as_raw_fd());
        }
    }

    fn exit_watch(&self) -> tokio::sync::watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn snapshot_binary(&self) -> Option<PathBuf> {
        Some(self.binary.clone())
    }

    fn launch(&self, cfg: VmConfig) -> Result<Box<dyn Vm>, BackendError> {
        let n = essential_devices(&cfg);
        if n > MAX_VIRTIO_DEVICES {
            return Err(BackendError::Host(format!(
                "this sandbox needs {n} virtio devices but the microvm machine has {MAX_VIRTIO_DEVICES}: \
                 use fewer shares and volumes (each takes one; the root, the writable layer, the \
                 control channel and the network take the others)"
            )));
        }
        // Move the control socket to a high fd number so nothing std does between fork and
        // exec (stdio, its error pipe) can collide with it; only the child clears CLOEXEC.
        // SAFETY: F_DUPFD_CLOEXEC on a valid fd; the result is a fresh fd we own.
        let high = unsafe {
            OwnedFd::from_raw_fd(
                cvt(libc::fcntl(
                    cfg.control.as_raw_fd(),
                    libc::F_DUPFD_CLOEXEC,
                    100,
                ))
                .map_err(|e| BackendError::Host(format!("dup control fd: {e}")))?,
            )
        };
        let nic_high = match &cfg.nic {
            // SAFETY: as above, for the NIC socket.
            Some(nic) => Some(unsafe {
                OwnedFd::from_raw_fd(
                    cvt(libc::fcntl(nic.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100))
                        .map_err(|e| BackendError::Host(format!("dup NIC fd: {e}")))?,
                )
            }),
            None => None,
        };
        let nic_fd = nic_high.as_ref().map(|f| f.as_raw_fd());
        let dup_high = |fd: &OwnedFd, what: &str| {
            // SAFETY: as above; the result is a fresh fd we own.
            cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) })
                .map(|n| unsafe { OwnedFd::from_raw_fd(n) })
                .map_err(|e| BackendError::Host(format!("dup {what} fd: {e}")))
        };
        let mon_high = cfg
            .monitor
            .as_ref()
            .map(|f| dup_high(f, "monitor"))
            .transpose()?;
        let inc_high = cfg
            .incoming
            .as_ref()
            .map(|f| dup_high(f, "incoming"))
            .transpose()?;
        let mon_fd = mon_high.as_ref().map(|f| f.as_raw_fd());
        let inc_fd = inc_high.as_ref().map(|f| f.as_raw_fd());
        let args = Qemu::args_with(&cfg, high.as_raw_fd(), nic_fd, mon_fd);
        tracing::debug!(binary = %self.binary.display(), ?args, "launching qemu");
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let fd = high.as_raw_fd();
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl, setpgid, umask) in the child.
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                cvt(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                if libc::getppid() != parent {
                    // Airlock died before the death signal was armed.
                    libc::_exit(1);
                }
                cvt(libc::setpgid(0, 0))?;
                // Whatever QEMU creates (console log, saved state) is the user's only.
                libc::umask(0o077);
                // QEMU never needs to gain privileges (no setuid helper, no file caps).
                cvt(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                cvt(libc::fcntl(fd, libc::F_SETFD, 0))?;
                for n in [nic_fd, mon_fd, inc_fd].into_iter().flatten() {
                    cvt(libc::fcntl(n, libc::F_SETFD, 0))?;
                }
                Ok(())
            });
        }

        let (tx, rx) = tokio::sync::watch::channel(None);
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let binary = self.binary.display().to_string();
        let console_log = cfg.console_log.clone();
        // The spawning thread is the child's "parent" for PR_SET_PDEATHSIG, so it lives
        // exactly as long as the child: spawn, report, wait, publish the exit.
        std::thread::Builder::new()
            .name("qemu-wait".into())
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                drop(cmd);
                let pid = child.id();
                // SAFETY: pidfd_open on our own, not yet reaped, child.
                let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
                let pidfd = if pidfd < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    // SAFETY: a fresh fd returned by pidfd_open.
                    Ok(unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) })
                };
                let stderr = child.stderr.take();
                let ok = pidfd.is_ok();
                let _ = started_tx.send(pidfd.map(|p| (pid, p)));
                if !ok {
                    let _ = child.kill();
                }
                // QEMU's own complaints (bad option, locked image) go to the console log so
                // failures can quote them.
                if let Some(mut err) = stderr {
                    let path = console_log.clone();
                    std::thread::spawn(move || {
                        let mut buf = Vec::new();
                        let _ = std::io::Read::read_to_end(&mut err, &mut buf);
                        if !buf.is_empty() {
                            use std::io::Write;
                            if let Ok(mut f) = std::fs::OpenOptions::new()
                                .append(true)
                                .create(true)
                                .open(&path)
                            {
                                let _ = f.write_all(b"\n[qemu] ");
                                let _ = f.write_all(&buf);
                            }
                        }
                    });
                }
                let status = child.wait();
                let exit = match status {
                    Ok(s) => VmExit {
                        code: s.code(),
                        signal: s.signal(),
                    },
                    Err(_) => VmExit {
                        code: None,
                        signal: None,
                    },
                };
                let _ = tx.send(Some(exit));
            })
            .map_err(|e| BackendError::Host(format!("spawn qemu thread: {e}")))?;

        let (pid, pidfd) = started_rx
            .recv()
            .map_err(|_| BackendError::Host("qemu thread vanished".into()))?
            .map_err(|source| BackendError::Spawn { binary, source })?;
        drop(high);
        drop(cfg.control);
        Ok(Box::new(QemuVm {
            pid,
            pidfd,
            exit: rx,
            incoming: inc_fd,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskConfig;

    /// A minimal configuration: 1 vCPU, 256 MiB, no disks or devices beyond the control port.
    /// Only the command line is built from it, so the control socket's peer is not kept.
    fn base_cfg() -> VmConfig {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        VmConfig {
            memory_mib: 256,
            ..VmConfig::new(
                "/k/vmlinux".into(),
                "/k/initrd".into(),
                a.into(),
                "/s/console.log".into(),
                Accel::Tcg,
            )
        }
    }

    fn root_and_scratch() -> Vec<DiskConfig> {
        vec![
            DiskConfig {
                path: "/d/root".into(),
                read_only: true,
                serial: "airlock-root".into(),
            },
            DiskConfig {
                path: "/d/scratch".into(),
                read_only: false,
                serial: "airlock-scratch".into(),
            },
        ]
    }

    #[test]
    fn command_line_shape() {
        let cfg = VmConfig {
            cmdline_extra: "airlock.x=1".into(),
            cpus: 2,
            memory_mib: 512,
            disks: vec![DiskConfig {
                path: "/d/a,b.ext4".into(),
                read_only: true,
                serial: "airlock-root".into(),
            }],
            ..base_cfg()
        };
        let args = Qemu::args(&cfg, 101, None).join(" ");
        assert!(
            !args.contains("memory-backend-file") && args.contains("memory-backend-ram,id=mem"),
            "no shares, no shared RAM: {args}"
        );
        assert!(args.contains("-accel tcg,thread=multi"));
        assert!(args.contains("-nodefaults -no-user-config -no-reboot"));
        assert!(args.contains("socket,id=ctl,fd=101"));
        assert!(args.contains("file=/d/a,,b.ext4"), "{args}");
        assert!(args.contains("readonly=on"));
        assert!(args.contains("-sandbox on"));
        assert!(args.contains("airlock.x=1"));
        assert!(
            args.contains("rtc=on"),
            "the RTC saves a 1 s wall-clock probe: {args}"
        );
        assert!(!args.contains("-incoming") && !args.contains("-mon"));
    }

    #[test]
    fn restore_maps_snapshot_ram_private_and_defers_incoming() {
        let (m, _n) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let cfg = VmConfig {
            shared_memory_file: Some("/t/ram".into()),
            memory_private: true,
            monitor: Some(m.into()),
            incoming: Some(f.into()),
            ..base_cfg()
        };
        let args = Qemu::args_with(&cfg, 101, None, Some(103)).join(" ");
        assert!(
            args.contains("memory-backend-file,id=mem,size=256M,mem-path=/t/ram,share=off"),
            "{args}"
        );
        assert!(args.contains("-chardev socket,id=mon,fd=103 -mon chardev=mon,mode=control"));
        assert!(args.contains("-incoming defer"));
    }

    #[test]
    fn virtio_fs_devices_use_shared_file_ram() {
        let cfg = VmConfig {
            disks: root_and_scratch(),
            fs_devices: vec![crate::FsDevice {
                socket: "/r/fs0.sock".into(),
                tag: "airlock-fs0".into(),
            }],
            shared_memory_file: Some("/dev/shm/x.mem".into()),
            ..base_cfg()
        };
        let args = Qemu::args(&cfg, 101, None).join(" ");
        assert!(args.contains("-object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/x.mem,share=on -machine memory-backend=mem"), "{args}");
        assert!(
            args.contains("rtc=on"),
            "the RTC stays with five devices (the guest has no RTC driver to conflict): {args}"
        );
        assert!(args.contains("-chardev socket,id=fs0,path=/r/fs0.sock -device vhost-user-fs-device,chardev=fs0,tag=airlock-fs0"), "{args}");
        assert!(args.contains("-sandbox on"));
    }

    #[test]
    fn rng_yields_its_transport_and_too_many_devices_is_an_error() {
        let cfg = |shares: usize| {
            let (n, _m) = std::os::unix::net::UnixStream::pair().unwrap();
            VmConfig {
                disks: root_and_scratch(),
                fs_devices: (0..shares)
                    .map(|i| crate::FsDevice {
                        socket: format!("/r/fs{i}.sock").into(),
                        tag: format!("airlock-fs{i}"),
                    })
                    .collect(),
                shared_memory_file: Some("/dev/shm/x.mem".into()),
                nic: Some(crate::NicConfig {
                    fd: n.into(),
                    mac: [2, 0, 0, 0, 0, 1],
                }),
                ..base_cfg()
            }
        };
        let a = Qemu::args(&cfg(3), 101, Some(102)).join(" ");
        assert!(a.contains("virtio-rng-device"), "{a}");
        let a = Qemu::args(&cfg(4), 101, Some(102)).join(" ");
        assert!(!a.contains("virtio-rng-device"), "{a}");
        assert_eq!(virtio_device_count(&cfg(4)), MAX_VIRTIO_DEVICES);
        let e = Qemu::default().launch(cfg(5)).err().expect("refused");
        assert!(e.to_string().contains("fewer shares"), "{e}");
    }
}
