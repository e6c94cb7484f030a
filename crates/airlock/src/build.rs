//! `airlock build` and `airlock push`: parse, call `airlock-build` / `airlock-image`, print
//! docker-style progress.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use airlock_build::{BuildOptions, Progress};
use airlock_image::{PushOptions, Reference, Store};
use clap::Args;

use crate::netargs::NetArgs;

/// `airlock build` flags.
#[derive(Args)]
pub struct BuildArgs {
    /// Name of the image: NAME[:TAG].
    #[arg(short = 't', long = "tag", value_name = "NAME[:TAG]")]
    tag: String,
    /// The Dockerfile (default: DIR/Dockerfile).
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: Option<PathBuf>,
    /// Set a build argument declared by ARG: K=V, or K to take its value from this environment.
    #[arg(long = "build-arg", value_name = "K=V")]
    build_args: Vec<String>,
    /// Run every step again, ignoring the layer cache.
    #[arg(long = "no-cache")]
    no_cache: bool,
    /// Build up to this stage (name or index) only.
    #[arg(long, value_name = "STAGE")]
    target: Option<String>,
    /// Registry that FROM images may be pulled from over plain HTTP; loopback always may.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// Guest memory of RUN sandboxes in MiB.
    #[arg(long, value_name = "MB", default_value_t = airlock_sandbox::DEFAULT_MEMORY_MIB, value_parser = clap::value_parser!(u32).range(64..=1048576))]
    memory: u32,
    /// Virtual CPUs of RUN sandboxes.
    #[arg(long, default_value_t = airlock_sandbox::DEFAULT_CPUS, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Network of RUN steps: sealed unless hosts are allowed (same flags as `run`).
    #[command(flatten)]
    net: NetArgs,
    /// The build context directory.
    #[arg(value_name = "DIR")]
    context: PathBuf,
}

fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

/// `airlock build`.
pub async fn build(a: BuildArgs) -> Result<(), String> {
    let network = a.net.to_spec()?;
    let store = Store::open_default().map_err(|e| e.to_string())?;
    let mut opts = BuildOptions::new(&a.context, &a.tag);
    opts.dockerfile = a.file;
    opts.build_args = a.build_args;
    opts.network = network;
    opts.insecure_registries = a.insecure_registry;
    opts.no_cache = a.no_cache;
    opts.target = a.target;
    opts.memory_mib = a.memory;
    opts.cpus = a.cpus;
    // Whether RUN output left the line open (a step line then starts on a new one).
    let open_line = Arc::new(std::sync::atomic::AtomicBool::new(false));
    opts.progress = Some(Arc::new(move |p: Progress<'_>| {
        use std::sync::atomic::Ordering;
        let mut out = std::io::stdout().lock();
        match &p {
            Progress::Stdout(b) | Progress::Stderr(b) => {
                if let Some(last) = b.last() {
                    open_line.store(*last != b'\n', Ordering::Relaxed);
                }
            }
            _ => {
                if open_line.swap(false, Ordering::Relaxed) {
                    let _ = writeln!(out);
                }
            }
        }
        let _ = match p {
            Progress::Step { n, total, text } => writeln!(out, "Step {n}/{total} : {text}"),
            Progress::UsingCache => writeln!(out, " ---> Using cache"),
            Progress::Running(id) => writeln!(out, " ---> Running in {id}"),
            Progress::Stdout(b) => out.write_all(b).and_then(|_| out.flush()),
            Progress::Stderr(b) => {
                let _ = out.flush();
                let mut err = std::io::stderr().lock();
                err.write_all(b).and_then(|_| err.flush())
            }
            Progress::Warning(w) => {
                let _ = out.flush();
                writeln!(std::io::stderr(), "[warning] {w}")
            }
            Progress::Done(Some(d)) => writeln!(out, " ---> {}", short(d)),
            Progress::Done(None) => Ok(()),
        };
    }));
    // Ctrl-C / SIGTERM drop the build: its sandbox is killed and its state and temp files
    // removed on the way out, as on any error.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let rec = tokio::select! {
        r = airlock_build::build(&store, &opts) => r.map_err(|e| e.to_string())?,
        _ = tokio::signal::ctrl_c() => return Err("build interrupted; nothing was tagged".into()),
        _ = term.recv() => return Err("build terminated; nothing was tagged".into()),
    };
    println!("Successfully built {}", short(&rec.manifest_digest));
    println!("Successfully tagged {}", rec.reference);
    Ok(())
}

/// `airlock push IMAGE TARGET`.
pub async fn push(image: &str, target: &str, insecure: &[String]) -> Result<(), String> {
    let (store, rec) = crate::image::resolve(image)?.ok_or_else(|| {
        format!("image {image} is not in the local store: build it (airlock build -t {image} DIR) or pull it first")
    })?;
    let target_ref = Reference::parse(target).map_err(|e| e.to_string())?;
    if !target.contains('/') {
        return Err(format!(
            "push target {target}: give REGISTRY/REPOSITORY[:TAG], e.g. registry.example.com/team/app:1"
        ));
    }
    let opts = PushOptions {
        insecure_registries: insecure.to_vec(),
        progress: Some(Arc::new(|digest: &str, uploaded: bool| {
            if uploaded {
                eprintln!("{}: pushed", short(digest));
            } else {
                eprintln!("{}: already in the registry", short(digest));
            }
        })),
        ..Default::default()
    };
    let digest = airlock_image::push(&store, &rec, &target_ref, &opts)
        .await
        .map_err(|e| e.to_string())?;
    println!("{target_ref}@{digest}");
    Ok(())
}
