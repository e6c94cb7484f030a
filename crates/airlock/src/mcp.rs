//! `airlock mcp`: a Model Context Protocol server over stdio (the official Rust SDK, `rmcp`),
//! so an agent can run code in sandboxes: create (image, allowed hosts, secrets by name from
//! this process's environment, shares), exec, read / write / list files, destroy. Sandboxes
//! live in this process; every one it created is killed when the client goes away (stdin EOF)
//! or on SIGTERM / SIGINT.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use airlock_sandbox::{ExecEvent, ExecSpec, Sandbox, SandboxSpec};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::{schemars, tool, tool_handler, tool_router, ServerHandler, ServiceExt};
use serde::Deserialize;
use tokio::sync::Mutex;

/// Most bytes of stdout (and of stderr) an `exec` returns; the rest is counted, not kept, so a
/// chatty guest cannot grow this process.
const MAX_OUTPUT: usize = 256 * 1024;
/// Largest file `read_file` returns.
const MAX_READ: u64 = 4 * 1024 * 1024;
/// Most sandboxes one server keeps at a time.
const MAX_SANDBOXES: usize = 8;

/// One sandbox this server created, with the image's defaults for commands.
struct Entry {
    sb: Arc<Sandbox>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: Option<String>,
}

/// The server: its tools and the sandboxes it owns.
#[derive(Clone)]
pub struct AirlockMcp {
    #[allow(dead_code)] // read by the #[tool_handler] expansion
    tool_router: ToolRouter<Self>,
    sandboxes: Arc<Mutex<HashMap<String, Entry>>>,
    /// `--pool N`: sandboxes kept ready per shape (image, CPUs, memory); 0: no pool.
    pool_size: usize,
    /// One pool per shape, made at its first `create_sandbox`.
    pools: Arc<std::sync::Mutex<HashMap<String, airlock_sandbox::Pool>>>,
}

/// `create_sandbox` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateArgs {
    /// OCI image reference (pulled on first use), e.g. `debian:bookworm`.
    pub image: String,
    /// Hosts the sandbox may reach (`api.example.com`, `*.example.com`, `host:port`). None:
    /// nothing leaves the sandbox.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Secrets as `NAME@HOST[,HOST...]`: the value is taken from the MCP server's own
    /// environment variable NAME (never from these arguments); the sandbox sees only a
    /// placeholder in $NAME, which Airlock swaps for the value in requests to those hosts.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Host directories as `HOSTDIR:GUESTPATH[:rw|:ro]` (default: overlay, the host tree stays
    /// untouched).
    #[serde(default)]
    pub shares: Vec<String>,
    /// Pin names to addresses, `NAME:IP` (e.g. a server on the host's loopback).
    #[serde(default)]
    pub add_hosts: Vec<String>,
    /// PEM files of extra CAs to trust for upstream TLS.
    #[serde(default)]
    pub upstream_ca: Vec<String>,
    /// Guest memory in MiB (default 512).
    pub memory_mb: Option<u32>,
    /// Virtual CPUs (default 1).
    pub cpus: Option<u32>,
}

/// `exec` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExecArgs {
    /// Sandbox id from `create_sandbox`.
    pub sandbox_id: String,
    /// Shell command, run with `/bin/sh -c`.
    pub command: String,
    /// Working directory (default: the image's).
    pub cwd: Option<String>,
    /// Kill the command after this many seconds (default 600).
    pub timeout_secs: Option<u64>,
}

/// Arguments naming a path in a sandbox.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PathArgs {
    /// Sandbox id from `create_sandbox`.
    pub sandbox_id: String,
    /// Absolute path inside the sandbox.
    pub path: String,
}

/// `write_file` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteArgs {
    /// Sandbox id from `create_sandbox`.
    pub sandbox_id: String,
    /// Absolute path inside the sandbox (parent directories must exist).
    pub path: String,
    /// UTF-8 content.
    pub content: String,
    /// Permission bits (default 0o644).
    pub mode: Option<u32>,
}

/// `destroy_sandbox` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct IdArgs {
    /// Sandbox id from `create_sandbox`.
    pub sandbox_id: String,
}

/// A secret argument must name a variable: a value (`NAME=VALUE@…`) would travel through the
/// client and its logs, so it is refused.
fn secret_from_env(s: &str) -> Result<airlock_sandbox::SecretSpec, String> {
    let head = s.rsplit_once('@').map_or(s, |(h, _)| h);
    if head.contains('=') {
        return Err(
            "secrets are given by name only (NAME@HOST): the value comes from the MCP server's environment, never from tool arguments"
                .into(),
        );
    }
    crate::netargs::parse_secret(s, |n| std::env::var(n).ok()).map_err(|e| {
        e.replace("--secret ", "secret ")
            .replace("in this environment", "in the MCP server's environment")
    })
}

impl AirlockMcp {
    /// A server with no sandboxes yet.
    pub fn new() -> AirlockMcp {
        AirlockMcp::with_pool(0)
    }

    /// A server that keeps `pool_size` sandboxes restored and paused for each shape it was
    /// asked for once, so later creates of that shape are claims (see [`airlock_sandbox::Pool`]).
    pub fn with_pool(pool_size: usize) -> AirlockMcp {
        AirlockMcp {
            tool_router: Self::tool_router(),
            sandboxes: Arc::default(),
            pool_size,
            pools: Arc::default(),
        }
    }

    /// Starts `spec`, from this shape's pool when there is one (made now if not).
    async fn start(&self, spec: SandboxSpec) -> Result<Sandbox, airlock_sandbox::Error> {
        if self.pool_size == 0 || !spec.shares.is_empty() {
            return Sandbox::start(spec).await;
        }
        let key = format!(
            "{:?}/{}/{}/{}",
            spec.rootfs, spec.cpus, spec.memory_mib, spec.disk_mib
        );
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            match pools.get(&key) {
                Some(p) => Some(p.clone()),
                None => {
                    let mut shape = SandboxSpec::new(spec.rootfs.clone());
                    (shape.cpus, shape.memory_mib, shape.disk_mib) =
                        (spec.cpus, spec.memory_mib, spec.disk_mib);
                    (shape.kernel, shape.accel) = (spec.kernel.clone(), spec.accel);
                    shape.kernel_args = spec.kernel_args.clone();
                    shape.network.disabled = spec.network.disabled;
                    match airlock_sandbox::Pool::new(shape, self.pool_size) {
                        Ok(p) => {
                            pools.insert(key, p);
                        }
                        Err(e) => tracing::warn!("no pool for this sandbox: {e}"),
                    }
                    None // this create starts on its own; the pool fills meanwhile
                }
            }
        };
        match pool {
            Some(p) => p.start(spec).await,
            None => Sandbox::start(spec).await,
        }
    }

    async fn get(&self, id: &str) -> Result<(Arc<Sandbox>, ExecDefaults), String> {
        let map = self.sandboxes.lock().await;
        let e = map.get(id).ok_or_else(|| {
            format!(
                "no sandbox {id:?} (create one with create_sandbox; ids this server made: {:?})",
                map.keys().collect::<Vec<_>>()
            )
        })?;
        Ok((
            e.sb.clone(),
            ExecDefaults {
                env: e.env.clone(),
                cwd: e.cwd.clone(),
                user: e.user.clone(),
            },
        ))
    }

    /// Kills every sandbox this server created.
    pub async fn destroy_all(&self) {
        let all: Vec<Entry> = self
            .sandboxes
            .lock()
            .await
            .drain()
            .map(|(_, e)| e)
            .collect();
        for e in all {
            e.sb.kill();
            if let Ok(sb) = Arc::try_unwrap(e.sb) {
                let _ = sb.stop().await;
            }
        }
    }
}

impl Default for AirlockMcp {
    fn default() -> Self {
        Self::new()
    }
}

struct ExecDefaults {
    env: Vec<(String, String)>,
    cwd: Option<String>,
    user: Option<String>,
}

fn check_abs(p: &str) -> Result<(), String> {
    if p.starts_with('/') {
        Ok(())
    } else {
        Err(format!("{p:?}: give an absolute path inside the sandbox"))
    }
}

fn json(v: serde_json::Value) -> String {
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

#[tool_router]
impl AirlockMcp {
    /// Boots a sandbox.
    #[tool(
        description = "Create a disposable microVM sandbox from an OCI image. The network is sealed: only allow_hosts are reachable. Secrets are named (NAME@HOST): the sandbox sees a placeholder in $NAME, the real value from the server's environment is swapped in only on requests to those hosts. Shares mount host directories (overlay by default). Returns the sandbox id."
    )]
    async fn create_sandbox(
        &self,
        Parameters(a): Parameters<CreateArgs>,
    ) -> Result<String, String> {
        if self.sandboxes.lock().await.len() >= MAX_SANDBOXES {
            return Err(format!(
                "this server already runs {MAX_SANDBOXES} sandboxes: destroy one first"
            ));
        }
        let mut net = crate::launch::Net {
            allow_hosts: a.allow_hosts.clone(),
            upstream_ca: a.upstream_ca.iter().map(Into::into).collect(),
            ..Default::default()
        };
        for h in &a.add_hosts {
            let (name, ip) = crate::netargs::parse_add_host(h)
                .map_err(|e| e.replace("--add-host ", "add_hosts "))?;
            net.add_hosts.push((name, ip));
        }
        let mut secret_names = Vec::new();
        for s in &a.secrets {
            let s = secret_from_env(s)?;
            secret_names.push(s.name.clone());
            net.secrets.push(crate::launch::Secret {
                name: s.name,
                value: s.value,
                hosts: s.hosts,
                placeholder: None,
                in_body: false,
                allow_http: false,
            });
        }
        for c in &net.upstream_ca {
            if !c.is_file() {
                return Err(format!("upstream_ca {}: no such file", c.display()));
            }
        }
        let launch = crate::launch::Launch {
            image: Some(a.image.clone()),
            platform: Some("linux/amd64".into()),
            cpus: a.cpus.unwrap_or(airlock_sandbox::DEFAULT_CPUS).clamp(1, 64),
            memory_mib: a.memory_mb.unwrap_or(airlock_sandbox::DEFAULT_MEMORY_MIB),
            disk_mib: airlock_sandbox::DEFAULT_DISK_MIB,
            net,
            mounts: a.shares.clone(),
            ..Default::default()
        };
        let spec = launch.spec().await?;
        let (env, cwd, user) = match crate::image::resolve(&a.image)? {
            Some((store, rec)) => {
                let c = store.image_config(&rec).map_err(|e| e.to_string())?;
                (
                    c.env_pairs(),
                    c.working_dir().filter(|w| !w.is_empty()).map(String::from),
                    c.user().filter(|u| !u.is_empty()).map(String::from),
                )
            }
            None => (Vec::new(), None, None),
        };
        let sb = self.start(spec).await.map_err(|e| e.to_string())?;
        let id = sb.id().to_string();
        let start = match (sb.pooled(), sb.template().is_some()) {
            (true, _) => "pool",
            (false, true) => "warm",
            (false, false) => "cold",
        };
        self.sandboxes.lock().await.insert(
            id.clone(),
            Entry {
                sb: Arc::new(sb),
                env,
                cwd,
                user,
            },
        );
        Ok(json(serde_json::json!({
            "sandbox_id": id,
            "image": a.image,
            "allow_hosts": a.allow_hosts,
            "secrets_as_placeholders": secret_names,
            "start": start,
        })))
    }

    /// Runs a shell command.
    #[tool(
        description = "Run a shell command (/bin/sh -c) in a sandbox; returns exit_code, stdout and stderr (each capped at 256 KiB)."
    )]
    async fn exec(&self, Parameters(a): Parameters<ExecArgs>) -> Result<String, String> {
        let (sb, d) = self.get(&a.sandbox_id).await?;
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), a.command],
            env: d.env,
            cwd: a.cwd.or(d.cwd),
            user: d.user,
            ..Default::default()
        };
        let mut ex = sb.exec(spec).await.map_err(|e| e.to_string())?;
        let (mut out, mut err, mut dropped) = (Vec::new(), Vec::new(), 0usize);
        let keep = |buf: &mut Vec<u8>, b: Vec<u8>, dropped: &mut usize| {
            let room = MAX_OUTPUT.saturating_sub(buf.len());
            *dropped += b.len().saturating_sub(room);
            buf.extend_from_slice(&b[..b.len().min(room)]);
        };
        let timeout = Duration::from_secs(a.timeout_secs.unwrap_or(600).max(1));
        let run = async {
            loop {
                match ex.next().await.map_err(|e| e.to_string())? {
                    Some(ExecEvent::Stdout(b)) => keep(&mut out, b, &mut dropped),
                    Some(ExecEvent::Stderr(b)) => keep(&mut err, b, &mut dropped),
                    Some(ExecEvent::Exit(s)) => return Ok::<_, String>(s.code),
                    Some(ExecEvent::Failed(e)) => {
                        return Err(format!("cannot start /bin/sh: {e:?}"))
                    }
                    Some(_) => {}
                    None => return Err("the command's stream ended without an exit status".into()),
                }
            }
        };
        let code = match tokio::time::timeout(timeout, run).await {
            Ok(r) => r?,
            Err(_) => {
                let _ = ex.input().signal(libc::SIGKILL, true).await;
                return Err(format!("timed out after {}s (killed)", timeout.as_secs()));
            }
        };
        Ok(json(serde_json::json!({
            "exit_code": code,
            "stdout": String::from_utf8_lossy(&out),
            "stderr": String::from_utf8_lossy(&err),
            "truncated_bytes": dropped,
        })))
    }

    /// Reads a file.
    #[tool(description = "Read a file from a sandbox (UTF-8 text; at most 4 MiB).")]
    async fn read_file(&self, Parameters(a): Parameters<PathArgs>) -> Result<String, String> {
        check_abs(&a.path)?;
        let (sb, _) = self.get(&a.sandbox_id).await?;
        let mut data = Vec::new();
        sb.read_file_range(&a.path, 0, Some(MAX_READ + 1), &mut data)
            .await
            .map_err(|e| e.to_string())?;
        if data.len() as u64 > MAX_READ {
            return Err(format!(
                "{}: larger than 4 MiB; read it with exec (head, tail, grep)",
                a.path
            ));
        }
        String::from_utf8(data).map_err(|_| {
            format!(
                "{}: not UTF-8 text; inspect it with exec (file, xxd)",
                a.path
            )
        })
    }

    /// Writes a file.
    #[tool(description = "Write a UTF-8 file in a sandbox (created or replaced).")]
    async fn write_file(&self, Parameters(a): Parameters<WriteArgs>) -> Result<String, String> {
        check_abs(&a.path)?;
        let (sb, _) = self.get(&a.sandbox_id).await?;
        sb.write_file(
            &a.path,
            a.content.as_bytes(),
            a.mode.unwrap_or(0o644) & 0o7777,
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(format!("wrote {} bytes to {}", a.content.len(), a.path))
    }

    /// Lists a directory.
    #[tool(description = "List a directory in a sandbox: name, size, mode, is_dir of each entry.")]
    async fn list_files(&self, Parameters(a): Parameters<PathArgs>) -> Result<String, String> {
        check_abs(&a.path)?;
        let (sb, _) = self.get(&a.sandbox_id).await?;
        let list = sb.list_files(&a.path).await.map_err(|e| e.to_string())?;
        Ok(json(serde_json::Value::Array(
            list.into_iter()
                .map(|f| {
                    serde_json::json!({"name": f.name, "size": f.size, "mode": format!("{:o}", f.mode & 0o7777), "is_dir": f.is_dir})
                })
                .collect(),
        )))
    }

    /// Destroys a sandbox.
    #[tool(
        description = "Destroy a sandbox: its VM is killed and everything not in an rw share is gone."
    )]
    async fn destroy_sandbox(&self, Parameters(a): Parameters<IdArgs>) -> Result<String, String> {
        let e = self
            .sandboxes
            .lock()
            .await
            .remove(&a.sandbox_id)
            .ok_or_else(|| format!("no sandbox {:?}", a.sandbox_id))?;
        e.sb.kill();
        if let Ok(sb) = Arc::try_unwrap(e.sb) {
            let _ = sb.stop().await;
        }
        Ok(format!("destroyed {}", a.sandbox_id))
    }
}

#[tool_handler]
impl ServerHandler for AirlockMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "Airlock runs code in disposable microVMs with a sealed network. Create a sandbox, exec commands and edit files in it, destroy it when done.",
        )
    }
}

/// `airlock mcp`: serves until the client closes stdin or a termination signal, then kills
/// every sandbox it created.
pub async fn serve(pool_size: usize) -> i32 {
    let server = AirlockMcp::with_pool(pool_size);
    if pool_size > 0 {
        let pools = server.pools.clone();
        tokio::spawn(crate::pool::publish("mcp", move || {
            let pools = pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.values().map(|p| p.status()).collect()
        }));
    }
    let running = match server.clone().serve(rmcp::transport::stdio()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airlock mcp: {e}");
            return 1;
        }
    };
    let ct = running.cancellation_token();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = running.waiting() => {}
        _ = term.recv() => ct.cancel(),
        _ = tokio::signal::ctrl_c() => ct.cancel(),
    }
    server.destroy_all().await;
    // Pooled VMs and their state dirs go with their pools (the exit below would skip drops).
    server
        .pools
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    // Exit here: a blocking read of stdin cannot be cancelled, and the runtime would wait for
    // it on shutdown (after SIGTERM the client may keep stdin open).
    std::process::exit(0)
}
