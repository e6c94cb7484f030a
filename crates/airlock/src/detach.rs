//! Long-lived sandboxes without a daemon: `run -d` starts one supervisor process per sandbox
//! (`airlock __supervise`, in its own session) that owns the VM and serves the JSON-RPC API on
//! `<runtime dir>/sandboxes/<id>/sock` (0600). Every other command (`exec`, `ls`, `kill`, …)
//! is a client of that socket or reads the record directory.
//!
//! Record directory `<runtime dir>/sandboxes/<id>/`: `meta.json` (settings; secret names and
//! hosts, never values), `lock` (flock'd by the live supervisor: that is how `ls` tells
//! running from dead), `sock`, `log` (the detached command's output), `exit.json` (written on a
//! clean stop; missing on a dead sandbox). The supervisor gets its settings, secret values
//! included, as JSON on its stdin pipe, never in argv or the environment.

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_sandbox::{private_file, ExecEvent, ExecSpec, Sandbox};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use airlock_rpc::client::{Client, ExecKind, ExecMessage};
use airlock_rpc::wire;

use crate::launch::Launch;

/// What the parent sends the supervisor on its stdin.
#[derive(Clone, Serialize, Deserialize)]
pub struct SuperviseRequest {
    /// The sandbox.
    pub launch: Launch,
    /// Command to run detached (its output goes to `log`); empty: none.
    pub cmd: Vec<String>,
    /// Environment of every command.
    pub env: Vec<(String, String)>,
    /// Working directory of the detached command.
    pub workdir: Option<String>,
    /// User of the detached command.
    pub user: Option<String>,
    /// Shown by `ls`/`inspect`: the image or rootfs.
    pub source: String,
    /// `--name`: unique among the records; commands accept it in place of the id.
    #[serde(default)]
    pub name: Option<String>,
    /// `--label K=V`.
    #[serde(default)]
    pub labels: Vec<(String, String)>,
    /// `-p` forwards (as `port-forward` takes them), set up by the parent once the sandbox runs
    /// and again by `start`.
    #[serde(default)]
    pub publish: Vec<String>,
    /// `run -d --rm`: the record goes when the sandbox stops.
    #[serde(default)]
    pub rm: bool,
    /// `start`: the stopped sandbox to start again (its id, record and writable layer).
    #[serde(default)]
    pub restart: Option<String>,
}

/// `meta.json`: what `ls` and `inspect` show. No secret values.
#[derive(Serialize, Deserialize, Clone)]
pub struct Meta {
    /// Sandbox id.
    pub id: String,
    /// `--name`, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `--label`s.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Image or rootfs.
    pub source: String,
    /// Detached command.
    pub command: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// Supervisor pid.
    pub supervisor_pid: u32,
    /// VMM pid.
    pub vm_pid: u32,
    /// vCPUs.
    pub cpus: u32,
    /// RAM MiB.
    pub memory_mib: u32,
    /// No NIC.
    pub no_network: bool,
    /// Allow rules at start.
    pub allow_hosts: Vec<String>,
    /// Secret names and their hosts.
    pub secrets: Vec<SecretMeta>,
    /// Started `--privileged` (a fork keeps it).
    #[serde(default)]
    pub privileged: bool,
}

/// A secret as recorded: name and hosts only.
#[derive(Serialize, Deserialize, Clone)]
pub struct SecretMeta {
    /// Variable name.
    pub name: String,
    /// Hosts.
    pub hosts: Vec<String>,
}

fn runtime_dir() -> PathBuf {
    airlock_sandbox::paths()
        .into_iter()
        .find(|(k, _)| *k == "state")
        .map(|(_, p)| p)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Where sandbox records live.
pub fn records_dir() -> PathBuf {
    runtime_dir().join("sandboxes")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A sandbox's state as `ls` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The supervisor holds the lock.
    Running,
    /// Stopped cleanly (`kill`, or the VM ended).
    Exited,
    /// The supervisor died without cleaning up (e.g. SIGKILL); its VM died with it.
    Dead,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Dead => "dead",
        }
    }
}

fn status(dir: &Path) -> Status {
    let Ok(f) = File::open(dir.join("lock")) else {
        return Status::Dead;
    };
    // SAFETY: flock on a valid fd; released when `f` closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Status::Running;
    }
    if dir.join("exit.json").exists() {
        Status::Exited
    } else {
        Status::Dead
    }
}

/// Checks a `--name`: what docker accepts (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`), at most 64 bytes.
pub fn check_name(n: &str) -> Result<String, String> {
    let ok = n.len() <= 64
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(n.to_string())
    } else {
        Err(format!(
            "{n:?} is not a valid name: use letters, digits, '_', '.' and '-', starting with a \
             letter or digit, at most 64 characters"
        ))
    }
}

/// The record that carries `name`, if any.
fn named(name: &str) -> Option<(PathBuf, Meta)> {
    records()
        .into_iter()
        .find(|(_, m, _)| m.name.as_deref() == Some(name))
        .map(|(d, m, _)| (d, m))
}

/// Error unless `name` is free (a record keeps its name until `rm` or `prune`, as in docker).
fn name_free(name: &str) -> Result<(), String> {
    match named(name) {
        Some((_, m)) => Err(format!(
            "the name {name:?} is already in use by sandbox {}: remove it (airlock rm -f {name}) \
             or choose another name",
            m.id
        )),
        None => Ok(()),
    }
}

/// The record directory of `id`: a name, the id, or a unique prefix of it.
fn find(id: &str) -> Result<PathBuf, String> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(format!("{id:?} is not a sandbox id"));
    }
    if let Some((d, _)) = named(id) {
        return Ok(d);
    }
    let dir = records_dir();
    let exact = dir.join(id);
    if exact.join("meta.json").exists() {
        return Ok(exact);
    }
    let matches: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(id))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    match matches.len() {
        1 => Ok(matches.into_iter().next().unwrap()),
        0 => Err(format!("no sandbox {id} (see airlock ls -a)")),
        _ => Err(format!(
            "{id} matches several sandboxes: give more of the id"
        )),
    }
}

fn read_meta(dir: &Path) -> Result<Meta, String> {
    let b = std::fs::read(dir.join("meta.json")).map_err(|e| format!("{}: {e}", dir.display()))?;
    serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", dir.display()))
}

// ---------------------------------------------------------------------------------------------
// run -d: the parent side

/// Starts the supervisor, waits until the sandbox is up, prints its id.
pub fn run_detached(req: SuperviseRequest) -> i32 {
    match launch(&req) {
        Ok(id) => {
            println!("{id}");
            0
        }
        Err(e) => {
            eprintln!("airlock: {e}");
            crate::EXIT_SANDBOX_FAILED
        }
    }
}

/// Starts the supervisor and, once the sandbox runs, its `-p` forwards; returns the id. A
/// failed forward stops the sandbox again (and removes a new one's record).
fn launch(req: &SuperviseRequest) -> Result<String, String> {
    let id = start_supervisor(req)?;
    if req.publish.is_empty() {
        return Ok(id);
    }
    // `-p`: the supervisor holds the forwards, as after `airlock port-forward`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let r = forward(&id, &req.publish, &mut std::io::stderr()).await;
        if let Err(e) = r {
            // Nothing half-made stays behind (quietly: stdout is for the id).
            let _ = halt(&id, None).await;
            if req.restart.is_none() {
                if let Ok(d) = find(&id) {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
            return Err(format!("-p: {e}"));
        }
        Ok(id)
    })
}

/// Starts a detached sandbox from snapshot `name` with the network policy sandbox `source` was
/// started with (secrets excepted: their values live only in its supervisor); returns its id.
pub fn start_from_snapshot(name: &str, source: &str) -> Result<String, String> {
    let meta = read_meta(&find(source)?)?;
    let launch = Launch {
        image: None,
        rootfs: None,
        platform: None,
        insecure_registry: Vec::new(),
        cpus: meta.cpus,
        memory_mib: meta.memory_mib,
        disk_mib: airlock_sandbox::DEFAULT_DISK_MIB,
        accel: None,
        hostname: None,
        kernel_args: Vec::new(),
        cold: false,
        from: Some(name.to_string()),
        net: crate::launch::Net {
            disabled: meta.no_network,
            allow_hosts: meta.allow_hosts.clone(),
            ..Default::default()
        },
        mounts: Vec::new(),
        fs_rules: Vec::new(),
        share_quota_mib: None,
        privileged: meta.privileged,
    };
    start_supervisor(&SuperviseRequest {
        launch,
        cmd: Vec::new(),
        env: Vec::new(),
        workdir: None,
        user: None,
        source: format!("fork of {}", meta.id),
        name: None,
        labels: meta.labels.clone().into_iter().collect(),
        publish: Vec::new(),
        rm: false,
        restart: None,
    })
}

fn start_supervisor(req: &SuperviseRequest) -> Result<String, String> {
    use std::os::unix::process::CommandExt;
    // Early, so a taken name costs no boot; the supervisor checks again under a lock.
    if let (Some(n), None) = (&req.name, &req.restart) {
        name_free(n)?;
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__supervise")
        // Only what Airlock reads: a secret passed as $NAME must not live on in its environ.
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, v)| {
            let k = k.to_string_lossy();
            let secret = req.launch.net.secrets.iter().any(|s| {
                s.name == k || (!s.value.is_empty() && v.to_string_lossy().contains(&s.value))
            });
            !secret
                && (k.starts_with("AIRLOCK_")
                    || k.starts_with("XDG_")
                    || ["HOME", "PATH", "USER", "TMPDIR", "LANG"].contains(&k.as_ref()))
        }))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; the supervisor must outlive our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the supervisor: {e}"))?;
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(&body)
            .map_err(|e| format!("cannot talk to the supervisor: {e}"))?;
    }
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    out.read_line(&mut line)
        .map_err(|e| format!("supervisor: {e}"))?;
    let v: Value = serde_json::from_str(line.trim()).map_err(|_| {
        let _ = child.wait();
        "the supervisor ended before the sandbox was ready".to_string()
    })?;
    if let Some(id) = v["id"].as_str() {
        // Not waited for: it runs on in its own session; init reaps it when we exit.
        return Ok(id.to_string());
    }
    let _ = child.wait();
    Err(v["error"]
        .as_str()
        .unwrap_or("supervisor failed")
        .to_string())
}

// ---------------------------------------------------------------------------------------------
// __supervise: the supervisor

/// The supervisor's main: reads the request from stdin, starts the sandbox, serves the socket.
pub async fn supervise() -> i32 {
    let mut raw = Vec::new();
    // Bounded: the request is a few KiB; refuse anything absurd.
    if std::io::stdin()
        .take(16 * 1024 * 1024)
        .read_to_end(&mut raw)
        .is_err()
    {
        return 1;
    }
    let status = |v: Value| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    };
    let req: SuperviseRequest = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => {
            status(json!({"error": format!("bad supervisor request: {e}")}));
            return 1;
        }
    };
    raw.fill(0);
    drop(raw);
    // The record (and its lock) exist before the boot: a kept writable layer lives in it.
    let restart = req.restart.is_some();
    let id = match &req.restart {
        Some(id) => id.clone(),
        None => airlock_sandbox::new_id(),
    };
    let dir = records_dir().join(&id);
    let lock = match claim_record(&dir, restart) {
        Ok(l) => l,
        Err(e) => {
            status(json!({"error": e}));
            return 1;
        }
    };
    // Undoes a failed start: a new record goes; a restarted one keeps its layer.
    let fail = |e: String| {
        if !restart {
            let _ = std::fs::remove_dir_all(&dir);
        }
        status(json!({"error": e}));
        1
    };
    let mut spec = match req.launch.spec().await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // Shared files belong to the sandbox user inside, as in foreground `run`.
    if !spec.shares.is_empty() {
        spec.share_owner =
            crate::launch::share_owner(req.user.as_deref(), req.launch.rootfs.as_deref());
    }
    spec.id = Some(id.clone());
    // A fork's writable layer is in its snapshot's memory image; it cannot be kept apart.
    if req.launch.from.is_none() {
        spec.writable_disk = Some(dir.join("scratch.ext4"));
    }
    let sb = match Sandbox::start(spec).await {
        Ok(sb) => Arc::new(sb),
        Err(e) => return fail(e.to_string()),
    };
    let setup = || -> Result<tokio::net::UnixListener, String> {
        let old = if restart { read_meta(&dir).ok() } else { None };
        // Names are claimed one supervisor at a time, from the check to meta.json.
        let names = match &req.name {
            Some(n) if !restart => {
                let f =
                    private_file(&records_dir().join(".names.lock")).map_err(|e| e.to_string())?;
                // SAFETY: flock on a valid fd; released when `f` drops at the end of setup.
                unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
                name_free(n)?;
                Some(f)
            }
            _ => None,
        };
        let meta = Meta {
            id: id.clone(),
            name: req.name.clone(),
            labels: req.labels.iter().cloned().collect(),
            source: req.source.clone(),
            command: req.cmd.clone(),
            created: old.as_ref().map_or_else(now, |m| m.created),
            supervisor_pid: std::process::id(),
            vm_pid: sb.vm_pid(),
            cpus: req.launch.cpus,
            memory_mib: req.launch.memory_mib,
            no_network: req.launch.net.disabled,
            privileged: req.launch.privileged,
            allow_hosts: req.launch.net.allow_hosts.clone(),
            secrets: req
                .launch
                .net
                .secrets
                .iter()
                .map(|s| SecretMeta {
                    name: s.name.clone(),
                    hosts: s.hosts.clone(),
                })
                .collect(),
        };
        write_private(
            &dir.join("meta.json"),
            &serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?,
        )?;
        drop(names);
        // What `start` needs to boot it again, secret values blanked: they never reach a disk,
        // `start` takes them from its caller's environment.
        let mut saved = SuperviseRequest {
            restart: None,
            ..req.clone()
        };
        for s in &mut saved.launch.net.secrets {
            s.value = String::new();
        }
        write_private(
            &dir.join("request.json"),
            &serde_json::to_vec(&saved).map_err(|e| e.to_string())?,
        )?;
        for stale in ["exit.json", "main-exit"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        // Kept across `start`s, as docker keeps a container's log.
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(dir.join("log"))
            .map_err(|e| format!("{}: {e}", dir.join("log").display()))?;
        // The directory is 0700 already; the socket is 0600 as well, set before bind.
        let _ = std::fs::remove_file(dir.join("sock"));
        // SAFETY: umask has no failure mode.
        let old = unsafe { libc::umask(0o177) };
        let l = std::os::unix::net::UnixListener::bind(dir.join("sock"));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let l = l.map_err(|e| format!("bind socket: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        tokio::net::UnixListener::from_std(l).map_err(|e| e.to_string())
    };
    let listener = match setup() {
        Ok(x) => x,
        Err(e) => {
            sb.kill();
            return fail(e);
        }
    };
    let _lock = lock;
    // From here on our diagnostics go to the supervisor log, not the parent's pipe.
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join("supervisor.log"))
    {
        // SAFETY: dup2 onto stderr with a valid fd.
        unsafe { libc::dup2(f.as_raw_fd(), 2) };
    }
    let shared = airlock_rpc::server::Shared::supervisor(sb.clone(), req.env.clone());
    // `exec` defaults to the image's WorkingDir and User, as `run` does.
    shared.set_exec_defaults(req.workdir.clone(), req.user.clone());

    if !req.cmd.is_empty() {
        let mut spec = ExecSpec::new(req.cmd.clone());
        spec.env = req.env.clone();
        spec.cwd = req.workdir.clone();
        spec.user = req.user.clone();
        let sb = sb.clone();
        let log = dir.join("log");
        tokio::spawn(async move { run_main(sb, spec, log).await });
    }
    status(json!({"id": id}));
    // SAFETY: closing our copy of the status pipe so the parent sees EOF.
    unsafe { libc::close(1) };

    let mut shutdown = shared.shutdown_watch();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let reason = loop {
        tokio::select! {
            c = listener.accept() => {
                if let Ok((s, _)) = c {
                    let (r, w) = s.into_split();
                    let shared = shared.clone();
                    tokio::spawn(airlock_rpc::server::serve(shared, tokio::io::BufReader::new(r), w));
                }
            }
            _ = shutdown.wait_for(|s| *s) => {
                break if shared.stopped_gracefully() { "stopped" } else { "killed" }.to_string()
            }
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break "SIGTERM".into(),
            _ = async { match int.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break "SIGINT".into(),
            // A hangup (the terminal of `run -d` closing) is not a reason to stop.
            _ = async { match hup.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(e) = sb.failure().await {
                    break format!("sandbox failed: {e}");
                }
            }
        }
    };
    let _ = std::fs::remove_file(dir.join("sock"));
    shared.stop_sandbox().await;
    drop(sb);
    if req.rm {
        // `run -d --rm`: nothing stays, as docker removes such a container when it stops.
        // Renamed first, so nobody sees a half-removed record.
        let doomed = records_dir().join(format!(".rm-{id}"));
        let gone = std::fs::rename(&dir, &doomed)
            .map(|_| doomed)
            .unwrap_or(dir.clone());
        let _ = std::fs::remove_dir_all(gone);
        airlock_sandbox::prune_state();
        return 0;
    }
    let _ = write_private(
        &dir.join("exit.json"),
        json!({"reason": reason, "at": now()})
            .to_string()
            .as_bytes(),
    );
    0
}

/// Creates (or, for `start`, reopens) the record directory and takes its lock for the
/// supervisor's life.
fn claim_record(dir: &Path, restart: bool) -> Result<File, String> {
    airlock_sandbox::private_runtime_dir().map_err(|e| e.to_string())?;
    airlock_sandbox::private_dir(&records_dir())?;
    if !restart {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let lock = private_file(&dir.join("lock")).map_err(|e| e.to_string())?;
    // SAFETY: flock on a valid fd, held for the process's life.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(if restart {
            "the sandbox is already running".into()
        } else {
            "record directory is locked".into()
        });
    }
    Ok(lock)
}

/// Replaces `path` with `data`, private to this user.
fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    private_file(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs the detached command, appending its output to `log`.
async fn run_main(sb: Arc<Sandbox>, spec: ExecSpec, log: PathBuf) {
    let Ok(f) = tokio::fs::OpenOptions::new().append(true).open(&log).await else {
        return;
    };
    let mut f = tokio::io::BufWriter::new(f);
    let mut exec = match sb.exec(spec).await {
        Ok(e) => e,
        Err(e) => {
            let _ = f.write_all(format!("airlock: {e}\n").as_bytes()).await;
            let _ = f.flush().await;
            return;
        }
    };
    let code = loop {
        match exec.next().await {
            Ok(Some(ExecEvent::Stdout(b))) | Ok(Some(ExecEvent::Stderr(b))) => {
                let _ = f.write_all(&b).await;
                let _ = f.flush().await;
            }
            Ok(Some(ExecEvent::Started(_))) => {}
            Ok(Some(ExecEvent::Exit(s))) => {
                break s.code.unwrap_or(128 + s.signal.unwrap_or(0));
            }
            Ok(Some(ExecEvent::Failed(e))) => {
                let _ = f
                    .write_all(format!("airlock: {}\n", e.message).as_bytes())
                    .await;
                break 127;
            }
            Ok(None) | Err(_) => return,
        }
    };
    let _ = f.flush().await;
    if let Some(dir) = log.parent() {
        let _ = private_file(&dir.join("main-exit"))
            .and_then(|mut f| f.write_all(code.to_string().as_bytes()));
    }
}

// ---------------------------------------------------------------------------------------------
// Client side of the socket

/// The typed JSON-RPC client, connected to sandbox `id`'s supervisor.
pub async fn connect(id: &str) -> Result<(Client, PathBuf), String> {
    let dir = find(id)?;
    if status(&dir) != Status::Running {
        return Err(format!(
            "sandbox {} is not running (airlock ls -a)",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    let c = Client::connect(&dir.join("sock")).await?;
    Ok((c, dir))
}

/// Options of `airlock exec`.
pub struct ExecOpts {
    /// Sandbox id.
    pub id: String,
    /// Forward stdin.
    pub interactive: bool,
    /// Terminal.
    pub tty: bool,
    /// Working directory.
    pub workdir: Option<String>,
    /// User.
    pub user: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Program and arguments.
    pub cmd: Vec<String>,
}

/// `airlock exec`: the exit code of the command (125/126/127 as `run`).
pub async fn exec(o: ExecOpts) -> i32 {
    match exec_inner(o).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock: {e}");
            crate::EXIT_SANDBOX_FAILED
        }
    }
}

async fn exec_inner(o: ExecOpts) -> Result<i32, String> {
    if o.cmd.is_empty() {
        return Err("no command given: airlock exec ID -- CMD [ARG...]".into());
    }
    let (mut c, _) = connect(&o.id).await?;
    let tty = o
        .tty
        .then(crate::term::local_size)
        .map(|s| s.unwrap_or(airlock_sandbox::WinSize { rows: 24, cols: 80 }));
    let params = wire::ExecParams {
        argv: Some(o.cmd),
        env: o.env.into_iter().collect(),
        working_dir: o.workdir,
        user: o.user,
        rows: tty.map(|ws| ws.rows),
        cols: tty.map(|ws| ws.cols),
        ..Default::default()
    };
    let kind = if tty.is_some() {
        ExecKind::Tty
    } else {
        ExecKind::Pipe
    };
    let id = c.exec_start(kind, &params).await?;
    let mut signals = crate::term::Signals::new()?;
    let _raw = if tty.is_some() && o.interactive {
        crate::term::RawMode::enable()
    } else {
        None
    };
    // Stdin: read on a thread, queued to the loop below (bounded: backpressure to the reader).
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    let mut ready = false;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            m = c.exec_next(kind, id) => match m? {
                ExecMessage::Ready => {
                    ready = true;
                    if o.interactive {
                        let tx = in_tx.clone();
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 32 * 1024];
                            let mut stdin = std::io::stdin().lock();
                            loop {
                                match stdin.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => if tx.blocking_send(Some(buf[..n].to_vec())).is_err() { return },
                                }
                            }
                            let _ = tx.blocking_send(None);
                        });
                    } else {
                        c.exec_stdin_eof(kind, id).await?;
                    }
                }
                ExecMessage::Stdout(b) => {
                    if stdout.write_all(&b).and_then(|_| stdout.flush()).is_err() {
                        c.exec_signal(kind, id, libc::SIGPIPE).await?;
                    }
                }
                ExecMessage::Stderr(b) => {
                    let _ = stderr.write_all(&b);
                }
                ExecMessage::Done(r) => {
                    drop(_raw);
                    return Ok(match r {
                        Ok(r) => {
                            if r.oom_killed {
                                eprintln!("airlock: {}", crate::OOM_MESSAGE);
                            }
                            r.exit_code
                        }
                        Err(e) => {
                            eprintln!("airlock: {}", e.message);
                            if e.code != wire::EXEC_FAILED {
                                crate::EXIT_SANDBOX_FAILED
                            } else if e.message.contains("not found") {
                                127
                            } else if e.message.contains("ermission denied") {
                                126
                            } else {
                                125
                            }
                        }
                    });
                }
            },
            d = in_rx.recv(), if ready => match d {
                Some(Some(b)) => c.exec_stdin(kind, id, &b).await?,
                Some(None) | None => c.exec_stdin_eof(kind, id).await?,
            },
            ev = signals.next() => match ev {
                crate::term::SignalEvent::Resize => {
                    if let (Some(ws), true) = (crate::term::local_size(), tty.is_some()) {
                        c.exec_resize(id, ws.rows, ws.cols).await?;
                    }
                }
                crate::term::SignalEvent::Forward(sig) => {
                    c.exec_signal(kind, id, sig).await?;
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ls, inspect, logs, kill, rm, prune, port-forward, allow-list

/// Every running sandbox's id and record.
pub fn running() -> Vec<Meta> {
    records()
        .into_iter()
        .filter(|(_, _, s)| *s == Status::Running)
        .map(|(_, m, _)| m)
        .collect()
}

/// The record of `id` (a name, an id or a unique prefix), if it is running.
pub fn running_one(id: &str) -> Result<Meta, String> {
    let dir = find(id)?;
    if status(&dir) != Status::Running {
        return Err(format!("sandbox {id} is not running"));
    }
    read_meta(&dir)
}

fn records() -> Vec<(PathBuf, Meta, Status)> {
    let mut v: Vec<_> = std::fs::read_dir(records_dir())
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter_map(|e| {
                    let p = e.path();
                    let m = read_meta(&p).ok()?;
                    let s = status(&p);
                    Some((p, m, s))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|(_, m, _)| std::cmp::Reverse(m.created));
    v
}

/// `--label K=V` (or `K`, an empty value, as docker).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').unwrap_or((s, ""));
    if k.is_empty() || k.len() > 256 || v.len() > 4096 || k.chars().any(char::is_control) {
        return Err(format!("{s:?}: expected KEY=VALUE with a non-empty KEY"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// One `ls --filter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `label=K` (any value) or `label=K=V`.
    Label(String, Option<String>),
    /// `name=NAME` (exact).
    Name(String),
    /// `status=running|exited|dead`.
    Status(Status),
}

impl Filter {
    /// Parses `label=K[=V]`, `name=NAME` or `status=S`.
    pub fn parse(s: &str) -> Result<Filter, String> {
        let usage = "use label=KEY, label=KEY=VALUE, name=NAME or status=running|exited|dead";
        match s.split_once('=') {
            Some(("label", kv)) if !kv.is_empty() => Ok(match kv.split_once('=') {
                Some((k, v)) => Filter::Label(k.into(), Some(v.into())),
                None => Filter::Label(kv.into(), None),
            }),
            Some(("name", n)) if !n.is_empty() => Ok(Filter::Name(n.into())),
            Some(("status", st)) => match st {
                "running" => Ok(Filter::Status(Status::Running)),
                "exited" => Ok(Filter::Status(Status::Exited)),
                "dead" => Ok(Filter::Status(Status::Dead)),
                _ => Err(format!("{s:?}: unknown status ({usage})")),
            },
            _ => Err(format!("{s:?}: {usage}")),
        }
    }

    fn matches(&self, m: &Meta, s: Status) -> bool {
        match self {
            Filter::Label(k, v) => m
                .labels
                .get(k)
                .is_some_and(|have| v.as_ref().is_none_or(|v| v == have)),
            Filter::Name(n) => m.name.as_deref() == Some(n.as_str()),
            Filter::Status(want) => s == *want,
        }
    }
}

/// `airlock ls`.
pub fn ls(json_out: bool, all: bool, filters: &[Filter]) -> Result<(), String> {
    let all = all || filters.iter().any(|f| matches!(f, Filter::Status(_)));
    let rows: Vec<_> = records()
        .into_iter()
        .filter(|(_, _, s)| all || *s == Status::Running)
        .filter(|(_, m, s)| filters.iter().all(|f| f.matches(m, *s)))
        .collect();
    if json_out {
        let v: Vec<Value> = rows
            .iter()
            .map(|(_, m, s)| {
                let mut j = serde_json::to_value(m).unwrap_or_default();
                j["status"] = json!(s.as_str());
                j
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "{:<14} {:<8} {:<28} {:<10} {:<24} NAME",
        "ID", "STATUS", "IMAGE", "CREATED", "COMMAND"
    );
    for (_, m, s) in rows {
        let age = now().saturating_sub(m.created);
        let age = if age < 120 {
            format!("{age}s ago")
        } else if age < 7200 {
            format!("{}m ago", age / 60)
        } else {
            format!("{}h ago", age / 3600)
        };
        println!(
            "{:<14} {:<8} {:<28} {:<10} {:<24} {}",
            m.id,
            s.as_str(),
            m.source,
            age,
            m.command.join(" "),
            m.name.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// `airlock wait ID...`: blocks until each sandbox's detached command has ended (or the
/// sandbox stopped), printing its exit code, as `docker wait` does. A sandbox stopped without
/// its command finishing (killed, or none was given) reports 137, docker's code for a kill.
pub async fn wait(ids: &[String]) -> Result<(), String> {
    let dirs: Vec<PathBuf> = ids.iter().map(|i| find(i)).collect::<Result<_, _>>()?;
    for dir in dirs {
        let code = loop {
            if let Ok(b) = std::fs::read_to_string(dir.join("main-exit")) {
                break b.trim().to_string();
            }
            if !dir.exists() {
                return Err(format!(
                    "{}: removed while waiting",
                    dir.file_name().unwrap_or_default().to_string_lossy()
                ));
            }
            if status(&dir) != Status::Running {
                // The command may have ended in the same instant.
                match std::fs::read_to_string(dir.join("main-exit")) {
                    Ok(b) => break b.trim().to_string(),
                    Err(_) => break "137".to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!("{code}");
    }
    Ok(())
}

/// `airlock inspect`.
pub async fn inspect(id: &str) -> Result<(), String> {
    let dir = find(id)?;
    let m = read_meta(&dir)?;
    let s = status(&dir);
    let mut j = serde_json::to_value(&m).map_err(|e| e.to_string())?;
    j["status"] = json!(s.as_str());
    j["socket"] = json!(dir.join("sock"));
    j["log"] = json!(dir.join("log"));
    if let Ok(b) = std::fs::read_to_string(dir.join("main-exit")) {
        j["command_exit_code"] = json!(b.trim().parse::<i64>().ok());
    }
    if let Ok(b) = std::fs::read(dir.join("exit.json")) {
        j["exit"] = serde_json::from_slice(&b).unwrap_or(Value::Null);
    }
    if s == Status::Running {
        if let Ok((mut c, _)) = connect(id).await {
            if let Ok(info) = c.info().await {
                j["kernel"] = json!(info.kernel);
                j["accel"] = json!(info.accel);
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
    Ok(())
}

/// `airlock logs [-f]`.
pub async fn logs(id: &str, follow: bool) -> Result<(), String> {
    let dir = find(id)?;
    let mut f = File::open(dir.join("log")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n > 0 {
            out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            continue;
        }
        out.flush().map_err(|e| e.to_string())?;
        if !follow || status(&dir) != Status::Running {
            // One more read: output written just before the supervisor ended.
            let n = f.read(&mut buf).map_err(|e| e.to_string())?;
            out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `airlock kill`: stops the sandbox (the record stays until `rm`/`prune`).
pub async fn kill(id: &str) -> Result<(), String> {
    halt(id, None).await
}

/// `airlock stop [-t SECS] ID...`: the guest's processes get SIGTERM and `grace` to exit, then
/// the VM powers off with its disks synced; the record and its writable layer stay for
/// `start`. A sandbox that is not running is no error (docker's rule).
pub async fn stop(ids: &[String], grace: Duration) -> Result<(), String> {
    let mut errs = Vec::new();
    for id in ids {
        let r = match find(id) {
            Ok(dir) if status(&dir) != Status::Running => Ok(()),
            Ok(_) => halt(id, Some(grace)).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => println!("{id}"),
            Err(e) => errs.push(e),
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// `airlock start ID...`: boots a stopped sandbox again on its kept writable layer, with the
/// settings it was started with (its command runs again; `-p` forwards are set up again).
/// Secret values were never stored: each is taken from this environment's `$NAME`.
pub fn start(ids: &[String]) -> Result<(), String> {
    let mut errs = Vec::new();
    for id in ids {
        match start_one(id) {
            Ok(()) => println!("{id}"),
            Err(e) => errs.push(e),
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

fn start_one(id: &str) -> Result<(), String> {
    let dir = find(id)?;
    if status(&dir) == Status::Running {
        return Ok(());
    }
    let meta = read_meta(&dir)?;
    let saved = std::fs::read(dir.join("request.json")).map_err(|_| {
        format!(
            "sandbox {id} cannot be started again: it has no saved settings (a fork, or made by an \
             older airlock): airlock run -d anew"
        )
    })?;
    let mut req: SuperviseRequest = serde_json::from_slice(&saved)
        .map_err(|e| format!("{}: {e}", dir.join("request.json").display()))?;
    if req.launch.from.is_some() {
        return Err(format!(
            "sandbox {id} is a fork: its writable layer lived in memory and is gone; start a new \
             one with airlock fork or run --from"
        ));
    }
    for s in &mut req.launch.net.secrets {
        s.value = std::env::var(&s.name).map_err(|_| {
            format!(
                "sandbox {id}: secret {n} is not set in this environment (its value is never \
                 stored): export {n} and start again",
                n = s.name
            )
        })?;
        if s.value.is_empty() {
            return Err(format!("sandbox {id}: secret {} is empty", s.name));
        }
    }
    req.restart = Some(meta.id.clone());
    launch(&req).map(|_| ())
}

/// Stops a running sandbox: `grace` None powers it off at once (`kill`), Some gives its
/// processes that long after SIGTERM (`stop`).
async fn halt(id: &str, grace: Option<Duration>) -> Result<(), String> {
    let dir = find(id)?;
    if status(&dir) != Status::Running {
        return Err(format!("sandbox {id} is not running"));
    }
    let asked = match connect(id).await {
        Ok((mut c, _)) => c.shutdown(grace).await.is_ok(),
        Err(_) => false,
    };
    if !asked {
        // Unresponsive supervisor: it still holds the lock, so the pid is still its own.
        if let Ok(m) = read_meta(&dir) {
            // SAFETY: kill(2) on the supervisor's pid.
            unsafe { libc::kill(m.supervisor_pid as i32, libc::SIGTERM) };
        }
    }
    for i in 0..100 {
        if status(&dir) != Status::Running {
            return Ok(());
        }
        if i == 60 {
            if let Ok(m) = read_meta(&dir) {
                // SAFETY: as above; its VM dies with it (PR_SET_PDEATHSIG).
                unsafe { libc::kill(m.supervisor_pid as i32, libc::SIGKILL) };
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("sandbox {id} did not stop"))
}

/// `airlock rm [-f]`.
pub async fn rm(ids: &[String], force: bool) -> Result<(), String> {
    let mut errs = Vec::new();
    for id in ids {
        let r = async {
            let dir = match find(id) {
                Ok(d) => d,
                // A full id without a record: an `airlock rpc` sandbox, gone with its process
                // (matchlock's SDK calls `rm ID` after close).
                Err(_) if id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if status(&dir) == Status::Running {
                if !force {
                    return Err(format!(
                        "sandbox {id} is running: airlock kill it first, or rm -f"
                    ));
                }
                kill(id).await?;
            }
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            println!("{}", dir.file_name().unwrap_or_default().to_string_lossy());
            Ok(())
        }
        .await;
        if let Err(e) = r {
            errs.push(e);
        }
    }
    airlock_sandbox::prune_state();
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

/// `airlock prune`: removes every stopped or dead sandbox and orphaned VM state.
pub fn prune() -> Result<(), String> {
    for (dir, m, s) in records() {
        if s != Status::Running {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            println!("{}", m.id);
        }
    }
    // Record directories without readable meta (a supervisor killed mid-setup).
    if let Ok(rd) = std::fs::read_dir(records_dir()) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if !p.join("meta.json").exists() && status(&p) != Status::Running {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    airlock_sandbox::prune_state();
    Ok(())
}

/// Parses `[ADDR:]HOST:GUEST`.
pub fn parse_forward(s: &str) -> Result<(String, u16, u16), String> {
    let bad = || format!("{s:?}: expected [ADDR:]HOST_PORT:GUEST_PORT");
    let (rest, guest) = s.rsplit_once(':').ok_or_else(bad)?;
    let guest: u16 = guest.parse().map_err(|_| bad())?;
    let (addr, host) = match rest.rsplit_once(':') {
        Some((a, h)) => (a.trim_matches(|c| c == '[' || c == ']').to_string(), h),
        None => ("127.0.0.1".to_string(), rest),
    };
    let host: u16 = host.parse().map_err(|_| bad())?;
    if guest == 0 {
        return Err(format!("{s:?}: the guest port must be 1-65535"));
    }
    addr.parse::<std::net::IpAddr>()
        .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
    Ok((addr, host, guest))
}

/// `airlock port-forward`: the supervisor binds and forwards for the sandbox's lifetime.
pub async fn port_forward(id: &str, specs: &[String]) -> Result<(), String> {
    forward(id, specs, &mut std::io::stdout()).await
}

/// Sets up forwards through the supervisor, writing one `ADDR:PORT -> GUEST` line each to `out`.
async fn forward(id: &str, specs: &[String], out: &mut dyn Write) -> Result<(), String> {
    let mut by_addr: std::collections::BTreeMap<String, Vec<wire::Forward>> = Default::default();
    for s in specs {
        let (a, h, g) = parse_forward(s)?;
        by_addr.entry(a).or_default().push(wire::Forward {
            local_port: h,
            remote_port: g,
        });
    }
    let (mut c, _) = connect(id).await?;
    for (addr, forwards) in by_addr {
        let p = wire::PortForwardParams {
            forwards,
            addresses: vec![addr],
        };
        for b in c.port_forward(&p).await?.bindings {
            let _ = writeln!(out, "{}:{} -> {}", b.address, b.local_port, b.remote_port);
        }
    }
    Ok(())
}

/// `airlock allow-list add|rm`.
pub async fn allow_list(id: &str, add: bool, hosts: &[String]) -> Result<(), String> {
    let (mut c, _) = connect(id).await?;
    Ok(c.allow_list(add, hosts).await?)
}

/// A guest-supplied path made safe to print: control characters escaped, so a hostile
/// file name cannot drive the terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `airlock diff`: what the guest changed in its overlay workspace shares, docker-style
/// (`A` added, `C` changed, `D` deleted), or the raw list with `--json`.
pub async fn diff(id: &str, json_out: bool) -> Result<(), String> {
    let (mut c, _) = connect(id).await?;
    let mut changes: Vec<(String, String)> = c
        .share_diff()
        .await?
        .changes
        .into_iter()
        .map(|ch| (ch.path, ch.kind))
        .collect();
    changes.sort();
    if json_out {
        let list: Vec<Value> = changes
            .iter()
            .map(|(p, k)| json!({"kind": k, "path": p}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for (path, kind) in &changes {
        let letter = match kind.as_str() {
            "added" => 'A',
            "modified" => 'C',
            "deleted" => 'D',
            _ => '?',
        };
        writeln!(out, "{letter} {}", printable(path)).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Splits `ID:/guest/path`.
pub fn parse_cp_source(s: &str) -> Result<(&str, &str), String> {
    match s.split_once(':') {
        Some((id, path)) if !id.is_empty() && path.starts_with('/') => Ok((id, path)),
        _ => Err(format!(
            "{s:?}: expected ID:/absolute/guest/path (e.g. 3f2a:/workspace/out.txt)"
        )),
    }
}

/// `airlock cp HOSTPATH ID:GUESTPATH`: copies a host file or tree into a running sandbox.
pub async fn cp_in(src: &str, dest: &str) -> Result<(), String> {
    let (id, guest) = parse_cp_source(dest)?;
    let abs = std::path::absolute(src).map_err(|e| format!("{src}: {e}"))?;
    if let Err(e) = abs.symlink_metadata() {
        return Err(format!("{}: {e}", abs.display()));
    }
    let src_s = abs
        .to_str()
        .ok_or_else(|| format!("{}: the source must be UTF-8", abs.display()))?;
    let (mut c, _) = connect(id).await?;
    let p = wire::CopyInParams {
        src: src_s.into(),
        dest: guest.into(),
    };
    c.copy_in(&p).await?;
    Ok(())
}

/// `airlock cp ID:GUESTPATH HOSTPATH`: copies a guest file or tree out to a new host path.
pub async fn cp(src: &str, dest: &str) -> Result<(), String> {
    let (id, guest) = parse_cp_source(src)?;
    if dest.is_empty() {
        return Err("give a host destination path".into());
    }
    // The supervisor's cwd is not ours: resolve here.
    let abs = std::path::absolute(dest).map_err(|e| format!("{dest}: {e}"))?;
    if abs.symlink_metadata().is_ok() {
        return Err(format!(
            "{} already exists: give a new path (cp never overwrites)",
            abs.display()
        ));
    }
    let dest_s = abs
        .to_str()
        .ok_or_else(|| format!("{}: the destination must be UTF-8", abs.display()))?;
    let (mut c, _) = connect(id).await?;
    // The supervisor writes the copy; the modes follow this shell's umask, not its.
    let p = wire::CopyOutParams {
        path: guest.into(),
        dest: dest_s.into(),
        max_bytes: None,
        umask: Some(airlock_sandbox::process_umask()),
    };
    let skipped = c.copy_out(&p).await?.skipped;
    if skipped > 0 {
        eprintln!(
            "airlock: skipped {skipped} entries that are not regular files or directories (symlinks, devices)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp_sources_and_printable_paths() {
        assert_eq!(parse_cp_source("abc:/w/x:y").unwrap(), ("abc", "/w/x:y"));
        assert!(parse_cp_source("abc").is_err());
        assert!(parse_cp_source(":/w").is_err());
        assert!(parse_cp_source("abc:rel").is_err());
        assert_eq!(printable("/w/a\x1b[2Jb\n"), "/w/a\\u{1b}[2Jb\\n");
    }

    #[test]
    fn forward_specs() {
        assert_eq!(
            parse_forward("8080:80").unwrap(),
            ("127.0.0.1".into(), 8080, 80)
        );
        assert_eq!(
            parse_forward("0.0.0.0:0:22").unwrap(),
            ("0.0.0.0".into(), 0, 22)
        );
        assert_eq!(parse_forward("[::1]:9:22").unwrap(), ("::1".into(), 9, 22));
        assert!(parse_forward("80").is_err());
        assert!(parse_forward("x:1:2").is_err());
        assert!(parse_forward("1:0").is_err());
        assert!(parse_forward("1:70000").is_err());
    }
}
