//! Warm pools as the user sees them: a process holding pools (`airlock mcp --pool N`)
//! publishes their status every two seconds to a private file in the runtime dir, named for
//! its pid; `airlock pool ls` reads those of live processes (and removes those of dead ones).

use std::path::PathBuf;
use std::time::Duration;

use airlock_sandbox::{Pool, PoolStatus, Sandbox, SandboxSpec, Shape};
use serde::{Deserialize, Serialize};

/// One holder's published status.
#[derive(Serialize, Deserialize)]
struct Published {
    pid: u32,
    /// What holds the pools (`mcp`).
    holder: String,
    pools: Vec<PoolStatus>,
    /// The shapes a `pool` holder serves claims of (from other processes) on its socket.
    #[serde(default)]
    shapes: Vec<Shape>,
}

/// Whether `pid` runs (a zombie does not: a holder started by `pool start` is reaped by
/// whatever adopted it, maybe late).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

fn dir() -> PathBuf {
    crate::detach::runtime_dir().join("pools")
}

/// Writes `status()` every two seconds until the process ends; the file is removed on a
/// clean exit by the next `pool ls` otherwise (its pid is gone).
pub async fn publish<F>(holder: &'static str, status: F)
where
    F: Fn() -> Vec<PoolStatus> + Send + 'static,
{
    publish_with(holder, Vec::new(), status).await
}

/// [`publish`], with the shapes claims may ask for.
async fn publish_with<F>(holder: &'static str, shapes: Vec<Shape>, status: F)
where
    F: Fn() -> Vec<PoolStatus> + Send + 'static,
{
    let dir = dir();
    if let Err(e) = airlock_sandbox::private_dir(&dir) {
        tracing::warn!("pool status is not published: {e}");
        return;
    }
    let path = dir.join(format!("{}.json", std::process::id()));
    let tmp = path.with_extension("tmp");
    loop {
        let p = Published {
            pid: std::process::id(),
            holder: holder.into(),
            pools: status(),
            shapes: shapes.clone(),
        };
        let wrote = serde_json::to_vec(&p)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                use std::io::Write;
                airlock_sandbox::private_file(&tmp)?.write_all(&b)?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = wrote {
            tracing::debug!("cannot publish the pool status: {e}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `airlock pool ls [--json]`.
pub fn ls(json: bool) -> Result<(), String> {
    match std::fs::read_dir(dir()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", dir().display()))
        }
        _ => {}
    }
    let mut all = Vec::new();
    for p in records() {
        if alive(p.pid) {
            all.push(p);
        } else {
            let _ = std::fs::remove_file(dir().join(format!("{}.json", p.pid)));
            let _ = std::fs::remove_file(socket_of(p.pid));
            let _ = std::fs::remove_file(dir().join(format!("{}.log", p.pid)));
        }
    }
    all.sort_by_key(|p| p.pid);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:<8} {:<6} {:<18} {:>4} {:>5} {:>7} {:>7} {:>6} {:>9}",
        "HOLDER", "PID", "TEMPLATE", "SIZE", "READY", "FILLING", "CLAIMED", "MISSED", "IDLE PSS"
    );
    for p in &all {
        for s in &p.pools {
            let key = s.template.as_deref().unwrap_or("-");
            println!(
                "{:<8} {:<6} {:<18} {:>4} {:>5} {:>7} {:>7} {:>6} {:>6} MiB{}",
                p.holder,
                p.pid,
                &key[..key.len().min(16)],
                s.size,
                s.ready,
                s.filling,
                s.claimed,
                s.missed,
                s.idle_pss_bytes >> 20,
                s.last_error
                    .as_deref()
                    .map(|e| format!("  (cannot fill: {e})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// A pool holder's claim socket (`airlock pool serve`), named for its pid.
fn socket_of(pid: u32) -> PathBuf {
    dir().join(format!("{pid}.sock"))
}

/// Holders that serve claims from other processes, live, with the shapes they hold.
fn claimable() -> Vec<(PathBuf, Vec<Shape>)> {
    holders()
        .into_iter()
        .filter(|p| p.holder == "pool")
        .map(|p| (socket_of(p.pid), p.shapes))
        .collect()
}

/// Starts `spec`: claimed from a running `airlock pool` holder of its shape when there is
/// one with a sandbox ready, else as [`Sandbox::start`] does. A holder that fails the claim
/// costs a warning, not the start.
pub async fn start(spec: SandboxSpec) -> Result<Sandbox, airlock_sandbox::Error> {
    if let Some(shape) = Shape::of(&spec) {
        for (sock, shapes) in claimable() {
            if !shapes.contains(&shape) {
                continue;
            }
            match airlock_sandbox::claim_from_pool(&sock, &spec, &shape).await {
                Ok(Some(sb)) => {
                    tracing::debug!(id = sb.id(), "claimed from a pool");
                    return Ok(sb);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("the pool at {} could not serve: {e}", sock.display())
                }
            }
        }
    }
    Sandbox::start(spec).await
}

/// `airlock pool serve`: holds a pool of `size` sandboxes of `shape` and serves claims on
/// `<runtime>/pools/<pid>.sock` until SIGTERM or SIGINT. Then the ready VMs go at once, and
/// it waits for claimed sandboxes to end (a second signal: it exits, and they die with it).
pub async fn serve(shape: SandboxSpec, size: usize) -> Result<(), String> {
    let pool = Pool::new(shape, size).map_err(|e| e.to_string())?;
    airlock_sandbox::private_dir(&dir())?;
    let sock = socket_of(std::process::id());
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| format!("listen on {}: {e}", sock.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", sock.display()))?;
    }
    let mut signals = crate::term::Signals::new()?;
    let p = pool.clone();
    let shapes = vec![pool.shape().clone()];
    let publisher = tokio::spawn(publish_with("pool", shapes, move || vec![p.status()]));
    eprintln!(
        "airlock: pool of {size} on {} (pid {})",
        sock.display(),
        std::process::id()
    );
    let mut claims = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => {
                    let p = pool.clone();
                    claims.spawn(async move {
                        if let Err(e) = p.serve_claim(s).await {
                            tracing::warn!("claim: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("accept: {e}"),
            },
            Some(_) = claims.join_next(), if !claims.is_empty() => {}
            _ = signals.next_terminating() => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    pool.close();
    if !claims.is_empty() {
        eprintln!(
            "airlock: pool closed; waiting for {} claimed sandbox(es) to end",
            claims.len()
        );
        tokio::select! {
            _ = async { while claims.join_next().await.is_some() {} } => {}
            _ = signals.next_terminating() => {}
        }
    }
    publisher.abort();
    let _ = std::fs::remove_file(dir().join(format!("{}.json", std::process::id())));
    Ok(())
}

/// Every published record, of live holders and dead ones.
fn records() -> Vec<Published> {
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<Published>(&b).ok())
        .collect()
}

/// Live holders' published records.
fn holders() -> Vec<Published> {
    records().into_iter().filter(|p| alive(p.pid)).collect()
}

/// `airlock pool start`: runs this same command line as `pool serve` in its own session,
/// its output in `<runtime>/pools/<pid>.log`, and prints its pid once a sandbox is ready.
pub async fn start_detached() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let at = args
        .iter()
        .position(|a| a == "pool")
        .and_then(|i| args[i..].iter().position(|a| a == "start").map(|j| i + j))
        .ok_or("cannot find `pool start` in the command line")?;
    args[at] = "serve".into();
    let exe = std::env::current_exe().map_err(|e| format!("this executable: {e}"))?;
    airlock_sandbox::private_dir(&dir())?;
    let tmp_log = dir().join(format!("start-{}.log", airlock_sandbox::new_id()));
    let log = airlock_sandbox::private_file(&tmp_log).map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the holder outlives this terminal's session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start the pool holder: {e}"))?;
    let pid = child.id();
    let log = dir().join(format!("{pid}.log"));
    let _ = std::fs::rename(&tmp_log, &log);
    let tail = |log: &std::path::Path| {
        let t = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("the pool holder exited ({st}):\n{}", tail(&log)));
        }
        if let Some(p) = holders().into_iter().find(|p| p.pid == pid) {
            if let Some(e) = p.pools.iter().find_map(|s| s.last_error.clone()) {
                // SAFETY: our own child, not reaped yet.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                let _ = child.wait();
                return Err(format!("the pool cannot fill: {e}"));
            }
            if p.pools.iter().any(|s| s.ready > 0) {
                println!("{pid}");
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the pool holder (pid {pid}) has no sandbox ready after 10 minutes; see {}",
                log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `airlock pool rm`: SIGTERM to each `pool` holder named (or all), then waits for it to end.
pub async fn rm(all: bool, pids: &[u32]) -> Result<(), String> {
    let live: Vec<u32> = holders()
        .into_iter()
        .filter(|p| p.holder == "pool")
        .map(|p| p.pid)
        .collect();
    let targets: Vec<u32> = if all { live.clone() } else { pids.to_vec() };
    if let Some(bad) = targets.iter().find(|p| !live.contains(p)) {
        return Err(format!(
            "no pool holder with pid {bad} (see `airlock pool ls`; holders inside `airlock mcp` end with it)"
        ));
    }
    for &pid in &targets {
        // SAFETY: kill(2) of a pid that published itself as a pool holder.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for &pid in &targets {
        while alive(pid) {
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "pool holder {pid} still runs: it waits for its claimed sandboxes to end (rm it again to kill them)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = std::fs::remove_file(dir().join(format!("{pid}.log")));
        println!("{pid}");
    }
    Ok(())
}
