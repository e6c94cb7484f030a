//! The warm pool against real guests: claims come from the pool with a fresh identity each,
//! the pool refills, an unlike spec starts anew, and no QEMU outlives the pool's holder
//! (dropped, or killed with SIGKILL). Own memory sizes: each test owns its template key.

use std::time::Duration;

use airlock_sandbox::{Pool, RootfsSource, SandboxSpec};

mod common;
use common::{root_path as root, sh, wait_until};

fn spec(memory_mib: u32) -> SandboxSpec {
    let mut s =
        SandboxSpec::new(RootfsSource::from_path(root()).expect("demo rootfs: run scripts/setup"));
    s.memory_mib = memory_mib;
    s
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purpose: it holds no memory and no files.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

async fn wait_gone(pids: &[u32]) {
    let pids = pids.to_vec();
    wait_until(
        "the pool's QEMU processes to end",
        Duration::from_secs(20),
        || {
            let pids = pids.clone();
            async move { pids.iter().all(|p| !alive(*p)) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_claims_are_fresh_machines_and_the_pool_refills() {
    let pool = Pool::new(spec(232), 2).unwrap();
    pool.wait_ready(2).await.unwrap();
    let st = pool.status();
    assert_eq!((st.size, st.ready, st.claimed), (2, 2, 0), "{st:?}");
    assert!(st.idle_pss_bytes > 0 && st.template.is_some(), "{st:?}");
    let first_pids = st.pids.clone();

    let probe = "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1; echo ok > /tmp/w; cat /tmp/w";
    let mut a_spec = spec(232);
    a_spec.hostname = Some("claim-a".into());
    let a = pool.start(a_spec).await.unwrap();
    let b = pool.start(spec(232)).await.unwrap();
    assert!(a.pooled() && b.pooled() && a.template().is_some());
    let (oa, ob) = (sh(&a, probe).await, sh(&b, probe).await);
    let (la, lb): (Vec<_>, Vec<_>) = (oa.lines().collect(), ob.lines().collect());
    assert_eq!(la[0], "claim-a", "the claim's hostname: {oa}");
    assert_eq!(lb[0], b.id(), "default hostname is the sandbox id: {ob}");
    assert_ne!(la[1], lb[1], "machine-id shared between pool siblings");
    assert_ne!(la[2], lb[2], "urandom shared between pool siblings");
    assert_eq!((la[3], lb[3]), ("ok", "ok"));
    assert!(first_pids.contains(&a.vm_pid()) && first_pids.contains(&b.vm_pid()));
    // Each claim trusts its own CA alone: the warm-up's throw-away CA (its key dropped) was
    // replaced in every bundle, not kept beside it.
    for sb in [&a, &b] {
        let ca = sb.network().expect("networked").ca_pem();
        let out = sh(
            sb,
            "cat /etc/ssl/certs/ca-certificates.crt; echo @@; cat /etc/ssl/airlock/bundle.pem",
        )
        .await;
        let parts: Vec<&str> = out.split("@@").map(str::trim).collect();
        assert_eq!(
            parts,
            [ca.trim(), ca.trim()],
            "trusted roots of {}",
            sb.id()
        );
    }
    let st = pool.status();
    assert_eq!(st.claimed, 2, "{st:?}");

    // Refilled behind the claims.
    pool.wait_ready(2).await.unwrap();
    let st = pool.status();
    assert_eq!(st.ready, 2, "{st:?}");
    assert!(st.pids.iter().all(|p| !first_pids.contains(p)), "{st:?}");

    // An unlike spec (other memory) is started anew, not from the pool.
    let c = pool.start(spec(236)).await.unwrap();
    assert!(!c.pooled());
    assert_eq!(sh(&c, "echo hi").await, "hi\n");
    assert_eq!(pool.status().missed, 1);
    assert_eq!(pool.status().ready, 2);

    // Claimed sandboxes outlive the pool; the pool's own VMs do not.
    let idle = pool.status().pids;
    drop(pool);
    wait_gone(&idle).await;
    assert_eq!(sh(&a, "echo still").await, "still\n");
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_refuses_what_cannot_start_warm() {
    let mut s = spec(234);
    s.cold = true;
    let e = Pool::new(s, 1).err().expect("a cold pool was accepted");
    assert!(e.to_string().contains("cold"), "{e}");
    let e = Pool::new(spec(234), 0)
        .err()
        .expect("an empty pool was accepted");
    assert!(e.to_string().contains("pool size 0"), "{e}");
}

/// Not a test on its own: the child process of the SIGKILL test holds a pool here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_holder_child() {
    let Some(report) = std::env::var_os("AIRLOCK_POOL_HOLDER") else {
        return;
    };
    let pool = Pool::new(spec(238), 2).unwrap();
    pool.wait_ready(2).await.unwrap();
    let pids = pool.status().pids;
    let line = pids
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let tmp = std::path::PathBuf::from(&report).with_extension("tmp");
    std::fs::write(&tmp, line).unwrap();
    std::fs::rename(tmp, report).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_pool_holder_leaves_no_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("pids");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "pool_holder_child", "--test-threads=1"])
        .env("AIRLOCK_POOL_HOLDER", &report)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let r = report.clone();
    wait_until(
        "the holder to fill its pool",
        Duration::from_secs(300),
        || {
            let r = r.clone();
            async move { r.exists() }
        },
    )
    .await;
    let line = std::fs::read_to_string(&report).unwrap();
    let pids: Vec<u32> = line.split(',').map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    wait_gone(&pids).await;
}
