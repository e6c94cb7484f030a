//! Workspace benchmark: the same 10 000-file tree over Airlock's virtio-fs, QEMU's virtio-9p,
//! and the guest's own ext4 layer; and overlay start time with a large vs an empty tree.
//! All times are taken on the host around whole guest commands.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock_sandbox::{ExecSpec, RootfsSource, Sandbox, SandboxSpec, Share, ShareMode};
use anyhow::{bail, Context, Result};

const DIRS: usize = 100;
const PER_DIR: usize = 100;
const NEW_FILES: usize = 2000;

fn make_tree(root: &Path) -> Result<()> {
    for d in 0..DIRS {
        let dir = root.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..PER_DIR {
            std::fs::write(dir.join(format!("f{f:03}.txt")), format!("file {d} {f}\n"))?;
        }
    }
    let git = |args: &[&str]| -> Result<()> {
        let st = std::process::Command::new("git")
            .args(["-c", "user.email=b@b", "-c", "user.name=b"])
            .args(args)
            .current_dir(root)
            .stdout(std::process::Stdio::null())
            .status()
            .context("run git (apt-get install git)")?;
        if !st.success() {
            bail!("git {args:?} failed");
        }
        Ok(())
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-qm", "tree"])?;
    Ok(())
}

async fn timed(sb: &Sandbox, script: &str) -> Result<Duration> {
    let t = Instant::now();
    let out = sb.output(ExecSpec::new(["sh", "-c", script])).await?;
    let d = t.elapsed();
    if out.status.code != Some(0) {
        bail!(
            "{script}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(d)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

const CREATE: &str = "import os,sys\nd=sys.argv[1]\nos.makedirs(d,exist_ok=True)\nfor i in range(N):\n  f=open(d+'/n%d'%i,'w'); f.write('x'); f.close()\n";
const STAT: &str = "import os,sys\nn=0\nfor r,ds,fs in os.walk(sys.argv[1]):\n  ds[:]=[x for x in ds if x!='.git']\n  for f in fs: os.stat(os.path.join(r,f)); n+=1\nassert n>=10000, n\n";
const UNLINK: &str = "import os,sys\nd=sys.argv[1]\nfor i in range(N):\n  os.unlink(d+'/n%d'%i)\n";

/// Results per filesystem: create, stat, unlink, git status (medians).
pub struct FsRow {
    pub name: &'static str,
    pub create: Duration,
    pub stat: Duration,
    pub unlink: Duration,
    pub git_status: Duration,
}

/// Runs everything; returns the markdown section.
pub async fn run(iterations: usize, busybox: &Path, debian: &Path) -> Result<String> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    make_tree(&tree)?;
    let mut spec = SandboxSpec::new(RootfsSource::from_path(debian)?);
    spec.shares = vec![Share {
        host: tree.clone(),
        guest: "/vfs".into(),
        mode: ShareMode::Rw,
    }];
    spec.bench_9p = Some((tree.clone(), "bench9p".into()));
    spec.memory_mib = 1024;
    let sb = Sandbox::start(spec).await?;
    timed(
        &sb,
        "set -e; mkdir -p /p9 && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 bench9p /p9 || { dmesg | grep -i -E '9p|virtio|fail'; ls -l /sys/bus/virtio/devices/*/driver; cat /sys/bus/virtio/devices/*/mount_tag; exit 1; }; \
         cp -a /vfs /ext4tree; git config --global --add safe.directory '*'; \
         for d in /vfs /p9 /ext4tree; do git -C $d status --porcelain >/dev/null; done",
    )
    .await?;
    let py = |code: &str, arg: &str| {
        let code = code.replace('N', &NEW_FILES.to_string());
        format!("python3 -c \"{code}\" {arg}")
    };
    let mut rows = Vec::new();
    for (name, dir) in [
        ("virtio-fs (Airlock)", "/vfs"),
        ("virtio-9p (QEMU)", "/p9"),
        ("guest ext4", "/ext4tree"),
    ] {
        let (mut c, mut s, mut u, mut g) = (vec![], vec![], vec![], vec![]);
        for i in 0..iterations {
            let new = format!("{dir}/new-{i}");
            c.push(timed(&sb, &py(CREATE, &new)).await?);
            s.push(timed(&sb, &py(STAT, dir)).await?);
            u.push(timed(&sb, &py(UNLINK, &new)).await?);
            timed(&sb, &format!("rmdir {new}")).await?;
            g.push(timed(&sb, &format!("git -C {dir} status --porcelain >/dev/null")).await?);
        }
        eprintln!("fs bench: {name} done");
        rows.push(FsRow {
            name,
            create: median(c),
            stat: median(s),
            unlink: median(u),
            git_status: median(g),
        });
    }
    drop(sb);

    // Overlay start: a 10 000-file tree vs an empty directory, alternating.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let (mut big, mut small) = (vec![], vec![]);
    for _ in 0..iterations {
        for (dir, out) in [(&tree, &mut big), (&empty, &mut small)] {
            let mut spec = SandboxSpec::new(RootfsSource::from_path(busybox)?);
            spec.shares = vec![Share {
                host: dir.clone(),
                guest: "/workspace".into(),
                mode: ShareMode::Overlay,
            }];
            let t = Instant::now();
            let sb = Sandbox::start(spec).await?;
            timed(&sb, "ls /workspace >/dev/null").await?;
            out.push(t.elapsed());
            drop(sb);
        }
    }
    Ok(table(iterations, &rows, median(big), median(small)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn table(iterations: usize, rows: &[FsRow], big: Duration, small: Duration) -> String {
    let mut t = format!(
        "### Workspace (virtio-fs)\n\nThe same generated tree ({DIRS}×{PER_DIR} = {} files, a git repository) in one \
         Debian guest: over Airlock's virtio-fs share (`:rw`), over QEMU's built-in virtio-9p \
         (`security_model=none`, msize 512000; bench-only) and copied onto the guest's own ext4 layer. \
         Host-side wall time of whole guest commands (python3 loops, `git status`), median of {iterations}.\n\n\
         | | create {NEW_FILES} | stat 10 000 | unlink {NEW_FILES} | git status |\n|---|---:|---:|---:|---:|\n",
        DIRS * PER_DIR
    );
    for r in rows {
        t += &format!(
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |\n",
            r.name,
            ms(r.create),
            ms(r.stat),
            ms(r.unlink),
            ms(r.git_status)
        );
    }
    let (v, p, e) = (&rows[0], &rows[1], &rows[2]);
    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    t += &format!(
        "\n| speed-up of virtio-fs | create | stat | unlink | git status |\n|---|---:|---:|---:|---:|\n\
         | vs virtio-9p (goal ≥ 2×) | {:.2}× | {:.2}× | {:.2}× | {:.2}× |\n\
         | vs guest ext4 | {:.2}× | {:.2}× | {:.2}× | {:.2}× |\n",
        ratio(v.create, p.create),
        ratio(v.stat, p.stat),
        ratio(v.unlink, p.unlink),
        ratio(v.git_status, p.git_status),
        ratio(v.create, e.create),
        ratio(v.stat, e.stat),
        ratio(v.unlink, e.unlink),
        ratio(v.git_status, e.git_status),
    );
    t += &format!(
        "\nOverlay start (sandbox start to a first `ls /workspace`, busybox root, median of {iterations}): \
         10 000-file tree {:.0} ms, empty tree {:.0} ms, ratio **{:.3}** (goal ≤ 1.05).\n",
        ms(big),
        ms(small),
        big.as_secs_f64() / small.as_secs_f64()
    );
    t
}
