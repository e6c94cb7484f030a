//! VMM backends. A [`Backend`] turns a [`VmConfig`] into a running VM; the rest of Airlock
//! never speaks to a VMM directly, so Firecracker or Apple's Virtualization.framework can slot
//! in beside [`qemu::Qemu`].

pub mod accel;
pub mod qemu;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

pub use accel::{detect as detect_accel, Accel, AccelChoice};

/// One virtio block device.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Attach read-only (the image base); the guest cannot write it.
    pub read_only: bool,
    /// virtio-blk serial the guest agent finds the disk by.
    pub serial: String,
}

/// One virtio-fs device served by a vhost-user backend (Airlock's own, in-process).
#[derive(Debug, Clone)]
pub struct FsDevice {
    /// Unix socket the backend listens on.
    pub socket: PathBuf,
    /// Mount tag the guest uses.
    pub tag: String,
}

/// Everything a backend needs to start a sandbox VM.
#[derive(Debug)]
pub struct VmConfig {
    /// Uncompressed kernel (PVH entry) or bzImage.
    pub kernel: PathBuf,
    /// Initramfs carrying the guest agent as /init.
    pub initrd: PathBuf,
    /// Extra kernel command-line words, appended to the backend's own.
    pub cmdline_extra: String,
    /// Virtual CPUs (≥ 1).
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Block devices, in order.
    pub disks: Vec<DiskConfig>,
    /// The VM's end of the control channel (a connected stream socket). The backend exposes it
    /// to the guest as the virtio-serial port named [`CONTROL_PORT_NAME`].
    pub control: OwnedFd,
    /// File the guest console is written to.
    pub console_log: PathBuf,
    /// Accelerator to use.
    pub accel: Accel,
    /// The NIC, if the sandbox has one.
    pub nic: Option<NicConfig>,
    /// virtio-fs devices. They need guest RAM in `shared_memory_file` (shared memory the
    /// vhost-user backends map).
    pub fs_devices: Vec<FsDevice>,
    /// Backing file for guest RAM (the caller removes it): shared with vhost-user backends,
    /// or a snapshot's RAM being written (`share=on`), or a snapshot's RAM being restored
    /// copy-on-write ([`VmConfig::memory_private`]).
    pub shared_memory_file: Option<PathBuf>,
    /// Map `shared_memory_file` private (`share=off`): the guest's writes never reach the
    /// file, so many VMs can restore from one snapshot RAM file.
    pub memory_private: bool,
    /// A QMP monitor on this connected stream socket (snapshots need one).
    pub monitor: Option<OwnedFd>,
    /// Start paused waiting for migration state (`-incoming defer`); the caller then feeds
    /// `incoming` with QMP `migrate-incoming fd:N` where N is [`Vm::incoming_fd`].
    pub incoming: Option<OwnedFd>,
    /// Benchmark-only: a QEMU virtio-9p share `(host dir, tag)` to compare virtio-fs against.
    /// It bypasses every file rule (`security_model=none`), hence the feature no release
    /// binary enables.
    #[doc(hidden)]
    #[cfg(feature = "bench-9p")]
    pub bench_9p: Option<(PathBuf, String)>,
}

impl VmConfig {
    /// The one place a VM configuration starts from: these five, one vCPU, 512 MiB, and no
    /// disks, NIC, shares, shared RAM, monitor or incoming state. Callers set the rest with
    /// struct update syntax (`VmConfig { cpus, disks, ..VmConfig::new(...) }`).
    pub fn new(
        kernel: PathBuf,
        initrd: PathBuf,
        control: OwnedFd,
        console_log: PathBuf,
        accel: Accel,
    ) -> VmConfig {
        VmConfig {
            kernel,
            initrd,
            cmdline_extra: String::new(),
            cpus: 1,
            memory_mib: 512,
            disks: Vec::new(),
            control,
            console_log,
            accel,
            nic: None,
            fs_devices: Vec::new(),
            shared_memory_file: None,
            memory_private: false,
            monitor: None,
            incoming: None,
            #[cfg(feature = "bench-9p")]
            bench_9p: None,
        }
    }
}

/// A virtio-net NIC whose frames go over a stream socket (each frame behind a 4-byte
/// big-endian length), to a userspace network stack on the host.
#[derive(Debug)]
pub struct NicConfig {
    /// The VM's end of a connected stream socket.
    pub fd: OwnedFd,
    /// The guest's MAC.
    pub mac: [u8; 6],
}

/// Name of the control port the guest agent looks for.
pub const CONTROL_PORT_NAME: &str = "airlock.0";

/// How a VM process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code of the VMM process, if it exited.
    pub code: Option<i32>,
    /// Signal that killed it, if any.
    pub signal: Option<i32>,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (_, Some(s)) => write!(f, "signal {s}"),
            _ => write!(f, "unknown status"),
        }
    }
}

/// A running VM. Dropping it kills the VM.
pub trait Vm: Send + Sync {
    /// Host pid of the VMM process.
    fn pid(&self) -> u32;
    /// Kills the VM at once (idempotent).
    fn kill(&self);
    /// Watch that turns `Some` when the VMM process has ended.
    fn exit_watch(&self) -> tokio::sync::watch::Receiver<Option<VmExit>>;
    /// The number the VMM knows [`VmConfig::incoming`] by, if it got one.
    fn incoming_fd(&self) -> Option<i32> {
        None
    }
    /// A pidfd of the VMM process, for handing the VM to another process (a pool claim);
    /// `None` if the backend has none.
    fn pidfd(&self) -> Option<i32> {
        None
    }
}

/// SIGKILL to the process `pidfd` refers to (immune to pid reuse); errors (it is gone
/// already) are of no interest.
pub fn pidfd_kill(pidfd: i32) {
    // SAFETY: pidfd_send_signal with a null siginfo; a stale or bad fd only fails.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Errors starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The VMM binary is missing or failed to start.
    #[error("cannot start {binary}: {source} (install it with: apt-get install qemu-system-x86)")]
    Spawn {
        /// Binary that was run.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else about the host.
    #[error("{0}")]
    Host(String),
}

/// A way to run VMs.
pub trait Backend: Send + Sync {
    /// Short name ("qemu").
    fn name(&self) -> &'static str;
    /// Starts a VM.
    fn launch(&self, cfg: VmConfig) -> Result<Box<dyn Vm>, BackendError>;
    /// The VMM binary, if this backend can save and restore VMs (QMP monitor, `-incoming`);
    /// its identity is part of every snapshot's key.
    fn snapshot_binary(&self) -> Option<PathBuf> {
        None
    }
}
