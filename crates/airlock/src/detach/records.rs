//! The record store: one directory per detached sandbox under the runtime dir, its
//! settings (`meta.json`), its status (the supervisor's flock) and the lookups by id, prefix
//! or name.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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

pub(crate) fn runtime_dir() -> PathBuf {
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

pub(crate) fn now() -> u64 {
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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Dead => "dead",
        }
    }
}

pub(crate) fn status(dir: &Path) -> Status {
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
pub(crate) fn named(name: &str) -> Option<(PathBuf, Meta)> {
    records()
        .into_iter()
        .find(|(_, m, _)| m.name.as_deref() == Some(name))
        .map(|(d, m, _)| (d, m))
}

/// Held while a name is checked and written (`run -d --name`, `start`, `rename`), so two of
/// them cannot take one name; released when the file drops.
pub(crate) fn names_lock() -> Result<File, String> {
    let path = records_dir().join(".names.lock");
    let f = airlock_sandbox::private_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a valid fd; released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    Ok(f)
}

/// Error unless `name` is free (a record keeps its name until `rm` or `prune`, as in docker).
pub(crate) fn name_free(name: &str) -> Result<(), String> {
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
pub(crate) fn find(id: &str) -> Result<PathBuf, String> {
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

pub(crate) fn read_meta(dir: &Path) -> Result<Meta, String> {
    let b = std::fs::read(dir.join("meta.json")).map_err(|e| format!("{}: {e}", dir.display()))?;
    serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", dir.display()))
}

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

pub(crate) fn records() -> Vec<(PathBuf, Meta, Status)> {
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
