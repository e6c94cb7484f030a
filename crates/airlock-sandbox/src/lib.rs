//! Airlock's embeddable API: describe a sandbox, start it, run commands in it, stop it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), airlock_sandbox::Error> {
//! use airlock_sandbox::{ExecSpec, RootfsSource, Sandbox, SandboxSpec};
//! let sb = Sandbox::start(SandboxSpec::new(RootfsSource::from_path("/srv/rootfs")?)).await?;
//! let out = sb.output(ExecSpec::new(["sh", "-c", "echo hello; uname -r"])).await?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! sb.stop().await?;
//! # Ok(()) }
//! ```
//!
//! Each sandbox is one VM (QEMU microvm by default) booted from the guest kernel and an
//! initramfs holding the guest agent; the agent mounts the read-only root image with a
//! per-sandbox writable disk on top and serves execs over one control channel.

pub mod assets;
mod clock;
mod conn;
mod files;
pub mod imagefs;
pub mod network;
mod ports;
mod qmp;
pub mod rootfs;
pub mod shares;
pub mod snapshot;
mod state;
mod stats;
pub mod template;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_backend::{Accel, AccelChoice, Backend, DiskConfig, NicConfig, Vm, VmConfig, VmExit};
use airlock_proto::{
    ExecErrorKind, ExecRequest, Frame, Init, Kind, SignalRequest, CONTROL_STREAM, MAX_CHUNK,
    VERSION,
};
use tokio::sync::mpsc;

pub use airlock_proto::{ConnectError, ConnectErrorKind, ExecError, ExitStatus, WinSize};
pub use conn::ExecEvent;
pub use files::{FileInfo, READ_FILE_MAX};
pub use network::{NetworkSpec, SecretSpec};
pub use ports::{GuestStream, PortForward, MAX_FORWARD_CONNECTIONS};
pub use rootfs::RootfsSource;
pub use shares::{process_umask, FsEvent, FsRule, Mount, Share, ShareMode, VolumeMount};
pub use stats::Stats;

/// Errors of the sandbox API. Each says what happened and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something Airlock needs on the host is missing.
    #[error("{0}")]
    Setup(String),
    /// The root filesystem could not be prepared.
    #[error("rootfs: {0}")]
    Rootfs(String),
    /// The VMM could not be started.
    #[error(transparent)]
    Backend(#[from] airlock_backend::BackendError),
    /// The guest kernel panicked.
    #[error("guest kernel panicked: {message}\n--- last console lines ---\n{console}")]
    GuestPanic {
        /// The panic line.
        message: String,
        /// Tail of the guest console.
        console: String,
    },
    /// The VM ended when it should not have.
    #[error("sandbox VM stopped unexpectedly ({why})\n--- last console lines ---\n{console}")]
    VmStopped {
        /// What was observed.
        why: String,
        /// Tail of the guest console.
        console: String,
    },
    /// The guest did not become ready in time.
    #[error("guest agent not ready after {secs} s\n--- last console lines ---\n{console}")]
    NotReady {
        /// How long Airlock waited.
        secs: u64,
        /// Tail of the guest console.
        console: String,
    },
    /// The guest broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The command could not be started in the guest.
    #[error("{}", .0.message)]
    Exec(ExecError),
    /// A connection to a port inside the sandbox could not be made.
    #[error("{}{}", .error.message, if .error.kind == ConnectErrorKind::Refused { format!(": is a server listening on port {} inside the sandbox?", .port) } else { String::new() })]
    Connect {
        /// The guest port.
        port: u16,
        /// What the guest agent reported.
        error: ConnectError,
    },
    /// A file operation failed in the guest (the message names the path).
    #[error("{}", .0.message)]
    File(ExecError),
    /// Host I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// For a failed exec, the exit code a shell would give (127 not found, 126 not
    /// executable); `None` for other errors.
    pub fn exec_exit_code(&self) -> Option<i32> {
        match self {
            Error::Exec(e) => Some(match e.kind {
                ExecErrorKind::NotFound => 127,
                ExecErrorKind::PermissionDenied => 126,
                _ => 125,
            }),
            _ => None,
        }
    }
}

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

/// A running sandbox. Dropping it kills the VM and removes its state; [`Sandbox::stop`] shuts
/// it down cleanly.
pub struct Sandbox {
    id: String,
    accel: AccelChoice,
    conn: Arc<conn::Conn>,
    vm: Box<dyn Vm>,
    state: state::StateDir,
    /// Shared with port forwards, which open streams on their own.
    next_stream: Arc<AtomicU32>,
    kernel_release: String,
    network: Option<airlock_net::Network>,
    /// virtio-fs servers, one per share (they end when QEMU disconnects).
    _fs: Vec<airlock_fs::FsServer>,
    /// Held volume locks.
    _volumes: Vec<shares::VolumeLease>,
    /// Shared guest-RAM file, removed once QEMU has it mapped.
    ram_file: Option<PathBuf>,
    /// QEMU's monitor (snapshots), if the backend has one.
    monitor: std::sync::Mutex<Option<qmp::Monitor>>,
    /// Key of the template this sandbox was restored from; `None`: it booted cold.
    template: Option<String>,
    /// How it was launched (for snapshots); `None` for image builders.
    launch: Option<snapshot::LaunchInfo>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("accel", &self.accel.accel)
            .finish()
    }
}

/// Accelerator forced through the environment (`AIRLOCK_ACCEL=kvm|tcg`).
pub fn accel_from_env() -> Result<Option<Accel>, Error> {
    match std::env::var("AIRLOCK_ACCEL") {
        Ok(v) if !v.is_empty() => v.parse().map(Some).map_err(Error::Setup),
        _ => Ok(None),
    }
}

/// Whether `s` has the shape of a sandbox id (what [`new_id`] makes).
pub fn is_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random sandbox id: 12 lowercase hex digits.
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom into a valid buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b.copy_from_slice(&(t.as_nanos() as u64 ^ std::process::id() as u64).to_le_bytes()[..6]);
    }
    hex::encode(b)
}

impl Sandbox {
    /// Boots a sandbox with the default backend (QEMU) and waits until it can run commands.
    pub async fn start(spec: SandboxSpec) -> Result<Sandbox, Error> {
        Sandbox::start_with(spec, &airlock_backend::qemu::Qemu::default()).await
    }

    /// Boots a sandbox with `backend`.
    pub async fn start_with(spec: SandboxSpec, backend: &dyn Backend) -> Result<Sandbox, Error> {
        Sandbox::start_inner(spec, backend, true).await
    }

    /// `warm_allowed`: whether a template may be used; a failed restore removes the template
    /// and starts over cold.
    async fn start_inner(
        spec: SandboxSpec,
        backend: &dyn Backend,
        warm_allowed: bool,
    ) -> Result<Sandbox, Error> {
        if let Some(name) = spec.from_snapshot.clone() {
            return snapshot::start(spec, &name, backend).await;
        }
        if spec.cpus == 0 || spec.cpus > 64 {
            return Err(Error::Setup(format!(
                "--cpus {} is out of range (1-64)",
                spec.cpus
            )));
        }
        if spec.memory_mib < 64 {
            return Err(Error::Setup(format!(
                "--memory {} MiB is too small (at least 64)",
                spec.memory_mib
            )));
        }
        tracing::debug!("preparing assets");
        let kernel = match &spec.kernel {
            Some(k) => k.clone(),
            None => assets::kernel()?,
        };
        let initrd = assets::initramfs(&assets::agent()?)?;
        let forced = match spec.accel {
            Some(a) => Some(a),
            None => accel_from_env()?,
        };
        let accel = airlock_backend::detect_accel(forced);
        let id = match &spec.id {
            Some(id) if is_id(id) => id.clone(),
            Some(id) => {
                return Err(Error::Setup(format!(
                    "{id:?} is not a sandbox id (12 lowercase hex digits)"
                )))
            }
            None => new_id(),
        };
        let state = state::StateDir::create(&id)?;
        // A kept writable layer from an earlier run: booted as it is, never from a template.
        let reuse_disk = spec.writable_disk.as_ref().is_some_and(|d| d.exists());
        let base = match &spec.builder_target {
            Some(_) => None,
            None => Some(match &spec.rootfs {
                RootfsSource::Oci { store, image } => {
                    state.set_image(&image.manifest_digest)?;
                    // Boxed: building boots a (builder) sandbox itself.
                    Box::pin(imagefs::build(store, image)).await?
                }
                src => {
                    let src = src.clone();
                    tokio::task::spawn_blocking(move || src.prepare())
                        .await
                        .map_err(|e| Error::Setup(e.to_string()))??
                }
            }),
        };

        let network = if spec.network.disabled {
            None
        } else {
            Some(network::build(&spec.network)?)
        };
        let nic = match &network {
            Some(net) => {
                let (host, vm) = std::os::unix::net::UnixStream::pair()?;
                net.start(host).map_err(|e| Error::Setup(e.to_string()))?;
                Some(NicConfig {
                    fd: vm.into(),
                    mac: airlock_net::stack::GUEST_MAC,
                })
            }
            None => None,
        };
        let mut disks = Vec::new();
        let mut volume_leases = Vec::new();
        let mut volume_mounts = Vec::new();
        for (i, v) in spec.volumes.iter().enumerate() {
            let lease = shares::VolumeLease::acquire(&v.name)?;
            let serial = format!("airlock-vol{i}");
            disks.push(DiskConfig {
                path: lease.image.clone(),
                read_only: false,
                serial: serial.clone(),
            });
            volume_mounts.push(airlock_proto::VolumeMount {
                serial,
                target: v.guest.clone(),
            });
            volume_leases.push(lease);
        }
        let mut fs_servers = Vec::new();
        let mut fs_devices = Vec::new();
        let mut share_mounts = Vec::new();
        // SAFETY: geteuid/getegid cannot fail.
        let host_ids = unsafe { (libc::geteuid(), libc::getegid()) };
        for (i, sh) in spec.shares.iter().enumerate() {
            let tag = format!("airlock-fs{i}");
            let socket = state.path().join(format!("fs{i}.sock"));
            let cfg = airlock_fs::ShareConfig {
                host_dir: sh.host.clone(),
                guest_path: sh.guest.clone(),
                tag: tag.clone(),
                access: match sh.mode {
                    ShareMode::Rw => airlock_fs::Access::ReadWrite,
                    ShareMode::Ro | ShareMode::Overlay => airlock_fs::Access::ReadOnly,
                },
                ids: airlock_fs::IdMap {
                    host: host_ids,
                    guest: spec.share_owner,
                },
                rules: spec.fs_rules.clone(),
                quota: (sh.mode == ShareMode::Rw)
                    .then_some(spec.share_quota_mib.saturating_mul(1 << 20)),
            };
            fs_servers.push(
                airlock_fs::FsServer::start(
                    cfg,
                    &socket,
                    shares::event_sink(spec.fs_events.clone()),
                )
                .map_err(|e| Error::Setup(e.to_string()))?,
            );
            fs_devices.push(airlock_backend::FsDevice {
                socket,
                tag: tag.clone(),
            });
            share_mounts.push(airlock_proto::ShareMount {
                tag,
                target: sh.guest.clone(),
                mode: sh.mode,
            });
        }
        let cmdline_extra = guest_kernel_args(accel.accel)
            .into_iter()
            .chain(spec.kernel_args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let warm = (warm_allowed && !reuse_disk)
            .then(|| {
                warm_inputs(
                    &spec,
                    backend,
                    &kernel,
                    &initrd,
                    base.as_deref(),
                    accel.accel,
                    &cmdline_extra,
                    network.is_some(),
                )
            })
            .flatten();
        let template = match &warm {
            Some(inputs) => {
                let ctx = BuildCtx {
                    backend,
                    kernel: &kernel,
                    initrd: &initrd,
                    base: base.as_deref().unwrap_or(std::path::Path::new("")),
                    spec: &spec,
                    accel: accel.accel,
                    cmdline_extra: &cmdline_extra,
                    nic: network.is_some(),
                    console_log: state.console_log(),
                };
                template_for(inputs, &ctx).await
            }
            None => None,
        };
        let mut vm_disks = match (&spec.builder_target, &base) {
            (Some(target), _) => vec![DiskConfig {
                path: target.clone(),
                read_only: false,
                serial: "airlock-target".into(),
            }],
            (None, Some(base)) => {
                let scratch = match &spec.writable_disk {
                    Some(d) => d.clone(),
                    None => state.path().join("scratch.ext4"),
                };
                let (s, mib) = (scratch.clone(), spec.disk_mib);
                let from = template.as_ref().map(|t| t.scratch());
                tokio::task::spawn_blocking(move || match from {
                    _ if reuse_disk => Ok(()),
                    Some(t) => template::copy_disk(&t, &s).map_err(|e| {
                        Error::Rootfs(format!("copy the template's writable disk: {e}"))
                    }),
                    None => rootfs::create_scratch(&s, mib),
                })
                .await
                .map_err(|e| Error::Setup(e.to_string()))??;
                image_disks(base.clone(), scratch)
            }
            (None, None) => Vec::new(),
        };
        vm_disks.extend(disks);
        let disks = vm_disks;

        // Shared RAM on tmpfs (never written back to a disk), named for this sandbox.
        let ram_file =
            (!fs_devices.is_empty()).then(|| PathBuf::from(format!("/dev/shm/airlock-{id}.ram")));

        let (host_end, vm_end) = std::os::unix::net::UnixStream::pair()?;
        host_end.set_nonblocking(true)?;
        let host_end = tokio::net::UnixStream::from_std(host_end)?;
        let monitor = match backend.snapshot_binary() {
            Some(_) => Some(std::os::unix::net::UnixStream::pair()?),
            None => None,
        };
        let incoming = match &template {
            Some(t) => Some(std::fs::File::open(t.state())?.into()),
            None => None,
        };
        // A restore must see the command line its template booted with.
        let cmdline_extra = match &template {
            Some(t) => t.boot_cmdline.clone(),
            None => cmdline_extra,
        };
        let cfg = VmConfig {
            kernel,
            initrd,
            cmdline_extra,
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disks,
            control: vm_end.into(),
            console_log: state.console_log(),
            accel: accel.accel,
            nic,
            fs_devices,
            shared_memory_file: match &template {
                Some(t) => Some(t.ram()),
                None => ram_file.clone(),
            },
            memory_private: template.is_some(),
            monitor: monitor
                .as_ref()
                .map(|(_, vm)| vm.try_clone())
                .transpose()?
                .map(Into::into),
            incoming,
            #[cfg(feature = "bench-9p")]
            bench_9p: spec.bench_9p.clone(),
        };
        let monitor = monitor.map(|(host, _vm)| host);
        let launch = base.as_ref().map(|b| snapshot::LaunchInfo {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            base: b.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            nic: cfg.nic.is_some(),
            cmdline: cfg.cmdline_extra.clone(),
            accel: accel.accel.to_string(),
            pinned: if !spec.shares.is_empty() {
                Some("has shares".into())
            } else if !spec.volumes.is_empty() {
                Some("has volumes".into())
            } else {
                None
            },
        });
        tracing::debug!(%id, accel = %accel.accel, warm = template.is_some(), "starting sandbox");
        let vm = backend.launch(cfg)?;
        let mut monitor = monitor;
        let mut restored_qmp = None;
        if let Some(t) = &template {
            // Feed QEMU the saved device state; it resumes the guest by itself once loaded.
            let (Some(mon), Some(fd)) = (monitor.take(), vm.incoming_fd()) else {
                return Err(Error::Setup("backend lost the snapshot fds".into()));
            };
            let r = tokio::task::spawn_blocking(move || {
                let mut q = qmp::Qmp::connect(mon)?;
                q.ignore_shared(true)?;
                q.restore(fd, RESTORE_TIMEOUT)?;
                Ok::<_, String>(q)
            })
            .await
            .map_err(|e| Error::Setup(e.to_string()))?;
            match r {
                Ok(q) => restored_qmp = Some(q),
                Err(why) if warm_allowed => {
                    vm.kill();
                    tracing::warn!(
                        "template {} could not be restored ({why}); removing it and booting cold",
                        t.key
                    );
                    template::remove(&t.key);
                    drop((vm, network, state));
                    return Box::pin(Sandbox::start_inner(spec, backend, false)).await;
                }
                Err(why) => return Err(Error::Setup(format!("restore from template: {why}"))),
            }
        }
        let (conn, mut ctl) = conn::Conn::start(host_end);
        let mut sb = Sandbox {
            id: id.clone(),
            accel,
            conn: conn.clone(),
            vm,
            state,
            next_stream: Arc::new(AtomicU32::new(1)),
            kernel_release: String::new(),
            network,
            _fs: fs_servers,
            _volumes: volume_leases,
            ram_file,
            monitor: std::sync::Mutex::new(
                restored_qmp
                    .map(qmp::Monitor::Ready)
                    .or(monitor.map(qmp::Monitor::Raw)),
            ),
            template: template.as_ref().map(|t| t.key.clone()),
            launch,
        };
        sb.watch_vm();

        let init = || {
            init_message(
                &sb,
                spec.hostname.clone(),
                share_mounts.clone(),
                volume_mounts.clone(),
                spec.privileged,
            )
        };
        let restored = template.is_some();
        let handshake = async {
            if restored {
                // The restored agent said Hello before the capture and now waits for Init.
                conn.send(Frame::json(Kind::Init, CONTROL_STREAM, &init()))
                    .await
                    .map_err(Error::Protocol)?;
            }
            loop {
                match ctl.recv().await {
                    Some(conn::ControlEvent::Hello(h)) => {
                        tracing::debug!(agent = %h.agent, "guest hello");
                        if h.version != VERSION {
                            return Err(Error::Setup(format!(
                                "guest agent {} speaks protocol {}, this airlock speaks {VERSION}: rebuild the agent (scripts/build-agent)",
                                h.agent, h.version
                            )));
                        }
                        conn.send(Frame::json(Kind::Init, CONTROL_STREAM, &init()))
                            .await
                            .map_err(Error::Protocol)?;
                    }
                    Some(conn::ControlEvent::Ready(r)) => {
                        tracing::debug!("guest ready");
                        return Ok(r.kernel);
                    }
                    Some(conn::ControlEvent::Resumed) => {
                        return Err(Error::Protocol("guest sent Resumed unasked".into()))
                    }
                    None => return Err(Error::Protocol("control channel closed".into())),
                }
            }
        };
        let mut closed = conn.closed_watch();
        let timeout = if restored {
            spec.ready_timeout.min(RESTORE_TIMEOUT)
        } else {
            spec.ready_timeout
        };
        let res = tokio::select! {
            r = handshake => r,
            _ = closed.wait_for(|c| c.is_some()) => Err(Error::Protocol(String::new())),
            _ = tokio::time::sleep(timeout) => Err(Error::NotReady {
                secs: timeout.as_secs(),
                console: String::new(),
            }),
        };
        if let (Err(e), Some(t), true) = (&res, &template, warm_allowed) {
            sb.vm.kill();
            tracing::warn!(
                "sandbox restored from template {} did not come up ({}); removing the template and booting cold",
                t.key,
                e.to_string().lines().next().unwrap_or("")
            );
            template::remove(&t.key);
            drop(sb);
            return Box::pin(Sandbox::start_inner(spec, backend, false)).await;
        }
        match res {
            Ok(kernel) => {
                sb.kernel_release = kernel;
                sb.drop_ram_file();
                Ok(sb)
            }
            Err(Error::NotReady { secs, .. }) => {
                sb.vm.kill();
                Err(Error::NotReady {
                    secs,
                    console: sb.state.console_tail(30),
                })
            }
            Err(Error::Protocol(_)) | Err(Error::Setup(_)) if sb.conn.closed_reason().is_some() => {
                Err(sb.death_error().await)
            }
            Err(e) => Err(e),
        }
    }

    /// QEMU keeps its mapping of the shared RAM file; the name only has to outlive its open.
    fn drop_ram_file(&mut self) {
        if let Some(f) = self.ram_file.take() {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Ends the connection when the VM process ends, so every waiter wakes up.
    fn watch_vm(&self) {
        let mut w = self.vm.exit_watch();
        let conn = self.conn.clone();
        tokio::spawn(async move {
            if let Ok(exit) = w.wait_for(|e| e.is_some()).await {
                let exit: VmExit = (*exit).unwrap_or(VmExit {
                    code: None,
                    signal: None,
                });
                conn.fail(format!("VM exited ({exit})"));
            }
        });
    }

    /// Classifies why the sandbox died, from the console and the VM's status.
    async fn death_error(&self) -> Error {
        // Give QEMU a moment to finish writing the console and exit.
        let mut w = self.vm.exit_watch();
        let _ = tokio::time::timeout(Duration::from_secs(2), w.wait_for(|e| e.is_some())).await;
        let console = self.state.console_tail(30);
        if let Some(line) = console.lines().find(|l| l.contains("Kernel panic")) {
            return Error::GuestPanic {
                message: line.trim().to_string(),
                console,
            };
        }
        let why = self
            .conn
            .closed_reason()
            .unwrap_or_else(|| "unknown".into());
        if why.starts_with("guest violated") {
            self.vm.kill();
            return Error::Protocol(why);
        }
        Error::VmStopped { why, console }
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Key of the template this sandbox was restored from (`None`: it booted cold).
    pub fn template(&self) -> Option<&str> {
        self.template.as_deref()
    }

    /// The accelerator in use and why it was chosen.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// Kernel release the guest runs.
    pub fn kernel_release(&self) -> &str {
        &self.kernel_release
    }

    /// The sandbox's network (`None` with [`NetworkSpec::disabled`]): runtime allow-list
    /// changes, the CA, audit events.
    pub fn network(&self) -> Option<&airlock_net::Network> {
        self.network.as_ref()
    }

    /// Allows `rule` (same syntax as `--allow-host`) from now on.
    pub fn allow_host(&self, rule: &str) -> Result<(), Error> {
        self.network
            .as_ref()
            .ok_or_else(|| Error::Setup("this sandbox has no network".into()))?
            .allow(rule)
            .map_err(|e| Error::Setup(e.to_string()))
    }

    /// Removes an allow rule; returns whether it was there.
    pub fn remove_allowed_host(&self, rule: &str) -> Result<bool, Error> {
        self.network
            .as_ref()
            .ok_or_else(|| Error::Setup("this sandbox has no network".into()))?
            .remove(rule)
            .map_err(|e| Error::Setup(e.to_string()))
    }

    /// Host pid of the VMM process.
    pub fn vm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// What the sandbox costs right now: the VM process's CPU time and memory, and the guest
    /// NIC's traffic. Two samples make a CPU rate.
    pub fn stats(&self) -> Stats {
        let mut s = stats::of_process(self.vm_pid());
        s.net = self.network.as_ref().map(|n| n.counters());
        s
    }

    /// Opens a new stream with `kind` and the JSON `req`; `too_big` says what exceeded the
    /// frame limit. Events of the stream arrive through the returned [`Exec`].
    pub(crate) async fn open_exec_stream<T: serde::Serialize>(
        &self,
        kind: Kind,
        req: &T,
        too_big: &str,
    ) -> Result<Exec, Error> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (events, send) = self.conn.open_stream(id);
        let frame = Frame::json(kind, id, req);
        if frame.payload.len() > airlock_proto::MAX_PAYLOAD {
            self.conn.close_stream(id);
            return Err(Error::Setup(format!("{too_big} exceed 1 MiB")));
        }
        if self.conn.send(frame).await.is_err() {
            self.conn.close_stream(id);
            return Err(self.death_error().await);
        }
        Ok(Exec {
            input: ExecInput {
                id,
                conn: self.conn.clone(),
                send,
            },
            events,
            done: false,
        })
    }

    /// Starts a command; events arrive through [`Exec::next`].
    pub async fn exec(&self, spec: ExecSpec) -> Result<Exec, Error> {
        let req = ExecRequest {
            argv: spec.argv,
            env: spec.env,
            cwd: spec.cwd,
            user: spec.user,
            tty: spec.tty,
            stdin: spec.stdin,
            builtin: spec.builtin,
        };
        self.open_exec_stream(Kind::Exec, &req, "command line and environment")
            .await
    }

    /// Opens a TCP connection to `guest_port` on the sandbox's loopback (127.0.0.1, then ::1),
    /// carried over the control channel: it needs no guest network at all. A port nothing
    /// listens on is an [`Error::Connect`] with [`ConnectErrorKind::Refused`].
    ///
    /// ```no_run
    /// # async fn demo(sb: &airlock_sandbox::Sandbox) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio::io::AsyncReadExt;
    /// let mut s = sb.connect(6379).await?;
    /// let mut greeting = [0u8; 16];
    /// s.read_exact(&mut greeting).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, guest_port: u16) -> Result<GuestStream, Error> {
        ports::connect(&self.conn, &self.next_stream, guest_port).await
    }

    /// Listens on `bind` on the host and forwards every connection to `guest_port` inside the
    /// sandbox (as [`Sandbox::connect`]). Port 0 picks a free port: read it from
    /// [`PortForward::local_addr`]. A port in use is an [`Error::Io`] with `AddrInUse`.
    ///
    /// ```no_run
    /// # async fn demo(sb: &airlock_sandbox::Sandbox) -> Result<(), airlock_sandbox::Error> {
    /// let fwd = sb.forward_port("127.0.0.1:8080".parse().unwrap(), 80).await?;
    /// // curl http://127.0.0.1:8080/ now reaches the guest's port 80.
    /// # drop(fwd);
    /// # Ok(()) }
    /// ```
    pub async fn forward_port(
        &self,
        bind: std::net::SocketAddr,
        guest_port: u16,
    ) -> Result<PortForward, Error> {
        self.forward_listener(std::net::TcpListener::bind(bind)?, guest_port)
    }

    /// As [`Sandbox::forward_port`] on a listener bound already (so a caller can fail on a
    /// port in use before booting the sandbox).
    ///
    /// ```no_run
    /// # async fn demo(sb: &airlock_sandbox::Sandbox) -> Result<(), airlock_sandbox::Error> {
    /// let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    /// let fwd = sb.forward_listener(l, 80)?;
    /// # Ok(()) }
    /// ```
    pub fn forward_listener(
        &self,
        listener: std::net::TcpListener,
        guest_port: u16,
    ) -> Result<PortForward, Error> {
        ports::forward(
            self.conn.clone(),
            self.next_stream.clone(),
            listener,
            guest_port,
        )
    }

    /// Runs a command to completion and collects its output. A command that cannot start is
    /// an [`Error::Exec`].
    pub async fn output(&self, spec: ExecSpec) -> Result<Output, Error> {
        let mut e = self.exec(spec).await?;
        let mut out = Output::default();
        loop {
            match e.next().await {
                Ok(Some(ExecEvent::Stdout(b))) => out.stdout.extend_from_slice(&b),
                Ok(Some(ExecEvent::Stderr(b))) => out.stderr.extend_from_slice(&b),
                Ok(Some(ExecEvent::Exit(s))) => {
                    out.status = s;
                    return Ok(out);
                }
                Ok(Some(ExecEvent::Failed(err))) => return Err(Error::Exec(err)),
                Ok(Some(ExecEvent::Started(_))) => {}
                Ok(None) => return Err(Error::Protocol("exec ended without a status".into())),
                Err(_) => return Err(self.death_error().await),
            }
        }
    }

    /// Kills the VM now, from a shared reference (for a sandbox other tasks still hold);
    /// everything waiting on it fails. Dropping the last owner removes the state.
    pub fn kill(&self) {
        self.vm.kill();
        self.conn.fail("sandbox killed".into());
    }

    /// Why the sandbox can no longer run commands, if it cannot.
    pub async fn failure(&self) -> Option<Error> {
        if self.conn.closed_reason().is_some() {
            Some(self.death_error().await)
        } else {
            None
        }
    }

    /// Shuts the guest down (disks synced) and removes the sandbox's state. Waits at most a few
    /// seconds for a clean power-off before killing the VM.
    pub async fn stop(self) -> Result<(), Error> {
        self.shutdown(Duration::ZERO).await;
        drop(self);
        Ok(())
    }

    /// Powers the guest off from a shared reference, as `stop` does. With a `grace`, the guest
    /// first sends SIGTERM to every process and gives them that long to exit (then SIGKILL),
    /// as a machine's shutdown does; the disks are synced either way. Returns once the VM has
    /// gone (killed if it has not powered off within `grace` plus 5 s).
    pub async fn shutdown(&self, grace: Duration) {
        let mut w = self.vm.exit_watch();
        let req = airlock_proto::ShutdownRequest {
            grace_ms: grace.as_millis().min(u64::MAX as u128) as u64,
        };
        if self
            .conn
            .send(Frame::json(Kind::Shutdown, CONTROL_STREAM, &req))
            .await
            .is_ok()
        {
            let _ =
                tokio::time::timeout(grace + Duration::from_secs(5), w.wait_for(|e| e.is_some()))
                    .await;
        }
        self.vm.kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), w.wait_for(|e| e.is_some())).await;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.vm.kill();
        self.drop_ram_file();
        self.conn.fail("sandbox stopped".into());
        // state::StateDir removes the directory when dropped, after this.
    }
}

/// The input side of an exec: stdin, signals, terminal size. Cloneable.
#[derive(Clone)]
pub struct ExecInput {
    id: u32,
    conn: Arc<conn::Conn>,
    send: Arc<conn::SendWindow>,
}

impl ExecInput {
    /// Writes to the command's stdin, waiting for the guest's flow-control credit.
    pub async fn write(&self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let n = self
                .send
                .window
                .lock()
                .unwrap()
                .take(data.len().min(MAX_CHUNK));
            if n == 0 {
                let mut closed = self.conn.closed_watch();
                tokio::select! {
                    _ = self.send.notify.notified() => {}
                    _ = closed.wait_for(|c| c.is_some()) => {}
                }
                if let Some(why) = self.conn.closed_reason() {
                    return Err(Error::Protocol(why));
                }
                continue;
            }
            self.conn
                .send(Frame::new(Kind::Stdin, self.id, data[..n].to_vec()))
                .await
                .map_err(Error::Protocol)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes stdin (the command sees end of file).
    pub async fn close(&self) -> Result<(), Error> {
        self.conn
            .send(Frame::new(Kind::StdinEof, self.id, vec![]))
            .await
            .map_err(Error::Protocol)
    }

    /// Sends a signal to the process (`group`: to its whole process group).
    pub async fn signal(&self, signal: i32, group: bool) -> Result<(), Error> {
        self.conn
            .send(Frame::json(
                Kind::Signal,
                self.id,
                &SignalRequest { signal, group },
            ))
            .await
            .map_err(Error::Protocol)
    }

    /// Resizes the command's terminal.
    pub async fn resize(&self, size: WinSize) -> Result<(), Error> {
        self.conn
            .send(Frame::json(Kind::Resize, self.id, &size))
            .await
            .map_err(Error::Protocol)
    }
}

/// A running command.
pub struct Exec {
    input: ExecInput,
    events: mpsc::UnboundedReceiver<ExecEvent>,
    done: bool,
}

impl Exec {
    /// Stdin, signals and resize for this command.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// Output bytes the host holds for this command that [`Exec::next`] has not yet returned.
    /// Flow control keeps it at most [`airlock_proto::INITIAL_WINDOW`].
    pub fn buffered_bytes(&self) -> u32 {
        self.input.conn.unconsumed(self.input.id)
    }

    /// The next event; `Ok(None)` after the last one. Consuming output returns flow-control
    /// credit to the guest, so a slow reader slows the command instead of buffering.
    /// `Err` means the sandbox died; [`Sandbox::failure`] says why.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.events.recv().await {
            Some(ev) => {
                match &ev {
                    ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => {
                        self.input.conn.grant(self.input.id, b.len() as u32)
                    }
                    ExecEvent::Exit(_) | ExecEvent::Failed(_) => self.done = true,
                    ExecEvent::Started(_) => {}
                }
                Ok(Some(ev))
            }
            None => {
                self.done = true;
                Err(Error::Protocol(
                    self.input
                        .conn
                        .closed_reason()
                        .unwrap_or_else(|| "sandbox stopped".into()),
                ))
            }
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if !self.done {
            // Nobody reads its output any more: kill the process group rather than leave it
            // blocked on flow control forever.
            let kill = SignalRequest {
                signal: libc::SIGKILL,
                group: true,
            };
            self.input
                .conn
                .try_send(Frame::json(Kind::Signal, self.input.id, &kill));
            self.input.conn.close_stream(self.input.id);
        }
    }
}

/// Kernel arguments Airlock adds for `accel` on this host (beyond the backend's fixed ones):
/// under TCG, the TSC frequency, so the guest gets a precise clock instead of 4 ms jiffies.
pub fn guest_kernel_args(accel: Accel) -> Vec<String> {
    match accel {
        Accel::Tcg => clock::tsc_kernel_arg(&state::runtime_dir())
            .into_iter()
            .collect(),
        Accel::Kvm => Vec::new(),
    }
}

pub use state::{private_dir, private_file, private_runtime_dir};

/// Live sandboxes by the image manifest digest they run (for refusing `image rm`).
pub fn images_in_use() -> std::collections::HashMap<String, Vec<String>> {
    state::images_in_use()
}

/// Removes the state (writable disk, console log) of sandboxes whose owning process died.
pub fn prune_state() {
    state::sweep(&state::runtime_dir());
}

/// Paths Airlock uses on this host, for diagnostics.
pub fn paths() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("cache", assets::cache_dir()),
        ("kernel", assets::default_kernel_path()),
        ("state", state::runtime_dir()),
    ]
}

/// How long a restored guest may take to answer `Init` before the template is presumed bad.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: getrandom into the unfilled tail of a valid buffer.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, 0) };
        if n <= 0 {
            // getrandom cannot fail on Linux ≥ 3.17 once the pool is up; never reached.
            break;
        }
        got += n as usize;
    }
    b
}

/// The template inputs of a sandbox that may start warm; `None` (and why, in the debug log)
/// Whether the spec asks for the benchmark-only virtio-9p share (always false without the
/// `bench-9p` feature).
fn bench_9p(spec: &SandboxSpec) -> bool {
    #[cfg(feature = "bench-9p")]
    return spec.bench_9p.is_some();
    #[cfg(not(feature = "bench-9p"))]
    {
        let _ = spec;
        false
    }
}

/// when it must boot.
#[allow(clippy::too_many_arguments)]
fn warm_inputs(
    spec: &SandboxSpec,
    backend: &dyn Backend,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    base: Option<&std::path::Path>,
    accel: Accel,
    cmdline: &str,
    nic: bool,
) -> Option<template::Inputs> {
    let why_cold = if spec.cold {
        "asked to (--cold)"
    } else if std::env::var_os("AIRLOCK_COLD").is_some_and(|v| !v.is_empty() && v != "0") {
        "AIRLOCK_COLD is set"
    } else if !spec.shares.is_empty() {
        "it has shares (vhost-user-fs cannot migrate in QEMU 7.2)"
    } else if !spec.volumes.is_empty() {
        "it has volumes"
    } else if spec.builder_target.is_some() || bench_9p(spec) {
        "it is an image builder or a benchmark VM"
    } else if backend.snapshot_binary().is_none() {
        "the backend cannot restore snapshots"
    } else {
        ""
    };
    if !why_cold.is_empty() {
        tracing::debug!("booting cold: {why_cold}");
        return None;
    }
    let bin = template::resolve_binary(&backend.snapshot_binary()?)?;
    let id = |p: &std::path::Path| template::FileId::of(p).ok();
    Some(template::Inputs {
        format: template::FORMAT,
        kernel: id(kernel)?,
        initrd: id(initrd)?,
        root: id(base?)?,
        qemu: id(&bin)?,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disk_mib: spec.disk_mib,
        nic,
        cmdline: template::key_cmdline(cmdline),
        accel: accel.to_string(),
    })
}

/// What building a template needs from the sandbox being started.
struct BuildCtx<'a> {
    backend: &'a dyn Backend,
    kernel: &'a std::path::Path,
    initrd: &'a std::path::Path,
    base: &'a std::path::Path,
    spec: &'a SandboxSpec,
    accel: Accel,
    cmdline_extra: &'a str,
    nic: bool,
    console_log: PathBuf,
}

/// The template for `inputs`, built now if there is none; `None` (with a warning) when it
/// cannot be had, and the sandbox boots cold.
async fn template_for(inputs: &template::Inputs, ctx: &BuildCtx<'_>) -> Option<template::Template> {
    let i = inputs.clone();
    let found = tokio::task::spawn_blocking(move || {
        if let template::Lookup::Corrupt(why) = template::lookup(&i) {
            tracing::warn!(
                "template {} is damaged ({why}): removed it; booting cold to rebuild it",
                i.key()
            );
        }
        template::find_or_start(&i)
    })
    .await
    .ok()?;
    let builder = match found {
        Ok(Ok(t)) => return Some(t),
        Ok(Err(b)) => b,
        Err(why) => {
            tracing::warn!("cannot use templates ({why}); booting cold");
            return None;
        }
    };
    match build_template(&builder, ctx).await {
        Ok(()) => match builder.commit(ctx.cmdline_extra) {
            Ok(t) => Some(t),
            Err(why) => {
                tracing::warn!("cannot store the template ({why}); booting cold");
                None
            }
        },
        Err(why) => {
            tracing::warn!("cannot make a template ({why}); booting cold");
            None
        }
    }
}

/// Boots a VM for the template, waits for its agent's Hello, then saves it (RAM stays in the
/// file it was written to) and ends it.
async fn build_template(b: &template::Builder, ctx: &BuildCtx<'_>) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let (scratch, mib) = (b.scratch(), ctx.spec.disk_mib);
    tokio::task::spawn_blocking(move || rootfs::create_scratch(&scratch, mib))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| e.to_string();
    let (host_end, vm_end) = std::os::unix::net::UnixStream::pair().map_err(io)?;
    let (mon_host, mon_vm) = std::os::unix::net::UnixStream::pair().map_err(io)?;
    // The NIC is part of the device set; its host end stays open (link up) but unread.
    let nic_pair = match ctx.nic {
        true => Some(std::os::unix::net::UnixStream::pair().map_err(io)?),
        false => None,
    };
    let cfg = VmConfig {
        kernel: ctx.kernel.to_path_buf(),
        initrd: ctx.initrd.to_path_buf(),
        cmdline_extra: ctx.cmdline_extra.to_string(),
        cpus: ctx.spec.cpus,
        memory_mib: ctx.spec.memory_mib,
        disks: vec![
            DiskConfig {
                path: ctx.base.to_path_buf(),
                read_only: true,
                serial: "airlock-root".into(),
            },
            DiskConfig {
                path: b.scratch(),
                read_only: false,
                serial: "airlock-scratch".into(),
            },
        ],
        control: vm_end.into(),
        console_log: ctx.console_log.clone(),
        accel: ctx.accel,
        nic: match &nic_pair {
            Some((_, vm)) => Some(NicConfig {
                fd: vm.try_clone().map_err(io)?.into(),
                mac: airlock_net::stack::GUEST_MAC,
            }),
            None => None,
        },
        fs_devices: Vec::new(),
        shared_memory_file: Some(b.ram()),
        memory_private: false,
        monitor: Some(mon_vm.into()),
        incoming: None,
        #[cfg(feature = "bench-9p")]
        bench_9p: None,
    };
    let vm = ctx.backend.launch(cfg).map_err(|e| e.to_string())?;
    host_end.set_nonblocking(true).map_err(io)?;
    let mut host = tokio::net::UnixStream::from_std(host_end).map_err(io)?;
    let wait_hello = async {
        let mut dec = airlock_proto::Decoder::new();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = host.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                return Err("the VM ended before its agent was up".to_string());
            }
            dec.push(&buf[..n]);
            if let Some(f) = dec.next_frame().map_err(|e| e.to_string())? {
                if f.kind != Kind::Hello {
                    return Err(format!("expected Hello, got {:?}", f.kind));
                }
                let h: airlock_proto::Hello = f.parse().map_err(|e| e.to_string())?;
                if h.version != VERSION {
                    return Err(format!("agent speaks protocol {}", h.version));
                }
                if dec.buffered() > 0 {
                    return Err("agent sent more than Hello".into());
                }
                return Ok(());
            }
            if dec.buffered() > 64 * 1024 {
                return Err("oversized Hello".into());
            }
        }
    };
    let mut exit = vm.exit_watch();
    tokio::select! {
        r = wait_hello => r?,
        _ = exit.wait_for(|e| e.is_some()) => return Err("the VM ended before its agent was up".into()),
        _ = tokio::time::sleep(ctx.spec.ready_timeout) => return Err("its agent was not up in time".into()),
    }
    let state = b.state();
    tokio::task::spawn_blocking(move || {
        let mut q = qmp::Qmp::connect(mon_host)?;
        q.ignore_shared(true)?;
        let out =
            crate::state::private_file(&state).map_err(|e| format!("{}: {e}", state.display()))?;
        q.save(&out, Duration::from_secs(60))?;
        out.sync_all().map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    vm.kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some())).await;
    drop(nic_pair);
    drop(host);
    Ok(())
}

/// The `Init` a sandbox's agent gets: per-sandbox identity (hostname, machine-id, RNG seed,
/// clock), network, CA and environment.
fn init_message(
    sb: &Sandbox,
    hostname: Option<String>,
    shares: Vec<airlock_proto::ShareMount>,
    volumes: Vec<airlock_proto::VolumeMount>,
    privileged: bool,
) -> Init {
    let (net, ca_pem, env) = match &sb.network {
        Some(net) => {
            let pem = net.ca_pem();
            (
                Some(network::guest_config()),
                (!pem.is_empty()).then_some(pem),
                net.placeholders(),
            )
        }
        None => (None, None, Vec::new()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Init {
        hostname: hostname.unwrap_or_else(|| sb.id.clone()),
        time_unix_ns: now.as_nanos() as u64,
        net,
        ca_pem,
        env,
        shares,
        volumes,
        rng_seed: random_bytes::<32>().to_vec(),
        machine_id: Some(hex::encode(random_bytes::<16>())),
        privileged,
    }
}

/// The two disks of a sandbox booted from an image: the shared read-only root and its own
/// writable layer (the agent finds them by serial).
pub(crate) fn image_disks(base: PathBuf, scratch: PathBuf) -> Vec<DiskConfig> {
    vec![
        DiskConfig {
            path: base,
            read_only: true,
            serial: "airlock-root".into(),
        },
        DiskConfig {
            path: scratch,
            read_only: false,
            serial: "airlock-scratch".into(),
        },
    ]
}
