//! What to start ([`SandboxSpec`]) and what to run ([`ExecSpec`], [`Output`]).

use std::path::PathBuf;
use std::time::Duration;

use airlock_backend::Accel;

use crate::{ExitStatus, FsEvent, FsRule, NetworkSpec, RootfsSource, Share, VolumeMount, WinSize};

/// Default virtual CPUs.
pub const DEFAULT_CPUS: u32 = 1;
/// Default guest RAM, MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// Default size of the writable layer, MiB (sparse: costs only what is written).
pub const DEFAULT_DISK_MIB: u64 = 5 * 1024;
/// Default bound on how much a guest may add to each `:rw` share, MiB.
pub const DEFAULT_SHARE_QUOTA_MIB: u64 = 16 * 1024;

/// What to start.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Root filesystem.
    pub rootfs: RootfsSource,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// Writable layer size, MiB.
    pub disk_mib: u64,
    /// Hostname inside (default: the sandbox id).
    pub hostname: Option<String>,
    /// Force an accelerator (default: [`airlock_backend::detect_accel`], or `AIRLOCK_ACCEL`).
    pub accel: Option<Accel>,
    /// How long to wait for the guest to become ready.
    pub ready_timeout: Duration,
    /// Extra kernel command-line words (diagnostics and tests).
    pub kernel_args: Vec<String>,
    /// Network policy (default: sealed).
    pub network: NetworkSpec,
    /// Host directories shared over virtio-fs.
    pub shares: Vec<Share>,
    /// Named volumes to mount (each used by one sandbox at a time).
    pub volumes: Vec<VolumeMount>,
    /// File rules enforced by the share server (guest paths).
    pub fs_rules: Vec<FsRule>,
    /// Most MiB the guest may add to each `:rw` share (ENOSPC beyond; `df` in the guest shows
    /// this as the share's size).
    pub share_quota_mib: u64,
    /// Receives file-rule events (every denial and every `audit` match). Bounded: when the
    /// receiver falls behind, further events are dropped (and counted in the log) rather than
    /// let a guest grow host memory.
    pub fs_events: Option<tokio::sync::mpsc::Sender<FsEvent>>,
    /// uid/gid of the sandbox user: files of the invoking host user appear as theirs inside
    /// `rw`/`ro`/overlay shares, and theirs become the host user's (default 0:0).
    pub share_owner: (u32, u32),
    /// Run commands with every capability and without no_new_privs, like `docker run
    /// --privileged` (default: no_new_privs, and no CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_BOOT).
    pub privileged: bool,
    /// Benchmark only: also expose this host directory over QEMU's virtio-9p with this tag
    /// (no file rules apply to it: feature `bench-9p`, which no release binary enables).
    #[doc(hidden)]
    #[cfg(feature = "bench-9p")]
    pub bench_9p: Option<(PathBuf, String)>,
    /// Image-builder VM: boot with only this empty ext4 as the agent's root (no image).
    pub(crate) builder_target: Option<PathBuf>,
    /// Start from this user snapshot ([`Sandbox::snapshot`]) instead of the root filesystem:
    /// its CPUs, memory, kernel and image are the snapshot's; `rootfs`, `cpus`, `memory_mib`
    /// and `disk_mib` are ignored.
    pub from_snapshot: Option<String>,
    /// Boot this kernel instead of [`assets::kernel`]'s.
    pub kernel: Option<PathBuf>,
    /// Always boot (no warm start from a template). Sandboxes with shares or volumes always
    /// boot: vhost-user-fs cannot migrate in QEMU 7.2.
    pub cold: bool,
    /// Use this id instead of a new one (12 lowercase hex digits): a restarted sandbox keeps
    /// its id. Refused while another sandbox with it runs.
    pub id: Option<String>,
    /// Keep the writable layer in this file instead of the state dir: created (from the empty
    /// template, or a warm template's copy) when missing, booted as it is when present, and
    /// never removed by the sandbox, so a later sandbox can start on it (`airlock stop` /
    /// `start`). An existing disk always boots cold: a template's memory expects its own disk.
    pub writable_disk: Option<PathBuf>,
}

impl SandboxSpec {
    /// Defaults for everything but the root filesystem.
    pub fn new(rootfs: RootfsSource) -> SandboxSpec {
        SandboxSpec {
            rootfs,
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            disk_mib: DEFAULT_DISK_MIB,
            hostname: None,
            accel: None,
            ready_timeout: Duration::from_secs(60),
            kernel_args: Vec::new(),
            network: NetworkSpec::default(),
            shares: Vec::new(),
            volumes: Vec::new(),
            fs_rules: Vec::new(),
            share_quota_mib: DEFAULT_SHARE_QUOTA_MIB,
            fs_events: None,
            share_owner: (0, 0),
            privileged: false,
            #[cfg(feature = "bench-9p")]
            bench_9p: None,
            builder_target: None,
            from_snapshot: None,
            kernel: None,
            cold: false,
            id: None,
            writable_disk: None,
        }
    }
}

/// A command to run in a sandbox.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// User (`name`, `uid`, `name:group`, `uid:gid`; default root).
    pub user: Option<String>,
    /// Terminal of this size; stdout and stderr then arrive together as stdout.
    pub tty: Option<WinSize>,
    /// Attach stdin ([`ExecInput::write`]); otherwise the command reads /dev/null.
    pub stdin: bool,
    /// An agent builtin instead of a program (internal: image building; the agent refuses it
    /// outside a builder VM).
    #[doc(hidden)]
    pub builtin: Option<String>,
    /// Run chrooted into this guest directory (typically a share's mount point holding a
    /// container's root filesystem): the agent mounts /proc, /dev and /sys inside it before
    /// the first command there, and resolves `user` and `cwd` inside it. Absolute, no `.` or
    /// `..` components, not `/`.
    pub root: Option<String>,
}

impl ExecSpec {
    /// A command with default settings.
    pub fn new<I, S>(argv: I) -> ExecSpec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Collected result of a command.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
}
