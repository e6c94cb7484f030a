//! SDK suites against real sandboxes through `airlock rpc`: matchlock's own Python SDK (PyPI
//! `matchlock`, unchanged), Airlock's Python SDK (`sdk/python`) and TypeScript SDK
//! (`sdk/typescript`). `scripts/setup` installs their dependencies; missing ones fail loudly.

mod util;
use util::repo;

use std::process::Command;

/// The busybox demo image (imported into the user's store once, idempotently).
fn image() -> String {
    let o = Command::new(repo().join("scripts/mkimage-busybox"))
        .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mkimage-busybox: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn run_suite(mut c: Command, what: &str) {
    let rt = tempfile::tempdir().unwrap();
    let o = c
        .env("MATCHLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
        .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
        .env("AIRLOCK_TEST_IMAGE", image())
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e} (run scripts/setup)"));
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let sandboxes: Vec<_> = std::fs::read_dir(rt.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "tsc_khz" && n != "sandboxes")
        .collect();
    let records = std::fs::read_dir(rt.path().join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(records, 0, "{what} left sandbox records");
    assert!(sandboxes.is_empty(), "{what} left sandboxes: {sandboxes:?}");
}

#[test]
fn matchlock_python_sdk_drives_airlock_rpc() {
    let mut c = Command::new("python3");
    c.arg("sdk/tests/matchlock_compat.py");
    run_suite(c, "matchlock SDK suite");
}

#[test]
fn python_sdk_sync_async_and_attach() {
    let mut c = Command::new("python3");
    c.arg("sdk/python/tests/test_sdk.py");
    run_suite(c, "Python SDK suite");
}

#[test]
fn typescript_sdk() {
    let mut c = Command::new("node");
    c.args(["--test", "sdk/typescript/test/"]);
    assert!(
        repo().join("sdk/typescript/dist/index.js").exists(),
        "TypeScript SDK not built: run scripts/setup (npm install && npm run build in sdk/typescript)"
    );
    run_suite(c, "TypeScript SDK suite");
}
