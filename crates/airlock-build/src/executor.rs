//! Runs a parsed Dockerfile: stage by stage, step by step, each step's result looked up in
//! the cache first. RUN boots a sandbox of the stage's image so far and turns what the
//! command changed in the root into a layer; COPY/ADD build their layer on the host.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use airlock_image::{ImageRecord, PullOptions, Reference, Store};
use airlock_sandbox::{ExecEvent, ExecSpec, NetworkSpec, RootfsSource, Sandbox, SandboxSpec};
use sha2::{Digest, Sha256};

use crate::cache::{self, Cache, Layer};
use crate::context::{self, Context, Kind};
use crate::dockerfile::{self, Command, CopySpec, Dockerfile, Instruction, Step};
use crate::error::{BuildError, Result};
use crate::image::{State, DEFAULT_PATH};
use crate::layer::{clean_path, LayerWriter, Meta};
use crate::stagefs::{self, open_layer};

/// What a build reports as it goes (printed by the CLI like `docker build`).
#[derive(Debug)]
pub enum Progress<'a> {
    /// `Step n/total : TEXT`.
    Step {
        /// Step number, from 1, counting every FROM.
        n: usize,
        /// Steps in the Dockerfile.
        total: usize,
        /// The instruction as written.
        text: &'a str,
    },
    /// The step's result came from the cache.
    UsingCache,
    /// A RUN step booted this sandbox.
    Running(&'a str),
    /// Output of a RUN command.
    Stdout(&'a [u8]),
    /// Error output of a RUN command.
    Stderr(&'a [u8]),
    /// Something worth knowing that does not stop the build.
    Warning(&'a str),
    /// The step is done; the digest of the layer it added, if any.
    Done(Option<&'a str>),
}

/// Progress callback.
pub type ProgressFn = Arc<dyn Fn(Progress<'_>) + Send + Sync>;

/// What to build and how.
#[derive(Clone)]
pub struct BuildOptions {
    /// The build context directory.
    pub context: PathBuf,
    /// The Dockerfile (default: `Dockerfile` in the context).
    pub dockerfile: Option<PathBuf>,
    /// Tag of the result (`name[:tag]`).
    pub tag: String,
    /// `--build-arg` values: `K=V`, or `K` to take it from this environment.
    pub build_args: Vec<String>,
    /// Network of RUN sandboxes (default sealed).
    pub network: NetworkSpec,
    /// Registries that may be pulled from over plain HTTP (FROM images).
    pub insecure_registries: Vec<String>,
    /// Ignore the cache (results still refresh it).
    pub no_cache: bool,
    /// Stop after this stage (name or index).
    pub target: Option<String>,
    /// Guest RAM of RUN sandboxes, MiB.
    pub memory_mib: u32,
    /// vCPUs of RUN sandboxes.
    pub cpus: u32,
    /// Progress reports.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildOptions")
            .field("context", &self.context)
            .field("dockerfile", &self.dockerfile)
            .field("tag", &self.tag)
            .field("no_cache", &self.no_cache)
            .finish_non_exhaustive()
    }
}

impl BuildOptions {
    /// Defaults for a context and a tag.
    pub fn new(context: impl Into<PathBuf>, tag: impl Into<String>) -> BuildOptions {
        BuildOptions {
            context: context.into(),
            dockerfile: None,
            tag: tag.into(),
            build_args: Vec::new(),
            network: NetworkSpec::default(),
            insecure_registries: Vec::new(),
            no_cache: false,
            target: None,
            memory_mib: airlock_sandbox::DEFAULT_MEMORY_MIB,
            cpus: airlock_sandbox::DEFAULT_CPUS,
            progress: None,
        }
    }
}

/// Most bytes a RUN step's diff may have (uncompressed), beyond which the step fails.
const MAX_DIFF_BYTES: u64 = 32 << 30;

/// Parses `--build-arg` values: `K=V`, or `K` (from `lookup`, skipped when unset).
pub fn parse_build_args(
    args: &[String],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        let (k, v) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (a.as_str(), lookup(a)),
        };
        if k.is_empty()
            || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || k.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(BuildError::BuildArg {
                arg: if k.is_empty() {
                    "=…".into()
                } else {
                    k.to_string()
                },
                reason: "expected NAME=VALUE with a name of letters, digits and _".into(),
            });
        }
        if let Some(v) = v {
            out.insert(k.to_string(), v);
        }
    }
    Ok(out)
}

struct StageOut {
    name: Option<String>,
    state: State,
    key: String,
}

struct Builder<'a> {
    store: &'a Store,
    opts: &'a BuildOptions,
    cache: Cache,
    ctx: Context,
    escape: char,
    build_args: BTreeMap<String, String>,
    used_args: HashSet<String>,
    done: Vec<StageOut>,
    /// Images named by `COPY --from`, resolved once.
    images: HashMap<String, (State, String)>,
}

fn progress(opts: &BuildOptions, p: Progress<'_>) {
    if let Some(f) = &opts.progress {
        f(p);
    }
}

/// Builds the image the Dockerfile describes and records it in `store` under `opts.tag`.
pub async fn build(store: &Store, opts: &BuildOptions) -> Result<ImageRecord> {
    let tag = Reference::parse(&opts.tag)?;
    let build_args = parse_build_args(&opts.build_args, |k| std::env::var(k).ok())?;
    let ctx = Context::open(&opts.context)?;
    let df_path = opts
        .dockerfile
        .clone()
        .unwrap_or_else(|| ctx.root().join("Dockerfile"));
    let src = std::fs::read_to_string(&df_path).map_err(|e| {
        BuildError::Context(format!(
            "cannot read the Dockerfile {}: {e}; give one with -f PATH",
            df_path.display()
        ))
    })?;
    let df = dockerfile::parse(&src)?;
    let escape = dockerfile::escape_char(&src);
    let _guard = store.hold_writes()?;
    let mut b = Builder {
        store,
        opts,
        cache: Cache::new(
            store
                .root()
                .parent()
                .unwrap_or(store.root())
                .join("build-cache"),
        ),
        ctx,
        escape,
        build_args,
        used_args: HashSet::new(),
        done: Vec::new(),
        images: HashMap::new(),
    };
    let state = b.run(&df).await?;
    let unused: Vec<&String> = b
        .build_args
        .keys()
        .filter(|k| !b.used_args.contains(*k))
        .collect();
    if !unused.is_empty() {
        let names: Vec<&str> = unused.iter().map(|s| s.as_str()).collect();
        progress(
            opts,
            Progress::Warning(&format!(
                "build args not declared by any ARG (unused): {}",
                names.join(", ")
            )),
        );
    }
    let record = store.write_image(
        &tag.to_string(),
        &state.config_bytes(),
        &state.layer_records(),
    )?;
    Ok(record)
}

impl Builder<'_> {
    async fn run(&mut self, df: &Dockerfile) -> Result<State> {
        let last = match &self.opts.target {
            None => df.stages.len() - 1,
            Some(t) => {
                let t = t.to_ascii_lowercase();
                df.stages
                    .iter()
                    .position(|s| s.name.as_deref() == Some(&t))
                    .or_else(|| t.parse::<usize>().ok().filter(|i| *i < df.stages.len()))
                    .ok_or_else(|| {
                        BuildError::Context(format!(
                            "--target {t}: no such stage in the Dockerfile"
                        ))
                    })?
            }
        };
        let total: usize = df.stages[..=last].iter().map(|s| 1 + s.steps.len()).sum();
        // Global ARGs: usable in FROM lines.
        let mut global: BTreeMap<String, String> = BTreeMap::new();
        for a in &df.global_args {
            let v = match self.build_args.get(&a.name) {
                Some(v) => Some(v.clone()),
                None => match &a.default {
                    Some(d) => Some(
                        dockerfile::expand(d, self.escape, &|k| global.get(k).cloned())
                            .map_err(|e| BuildError::Context(format!("ARG {}: {e}", a.name)))?,
                    ),
                    None => None,
                },
            };
            self.used_args.insert(a.name.clone());
            if let Some(v) = v {
                global.insert(a.name.clone(), v);
            }
        }
        let mut n = 0;
        for (si, stage) in df.stages[..=last].iter().enumerate() {
            n += 1;
            progress(
                self.opts,
                Progress::Step {
                    n,
                    total,
                    text: &stage.text,
                },
            );
            let step_err = |message: String| BuildError::Step {
                step: n,
                line: stage.line,
                message,
            };
            let base = dockerfile::expand(&stage.base, self.escape, &|k| global.get(k).cloned())
                .map_err(|e| step_err(format!("FROM: {e}")))?;
            if let Some(p) = &stage.platform {
                let p = dockerfile::expand(p, self.escape, &|k| global.get(k).cloned())
                    .map_err(|e| step_err(format!("FROM: {e}")))?;
                if p != "linux/amd64" && !p.is_empty() {
                    return Err(step_err(format!(
                        "FROM --platform={p}: airlock builds linux/amd64 images only"
                    )));
                }
            }
            let (mut state, mut key) = self.base(&base).await.map_err(|e| match e {
                BuildError::Step { .. } => e,
                e => step_err(format!("FROM {base}: {e}")),
            })?;
            let mut args: BTreeMap<String, String> = BTreeMap::new();
            let mut shell = vec!["/bin/sh".to_string(), "-c".to_string()];
            let mut cmd_set = false;
            for step in &stage.steps {
                n += 1;
                progress(
                    self.opts,
                    Progress::Step {
                        n,
                        total,
                        text: &step.text,
                    },
                );
                key = self
                    .step(
                        n,
                        step,
                        &mut state,
                        &key,
                        &mut args,
                        &mut shell,
                        &mut cmd_set,
                        &global,
                    )
                    .await?;
            }
            self.done.push(StageOut {
                name: stage.name.clone().or_else(|| Some(si.to_string())),
                state,
                key,
            });
        }
        Ok(self.done.pop().expect("at least one stage").state)
    }

    /// A FROM base: scratch, an earlier stage, or an image (pulled when not stored).
    async fn base(&mut self, base: &str) -> Result<(State, String)> {
        if base == "scratch" {
            return Ok((State::scratch(), cache::key(&["scratch"])));
        }
        let lower = base.to_ascii_lowercase();
        if let Some(s) = self.done.iter().find(|s| s.name.as_deref() == Some(&lower)) {
            return Ok((s.state.clone(), s.key.clone()));
        }
        if let Some(hit) = self.images.get(base) {
            return Ok(hit.clone());
        }
        let reference = Reference::parse(base)?;
        let rec = match self.store.resolve(&reference) {
            Ok(r) => r,
            Err(airlock_image::Error::NotFound(_)) => {
                let opts = PullOptions {
                    insecure_registries: self.opts.insecure_registries.clone(),
                    ..Default::default()
                };
                airlock_image::pull(self.store, &reference, &opts)
                    .await
                    .map_err(|e| {
                        BuildError::Context(format!(
                            "image {reference} is not in the local store and pulling it failed ({e}); \
                             check the name, or build/import it first"
                        ))
                    })?
            }
            Err(e) => return Err(e.into()),
        };
        let out = (
            State::of_image(self.store, &rec)?,
            cache::key(&["image", &rec.manifest_digest]),
        );
        self.images.insert(base.to_string(), out.clone());
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    async fn step(
        &mut self,
        n: usize,
        step: &Step,
        state: &mut State,
        parent: &str,
        args: &mut BTreeMap<String, String>,
        shell: &mut Vec<String>,
        cmd_set: &mut bool,
        global: &BTreeMap<String, String>,
    ) -> Result<String> {
        let esc = self.escape;
        let err = |message: String| BuildError::Step {
            step: n,
            line: step.line,
            message,
        };
        // ENV wins over ARG of the same name, as in Docker.
        let env: HashMap<String, String> = state.env().into_iter().collect();
        let lookup_args = args.clone();
        let lookup = move |k: &str| env.get(k).cloned().or_else(|| lookup_args.get(k).cloned());
        let ex = |s: &str| dockerfile::expand(s, esc, &lookup).map_err(|e| err(e.to_string()));
        let exw =
            |s: &str| dockerfile::expand_words(s, esc, &lookup).map_err(|e| err(e.to_string()));

        // ARG changes what later steps see: apply it before the key, which covers args.
        if let Instruction::Arg(decls) = &step.instruction {
            for d in decls {
                self.used_args.insert(d.name.clone());
                let v = match self.build_args.get(&d.name) {
                    Some(v) => Some(v.clone()),
                    None => match &d.default {
                        Some(def) => Some(ex(def)?),
                        None => global.get(&d.name).cloned(),
                    },
                };
                match v {
                    Some(v) => {
                        args.insert(d.name.clone(), v);
                    }
                    None => {
                        args.remove(&d.name);
                    }
                }
            }
        }
        if let Instruction::Shell(s) = &step.instruction {
            *shell = s.clone();
        }

        // What else the result depends on (COPY: the files; --from: the source stage).
        let mut extra = String::new();
        let mut copy_plan = None;
        match &step.instruction {
            Instruction::Copy(c) | Instruction::Add(c) => {
                let add = matches!(step.instruction, Instruction::Add(_));
                let plan = self.plan_copy(c, add, state, &ex, &err).await?;
                extra = plan.fingerprint.clone();
                copy_plan = Some(plan);
            }
            _ => {}
        }
        let args_json = serde_json::to_string(&*args).unwrap_or_default();
        let shell_json = serde_json::to_string(&*shell).unwrap_or_default();
        let key = cache::key(&[parent, &step.text, &args_json, &shell_json, &extra]);

        if !self.opts.no_cache {
            if let Some(e) = self.cache.get(&key) {
                let usable = e
                    .layer
                    .as_ref()
                    .is_none_or(|l| self.store.has_blob(&l.digest));
                if usable && e.config.is_object() {
                    progress(self.opts, Progress::UsingCache);
                    state.config = e.config;
                    if let Some(l) = e.layer {
                        state.layers.push(l);
                    }
                    if matches!(step.instruction, Instruction::Cmd(_)) {
                        *cmd_set = true;
                    }
                    return Ok(key);
                }
            }
        }

        let mut layer = None;
        match &step.instruction {
            Instruction::Run(c) => {
                layer = Some(self.run_step(n, step, state, c, args, shell).await?);
            }
            Instruction::Copy(_) | Instruction::Add(_) => {
                let plan = copy_plan.expect("planned above");
                let store = self.store.clone();
                layer = Some(
                    tokio::task::spawn_blocking(move || write_copy_layer(&store, plan))
                        .await
                        .map_err(|e| err(format!("copy task failed: {e}")))??,
                );
            }
            Instruction::Env(pairs) => {
                for (k, v) in pairs {
                    let v = ex(v)?;
                    state.set_env(k, &v);
                }
            }
            Instruction::Arg(_) | Instruction::Shell(_) => {}
            Instruction::Workdir(w) => {
                let w = ex(w)?;
                let cur = state.get_str("WorkingDir").unwrap_or_else(|| "/".into());
                let joined = if w.starts_with('/') {
                    w
                } else {
                    format!("{cur}/{w}")
                };
                let clean = context::clean_rel(joined.trim_start_matches('/'))
                    .ok_or_else(|| err(format!("WORKDIR {joined}: climbs above /")))?;
                state
                    .cfg()
                    .insert("WorkingDir".into(), format!("/{clean}").into());
            }
            Instruction::User(u) => {
                let u = ex(u)?;
                state.cfg().insert("User".into(), u.into());
            }
            Instruction::Cmd(c) => {
                let v = argv(c, shell);
                state.cfg().insert("Cmd".into(), serde_json::json!(v));
                *cmd_set = true;
            }
            Instruction::Entrypoint(c) => {
                let v = argv(c, shell);
                state
                    .cfg()
                    .insert("Entrypoint".into(), serde_json::json!(v));
                // Docker: a new entrypoint drops a Cmd inherited from the base image.
                if !*cmd_set {
                    state.cfg().insert("Cmd".into(), serde_json::Value::Null);
                }
            }
            Instruction::Expose(ports) => {
                for p in ports {
                    for w in exw(p)? {
                        let (num, proto) = w.split_once('/').unwrap_or((&w, "tcp"));
                        let ok = num.split('-').all(|x| x.parse::<u16>().is_ok())
                            && matches!(proto, "tcp" | "udp" | "sctp");
                        if !ok {
                            return Err(err(format!(
                                "EXPOSE {w}: give PORT[/tcp|udp|sctp], e.g. 8080 or 53/udp"
                            )));
                        }
                        state.add_to_set("ExposedPorts", &format!("{num}/{proto}"));
                    }
                }
            }
            Instruction::Label(pairs) => {
                for (k, v) in pairs {
                    state.set_label(&ex(k)?, &ex(v)?);
                }
            }
            Instruction::Volume(vols) => {
                for v in vols {
                    let v = ex(v)?;
                    if !v.starts_with('/') {
                        return Err(err(format!("VOLUME {v}: give an absolute path")));
                    }
                    state.add_to_set("Volumes", &v);
                }
            }
            Instruction::StopSignal(s) => {
                let s = ex(s)?;
                state.cfg().insert("StopSignal".into(), s.into());
            }
            Instruction::Ignored(why) => progress(self.opts, Progress::Warning(why)),
        }
        match &layer {
            Some(l) => state.push_layer(l.clone(), &step.text),
            None => state.push_history(&step.text),
        }
        progress(
            self.opts,
            Progress::Done(layer.as_ref().map(|l| l.digest.as_str())),
        );
        let entry = cache::Entry {
            layer,
            config: state.config.clone(),
        };
        if let Err(e) = self.cache.put(&key, &entry) {
            tracing::warn!(error = %e, "could not record a build cache entry");
        }
        Ok(key)
    }

    async fn run_step(
        &self,
        n: usize,
        step: &Step,
        state: &State,
        c: &Command,
        args: &BTreeMap<String, String>,
        shell: &[String],
    ) -> Result<Layer> {
        let argv = argv(c, shell);
        let mut env = state.env();
        for (k, v) in args {
            if !env.iter().any(|(e, _)| e == k) {
                env.push((k.clone(), v.clone()));
            }
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        let cwd = state.get_str("WorkingDir").unwrap_or_else(|| "/".into());
        let user = state.get_str("User");
        let record = state.intermediate(self.store)?;
        let mut spec = SandboxSpec::new(RootfsSource::Oci {
            store: self.store.root().to_path_buf(),
            image: Box::new(record),
        });
        spec.network = self.opts.network.clone();
        spec.memory_mib = self.opts.memory_mib;
        spec.cpus = self.opts.cpus;
        // Each intermediate image is booted once: a warm template would only cost time.
        spec.cold = true;
        let sb = Sandbox::start(spec).await?;
        progress(self.opts, Progress::Running(sb.id()));
        let res = self.run_in(&sb, n, step, argv, env, cwd, user).await;
        // Stopped on every path, so no VM outlives the step.
        let stopped = sb.stop().await;
        let diff = res?;
        stopped?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<Layer> {
            let mut diff = diff;
            diff.rewind()
                .map_err(|e| BuildError::io("read RUN diff", e))?;
            let mut w = LayerWriter::new(store.blob_writer()?);
            crate::layer::rewrite_untrusted(std::io::BufReader::new(diff), &mut w)
                .map_err(BuildError::Layer)?;
            finish_layer(w)
        })
        .await
        .map_err(|e| BuildError::Layer(format!("layer task failed: {e}")))?
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_in(
        &self,
        sb: &Sandbox,
        n: usize,
        step: &Step,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        user: Option<String>,
    ) -> Result<std::fs::File> {
        let mut e = sb
            .exec(ExecSpec {
                argv: argv.clone(),
                env,
                cwd: Some(cwd),
                user,
                ..Default::default()
            })
            .await?;
        let status = loop {
            match e.next().await? {
                Some(ExecEvent::Stdout(b)) => progress(self.opts, Progress::Stdout(&b)),
                Some(ExecEvent::Stderr(b)) => progress(self.opts, Progress::Stderr(&b)),
                Some(ExecEvent::Exit(s)) => break s,
                Some(ExecEvent::Failed(f)) => {
                    return Err(BuildError::Step {
                        step: n,
                        line: step.line,
                        message: format!(
                            "RUN: cannot start {}: {}",
                            argv.first().map(String::as_str).unwrap_or(""),
                            f.message
                        ),
                    })
                }
                Some(ExecEvent::Started(_)) => {}
                None => {
                    return Err(BuildError::Sandbox(airlock_sandbox::Error::Protocol(
                        "RUN ended without an exit status".into(),
                    )))
                }
            }
        };
        if status.code != Some(0) {
            let code = status.code.or(status.signal.map(|s| 128 + s)).unwrap_or(1);
            return Err(BuildError::RunFailed {
                step: n,
                command: step
                    .text
                    .strip_prefix("RUN ")
                    .unwrap_or(&step.text)
                    .to_string(),
                code,
            });
        }
        // Unnamed temp file: gone with the handle, whatever happens next.
        let mut file = tempfile::tempfile().map_err(|e| BuildError::io("temp file", e))?;
        let mut total = 0u64;
        sb.root_diff(|chunk| {
            total += chunk.len() as u64;
            if total > MAX_DIFF_BYTES {
                return Err(airlock_sandbox::Error::Setup(format!(
                    "the RUN step changed more than {} GiB",
                    MAX_DIFF_BYTES >> 30
                )));
            }
            file.write_all(chunk).map_err(airlock_sandbox::Error::Io)
        })
        .await?;
        Ok(file)
    }

    /// Resolves a COPY/ADD: sources, destination, ownership, and a fingerprint of all of it.
    async fn plan_copy(
        &mut self,
        c: &CopySpec,
        add: bool,
        state: &State,
        ex: &dyn Fn(&str) -> Result<String>,
        err: &dyn Fn(String) -> BuildError,
    ) -> Result<CopyPlan> {
        let dest_raw = ex(&c.dest)?;
        let sources: Vec<String> = c.sources.iter().map(|s| ex(s)).collect::<Result<_>>()?;
        let workdir = state.get_str("WorkingDir").unwrap_or_else(|| "/".into());
        let mut into_dir = dest_raw.ends_with('/')
            || dest_raw == "."
            || dest_raw.ends_with("/.")
            || sources.len() > 1
            || sources.iter().any(|s| s.contains(['*', '?', '[']));
        let dest_abs = if dest_raw.starts_with('/') {
            dest_raw.clone()
        } else {
            format!("{workdir}/{dest_raw}")
        };
        let dest = context::clean_rel(dest_abs.trim_start_matches('/'))
            .ok_or_else(|| err(format!("destination {dest_raw} climbs above /")))?;
        // As Docker: a destination that is a directory in the image takes files into it.
        if !into_dir && !dest.is_empty() {
            into_dir = stagefs::is_dir(self.store, &state.layers, &dest)?;
        }
        let (uid, gid) = match &c.chown {
            None => (0, 0),
            Some(o) => match parse_chown(o) {
                Ok(ids) => ids,
                Err(_) => stagefs::resolve_owner(self.store, &state.layers, o).map_err(err)?,
            },
        };
        let chmod = c
            .chmod
            .as_deref()
            .map(|m| u32::from_str_radix(m, 8).unwrap_or(0o644));
        let epoch = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let join = |a: &str, b: &str| match (a.is_empty(), b.is_empty()) {
            (true, _) => b.to_string(),
            (_, true) => a.to_string(),
            _ => format!("{a}/{b}"),
        };
        let mut fp = Sha256::new();
        fp.update(format!("{dest}\0{into_dir}\0{uid}:{gid}\0{chmod:?}\0").as_bytes());

        if let Some(from) = &c.from {
            let (src_state, src_key) = self.copy_source(from).await.map_err(|e| match e {
                BuildError::Step { .. } => e,
                e => err(format!("COPY --from={from}: {e}")),
            })?;
            fp.update(src_key.as_bytes());
            let mut paths = Vec::new();
            for s in &sources {
                let p = clean_path(s).map_err(|e| err(format!("COPY --from={from} {s}: {e}")))?;
                fp.update(format!("\0{p}").as_bytes());
                paths.push(p);
            }
            return Ok(CopyPlan {
                fingerprint: hex::encode(fp.finalize()),
                files: Vec::new(),
                archives: Vec::new(),
                from: Some(FromPlan {
                    layers: src_state.layers.clone(),
                    sources: paths,
                    from: from.clone(),
                    dest,
                    into_dir,
                    owner: c.chown.as_ref().map(|_| (uid, gid)),
                    chmod,
                }),
            });
        }

        let mut files: Vec<PlannedFile> = Vec::new();
        let mut archives: Vec<(PathBuf, String)> = Vec::new();
        for s in &sources {
            if s.starts_with("http://") || s.starts_with("https://") {
                return Err(err(format!(
                    "{s}: remote sources are not supported; download it in a RUN step (with --allow-host)"
                )));
            }
            for src in self.ctx.resolve(s)? {
                // ADD unpacks a local tar (plain, gzip or zstd) into the destination.
                if add && !src.is_dir && is_archive(&src.entries[0].host) {
                    archives.push((src.entries[0].host.clone(), dest.clone()));
                    continue;
                }
                let base_name = src.rel.rsplit('/').next().unwrap_or("").to_string();
                for e in &src.entries {
                    let path = if src.is_dir {
                        if e.below.is_empty() {
                            continue;
                        }
                        join(&dest, &e.below)
                    } else if into_dir || dest.is_empty() {
                        join(&dest, &base_name)
                    } else {
                        dest.clone()
                    };
                    if path.is_empty() {
                        continue;
                    }
                    let mode = chmod.unwrap_or(e.mode);
                    let mtime = epoch.map_or(e.mtime, |ep| e.mtime.min(ep));
                    files.push(PlannedFile {
                        path,
                        host: e.host.clone(),
                        kind: e.kind.clone(),
                        meta: Meta {
                            mode,
                            uid,
                            gid,
                            mtime,
                        },
                    });
                }
            }
        }
        // Sorted, later sources winning a clash (as they would when copied in order).
        files.reverse();
        let mut seen = HashSet::new();
        files.retain(|f| seen.insert(f.path.clone()));
        files.sort_by(|a, b| a.path.cmp(&b.path));
        for f in &files {
            fp.update(format!("\0{}\0{:o}", f.path, f.meta.mode).as_bytes());
            match &f.kind {
                Kind::Dir => fp.update(b"d"),
                Kind::Symlink(t) => fp.update(format!("l{}", t.display()).as_bytes()),
                Kind::File(_) => {
                    let mut h = Sha256::new();
                    let mut file = std::fs::File::open(&f.host)
                        .map_err(|e| BuildError::io(f.host.display().to_string(), e))?;
                    std::io::copy(&mut file, &mut HashW(&mut h))
                        .map_err(|e| BuildError::io(f.host.display().to_string(), e))?;
                    fp.update(b"f");
                    fp.update(h.finalize());
                }
            }
        }
        for (host, d) in &archives {
            let mut h = Sha256::new();
            let mut file = std::fs::File::open(host)
                .map_err(|e| BuildError::io(host.display().to_string(), e))?;
            std::io::copy(&mut file, &mut HashW(&mut h))
                .map_err(|e| BuildError::io(host.display().to_string(), e))?;
            fp.update(format!("\0archive\0{d}\0").as_bytes());
            fp.update(h.finalize());
        }
        Ok(CopyPlan {
            fingerprint: hex::encode(fp.finalize()),
            files,
            archives,
            from: None,
        })
    }

    /// The state a `COPY --from` reads: an earlier stage (name or index), else an image.
    async fn copy_source(&mut self, from: &str) -> Result<(State, String)> {
        if let Some(s) = self.done.iter().find(|s| s.name.as_deref() == Some(from)) {
            return Ok((s.state.clone(), s.key.clone()));
        }
        if from.parse::<usize>().is_ok() {
            return Err(BuildError::Context(format!(
                "stage {from} is not an earlier stage"
            )));
        }
        self.base(from).await
    }
}

fn argv(c: &Command, shell: &[String]) -> Vec<String> {
    match c {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => shell.iter().cloned().chain([s.clone()]).collect(),
    }
}

/// `--chown=UID[:GID]` when numeric (names are looked up in the image by the caller).
fn parse_chown(o: &str) -> std::result::Result<(u64, u64), String> {
    let (u, g) = o.split_once(':').unwrap_or((o, o));
    match (u.parse::<u64>(), g.parse::<u64>()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(format!("--chown={o}: not numeric")),
    }
}

struct HashW<'a>(&'a mut Sha256);
impl Write for HashW<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct PlannedFile {
    path: String,
    host: PathBuf,
    kind: Kind,
    meta: Meta,
}

struct FromPlan {
    layers: Vec<Layer>,
    sources: Vec<String>,
    from: String,
    dest: String,
    into_dir: bool,
    owner: Option<(u64, u64)>,
    chmod: Option<u32>,
}

struct CopyPlan {
    fingerprint: String,
    files: Vec<PlannedFile>,
    /// ADD of a local archive: (host file, destination directory).
    archives: Vec<(PathBuf, String)>,
    from: Option<FromPlan>,
}

fn write_copy_layer(store: &Store, plan: CopyPlan) -> Result<Layer> {
    let mut w = LayerWriter::new(store.blob_writer()?);
    let io = |p: &Path, e: std::io::Error| BuildError::io(format!("copy {}", p.display()), e);
    match &plan.from {
        Some(fp) => copy_from_layers(store, fp, &mut w)?,
        None => {
            for f in &plan.files {
                match &f.kind {
                    Kind::Dir => w.dir(&f.path, f.meta).map_err(|e| io(&f.host, e))?,
                    Kind::Symlink(t) => {
                        w.symlink(&f.path, t, f.meta).map_err(|e| io(&f.host, e))?
                    }
                    Kind::File(_) => {
                        let file = std::fs::File::open(&f.host).map_err(|e| io(&f.host, e))?;
                        let size = file.metadata().map_err(|e| io(&f.host, e))?.len();
                        w.file(&f.path, f.meta, size, file)
                            .map_err(|e| io(&f.host, e))?
                    }
                }
            }
        }
    }
    for (host, dest) in &plan.archives {
        let f = std::fs::File::open(host).map_err(|e| io(host, e))?;
        let r: Box<dyn std::io::Read> = match archive_magic(host) {
            Some(Magic::Gzip) => Box::new(flate2::read::GzDecoder::new(f)),
            Some(Magic::Zstd) => {
                Box::new(zstd::stream::read::Decoder::new(f).map_err(|e| io(host, e))?)
            }
            _ => Box::new(f),
        };
        crate::layer::rewrite_untrusted_under(r, &mut w, dest)
            .map_err(|e| BuildError::Context(format!("ADD {}: {e}", host.display())))?;
    }
    finish_layer(w)
}

/// Ends `w` and commits its blob to the store.
fn finish_layer(w: LayerWriter<airlock_image::BlobWriter>) -> Result<Layer> {
    let (blob, diff_id) = w.finish().map_err(|e| BuildError::io("write layer", e))?;
    let (digest, size) = blob.commit()?;
    Ok(Layer {
        digest,
        diff_id,
        size,
    })
}

enum Magic {
    Gzip,
    Zstd,
    Tar,
}

fn archive_magic(p: &Path) -> Option<Magic> {
    use std::io::Read;
    let mut head = [0u8; 512];
    let mut f = std::fs::File::open(p).ok()?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    match head {
        [0x1f, 0x8b, ..] => Some(Magic::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Magic::Zstd),
        _ if n >= 262 && &head[257..262] == b"ustar" => Some(Magic::Tar),
        _ => None,
    }
}

/// Whether ADD should unpack `p` (a tar, or a gzip/zstd stream taken for a compressed tar).
fn is_archive(p: &Path) -> bool {
    archive_magic(p).is_some()
}

fn under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.starts_with(&format!("{dir}/"))
}

/// `COPY --from`: the source paths as the stage's layers leave them (whiteouts applied), in
/// two passes over the layers: which entry of which layer is current for each path, then
/// those entries copied under the destination.
fn copy_from_layers<W: Write>(store: &Store, fp: &FromPlan, w: &mut LayerWriter<W>) -> Result<()> {
    let bad = |d: &str, e: std::io::Error| BuildError::Layer(format!("layer {d}: {e}"));
    // path → (layer, entry index, is_dir)
    let mut current: BTreeMap<String, (usize, usize, bool)> = BTreeMap::new();
    for (li, l) in fp.layers.iter().enumerate() {
        let mut ar = tar::Archive::new(open_layer(store, &l.digest)?);
        for (ei, e) in ar.entries().map_err(|e| bad(&l.digest, e))?.enumerate() {
            let e = e.map_err(|e| bad(&l.digest, e))?;
            let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let Ok(p) = clean_path(&raw) else { continue };
            let (parent, name) = p.rsplit_once('/').unwrap_or(("", p.as_str()));
            if name == ".wh..wh..opq" {
                current.retain(|k, (lj, _, _)| {
                    *lj == li || !(k.starts_with(&format!("{parent}/")) || parent.is_empty())
                });
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let h = if parent.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{parent}/{hidden}")
                };
                current.retain(|k, _| !under(k, &h));
                continue;
            }
            if fp.sources.iter().any(|s| under(&p, s)) {
                let is_dir = e.header().entry_type() == tar::EntryType::Directory;
                current.insert(p, (li, ei, is_dir));
            }
        }
    }
    // Destination of each selected entry.
    let mut chosen: HashMap<(usize, usize), String> = HashMap::new();
    for s in &fp.sources {
        let src_is_dir = match current.get(s) {
            Some((_, _, d)) => *d,
            None => current.keys().any(|k| under(k, s) && k != s),
        };
        if !current.keys().any(|k| under(k, s)) {
            return Err(BuildError::Context(format!(
                "COPY --from={} /{s}: no such file or directory in that stage (paths through symlinked directories are not followed)",
                fp.from
            )));
        }
        let base_name = s.rsplit('/').next().unwrap_or("");
        for (k, (li, ei, _)) in current.iter().filter(|(k, _)| under(k, s)) {
            let dest = if src_is_dir {
                if k == s {
                    continue;
                }
                let below = if s.is_empty() {
                    k.as_str()
                } else {
                    &k[s.len() + 1..]
                };
                join_rel(&fp.dest, below)
            } else if fp.into_dir || fp.dest.is_empty() {
                join_rel(&fp.dest, base_name)
            } else {
                fp.dest.clone()
            };
            chosen.insert((*li, *ei), dest);
        }
    }
    // Hardlink targets follow their files; one pointing out of the copy cannot.
    let renamed: HashMap<String, String> = current
        .iter()
        .filter_map(|(k, (li, ei, _))| chosen.get(&(*li, *ei)).map(|d| (k.clone(), d.clone())))
        .collect();
    for (li, l) in fp.layers.iter().enumerate() {
        if !chosen.keys().any(|(lj, _)| *lj == li) {
            continue;
        }
        let mut ar = tar::Archive::new(open_layer(store, &l.digest)?);
        for (ei, e) in ar.entries().map_err(|e| bad(&l.digest, e))?.enumerate() {
            let Some(dest) = chosen.get(&(li, ei)) else {
                continue;
            };
            let mut e = e.map_err(|e| bad(&l.digest, e))?;
            let h = e.header().clone();
            let (uid, gid) = fp
                .owner
                .unwrap_or((h.uid().unwrap_or(0), h.gid().unwrap_or(0)));
            let kind = h.entry_type();
            let mode = h.mode().unwrap_or(0o644);
            let mode = match (fp.chmod, kind) {
                (Some(m), tar::EntryType::Regular | tar::EntryType::Directory) => m,
                _ => mode,
            };
            let m = Meta {
                mode,
                uid,
                gid,
                mtime: h.mtime().unwrap_or(0),
            };
            let wr = |e: std::io::Error| BuildError::io(format!("write {dest}"), e);
            match kind {
                tar::EntryType::Directory => w.dir(dest, m).map_err(wr)?,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = h.size().unwrap_or(0);
                    w.file(dest, m, size, &mut e).map_err(wr)?
                }
                tar::EntryType::Symlink => {
                    let t = e
                        .link_name()
                        .ok()
                        .flatten()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    w.symlink(dest, &t, m).map_err(wr)?
                }
                tar::EntryType::Link => {
                    let t = e
                        .link_name()
                        .ok()
                        .flatten()
                        .and_then(|t| clean_path(&t.to_string_lossy()).ok())
                        .unwrap_or_default();
                    match renamed.get(&t) {
                        Some(nt) => w.hardlink(dest, nt, m).map_err(wr)?,
                        None => {
                            return Err(BuildError::Context(format!(
                                "COPY --from={}: /{dest} is a hard link to /{t}, outside what is copied; copy /{t} too",
                                fp.from
                            )))
                        }
                    }
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    let dev = (
                        h.device_major().ok().flatten().unwrap_or(0),
                        h.device_minor().ok().flatten().unwrap_or(0),
                    );
                    w.special(dest, kind, m, dev).map_err(wr)?
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn join_rel(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn build_args() {
        let env = |k: &str| (k == "FROM_ENV").then(|| "e".to_string());
        let a = parse_build_args(
            &[
                "A=1".into(),
                "B=".into(),
                "FROM_ENV".into(),
                "UNSET".into(),
                "C=x=y".into(),
            ],
            env,
        )
        .unwrap();
        assert_eq!(a.get("A").unwrap(), "1");
        assert_eq!(a.get("B").unwrap(), "");
        assert_eq!(a.get("FROM_ENV").unwrap(), "e");
        assert!(!a.contains_key("UNSET"));
        assert_eq!(a.get("C").unwrap(), "x=y");
        for bad in ["=v", "1A=v", "A-B=v", ""] {
            let e = parse_build_args(&[bad.into()], env)
                .unwrap_err()
                .to_string();
            assert!(e.contains("NAME=VALUE"), "{bad}: {e}");
            assert!(!e.contains("=v"), "value not echoed: {e}");
        }
    }

    #[test]
    fn chown() {
        assert_eq!(parse_chown("1000").unwrap(), (1000, 1000));
        assert_eq!(parse_chown("1:2").unwrap(), (1, 2));
        assert!(parse_chown("alice").is_err());
    }

    #[test]
    fn copy_from_applies_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let mk = |f: &dyn Fn(&mut LayerWriter<airlock_image::BlobWriter>)| {
            crate::stagefs::layer_in(&store, f)
        };
        let m = Meta {
            mode: 0o644,
            ..Default::default()
        };
        let l1 = mk(&|w| {
            w.dir("out", Meta { mode: 0o755, ..m }).unwrap();
            w.file("out/a", m, 1, &b"a"[..]).unwrap();
            w.file("out/gone", m, 1, &b"g"[..]).unwrap();
            w.file("other", m, 1, &b"o"[..]).unwrap();
        });
        let l2 = mk(&|w| {
            w.whiteout("out/gone").unwrap();
            w.file("out/a", m, 2, &b"a2"[..]).unwrap();
            w.hardlink("out/h", "out/a", m).unwrap();
        });
        let plan = FromPlan {
            layers: vec![l1, l2],
            sources: vec!["out".into()],
            from: "x".into(),
            dest: "dst".into(),
            into_dir: true,
            owner: Some((5, 6)),
            chmod: None,
        };
        let mut w = LayerWriter::new(Vec::new());
        copy_from_layers(&store, &plan, &mut w).unwrap();
        let (gz, _) = w.finish().unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut got = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut s = String::new();
            let p = e.path().unwrap().display().to_string();
            let uid = e.header().uid().unwrap();
            let link = e.link_name().unwrap().map(|l| l.display().to_string());
            e.read_to_string(&mut s).unwrap();
            got.push((p, s, uid, link));
        }
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(names, ["dst/a", "dst/h"]);
        assert_eq!(got[0].1, "a2");
        assert_eq!(got[0].2, 5);
        assert_eq!(got[1].3.as_deref(), Some("dst/a"));
        let missing = FromPlan {
            sources: vec!["nope".into()],
            ..plan
        };
        let mut w = LayerWriter::new(Vec::new());
        assert!(copy_from_layers(&store, &missing, &mut w)
            .unwrap_err()
            .to_string()
            .contains("no such file"));
    }
}
