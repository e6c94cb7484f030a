//! Load (issue 7), through the Rust API so the host process's own resources can be counted:
//! 20 sandboxes at once all run to completion on a 2-core TCG host, and 200 sequential
//! start/exec/stop cycles leave no file descriptor, child process, mount, runtime-dir entry,
//! temp file or /dev/shm file behind. Real guests; the demo rootfs from `scripts/setup`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use airlock_sandbox::{ExecSpec, Sandbox, SandboxSpec, Share, ShareMode};

/// One runtime dir and one TMPDIR for this test binary, set before any sandbox starts (both
/// are read from the environment).
fn dirs() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let rt = tempfile::tempdir().unwrap().keep();
        let tmp = tempfile::tempdir().unwrap().keep();
        // SAFETY: set once, before any sandbox thread of this binary reads the environment.
        unsafe {
            std::env::set_var("AIRLOCK_RUNTIME_DIR", &rt);
            std::env::set_var("TMPDIR", &tmp);
        }
        (rt, tmp)
    })
}

mod common;

fn spec(memory_mib: u32) -> SandboxSpec {
    let mut s = common::spec();
    s.memory_mib = memory_mib;
    // Twenty TCG boots share two cores: each takes many times its idle boot time.
    s.ready_timeout = Duration::from_secs(600);
    s
}

/// What the host process holds and what the sandboxes left on disk.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    fds: BTreeSet<String>,
    children: usize,
    mounts: usize,
    runtime: BTreeSet<String>,
    tmp: usize,
}

fn footprint() -> Footprint {
    let (rt, tmp) = dirs();
    // Open descriptors by what they point to (numbers get reused, targets tell a leak's kind).
    let fds = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| {
            let s = p.display().to_string();
            // Pipes and sockets differ by inode number only; anon inodes keep their kind
            // (`anon_inode:[eventfd]`), which names what leaked.
            match s.split_once(":[") {
                Some((kind, _)) if kind != "anon_inode" => kind.to_string(),
                _ => s,
            }
        })
        .collect::<Vec<_>>();
    let mut counted = BTreeSet::new();
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for f in fds {
        let n = seen.entry(f.clone()).or_default();
        *n += 1;
        counted.insert(format!("{f} #{n}"));
    }
    let mut children = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        children += std::fs::read_to_string(t.path().join("children"))
            .unwrap_or_default()
            .split_whitespace()
            .count();
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    let runtime = walk(rt)
        .into_iter()
        .map(|p| p.strip_prefix(rt).unwrap().display().to_string())
        .filter(|n| n != "tsc_khz")
        .collect();
    Footprint {
        fds: counted,
        children,
        mounts,
        runtime,
        tmp: walk(tmp).len(),
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        v.push(e.path());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            v.extend(walk(&e.path()));
        }
    }
    v
}

/// Starts a sandbox, runs one command that must print `want`, stops it; returns its id.
async fn cycle(spec: SandboxSpec, cmd: &str, want: &str) -> String {
    let sb = Sandbox::start(spec).await.expect("sandbox start");
    let id = sb.id().to_string();
    let out = sb
        .output(ExecSpec::new(["sh", "-c", cmd]))
        .await
        .expect("exec");
    assert_eq!(
        out.status.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    sb.stop().await.expect("stop");
    id
}

/// Twenty sandboxes (128 MiB each) started at once on this 2-core host all boot, run their
/// command and stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_sandboxes_run_to_completion() {
    dirs();
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(async move {
            cycle(
                spec(128),
                &format!("echo sandbox-{i}"),
                &format!("sandbox-{i}\n"),
            )
            .await
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.expect("a sandbox task panicked"));
    }
    assert_eq!(ids.len(), 20, "ids must be unique");
    for id in &ids {
        assert!(
            !Path::new(&format!("/dev/shm/airlock-{id}.ram")).exists(),
            "guest RAM file of {id} left in /dev/shm"
        );
    }
}

/// 200 start/exec/stop cycles, two at a time (one per core), every fourth one with a
/// read-write share (virtio-fs server threads, guest RAM in /dev/shm; a cold boot, since
/// shares cannot be restored from a template, the others warm starts): afterwards the process
/// has the descriptors, children and mounts it had after the first cycle, and nothing of any
/// sandbox is left in the runtime dir, TMPDIR or /dev/shm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_start_stop_cycles_leak_nothing() {
    dirs();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("f"), "shared\n").unwrap();
    let with_share = |i: usize| {
        let mut s = spec(128);
        if i % 4 == 1 {
            s.shares.push(Share {
                host: share.path().to_path_buf(),
                guest: "/mnt/s".into(),
                mode: ShareMode::Rw,
            });
        }
        s
    };
    let run = |i: usize| {
        let s = with_share(i);
        async move {
            if i % 4 == 1 {
                cycle(s, "cat /mnt/s/f", "shared\n").await
            } else {
                cycle(s, "echo plain", "plain\n").await
            }
        }
    };
    // Warm-up pair: lazily created process-wide things (runtime threads, caches, the TSC
    // file) are part of the baseline, not leaks.
    run(0).await;
    run(1).await;
    let before = footprint();
    let mut ids = Vec::new();
    // AIRLOCK_LOAD_CYCLES shortens the run when hunting a leak by hand; CI runs all 200.
    let cycles: usize = std::env::var("AIRLOCK_LOAD_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for pair in (2..cycles).step_by(2) {
        let (a, b) = tokio::join!(run(pair), run(pair + 1));
        ids.extend([a, b]);
    }
    // Children are reaped asynchronously; give the last ones a moment.
    let mut after = footprint();
    for _ in 0..40 {
        if after == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = footprint();
    }
    assert_eq!(after.fds, before.fds, "file descriptors leaked");
    assert_eq!(after.children, before.children, "child processes left");
    assert_eq!(after.mounts, before.mounts, "mounts left");
    assert_eq!(after.runtime, before.runtime, "runtime-dir entries left");
    assert_eq!(after.tmp, before.tmp, "temp files left");
    for id in &ids {
        assert!(
            !Path::new(&format!("/dev/shm/airlock-{id}.ram")).exists(),
            "guest RAM file of {id} left in /dev/shm"
        );
    }
}
