//! Warm-start templates: a guest saved after its agent said `Hello` and ran a warm-up
//! (`crate::warmup`: a throw-away `Init` and a few spawns; no per-sandbox data reached it),
//! kept as a sparse RAM file, QEMU's device state and the writable disk as it was at that
//! moment. Later sandboxes with the same inputs restore it
//! instead of booting.
//!
//! `<cache>/templates/<key>/` holds `ram`, `state`, `scratch.ext4` and `manifest.json`; the key
//! hashes every input that shapes the guest before `Init` ([`Inputs`]). A template directory
//! is made under a temporary name and renamed into place, so readers never see half of one;
//! the manifest records each file's size and mtime (and the state file's sha256), so a
//! truncated, rewritten or corrupted template is noticed before use.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assets::cache_dir;

/// Bumped whenever the template layout or the capture point changes.
pub(crate) const FORMAT: u32 = 4;

/// Identity of one input file: a change of any of these invalidates the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// Absolute path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Inode number (a replaced file gets a new one).
    pub ino: u64,
}

impl FileId {
    /// Identity of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let path = std::fs::canonicalize(path)?;
        let m = std::fs::metadata(&path)?;
        Ok(FileId {
            path,
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ino: m.ino(),
        })
    }

    /// Whether the file is still there, unchanged.
    pub fn current(&self) -> bool {
        FileId::of(&self.path).is_ok_and(|now| now == *self)
    }
}

/// Everything that shapes a guest up to the template's capture point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    /// Template layout version.
    pub format: u32,
    /// The guest kernel.
    pub kernel: FileId,
    /// The initramfs (carries the agent; its name is the agent's hash).
    pub initrd: FileId,
    /// The read-only root image.
    pub root: FileId,
    /// The QEMU binary.
    pub qemu: FileId,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// Writable layer size, MiB.
    pub disk_mib: u64,
    /// Whether the VM has a NIC.
    pub nic: bool,
    /// Kernel command-line words beyond the backend's own, without the measured TSC rate
    /// (it wobbles between measurements; the template keeps the one it booted with).
    pub cmdline: String,
    /// Accelerator.
    pub accel: String,
    /// Whether the warm-up's `Init` left the agent privileged (`--privileged`): an agent that
    /// restricted itself stays restricted.
    #[serde(default)]
    pub privileged: bool,
}

impl Inputs {
    /// The template key: 16 hex digits of the inputs' sha256.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&Sha256::digest(&json)[..8])
    }

    /// Whether every input file is still there, unchanged.
    pub fn current(&self) -> bool {
        self.kernel.current() && self.initrd.current() && self.root.current() && self.qemu.current()
    }
}

/// Resolves `binary` (a path or a name looked up in `PATH`).
pub(crate) fn resolve_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 {
        return binary.is_file().then(|| binary.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

/// One file of a template as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    name: String,
    size: u64,
    mtime_ns: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

/// `cmdline` without the words that may differ between runs of one host (`tsc_early_khz=`).
pub fn key_cmdline(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("tsc_early_khz="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `manifest.json` of a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// What the template was made from.
    pub inputs: Inputs,
    /// The kernel command-line words it booted with (restores reuse them).
    #[serde(default)]
    pub boot_cmdline: String,
    files: Vec<Entry>,
    /// When it was made, seconds since the epoch.
    pub created_unix: u64,
}

/// A template found valid on disk.
#[derive(Debug, Clone)]
pub struct Template {
    /// Its directory.
    pub dir: PathBuf,
    /// Its key.
    pub key: String,
    /// The kernel command-line words it booted with.
    pub boot_cmdline: String,
}

impl Template {
    /// The RAM file (mapped copy-on-write by restored VMs).
    pub fn ram(&self) -> PathBuf {
        self.dir.join(RAM)
    }
    /// QEMU's migration stream (device state).
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }
    /// The writable disk as it was at capture.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join(SCRATCH)
    }
}

const RAM: &str = "ram";
const STATE: &str = "state";
const SCRATCH: &str = "scratch.ext4";
const MANIFEST: &str = "manifest.json";

/// `<cache>/templates`.
pub fn templates_dir() -> PathBuf {
    cache_dir().join("templates")
}

fn file_entry(dir: &Path, name: &str, hash: bool) -> std::io::Result<Entry> {
    let p = dir.join(name);
    let m = std::fs::metadata(&p)?;
    let sha256 = if hash {
        Some(hex::encode(Sha256::digest(std::fs::read(&p)?)))
    } else {
        None
    };
    Ok(Entry {
        name: name.to_string(),
        size: m.len(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        sha256,
    })
}

fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let bytes = std::fs::read(dir.join(MANIFEST)).map_err(|e| format!("manifest: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("manifest: {e}"))
}

/// Checks a template directory against its manifest: every file present with the recorded
/// size and mtime, the state file with the recorded sha256. `Err` says what is wrong.
pub fn verify(dir: &Path) -> Result<Manifest, String> {
    let m = read_manifest(dir)?;
    for want in &m.files {
        let got = file_entry(dir, &want.name, want.sha256.is_some())
            .map_err(|e| format!("{}: {e}", want.name))?;
        if got.size != want.size {
            return Err(format!(
                "{} is {} bytes, the manifest says {}",
                want.name, got.size, want.size
            ));
        }
        if got.sha256 != want.sha256 {
            return Err(format!("{} does not match its checksum", want.name));
        }
        if got.mtime_ns != want.mtime_ns {
            return Err(format!("{} was modified after capture", want.name));
        }
    }
    for need in [RAM, STATE, SCRATCH] {
        if !m.files.iter().any(|e| e.name == need) {
            return Err(format!("manifest lacks {need}"));
        }
    }
    Ok(m)
}

/// What looking up a template found.
pub enum Lookup {
    /// A valid template.
    Found(Template),
    /// None yet.
    Missing,
    /// One that fails verification (it has been removed); the reason.
    Corrupt(String),
}

/// Finds the template for `inputs`, verifying it; a corrupt one is removed.
pub fn lookup(inputs: &Inputs) -> Lookup {
    let key = inputs.key();
    let dir = templates_dir().join(&key);
    if !dir.join(MANIFEST).exists() {
        return Lookup::Missing;
    }
    match verify(&dir) {
        Ok(m) if m.inputs == *inputs => Lookup::Found(Template {
            dir,
            key,
            boot_cmdline: m.boot_cmdline,
        }),
        Ok(_) => {
            remove(&key);
            Lookup::Corrupt("its manifest names other inputs".into())
        }
        Err(why) => {
            remove(&key);
            Lookup::Corrupt(why)
        }
    }
}

/// Removes template `key` (renamed away first, so a concurrent reader sees all or nothing).
pub fn remove(key: &str) -> bool {
    let dir = templates_dir().join(key);
    let trash = templates_dir().join(format!(".rm-{key}-{}", std::process::id()));
    if std::fs::rename(&dir, &trash).is_err() {
        return false;
    }
    std::fs::remove_dir_all(&trash).is_ok()
}

/// A template being made: a private temporary directory until [`Builder::commit`].
pub struct Builder {
    /// The temporary directory.
    pub dir: PathBuf,
    inputs: Inputs,
    _lock: std::fs::File,
}

impl Builder {
    /// Where the builder VM's RAM goes.
    pub fn ram(&self) -> PathBuf {
        self.dir.join(RAM)
    }
    /// Where the migration stream goes.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }
    /// The builder VM's writable disk.
    pub fn scratch(&self) -> PathBuf {
        self.dir.join(SCRATCH)
    }

    /// Records the manifest and moves the template into place. Another process that made the
    /// same template first wins; ours is dropped.
    pub fn commit(self, boot_cmdline: &str) -> Result<Template, String> {
        let files = [RAM, STATE, SCRATCH]
            .iter()
            .map(|n| file_entry(&self.dir, n, *n == STATE))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("template files: {e}"))?;
        let m = Manifest {
            inputs: self.inputs.clone(),
            boot_cmdline: boot_cmdline.to_string(),
            files,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?;
        crate::assets::write_atomic(&self.dir.join(MANIFEST), &json).map_err(|e| e.to_string())?;
        let key = self.inputs.key();
        let dest = templates_dir().join(&key);
        if std::fs::rename(&self.dir, &dest).is_err() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        Ok(Template {
            dir: dest,
            key,
            boot_cmdline: boot_cmdline.to_string(),
        })
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        // After a commit the directory has moved and this fails harmlessly.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Takes the per-key build lock (waiting for a concurrent builder of the same template), then
/// either finds the template that builder made or returns a [`Builder`] for a new one.
pub fn find_or_start(inputs: &Inputs) -> Result<Result<Template, Builder>, String> {
    use std::os::fd::AsRawFd;
    let root = templates_dir();
    std::fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let key = inputs.key();
    let lock = std::fs::File::create(root.join(format!(".{key}.lock")))
        .map_err(|e| format!("template lock: {e}"))?;
    // SAFETY: flock on a valid fd; blocks until a concurrent builder is done.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "template lock: {}",
            std::io::Error::last_os_error()
        ));
    }
    if let Lookup::Found(t) = lookup(inputs) {
        return Ok(Ok(t));
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!(".tmp-{key}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    Ok(Err(Builder {
        dir,
        inputs: inputs.clone(),
        _lock: lock,
    }))
}

/// One template as `airlock template ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateInfo {
    /// Its key.
    pub key: String,
    /// Its inputs, if the manifest is readable.
    pub inputs: Option<Inputs>,
    /// Bytes it occupies on disk (sparse files count what is allocated).
    pub disk_bytes: u64,
    /// When it was made.
    pub created_unix: u64,
    /// Whether its input files are all still there, unchanged.
    pub current: bool,
    /// Why it cannot be used, if it cannot.
    pub problem: Option<String>,
}

/// Every template in the cache.
pub fn list() -> Vec<TemplateInfo> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(templates_dir()) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        let disk_bytes = std::fs::read_dir(e.path())
            .map(|d| {
                d.flatten()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0);
        let (inputs, created_unix, problem) = match verify(&e.path()) {
            Ok(m) => (Some(m.inputs), m.created_unix, None),
            Err(why) => (
                read_manifest(&e.path()).ok().map(|m| m.inputs),
                0,
                Some(why),
            ),
        };
        let current = inputs.as_ref().is_some_and(Inputs::current);
        out.push(TemplateInfo {
            key: name,
            inputs,
            disk_bytes,
            created_unix,
            current,
            problem,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Removes templates whose inputs changed or vanished, or that fail verification, and
/// leftovers of interrupted builds; returns the keys removed.
pub fn gc() -> Vec<String> {
    let mut removed = Vec::new();
    for t in list() {
        if (!t.current || t.problem.is_some()) && remove(&t.key) {
            removed.push(t.key);
        }
    }
    if let Ok(rd) = std::fs::read_dir(templates_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // .tmp-<key>-<pid>-<n> of a process that is gone.
            if let Some(rest) = name.strip_prefix(".tmp-") {
                let pid = rest.split('-').nth(1).and_then(|p| p.parse::<i32>().ok());
                // SAFETY: kill with signal 0 only probes.
                let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
                if !alive {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    removed
}

/// Copies `src` to a new file `dst`: a reflink where the filesystem can, else only the data
/// extents (the writable layer is sparse).
pub(crate) fn copy_disk(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let s = std::fs::File::open(src)?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600) // a guest's disk: the user's only
        .open(dst)?;
    // SAFETY: FICLONE between two open files.
    if unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) } == 0 {
        return Ok(());
    }
    drop(d);
    std::fs::remove_file(dst)?;
    crate::rootfs::sparse_copy(src, dst)
}
