//! The `airlock` command: parses, calls `airlock-sandbox`, prints. Nothing else lives here.
//!
//! Exit codes of `airlock run` follow docker's: the command's own code; 128+N when signal N
//! killed it; 124 when `--timeout` expired; 125 when the sandbox itself failed; 126 when the
//! command cannot be executed; 127 when it was not found.

mod build;
mod detach;
mod doctor;
mod image;
mod launch;
mod mcp;
mod netargs;
mod pool;
mod stats;
mod term;

use std::io::Write;
use std::time::Duration;

use airlock_sandbox::{Error, ExecEvent, ExecSpec, RootfsSource, Sandbox, SandboxSpec, WinSize};
use clap::{Args, Parser, Subcommand};

/// Exit code when the sandbox failed (as docker's 125).
pub const EXIT_SANDBOX_FAILED: i32 = 125;
/// Exit code when `--timeout` expired (as coreutils' timeout).
pub const EXIT_TIMEOUT: i32 = 124;
/// Printed when the guest's OOM killer ended the command (exit code 137 alone does not say why).
pub const OOM_MESSAGE: &str =
    "the command was killed by the guest kernel's out-of-memory killer (give the sandbox more with --memory MB)";

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run untrusted code in disposable microVM sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a fresh sandbox, run a command in it, and remove it.
    Run(Box<RunArgs>),
    /// Say which accelerator would run, where the guest kernel and agent are, and what is missing.
    Doctor,
    /// Print a shell completion script: `source <(airlock completion bash)`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Pull an image from a registry into the local store.
    Pull {
        /// Image reference (`alpine`, `ghcr.io/org/app:1`, `host:5000/name@sha256:…`).
        image: String,
        /// Platform to pick from a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Registry (host or host:port) that may be reached over plain HTTP; loopback always may.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registry: Vec<String>,
    },
    /// Build an image from a Dockerfile: `airlock build -t NAME[:TAG] [-f Dockerfile] DIR`.
    /// Every RUN step runs in a sandbox (sealed network unless --allow-host); unchanged
    /// steps come from the layer cache.
    Build(Box<build::BuildArgs>),
    /// Push a stored image to a registry: `airlock push NAME REGISTRY/REPO[:TAG]`.
    Push {
        /// The local image (as `run --image` names it).
        image: String,
        /// Where to: REGISTRY/REPOSITORY[:TAG].
        target: String,
        /// Registry (host or host:port) that may be reached over plain HTTP; loopback always may.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registry: Vec<String>,
    },
    /// Manage stored images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Snapshot a running sandbox: `airlock snapshot ID NAME` (memory, processes, writable
    /// layer; it keeps running). Start copies with `airlock run --from NAME`. Sandboxes with -v
    /// shares or volumes cannot be snapshotted (vhost-user-fs cannot migrate in QEMU 7.2).
    Snapshot(SnapshotArgs),
    /// Fork a running sandbox: snapshot it and start a detached copy; prints the copy's id.
    Fork {
        /// Sandbox id (or a unique prefix).
        id: String,
    },
    /// Manage warm-start templates (saved guests later sandboxes restore instead of booting).
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Manage named volumes (persistent ext4 disks for `run -v NAME:/path`).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Warm pools: sandboxes kept restored and paused by a long-lived holder (`pool start`,
    /// or `airlock mcp --pool N`), so a `run` of that shape is a claim, not a boot.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Run a command in a running sandbox (started with `run -d`).
    Exec(ExecArgs),
    /// List sandboxes started with `run -d`.
    #[command(visible_alias = "ps")]
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Also stopped and dead sandboxes.
        #[arg(short = 'a', long)]
        all: bool,
        /// Only sandboxes matching all filters: `label=K`, `label=K=V`, `name=NAME`,
        /// `status=running|exited|dead` (a status filter implies -a).
        #[arg(short = 'f', long = "filter", value_name = "FILTER", value_parser = detach::Filter::parse)]
        filters: Vec<detach::Filter>,
    },
    /// Show a sandbox's settings and state (secret names and hosts, never values).
    Inspect {
        /// Sandbox id (or a unique prefix).
        id: String,
    },
    /// Print the output of a detached sandbox's command.
    Logs {
        /// Keep printing until the sandbox stops.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Sandbox id.
        id: String,
    },
    /// Block until detached sandboxes' commands end; print each one's exit code.
    Wait {
        /// Sandbox ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Stop a running sandbox at once (its record stays until rm or prune).
    Kill {
        /// Sandbox id.
        id: String,
    },
    /// Stop running sandboxes gracefully: their processes get SIGTERM, then SIGKILL after the
    /// timeout; disks are synced. The writable layer stays for `start`.
    Stop {
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(short = 't', long = "time", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=600))]
        time: u64,
        /// Sandbox ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Live CPU, memory and network use of running sandboxes (every running one without ids).
    Stats {
        /// Print one sample and exit.
        #[arg(long)]
        no_stream: bool,
        /// JSON: one array of `{id, name, cpu_percent, memory_bytes, memory_limit_bytes,
        /// net_rx_bytes, net_tx_bytes, ...}` per sample.
        #[arg(long)]
        json: bool,
        /// Sandbox ids or names.
        ids: Vec<String>,
    },
    /// Start stopped sandboxes again, on the writable layer they had, with the settings they
    /// were run with (the command runs again). Secrets are read again from this environment.
    Start {
        /// Sandbox ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Restart sandboxes: stop (as `stop`) if running, then start (as `start`) on the same
    /// writable layer, name and settings.
    Restart {
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(short = 't', long = "time", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=600))]
        time: u64,
        /// Sandbox ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Rename a sandbox, running or not: `airlock rename ID NEW_NAME`.
    Rename {
        /// Sandbox id or name.
        id: String,
        /// The new name (unique, as `run --name`).
        new_name: String,
    },
    /// Remove stopped sandboxes.
    Rm {
        /// Stop running ones first.
        #[arg(short = 'f', long)]
        force: bool,
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove every stopped or dead sandbox.
    Prune,
    /// Forward host ports to guest ports for the sandbox's lifetime.
    PortForward {
        /// Sandbox id.
        id: String,
        /// `[ADDR:]HOST_PORT:GUEST_PORT` (ADDR default 127.0.0.1; HOST_PORT 0 picks one).
        #[arg(required = true, value_name = "[ADDR:]HOST:GUEST")]
        specs: Vec<String>,
    },
    /// Change a running sandbox's network allow-list.
    #[command(subcommand)]
    AllowList(AllowListCmd),
    /// List what a running sandbox changed in its overlay workspace shares
    /// (`A` added, `C` changed, `D` deleted).
    Diff {
        /// JSON output (`[{kind, path}]`).
        #[arg(long)]
        json: bool,
        /// Sandbox id (or a unique prefix).
        id: String,
    },
    /// Show the processes running in a sandbox (all but the guest agent and kernel threads).
    Top {
        /// JSON output (`[{pid, ppid, uid, state, rss_kib, cpu_ms, started_ms, command}]`).
        #[arg(long)]
        json: bool,
        /// Sandbox id or name.
        id: String,
    },
    /// Copy a file or tree out of a running sandbox to a new host path (never overwrites; at
    /// most 1 GiB; only regular files and directories are written), or into it from the host.
    Cp {
        /// `ID:/guest/path` (copy out), or a host path (copy in).
        #[arg(value_name = "SRC")]
        src: String,
        /// A new host path (copy out), or `ID:/guest/path` (copy in: into it when it is a
        /// directory, else as it).
        #[arg(value_name = "DEST")]
        dest: String,
    },
    /// JSON-RPC 2.0 over stdio, newline-delimited (matchlock-compatible API).
    Rpc,
    /// Model Context Protocol server over stdio: tools to create sandboxes, exec, read / write /
    /// list files and destroy them (secrets by name from this environment). Every sandbox it
    /// created is killed when the client disconnects.
    Mcp {
        /// Keep N sandboxes restored and paused for each image/CPU/memory shape once it was
        /// created (a create is then a claim from that pool; `create_sandbox` with shares
        /// always starts its own). 0: no pool.
        #[arg(long, value_name = "N", default_value_t = 0,
              value_parser = clap::value_parser!(u16).range(0..=64))]
        pool: u16,
    },
    /// Internal: the supervisor of a detached sandbox.
    #[command(name = "__supervise", hide = true)]
    Supervise,
}

#[derive(Subcommand)]
enum AllowListCmd {
    /// Allow more hosts.
    Add {
        /// Sandbox id.
        id: String,
        /// Allow rules (`host`, `*.domain`, `host:port`, IP, CIDR).
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Remove allow rules.
    Rm {
        /// Sandbox id.
        id: String,
        /// Rules to remove.
        #[arg(required = true)]
        hosts: Vec<String>,
    },
}

#[derive(Args)]
struct ExecArgs {
    /// Keep stdin open and forward it.
    #[arg(short = 'i', long = "interactive")]
    interactive: bool,
    /// Allocate a terminal.
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Working directory.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Environment variable K=V (or K from this environment).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Sandbox id (or a unique prefix).
    id: String,
    /// Command and arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create an empty volume (sparse: it uses host disk only as it fills).
    Create {
        /// Volume name.
        name: String,
        /// Size in MB.
        #[arg(long, value_name = "MB", default_value_t = airlock_sandbox::shares::DEFAULT_VOLUME_MIB)]
        size: u64,
    },
    /// List volumes.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume and its data (refused while a sandbox uses it).
    Rm {
        /// Volume name.
        name: String,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List stored images.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove images (their blobs go with the next gc).
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Delete blobs no image references.
    Gc,
    /// Import a `docker save` or OCI-layout tarball, from FILE or stdin.
    Import {
        /// Name to store it under.
        tag: String,
        /// Tarball (default or `-`: stdin).
        file: Option<std::path::PathBuf>,
    },
}

#[derive(Args)]
struct SnapshotArgs {
    /// List snapshots.
    #[arg(long, conflicts_with_all = ["rm", "id"])]
    ls: bool,
    /// Remove snapshot NAME.
    #[arg(long, value_name = "NAME", conflicts_with = "id")]
    rm: Option<String>,
    /// Sandbox id (or a unique prefix) of a running `run -d` sandbox.
    #[arg(required_unless_present_any = ["ls", "rm"], requires = "name")]
    id: Option<String>,
    /// Name for the snapshot.
    name: Option<String>,
}

#[derive(Subcommand)]
enum PoolCmd {
    /// List the pools of running holders: size, ready, filling, claims, misses, idle memory.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Start a pool holder in the background; prints its pid once its first sandbox is
    /// ready. `airlock run` of the same image, --cpus, --memory, --disk-size, --privileged and
    /// network on/off then takes a ready sandbox (its own network policy, secrets and a fresh
    /// identity are applied at the claim) and the holder refills.
    Start(PoolArgs),
    /// Hold a pool in the foreground (what `pool start` runs); SIGTERM or Ctrl-C ends it.
    Serve(PoolArgs),
    /// Stop pool holders (by pid, as `pool ls` shows): their ready sandboxes go at once,
    /// claimed ones run to their end.
    Rm {
        /// Every holder started by `pool start`.
        #[arg(long, conflicts_with = "pids")]
        all: bool,
        #[arg(value_name = "PID", required_unless_present = "all")]
        pids: Vec<u32>,
    },
}

#[derive(Args, Clone)]
struct PoolArgs {
    /// Sandboxes to keep ready.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=airlock_sandbox::MAX_POOL as i64))]
    size: u16,
    /// OCI image the pool's sandboxes run (pulled first if missing).
    #[arg(
        long,
        value_name = "IMAGE",
        conflicts_with = "rootfs",
        required_unless_present = "rootfs"
    )]
    image: Option<String>,
    /// Root filesystem instead of an image: a directory or an ext4 image file.
    #[arg(long, value_name = "PATH")]
    rootfs: Option<std::path::PathBuf>,
    /// Platform to pull (with --image).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Registry that may be reached over plain HTTP when pulling; loopback always may.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registry: Vec<String>,
    #[command(flatten)]
    vm: VmArgs,
    /// For `run --no-network` sandboxes.
    #[arg(long = "no-network")]
    no_network: bool,
    #[arg(long = "kernel-arg", value_name = "ARG", hide = true)]
    kernel_args: Vec<String>,
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// List templates: key, inputs, disk use, and whether their inputs still exist.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove templates by key (or unique key prefix).
    Rm {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Remove templates whose kernel, agent, image or QEMU changed or is gone.
    Gc,
}

/// The VM's shape, shared by `run` and `pool start`: a pool serves the runs whose shape
/// (and root) is its own.
#[derive(Args, Clone)]
struct VmArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = airlock_sandbox::DEFAULT_CPUS, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MB", default_value_t = airlock_sandbox::DEFAULT_MEMORY_MIB, value_parser = clap::value_parser!(u32).range(64..=1048576))]
    memory: u32,
    /// Size of the sandbox's writable layer in MiB (sparse: only what is written uses disk).
    #[arg(long = "disk-size", value_name = "MB", default_value_t = airlock_sandbox::DEFAULT_DISK_MIB, value_parser = clap::value_parser!(u64).range(64..=16 * 1024 * 1024))]
    disk_size: u64,
    /// Force an accelerator: kvm or tcg (default: detect; also AIRLOCK_ACCEL).
    #[arg(long)]
    accel: Option<airlock_backend::Accel>,
    /// Give commands every capability and let setuid binaries raise privileges. By default
    /// they run with no_new_privs and without CAP_SYS_MODULE, CAP_SYS_RAWIO and CAP_SYS_BOOT.
    #[arg(long)]
    privileged: bool,
    /// Extra guest kernel command-line word (diagnostics, e.g. `printk.time=1 loglevel=7`).
    #[arg(long = "kernel-arg", value_name = "ARG", hide = true)]
    kernel_args: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    /// OCI image to run (pulled on first use); its Entrypoint, Cmd, Env, WorkingDir and User
    /// apply unless overridden.
    #[arg(
        long,
        value_name = "IMAGE",
        conflicts_with_all = ["rootfs", "from"],
        required_unless_present_any = ["rootfs", "from"]
    )]
    image: Option<String>,
    /// Start from a snapshot (`airlock snapshot ID NAME`) instead of an image: its memory,
    /// processes and files, with a new identity (id, hostname, machine-id, RNG, network, CA).
    #[arg(long, value_name = "NAME", conflicts_with = "rootfs")]
    from: Option<String>,
    /// Root filesystem instead of an image: a directory or an ext4 image file.
    #[arg(long, value_name = "PATH")]
    rootfs: Option<std::path::PathBuf>,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Platform to pull (with --image).
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Registry that may be reached over plain HTTP when pulling; loopback always may.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// Set an environment variable (K=V), or pass K from this environment.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Read environment variables from a file: one K=V (or K) per line, `#` comments; -e wins.
    #[arg(long = "env-file", value_name = "FILE")]
    env_files: Vec<std::path::PathBuf>,
    /// Working directory inside the sandbox (created if missing).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User inside the sandbox: name, uid, name:group or uid:gid.
    #[arg(short = 'u', long = "user", value_name = "USER")]
    user: Option<String>,
    /// Keep stdin open and forward it to the command.
    #[arg(short = 'i', long = "interactive")]
    interactive: bool,
    /// Allocate a terminal for the command.
    #[arg(short = 't', long = "tty")]
    tty: bool,
    /// Most MB the guest may add to each `:rw` share (it gets ENOSPC beyond; its `df` shows
    /// this as the share's size).
    #[arg(long = "share-quota", value_name = "MB", default_value_t = airlock_sandbox::DEFAULT_SHARE_QUOTA_MIB, value_parser = clap::value_parser!(u64).range(1..=1 << 40))]
    share_quota: u64,
    /// Kill the command after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Hostname inside the sandbox (default: the sandbox id).
    #[arg(long)]
    hostname: Option<String>,
    /// Publish a sandbox port on the host: [ADDR:]HOST:GUEST (ADDR defaults to 127.0.0.1;
    /// HOST 0 picks a free port). Carried over the control channel, so it works with any
    /// guest network policy. Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "[ADDR:]HOST:GUEST", value_parser = parse_publish)]
    publish: Vec<Publish>,
    /// Share a host directory or mount a volume: HOSTDIR:GUESTPATH (overlay: the guest may
    /// write, the host tree stays untouched), HOSTDIR:GUESTPATH:rw (live), HOSTDIR:GUESTPATH:ro,
    /// or VOLUME:GUESTPATH.
    #[arg(short = 'v', long = "volume", value_name = "SRC:DEST[:MODE]", value_parser = checked_mount)]
    volumes: Vec<String>,
    /// File rule for shares, enforced on the host: 'deny|audit OPS GLOB', e.g.
    /// 'deny write,create,remove /workspace/.git/hooks/**'. Denials and audited operations
    /// are reported on stderr.
    #[arg(long = "fs-rule", value_name = "RULE", value_parser = checked_rule)]
    fs_rules: Vec<String>,
    /// Boot the guest instead of restoring it from a warm-start template. By default the first
    /// sandbox of a given kernel, agent, image, --cpus, --memory, --disk-size and network
    /// leaves a template and later ones restore it (tens of ms instead of a boot). Sandboxes
    /// with -v shares or volumes always boot: vhost-user-fs cannot migrate in QEMU 7.2.
    #[arg(long)]
    cold: bool,
    /// Start in the background: print the sandbox id and return (see exec, ls, kill).
    #[arg(short = 'd', long = "detach", conflicts_with_all = ["interactive", "tty", "timeout"])]
    detach: bool,
    /// With -d: a label (`ls --filter label=K[=V]` selects by it).
    #[arg(long = "label", value_name = "K=V", requires = "detach", value_parser = detach::parse_label)]
    labels: Vec<(String, String)>,
    /// With -d: a unique name that exec, logs, kill, rm and inspect accept in place of the id.
    #[arg(long, value_name = "NAME", requires = "detach", value_parser = detach::check_name)]
    name: Option<String>,
    /// With -d: remove the sandbox's record when it stops (without it the record stays for
    /// `start`, `logs` and `wait` until `airlock rm`). A foreground sandbox is always removed
    /// when its command ends; there the flag is accepted for docker's sake.
    #[arg(long = "rm")]
    rm: bool,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    net: netargs::NetArgs,
    /// Command and arguments (default with --image: the image's Entrypoint and Cmd; with -d:
    /// none, the sandbox idles until killed).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn main() {
    let filter = std::env::var("AIRLOCK_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| {
                eprintln!("airlock: cannot start runtime: {e}");
                std::process::exit(EXIT_SANDBOX_FAILED);
            })
    };
    let done = |r: Result<(), String>| match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("airlock: {e}");
            1
        }
    };
    let code = match cli.cmd {
        Cmd::Doctor => doctor::run(),
        Cmd::Pull {
            image,
            platform,
            insecure_registry,
        } => done(
            runtime()
                .block_on(image::pull(&image, Some(&platform), &insecure_registry))
                .map(|rec| println!("{}\n{}", rec.reference, rec.manifest_digest)),
        ),
        Cmd::Build(a) => done(runtime().block_on(build::build(*a))),
        Cmd::Push {
            image,
            target,
            insecure_registry,
        } => done(runtime().block_on(build::push(&image, &target, &insecure_registry))),
        Cmd::Image(ImageCmd::Ls { json }) => done(image::ls(json)),
        Cmd::Image(ImageCmd::Rm { images }) => done(image::rm(&images)),
        Cmd::Image(ImageCmd::Gc) => done(image::gc()),
        Cmd::Image(ImageCmd::Import { tag, file }) => done(
            image::import(&tag, file.as_deref())
                .map(|rec| println!("{}\n{}", rec.reference, rec.manifest_digest)),
        ),
        Cmd::Run(a) if a.detach => match detach_request(*a) {
            Ok(req) => detach::run_detached(req),
            Err(e) => {
                eprintln!("airlock: {e}");
                EXIT_SANDBOX_FAILED
            }
        },
        Cmd::Run(a) => runtime().block_on(run(*a)),
        Cmd::Volume(v) => done(volume(v)),
        Cmd::Template(t) => done(template_cmd(t)),
        Cmd::Pool(PoolCmd::Ls { json }) => done(pool::ls(json)),
        Cmd::Pool(PoolCmd::Serve(a)) => done(runtime().block_on(async move {
            let size = a.size.into();
            pool::serve(pool_shape(&a).await?, size).await
        })),
        Cmd::Pool(PoolCmd::Start(a)) => done(runtime().block_on(async move {
            // Resolved (and pulled) here, with progress on this terminal.
            pool_shape(&a).await?;
            pool::start_detached().await
        })),
        Cmd::Pool(PoolCmd::Rm { all, pids }) => done(runtime().block_on(pool::rm(all, &pids))),
        Cmd::Snapshot(s) => done(runtime().block_on(snapshot_cmd(s))),
        Cmd::Fork { id } => done(runtime().block_on(fork(&id))),
        Cmd::Exec(a) => match parse_env(&a.env) {
            Ok(env) => runtime().block_on(detach::exec(detach::ExecOpts {
                id: a.id,
                interactive: a.interactive,
                tty: a.tty,
                workdir: a.workdir,
                user: a.user,
                env,
                cmd: a.cmd,
            })),
            Err(e) => {
                eprintln!("airlock: {e}");
                EXIT_SANDBOX_FAILED
            }
        },
        Cmd::Ls { json, all, filters } => done(detach::ls(json, all, &filters)),
        Cmd::Inspect { id } => done(runtime().block_on(detach::inspect(&id))),
        Cmd::Logs { follow, id } => done(runtime().block_on(detach::logs(&id, follow))),
        Cmd::Kill { id } => done(runtime().block_on(detach::kill(&id))),
        Cmd::Stop { time, ids } => {
            done(runtime().block_on(detach::stop(&ids, std::time::Duration::from_secs(time))))
        }
        Cmd::Start { ids } => done(detach::start(&ids)),
        Cmd::Restart { time, ids } => {
            done(runtime().block_on(detach::restart(&ids, std::time::Duration::from_secs(time))))
        }
        Cmd::Rename { id, new_name } => done(detach::rename(&id, &new_name)),
        Cmd::Stats {
            no_stream,
            json,
            ids,
        } => done(runtime().block_on(stats::stats(&ids, no_stream, json))),
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            // Into memory first: the generator panics on a closed stdout (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "airlock", &mut script);
            use std::io::Write;
            let _ = std::io::stdout().write_all(&script);
            0
        }
        Cmd::Wait { ids } => done(runtime().block_on(detach::wait(&ids))),
        Cmd::Rm { force, ids } => done(runtime().block_on(detach::rm(&ids, force))),
        Cmd::Prune => done(detach::prune()),
        Cmd::PortForward { id, specs } => {
            done(runtime().block_on(detach::port_forward(&id, &specs)))
        }
        Cmd::AllowList(AllowListCmd::Add { id, hosts }) => {
            done(runtime().block_on(detach::allow_list(&id, true, &hosts)))
        }
        Cmd::AllowList(AllowListCmd::Rm { id, hosts }) => {
            done(runtime().block_on(detach::allow_list(&id, false, &hosts)))
        }
        Cmd::Diff { json, id } => done(runtime().block_on(detach::diff(&id, json))),
        Cmd::Top { json, id } => done(runtime().block_on(detach::top(&id, json))),
        Cmd::Cp { src, dest }
            if detach::parse_cp_source(&src).is_err() && detach::parse_cp_source(&dest).is_ok() =>
        {
            done(runtime().block_on(detach::cp_in(&src, &dest)))
        }
        Cmd::Cp { src, dest } => done(runtime().block_on(detach::cp(&src, &dest))),
        Cmd::Rpc => runtime().block_on(launch::rpc()),
        Cmd::Mcp { pool } => runtime().block_on(mcp::serve(pool.into())),
        Cmd::Supervise => runtime().block_on(detach::supervise()),
    };
    std::process::exit(code);
}

/// One `-p [ADDR:]HOST:GUEST`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Publish {
    bind: std::net::SocketAddr,
    guest: u16,
}

/// Checks a `-v` argument, keeping its text (a detached supervisor receives it as is).
fn checked_mount(v: &str) -> Result<String, String> {
    v.parse::<airlock_sandbox::Mount>().map(|_| v.to_string())
}

/// Checks a `--fs-rule` argument, keeping its text.
fn checked_rule(v: &str) -> Result<String, String> {
    v.parse::<airlock_sandbox::FsRule>()
        .map(|_| v.to_string())
        .map_err(|e| e.to_string())
}

fn parse_publish(v: &str) -> Result<Publish, String> {
    const FORM: &str =
        "use [ADDR:]HOST:GUEST, e.g. 8080:80, 0:80 (any free host port) or 0.0.0.0:8080:80";
    let port = |p: &str, what: &str, zero_ok: bool| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) if !zero_ok => Err(format!(
                "{what} port 0 is not a port: give 1-65535 ({FORM})"
            )),
            Ok(n) => Ok(n),
            Err(_) => Err(format!(
                "{what} port {p:?} is not a number from {}-65535 ({FORM})",
                u8::from(!zero_ok)
            )),
        }
    };
    let (rest, guest) = v.rsplit_once(':').ok_or_else(|| format!("{v:?}: {FORM}"))?;
    let guest = port(guest, "guest", false)?;
    let (addr, host) = match rest.rsplit_once(':') {
        Some((a, h)) => (a, h),
        None => ("127.0.0.1", rest),
    };
    let host = port(host, "host", true)?;
    let addr = addr
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr);
    let ip: std::net::IpAddr = addr.parse().map_err(|_| {
        format!("{addr:?} is not an IP address to listen on ({FORM}; IPv6 as [::1]:8080:80)")
    })?;
    Ok(Publish {
        bind: std::net::SocketAddr::new(ip, host),
        guest,
    })
}

/// Binds every `-p` listener before the sandbox boots, so a port in use fails at once.
fn bind_published(publish: &[Publish]) -> Result<Vec<(std::net::TcpListener, u16)>, String> {
    publish
        .iter()
        .map(|p| {
            let l = std::net::TcpListener::bind(p.bind).map_err(|e| match e.kind() {
                std::io::ErrorKind::AddrInUse => format!(
                    "-p: {} is already in use on the host: pick another host port, or 0 for any free one",
                    p.bind
                ),
                std::io::ErrorKind::AddrNotAvailable => format!(
                    "-p: {} is not an address of this host: use 127.0.0.1 or 0.0.0.0",
                    p.bind.ip()
                ),
                std::io::ErrorKind::PermissionDenied => format!(
                    "-p: not allowed to listen on {} (ports below 1024 need privileges): pick a port above 1023",
                    p.bind
                ),
                _ => format!("-p: cannot listen on {}: {e}", p.bind),
            })?;
            Ok((l, p.guest))
        })
        .collect()
}

fn parse_env(items: &[String]) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some(("", _)) => Err(format!("-e {kv:?}: empty variable name")),
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Ok((kv.clone(), std::env::var(kv).unwrap_or_default())),
        })
        .collect()
}

/// `--env-file` lines (docker's format: `K=V`, or `K` to pass this environment's value; blank
/// lines and `#` comments skipped), then `-e`, which wins.
fn run_env(a: &RunArgs) -> Result<Vec<(String, String)>, String> {
    let mut items = Vec::new();
    for f in &a.env_files {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("--env-file {}: {e}", f.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('=') {
                return Err(format!(
                    "--env-file {}:{}: a line needs a variable name before '='",
                    f.display(),
                    n + 1
                ));
            }
            items.push(line.to_string());
        }
    }
    items.extend(a.env.iter().cloned());
    parse_env(&items)
}

async fn run(a: RunArgs) -> i32 {
    let env = match run_env(&a) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("airlock: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    if let Some(t) = a.timeout {
        if !(t > 0.0 && t.is_finite()) {
            eprintln!("airlock: --timeout must be a positive number of seconds");
            return EXIT_SANDBOX_FAILED;
        }
    }
    // Checked before the image is resolved or pulled: a bad rule costs nothing.
    let network = match a.net.to_spec() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("airlock: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    let (rootfs, argv, image_env, image_cwd, image_user) = match resolve_root(&a).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airlock: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    let env: Vec<(String, String)> = image_env.into_iter().chain(env).collect();
    let mut spec = SandboxSpec::new(rootfs);
    a.vm.apply(&mut spec);
    spec.hostname = a.hostname.clone();
    spec.cold = a.cold;
    spec.from_snapshot = a.from.clone();
    spec.network = network;
    let listeners = match bind_published(&a.publish) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("airlock: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    let user = a.user.clone().or(image_user);
    spec.share_quota_mib = a.share_quota;
    if let Err(e) = launch::apply_mounts(&mut spec, &a.volumes, &a.fs_rules) {
        eprintln!("airlock: {e}");
        return EXIT_SANDBOX_FAILED;
    }
    if !spec.shares.is_empty() {
        spec.share_owner = launch::share_owner(user.as_deref(), a.rootfs.as_deref());
    }
    if !a.fs_rules.is_empty() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<airlock_sandbox::FsEvent>(1024);
        spec.fs_events = Some(tx);
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                let verdict = if e.denied { "denied" } else { "audit" };
                eprintln!("airlock: file rule: {verdict} {} {}", e.op, e.path);
            }
        });
    }
    let has_volumes = !spec.volumes.is_empty();

    // Signals that arrive while booting must not kill airlock before it can clean up.
    let mut signals = match term::Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("airlock: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    let sb = tokio::select! {
        r = pool::start(spec) => match r {
            Ok(sb) => sb,
            Err(e) => {
                eprintln!("airlock: {e}");
                return EXIT_SANDBOX_FAILED;
            }
        },
        s = signals.next_terminating() => return 128 + s,
    };
    let mut forwards = Vec::new();
    for ((listener, guest), p) in listeners.into_iter().zip(&a.publish) {
        match sb.forward_listener(listener, guest) {
            Ok(f) => {
                if p.bind.port() == 0 {
                    eprintln!(
                        "airlock: publishing {} -> sandbox port {guest}",
                        f.local_addr()
                    );
                }
                forwards.push(f);
            }
            Err(e) => {
                eprintln!("airlock: -p {}:{guest}: {e}", p.bind);
                return EXIT_SANDBOX_FAILED;
            }
        }
    }

    let tty = a
        .tty
        .then(term::local_size)
        .map(|s| s.unwrap_or(WinSize { rows: 24, cols: 80 }));
    let mut spec = ExecSpec::new(argv);
    spec.env = env;
    spec.cwd = a.workdir.clone().or(image_cwd);
    spec.user = user;
    spec.tty = tty;
    spec.stdin = a.interactive;
    let code = run_command(&sb, spec, a.interactive, a.timeout, &mut signals).await;
    // The sandbox is thrown away with its writable layer, so there is nothing to flush:
    // killing the VM (what dropping it does) is faster than a guest shutdown. Volumes outlive
    // it, so then the guest shuts down cleanly (disks synced).
    drop(forwards);
    if has_volumes {
        let _ = sb.stop().await;
    } else {
        drop(sb);
    }
    tracing::debug!(code, "sandbox removed");
    code
}

impl VmArgs {
    fn apply(&self, spec: &mut SandboxSpec) {
        spec.cpus = self.cpus;
        spec.memory_mib = self.memory;
        spec.disk_mib = self.disk_size;
        spec.accel = self.accel;
        spec.privileged = self.privileged;
        spec.kernel_args = self.kernel_args.clone();
    }
}

/// The sandbox shape a pool holds (`pool start`/`serve` flags).
async fn pool_shape(a: &PoolArgs) -> Result<SandboxSpec, String> {
    let rootfs = match (&a.rootfs, &a.image) {
        (Some(p), _) => RootfsSource::from_path(p).map_err(|e| e.to_string())?,
        (None, Some(name)) => {
            let (store, rec) =
                image::resolve_or_pull(name, &a.platform, &a.insecure_registry).await?;
            RootfsSource::Oci {
                store: store.root().to_path_buf(),
                image: Box::new(rec),
            }
        }
        (None, None) => return Err("give --image IMAGE or --rootfs PATH".into()),
    };
    let mut spec = SandboxSpec::new(rootfs);
    a.vm.apply(&mut spec);
    spec.network.disabled = a.no_network;
    Ok(spec)
}

fn volume(cmd: VolumeCmd) -> Result<(), String> {
    use airlock_sandbox::shares;
    match cmd {
        VolumeCmd::Create { name, size } => {
            let v = shares::volume_create(&name, size).map_err(|e| e.to_string())?;
            println!("{}", v.name);
        }
        VolumeCmd::Ls { json } => {
            let list = shares::volume_list().map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?
                );
            } else {
                println!("{:<24} {:>10} {:>10} IN_USE", "NAME", "SIZE_MB", "USED_MB");
                for v in list {
                    println!(
                        "{:<24} {:>10} {:>10} {}",
                        v.name,
                        v.size_mib,
                        v.used_bytes >> 20,
                        if v.in_use { "yes" } else { "no" }
                    );
                }
            }
        }
        VolumeCmd::Rm { name } => shares::volume_remove(&name).map_err(|e| e.to_string())?,
    }
    Ok(())
}

/// What `run -d` hands its supervisor (the image is pulled here, with progress on this terminal).
/// The supervisor's request, and the `-p` forwards (as `port-forward` takes them) to set up
/// once the sandbox runs.
fn detach_request(a: RunArgs) -> Result<detach::SuperviseRequest, String> {
    let env = run_env(&a)?;
    // A port in use fails before anything boots (the supervisor binds it again later).
    drop(bind_published(&a.publish)?);
    let publish: Vec<String> = a
        .publish
        .iter()
        .map(|p| match p.bind.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]:{}:{}", p.bind.port(), p.guest),
            ip => format!("{ip}:{}:{}", p.bind.port(), p.guest),
        })
        .collect();
    let net = a.net.to_spec()?;
    let launch = launch::Launch {
        image: a.image.clone(),
        rootfs: a.rootfs.clone(),
        platform: Some(a.platform.clone()),
        insecure_registry: a.insecure_registry.clone(),
        cpus: a.vm.cpus,
        memory_mib: a.vm.memory,
        disk_mib: a.vm.disk_size,
        accel: a.vm.accel.map(|x| x.to_string()),
        hostname: a.hostname.clone(),
        kernel_args: a.vm.kernel_args.clone(),
        cold: a.cold,
        from: a.from.clone(),
        net,
        mounts: a.volumes.clone(),
        fs_rules: a.fs_rules.clone(),
        share_quota_mib: Some(a.share_quota),
        privileged: a.vm.privileged,
    };
    let (mut image_env, mut cwd, mut user) = (Vec::new(), None, None);
    if let Some(name) = &a.image {
        // Pull now, in the foreground; the supervisor then finds it in the store.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (_, _, e, c, u) = rt.block_on(resolve_root(&RunArgs {
            cmd: vec!["true".into()],
            ..a.clone_for_resolve()
        }))?;
        (image_env, cwd, user) = (e, c, u);
        let _ = name;
    }
    let env: Vec<(String, String)> = image_env.into_iter().chain(env).collect();
    Ok(detach::SuperviseRequest {
        launch,
        cmd: a.cmd.clone(),
        env,
        workdir: a.workdir.clone().or(cwd),
        user: a.user.clone().or(user),
        source: a
            .image
            .clone()
            .or_else(|| a.rootfs.as_ref().map(|p| p.display().to_string()))
            .or_else(|| a.from.as_ref().map(|n| format!("snapshot:{n}")))
            .unwrap_or_default(),
        name: a.name.clone(),
        labels: a.labels.clone(),
        publish,
        rm: a.rm,
        restart: None,
    })
}

impl RunArgs {
    /// The fields `resolve_root` reads.
    fn clone_for_resolve(&self) -> RunArgs {
        RunArgs {
            image: self.image.clone(),
            rootfs: self.rootfs.clone(),
            from: self.from.clone(),
            entrypoint: self.entrypoint.clone(),
            platform: self.platform.clone(),
            insecure_registry: self.insecure_registry.clone(),
            env: Vec::new(),
            env_files: Vec::new(),
            workdir: None,
            user: None,
            interactive: false,
            tty: false,
            vm: VmArgs {
                privileged: false,
                kernel_args: Vec::new(),
                ..self.vm.clone()
            },
            share_quota: self.share_quota,
            timeout: None,
            hostname: None,
            cold: self.cold,
            detach: true,
            name: None,
            labels: Vec::new(),
            rm: false,
            net: netargs::NetArgs::default(),
            publish: Vec::new(),
            volumes: Vec::new(),
            fs_rules: Vec::new(),
            cmd: Vec::new(),
        }
    }
}

type Root = (
    RootfsSource,
    Vec<String>,
    Vec<(String, String)>,
    Option<String>,
    Option<String>,
);

/// The root filesystem and the command's defaults: from `--rootfs`, or from `--image`
/// (pulled if it is not in the store yet).
async fn resolve_root(a: &RunArgs) -> Result<Root, String> {
    if let Some(name) = &a.from {
        if a.cmd.is_empty() && !a.detach {
            return Err(format!(
                "no command given: airlock run --from {name} -- CMD [ARG...]"
            ));
        }
        // The root comes from the snapshot; this placeholder is never opened.
        return Ok((
            RootfsSource::Dir("/".into()),
            a.cmd.clone(),
            Vec::new(),
            None,
            None,
        ));
    }
    if let Some(path) = &a.rootfs {
        if a.cmd.is_empty() {
            return Err("no command given: airlock run --rootfs PATH -- CMD [ARG...]".into());
        }
        let r = RootfsSource::from_path(path).map_err(|e| e.to_string())?;
        return Ok((r, a.cmd.clone(), Vec::new(), None, None));
    }
    let name = a.image.as_deref().unwrap_or_default();
    let (store, rec) = image::resolve_or_pull(name, &a.platform, &a.insecure_registry).await?;
    let config = store.image_config(&rec).map_err(|e| e.to_string())?;
    let argv = airlock_sandbox::imagefs::command(&config, a.entrypoint.as_deref(), &a.cmd);
    if argv.is_empty() {
        return Err(format!(
            "{name} has no Entrypoint or Cmd: give a command after --"
        ));
    }
    let root = RootfsSource::Oci {
        store: store.root().to_path_buf(),
        image: Box::new(rec),
    };
    let cwd = config
        .working_dir()
        .filter(|w| !w.is_empty())
        .map(String::from);
    let user = config.user().filter(|u| !u.is_empty()).map(String::from);
    Ok((root, argv, config.env_pairs(), cwd, user))
}

async fn run_command(
    sb: &Sandbox,
    spec: ExecSpec,
    interactive: bool,
    timeout: Option<f64>,
    signals: &mut term::Signals,
) -> i32 {
    let tty = spec.tty.is_some();
    let mut exec = match sb.exec(spec).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("airlock: {e}");
            return EXIT_SANDBOX_FAILED;
        }
    };
    let input = exec.input();
    // Raw mode only when we forward a real terminal; restored on drop.
    let _raw = if tty && interactive {
        term::RawMode::enable()
    } else {
        None
    };
    if interactive {
        let input = input.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = input.close().await;
        });
    }

    let deadline = timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
    let mut timed_out = false;
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    loop {
        let sleep = async {
            match deadline {
                Some(d) if !timed_out => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = exec.next() => match ev {
                Ok(Some(ExecEvent::Stdout(b))) => {
                    if stdout.write_all(&b).and_then(|_| stdout.flush()).is_err() {
                        // Our stdout is gone (closed pipe): stop the command like SIGPIPE would.
                        let _ = input.signal(libc::SIGPIPE, false).await;
                    }
                }
                Ok(Some(ExecEvent::Stderr(b))) => {
                    let _ = stderr.write_all(&b);
                }
                Ok(Some(ExecEvent::Started(_))) => {}
                Ok(Some(ExecEvent::Exit(s))) => {
                    tracing::debug!(?s, "command exited");
                    if timed_out {
                        eprintln!("airlock: command timed out");
                        return EXIT_TIMEOUT;
                    }
                    if s.oom_killed {
                        eprintln!("airlock: {OOM_MESSAGE}");
                    }
                    return match (s.code, s.signal) {
                        (Some(c), _) => c,
                        (_, Some(sig)) => 128 + sig,
                        _ => EXIT_SANDBOX_FAILED,
                    };
                }
                Ok(Some(ExecEvent::Failed(e))) => {
                    let err = Error::Exec(e);
                    eprintln!("airlock: {err}");
                    return err.exec_exit_code().unwrap_or(EXIT_SANDBOX_FAILED);
                }
                Ok(None) => return EXIT_SANDBOX_FAILED,
                Err(_) => {
                    drop(_raw);
                    let err = sb.failure().await.map(|e| e.to_string()).unwrap_or_else(|| "sandbox stopped".into());
                    eprintln!("airlock: {err}");
                    return EXIT_SANDBOX_FAILED;
                }
            },
            _ = sleep => {
                timed_out = true;
                let _ = input.signal(libc::SIGKILL, true).await;
            }
            ev = signals.next() => match ev {
                term::SignalEvent::Resize => {
                    if let Some(ws) = term::local_size() {
                        let _ = input.resize(ws).await;
                    }
                }
                term::SignalEvent::Forward(sig) => {
                    let _ = input.signal(sig, false).await;
                }
            },
        }
    }
}

fn template_cmd(t: TemplateCmd) -> Result<(), String> {
    use airlock_sandbox::template;
    match t {
        TemplateCmd::Ls { json } => {
            let list = template::list();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?
                );
                return Ok(());
            }
            println!(
                "{:<17} {:>5} {:>7} {:>9} {:<8} ROOT",
                "KEY", "CPUS", "MEMORY", "DISK USE", "STATUS"
            );
            for t in list {
                let status = match (&t.problem, t.current) {
                    (Some(_), _) => "damaged",
                    (None, true) => "ok",
                    (None, false) => "stale",
                };
                let (cpus, mem, root) = match &t.inputs {
                    Some(i) => (
                        i.cpus.to_string(),
                        format!("{}M", i.memory_mib),
                        i.root.path.display().to_string(),
                    ),
                    None => ("?".into(), "?".into(), "?".into()),
                };
                println!(
                    "{:<17} {:>5} {:>7} {:>8}M {:<8} {}",
                    t.key,
                    cpus,
                    mem,
                    t.disk_bytes / (1 << 20),
                    status,
                    root
                );
            }
            Ok(())
        }
        TemplateCmd::Rm { keys } => {
            let all: Vec<String> = template::list().into_iter().map(|t| t.key).collect();
            for k in keys {
                let hits: Vec<&String> = all.iter().filter(|a| a.starts_with(&k)).collect();
                match hits.as_slice() {
                    [one] => {
                        if !template::remove(one) {
                            return Err(format!("could not remove template {one}"));
                        }
                        println!("{one}");
                    }
                    [] => return Err(format!("no template {k} (see: airlock template ls)")),
                    _ => {
                        return Err(format!(
                            "{k} matches several templates: give more of the key"
                        ))
                    }
                }
            }
            Ok(())
        }
        TemplateCmd::Gc => {
            for k in template::gc() {
                println!("{k}");
            }
            Ok(())
        }
    }
}

async fn snapshot_cmd(s: SnapshotArgs) -> Result<(), String> {
    use airlock_sandbox::snapshot;
    if s.ls {
        println!(
            "{:<24} {:<14} {:>5} {:>7} SOURCE",
            "NAME", "CREATED", "CPUS", "MEMORY"
        );
        for i in snapshot::list() {
            println!(
                "{:<24} {:<14} {:>5} {:>6}M {}",
                i.name,
                i.created_unix,
                i.cpus(),
                i.memory_mib(),
                i.source
            );
        }
        return Ok(());
    }
    if let Some(name) = s.rm {
        return snapshot::remove(&name).map_err(|e| e.to_string());
    }
    let (Some(id), Some(name)) = (s.id, s.name) else {
        return Err("usage: airlock snapshot ID NAME".into());
    };
    let (mut c, _) = detach::connect(&id).await?;
    c.snapshot(&name).await?;
    println!("{name}");
    Ok(())
}

/// `airlock fork ID`: a snapshot, a detached copy from it, then the snapshot goes (the copy
/// has its own disk and loaded memory).
async fn fork(id: &str) -> Result<(), String> {
    let name = format!(
        "fork-{}-{}",
        id.chars().take(12).collect::<String>(),
        std::process::id()
    );
    let (mut c, _) = detach::connect(id).await?;
    c.snapshot(&name).await?;
    drop(c);
    let r = detach::start_from_snapshot(&name, id);
    let _ = airlock_sandbox::snapshot::remove(&name);
    println!("{}", r?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses() {
        Cli::command_for_test();
        let c = Cli::try_parse_from([
            "airlock", "run", "--rootfs", "/r", "-e", "A=1", "-it", "--", "sh", "-c", "x",
        ])
        .unwrap();
        let Cmd::Run(r) = c.cmd else { panic!() };
        assert!(r.interactive && r.tty);
        assert_eq!(r.cmd, vec!["sh", "-c", "x"]);
        assert!(Cli::try_parse_from([
            "airlock", "run", "--rootfs", "/r", "--cpus", "0", "--", "true"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["airlock", "run", "--", "true"]).is_err(),
            "needs --image or --rootfs"
        );
        assert!(Cli::try_parse_from([
            "airlock", "run", "--rootfs", "/r", "--image", "x", "--", "true"
        ])
        .is_err());
        assert!(Cli::try_parse_from([
            "airlock", "run", "--rootfs", "/r", "--accel", "hvf", "--", "true"
        ])
        .is_err());
        assert_eq!(
            parse_env(&["A=b=c".into()]).unwrap(),
            vec![("A".into(), "b=c".into())]
        );
        assert!(parse_env(&["=x".into()]).is_err());
    }

    #[test]
    fn publish_specs() {
        let p = |s: &str| parse_publish(s);
        assert_eq!(
            p("8080:80").unwrap().bind,
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(p("8080:80").unwrap().guest, 80);
        assert_eq!(p("0:80").unwrap().bind.port(), 0);
        assert_eq!(
            p("0.0.0.0:8080:80").unwrap().bind,
            "0.0.0.0:8080".parse().unwrap()
        );
        assert_eq!(
            p("[::1]:8080:80").unwrap().bind,
            "[::1]:8080".parse().unwrap()
        );
        assert_eq!(
            p("::1:8080:80").unwrap().bind,
            "[::1]:8080".parse().unwrap()
        );
        for bad in [
            "80",
            "8080:0",
            "8080:70000",
            "x:80",
            "8080:",
            "host:8080:80",
            "-1:80",
            "",
        ] {
            let e = p(bad).unwrap_err();
            assert!(
                e.contains("[ADDR:]HOST:GUEST") || e.contains("e.g."),
                "{bad}: {e}"
            );
        }
        let c = Cli::try_parse_from([
            "airlock",
            "run",
            "--rootfs",
            "/r",
            "-p",
            "8080:80",
            "--publish",
            "0:22",
            "--",
            "true",
        ])
        .unwrap();
        let Cmd::Run(r) = c.cmd else { panic!() };
        assert_eq!(r.publish.len(), 2);
        assert!(Cli::try_parse_from([
            "airlock", "run", "--rootfs", "/r", "-p", "80", "--", "true"
        ])
        .is_err());
    }

    impl Cli {
        fn command_for_test() {
            use clap::CommandFactory;
            Cli::command().debug_assert();
        }
    }
}
