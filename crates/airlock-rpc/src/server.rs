//! The JSON-RPC server: one [`Shared`] sandbox slot, any number of connections (stdio for
//! `airlock rpc`, unix-socket clients for a supervisor), each served by [`serve`].
//!
//! Each request runs in its own task, so execs, file operations and `cancel` overlap; stdin,
//! resize and signal messages for one exec are queued in order on that exec's bounded channel.
//! Output goes through one bounded writer queue, so a client that stops reading stalls the
//! guest (via the credit windows) instead of growing memory.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock_sandbox::{Error as SbError, ExecEvent, ExecSpec, Sandbox, WinSize};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::wire::{self, RpcError, EXEC_FAILED, FILE_FAILED, VM_FAILED};

/// A typed result as the JSON value of an answer.
fn result<T: serde::Serialize>(r: T) -> Result<Value, RpcError> {
    serde_json::to_value(r).map_err(|e| RpcError::new(wire::INTERNAL_ERROR, e.to_string()))
}

/// Most output `exec` (the non-streaming one) collects before failing.
pub const EXEC_OUTPUT_MAX: usize = 64 * 1024 * 1024;
/// Most `read_file` returns in one answer without a `length` (larger: read ranges).
pub const READ_FILE_ANSWER_MAX: u64 = 16 * 1024 * 1024;

/// Boxed future of a [`Launcher`].
pub type LaunchFuture = Pin<Box<dyn Future<Output = Result<Sandbox, RpcError>> + Send>>;

/// Turns `create` parameters into a running sandbox (image resolution lives in the CLI).
pub trait Launcher: Send + Sync {
    /// Starts the sandbox.
    fn launch(&self, params: wire::CreateParams) -> LaunchFuture;
}

/// How a server behaves.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// `airlock rpc`: `create` starts the sandbox in this process; `close` and end of input
    /// stop it.
    Rpc,
    /// A supervisor's socket: the sandbox exists already; `close` ends only the connection;
    /// `shutdown` stops the sandbox.
    Supervisor,
}

/// State shared by every connection of one server.
pub struct Shared {
    mode: Mode,
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    launcher: Option<Arc<dyn Launcher>>,
    /// Environment every command gets (from `create`).
    default_env: Mutex<Vec<(String, String)>>,
    /// Working directory and user of commands that name none (an image's defaults).
    defaults: Mutex<(Option<String>, Option<String>)>,
    shutdown: watch::Sender<bool>,
    /// Whether the `shutdown` that ended the sandbox was a graceful stop (it had a grace).
    graceful: std::sync::atomic::AtomicBool,
    /// Port forwards, alive as long as the sandbox.
    forwards: Mutex<Vec<airlock_sandbox::PortForward>>,
}

impl Shared {
    /// A server for `airlock rpc`, creating sandboxes with `launcher`.
    pub fn rpc(launcher: Arc<dyn Launcher>) -> Arc<Shared> {
        Arc::new(Shared {
            mode: Mode::Rpc,
            sandbox: Mutex::new(None),
            launcher: Some(launcher),
            default_env: Mutex::new(Vec::new()),
            defaults: Mutex::new((None, None)),
            shutdown: watch::channel(false).0,
            graceful: Default::default(),
            forwards: Mutex::new(Vec::new()),
        })
    }

    /// A server for an existing sandbox (a supervisor).
    pub fn supervisor(sb: Arc<Sandbox>, env: Vec<(String, String)>) -> Arc<Shared> {
        Arc::new(Shared {
            mode: Mode::Supervisor,
            sandbox: Mutex::new(Some(sb)),
            launcher: None,
            default_env: Mutex::new(env),
            defaults: Mutex::new((None, None)),
            shutdown: watch::channel(false).0,
            graceful: Default::default(),
            forwards: Mutex::new(Vec::new()),
        })
    }

    /// A server with no sandbox and no way to make one (answers every sandbox method with
    /// VM_FAILED): for tests and fuzzing of the request handling.
    pub fn empty() -> Arc<Shared> {
        Arc::new(Shared {
            mode: Mode::Rpc,
            sandbox: Mutex::new(None),
            launcher: None,
            default_env: Mutex::new(Vec::new()),
            defaults: Mutex::new((None, None)),
            shutdown: watch::channel(false).0,
            graceful: Default::default(),
            forwards: Mutex::new(Vec::new()),
        })
    }

    /// Working directory and user for commands that give none.
    pub fn set_exec_defaults(&self, cwd: Option<String>, user: Option<String>) {
        *self.defaults.lock().unwrap() = (cwd, user);
    }

    /// Becomes true when a client asked for `shutdown` (or `close` in rpc mode).
    pub fn shutdown_watch(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The sandbox, if there is one.
    pub fn sandbox(&self) -> Option<Arc<Sandbox>> {
        self.sandbox.lock().unwrap().clone()
    }

    fn need_sandbox(&self) -> Result<Arc<Sandbox>, RpcError> {
        self.sandbox()
            .ok_or_else(|| RpcError::new(VM_FAILED, "VM not created: call create first"))
    }

    /// Stops the sandbox: the guest powers off (disks synced), killed if it does not in 5 s.
    pub async fn stop_sandbox(&self) {
        self.stop_sandbox_after(std::time::Duration::ZERO).await
    }

    /// [`Shared::stop_sandbox`], giving the guest's processes `grace` between SIGTERM and
    /// SIGKILL first.
    pub async fn stop_sandbox_after(&self, grace: std::time::Duration) {
        self.forwards.lock().unwrap().clear();
        let sb = self.sandbox.lock().unwrap().take();
        if let Some(sb) = sb {
            match Arc::try_unwrap(sb) {
                Ok(sb) => {
                    sb.shutdown(grace).await;
                    let _ = sb.stop().await;
                }
                // Others (running execs) still hold it: power off from a shared reference;
                // its state goes when the last holder lets go.
                Err(sb) => sb.shutdown(grace).await,
            }
        }
    }

    /// Whether a `shutdown` with a grace (`airlock stop`) ended the sandbox.
    pub fn stopped_gracefully(&self) -> bool {
        self.graceful.load(std::sync::atomic::Ordering::Relaxed)
    }
}

enum Input {
    Data(Vec<u8>),
    Eof,
    Resize(WinSize),
    Signal(i32),
}

/// Per-connection state.
struct Conn {
    shared: Arc<Shared>,
    out: mpsc::Sender<String>,
    inputs: Mutex<HashMap<String, mpsc::Sender<Input>>>,
    tasks: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

fn key(id: &Value) -> String {
    id.to_string()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(s: &str) -> Result<Vec<u8>, RpcError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| RpcError::params("invalid base64 data"))
}

fn sb_error(code: i32, e: SbError) -> RpcError {
    match e {
        SbError::Exec(_) => RpcError::new(EXEC_FAILED, e.to_string()),
        SbError::File(_) => RpcError::new(FILE_FAILED, e.to_string()),
        other => RpcError::new(
            if code == FILE_FAILED || code == EXEC_FAILED {
                VM_FAILED
            } else {
                code
            },
            other.to_string(),
        ),
    }
}

/// Errors of the share methods: refusals (`Setup`: dest exists, too large, missing in the
/// guest) are the operation's failure, not the VM's.
fn file_error(e: SbError) -> RpcError {
    match e {
        SbError::Setup(m) => RpcError::new(FILE_FAILED, m),
        SbError::Io(e) => RpcError::new(FILE_FAILED, e.to_string()),
        other => sb_error(FILE_FAILED, other),
    }
}

/// Serves one connection until its input ends or it is closed.
pub async fn serve<R, W>(shared: Arc<Shared>, mut r: R, w: W)
where
    R: AsyncBufRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, mut out_rx) = mpsc::channel::<String>(256);
    let writer = tokio::spawn(async move {
        let mut w = w;
        while let Some(line) = out_rx.recv().await {
            let mut buf = line.into_bytes();
            buf.push(b'\n');
            // Coalesce what is queued, so small answers do not cost one write each.
            while buf.len() < 256 * 1024 {
                match out_rx.try_recv() {
                    Ok(l) => {
                        buf.extend_from_slice(l.as_bytes());
                        buf.push(b'\n');
                    }
                    Err(_) => break,
                }
            }
            if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
                break;
            }
        }
    });
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        out: out_tx,
        inputs: Mutex::new(HashMap::new()),
        tasks: Mutex::new(HashMap::new()),
    });
    let mut shutdown = shared.shutdown_watch();
    loop {
        let line = tokio::select! {
            l = wire::read_line(&mut r, wire::MAX_LINE) => l,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let line = match line {
            Ok(wire::Line::Line(l)) => l,
            Ok(wire::Line::TooLong) => {
                let e = RpcError::new(
                    wire::INVALID_REQUEST,
                    format!(
                        "request line exceeds {} bytes: write large files in chunks with append",
                        wire::MAX_LINE
                    ),
                );
                let _ = conn.out.send(wire::err_line(&Value::Null, &e)).await;
                continue;
            }
            Ok(wire::Line::Eof) | Err(_) => break,
        };
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if !conn.clone().dispatch(&line).await {
            break;
        }
    }
    // Input ended: stop what this connection started.
    for (_, t) in conn.tasks.lock().unwrap().drain() {
        t.abort();
    }
    conn.inputs.lock().unwrap().clear();
    if matches!(shared.mode, Mode::Rpc) {
        shared.stop_sandbox().await;
    }
    drop(conn);
    let _ = writer.await;
}

impl Conn {
    async fn reply(&self, id: &Option<Value>, r: Result<Value, RpcError>) {
        let Some(id) = id else { return };
        let line = match r {
            Ok(v) => wire::ok_line(id, v),
            Err(e) => wire::err_line(id, &e),
        };
        let _ = self.out.send(line).await;
    }

    async fn notify(&self, method: &str, params: Value) {
        let _ = self.out.send(wire::notify_line(method, params)).await;
    }

    /// Handles one line; false when the connection should end.
    async fn dispatch(self: Arc<Self>, line: &[u8]) -> bool {
        let req = match wire::parse_request(line) {
            Ok(r) => r,
            Err((id, e)) => {
                self.reply(&Some(id), Err(e)).await;
                return true;
            }
        };
        if let Err(e) = wire::validate(&req) {
            self.reply(&req.id, Err(e)).await;
            return true;
        }
        let id = req.id.clone();
        let m = req.method.as_str();
        match m {
            // In order, on this loop: stdin must not be reordered.
            _ if m.starts_with("exec_pipe.") || m.starts_with("exec_tty.") => {
                let r = self.input(m, &req.params).await;
                self.reply(&id, r).await;
                true
            }
            "cancel" => {
                let r = self.cancel(&req.params).await;
                self.reply(&id, r).await;
                true
            }
            "close" => {
                let p: wire::CloseParams = wire::params(&req.params).unwrap_or_default();
                if matches!(self.shared.mode, Mode::Rpc) {
                    let grace = p.timeout_seconds.unwrap_or(2.0).clamp(0.0, 60.0);
                    let _ = tokio::time::timeout(
                        Duration::from_secs_f64(grace.max(0.5)),
                        self.shared.stop_sandbox(),
                    )
                    .await;
                    if let Some(sb) = self.shared.sandbox.lock().unwrap().take() {
                        sb.kill();
                    }
                }
                self.reply(&id, Ok(json!({}))).await;
                false
            }
            "create" => {
                // Synchronous, as matchlock: nothing else may run against a half-made sandbox.
                let r = self.create(&req.params).await;
                self.reply(&id, r).await;
                true
            }
            _ => {
                let this = self.clone();
                let req2 = req.clone();
                let k = id.as_ref().map(key);
                let task = tokio::spawn(async move {
                    let r = this.clone().call(&req2).await;
                    if let Some(k) = &req2.id {
                        this.tasks.lock().unwrap().remove(&key(k));
                        this.inputs.lock().unwrap().remove(&key(k));
                    }
                    this.reply(&req2.id, r).await;
                });
                if let Some(k) = k {
                    self.tasks.lock().unwrap().insert(k, task.abort_handle());
                    if task.is_finished() {
                        self.tasks
                            .lock()
                            .unwrap()
                            .remove(&key(id.as_ref().unwrap()));
                    }
                }
                true
            }
        }
    }

    async fn call(self: Arc<Self>, req: &wire::Request) -> Result<Value, RpcError> {
        let p = &req.params;
        match req.method.as_str() {
            "exec" | "exec_stream" | "exec_pipe" | "exec_tty" => {
                self.exec(&req.method, req.id.clone(), wire::params(p)?)
                    .await
            }
            "write_file" => {
                let p: wire::WriteFileParams = wire::params(p)?;
                let data = unb64(&p.content)?;
                let sb = self.shared.need_sandbox()?;
                sb.write_file_from(&p.path, &data[..], p.mode.unwrap_or(0o644), p.append)
                    .await
                    .map_err(|e| sb_error(FILE_FAILED, e))?;
                Ok(json!({}))
            }
            "read_file" => {
                let p: wire::PathParams = wire::params(p)?;
                let sb = self.shared.need_sandbox()?;
                let cap = p.length.unwrap_or(READ_FILE_ANSWER_MAX + 1);
                if cap > READ_FILE_ANSWER_MAX + 1 {
                    return Err(RpcError::params(format!(
                        "length exceeds {READ_FILE_ANSWER_MAX} bytes: read in smaller ranges"
                    )));
                }
                let mut out = Vec::new();
                sb.read_file_range(&p.path, p.offset, Some(cap), &mut out)
                    .await
                    .map_err(|e| sb_error(FILE_FAILED, e))?;
                if p.length.is_none() && out.len() as u64 > READ_FILE_ANSWER_MAX {
                    return Err(RpcError::new(
                        FILE_FAILED,
                        format!(
                            "{} is larger than {READ_FILE_ANSWER_MAX} bytes: read it in ranges with offset and length",
                            p.path
                        ),
                    ));
                }
                Ok(json!({"content": b64(&out)}))
            }
            "list_files" => {
                let p: wire::PathParams = wire::params(p)?;
                let sb = self.shared.need_sandbox()?;
                let files = sb
                    .list_files(&p.path)
                    .await
                    .map_err(|e| sb_error(FILE_FAILED, e))?;
                let files: Vec<Value> = files
                    .into_iter()
                    .map(|f| json!({"name": f.name, "size": f.size, "mode": f.mode, "is_dir": f.is_dir}))
                    .collect();
                Ok(json!({"files": files}))
            }
            "port_forward" => {
                let p: wire::PortForwardParams = wire::params(p)?;
                let sb = self.shared.need_sandbox()?;
                let addrs = if p.addresses.is_empty() {
                    vec!["127.0.0.1".to_string()]
                } else {
                    p.addresses
                };
                let mut binds = Vec::new();
                for a in &addrs {
                    let ip: std::net::IpAddr = a
                        .parse()
                        .map_err(|_| RpcError::params(format!("{a:?} is not an IP address")))?;
                    for f in &p.forwards {
                        if f.remote_port == 0 {
                            return Err(RpcError::params("remote_port must be 1-65535"));
                        }
                        binds.push((std::net::SocketAddr::new(ip, f.local_port), f.remote_port));
                    }
                }
                let mut bound = Vec::new();
                for (bind, guest) in &binds {
                    let f = sb.forward_port(*bind, *guest).await.map_err(|e| {
                        RpcError::new(VM_FAILED, format!("forward {bind} -> {guest}: {e}"))
                    })?;
                    bound.push((f.local_addr(), *guest));
                    self.shared.forwards.lock().unwrap().push(f);
                }
                let bindings = bound
                    .iter()
                    .map(|(a, g)| wire::Binding {
                        address: a.ip().to_string(),
                        local_port: a.port(),
                        remote_port: *g,
                    })
                    .collect();
                result(wire::PortForwardResult { bindings })
            }
            "allow_list_add" | "allow_list_delete" => {
                let p: wire::HostsParams = wire::params(p)?;
                if p.hosts.iter().any(|h| h.trim().is_empty()) {
                    return Err(RpcError::params("hosts must not be empty strings"));
                }
                let sb = self.shared.need_sandbox()?;
                for h in &p.hosts {
                    let r = if req.method == "allow_list_add" {
                        sb.allow_host(h)
                    } else {
                        sb.remove_allowed_host(h).map(|_| ())
                    };
                    r.map_err(|e| RpcError::params(e.to_string()))?;
                }
                Ok(json!({"hosts": p.hosts}))
            }
            "snapshot" => {
                // Airlock extension (not in matchlock): capture the running sandbox.
                let p: wire::SnapshotParams = wire::params(p)?;
                let sb = self.shared.need_sandbox()?;
                let info = sb
                    .snapshot(&p.name)
                    .await
                    .map_err(|e| RpcError::params(e.to_string()))?;
                result(wire::SnapshotResult {
                    name: info.name,
                    source: info.source,
                })
            }
            "share_diff" => {
                let sb = self.shared.need_sandbox()?;
                let changes = sb.share_diff().await.map_err(file_error)?;
                result(wire::ShareDiffResult { changes })
            }
            "copy_out" => {
                // Writes on the host as the server's user, who is also the client's (stdio,
                // or a 0600 socket): the checks are against mistakes, not against the client.
                let p: wire::CopyOutParams = wire::params(p)?;
                let dest = std::path::Path::new(&p.dest);
                if !dest.is_absolute() {
                    return Err(RpcError::params(format!(
                        "dest {:?} must be an absolute host path",
                        p.dest
                    )));
                }
                let sb = self.shared.need_sandbox()?;
                let max = p.max_bytes.unwrap_or(wire::COPY_OUT_DEFAULT_MAX);
                let s = sb
                    .copy_out(&p.path, dest, max, p.umask)
                    .await
                    .map_err(file_error)?;
                result(wire::CopyOutResult {
                    files: s.files,
                    dirs: s.dirs,
                    skipped: s.skipped,
                })
            }
            "copy_in" => {
                // Reads the host as the server's user, who is also the client's.
                let p: wire::CopyInParams = wire::params(p)?;
                let src = std::path::Path::new(&p.src);
                if !src.is_absolute() {
                    return Err(RpcError::params(format!(
                        "src {:?} must be an absolute host path",
                        p.src
                    )));
                }
                let sb = self.shared.need_sandbox()?;
                let bytes = sb.copy_in(src, &p.dest).await.map_err(file_error)?;
                result(wire::CopyInResult { bytes })
            }
            "top" => {
                // Airlock extension: what runs in the guest.
                let sb = self.shared.need_sandbox()?;
                let processes = sb.processes().await.map_err(|e| sb_error(EXEC_FAILED, e))?;
                result(wire::TopResult { processes })
            }
            "stats" => {
                // Airlock extension: one sample; a client makes rates from two.
                let sb = self.shared.need_sandbox()?;
                result(sb.stats())
            }
            "info" => {
                let sb = self.shared.need_sandbox()?;
                result(wire::InfoResult {
                    id: sb.id().to_string(),
                    vm_pid: sb.vm_pid(),
                    kernel: sb.kernel_release().to_string(),
                    accel: sb.accel().accel.to_string(),
                    supervisor_pid: std::process::id(),
                })
            }
            "shutdown" => {
                let p: wire::ShutdownParams = wire::params(p)?;
                let grace = p.grace_ms.unwrap_or(0);
                if grace > 600_000 {
                    return Err(RpcError::params(
                        "grace_ms must be at most 600000 (10 minutes)",
                    ));
                }
                if p.grace_ms.is_some() {
                    self.shared
                        .graceful
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                self.shared
                    .stop_sandbox_after(std::time::Duration::from_millis(grace))
                    .await;
                let _ = self.shared.shutdown.send(true);
                Ok(json!({}))
            }
            m => Err(RpcError::new(
                wire::METHOD_NOT_FOUND,
                format!("Method not found: {m}"),
            )),
        }
    }

    async fn create(&self, p: &Value) -> Result<Value, RpcError> {
        let params: wire::CreateParams = wire::params(p)?;
        let Some(launcher) = self.shared.launcher.clone() else {
            return Err(RpcError::new(
                VM_FAILED,
                match self.shared.mode {
                    Mode::Supervisor => "this sandbox exists already; create is for airlock rpc",
                    Mode::Rpc => "this server cannot create sandboxes",
                },
            ));
        };
        if self.shared.sandbox().is_some() {
            return Err(RpcError::new(
                VM_FAILED,
                "a sandbox exists already on this connection: close it first",
            ));
        }
        if params.image.is_empty() && params.rootfs.is_none() {
            return Err(RpcError::params("image is required (e.g., alpine:latest)"));
        }
        let env: Vec<(String, String)> = params
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let timeout = params.resources.timeout_seconds;
        let sb = Arc::new(launcher.launch(params).await?);
        let id = sb.id().to_string();
        if let Some(t) = timeout.filter(|t| *t > 0) {
            let weak = Arc::downgrade(&sb);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(t)).await;
                if let Some(sb) = weak.upgrade() {
                    sb.kill();
                }
            });
        }
        *self.shared.default_env.lock().unwrap() = env;
        *self.shared.sandbox.lock().unwrap() = Some(sb);
        Ok(json!({"id": id}))
    }

    async fn input(&self, method: &str, p: &Value) -> Result<Value, RpcError> {
        let p: wire::InputParams = wire::params(p)?;
        let what = method.split_once('.').map(|(_, w)| w).unwrap_or("");
        let msg = match what {
            "stdin" => Input::Data(unb64(p.data.as_deref().unwrap_or(""))?),
            "stdin_eof" => Input::Eof,
            "resize" => Input::Resize(WinSize {
                rows: p.rows.unwrap_or(24).max(1),
                cols: p.cols.unwrap_or(80).max(1),
            }),
            "signal" => match p.signal {
                Some(s) if (1..=64).contains(&s) => Input::Signal(s),
                _ => return Err(RpcError::params("signal must be 1-64")),
            },
            _ => {
                return Err(RpcError::new(
                    wire::METHOD_NOT_FOUND,
                    format!("Method not found: {method}"),
                ))
            }
        };
        let tx = self.inputs.lock().unwrap().get(&key(&p.id)).cloned();
        let Some(tx) = tx else {
            return Err(RpcError::params(format!(
                "no running exec_pipe or exec_tty with id {}",
                p.id
            )));
        };
        // Awaiting here is the backpressure: a full queue stalls this client's input.
        tx.send(msg)
            .await
            .map_err(|_| RpcError::params(format!("exec {} has ended", p.id)))?;
        Ok(json!({}))
    }

    async fn cancel(&self, p: &Value) -> Result<Value, RpcError> {
        let p: wire::CancelParams = wire::params(p)?;
        let k = key(&p.id);
        let task = self.tasks.lock().unwrap().remove(&k);
        self.inputs.lock().unwrap().remove(&k);
        match task {
            Some(t) => {
                // Aborting drops the exec, which kills its process group in the guest.
                t.abort();
                self.reply(
                    &Some(p.id.clone()),
                    Err(RpcError::new(EXEC_FAILED, "request cancelled")),
                )
                .await;
                Ok(json!({"cancelled": true}))
            }
            None => Ok(json!({"cancelled": false})),
        }
    }

    async fn exec(
        self: Arc<Self>,
        method: &str,
        id: Option<Value>,
        p: wire::ExecParams,
    ) -> Result<Value, RpcError> {
        let argv = match (&p.argv, &p.command) {
            (Some(a), _) if !a.is_empty() => a.clone(),
            (_, Some(c)) if !c.is_empty() => vec!["sh".into(), "-c".into(), c.clone()],
            _ => return Err(RpcError::params("command is required")),
        };
        let sb = self.shared.need_sandbox()?;
        let mut spec = ExecSpec::new(argv);
        spec.env = self.shared.default_env.lock().unwrap().clone();
        spec.env
            .extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (dcwd, duser) = self.shared.defaults.lock().unwrap().clone();
        spec.cwd = p.working_dir.clone().filter(|w| !w.is_empty()).or(dcwd);
        spec.user = p.user.clone().filter(|u| !u.is_empty()).or(duser);
        let interactive = method == "exec_pipe" || method == "exec_tty";
        let stdin_data = match &p.stdin {
            Some(s) if !interactive => Some(unb64(s)?),
            _ => None,
        };
        spec.stdin = interactive || stdin_data.is_some();
        if method == "exec_tty" {
            spec.tty = Some(WinSize {
                rows: p.rows.unwrap_or(24).max(1),
                cols: p.cols.unwrap_or(80).max(1),
            });
        }
        let started = Instant::now();
        let mut exec = sb.exec(spec).await.map_err(|e| sb_error(EXEC_FAILED, e))?;
        let input = exec.input();
        let mut rx = None;
        if interactive {
            let (tx, r) = mpsc::channel::<Input>(64);
            if let Some(id) = &id {
                self.inputs.lock().unwrap().insert(key(id), tx);
            }
            rx = Some(r);
            let prefix = if method == "exec_tty" {
                "exec_tty"
            } else {
                "exec_pipe"
            };
            self.notify(&format!("{prefix}.ready"), json!({"id": id}))
                .await;
        } else if let Some(data) = stdin_data {
            let input = input.clone();
            tokio::spawn(async move {
                let _ = input.write(&data).await;
                let _ = input.close().await;
            });
        }
        // Stdin pump: feeds the exec in order from the client's queue.
        if let Some(mut rx) = rx {
            let input = input.clone();
            tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    let r = match m {
                        Input::Data(d) => input.write(&d).await,
                        Input::Eof => input.close().await,
                        Input::Resize(ws) => input.resize(ws).await,
                        Input::Signal(s) => input.signal(s, false).await,
                    };
                    if r.is_err() {
                        break;
                    }
                }
            });
        }
        let (out_m, err_m) = match method {
            "exec_stream" => ("exec_stream.stdout", "exec_stream.stderr"),
            "exec_pipe" => ("exec_pipe.stdout", "exec_pipe.stderr"),
            "exec_tty" => ("exec_tty.stdout", "exec_tty.stdout"),
            _ => ("", ""),
        };
        let collect = method == "exec";
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match exec.next().await {
                Ok(Some(ExecEvent::Stdout(b))) | Ok(Some(ExecEvent::Stderr(b)))
                    if collect && stdout.len() + stderr.len() + b.len() > EXEC_OUTPUT_MAX =>
                {
                    let _ = b;
                    return Err(RpcError::new(
                        EXEC_FAILED,
                        format!("output exceeds {EXEC_OUTPUT_MAX} bytes: use exec_stream"),
                    ));
                }
                Ok(Some(ExecEvent::Stdout(b))) => {
                    if collect {
                        stdout.extend_from_slice(&b)
                    } else {
                        self.notify(out_m, json!({"id": id, "data": b64(&b)})).await
                    }
                }
                Ok(Some(ExecEvent::Stderr(b))) => {
                    if collect {
                        stderr.extend_from_slice(&b)
                    } else {
                        self.notify(err_m, json!({"id": id, "data": b64(&b)})).await
                    }
                }
                Ok(Some(ExecEvent::Started(_))) => {}
                Ok(Some(ExecEvent::Exit(s))) => {
                    let code = match (s.code, s.signal) {
                        (Some(c), _) => c,
                        (_, Some(sig)) => 128 + sig,
                        _ => -1,
                    };
                    let ms = started.elapsed().as_millis() as u64;
                    return result(wire::ExecResult {
                        exit_code: code,
                        duration_ms: ms,
                        signal: s.signal,
                        oom_killed: s.oom_killed,
                        stdout: collect.then(|| b64(&stdout)),
                        stderr: collect.then(|| b64(&stderr)),
                    });
                }
                Ok(Some(ExecEvent::Failed(e))) => {
                    return Err(RpcError::new(EXEC_FAILED, e.message))
                }
                Ok(None) => return Err(RpcError::new(VM_FAILED, "exec ended without a status")),
                Err(_) => {
                    let why = sb
                        .failure()
                        .await
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "sandbox stopped".into());
                    return Err(RpcError::new(VM_FAILED, why));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `input`, collects `n` answer lines, then ends the input.
    async fn talk(input: &str, n: usize) -> Vec<Value> {
        use tokio::io::AsyncBufReadExt;
        let (client, server) = tokio::io::duplex(1 << 20);
        let (sr, sw) = tokio::io::split(server);
        let shared = Shared::empty();
        let srv = tokio::spawn(serve(shared, tokio::io::BufReader::new(sr), sw));
        let (cr, mut cw) = tokio::io::split(client);
        let input = input.to_string();
        let w = tokio::spawn(async move {
            cw.write_all(input.as_bytes()).await.unwrap();
            cw
        });
        let mut lines = tokio::io::BufReader::new(cr).lines();
        let mut out = Vec::new();
        while out.len() < n {
            let l = lines
                .next_line()
                .await
                .unwrap()
                .expect("server ended early");
            out.push(serde_json::from_str(&l).unwrap());
        }
        let mut cw = w.await.unwrap();
        cw.shutdown().await.unwrap();
        assert!(lines.next_line().await.unwrap().is_none(), "extra output");
        srv.await.unwrap();
        out
    }

    #[tokio::test]
    async fn errors_for_bad_input_and_no_sandbox() {
        let long = format!("{{\"x\":\"{}\"}}\n", "a".repeat(wire::MAX_LINE + 10));
        let input = format!(
            "{{bad\n[1,2]\n{long}{}\n{}\n{}\n{}\n{}\n",
            r#"{"jsonrpc":"2.0","id":1,"method":"nope"}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"exec","params":{"command":"true"}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"write_file","params":{"path":"/x","content":"!!"}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"exec_pipe.stdin","params":{"id":99,"data":""}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"create","params":{"image":"x"}}"#,
        );
        let out = talk(&input, 8).await;
        let code = |i: usize| out[i]["error"]["code"].as_i64().unwrap() as i32;
        assert_eq!(out.len(), 8, "{out:?}");
        assert_eq!(code(0), wire::PARSE_ERROR);
        assert_eq!(code(1), wire::INVALID_REQUEST);
        assert_eq!(code(2), wire::INVALID_REQUEST);
        let by_id = |id: i64| {
            out.iter()
                .find(|v| v["id"] == json!(id))
                .unwrap_or_else(|| panic!("no answer for {id}: {out:?}"))["error"]["code"]
                .as_i64()
                .unwrap() as i32
        };
        assert_eq!(by_id(1), wire::METHOD_NOT_FOUND);
        assert_eq!(by_id(2), VM_FAILED);
        assert_eq!(by_id(3), wire::INVALID_PARAMS);
        assert_eq!(by_id(4), wire::INVALID_PARAMS);
        assert_eq!(by_id(5), VM_FAILED);
    }

    #[tokio::test]
    async fn share_methods_check_params_before_touching_anything() {
        let input = [
            r#"{"jsonrpc":"2.0","id":1,"method":"copy_out","params":{"path":"/w/x","dest":"rel/x"}}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"copy_out","params":{"path":"/w/x"}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"copy_out","params":{"path":"/w/x","dest":"/tmp/airlock-never"}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"share_diff"}"#,
        ]
        .join("\n")
            + "\n";
        let out = talk(&input, 4).await;
        let answer = |id: i64| out.iter().find(|v| v["id"] == json!(id)).unwrap().clone();
        let code = |id: i64| answer(id)["error"]["code"].as_i64().unwrap() as i32;
        assert_eq!(code(1), wire::INVALID_PARAMS);
        assert!(answer(1)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("absolute"));
        assert_eq!(code(2), wire::INVALID_PARAMS);
        assert_eq!(code(3), VM_FAILED);
        assert_eq!(code(4), VM_FAILED);
        assert!(!std::path::Path::new("/tmp/airlock-never").exists());
    }
}
