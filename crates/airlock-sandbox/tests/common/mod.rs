//! What every real-guest test of this crate starts from.

#![allow(dead_code)] // each test binary uses its own part

use airlock_sandbox::{RootfsSource, SandboxSpec};

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
