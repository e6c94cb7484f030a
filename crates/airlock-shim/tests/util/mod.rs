//! A private containerd for the shim's end-to-end tests: its own root, state dir and socket
//! under a temp dir, `io.containerd.airlock.v2` resolved to the shim built by this test run
//! (on its PATH as `containerd-shim-airlock-v2`, and as the CRI runtime's `runtime_type`),
//! the busybox test image imported. Dropping it kills containerd and the shims it started,
//! undoes their mounts and removes everything.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The test image's name in containerd.
pub const IMAGE: &str = "docker.io/airlock/busybox:test";
/// The shim under test.
pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-airlock-v2");

/// A running private containerd.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The ctr namespace every command of this instance uses (unique: pod dirs are per
    /// namespace).
    pub ns: String,
    child: Child,
}

/// Output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether the suite can run here: root and containerd. In CI (`CI=true`) a missing piece
/// fails the test; elsewhere the test is skipped with the reason printed.
pub fn available() -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root (containerd and the shim mount filesystems)")
    } else if Command::new("containerd")
        .arg("--version")
        .output()
        .is_err()
        || Command::new("ctr").arg("--version").output().is_err()
    {
        Some("containerd/ctr not installed (apt-get install containerd)")
    } else {
        None
    };
    match why {
        None => true,
        Some(w) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("containerd shim tests cannot run in CI: {w}")
        }
        Some(w) => {
            eprintln!("skipping: {w}");
            false
        }
    }
}

/// Extra configuration: the CRI plugin on (with CNI dirs) or off.
#[derive(Default)]
pub struct Options {
    /// Enable the CRI plugin with runtime handler `airlock`, CNI from these dirs.
    pub cri: Option<(PathBuf, PathBuf)>,
    /// Extra environment for containerd (and so for its shims).
    pub env: Vec<(String, String)>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Containerd {
    /// Starts containerd without CRI and imports the test image.
    pub fn start() -> Containerd {
        Self::start_with(Options::default())
    }

    /// Starts containerd with `opts` and imports the test image.
    pub fn start_with(opts: Options) -> Containerd {
        // Short paths: the socket must fit in sun_path.
        let dir = tempfile::Builder::new()
            .prefix("alshim")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(SHIM, bin.join("containerd-shim-airlock-v2")).unwrap();
        let socket = d.join("c.sock");
        let cri = match &opts.cri {
            None => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_string(),
            Some((bin_dir, conf_dir)) => format!(
                r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  disable_cgroup = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.airlock]
      runtime_type = "io.containerd.airlock.v2"
      pod_annotations = ["airlock.io/*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{}"
    conf_dir = "{}"
"#,
                bin_dir.display(),
                conf_dir.display()
            ),
        };
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{cri}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .envs(opts.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let ns = format!(
            "alt{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let c = Containerd {
            dir,
            socket,
            ns,
            child,
        };
        let t = Instant::now();
        loop {
            if c.socket.exists() && c.ctr(&["version"]).status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "containerd did not come up: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let tar = image_archive(c.dir.path(), IMAGE, &[]);
        c.import(&tar);
        c
    }

    /// Imports an OCI archive.
    pub fn import(&self, tar: &Path) {
        let out = self.ctr(&["image", "import", tar.to_str().unwrap()]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The ctr command for this instance (address and namespace set).
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.ns)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs ctr with `args`, bounded by two minutes.
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = self.ctr_cmd(args);
        output_within(&mut cmd, Duration::from_secs(120))
    }

    /// The shim processes this containerd started (by their `-address` argument).
    pub fn shim_pids(&self) -> Vec<u32> {
        let sock = self.socket.to_string_lossy().into_owned();
        processes()
            .into_iter()
            .filter(|(_, cmd)| {
                cmd.first()
                    .is_some_and(|a| a.ends_with("containerd-shim-airlock-v2"))
                    && cmd.iter().any(|a| *a == sock)
            })
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Polls `f` until it holds or `limit` passes.
    pub fn wait_until(&self, limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(
                t.elapsed() < limit,
                "timed out waiting for {what}\n{}",
                self.tail_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of containerd's log (failure context).
    pub fn tail_log(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Child processes of `pid` whose command name starts with `comm`.
pub fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for (p, _) in processes() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces: fields follow the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == pid && name.starts_with(comm) {
            out.push(p);
        }
    }
    out
}

/// Whether `pid` is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 2..].starts_with('Z'))
                .map(|z| !z)
        })
        .unwrap_or(false)
}

/// Every process with its command line.
pub fn processes() -> Vec<(u32, Vec<String>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let args = c
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            v.push((pid, args));
        }
    }
    v
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Runs `cmd`, killing it after `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            // SAFETY: our own child, still unreaped (its waiter thread holds it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {limit:?}");
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let shims = self.shim_pids();
        // SAFETY: kill(2) on processes this instance started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        for pid in shims {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let pods = Path::new("/run/airlock-shim").join(&self.ns);
        for dir in [self.dir.path().to_path_buf(), pods.clone()] {
            for m in mounts_under(&dir) {
                let c = std::ffi::CString::new(m.as_os_str().to_string_lossy().as_bytes()).unwrap();
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = std::fs::remove_dir_all(&pods);
    }
}

/// The busybox root of scripts/mkrootfs-busybox as an OCI archive named `name` (umoci and
/// skopeo, real image tools), written into `dir`; `host_bins` are host programs copied in
/// with the shared libraries they load (a real client, e.g. curl, without a distribution).
pub fn image_archive(dir: &Path, name: &str, host_bins: &[&str]) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let rootfs = std::env::var("AIRLOCK_TEST_ROOTFS").unwrap_or_else(|_| {
        let out = Command::new(repo.join("scripts/mkrootfs-busybox"))
            .output()
            .expect("scripts/mkrootfs-busybox");
        assert!(
            out.status.success(),
            "mkrootfs-busybox: {}",
            text(&out.stderr)
        );
        text(&out.stdout).trim().to_string()
    });
    let tar = dir.join(format!("image-{}.tar", host_bins.len()));
    let script = format!(
        r#"set -e
cd "{work}"
rm -rf oci bundle
umoci init --layout oci >/dev/null
umoci new --image oci:img >/dev/null
umoci unpack --image oci:img bundle >/dev/null
cp -a "{rootfs}/." bundle/rootfs/
for b in {bins}; do
  for f in "$b" $(ldd "$b" | grep -o '/[^ ]*'); do cp -L --parents "$f" bundle/rootfs/; done
done
umoci repack --image oci:img bundle >/dev/null
umoci config --image oci:img --config.cmd /bin/sh \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.workingdir /root >/dev/null
skopeo copy -q oci:oci:img "oci-archive:{tar}:{name}"
rm -rf oci bundle"#,
        work = dir.display(),
        tar = tar.display(),
        bins = host_bins.join(" "),
    );
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(out.status.success(), "image archive: {}", text(&out.stderr));
    tar
}
