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
