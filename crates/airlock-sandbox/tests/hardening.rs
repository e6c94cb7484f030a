//! Hardening on both sides of a real guest: Airlock's device threads confined by seccomp and
//! landlock, and workloads without the capabilities that reach past the sandbox's own kernel.

use airlock_sandbox::{ExecSpec, Sandbox, Share, ShareMode};

mod common;
use common::spec;

async fn sh(sb: &Sandbox, script: &str) -> (i32, String) {
    let out = sb
        .output(ExecSpec::new(["sh", "-c", script]))
        .await
        .unwrap();
    (
        out.status.code.unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `name: value` from a /proc status file.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("{name} missing in\n{status}"))
}

fn has_cap(status: &str, set: &str, cap: u32) -> bool {
    let mask = u64::from_str_radix(&field(status, set), 16).unwrap();
    mask & (1 << cap) != 0
}

const SYS_MODULE: u32 = 16;
const SYS_RAWIO: u32 = 17;
const SYS_BOOT: u32 = 22;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_lack_dangerous_capabilities_unless_privileged() {
    let sb = Sandbox::start(spec()).await.unwrap();
    let (code, st) = sh(&sb, "cat /proc/self/status").await;
    assert_eq!(code, 0, "{st}");
    assert_eq!(field(&st, "NoNewPrivs:"), "1");
    for set in ["CapBnd:", "CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
        for cap in [SYS_MODULE, SYS_RAWIO, SYS_BOOT] {
            assert!(!has_cap(&st, set, cap), "{set} has cap {cap}:\n{st}");
        }
    }
    // Root keeps the rest (it is root in its own VM): e.g. CAP_SYS_ADMIN (21), CAP_NET_ADMIN (12).
    assert!(
        has_cap(&st, "CapEff:", 21) && has_cap(&st, "CapEff:", 12),
        "{st}"
    );
    // Without CAP_SYS_BOOT the workload cannot end the VM behind Airlock's back.
    let (code, out) = sh(&sb, "reboot -f; poweroff -f; echo still-here").await;
    assert!(out.contains("still-here"), "{code} {out}");
    // Nor open kernel memory or I/O ports.
    let (code, out) = sh(&sb, "head -c 1 /dev/mem >/dev/null && echo read-mem").await;
    assert!(code != 0 && !out.contains("read-mem"), "{out}");
    // The agent's control port admits one opener (the agent): root cannot talk to the host
    // in its place, even with a device node it makes itself.
    let (_, out) = sh(
        &sb,
        "for p in /sys/class/virtio-ports/*; do n=$(basename $p); \
           [ -e /dev/$n ] || mknod /tmp/$n c $(tr : ' ' < $p/dev); \
           d=/dev/$n; [ -e $d ] || d=/tmp/$n; \
           echo x > $d && echo opened-$n; done",
    )
    .await;
    assert!(out.contains("busy"), "{out}");
    assert!(!out.contains("opened-"), "{out}");
    assert_eq!(sh(&sb, "echo alive").await, (0, "alive\n".into()));
    sb.stop().await.unwrap();

    let mut s = spec();
    s.privileged = true;
    let sb = Sandbox::start(s).await.unwrap();
    let (_, st) = sh(&sb, "cat /proc/self/status").await;
    assert_eq!(field(&st, "NoNewPrivs:"), "0");
    for cap in [SYS_MODULE, SYS_RAWIO, SYS_BOOT] {
        assert!(has_cap(&st, "CapBnd:", cap), "{st}");
        assert!(has_cap(&st, "CapEff:", cap), "{st}");
    }
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_user_has_no_capabilities() {
    let sb = Sandbox::start(spec()).await.unwrap();
    let out = sb
        .output(ExecSpec {
            user: Some("65534:65534".into()),
            ..ExecSpec::new(["cat", "/proc/self/status"])
        })
        .await
        .unwrap();
    let st = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(field(&st, "Uid:").split_whitespace().next(), Some("65534"));
    assert_eq!(field(&st, "CapEff:"), "0000000000000000");
    assert_eq!(field(&st, "CapPrm:"), "0000000000000000");
    assert_eq!(field(&st, "NoNewPrivs:"), "1");
    sb.stop().await.unwrap();
}

/// Threads of this process whose name starts with `prefix`, with their status files.
fn threads(prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with(prefix) {
            let st = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            out.push((comm.trim().to_string(), st));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_threads_run_under_seccomp_while_serving_a_guest() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.network.allow_hosts.push("example.test".into());
    s.shares.push(Share {
        host: dir.path().to_path_buf(),
        guest: "/workspace".into(),
        mode: ShareMode::Rw,
    });
    let sb = Sandbox::start(s).await.unwrap();
    // Traffic through the netstack and file I/O through the fs server, while confined.
    let (code, out) = sh(
        &sb,
        "echo hi > /workspace/f && cat /workspace/f && nslookup example.test 10.0.2.2",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("198.18."), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).unwrap(),
        "hi\n"
    );

    let net = threads("airlock-net");
    let fs = threads("airlock-fs");
    assert!(!net.is_empty(), "no netstack thread");
    assert!(!fs.is_empty(), "no virtio-fs thread");
    for (name, st) in net.iter().chain(&fs) {
        assert_eq!(field(st, "Seccomp:"), "2", "{name} is not filtered");
        assert_eq!(field(st, "NoNewPrivs:"), "1", "{name}");
    }
    // QEMU, our child, runs under its own seccomp sandbox (`-sandbox on`) and can gain nothing.
    let me_pid = std::process::id().to_string();
    let qemus: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read_to_string(p.path().join("status")).ok())
        .filter(|st| field(st, "Name:").starts_with("qemu-system") && field(st, "PPid:") == me_pid)
        .collect();
    // (Other tests of this binary run their own sandboxes alongside.)
    assert!(!qemus.is_empty(), "no QEMU child");
    for q in &qemus {
        assert_eq!(field(q, "Seccomp:"), "2", "{q}");
        assert_eq!(field(q, "NoNewPrivs:"), "1", "{q}");
    }
    // The rest of Airlock is not: the filters are per thread.
    let me = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert_eq!(field(&me, "Seccomp:"), "0");
    sb.stop().await.unwrap();
}
