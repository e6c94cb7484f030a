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
pub mod bare;
mod boot;
mod clock;
mod conn;
mod error;
mod exec;
mod files;
mod handoff;
pub mod imagefs;
mod launch;
pub mod network;
mod pool;
mod ports;
mod procs;
mod qmp;
mod rootdiff;
pub mod rootfs;
pub mod shares;
pub mod snapshot;
mod spec;
mod state;
mod stats;
pub mod template;
mod warm;
mod warmup;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use airlock_backend::{Accel, AccelChoice, Backend, DiskConfig, Vm, VmExit};
use airlock_proto::{ExecRequest, Frame, Init, Kind, CONTROL_STREAM, VERSION};

pub use airlock_proto::{ConnectError, ConnectErrorKind, ExecError, ExitStatus, WinSize};
pub use conn::ExecEvent;
pub use error::Error;
pub use exec::{Exec, ExecInput};
pub use files::{FileInfo, READ_FILE_MAX};
pub use handoff::claim as claim_from_pool;
pub use network::{NetworkSpec, SecretSpec};
pub use pool::{Pool, PoolStatus, Shape, MAX_POOL};
pub use ports::{GuestStream, PortForward, MAX_FORWARD_CONNECTIONS};
pub use procs::GuestProcess;
pub use rootfs::RootfsSource;
pub use shares::{
    process_umask, FsEvent, FsRule, Mount, Share, ShareChange, ShareMode, VolumeMount,
};
pub use spec::{
    ExecSpec, Output, SandboxSpec, DEFAULT_CPUS, DEFAULT_DISK_MIB, DEFAULT_MEMORY_MIB,
    DEFAULT_SHARE_QUOTA_MIB,
};
pub use stats::Stats;

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
    /// The writable layer's file (in the state dir, or the spec's `writable_disk`).
    scratch: PathBuf,
    /// Claimed from a [`Pool`] (restored ahead of time) rather than started for this spec.
    pooled: bool,
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
        boot::check(&spec)?;
        // Before anything is pulled or booted: a bad rule fails here.
        let network = match spec.network.disabled {
            true => None,
            false => Some(network::build(&spec.network)?),
        };
        match launch::launch(&spec, backend, warm_allowed).await? {
            launch::Outcome::Up(l) => {
                Sandbox::finish(l, spec, network, backend, warm_allowed).await
            }
            launch::Outcome::RestoreFailed => {
                drop(network);
                Box::pin(Sandbox::start_inner(spec, backend, false)).await
            }
        }
    }

    /// Attaches the network, then greets the agent with `Init` (its identity, clock, network,
    /// CA and mounts) and waits for `Ready`. A restored VM that does not come up has its
    /// template removed and the sandbox starts over cold (when `warm_allowed`).
    async fn finish(
        l: launch::Launched,
        spec: SandboxSpec,
        network: Option<airlock_net::Network>,
        backend: &dyn Backend,
        warm_allowed: bool,
    ) -> Result<Sandbox, Error> {
        // Comes up while the guest boots (its frames wait in the socket); checked below.
        let net_starting = match (&network, l.nic_host) {
            (Some(net), Some(host)) => Some(net.spawn(host)?),
            _ => None,
        };
        let warmed_up = matches!(l.control, launch::Control::Started { .. });
        let (conn, mut ctl, first_stream) = match l.control {
            launch::Control::Raw(s) => {
                s.set_nonblocking(true)?;
                let (c, ctl) = conn::Conn::start(tokio::net::UnixStream::from_std(s)?);
                (c, ctl, 1)
            }
            launch::Control::Started {
                conn,
                ctl,
                next_stream,
                ..
            } => (conn, ctl, next_stream),
        };
        let mut launch = l.launch;
        if let Some(li) = &mut launch {
            // A pooled VM was launched for the pool's spec; the claim decides.
            li.privileged = spec.privileged;
        }
        let template = l.template;
        let mut sb = Sandbox {
            id: l.id,
            accel: l.accel,
            conn: conn.clone(),
            vm: l.vm,
            state: l.state,
            next_stream: Arc::new(AtomicU32::new(first_stream)),
            kernel_release: String::new(),
            network,
            _fs: l.fs_servers,
            _volumes: l.volume_leases,
            ram_file: l.ram_file,
            monitor: std::sync::Mutex::new(l.monitor),
            template: template.clone(),
            launch,
            scratch: l.scratch,
            pooled: warmed_up,
        };
        sb.watch_vm();

        let init = init_message(
            &sb,
            spec.hostname.clone(),
            l.share_mounts,
            l.volume_mounts,
            spec.privileged,
        );
        let restored = template.is_some();
        let timeout = if restored {
            spec.ready_timeout.min(RESTORE_TIMEOUT)
        } else {
            spec.ready_timeout
        };
        let res = handshake(&conn, &mut ctl, &init, timeout).await;
        if let (Err(e), Some(key), true) = (&res, &template, warm_allowed) {
            sb.vm.kill();
            tracing::warn!(
                "sandbox restored from template {key} did not come up ({}); removing the template and booting cold",
                e.to_string().lines().next().unwrap_or("")
            );
            template::remove(key);
            drop(sb);
            return Box::pin(Sandbox::start_inner(spec, backend, false)).await;
        }
        let res = match (res, net_starting) {
            (Ok(k), Some(n)) => n.wait().map(|()| k).map_err(Error::from),
            (r, _) => r,
        };
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

    /// Whether it was claimed from a [`Pool`] (restored and paused before it was asked for).
    pub fn pooled(&self) -> bool {
        self.pooled
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
            .ok_or(Error::NoNetwork)?
            .allow(rule)
            .map_err(Error::from)
    }

    /// Removes an allow rule; returns whether it was there.
    pub fn remove_allowed_host(&self, rule: &str) -> Result<bool, Error> {
        self.network
            .as_ref()
            .ok_or(Error::NoNetwork)?
            .remove(rule)
            .map_err(Error::from)
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
            root: spec.root,
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
pub(crate) const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Feeds a launched VM its template's device state over QMP (`mon`); QEMU resumes the guest
/// once it is loaded. An outer error means the backend lost its fds; an inner one that the
/// state did not load (the caller may retry cold).
async fn restore(
    mon: Option<std::os::unix::net::UnixStream>,
    fd: Option<i32>,
) -> Result<Result<qmp::Qmp, qmp::QmpError>, Error> {
    let (Some(mon), Some(fd)) = (mon, fd) else {
        return Err(Error::Setup("backend lost the snapshot fds".into()));
    };
    tokio::task::spawn_blocking(move || {
        let mut q = qmp::Qmp::connect(mon)?;
        q.ignore_shared(true)?;
        q.restore(fd, RESTORE_TIMEOUT)?;
        Ok::<_, qmp::QmpError>(q)
    })
    .await
    .map_err(|e| Error::Setup(e.to_string()))
}

/// Sends `init` at once, then waits for the agent: `Hello` (its protocol version checked; a
/// restored agent said it before its capture), then `Ready` (the guest kernel's release).
/// A booting guest finds `init` waiting when it reads after its Hello instead of waiting one
/// host round trip (~10 ms under TCG): QEMU holds the bytes in the socket until the guest has
/// opened its port (multiport virtio-serial delivers nothing to a closed port), and `init`
/// carries nothing the host must keep from a mismatched agent. Bounded by `timeout` and by
/// the channel closing.
async fn handshake(
    conn: &conn::Conn,
    ctl: &mut tokio::sync::mpsc::UnboundedReceiver<conn::ControlEvent>,
    init: &Init,
    timeout: Duration,
) -> Result<String, Error> {
    let send_init = || conn.send(Frame::json(Kind::Init, CONTROL_STREAM, init));
    let handshake = async {
        send_init().await.map_err(Error::Protocol)?;
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
    tokio::select! {
        r = handshake => r,
        _ = closed.wait_for(|c| c.is_some()) => Err(Error::Protocol(String::new())),
        _ = tokio::time::sleep(timeout) => Err(Error::NotReady {
            secs: timeout.as_secs(),
            console: String::new(),
        }),
    }
}

/// A fresh `Resume` nonce and the exact bytes of its `Resumed` answer: the marker a new
/// [`conn::Conn`] starts reading at, so bytes an earlier host left in the channel are skipped.
fn resume_marker() -> (String, Vec<u8>) {
    let nonce = hex::encode(random_bytes::<16>());
    let marker = Frame::json(
        Kind::Resumed,
        CONTROL_STREAM,
        &airlock_proto::Resumed {
            nonce: nonce.clone(),
        },
    )
    .encode();
    (nonce, marker)
}

/// Greets an agent that was running before this host took its VM (restored from a user
/// snapshot, or claimed from a pool another process holds): `Resume` carries `spec`'s
/// `Init`, and streams below `first_stream` were the earlier host's. Waits for `Resumed`.
async fn resume(
    sb: &Sandbox,
    ctl: &mut tokio::sync::mpsc::UnboundedReceiver<conn::ControlEvent>,
    spec: &SandboxSpec,
    nonce: String,
    first_stream: u32,
    timeout: Duration,
) -> Result<(), Error> {
    let init = init_message(
        sb,
        spec.hostname.clone(),
        Vec::new(),
        Vec::new(),
        spec.privileged,
    );
    let resume = airlock_proto::Resume {
        nonce,
        first_stream,
        init,
    };
    sb.conn
        .send(Frame::json(Kind::Resume, CONTROL_STREAM, &resume))
        .await
        .map_err(Error::Protocol)?;
    let mut closed = sb.conn.closed_watch();
    let r = tokio::select! {
        e = ctl.recv() => match e {
            Some(conn::ControlEvent::Resumed) => Ok(()),
            other => Err(Some(Error::Protocol(format!("restored guest answered {other:?} to Resume")))),
        },
        _ = closed.wait_for(|c| c.is_some()) => Err(None),
        _ = tokio::time::sleep(timeout) => Err(Some(Error::NotReady {
            secs: timeout.as_secs(),
            console: sb.state.console_tail(30),
        })),
    };
    match r {
        Ok(()) => Ok(()),
        Err(Some(e)) => Err(e),
        Err(None) => Err(sb.death_error().await),
    }
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
        disk_uuid_own: sb.pooled,
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
