//! What every real-guest test of this crate starts from.

#![allow(dead_code)] // each test binary uses its own part

use airlock_sandbox::{ExecSpec, RootfsSource, Sandbox, SandboxSpec};

/// The demo rootfs directory: `AIRLOCK_TEST_ROOTFS` (set by scripts/test), else the cache's.
pub fn root_path() -> String {
    std::env::var("AIRLOCK_TEST_ROOTFS").unwrap_or_else(|_| {
        airlock_sandbox::assets::cache_dir()
            .join("demo-rootfs")
            .display()
            .to_string()
    })
}

/// The demo rootfs; fails loudly without it.
pub fn rootfs() -> RootfsSource {
    RootfsSource::from_path(root_path()).expect("demo rootfs missing: run scripts/setup")
}

/// Defaults on the demo rootfs.
pub fn spec() -> SandboxSpec {
    SandboxSpec::new(rootfs())
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `limit`. Tests wait on
/// a condition rather than sleeping a fixed time: a loaded machine makes a sleep too short, an
/// idle one makes it wasted.
pub async fn wait_until<F, Fut>(what: &str, limit: std::time::Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Runs `script` with `sh -c`, asserts it exits 0 (its stderr otherwise), returns its stdout.
pub async fn sh(sb: &Sandbox, script: &str) -> String {
    let out = sb
        .output(ExecSpec::new(["sh", "-c", script]))
        .await
        .unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
