//! `run -d` and `start`: the parent side that launches a supervisor and waits for it, and
//! the supervisor itself (`airlock __supervise`), which owns the VM and serves its socket.

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock_sandbox::{private_file, ExecEvent, ExecSpec, Sandbox};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::launch::Launch;

use super::*;

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
pub(crate) fn launch(req: &SuperviseRequest) -> Result<String, String> {
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

pub(crate) fn start_supervisor(req: &SuperviseRequest) -> Result<String, String> {
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
        // Names are claimed one at a time, from the check to meta.json (`rename` too). A
        // restart takes the lock too: the record may have been renamed since.
        let names = match req.name.is_some() || restart {
            true => Some(names_lock()?),
            false => None,
        };
        let old = if restart { read_meta(&dir).ok() } else { None };
        // A restart keeps the name the record has now: it may have been renamed since
        // `start` read the saved request.
        let name = match &old {
            Some(m) => m.name.clone(),
            None => req.name.clone(),
        };
        if let (Some(n), false) = (&name, restart) {
            name_free(n)?;
        }
        let meta = Meta {
            id: id.clone(),
            name: name.clone(),
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
        // What `start` needs to boot it again, secret values blanked: they never reach a disk,
        // `start` takes them from its caller's environment.
        let mut saved = SuperviseRequest {
            restart: None,
            name,
            ..req.clone()
        };
        for s in &mut saved.launch.net.secrets {
            s.value = String::new();
        }
        write_private(
            &dir.join("request.json"),
            &serde_json::to_vec(&saved).map_err(|e| e.to_string())?,
        )?;
        drop(names);
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
pub(crate) fn claim_record(dir: &Path, restart: bool) -> Result<File, String> {
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

/// Replaces `path` with `data`, private to this user. Readers see the old file or the new
/// one, never a missing or half-written one (`ls` and `prune` read records any time).
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let r = private_file(&tmp)
        .and_then(|mut f| f.write_all(data))
        .and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs the detached command, appending its output to `log`.
pub(crate) async fn run_main(sb: Arc<Sandbox>, spec: ExecSpec, log: PathBuf) {
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
