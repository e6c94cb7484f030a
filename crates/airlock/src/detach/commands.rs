//! The other verbs on detached sandboxes: ls, wait, inspect, logs, kill, stop, start,
//! restart, rename, rm, prune, port-forward, allow-list, diff, top and cp.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use airlock_rpc::wire;

use super::*;

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
    let mut done = Done::default();
    for id in ids {
        let r = match find(id).map(|dir| status(&dir)) {
            Ok(Status::Running) => halt(id, Some(grace)).await,
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        done.say(id, r);
    }
    done.result()
}

/// What a verb over many ids did: each id it handled is printed as it goes (docker's way);
/// the errors, one a line, are its result.
#[derive(Default)]
struct Done(Vec<String>);

impl Done {
    fn say(&mut self, id: &str, r: Result<(), String>) {
        match r {
            Ok(()) => println!("{id}"),
            Err(e) => self.0.push(e),
        }
    }

    fn result(self) -> Result<(), String> {
        match self.0.is_empty() {
            true => Ok(()),
            false => Err(self.0.join("\n")),
        }
    }
}

/// `airlock start ID...`: boots a stopped sandbox again on its kept writable layer, with the
/// settings it was started with (its command runs again; `-p` forwards are set up again).
/// Secret values were never stored: each is taken from this environment's `$NAME`.
pub fn start(ids: &[String]) -> Result<(), String> {
    let mut done = Done::default();
    for id in ids {
        done.say(id, start_one(id));
    }
    done.result()
}

/// `airlock restart [-t SECS] ID...`: `stop` then `start`, one sandbox after the other; a
/// stopped one is only started (docker's rule). Its writable layer, name and settings stay.
pub async fn restart(ids: &[String], grace: Duration) -> Result<(), String> {
    let mut done = Done::default();
    for id in ids {
        done.say(id, restart_one(id, grace).await);
    }
    done.result()
}

async fn restart_one(id: &str, grace: Duration) -> Result<(), String> {
    let dir = find(id)?;
    // Checked first: a sandbox that could not start again is left running.
    let req = startable(id, &dir)?;
    if status(&dir) == Status::Running {
        if req.rm {
            return Err(format!(
                "sandbox {id} was run with --rm: stopping it removes it, so it cannot restart \
                 (airlock stop it, then run -d anew)"
            ));
        }
        halt(id, Some(grace)).await?;
    }
    launch(&req).map(|_| ())
}

/// `airlock rename ID NEW`: gives a sandbox, running or not, a new name, which `start` keeps.
pub fn rename(id: &str, new: &str) -> Result<(), String> {
    let new = check_name(new)?;
    let dir = find(id)?;
    let _names = names_lock()?;
    let mut meta = read_meta(&dir)?;
    if meta.name.as_deref() == Some(new.as_str()) {
        return Err(format!("sandbox {id} is already named {new:?}"));
    }
    name_free(&new)?;
    // Both under the names lock, which a supervisor holds while it reads the name and writes
    // its own copies: `start` keeps the new name.
    let req = dir.join("request.json");
    if let Ok(b) = std::fs::read(&req) {
        let bad = |e: String| format!("{}: {e}", req.display());
        let mut v: Value = serde_json::from_slice(&b).map_err(|e| bad(e.to_string()))?;
        v.as_object_mut()
            .ok_or_else(|| bad("not a JSON object".into()))?
            .insert("name".into(), json!(new));
        write_private(&req, v.to_string().as_bytes())?;
    }
    meta.name = Some(new);
    write_private(
        &dir.join("meta.json"),
        &serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?,
    )
}

pub(crate) fn start_one(id: &str) -> Result<(), String> {
    let dir = find(id)?;
    if status(&dir) == Status::Running {
        return Ok(());
    }
    launch(&startable(id, &dir)?).map(|_| ())
}

/// What `start` boots `id` (record `dir`) with: its saved request, secrets filled from this
/// environment; an error says why it cannot start again, before anything is stopped.
fn startable(id: &str, dir: &std::path::Path) -> Result<SuperviseRequest, String> {
    let meta = read_meta(dir)?;
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
    Ok(req)
}

/// Stops a running sandbox: `grace` None powers it off at once (`kill`), Some gives its
/// processes that long after SIGTERM (`stop`).
pub(crate) async fn halt(id: &str, grace: Option<Duration>) -> Result<(), String> {
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
pub(crate) async fn forward(id: &str, specs: &[String], out: &mut dyn Write) -> Result<(), String> {
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
pub(crate) fn printable(s: &str) -> String {
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

/// `airlock top`: the sandbox's processes as a table (`docker top`'s job), or `--json`. The
/// list comes from the guest: every field is shown as text, control characters escaped.
pub async fn top(id: &str, json_out: bool) -> Result<(), String> {
    let (mut c, _) = connect(id).await?;
    let procs = c.top().await?.processes;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&procs).unwrap_or_default()
        );
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let w = |e: std::io::Error| e.to_string();
    writeln!(
        out,
        "{:>7} {:>7} {:>6} {:<4} {:>9} {:>8} COMMAND",
        "PID", "PPID", "UID", "STAT", "RSS(KiB)", "TIME"
    )
    .map_err(w)?;
    for p in &procs {
        let secs = p.cpu_ms / 1000;
        writeln!(
            out,
            "{:>7} {:>7} {:>6} {:<4} {:>9} {:>5}:{:02} {}",
            p.pid,
            p.ppid,
            p.uid,
            printable(&p.state),
            p.rss_kib,
            secs / 60,
            secs % 60,
            printable(&p.command)
        )
        .map_err(w)?;
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
