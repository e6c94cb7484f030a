//! Workspace shares over virtio-fs, volumes and file rules, against real guests.

use std::path::{Path, PathBuf};

use airlock_sandbox::{ExecSpec, FsRule, RootfsSource, Sandbox, SandboxSpec, Share, ShareMode};

mod common;
use common::rootfs;

fn share(host: &Path, guest: &str, mode: ShareMode) -> Share {
    Share {
        host: host.to_path_buf(),
        guest: guest.into(),
        mode,
    }
}

async fn sh(sb: &Sandbox, script: &str) -> (i32, String, String) {
    let out = sb
        .output(ExecSpec::new(["sh", "-c", script]))
        .await
        .unwrap();
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
            h.update(
                std::fs::read_link(p)
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
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
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("renamed")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("guest-file")).unwrap(),
        "from-guest\n"
    );
    assert!(!tmp.path().join("src/deep/x").exists());
    assert!(!tmp.path().join("d1").exists());
}

/// A `:rw` share is bounded (issue 18.4): the guest gets ENOSPC past the quota, its `df`
/// shows the share's own size, and what it deletes or truncates gives the room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_share_quota_gives_enospc_and_its_own_df() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(tmp.path(), "/w", ShareMode::Rw)];
    spec.share_quota_mib = 8;
    let sb = Sandbox::start(spec).await.unwrap();
    // df: 8 MiB in 1 KiB blocks, whatever the host disk.
    let df = sh_ok(&sb, "df -k /w | tail -1").await;
    let size: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(size, 8 * 1024, "{df}");
    // Past the quota: ENOSPC, and the host holds no more than the quota (plus one request).
    let (code, _, err) = sh(&sb, "dd if=/dev/zero of=/w/big bs=64k count=320 conv=fsync").await;
    assert_ne!(code, 0, "20 MiB fitted in an 8 MiB share");
    assert!(err.contains("No space left"), "{err}");
    let host_len = std::fs::metadata(tmp.path().join("big")).unwrap().len();
    assert!(host_len <= 9 << 20, "the host got {host_len} bytes");
    let df = sh_ok(&sb, "df -k /w | tail -1").await;
    let avail: u64 = df.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(
        avail < 1024,
        "a full share still shows {avail} KiB free: {df}"
    );
    // Deleting gives the room back; so does truncating.
    sh_ok(
        &sb,
        "rm /w/big && dd if=/dev/zero of=/w/a bs=64k count=96 2>&1 && sync",
    )
    .await;
    sh_ok(
        &sb,
        ": > /w/a && dd if=/dev/zero of=/w/b bs=64k count=96 2>&1 && sync",
    )
    .await;
    // Rewriting bytes a file already has needs no room, even when the share is nearly full.
    sh_ok(&sb, "dd if=/dev/zero of=/w/c bs=64k count=20 2>/dev/null; dd if=/dev/urandom of=/w/b bs=64k count=96 conv=notrunc 2>&1 && sync").await;
    sb.stop().await.unwrap();
    assert_eq!(
        std::fs::metadata(tmp.path().join("b")).unwrap().len(),
        96 * 65536
    );
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
    // What changed, and copying it out.
    let mut diff: Vec<(String, String)> = sb
        .share_diff()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.kind, c.path))
        .collect();
    diff.sort();
    let want: Vec<(String, String)> = [
        ("added", "/w/renamed"),
        ("deleted", "/w/src/deep/x"),
        ("modified", "/w/README"),
    ]
    .iter()
    .map(|(k, p)| (k.to_string(), p.to_string()))
    .collect();
    assert_eq!(diff, want);
    let out = tempfile::tempdir().unwrap();
    let sum = sb
        .copy_out("/w/README", &out.path().join("R"), 1 << 20, None)
        .await
        .unwrap();
    assert_eq!(sum.files, 1);
    assert_eq!(
        std::fs::read_to_string(out.path().join("R")).unwrap(),
        "hello from the host\nmore\n"
    );
    let sum = sb
        .copy_out("/w/src", &out.path().join("src"), 1 << 20, None)
        .await
        .unwrap();
    assert_eq!(
        (sum.files, sum.skipped),
        (1, 1),
        "main.c copied, the symlink skipped"
    );
    assert!(out.path().join("src/main.c").is_file() && out.path().join("src/deep").is_dir());
    assert!(
        sb.copy_out("/w/README", &out.path().join("R"), 1 << 20, None)
            .await
            .is_err(),
        "dest exists"
    );
    assert!(
        sb.copy_out("/w/README", &out.path().join("small"), 4, None)
            .await
            .is_err(),
        "size cap"
    );
    // No entropy or other device lost its IRQ to the extra virtio device.
    let dmesg = sh_ok(&sb, "dmesg").await;
    assert!(!dmesg.contains("probe of"), "{dmesg}");
    sb.stop().await.unwrap();
    assert_eq!(
        tree_hash(tmp.path()),
        before,
        "overlay changed the host tree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ro_share_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    sample_tree(tmp.path());
    let before = tree_hash(tmp.path());
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(tmp.path(), "/w", ShareMode::Ro)];
    let sb = Sandbox::start(spec).await.unwrap();
    assert_eq!(
        sh_ok(&sb, "cat /w/src/main.c").await,
        "int main(){return 0;}\n"
    );
    for cmd in [
        "echo x > /w/new",
        "rm /w/README",
        "mv /w/README /w/R",
        "mkdir /w/d",
        "echo x >> /w/README",
    ] {
        let (code, _, err) = sh(&sb, cmd).await;
        assert_ne!(code, 0, "{cmd} succeeded on a read-only share");
        assert!(err.contains("Read-only"), "{cmd}: {err}");
    }
    sb.stop().await.unwrap();
    assert_eq!(tree_hash(tmp.path()), before);
}

async fn sh_as(sb: &Sandbox, user: &str, script: &str) -> (i32, String, String) {
    let mut e = ExecSpec::new(["sh", "-c", script]);
    e.user = Some(user.into());
    let out = sb.output(e).await.unwrap();
    (
        out.status.code.unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_ownership_root_and_non_root_guest_user() {
    use std::os::unix::fs::MetadataExt;
    let host_ids = unsafe { (libc::geteuid(), libc::getegid()) };
    for owner in [(0u32, 0u32), (1000, 1000)] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("host-file"), "h").unwrap();
        let mut spec = SandboxSpec::new(rootfs());
        spec.shares = vec![share(tmp.path(), "/w", ShareMode::Rw)];
        spec.share_owner = owner;
        let sb = Sandbox::start(spec).await.unwrap();
        let user = format!("{}:{}", owner.0, owner.1);
        let (code, out, err) = sh_as(
            &sb,
            &user,
            "set -e; echo g > /w/made; mkdir /w/dir; echo y > /w/dir/f; echo more >> /w/host-file; \
             stat -c '%u:%g' /w/made /w/dir /w/host-file /w",
        )
        .await;
        assert_eq!(code, 0, "as {user}: {err}");
        let want = format!("{user}\n").repeat(4);
        assert_eq!(out, want, "inside, the sandbox user owns them");
        sb.stop().await.unwrap();
        for f in ["made", "dir", "dir/f"] {
            let m = std::fs::metadata(tmp.path().join(f)).unwrap();
            assert_eq!(
                (m.uid(), m.gid()),
                host_ids,
                "{f} on the host belongs to the host user"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_rules_deny_in_the_guest_and_emit_events() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join(".git/hooks")).unwrap();
    std::fs::write(
        tmp.path().join(".git/hooks/pre-commit"),
        "#!/bin/sh\nexit 0\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join("notes"), "n").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(tmp.path(), "/workspace", ShareMode::Rw)];
    spec.fs_rules = vec![
        "deny write,create,remove /workspace/.git/hooks/**"
            .parse::<FsRule>()
            .unwrap(),
        "audit read /workspace/notes".parse().unwrap(),
    ];
    spec.fs_events = Some(tx);
    let sb = Sandbox::start(spec).await.unwrap();
    for cmd in [
        "echo evil > /workspace/.git/hooks/pre-commit",
        "echo evil > /workspace/.git/hooks/post-checkout",
        "rm /workspace/.git/hooks/pre-commit",
    ] {
        let (code, _, err) = sh(&sb, cmd).await;
        assert_ne!(code, 0, "{cmd} was allowed");
        assert!(err.contains("Permission denied"), "{cmd}: {err}");
    }
    sh_ok(&sb, "cat /workspace/.git/hooks/pre-commit >/dev/null; cat /workspace/notes; echo ok > /workspace/other").await;
    sb.stop().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(tmp.path().join(".git/hooks/pre-commit")).unwrap(),
        "#!/bin/sh\nexit 0\n"
    );
    assert!(!tmp.path().join(".git/hooks/post-checkout").exists());
    let mut got = Vec::new();
    while let Ok(e) = rx.try_recv() {
        got.push((e.op.name().to_string(), e.path, e.denied));
    }
    let has = |op: &str, path: &str, denied: bool| {
        got.iter()
            .any(|(o, p, d)| o == op && p == path && *d == denied)
    };
    assert!(
        has("write", "/workspace/.git/hooks/pre-commit", true),
        "{got:?}"
    );
    assert!(
        has("create", "/workspace/.git/hooks/post-checkout", true),
        "{got:?}"
    );
    assert!(
        has("remove", "/workspace/.git/hooks/pre-commit", true),
        "{got:?}"
    );
    assert!(has("read", "/workspace/notes", false), "{got:?}");
    assert!(
        got.iter().all(|(_, p, _)| !p.ends_with("/other")),
        "{got:?}"
    );
}

/// The escape suite, from inside a real guest: each case tries to read or write something
/// outside the shared directory; afterwards the outside is unchanged and no secret surfaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_suite_from_the_guest() {
    let tmp = tempfile::tempdir().unwrap();
    let share_dir = tmp.path().join("share");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(share_dir.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "TOP-SECRET-OUTSIDE").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), share_dir.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", share_dir.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("rel-link", share_dir.join("chain1")).unwrap();
    std::os::unix::fs::symlink("chain1", share_dir.join("chain2")).unwrap();
    std::os::unix::fs::symlink("../outside", share_dir.join("dir-link")).unwrap();
    let outside_before = tree_hash(&outside);
    let outside_path = outside.display().to_string();
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(&share_dir, "/w", ShareMode::Rw)];
    let sb = Sandbox::start(spec).await.unwrap();
    let o = outside_path.as_str();
    let cases: Vec<(&str, String)> = vec![
        ("absolute symlink", "cat /w/abs-link".into()),
        ("relative symlink", "cat /w/rel-link".into()),
        ("symlink chain", "cat /w/chain2".into()),
        ("directory symlink", "cat /w/dir-link/secret; ls /w/dir-link".into()),
        ("dotdot", "cat /w/../outside/secret; cat /w/sub/../../outside/secret".into()),
        ("host path", format!("cat {o}/secret; ls {o}")),
        ("write through symlink", "echo pwned > /w/dir-link/secret; echo pwned > /w/abs-link".into()),
        ("create through dir symlink", "echo pwned > /w/dir-link/planted".into()),
        ("new symlink to host path", format!("ln -s {o}/secret /w/mine; cat /w/mine; echo pwned > /w/mine")),
        ("hardlink to outside", format!("ln {o}/secret /w/hl; ln /etc/passwd /w/hl2; cat /w/hl")),
        ("rename out", "mv /w/sub /w/../escaped; mv /w/sub /tmp/escaped-dir".into()),
        ("block device node", "mknod /w/sda b 8 0 && cat /w/sda | head -c 16".into()),
        ("char device node", "mknod /w/mem c 1 1 && head -c 16 /w/mem".into()),
        ("bind mount and climb", "mkdir -p /mnt/b && mount --bind /w/sub /mnt/b && cat /mnt/b/../outside/secret; cat /mnt/b/../../outside/secret".into()),
        ("symlink swap race", "i=0; while [ $i -lt 200 ]; do mkdir /w/race 2>/dev/null; rmdir /w/race; ln -s ../outside /w/race; rm /w/race; i=$((i+1)); done & \
            j=0; while [ $j -lt 200 ]; do cat /w/race/secret 2>/dev/null; echo x > /w/race/planted 2>/dev/null; j=$((j+1)); done; wait".into()),
        ("rename race", "mkdir -p /w/a/b; i=0; while [ $i -lt 100 ]; do mv /w/a /w/c; mv /w/c /w/a; i=$((i+1)); done & \
            j=0; while [ $j -lt 100 ]; do cat /w/a/b/../../../outside/secret 2>/dev/null; j=$((j+1)); done; wait".into()),
        ("setuid file", "cp /bin/busybox /w/suid && chmod 4755 /w/suid; stat -c %a /w/suid".into()),
    ];
    assert!(cases.len() >= 15);
    for (name, cmd) in &cases {
        let (_, out, err) = sh(&sb, cmd).await;
        assert!(
            !out.contains("TOP-SECRET") && !err.contains("TOP-SECRET"),
            "case {name}: the secret leaked: {out} {err}"
        );
    }
    sb.stop().await.unwrap();
    assert_eq!(tree_hash(&outside), outside_before, "the outside changed");
    assert!(!tmp.path().join("escaped").exists());
    // Nothing the guest made on the host is a device node or setuid.
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    for e in std::fs::read_dir(&share_dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        assert!(
            !m.file_type().is_block_device() && !m.file_type().is_char_device(),
            "{:?}",
            e.path()
        );
        assert_eq!(
            m.mode() & 0o6000,
            0,
            "{:?} is setuid/setgid on the host",
            e.path()
        );
    }
}

fn debian_rootfs() -> RootfsSource {
    // The script owns the cache path (keyed by its package list) and builds it once.
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts");
    let out = std::process::Command::new(scripts.join("mkimage-debian"))
        .arg("--rootfs-only")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/mkimage-debian failed");
    let dir = String::from_utf8(out.stdout).unwrap();
    RootfsSource::from_path(Path::new(dir.trim())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_tools_git_fsync_mmap_locks_large_files() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("app.py"), "print('hi')\n").unwrap();
    let mut spec = SandboxSpec::new(debian_rootfs());
    spec.shares = vec![share(tmp.path(), "/workspace", ShareMode::Rw)];
    spec.share_owner = (1000, 1000);
    let sb = Sandbox::start(spec).await.unwrap();
    // git as the (non-root) sandbox user: lockfile renames, getcwd, fsync.
    let (code, out, err) = sh_as(&sb, "1000:1000", "set -e; export HOME=/tmp; cd /workspace; \
        git init -q && git -c user.email=a@b -c user.name=a add app.py && \
        git -c user.email=a@b -c user.name=a commit -qm first && git log --oneline | grep -q first; \
        echo x >> app.py; git -c user.email=a@b -c user.name=a commit -qam second; \
        git status --porcelain; git log --oneline | wc -l").await;
    assert_eq!((code, out.trim()), (0, "2"), "{err}");
    // Postgres-style durability: write, fsync the file, rename, fsync the directory.
    let py = r#"
import os, mmap, fcntl
d = os.open('/workspace/pgdata', os.O_RDONLY | os.O_DIRECTORY) if os.path.isdir('/workspace/pgdata') else None
os.makedirs('/workspace/pgdata', exist_ok=True)
fd = os.open('/workspace/pgdata/wal.tmp', os.O_CREAT | os.O_WRONLY, 0o600)
os.write(fd, b'x' * 8192); os.fsync(fd); os.close(fd)
os.rename('/workspace/pgdata/wal.tmp', '/workspace/pgdata/wal')
d = os.open('/workspace/pgdata', os.O_RDONLY | os.O_DIRECTORY); os.fsync(d); os.close(d)
# mmap read-write
with open('/workspace/mm', 'wb') as f: f.write(b'\0' * 4096)
with open('/workspace/mm', 'r+b') as f:
    m = mmap.mmap(f.fileno(), 4096); m[0:5] = b'hello'; m.flush(); m.close()
# POSIX and BSD locks
with open('/workspace/lock', 'w') as f:
    fcntl.lockf(f, fcntl.LOCK_EX); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.lockf(f, fcntl.LOCK_UN)
# past 4 GiB
with open('/workspace/big', 'wb') as f:
    f.seek(5 * 2**30); f.write(b'tail')
with open('/workspace/big', 'rb') as f:
    f.seek(5 * 2**30); assert f.read() == b'tail'
print(os.path.getsize('/workspace/big'))
"#;
    let mut e = ExecSpec::new(["python3", "-c", py]);
    e.cwd = Some("/workspace".into());
    let out = sb.output(e).await.unwrap();
    assert_eq!(
        out.status.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (5u64 * (1 << 30) + 4).to_string()
    );
    sb.stop().await.unwrap();
    assert!(tmp.path().join(".git/HEAD").is_file());
    assert_eq!(
        &std::fs::read(tmp.path().join("mm")).unwrap()[..5],
        b"hello"
    );
    assert_eq!(
        std::fs::metadata(tmp.path().join("big")).unwrap().len(),
        5 * (1 << 30) + 4
    );
    assert_eq!(
        std::fs::read(tmp.path().join("pgdata/wal")).unwrap().len(),
        8192
    );
}

#[allow(dead_code)]
fn unused(_: PathBuf) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_persists_across_sandboxes_one_at_a_time() {
    let data = tempfile::tempdir().unwrap();
    // SAFETY: set before any sandbox of this test reads it; the volume dir is only read here.
    unsafe { std::env::set_var("AIRLOCK_DATA_DIR", data.path()) };
    airlock_sandbox::shares::volume_create("cache", 64).unwrap();
    assert!(airlock_sandbox::shares::volume_create("cache", 64).is_err());
    let vol = || airlock_sandbox::VolumeMount {
        name: "cache".into(),
        guest: "/data".into(),
    };
    let mut spec = SandboxSpec::new(rootfs());
    spec.volumes = vec![vol()];
    let sb = Sandbox::start(spec.clone()).await.unwrap();
    sh_ok(&sb, "echo persisted > /data/f; mkdir /data/d; sync").await;
    // In use: a second sandbox and rm are refused with a clear error.
    let err = Sandbox::start(spec.clone()).await.unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    assert!(airlock_sandbox::shares::volume_remove("cache").is_err());
    let ls = airlock_sandbox::shares::volume_list().unwrap();
    assert!(ls[0].in_use && ls[0].size_mib == 64);
    sb.stop().await.unwrap();
    let sb = Sandbox::start(spec).await.unwrap();
    assert_eq!(
        sh_ok(&sb, "cat /data/f; test -d /data/d && echo dir").await,
        "persisted\ndir\n"
    );
    sb.stop().await.unwrap();
    let ls = airlock_sandbox::shares::volume_list().unwrap();
    assert!(!ls[0].in_use);
    assert!(ls[0].used_bytes < 64 << 20, "sparse");
    airlock_sandbox::shares::volume_remove("cache").unwrap();
    assert!(airlock_sandbox::shares::volume_list().unwrap().is_empty());
}

/// Issue 18.1, from a root shell in a real guest: under the README's rule, every way of
/// changing `.git` by renaming around it is refused, also with two processes racing renames
/// against writes; afterwards the host's `.git` is byte-for-byte (and mtime-for-mtime) as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_rules_survive_renames_links_and_races() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join(".git/hooks")).unwrap();
    std::fs::write(
        tmp.path().join(".git/hooks/pre-commit"),
        "#!/bin/sh\nexit 0\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join(".git/config"), "[core]\n").unwrap();
    let before = tree_hash(&tmp.path().join(".git"));
    let mut spec = SandboxSpec::new(rootfs());
    spec.shares = vec![share(tmp.path(), "/workspace", ShareMode::Rw)];
    spec.fs_rules = vec!["deny write,create,remove /workspace/.git/**"
        .parse::<FsRule>()
        .unwrap()];
    let sb = Sandbox::start(spec).await.unwrap();
    let w = "/workspace";
    for cmd in [
        format!("mv {w}/.git {w}/g2"),
        format!("mv {w}/.git/hooks {w}/.git/h2"),
        format!("mkdir {w}/g3 && mv {w}/g3 {w}/.git/hooks/g3"),
        format!("echo evil > {w}/evil && mv {w}/evil {w}/.git/hooks/post-checkout"),
        format!("mv {w}/.git/hooks/pre-commit {w}/pc"),
        format!("mkdir {w}/.git/hooks/d"),
        format!("chmod 777 {w}/.git/hooks/pre-commit"),
        format!("touch {w}/.git/hooks/pre-commit"),
        format!("ln {w}/.git/hooks/pre-commit {w}/hardlink"),
        format!("ln -s .git {w}/lnk && echo evil > {w}/lnk/hooks/post-checkout"),
        format!("ln -s /workspace/.git/hooks {w}/abs && echo evil > {w}/abs/x"),
        format!("mkdir -p {w}/fake/hooks && mv -T {w}/fake {w}/.git"),
    ] {
        let (code, _, err) = sh(&sb, &cmd).await;
        assert_ne!(code, 0, "{cmd} was allowed");
        assert!(
            err.contains("Permission denied") || err.contains("not empty"),
            "{cmd}: {err}"
        );
    }
    // Two processes: one keeps trying to rename .git away and back, the other keeps writing a
    // hook through whichever name exists.
    let race = format!(
        "( i=0; while [ $i -lt 40 ]; do mv {w}/.git {w}/g2 2>/dev/null; mv {w}/g2 {w}/.git 2>/dev/null; i=$((i+1)); done ) & \
         ( i=0; while [ $i -lt 40 ]; do echo evil > {w}/g2/hooks/post-checkout 2>/dev/null; \
           echo evil > {w}/.git/hooks/post-checkout 2>/dev/null; i=$((i+1)); done ) & wait; echo done"
    );
    assert_eq!(sh_ok(&sb, &race).await.trim(), "done");
    // Next to it, work goes on.
    sh_ok(
        &sb,
        &format!(
            "mkdir {w}/src && echo x > {w}/src/a && mv {w}/src {w}/src2 && cat {w}/.git/config"
        ),
    )
    .await;
    sb.stop().await.unwrap();
    assert_eq!(
        tree_hash(&tmp.path().join(".git")),
        before,
        "the host's .git changed"
    );
    for gone in ["g2", "pc", "hardlink"] {
        assert!(!tmp.path().join(gone).exists(), "{gone} exists on the host");
    }
    assert!(tmp.path().join("src2/a").exists());
}
