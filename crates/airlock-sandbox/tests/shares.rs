//! Workspace shares over virtio-fs, volumes and file rules, against real guests.

use std::path::{Path, PathBuf};

use airlock_sandbox::{
    ExecSpec, FsRule, RootfsSource, Sandbox, SandboxSpec, Share, ShareMode,
};

fn rootfs() -> RootfsSource {
    let root = std::env::var("AIRLOCK_TEST_ROOTFS").unwrap_or_else(|_| {
        airlock_sandbox::assets::cache_dir()
            .join("demo-rootfs")
            .display()
            .to_string()
    });
    RootfsSource::from_path(&root).expect("demo rootfs missing: run scripts/setup")
}

fn share(host: &Path, guest: &str, mode: ShareMode) -> Share {
    Share {
        host: host.to_path_buf(),
        guest: guest.into(),
        mode,
    }
}

async fn sh(sb: &Sandbox, script: &str) -> (i32, String, String) {
    let out = sb.output(ExecSpec::new(["sh", "-c", script])).await.unwrap();
    (
        out.status.code.unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn sh_ok(sb: &Sandbox, script: &str) -> String {
    let (code, out, err) = sh(sb, script).await;
    assert_eq!(code, 0, "{script}\nstdout: {out}\nstderr: {err}");
    out
}

/// A content hash of a whole tree: paths, types, modes, sizes, contents, link targets.
fn tree_hash(root: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    fn walk(p: &Path, rel: &Path, h: &mut Sha256) {
        let m = std::fs::symlink_metadata(p).unwrap();
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(format!(":{:o}:{}:{}:{}\n", m.mode(), m.uid(), m.len(), m.mtime()).as_bytes());
        if m.file_type().is_symlink() {
            h.update(std::fs::read_link(p).unwrap().as_os_str().as_encoded_bytes());
        } else if m.is_file() {
            h.update(std::fs::read(p).unwrap());
        } else if m.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(&p.join(&n), &rel.join(&n), h);
            }
        }
    }
    let mut h = Sha256::new();
    walk(root, Path::new(""), &mut h);
    hex::encode(h.finalize())
}

fn sample_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("src/deep")).unwrap();
    std::fs::write(dir.join("README"), "hello from the host\n").unwrap();
    std::fs::write(dir.join("src/main.c"), "int main(){return 0;}\n").unwrap();
    std::fs::write(dir.join("src/deep/x"), "x").unwrap();
    std::os::unix::fs::symlink("../README", dir.join("src/readme-link")).unwrap();
}

const ROUND_TRIP: &str = "set -e; cd /w; cat README; echo new > created; mv created renamed; \
    cat renamed; rm src/deep/x; mkdir -p d1/d2; echo z > d1/d2/z; rm -r d1; ls";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_share_round_trip_reaches_host() {
    let tmp = tempfile::tempdir().unwrap();
    sample_tree(tmp.path());
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(tmp.path(), "/w", ShareMode::Rw)];
    let sb = Sandbox::start(spec).await.unwrap();
    let out = sh_ok(&sb, ROUND_TRIP).await;
    assert!(out.starts_with("hello from the host\nnew\n"), "{out}");
    sh_ok(&sb, "echo from-guest > /w/guest-file; sync").await;
    sb.stop().await.unwrap();
    assert_eq!(std::fs::read_to_string(tmp.path().join("renamed")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(tmp.path().join("guest-file")).unwrap(), "from-guest\n");
    assert!(!tmp.path().join("src/deep/x").exists());
    assert!(!tmp.path().join("d1").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_share_leaves_host_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    sample_tree(tmp.path());
    let before = tree_hash(tmp.path());
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(tmp.path(), "/w", ShareMode::Overlay)];
    let sb = Sandbox::start(spec).await.unwrap();
    let out = sh_ok(&sb, ROUND_TRIP).await;
    assert!(out.starts_with("hello from the host\nnew\n"), "{out}");
    // The guest sees its own changes.
    sh_ok(&sb, "test -f /w/renamed && ! test -e /w/src/deep/x && echo more >> /w/README && grep more /w/README").await;
    sb.stop().await.unwrap();
    assert_eq!(tree_hash(tmp.path()), before, "overlay changed the host tree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ro_share_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    sample_tree(tmp.path());
    let before = tree_hash(tmp.path());
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(tmp.path(), "/w", ShareMode::Ro)];
    let sb = Sandbox::start(spec).await.unwrap();
    assert_eq!(sh_ok(&sb, "cat /w/src/main.c").await, "int main(){return 0;}\n");
    for cmd in ["echo x > /w/new", "rm /w/README", "mv /w/README /w/R", "mkdir /w/d", "echo x >> /w/README"] {
        let (code, _, err) = sh(&sb, cmd).await;
        assert_ne!(code, 0, "{cmd} succeeded on a read-only share");
        assert!(err.contains("Read-only"), "{cmd}: {err}");
    }
    sb.stop().await.unwrap();
    assert_eq!(tree_hash(tmp.path()), before);
}

#[allow(dead_code)]
fn unused(_: PathBuf, _: FsRule) {}
