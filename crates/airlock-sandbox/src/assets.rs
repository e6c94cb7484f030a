//! Where Airlock finds its guest kernel and agent, and the initramfs it builds from the agent.
//!
//! Caches live outside any repository, under [`cache_dir`]:
//! - `kernel/<sha256(kernel/config)[:16]>/vmlinux`, written by `kernel/build.sh`;
//! - `initramfs/<sha256(agent)[:16]>.cpio`, written here on first use.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::Error;

/// The guest kernel configuration this build of Airlock expects (its hash names the cache).
pub const KERNEL_CONFIG: &str = include_str!("../../../kernel/config");

/// `AIRLOCK_CACHE_DIR`, else `$XDG_CACHE_HOME/airlock`, else `~/.cache/airlock`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AIRLOCK_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("airlock");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/airlock")
}

/// First 16 hex digits of the sha256 of `bytes`.
pub fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// Where `kernel/build.sh` puts the kernel for [`KERNEL_CONFIG`].
pub fn default_kernel_path() -> PathBuf {
    cache_dir()
        .join("kernel")
        .join(short_hash(KERNEL_CONFIG.as_bytes()))
        .join("vmlinux")
}

/// The kernel to boot: `AIRLOCK_KERNEL`, else the cached build.
pub fn kernel() -> Result<PathBuf, Error> {
    if let Some(k) = std::env::var_os("AIRLOCK_KERNEL") {
        let k = PathBuf::from(k);
        return if k.is_file() {
            Ok(k)
        } else {
            Err(Error::Setup(format!(
                "AIRLOCK_KERNEL={} is not a file",
                k.display()
            )))
        };
    }
    let k = default_kernel_path();
    if k.is_file() {
        Ok(k)
    } else {
        Err(Error::Setup(format!(
            "guest kernel not built ({} missing); build it with: kernel/build.sh",
            k.display()
        )))
    }
}

/// Candidate locations of the static guest agent, best first.
pub fn agent_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(a) = std::env::var_os("AIRLOCK_AGENT") {
        c.push(PathBuf::from(a));
        return c;
    }
    if let Ok(exe) = std::env::current_exe() {
        // Installed side by side, or a cargo target dir where the agent was built with
        // `--target x86_64-unknown-linux-gnu` (target/<profile>/airlock next to
        // target/x86_64-unknown-linux-gnu/<profile>/airlock-guest).
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..3 {
            let Some(d) = dir else { break };
            c.push(d.join("airlock-guest"));
            for profile in ["release", "debug"] {
                c.push(
                    d.join("x86_64-unknown-linux-gnu")
                        .join(profile)
                        .join("airlock-guest"),
                );
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    c.push(cache_dir().join("agent/airlock-guest"));
    c
}

/// The guest agent binary.
pub fn agent() -> Result<PathBuf, Error> {
    let cands = agent_candidates();
    for p in &cands {
        if is_static_elf(p) {
            return Ok(p.clone());
        }
    }
    Err(Error::Setup(format!(
        "guest agent not found (looked at {}); build it with: scripts/build-agent",
        cands
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// An ELF file without a PT_INTERP program header (a static binary the initramfs can run).
fn is_static_elf(p: &Path) -> bool {
    let Ok(b) = std::fs::read(p) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8])) as usize;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP = 3
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

/// Appends one newc cpio entry. Hand-written: the format is a fixed 110-byte ASCII header, and
/// we need device nodes with chosen numbers, which the cpio crates do not all offer.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The initramfs for `agent_bytes`: /init plus the mount points and /dev/console.
pub fn initramfs_bytes(agent_bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(agent_bytes.len() + 4096);
    let dir = 0o040755;
    let mut ino = 1;
    for d in ["dev", "proc", "sys", "mnt"] {
        cpio_entry(&mut out, ino, d, dir, (0, 0), &[]);
        ino += 1;
    }
    cpio_entry(&mut out, ino, "dev/console", 0o020600, (5, 1), &[]);
    cpio_entry(&mut out, ino + 1, "init", 0o100755, (0, 0), agent_bytes);
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

/// The cached initramfs for the agent at `agent`, built on first use.
pub fn initramfs(agent: &Path) -> Result<PathBuf, Error> {
    let bytes = std::fs::read(agent)
        .map_err(|e| Error::Setup(format!("read agent {}: {e}", agent.display())))?;
    let dir = cache_dir().join("initramfs");
    let path = dir.join(format!("{}.cpio", short_hash(&bytes)));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Setup(format!("create {}: {e}", dir.display())))?;
    write_atomic(&path, &initramfs_bytes(&bytes))?;
    Ok(path)
}

/// Writes via a temporary file and a rename, so concurrent writers and crashes never leave a
/// half-written cache entry behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    // Unique per writer, threads of one process included (parallel tests start sandboxes at
    // once after an agent rebuild).
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    r.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Setup(format!("write {}: {e}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_well_formed() {
        let c = initramfs_bytes(b"\x7fELFagent");
        assert_eq!(&c[..6], b"070701");
        assert_eq!(c.len() % 4, 0);
        let text = String::from_utf8_lossy(&c);
        for name in ["dev/console", "init", "TRAILER!!!"] {
            assert!(text.contains(name), "{name}");
        }
        // The /init entry announces the agent's size.
        let i = text.find("init\0").unwrap();
        let header = &text[i - 110..i];
        assert_eq!(&header[54..62], format!("{:08x}", 9));
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(Path::new("/nonexistent")));
        // A dynamic executable has PT_INTERP.
        assert!(!is_static_elf(Path::new("/bin/sh")));
    }
}
