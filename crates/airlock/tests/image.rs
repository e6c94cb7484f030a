//! `airlock image import|ls|rm|gc` and `airlock pull` through the CLI, with real image tools
//! (umoci, skopeo) building the tarballs. The registry paths are covered in depth by
//! airlock-image's own tests; here the commands' parsing, printing and exit codes are.

mod util;
use util::text;

#[path = "../../airlock-image/tests/common/mod.rs"]
mod common;

use std::process::Command;

fn airlock(data: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .env("AIRLOCK_DATA_DIR", data)
        .output()
        .unwrap()
}

/// The umoci-built busybox image as an OCI archive (made by skopeo).
fn busybox_archive(work: &std::path::Path) -> (common::Layout, std::path::PathBuf) {
    let layout = common::build_layout(work);
    let tar = work.join("bb.tar");
    common::skopeo_copy(&[
        &format!("oci:{}:bb", layout.dir.display()),
        &format!("oci-archive:{}:bb", tar.display()),
    ]);
    (layout, tar)
}

#[test]
fn import_ls_rm_gc() {
    let work = tempfile::tempdir().unwrap();
    let (layout, tar) = busybox_archive(work.path());
    let data = work.path().join("data");

    let out = airlock(
        &data,
        &["image", "import", "local/bb:1", tar.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&layout.amd64_manifest),
        "{}",
        text(&out.stdout)
    );

    let out = airlock(&data, &["image", "ls", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["digest"], layout.amd64_manifest.as_str());
    assert!(rows[0]["reference"]
        .as_str()
        .unwrap()
        .contains("local/bb:1"));
    let out = airlock(&data, &["image", "ls"]);
    assert!(text(&out.stdout).contains("local/bb:1"));

    let out = airlock(&data, &["image", "rm", "local/bb:1", "nope:1"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "removing a missing image must fail"
    );
    assert!(text(&out.stdout).contains("removed"));
    assert!(text(&out.stderr).contains("nope:1"));
    let out = airlock(&data, &["image", "gc"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("freed "));
    assert!(
        !text(&out.stdout).starts_with("freed 0 B"),
        "{}",
        text(&out.stdout)
    );

    let out = airlock(&data, &["image", "import", "bad", "/etc/hostname"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stderr).is_empty());
}

#[test]
fn pull_errors_are_clear() {
    let data = tempfile::tempdir().unwrap();
    let out = airlock(data.path(), &["pull", "Bad Reference!"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stderr).is_empty());
    // A loopback port with nothing listening: a clean error, no hang, nothing stored.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = airlock(data.path(), &["pull", &format!("127.0.0.1:{port}/x/y:1")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&port.to_string()),
        "{}",
        text(&out.stderr)
    );
    let out = airlock(data.path(), &["pull", "--platform", "plan9", "busybox"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn run_image_pulls_on_first_use_from_a_real_registry() {
    let work = tempfile::tempdir().unwrap();
    let reg = common::Registry::start(work.path());
    let layout = common::build_layout(work.path());
    let image = format!("{}/test/bb:1", reg.host());
    common::skopeo_copy(&[
        "--dest-tls-verify=false",
        &format!("oci:{}:bb", layout.dir.display()),
        &format!("docker://{image}"),
    ]);
    let data = work.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "run",
            "--image",
            &image,
            "--",
            "/bin/busybox",
            "echo",
            "pulled and ran",
        ])
        .env("AIRLOCK_DATA_DIR", &data)
        .env("AIRLOCK_RUNTIME_DIR", work.path().join("rt"))
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        "pulled and ran\n",
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("pulled"),
        "progress shown: {}",
        text(&out.stderr)
    );
    // Second run: from the store, nothing pulled.
    drop(reg);
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["run", "--image", &image, "--", "/bin/busybox", "true"])
        .env("AIRLOCK_DATA_DIR", &data)
        .env("AIRLOCK_RUNTIME_DIR", work.path().join("rt"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = airlock(&data, &["pull", &image]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "registry is gone, pull must fail"
    );
}

#[test]
fn rm_refuses_an_image_in_use() {
    let work = tempfile::tempdir().unwrap();
    let (_layout, tar) = busybox_archive(work.path());
    let (data, rt) = (work.path().join("data"), work.path().join("rt"));
    let out = airlock(
        &data,
        &["image", "import", "local/busy:1", tar.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "run",
            "--image",
            "local/busy:1",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            "echo up; sleep 60",
        ])
        .env("AIRLOCK_DATA_DIR", &data)
        .env("AIRLOCK_RUNTIME_DIR", &rt)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut b = [0u8; 3];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut b).unwrap();
    let rm = |data: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["image", "rm", "local/busy:1"])
            .env("AIRLOCK_DATA_DIR", data)
            .env("AIRLOCK_RUNTIME_DIR", &rt)
            .output()
            .unwrap()
    };
    let out = rm(&data);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("in use"),
        "{}",
        text(&out.stderr)
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let out = rm(&data);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
