//! Warm starts from templates, against real guests: same output as a cold boot, every restored
//! sandbox its own machine, invalidation when an input changes, many restores at once.
//! Each test uses its own memory size so it owns its template key.

use airlock_sandbox::{template, ExecSpec, RootfsSource, Sandbox, SandboxSpec};

mod common;
use common::root_path as root;

fn spec(memory_mib: u32) -> SandboxSpec {
    let mut s =
        SandboxSpec::new(RootfsSource::from_path(root()).expect("demo rootfs: run scripts/setup"));
    s.memory_mib = memory_mib;
    s
}

async fn sh(sb: &Sandbox, script: &str) -> (String, String, Option<i32>) {
    let out = sb
        .output(ExecSpec::new(["sh", "-c", script]))
        .await
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code,
    )
}

/// A sandbox restored from a template (building it first if this is the first).
async fn warm(s: SandboxSpec) -> Sandbox {
    let sb = Sandbox::start(s).await.expect("warm start");
    assert!(sb.template().is_some(), "expected a warm start");
    sb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_start_output_matches_cold_start() {
    let script =
        "echo out; echo err >&2; ls / | sort | tr '\\n' ' '; cat /etc/hostname 2>/dev/null; \
                  mkdir -p /tmp/x && echo data > /tmp/x/f && cat /tmp/x/f; id -u; exit 3";
    let mut c = spec(288);
    c.cold = true;
    let cold = Sandbox::start(c).await.unwrap();
    assert!(cold.template().is_none(), "--cold must boot");
    let want = sh(&cold, script).await;
    cold.stop().await.unwrap();
    // The first warm start may build the template; the second surely restores it.
    for _ in 0..2 {
        let sb = warm(spec(288)).await;
        assert_eq!(sh(&sb, script).await, want);
        sb.stop().await.unwrap();
    }
    assert_eq!(want.2, Some(3));
    assert!(want.0.starts_with("out\n"), "{want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_restored_from_one_template_are_distinct_machines() {
    let mut s = spec(296);
    s.network.allow_hosts = vec!["example.com".into()];
    let probe = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /etc/machine-id; \
                 hostname; cat /etc/ssl/airlock/ca.pem | tr -d '\\n'; echo; \
                 for b in /sys/block/vd*; do [ \"$(cat $b/serial)\" = airlock-scratch ] && \
                 dd if=/dev/${b##*/} bs=1 skip=1128 count=16 2>/dev/null | od -An -tx1 | tr -d ' \\n'; done; \
                 echo; echo data > /root/f && sync && cat /root/f; dmesg | grep -ci 'ext4.*error'; \
                 cmp -s /etc/ssl/airlock/ca.pem /etc/ssl/certs/ca-certificates.crt && echo one-ca";
    let a = warm(s.clone()).await;
    let b = warm(s.clone()).await;
    assert_eq!(a.template(), b.template(), "both from one template");
    let (pa, pb) = (sh(&a, probe).await.0, sh(&b, probe).await.0);
    let (la, lb): (Vec<&str>, Vec<&str>) = (pa.lines().collect(), pb.lines().collect());
    assert_eq!(la.len(), 8, "{pa}");
    assert_eq!(lb.len(), 8, "{pb}");
    assert_eq!(la[0].len(), 64, "{pa}");
    assert_ne!(la[0], lb[0], "/dev/urandom right after start");
    assert_eq!(la[1].len(), 32, "machine-id: {pa}");
    assert_ne!(la[1], lb[1], "machine-id");
    assert_eq!(la[2], a.id(), "hostname is the sandbox id");
    assert_ne!(la[2], lb[2], "hostname");
    assert!(la[3].contains("BEGIN CERTIFICATE"), "{pa}");
    assert_ne!(la[3], lb[3], "each sandbox has its own MITM CA");
    // The template's warm-up trusted a throw-away CA: the sandbox's replaced it, and the
    // image's bundle (none in the demo image) holds that one only.
    assert_eq!((la[7], lb[7]), ("one-ca", "one-ca"), "{pa}\n{pb}");
    // The writable disk's ext4 UUID is renewed after restore, and the filesystem stays sound.
    assert_eq!(la[4].len(), 32, "scratch UUID: {pa}");
    assert_ne!(la[4], lb[4], "scratch ext4 UUID");
    assert_eq!((la[5], la[6]), ("data", "0"), "{pa}");
    assert_eq!((lb[5], lb[6]), ("data", "0"), "{pb}");
    // The guest clock was stepped to now, not left at the capture time.
    let guest: u64 = sh(&a, "date +%s").await.0.trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        guest.abs_diff(host) < 30,
        "guest clock {guest}, host {host}"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_is_invalidated_when_image_or_kernel_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("root");
    copy_dir(std::path::Path::new(&root()), &dir);
    let kernel = tmp.path().join("vmlinux");
    std::fs::copy(airlock_sandbox::assets::kernel().unwrap(), &kernel).unwrap();
    let mk = || {
        let mut s = SandboxSpec::new(RootfsSource::from_path(&dir).unwrap());
        s.memory_mib = 304;
        s.kernel = Some(kernel.clone());
        s
    };
    let a = warm(mk()).await;
    let key_a = a.template().unwrap().to_string();
    a.stop().await.unwrap();
    let again = warm(mk()).await;
    assert_eq!(
        again.template(),
        Some(key_a.as_str()),
        "unchanged inputs reuse it"
    );
    again.stop().await.unwrap();

    // A changed image: a new template, and the change is visible inside.
    std::fs::write(dir.join("etc/airlock-marker"), "v2\n").unwrap();
    let b = warm(mk()).await;
    let key_b = b.template().unwrap().to_string();
    assert_ne!(
        key_a, key_b,
        "a changed image must not restore the old template"
    );
    assert_eq!(sh(&b, "cat /etc/airlock-marker").await.0, "v2\n");
    b.stop().await.unwrap();

    // A changed kernel (same bytes, rewritten): another template; the old one is stale.
    let bytes = std::fs::read(&kernel).unwrap();
    std::fs::remove_file(&kernel).unwrap();
    std::fs::write(&kernel, bytes).unwrap();
    let c = warm(mk()).await;
    let key_c = c.template().unwrap().to_string();
    assert_ne!(
        key_b, key_c,
        "a changed kernel must not restore the old template"
    );
    c.stop().await.unwrap();
    let list = template::list();
    let stale = |k: &str| list.iter().find(|t| t.key == k).map(|t| t.current);
    assert_eq!(stale(&key_b), Some(false), "the old template is stale");
    assert_eq!(stale(&key_c), Some(true));
    let removed = template::gc();
    assert!(
        removed.contains(&key_a) && removed.contains(&key_b),
        "{removed:?}"
    );
    assert!(!removed.contains(&key_c), "{removed:?}");
    // Leave nothing that points into the temporary directory.
    template::remove(&key_c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_warm_starts_from_one_template() {
    // Make sure the template exists, then start ten at once.
    warm(spec(272)).await.stop().await.unwrap();
    let starts = (0..10).map(|_| tokio::spawn(Sandbox::start(spec(272))));
    let mut sbs = Vec::new();
    for t in starts {
        sbs.push(t.await.unwrap().expect("concurrent warm start"));
    }
    let key = sbs[0].template().map(str::to_string);
    assert!(key.is_some());
    let mut ids = std::collections::HashSet::new();
    for sb in &sbs {
        assert_eq!(sb.template().map(str::to_string), key);
        let (out, _, code) = sh(sb, "hostname; cat /etc/machine-id").await;
        assert_eq!(code, Some(0));
        assert!(ids.insert(out.clone()), "duplicate identity {out}");
    }
    for sb in sbs {
        sb.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_template_is_detected_and_rebuilt() {
    let first = warm(spec(280)).await;
    let key = first.template().unwrap().to_string();
    first.stop().await.unwrap();
    let dir = template::templates_dir().join(&key);
    // Damage the device state in place (same size): only the checksum can tell.
    let state = dir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let problem = template::list()
        .into_iter()
        .find(|t| t.key == key)
        .and_then(|t| t.problem);
    assert!(problem.is_some(), "a damaged template must be reported");
    // The next start notices, boots cold to rebuild it, and works.
    let sb = Sandbox::start(spec(280))
        .await
        .expect("start despite a damaged template");
    assert_eq!(sh(&sb, "echo ok").await.0, "ok\n");
    sb.stop().await.unwrap();
    assert!(template::verify(&dir).is_ok(), "rebuilt");
    // A truncated RAM file is caught too.
    let ram = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("ram"))
        .unwrap();
    ram.set_len(4096).unwrap();
    drop(ram);
    assert!(template::verify(&dir).is_err());
    let sb = Sandbox::start(spec(280))
        .await
        .expect("start despite a truncated template");
    assert_eq!(sh(&sb, "echo ok").await.0, "ok\n");
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_start_copies_with_its_files_and_processes() {
    let name = format!("test-{}", std::process::id());
    let src = Sandbox::start(spec(320)).await.unwrap();
    let (pid, _, code) = sh(
        &src,
        "echo hello > /root/f; sleep 1000 >/dev/null 2>&1 & echo $!",
    )
    .await;
    assert_eq!(code, Some(0));
    let pid = pid.trim().to_string();
    // A command still streaming output at the moment of the snapshot: its frames belong to
    // the source's host, and the copies must not trip over them.
    let mut ticking = src
        .exec(ExecSpec::new([
            "sh",
            "-c",
            "while true; do echo tick; sleep 0.1; done",
        ]))
        .await
        .unwrap();
    let _ = ticking.next().await.unwrap();
    let info = src.snapshot(&name).await.expect("snapshot");
    assert_eq!(info.source, src.id());
    let err = src.snapshot(&name).await.unwrap_err().to_string();
    assert!(err.contains("exists"), "{err}");

    // The source runs on, its streaming command included.
    assert_eq!(sh(&src, "cat /root/f").await.0, "hello\n");
    assert!(ticking.next().await.unwrap().is_some());

    let mut from = SandboxSpec::new(RootfsSource::from_path(root()).unwrap());
    from.from_snapshot = Some(name.clone());
    let (a, b) = tokio::join!(Sandbox::start(from.clone()), Sandbox::start(from.clone()));
    let (a, b) = (a.expect("copy a"), b.expect("copy b"));
    let probe = format!(
        "cat /root/f; kill -0 {pid} && echo alive; hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    );
    let (pa, pb) = (sh(&a, &probe).await, sh(&b, &probe).await);
    assert_eq!(pa.2, Some(0), "{pa:?}");
    let (la, lb): (Vec<&str>, Vec<&str>) = (pa.0.lines().collect(), pb.0.lines().collect());
    assert_eq!(&la[..2], ["hello", "alive"], "{pa:?}");
    assert_eq!(&lb[..2], ["hello", "alive"], "{pb:?}");
    assert_eq!(la[2], a.id());
    assert_ne!(la[2], lb[2], "hostname");
    assert_ne!(la[3], lb[3], "machine-id");
    assert_ne!(la[4], lb[4], "/dev/urandom");
    // Copies are independent: a write in one is not seen by the other or the source.
    sh(&a, "echo only-a > /root/f").await;
    assert_eq!(sh(&b, "cat /root/f").await.0, "hello\n");
    assert_eq!(sh(&src, "cat /root/f").await.0, "hello\n");
    drop(ticking);
    for sb in [a, b, src] {
        sb.stop().await.unwrap();
    }
    assert!(airlock_sandbox::snapshot::list()
        .iter()
        .any(|s| s.name == name));
    // Its guest gave up the dangerous capabilities for good: --privileged is refused.
    let mut privileged = SandboxSpec::new(RootfsSource::from_path(root()).unwrap());
    privileged.from_snapshot = Some(name.clone());
    privileged.privileged = true;
    let err = Sandbox::start(privileged).await.unwrap_err().to_string();
    assert!(err.contains("without --privileged"), "{err}");
    airlock_sandbox::snapshot::remove(&name).unwrap();
    let mut gone = SandboxSpec::new(RootfsSource::from_path(root()).unwrap());
    gone.from_snapshot = Some(name.clone());
    let err = Sandbox::start(gone).await.unwrap_err().to_string();
    assert!(err.contains("no snapshot named"), "{err}");
}
