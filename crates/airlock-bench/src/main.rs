//! `airlock-bench`: the project's one benchmark (run it through `scripts/bench`).
//!
//! Every figure is measured against a baseline taken in the same run on the same machine, so the
//! ratios mean something even where absolute times do not (TCG vs KVM, a busy CI host):
//!
//! 1. boot: bare `qemu-system-x86_64` booting the same kernel with the same machine options and an
//!    initramfs whose /init reboots at once, against `airlock run --rootfs <demo> -- true`;
//! 2. exec: `true` run N times in one sandbox, against spawning `/bin/true` on the host;
//! 3. port forward: HTTP downloads through `Sandbox::forward_port`, against the same server
//!    running on the host;
//! 4. images, first run, network, exec by API, workspace sharing: see their modules.
//!
//! With no `--only-*` flag it runs every module and rewrites docs/benchmarks.md, one `##`
//! section per module (see [`Section`]).

mod ports;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

// The registry and image-building helpers the image tests use: a real docker-registry on
// loopback and a busybox image made with umoci.
mod api;

#[path = "../../airlock-image/tests/common/mod.rs"]
mod common;
mod floor;
mod fsbench;
mod net;
mod snap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use airlock_backend::qemu::{Qemu, BASE_CMDLINE};
use airlock_backend::{Accel, AccelChoice};
use airlock_sandbox::{ExecSpec, RootfsSource, Sandbox, SandboxSpec};
use anyhow::{bail, Context, Result};

/// Goal: `airlock run -- true` within 10 % of what bare QEMU needs to boot the same kernel.
const BOOT_RATIO_GOAL: f64 = 1.10;
/// Goal: median exec round trip, ms.
const EXEC_P50_GOAL_MS: f64 = 5.0;
/// Goal: an exec round trip costs at most 1.5x the same spawn done inside the guest.
const EXEC_GUEST_RATIO_GOAL: f64 = 1.5;
/// A single boot that takes longer than this is stuck, not slow.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The command that regenerates docs/benchmarks.md, quoted there.
const DOCS_COMMAND: &str = "scripts/bench";

const USAGE: &str =
    "usage: airlock-bench [--iterations N] [--execs N] [--rootfs DIR] [--no-docs] [--only-…]
With no --only-* flag: every benchmark, then docs/benchmarks.md is rewritten.
  --iterations N  boots of each kind (default 7)
  --execs N       exec round trips (default 200)
  --rootfs DIR    root filesystem for airlock (default: the one scripts/mkrootfs-busybox builds)
  --no-docs       print the figures only; leave docs/benchmarks.md alone
  --write-docs    (the default for a full run; accepted for old scripts)
  --net-only      only the network benchmarks (printed, docs untouched)
  --only-ports    run only the port-forward benchmark (prints its table)
  --only-fs       only the workspace (virtio-fs) benchmark; prints its section
  --only-api      only the exec round trip by API (Rust API, airlock rpc, CLI)
  --only-snap     only warm start (template restore) against cold boot
  --only-boot     only cold boot against bare QEMU, and exec round trips (prints its tables)";

struct Opts {
    iterations: usize,
    execs: usize,
    rootfs: Option<PathBuf>,
    write_docs: bool,
    only_ports: bool,
    only_fs: bool,
    /// Only the exec-by-API comparison (`api.rs`).
    only_api: bool,
    /// Only warm against cold start (`snap.rs`).
    only_snap: bool,
    /// Only cold boot against bare QEMU, and exec round trips.
    only_boot: bool,
}

fn parse_args() -> Result<Option<Opts>> {
    let mut o = Opts {
        iterations: 7,
        execs: 200,
        rootfs: None,
        write_docs: true,
        only_ports: false,
        only_fs: false,
        only_api: false,
        only_snap: false,
        only_boot: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--iterations" => {
                o.iterations = value("--iterations")?.parse().context("--iterations")?
            }
            "--execs" => o.execs = value("--execs")?.parse().context("--execs")?,
            "--rootfs" => o.rootfs = Some(value("--rootfs")?.into()),
            "--write-docs" => o.write_docs = true,
            "--no-docs" => o.write_docs = false,
            "--net-only" => {}
            "--only-ports" => o.only_ports = true,
            "--only-fs" => o.only_fs = true,
            "--only-api" => o.only_api = true,
            "--only-snap" => o.only_snap = true,
            "--only-boot" => o.only_boot = true,
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.iterations == 0 || o.execs == 0 {
        bail!("--iterations and --execs must be at least 1");
    }
    Ok(Some(o))
}

/// The workspace root: docs/ and scripts/ are found from here (this is a dev tool run from a
/// checkout, never installed).
fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// Nearest-rank percentile (`q` in 0..=1) of samples; no interpolation, so every figure
/// reported is a time that was actually observed.
fn pct(samples: &[Duration], q: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len().max(1));
    s.get(rank - 1).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `cmd` to completion and returns its wall time, spawn to exit. Fails on a non-zero exit
/// (with its stderr) or after [`BOOT_TIMEOUT`] (the child is killed then).
async fn timed(cmd: &mut tokio::process::Command) -> Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t = Instant::now();
    let out = tokio::time::timeout(BOOT_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("{cmd:?}: no exit after {BOOT_TIMEOUT:?}"))?
        .with_context(|| format!("spawn {cmd:?}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(took)
}

/// Builds the baseline initramfs in `dir`: busybox-static plus an /init script that reboots at
/// once (with `reboot=t` and `-no-reboot` that ends QEMU). No tiny static program is at hand, so
/// busybox's shell start-up (a few ms under TCG) is part of the baseline; that only makes the
/// baseline slower, never flatters airlock.
fn baseline_initramfs(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copy /bin/busybox (install busybox-static)")?;
    let init = root.join("init");
    std::fs::write(&init, "#!/bin/busybox sh\n/bin/busybox reboot -f\n")?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let cpio = dir.join("baseline.cpio");
    let out = std::fs::File::create(&cpio)?;
    let st = std::process::Command::new("sh")
        .args(["-c", "find . | cpio -o -H newc --quiet"])
        .current_dir(&root)
        .stdout(out)
        .status()
        .context("run cpio (install cpio)")?;
    if !st.success() {
        bail!("building the baseline initramfs with cpio failed: {st}");
    }
    Ok(cpio)
}

/// The same machine, accelerator, CPU, memory and kernel command line as `Qemu::args`, minus
/// the devices only a sandbox needs (disks, control channel, rng).
fn baseline_args(accel: Accel, kernel: &Path, initrd: &Path, serial: &str) -> Vec<String> {
    let extra = airlock_sandbox::guest_kernel_args(accel);
    let accel: &[&str] = match accel {
        Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
    };
    let mut a = vec![
        "-M",
        "microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=on",
    ];
    a.extend([
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ]);
    a.extend(accel);
    a.extend(["-smp", "1", "-m", "512M"]);
    let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
    // The same command line airlock gives its guests (including the TCG clock hint).
    let cmdline = std::iter::once(BASE_CMDLINE.to_string())
        .chain(extra)
        .collect::<Vec<_>>()
        .join(" ");
    a.extend([
        "-kernel", &k, "-initrd", &i, "-append", &cmdline, "-serial", serial,
    ]);
    a.into_iter().map(String::from).collect()
}

/// Boot figures, in seconds.
struct Boot {
    bare: Vec<Duration>,
    airlock: Vec<Duration>,
}

async fn bench_boot(o: &Opts, accel: Accel, rootfs: &Path) -> Result<Boot> {
    let tmp = tempfile::tempdir()?;
    let kernel = airlock_sandbox::assets::kernel()?;
    let initrd = baseline_initramfs(tmp.path())?;
    let qemu = Qemu::default().binary;
    let airlock = airlock_bin()?;
    let airlock_cmd = || {
        let mut c = tokio::process::Command::new(&airlock);
        // A boot against a boot: warm starts (restores) are measured in snap.rs.
        c.arg("run")
            .arg("--cold")
            .arg("--rootfs")
            .arg(rootfs)
            .args(["--", "true"]);
        c
    };

    // Warm-up, not counted: airlock builds its initramfs and rootfs image caches on first use,
    // and both paths want the kernel in the page cache. The bare boot logs its console once so
    // we can check /init really ran: a kernel panic also ends QEMU quickly (panic=-1), and would
    // otherwise pass for a fast boot. Both messages are KERN_EMERG, printed despite `quiet`.
    let log = tmp.path().join("console.log");
    let serial = format!("file:{}", log.display());
    timed(
        tokio::process::Command::new(&qemu).args(baseline_args(accel, &kernel, &initrd, &serial)),
    )
    .await?;
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    if console.contains("Kernel panic") || !console.contains("Restarting system") {
        bail!("baseline guest did not reboot from /init; console:\n{console}");
    }
    timed(&mut airlock_cmd())
        .await
        .context("airlock run (warm-up)")?;

    // Interleaved, so drift on the host (thermal, other load) hits both sides alike.
    let mut b = Boot {
        bare: Vec::new(),
        airlock: Vec::new(),
    };
    for i in 0..o.iterations {
        eprint!("\rboot {}/{}", i + 1, o.iterations);
        let args = baseline_args(accel, &kernel, &initrd, "null");
        b.bare
            .push(timed(tokio::process::Command::new(&qemu).args(args)).await?);
        b.airlock.push(timed(&mut airlock_cmd()).await?);
    }
    // The raw samples, so an outlier behind a p90 can be told from a trend.
    let list = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.0}", ms(*d)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "\nbare ms: {}\nairlock ms: {}",
        list(&b.bare),
        list(&b.airlock)
    );
    Ok(b)
}

/// The `airlock` binary next to this one.
fn airlock_bin() -> Result<PathBuf> {
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let airlock = bin_dir.join("airlock");
    if !airlock.is_file() {
        bail!(
            "{} missing: build it with cargo build --release -p airlock",
            airlock.display()
        );
    }
    Ok(airlock)
}

/// Small and large image, as scripts/bench prepares them.
const SMALL_IMAGE: &str = "demo/busybox:latest";
const LARGE_IMAGE: &str = "demo/debian:bookworm";
/// Goal: starting a large image costs at most 5 % more than a tiny one.
const IMAGE_RATIO_GOAL: f64 = 1.05;

/// Sandbox start (spawn to ready, through the Rust API) from a tiny and a large image,
/// interleaved, after one uncounted start of each (which builds their root filesystems if
/// needed). Start only: the images' own programs differ (Debian's are dynamically linked).
async fn bench_images(o: &Opts) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let store = airlock_image::Store::open_default()?;
    let spec = |img: &str| -> Result<SandboxSpec> {
        let rec = store
            .resolve(&airlock_image::Reference::parse(img)?)
            .with_context(|| format!("{img} not in the store (scripts/bench imports it)"))?;
        Ok(SandboxSpec::new(RootfsSource::Oci {
            store: store.root().to_path_buf(),
            image: Box::new(rec),
        }))
    };
    let start = |img: &'static str| {
        let spec = spec(img);
        async move {
            let t = Instant::now();
            let sb = Sandbox::start(spec?).await?;
            let d = t.elapsed();
            drop(sb);
            Ok::<_, anyhow::Error>(d)
        }
    };
    for img in [SMALL_IMAGE, LARGE_IMAGE] {
        start(img).await?;
    }
    let (mut small, mut large) = (Vec::new(), Vec::new());
    for i in 0..o.iterations {
        eprint!("\rimage start {}/{}", i + 1, o.iterations);
        small.push(start(SMALL_IMAGE).await?);
        large.push(start(LARGE_IMAGE).await?);
    }
    eprintln!();
    Ok((small, large))
}

/// First run of an image never seen before: `airlock run --image` against a real registry on
/// loopback (pull + root filesystem build in a builder VM + boot + run), against `skopeo copy`
/// of the same image from the same registry, interleaved, each airlock run with an empty store.
async fn bench_first_run(o: &Opts) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let airlock = airlock_bin()?;
    let tmp = tempfile::tempdir()?;
    let reg = common::Registry::start(tmp.path());
    let layout = common::build_layout(tmp.path());
    let image = format!("{}/bench/bb:1", reg.host());
    common::skopeo_copy(&[
        "--dest-tls-verify=false",
        &format!("oci:{}:bb", layout.dir.display()),
        &format!("docker://{image}"),
    ]);
    let (mut skopeo, mut first) = (Vec::new(), Vec::new());
    for i in 0..o.iterations {
        eprint!("\rfirst run {}/{}", i + 1, o.iterations);
        let dir = tmp.path().join(format!("skopeo-{i}"));
        skopeo.push(
            timed(tokio::process::Command::new("skopeo").args([
                "copy".to_string(),
                "-q".into(),
                "--src-tls-verify=false".into(),
                format!("docker://{image}"),
                format!("dir:{}", dir.display()),
            ]))
            .await?,
        );
        first.push(
            timed(
                tokio::process::Command::new(&airlock)
                    .args(["run", "--image", &image, "--", "/bin/busybox", "true"])
                    .env("AIRLOCK_DATA_DIR", tmp.path().join(format!("data-{i}"))),
            )
            .await?,
        );
    }
    eprintln!();
    Ok((skopeo, first))
}

/// The first-run table.
fn first_run_table(o: &Opts, skopeo: &[Duration], first: &[Duration]) -> String {
    let ratio = pct(first, 0.5).as_secs_f64() / pct(skopeo, 0.5).as_secs_f64();
    format!(
        "\nFirst run of a new image (busybox, registry on loopback), {} runs each:\n\n\
         | | median | p90 |\n|---|---:|---:|\n\
         | `skopeo copy docker://… dir:…` | {:.0} ms | {:.0} ms |\n\
         | `airlock run --image …` with an empty store (pull + rootfs build + boot + run) | {:.0} ms | {:.0} ms |\n\n\
         Ratio airlock / skopeo (medians): **{ratio:.1}** (no goal set; the rootfs build boots one \
         builder VM, so under TCG a first run costs about two boots)\n",
        o.iterations,
        ms(pct(skopeo, 0.5)),
        ms(pct(skopeo, 0.9)),
        ms(pct(first, 0.5)),
        ms(pct(first, 0.9)),
    )
}

/// The image-start table.
fn image_table(o: &Opts, small: &[Duration], large: &[Duration]) -> String {
    let ratio = pct(large, 0.5).as_secs_f64() / pct(small, 0.5).as_secs_f64();
    let verdict = if ratio <= IMAGE_RATIO_GOAL {
        "met"
    } else {
        "**missed**"
    };
    format!(
        "\nSandbox start from an image (spawn to ready, Rust API), root filesystem already built, {} runs each:\n\n\
         | | median | p90 |\n|---|---:|---:|\n\
         | `{SMALL_IMAGE}` (busybox, ~1 MB) | {:.0} ms | {:.0} ms |\n\
         | `{LARGE_IMAGE}` (debootstrap + curl, python3, git, ~280 MB) | {:.0} ms | {:.0} ms |\n\n\
         Ratio large / small (medians): **{ratio:.2}** (goal ≤ {IMAGE_RATIO_GOAL:.2}: {verdict})\n",
        o.iterations,
        ms(pct(small, 0.5)),
        ms(pct(small, 0.9)),
        ms(pct(large, 0.5)),
        ms(pct(large, 0.9)),
    )
}

/// Exec round trips: sandbox and host, and the guest kernel release.
struct Execs {
    sandbox: Vec<Duration>,
    host: Vec<Duration>,
    /// Per-spawn cost of `/bin/true` forked, exec'd and waited for by a shell inside the same
    /// guest: one figure per loop run (see [`guest_spawn_cost`]).
    guest_shell: Vec<Duration>,
    /// Each fork + execve + waitpid of `/bin/true` by a small static C program in the same
    /// guest ([`SPAWNLOOP_C`]): the baseline of the guest ratio.
    guest: Vec<Duration>,
    /// The same program with posix_spawn (glibc: clone(CLONE_VM | CLONE_VFORK)) for fork.
    guest_vfork: Vec<Duration>,
    guest_kernel: String,
}

async fn bench_exec(o: &Opts, rootfs: &Path) -> Result<Execs> {
    let sb = Sandbox::start(SandboxSpec::new(RootfsSource::from_path(rootfs)?)).await?;
    let r = async {
        // A few uncounted runs first: the first exec pages `true` and the agent's exec path in.
        for _ in 0..5 {
            sb.output(ExecSpec::new(["true"])).await?;
        }
        let prog = upload_spawnloop(&sb).await?;
        let mut sandbox = Vec::with_capacity(o.execs);
        let (mut guest_shell, mut guest, mut guest_vfork) = (Vec::new(), Vec::new(), Vec::new());
        // Five rounds, each a fifth of the sandbox's execs and then one run of every guest
        // baseline: the machine's drift (other load, its own clock) hits all of them alike,
        // which measuring one after the other did not (the guest baseline's p50 moved by up to
        // 1.6x between runs on 2026-12-07). Each baseline run's first spawn is uncounted.
        const ROUNDS: usize = 5;
        for round in 0..ROUNDS {
            let n = o.execs / ROUNDS + usize::from(round < o.execs % ROUNDS);
            for _ in 0..n {
                let t = Instant::now();
                let out = sb.output(ExecSpec::new(["true"])).await?;
                sandbox.push(t.elapsed());
                if out.status.code != Some(0) {
                    bail!("`true` in the sandbox exited with {:?}", out.status);
                }
            }
            guest.extend(spawnloop(&sb, &prog, "fork").await?);
            guest_vfork.extend(spawnloop(&sb, &prog, "spawn").await?);
            guest_shell.push(guest_spawn_cost(&sb).await?);
        }
        Ok((sandbox, guest_shell, guest, guest_vfork))
    }
    .await;
    let guest_kernel = sb.kernel_release().to_string();
    sb.stop().await?;
    let (sandbox, guest_shell, guest, guest_vfork) = r?;

    // Host baseline: the plain fork+exec+wait a process spawn costs here.
    let mut host = Vec::with_capacity(o.execs);
    for _ in 0..o.execs {
        let t = Instant::now();
        let st = std::process::Command::new("/bin/true")
            .status()
            .context("spawn /bin/true")?;
        host.push(t.elapsed());
        if !st.success() {
            bail!("/bin/true exited with {st}");
        }
    }
    Ok(Execs {
        sandbox,
        host,
        guest_shell,
        guest,
        guest_vfork,
        guest_kernel,
    })
}

/// The in-guest baseline program's source: compiled here, static, and copied into the guest.
const SPAWNLOOP_C: &str = include_str!("spawnloop.c");
/// Spawns per [`spawnloop`] run.
const SPAWNLOOP_N: usize = 100;

/// Compiles [`SPAWNLOOP_C`] with the host's `cc -static` (the guest is the same architecture)
/// and writes it into the sandbox; returns its guest path.
async fn upload_spawnloop(sb: &Sandbox) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("spawnloop.c");
    let bin = dir.path().join("spawnloop");
    std::fs::write(&src, SPAWNLOOP_C)?;
    let st = std::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .context("run cc (the in-guest spawn baseline is a small static C program)")?;
    if !st.success() {
        bail!("cc -static spawnloop.c failed: {st}");
    }
    let bytes = std::fs::read(&bin)?;
    let path = "/tmp/airlock-spawnloop";
    let mut spec = ExecSpec::new(["sh", "-c", &format!("cat > {path} && chmod 755 {path}")]);
    spec.stdin = true;
    let mut e = sb.exec(spec).await?;
    let input = e.input();
    input.write(&bytes).await?;
    input.close().await?;
    loop {
        match e.next().await? {
            Some(airlock_sandbox::ExecEvent::Exit(s)) if s.code == Some(0) => {
                return Ok(path.into())
            }
            Some(airlock_sandbox::ExecEvent::Exit(s)) => bail!("upload spawnloop: {s:?}"),
            Some(airlock_sandbox::ExecEvent::Failed(f)) => bail!("upload spawnloop: {f:?}"),
            Some(_) => {}
            None => bail!("upload spawnloop: no exit status"),
        }
    }
}

/// One run of the baseline program in the guest: [`SPAWNLOOP_N`] spawns of `/bin/true` with
/// `mode` (`fork` or `spawn`), each timed by the guest's monotonic clock; the first (paging
/// the program in) is dropped.
async fn spawnloop(sb: &Sandbox, prog: &str, mode: &str) -> Result<Vec<Duration>> {
    let n = (SPAWNLOOP_N + 1).to_string();
    let out = sb
        .output(ExecSpec::new([prog, n.as_str(), mode, "/bin/true"]))
        .await?;
    if out.status.code != Some(0) {
        bail!(
            "spawnloop {mode} exited with {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Vec<Duration> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse::<u64>().map(Duration::from_nanos))
        .collect::<Result<_, _>>()
        .context("spawnloop output")?;
    if v.len() != SPAWNLOOP_N + 1 {
        bail!(
            "spawnloop printed {} times, not {}",
            v.len(),
            SPAWNLOOP_N + 1
        );
    }
    Ok(v[1..].to_vec())
}

/// The guest's own cost of one fork+exec+wait of `/bin/true`: a busybox shell loop spawning it
/// `N` times against the same loop spawning nothing, both one exec round trip, so the channel's
/// cost cancels out; the difference over `N` is what the guest pays per process.
async fn guest_spawn_cost(sb: &Sandbox) -> Result<Duration> {
    const N: u32 = 100;
    let run = |body: &'static str| {
        let script = format!("i=0; while [ $i -lt {N} ]; do {body}; i=$((i+1)); done");
        async move {
            let t = Instant::now();
            let out = sb.output(ExecSpec::new(["sh", "-c", &script])).await?;
            if out.status.code != Some(0) {
                bail!("guest spawn loop exited with {:?}", out.status);
            }
            Ok::<_, anyhow::Error>(t.elapsed())
        }
    };
    let with = run("/bin/true").await?;
    let without = run(":").await?;
    Ok(with.saturating_sub(without) / N)
}

/// The figures as markdown tables (readable as plain text too, so stdout and the docs agree).
fn tables(o: &Opts, b: &Boot, e: &Execs) -> String {
    let mut s = String::new();
    let boot_ratio = pct(&b.airlock, 0.5).as_secs_f64() / pct(&b.bare, 0.5).as_secs_f64();
    let exec_ratio = ms(pct(&e.sandbox, 0.5)) / ms(pct(&e.host, 0.5));
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let _ = writeln!(
        s,
        "Boot to exit, {} runs each (wall time, spawn to process exit):\n",
        o.iterations
    );
    let _ = writeln!(s, "| | median | p90 |\n|---|---:|---:|");
    for (name, v) in [
        ("bare QEMU, same kernel, /init reboots", &b.bare),
        ("`airlock run -- true`", &b.airlock),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {:.0} ms | {:.0} ms |",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.9))
        );
    }
    let _ = writeln!(
        s,
        "\nRatio airlock / bare (medians): **{boot_ratio:.2}** (goal ≤ {BOOT_RATIO_GOAL:.2}: {})\n",
        verdict(boot_ratio <= BOOT_RATIO_GOAL)
    );
    let _ = writeln!(
        s,
        "Exec round trip, {} sequential runs of `true`:\n",
        o.execs
    );
    let _ = writeln!(s, "| | p50 | p99 |\n|---|---:|---:|");
    for (name, v) in [
        ("`true` in one running sandbox", &e.sandbox),
        (
            "guest: a static C program's fork+execve+waitpid of `/bin/true` (5 runs of 100)",
            &e.guest,
        ),
        (
            "guest: the same with posix_spawn (vfork-style) for fork",
            &e.guest_vfork,
        ),
        (
            "guest: a busybox shell loop's spawn of `/bin/true` (per spawn, 5 loops of 100)",
            &e.guest_shell,
        ),
        ("host: spawn `/bin/true`", &e.host),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {:.2} ms | {:.2} ms |",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99))
        );
    }
    let p50 = ms(pct(&e.sandbox, 0.5));
    let _ = writeln!(
        s,
        "\nSandbox p50: {p50:.2} ms (goal ≤ {EXEC_P50_GOAL_MS:.0} ms: {}); ratio sandbox / host (p50): **{exec_ratio:.1}**",
        verdict(p50 <= EXEC_P50_GOAL_MS)
    );
    let guest_ratio = p50 / ms(pct(&e.guest, 0.5));
    let _ = writeln!(
        s,
        "\nRatio sandbox exec / the guest's own fork+exec+wait by a program (p50): **{guest_ratio:.2}** (goal ≤ {EXEC_GUEST_RATIO_GOAL:.2}: {})",
        verdict(guest_ratio <= EXEC_GUEST_RATIO_GOAL)
    );
    s
}

/// One line of `cmd args` output, or `unknown`.
fn cmd_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The machine the figures came from; without it the figures mean little.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem_gib} RAM, host kernel {}",
        host_kernel.trim()
    )
}

/// One `##` section of docs/benchmarks.md: the measured body (a module's tables) and standing
/// notes that explain the figures. The notes live here, next to the code that measures, so that
/// regenerating the page loses nothing that used to be written by hand.
struct Section {
    title: &'static str,
    body: String,
    notes: &'static str,
}

impl Section {
    fn new(title: &'static str, body: String, notes: &'static str) -> Section {
        // Modules print their own `### Title` line for the --only-* modes; here the section
        // heading replaces it.
        let body = match body.trim_start().strip_prefix("### ") {
            Some(rest) => rest
                .split_once('\n')
                .map(|(_, r)| r)
                .unwrap_or("")
                .to_string(),
            None => body,
        };
        Section { title, body, notes }
    }

    fn markdown(&self) -> String {
        let mut s = format!("## {}\n\n{}\n", self.title, self.body.trim());
        if !self.notes.is_empty() {
            s += &format!("\n{}\n", self.notes.trim());
        }
        s + "\n"
    }
}

const SNAP_NOTES: &str = "\
- Where a warm run's time goes (`AIRLOCK_LOG=debug`, 2026-11-23, load ~9): host preparation \
~25 ms, QEMU spawn + restore + `Init` → `Ready` ~340 ms, the command ~150 ms. The last is TCG \
translating the guest's fork/exec paths and busybox afresh in every new QEMU process (the \
first-exec cost a cold boot pays too): under TCG it bounds the ratio from below; with KVM it \
disappears.
- The restored RAM is a private mapping of the template file, so pages the guest only reads are \
shared by every sandbox from that template: PSS is the fair per-sandbox cost.
- This section alone: `cargo run --release -p airlock-bench -- --only-snap`.";

const NET_NOTES: &str = "\
- The throughput row is one process: the in-process \"guest\" is a second smoltcp stack on the \
other core. MTU is 16 KiB, which halves the per-byte cost in the TCG guest against 1500 \
(measured 2026-11-23: 3 → 37-45 MiB/s downloads once drops were replaced by back-pressure).
- Under TCG the guest's own cost dominates an HTTPS request: OpenSSL parsing a full CA bundle \
(the system roots plus the sandbox CA, which `SSL_CERT_FILE` points at) costs ~1.3 s per curl \
process (2026-11-23). Both sides of the MITM ratio use same-sized bundles, so the ratio is the \
MITM's own cost.
- This section alone: `cargo run --release -p airlock-bench -- --net-only`.";

const PORTS_NOTES: &str = "\
For scale, in the same guest `head -c 64M /dev/zero | cat > /dev/null` (a pipe, no network, no \
Airlock code) took 17 s on a loaded host on 2026-11-23, ~4 MB/s: the emulated guest CPU, not \
the channel, bounds the forward. A 100-byte request costs about one exec round trip, most of it \
the guest's TCP stack and httpd under emulation. This section alone: `scripts/bench --only-ports`.";

const API_NOTES: &str = "\
Three sandboxes up at once, the three calls interleaved per iteration so load drift hits each \
alike; ratios against the in-process Rust API from the same run. The CLI pays for a process \
start plus a socket connect; `rpc` for JSON + base64 and a pipe hop. This section alone: \
`scripts/bench --only-api`.";

const FS_NOTES: &str = "\
Reading: metadata-heavy work (stat of the whole tree, unlink, `git status`) is where virtio-fs \
must beat virtio-9p; creating files gains least, since each create costs a negative LOOKUP, \
CREATE, WRITE, FLUSH and RELEASE round trip through one serving thread. The overlay start-time \
goal says no tree is copied at start. This section alone: `cargo run --release -p airlock-bench \
-- --only-fs --iterations 3 --rootfs $(scripts/mkrootfs-busybox)` (needs `scripts/mkimage-debian` \
for the Debian root).";

/// Host load when the run started: figures from a busy machine read differently.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            let v: Vec<&str> = l.split_whitespace().take(3).collect();
            (v.len() == 3).then(|| v.join(" "))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn docs(
    o: &Opts,
    accel: &AccelChoice,
    qemu: &str,
    e: &Execs,
    load: &str,
    sections: &[Section],
) -> String {
    let date = cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let commit = cmd_line("git", &["describe", "--always", "--dirty"]);
    let body: String = sections.iter().map(Section::markdown).collect();
    format!(
        "# Benchmarks\n\n\
         Generated by `{DOCS_COMMAND}` (every benchmark; `--only-…` flags run one part and leave \
         this page alone); rerun it to refresh this page. Every figure is compared \
         with a baseline measured in the same run on the same machine.\n\n\
         - Date: {date} (commit {commit})\n\
         - Machine: {}\n\
         - Host load average at start (1, 5, 15 min): {load}\n\
         - Accelerator: {} ({})\n\
         - QEMU: {qemu}\n\
         - Guest kernel: {}\n\
         - Iterations: {} boots of each kind, {} execs\n\n\
         {body}\
## Goals\n\n\
         - `airlock run -- true` takes at most {BOOT_RATIO_GOAL:.2}× the time bare QEMU needs to boot \
         the same kernel to a trivial /init and exit (median against median).\n\
         - One exec round trip in a running sandbox takes at most {EXEC_P50_GOAL_MS:.0} ms at the median.\n\
         - One exec round trip costs at most {EXEC_GUEST_RATIO_GOAL:.1}× the same fork+exec+wait done \
         by a program inside the guest (p50 against p50).\n\
         - Starting a large image (Debian with curl, python3, git) takes at most \
         {IMAGE_RATIO_GOAL:.2}× a busybox image: start time must not grow with image size.\n\n\
         ## Method\n\n\
         - Images: `scripts/mkimage-busybox` and `scripts/mkimage-debian` (debootstrap) import them; \
         one uncounted run of each builds their root filesystems (once per image digest), then \
         the two alternate.\n\
         - Bare baseline: `qemu-system-x86_64` with the machine, accelerator, CPU, memory and kernel \
         command line airlock uses (`-M microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=on \
         -nodefaults -no-user-config -no-reboot`, 1 vCPU, 512 MiB), booting the same kernel with an \
         initramfs of busybox-static whose `/init` runs `reboot -f`; `-serial null`, no disks. \
         Timed from spawn to process exit.\n\
         - airlock: `target/release/airlock run --rootfs <demo rootfs> -- true`, from spawn to exit; \
         the demo rootfs is the one `scripts/mkrootfs-busybox` builds. One uncounted warm-up run of \
         each first (it fills airlock's caches and checks the bare guest really reached /init); \
         then the two alternate, so host drift hits both alike.\n\
         - Exec: one sandbox started through the Rust API, 5 uncounted runs, then five rounds, each \
         a fifth of the `true` runs (sequential, each timed from request to exit status) followed \
         by one run of each guest baseline below, so drift hits both sides alike. Host baseline: `/bin/true` spawned \
         and waited for with `std::process::Command`. Guest baseline (the goal's): in the same sandbox, a small \
         static C program (`crates/airlock-bench/src/spawnloop.c`, built with the host's `cc -static` \
         and copied in) doing fork + execve + waitpid of `/bin/true` 100 times, each timed by the \
         guest's monotonic clock, one run per round (first spawn of each uncounted); shown too: the same \
         with posix_spawn, and a busybox shell loop running `/bin/true` 100 times against the same \
         loop running `:` (the earlier baseline: it adds the shell's own per-command work, so it \
         flattered the ratio).\n\
         - Port forward: one sandbox (Rust API) runs busybox `httpd -f -p 80`; \
         `Sandbox::forward_port(127.0.0.1:0, 80)` publishes it; the baseline is busybox httpd on \
         the host serving files of the same sizes. One in-process client (tokio, HTTP/1.0, a new \
         connection per request) alternates between the two after one uncounted download of \
         each; times run from connect to the last byte.\n\
         - Percentiles are nearest-rank (each is a time actually observed).\n\n\
         ## Where the time goes under TCG (measured 2026-11-23, `AIRLOCK_LOG=debug` phase timings)\n\n\
         - Host side before QEMU starts (assets, cached rootfs, sparse scratch copy): ~13 ms.\n\
         - QEMU spawn to the agent's Hello: the kernel boot plus the agent mounting ext4 + overlay; \
         Hello to Ready (hostname, clock): 5-10 ms.\n\
         - The *first* exec in a fresh guest costs ~110 ms against ~15 ms for the next ones: the \
         guest's fork and exec paths and busybox run for the first time, and TCG translates \
         that code on first use (a failing exec first costs ~40 ms, the first busybox exec ~65 ms \
         more). The bare baseline pays part of this too (its /init is a busybox script).\n\
         - Inside the guest, a busybox shell loop spawning `/bin/true` costs ~6.5 ms per process \
         under TCG, so the 5 ms exec goal is out of reach under emulation whatever the channel \
         does; airlock's own share of the round trip (frames over virtio-serial, agent threads) \
         is the rest. With KVM the process spawn is ~100x cheaper.\n\
         - Per warm exec inside the guest (agent trace, TSC clock): parse + user lookup ~1 ms, \
         fork until the child's exec succeeded 5-10 ms, the child (`true`, busybox) 5-8 ms, \
         exit to Exit frame <1 ms (2026-11; since then root commands start by posix_spawn, and \
         `Started` travels with `Exit`: see architecture.md, Per-exec costs in the agent).\n\
         - Cold boot stalls (2026-12-06): the guest lost ~2 s to two 1 s timeouts on the CMOS \
         RTC: the `rtc_cmos` driver's probe, and the wall-clock read at boot spinning on the \
         update-in-progress bit of an absent chip (microvm ran with `rtc=off` once a sandbox had \
         five devices). The kernel now has no RTC driver and the machine always keeps its RTC \
         (`rtc=on`), so neither runs into a timeout: a cold `run -- true` went from ~3.3 s to \
         ~1.1 s.\n\
         - Guest kernel boot (`--kernel-arg printk.time=1 --kernel-arg initcall_debug`, then \
         `dmesg`): the slowest initcalls are pty_init (~80 ms: 256 legacy BSD ptys), \
         virtio_console_init, virtio_blk_init, kswapd_init, chr_dev_init, loop_init (10-30 ms \
         each); 200-300 ms pass between the last initcall and freeing init memory, shared with \
         the bare baseline. Since then legacy ptys are off and loop devices are made on demand (bare boot 1.13 s to 0.94 s).\n\
         - Cold boot against bare, phase by phase (2026-12-07; see the section of that date): \
         the two kernels reach /init alike; the ~300 ms gap is the agent's own work, all guest \
         CPU time under TCG (`/proc/uptime` shows no idle): its start (~50 ms), the ext4 + \
         overlay root and API mounts (~110 ms), `Init` (~45 ms) and the first exec (~70 ms), \
         against the ~75 ms the bare /init spends; the host adds ~30 ms. Next candidates: fewer \
         or cheaper guest steps (the overlay mount, the UUID renewal a host could do on the \
         scratch copy, a smaller agent), not overlap: one vCPU is never idle.\n",
        machine(),
        accel.accel,
        accel.reason,
        e.guest_kernel,
        o.iterations,
        o.execs,
    )
}

/// The demo rootfs: built (or found) by scripts/mkrootfs-busybox, which prints its path.
fn demo_rootfs() -> Result<PathBuf> {
    script_path("scripts/mkrootfs-busybox", &[])
}

/// Runs a repo script that builds (or finds) a cached root and prints its path.
fn script_path(rel: &str, args: &[&str]) -> Result<PathBuf> {
    let script = repo_root().join(rel);
    let out = std::process::Command::new(&script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), out.status);
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let Some(o) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    let rootfs = match &o.rootfs {
        Some(r) => r.clone(),
        None => demo_rootfs()?,
    };
    if o.only_fs {
        let debian = script_path("scripts/mkimage-debian", &["--rootfs-only"])?;
        println!("{}", fsbench::run(o.iterations, &rootfs, &debian).await?);
        return Ok(());
    }
    let accel = airlock_backend::detect_accel(airlock_sandbox::accel_from_env()?);
    let qemu = Qemu::default().version().map_err(anyhow::Error::msg)?;
    eprintln!("accelerator: {} ({}); {qemu}", accel.accel, accel.reason);
    if o.only_api {
        println!("\n{}", api::bench_api(o.execs, &rootfs).await?);
        return Ok(());
    }
    if o.only_snap {
        println!("\n{}", snap::section(o.iterations, &rootfs).await?);
        return Ok(());
    }

    if std::env::args().any(|a| a == "--net-only") {
        println!("{}", net::section(&rootfs).await?);
        return Ok(());
    }
    if o.only_ports {
        let p = ports::bench(o.iterations, &rootfs).await?;
        println!("{}", ports::table(o.iterations, &p));
        return Ok(());
    }
    let load = load_average();
    let boot = bench_boot(&o, accel.accel, &rootfs).await?;
    eprintln!("exec round trips: {}", o.execs);
    let execs = bench_exec(&o, &rootfs).await?;
    if o.only_boot {
        println!("\n{}", tables(&o, &boot, &execs));
        return Ok(());
    }

    let (small, large) = bench_images(&o).await?;
    let (skopeo, first) = bench_first_run(&o).await?;
    eprintln!("port forward");
    let fwd = ports::bench(o.iterations, &rootfs).await?;
    eprintln!("exec round trip by API");
    let api = api::bench_api(o.execs, &rootfs).await?;

    // Every module's section, in page order. A new module adds one line here (and its
    // `--only-*` flag above).
    let sections = vec![
        Section::new(
            "Boot, exec and images",
            tables(&o, &boot, &execs)
                + &image_table(&o, &small, &large)
                + &first_run_table(&o, &skopeo, &first),
            "",
        ),
        Section::new(
            "Warm start from templates",
            snap::section(o.iterations, &rootfs).await?,
            SNAP_NOTES,
        ),
        Section::new(
            "Network (sealed netstack, MITM)",
            net::section(&rootfs).await?,
            NET_NOTES,
        ),
        Section::new(
            "Port forward",
            ports::table(o.iterations, &fwd),
            PORTS_NOTES,
        ),
        Section::new("Exec round trip by API", api, API_NOTES),
        Section::new(
            "Workspace sharing (virtio-fs)",
            fsbench::run(
                o.iterations,
                &rootfs,
                &script_path("scripts/mkimage-debian", &["--rootfs-only"])?,
            )
            .await?,
            FS_NOTES,
        ),
    ];
    let t: String = sections.iter().map(Section::markdown).collect();
    println!("\n{t}");
    if o.write_docs {
        let dir = repo_root().join("docs");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("benchmarks.md");
        std::fs::write(&path, docs(&o, &accel, &qemu, &execs, &load, &sections))
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
