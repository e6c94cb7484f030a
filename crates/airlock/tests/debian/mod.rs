//! The real Debian test image (curl, python3, node, git), built by scripts/mkimage-debian and
//! cached between runs in the default store.

use std::process::Command;
use std::sync::OnceLock;

/// Builds (or finds) `demo/debian:bookworm`, once per test binary.
pub fn ensure_image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts");
        let out = Command::new(scripts.join("mkimage-debian"))
            .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mkimage-debian: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}
