//! Helpers every end-to-end test binary of the CLI shares (each `tests/*.rs` is its own crate,
//! so each uses only some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The busybox test rootfs: `$AIRLOCK_TEST_ROOTFS`, else the demo rootfs `scripts/setup`
/// builds. A missing one fails loudly, never skips.
pub fn rootfs() -> String {
    if let Ok(r) = std::env::var("AIRLOCK_TEST_ROOTFS") {
        return r;
    }
    let cache = std::env::var("AIRLOCK_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/airlock"));
    let p = cache.join("demo-rootfs");
    assert!(
        p.join("bin/busybox").exists(),
        "no test rootfs at {}: run scripts/setup",
        p.display()
    );
    p.display().to_string()
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A test's own airlock: its runtime dir and TMPDIR, removed (with every sandbox and pool
/// holder still in them) when it drops. Test files add their own methods in `impl Env`.
pub struct Env {
    pub rt: tempfile::TempDir,
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            rt: tempfile::tempdir().unwrap(),
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    /// `airlock ARGS` in this environment, stdin closed.
    pub fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"));
        c.args(args)
            .env("AIRLOCK_RUNTIME_DIR", self.rt.path())
            .env("TMPDIR", self.tmp.path())
            .stdin(std::process::Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd(args).output().unwrap()
    }

    /// Stdout of `airlock ARGS`, which must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "airlock {args:?} failed: {}",
            text(&o.stderr)
        );
        text(&o.stdout)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Never leave a supervisor or a pool holder behind, even when an assertion failed.
        if let Ok(o) = self.cmd(&["ls", "-a", "--json"]).output() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                for s in v.as_array().into_iter().flatten() {
                    let _ = self.run(&["rm", "-f", s["id"].as_str().unwrap_or("")]);
                }
            }
        }
        let _ = self.run(&["pool", "rm", "--all"]);
    }
}
