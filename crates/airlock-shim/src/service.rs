//! The task service containerd (and kubelet through CRI) drives: one shim process and one
//! microVM per pod; every container of the pod runs in that VM chrooted into its own rootfs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use airlock_sandbox::{
    ExecEvent, ExecInput, ExecSpec, RootfsSource, Sandbox, SandboxSpec, Share, ShareMode, WinSize,
};
use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::timestamp;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, context::Context};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use log::{info, warn};
use tokio::sync::{mpsc, watch, Notify};

use crate::error::ShimError;
use crate::{mounts, policy, spec, stdio};

/// Colon-separated PEM files the sealed network trusts for upstream TLS besides the host's
/// roots (set in containerd's environment: shims inherit it).
pub const UPSTREAM_CA_ENV: &str = "AIRLOCK_UPSTREAM_CA";
/// Where the pod directory appears in the guest.
const GUEST_PODS: &str = "/containers";
/// Exit status reported for a process whose VM went away under it (as SIGKILL).
const VM_GONE: u32 = 137;
/// Output chunks buffered per process between the guest and a slow FIFO reader.
const OUTPUT_QUEUE: usize = 64;

type Result<T> = std::result::Result<T, ShimError>;

/// How a process stands.
#[derive(Debug, Clone)]
enum Phase {
    Created,
    Running { pid: u32 },
    Stopped { pid: u32, code: u32, at: Timestamp },
}

/// One process: a container's init (exec id empty) or an exec in it.
struct Proc {
    container: String,
    exec_id: String,
    stdio: stdio::Paths,
    /// The command, until started.
    spec: Mutex<Option<ExecSpec>>,
    phase: watch::Sender<Phase>,
    input: Mutex<Option<ExecInput>>,
    close_stdin: Arc<Notify>,
    /// Its pid inside the VM, once started.
    guest_pid: std::sync::atomic::AtomicU32,
    /// A CRI pod sandbox's process: nothing runs for it (the VM is the pod; a pause process
    /// holding namespaces has no job in it). It "runs" until killed.
    hollow: bool,
}

impl Proc {
    fn new(container: &str, exec_id: &str, stdio: stdio::Paths, spec: ExecSpec) -> Arc<Proc> {
        Self::make(container, exec_id, stdio, Some(spec))
    }

    fn make(
        container: &str,
        exec_id: &str,
        stdio: stdio::Paths,
        spec: Option<ExecSpec>,
    ) -> Arc<Proc> {
        Arc::new(Proc {
            hollow: spec.is_none(),
            container: container.into(),
            exec_id: exec_id.into(),
            stdio,
            spec: Mutex::new(spec),
            phase: watch::channel(Phase::Created).0,
            input: Mutex::new(None),
            close_stdin: Arc::new(Notify::new()),
            guest_pid: Default::default(),
        })
    }

    fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    fn pid(&self) -> u32 {
        match self.phase() {
            Phase::Created => 0,
            Phase::Running { pid } | Phase::Stopped { pid, .. } => pid,
        }
    }

    /// Records the exit once; returns whether this call did.
    fn stop(&self, code: u32) -> bool {
        let pid = self.pid();
        self.phase.send_if_modified(|p| {
            if matches!(p, Phase::Stopped { .. }) {
                return false;
            }
            *p = Phase::Stopped {
                pid,
                code,
                at: timestamp().unwrap_or_default(),
            };
            true
        })
    }
}

/// A container of the pod.
struct Container {
    bundle: PathBuf,
    /// We mounted Create's rootfs mounts on the bundle's rootfs (and unmount it at delete).
    mounted_rootfs: bool,
    /// Destinations of the volumes bound inside its rootfs.
    volumes: Vec<String>,
    rootfs: PathBuf,
    /// Its rootfs bound into the pod directory.
    bind: PathBuf,
    init: Arc<Proc>,
    execs: HashMap<String, Arc<Proc>>,
}

/// The pod's VM.
struct Pod {
    sandbox: Sandbox,
    /// The pod directory on the host (`…/c` inside is the share).
    dir: PathBuf,
    /// The container that started the pod: when its process ends, the VM ends.
    owner: String,
    /// Env names holding secrets: dropped from every container's env.
    secrets: Vec<String>,
}

/// A CRI pod whose VM boots with its first container: the secrets named by the pod's
/// annotations come from that container's environment (the sandbox has none).
struct Pending {
    owner: String,
    annotations: HashMap<String, String>,
    hostname: Option<String>,
}

#[derive(Default)]
struct State {
    pod: Option<Arc<Pod>>,
    pending: Option<Pending>,
    containers: HashMap<String, Container>,
}

/// The shim's task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    state: tokio::sync::Mutex<State>,
}

impl Service {
    /// A service publishing to containerd through `publisher`; `exit` ends the shim.
    pub fn new(namespace: &str, publisher: RemotePublisher, exit: Arc<ExitSignal>) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.into(),
                publisher,
                exit,
                state: Default::default(),
            }),
        }
    }
}

impl Inner {
    async fn publish(&self, topic: &str, ev: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, ev)
            .await
        {
            warn!("publish {topic}: {e}");
        }
    }

    async fn publish_exit(&self, p: &Proc) {
        if let Phase::Stopped { pid, code, at } = p.phase() {
            let id = if p.exec_id.is_empty() {
                p.container.clone()
            } else {
                p.exec_id.clone()
            };
            let ev = TaskExit {
                container_id: p.container.clone(),
                id,
                pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            };
            self.publish(
                containerd_shim_protos::topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(ev),
            )
            .await;
        }
    }

    async fn proc(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>> {
        let st = self.state.lock().await;
        let c = st
            .containers
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))?;
        if exec_id.is_empty() {
            Ok(c.init.clone())
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} not found in {id}")))
        }
    }

    async fn create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        spec::check_id(&req.id)?;
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Invalid(
                "checkpoint/restore is not supported".into(),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = spec::Spec::load(&bundle)?;
        let process = oci.process.clone().unwrap_or_default();
        let (starts_pod, pod_id) = oci.pod(&req.id);
        spec::check_id(&pod_id)?;
        let env = spec::env_pairs(&process.env);
        let cri_sandbox = oci
            .annotations
            .get(spec::CRI_CONTAINER_TYPE)
            .is_some_and(|t| t == "sandbox");

        let mut st = self.state.lock().await;
        if st.containers.contains_key(&req.id) {
            return Err(ShimError::State(format!(
                "container {} already exists",
                req.id
            )));
        }
        if starts_pod && (st.pod.is_some() || st.pending.is_some()) {
            return Err(ShimError::State(format!(
                "this shim already runs a pod; {} cannot start another",
                req.id
            )));
        }
        if !starts_pod && st.pod.is_none() && st.pending.is_none() {
            return Err(ShimError::State(format!(
                "container {}: its pod sandbox {pod_id} is not running in this shim",
                req.id
            )));
        }
        if cri_sandbox {
            // Checked now (a typo fails RunPodSandbox); booted with the first container.
            policy::check_syntax(&oci.annotations)?;
            st.pending = Some(Pending {
                owner: req.id.clone(),
                annotations: oci.annotations.clone(),
                hostname: oci.hostname.clone(),
            });
            let paths = stdio::Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            st.containers.insert(
                req.id.clone(),
                Container {
                    bundle,
                    mounted_rootfs: false,
                    volumes: Vec::new(),
                    rootfs: PathBuf::new(),
                    bind: PathBuf::new(),
                    init: Proc::make(&req.id, "", paths, None),
                    execs: HashMap::new(),
                },
            );
            drop(st);
            info!(
                "created pod sandbox {} (its VM boots with the first container)",
                req.id
            );
            self.publish_create(req, std::process::id()).await;
            return Ok(std::process::id());
        }
        // Policy before any mount or boot: a typo costs nothing.
        let boot_with = if st.pod.is_some() {
            None
        } else if let Some(p) = &st.pending {
            Some((
                p.owner.clone(),
                policy::from_annotations(&p.annotations, &env)?,
                p.hostname.clone(),
            ))
        } else {
            Some((
                req.id.clone(),
                policy::from_annotations(&oci.annotations, &env)?,
                oci.hostname.clone(),
            ))
        };

        let volumes = mounts::volumes(&oci.mounts)?;
        let rootfs = oci.rootfs(&bundle);
        let mut mounted_rootfs = false;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| ShimError::Host(format!("mkdir {}: {e}", rootfs.display())))?;
            mounts::mount_rootfs(&req.rootfs, &rootfs).await?;
            mounted_rootfs = true;
        }
        let vol_dests: Vec<String> = volumes.iter().map(|v| v.destination.clone()).collect();
        let undo_rootfs = |mounted: bool| {
            mounts::unmount_volumes(&rootfs, &vol_dests);
            if mounted {
                mounts::unmount(&rootfs);
            }
        };
        if !mounts::non_empty_dir(&rootfs) {
            undo_rootfs(mounted_rootfs);
            return Err(ShimError::Invalid(format!(
                "rootfs {} is missing or empty",
                rootfs.display()
            )));
        }

        let dir = match &st.pod {
            Some(p) => p.dir.clone(),
            None => mounts::pod_dir(&self.namespace, &pod_id),
        };
        if let Err(e) = mounts::mount_volumes(&rootfs, &volumes) {
            if mounted_rootfs {
                mounts::unmount(&rootfs);
            }
            return Err(e);
        }
        let bind = dir.join("c").join(&req.id);
        if let Err(e) = mounts::bind(&rootfs, &bind) {
            undo_rootfs(mounted_rootfs);
            return Err(e);
        }
        let cleanup = |pod_too: bool| {
            mounts::unmount(&bind);
            let _ = std::fs::remove_dir(&bind);
            undo_rootfs(mounted_rootfs);
            if pod_too {
                let _ = std::fs::remove_dir_all(&dir);
            }
        };

        if let Some((owner, policy, hostname)) = boot_with {
            match boot(&owner, hostname, policy, &dir).await {
                Ok(pod) => {
                    st.pod = Some(Arc::new(pod));
                    st.pending = None;
                }
                Err(e) => {
                    cleanup(true);
                    return Err(e);
                }
            }
        }
        let pod = st.pod.clone().expect("pod present");
        let root = format!("{GUEST_PODS}/{}", req.id);
        let exec = spec::exec_spec(&process, &root, !req.stdin.is_empty(), &pod.secrets);
        let paths = stdio::Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let init = Proc::new(&req.id, "", paths, exec);
        st.containers.insert(
            req.id.clone(),
            Container {
                bundle,
                mounted_rootfs,
                volumes: vol_dests.clone(),
                rootfs,
                bind,
                init,
                execs: HashMap::new(),
            },
        );
        let pid = pod.sandbox.vm_pid();
        drop(st);
        info!("created {} (pod {pod_id})", req.id);
        self.publish_create(req, pid).await;
        Ok(pid)
    }

    async fn publish_create(&self, req: &api::CreateTaskRequest, pid: u32) {
        self.publish(
            containerd_shim_protos::topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(containerd_shim_protos::events::task::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
    }

    async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let p = self.proc(id, exec_id).await?;
        if p.hollow {
            if !matches!(p.phase(), Phase::Created) {
                return Err(ShimError::State(format!("{id}: already started")));
            }
            let pid = std::process::id();
            p.phase.send_replace(Phase::Running { pid });
            self.publish(
                containerd_shim_protos::topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: id.into(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
            return Ok(pid);
        }
        let pod = self
            .state
            .lock()
            .await
            .pod
            .clone()
            .ok_or_else(|| ShimError::State("the pod VM is not running".into()))?;
        if exec_id.is_empty() && id != pod.owner {
            // Any container but the pod's first needs the pod alive.
            if let Some(Phase::Stopped { .. }) =
                self.proc(&pod.owner, "").await.ok().map(|o| o.phase())
            {
                return Err(ShimError::State("the pod sandbox has exited".into()));
            }
        }
        let spec = p
            .spec
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| ShimError::State(format!("{id} {exec_id}: already started")))?;
        // Sinks and source before the process runs, so no output is lost.
        let out = stdio::open_sink(&p.stdio.stdout).await?;
        let err = if p.stdio.terminal {
            None
        } else {
            stdio::open_sink(&p.stdio.stderr).await?
        };
        let src = stdio::open_source(&p.stdio.stdin)?;
        let mut exec = pod.sandbox.exec(spec).await?;
        let pid = match exec.next().await {
            Ok(Some(ExecEvent::Started(pid))) => pid,
            Ok(Some(ExecEvent::Failed(e))) => {
                let code = match e.kind {
                    airlock_proto::ExecErrorKind::NotFound => 127,
                    _ => 126,
                };
                p.stop(code);
                return Err(ShimError::Invalid(e.message));
            }
            Ok(_) => {
                return Err(ShimError::Host(
                    "the guest did not start the process".into(),
                ))
            }
            Err(e) => return Err(ShimError::Sandbox(e)),
        };
        p.guest_pid.store(pid, std::sync::atomic::Ordering::Relaxed);
        // A container's own pid is the host process that holds it, the VM (containerd and
        // its tools take task pids for host pids); an exec's is its pid in the guest.
        let pid = if exec_id.is_empty() {
            pod.sandbox.vm_pid()
        } else {
            pid
        };
        p.phase.send_replace(Phase::Running { pid });
        let input = exec.input();
        *p.input.lock().unwrap() = Some(input.clone());
        if let Some(src) = src {
            tokio::spawn(stdio::pump_stdin(src, input, p.close_stdin.clone()));
        }
        let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
        tokio::spawn(write_output(rx, out, err));
        let me = self.clone();
        let (proc2, pod2) = (p.clone(), pod.clone());
        tokio::spawn(async move { me.pump(exec, proc2, pod2, tx).await });
        if exec_id.is_empty() {
            self.publish(
                containerd_shim_protos::topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: id.into(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                containerd_shim_protos::topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(pid)
    }

    /// Moves a running process's output to its writer until it exits (or its VM goes),
    /// then reports the exit.
    async fn pump(
        self: Arc<Self>,
        mut exec: airlock_sandbox::Exec,
        p: Arc<Proc>,
        pod: Arc<Pod>,
        out: mpsc::Sender<(bool, Vec<u8>)>,
    ) {
        let code = loop {
            match exec.next().await {
                Ok(Some(ExecEvent::Stdout(b))) => {
                    let _ = out.send((false, b)).await;
                }
                Ok(Some(ExecEvent::Stderr(b))) => {
                    let _ = out.send((true, b)).await;
                }
                Ok(Some(ExecEvent::Exit(s))) => {
                    break match (s.code, s.signal) {
                        (Some(c), _) => c as u32,
                        (None, Some(sig)) => 128 + sig as u32,
                        _ => VM_GONE,
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break VM_GONE,
            }
        };
        drop(out);
        p.input.lock().unwrap().take();
        if p.stop(code) {
            self.publish_exit(&p).await;
        }
        // The pod's first process is the pod: when it ends, so does the VM, and every other
        // process in it (their pumps then report them as killed).
        if p.exec_id.is_empty() && p.container == pod.owner {
            info!(
                "pod process of {} exited ({code}): stopping the VM",
                p.container
            );
            pod.sandbox.kill();
        }
    }

    async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let p = self.proc(id, exec_id).await?;
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| ShimError::Invalid(format!("bad signal {signal}")))?;
        match p.phase() {
            Phase::Created => {
                // Never started: it "dies" of the signal without having run.
                p.spec.lock().unwrap().take();
                if p.stop(128 + signal as u32) {
                    self.publish_exit(&p).await;
                }
                if exec_id.is_empty() {
                    self.end_pod_if_owner(id).await;
                }
                Ok(())
            }
            Phase::Stopped { .. } => Err(ShimError::NotFound(format!(
                "process {id} {exec_id} already finished"
            ))),
            Phase::Running { .. } if p.hollow => {
                if p.stop(128 + signal as u32) {
                    self.publish_exit(&p).await;
                }
                self.end_pod_if_owner(id).await;
                Ok(())
            }
            Phase::Running { .. } => {
                let input = p.input.lock().unwrap().clone();
                match input {
                    // The whole process group: a shell's children go with it, as they do
                    // when a terminal hangs up.
                    Some(i) => i.signal(signal, all || signal == libc::SIGKILL).await?,
                    None => return Err(ShimError::NotFound("process already finished".into())),
                }
                if all && exec_id.is_empty() {
                    let execs: Vec<Arc<Proc>> = self
                        .state
                        .lock()
                        .await
                        .containers
                        .get(id)
                        .map(|c| c.execs.values().cloned().collect())
                        .unwrap_or_default();
                    for e in execs {
                        let i = e.input.lock().unwrap().clone();
                        if let Some(i) = i {
                            let _ = i.signal(signal, true).await;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    async fn end_pod_if_owner(&self, id: &str) {
        if let Some(pod) = self.state.lock().await.pod.clone() {
            if pod.owner == id {
                pod.sandbox.kill();
            }
        }
    }

    async fn delete(&self, id: &str, exec_id: &str) -> Result<api::DeleteResponse> {
        let mut st = self.state.lock().await;
        let c = st
            .containers
            .get_mut(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id} not found")))?;
        let p = if exec_id.is_empty() {
            c.init.clone()
        } else {
            c.execs
                .get(exec_id)
                .cloned()
                .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} not found")))?
        };
        if let Phase::Running { .. } = p.phase() {
            return Err(ShimError::State(format!(
                "{id} {exec_id} is running: kill it first"
            )));
        }
        if matches!(p.phase(), Phase::Created) {
            p.stop(VM_GONE);
        }
        let (pid, code, at) = match p.phase() {
            Phase::Stopped { pid, code, at } => (pid, code, at),
            _ => (0, 0, Timestamp::default()),
        };
        let resp = api::DeleteResponse {
            pid,
            exit_status: code,
            exited_at: MessageField::some(at.clone()),
            ..Default::default()
        };
        if !exec_id.is_empty() {
            c.execs.remove(exec_id);
            return Ok(resp);
        }
        // Processes of other execs still running keep the exec alive: kill them.
        for e in c.execs.values() {
            let i = e.input.lock().unwrap().clone();
            if let Some(i) = i {
                let _ = i.signal(libc::SIGKILL, true).await;
            }
        }
        let c = st.containers.remove(id).expect("present");
        if !c.bind.as_os_str().is_empty() {
            mounts::unmount(&c.bind);
            let _ = std::fs::remove_dir(&c.bind);
        }
        if !c.volumes.is_empty() {
            mounts::unmount_volumes(&c.rootfs, &c.volumes);
        }
        if c.mounted_rootfs {
            mounts::unmount(&c.rootfs);
        }
        let last = st.containers.is_empty();
        let owner = st.pod.as_ref().is_some_and(|p| p.owner == id);
        if st.pending.as_ref().is_some_and(|p| p.owner == id) {
            st.pending = None;
        }
        if last || owner {
            if let Some(pod) = st.pod.take() {
                pod.sandbox.kill();
                // Remaining containers' mounts go with the pod directory.
                for (_, other) in st.containers.drain() {
                    if !other.bind.as_os_str().is_empty() {
                        mounts::unmount(&other.bind);
                    }
                    if !other.volumes.is_empty() {
                        mounts::unmount_volumes(&other.rootfs, &other.volumes);
                    }
                    if other.mounted_rootfs {
                        mounts::unmount(&other.rootfs);
                    }
                }
                let dir = pod.dir.clone();
                drop(pod);
                let _ = std::fs::remove_dir_all(&dir);
                if let Some(ns_dir) = dir.parent() {
                    let _ = std::fs::remove_dir(ns_dir);
                }
            }
        }
        drop(st);
        info!("deleted {id} (bundle {})", c.bundle.display());
        self.publish(
            containerd_shim_protos::topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.into(),
                pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        )
        .await;
        Ok(resp)
    }

    async fn exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        spec::check_id(&req.exec_id)?;
        let value = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        let process: spec::Process = serde_json::from_slice(value).map_err(|e| {
            ShimError::Invalid(format!("exec {}: bad process spec: {e}", req.exec_id))
        })?;
        if process.args.is_empty() || process.args[0].is_empty() {
            return Err(ShimError::Invalid(format!("exec {}: no args", req.exec_id)));
        }
        let mut st = self.state.lock().await;
        let secrets = st
            .pod
            .as_ref()
            .map(|p| p.secrets.clone())
            .unwrap_or_default();
        let c = st
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("container {} not found", req.id)))?;
        if !matches!(c.init.phase(), Phase::Running { .. }) {
            return Err(ShimError::State(format!(
                "container {} is not running",
                req.id
            )));
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(ShimError::State(format!(
                "exec {} already exists",
                req.exec_id
            )));
        }
        let root = format!("{GUEST_PODS}/{}", req.id);
        let spec = spec::exec_spec(&process, &root, !req.stdin.is_empty(), &secrets);
        let paths = stdio::Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.execs.insert(
            req.exec_id.clone(),
            Proc::new(&req.id, &req.exec_id, paths, spec),
        );
        drop(st);
        self.publish(
            containerd_shim_protos::topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }
}

/// Boots the pod's VM for its first container `owner`.
async fn boot(
    owner: &str,
    hostname: Option<String>,
    policy: policy::Policy,
    dir: &Path,
) -> Result<Pod> {
    let cache = airlock_sandbox::assets::cache_dir();
    let root = mounts::vm_root(&cache)?;
    let mut s = SandboxSpec::new(RootfsSource::Dir(root));
    if let Some(m) = policy.memory_mib {
        s.memory_mib = m;
    }
    if let Some(c) = policy.cpus {
        s.cpus = c;
    }
    s.hostname = hostname.filter(|h| !h.is_empty() && h.len() <= 64);
    let secrets = policy.secret_names();
    s.network = policy.network;
    // Node-level, not per pod: extra roots for upstream TLS (a corporate CA), as
    // `--upstream-ca` is for `airlock run`.
    if let Some(cas) = std::env::var_os(UPSTREAM_CA_ENV) {
        for p in std::env::split_paths(&cas).filter(|p| !p.as_os_str().is_empty()) {
            if !p.is_file() {
                return Err(ShimError::Invalid(format!(
                    "{UPSTREAM_CA_ENV}: {} is not a file",
                    p.display()
                )));
            }
            s.network.upstream_ca.push(p);
        }
    }
    s.shares = vec![Share {
        host: dir.join("c"),
        guest: GUEST_PODS.into(),
        mode: ShareMode::Rw,
    }];
    // Container roots are the pod's files: no quota beyond the host's disk.
    s.share_quota_mib = 1 << 30;
    info!("booting the pod VM for {owner}");
    let sandbox = Sandbox::start(s).await?;
    Ok(Pod {
        sandbox,
        dir: dir.to_path_buf(),
        owner: owner.into(),
        secrets,
    })
}

/// Writes a process's output to its sinks, then closes them (the reader sees EOF).
async fn write_output(
    mut rx: mpsc::Receiver<(bool, Vec<u8>)>,
    mut out: Option<stdio::Sink>,
    mut err: Option<stdio::Sink>,
) {
    while let Some((is_err, b)) = rx.recv().await {
        let sink = if is_err { &mut err } else { &mut out };
        stdio::write(sink, &b).await;
    }
}

fn ttrpc_err(e: ShimError) -> ttrpc::Error {
    e.into()
}

fn status_of(p: &Phase) -> Status {
    match p {
        Phase::Created => Status::CREATED,
        Phase::Running { .. } => Status::RUNNING,
        Phase::Stopped { .. } => Status::STOPPED,
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        let pid = self.inner.create(&req).await.map_err(|e| {
            warn!("create {}: {e}", req.id);
            ttrpc_err(e)
        })?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        let pid = self
            .inner
            .start(&req.id, &req.exec_id)
            .await
            .map_err(ttrpc_err)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        let p = self
            .inner
            .proc(&req.id, &req.exec_id)
            .await
            .map_err(ttrpc_err)?;
        let bundle = {
            let st = self.inner.state.lock().await;
            st.containers
                .get(&req.id)
                .map(|c| c.bundle.display().to_string())
                .unwrap_or_default()
        };
        let phase = p.phase();
        let mut r = api::StateResponse {
            id: req.id.clone(),
            bundle,
            pid: p.pid(),
            status: status_of(&phase).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        if let Phase::Stopped { code, at, .. } = phase {
            r.exit_status = code;
            r.exited_at = MessageField::some(at);
        }
        Ok(r)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        let p = self
            .inner
            .proc(&req.id, &req.exec_id)
            .await
            .map_err(ttrpc_err)?;
        let mut rx = p.phase.subscribe();
        let phase = rx
            .wait_for(|ph| matches!(ph, Phase::Stopped { .. }))
            .await
            .map(|r| r.clone())
            .map_err(|_| ttrpc_err(ShimError::State("process gone".into())))?;
        let Phase::Stopped { code, at, .. } = phase else {
            unreachable!("waited for Stopped")
        };
        Ok(api::WaitResponse {
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        self.inner
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(ttrpc_err)?;
        Ok(api::Empty::default())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        self.inner
            .delete(&req.id, &req.exec_id)
            .await
            .map_err(ttrpc_err)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        self.inner.exec(&req).await.map_err(ttrpc_err)?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        let p = self
            .inner
            .proc(&req.id, &req.exec_id)
            .await
            .map_err(ttrpc_err)?;
        let input = p.input.lock().unwrap().clone();
        // A client without a real terminal reports 0x0: keep the size the process has.
        if let (Some(i), true) = (input, req.width > 0 && req.height > 0) {
            let ws = WinSize {
                rows: req.height.min(u16::MAX as u32) as u16,
                cols: req.width.min(u16::MAX as u32) as u16,
            };
            i.resize(ws)
                .await
                .map_err(|e| ttrpc_err(ShimError::Sandbox(e)))?;
        }
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<api::Empty> {
        let p = self
            .inner
            .proc(&req.id, &req.exec_id)
            .await
            .map_err(ttrpc_err)?;
        if req.stdin {
            // A permit is stored if the pump is not waiting yet.
            p.close_stdin.notify_one();
        }
        Ok(api::Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        let st = self.inner.state.lock().await;
        let c = st.containers.get(&req.id).ok_or_else(|| {
            ttrpc_err(ShimError::NotFound(format!(
                "container {} not found",
                req.id
            )))
        })?;
        let processes = std::iter::once(&c.init)
            .chain(c.execs.values())
            .filter(|p| matches!(p.phase(), Phase::Running { .. }))
            .map(|p| ProcessInfo {
                pid: p.guest_pid.load(std::sync::atomic::Ordering::Relaxed),
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        use containerd_shim_protos::cgroups::metrics::{
            CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics,
        };
        use containerd_shim_protos::protobuf::Message;
        let pod = {
            let st = self.inner.state.lock().await;
            if !st.containers.contains_key(&req.id) {
                return Err(ttrpc_err(ShimError::NotFound(format!(
                    "container {} not found",
                    req.id
                ))));
            }
            st.pod.clone()
        };
        let s = pod.map(|p| p.sandbox.stats()).unwrap_or_default();
        // The VM's cost: QEMU's CPU time and resident memory (the pod shares one VM).
        let m = Metrics {
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: s.cpu_ns,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: MessageField::some(MemoryEntry {
                    usage: s.rss_bytes,
                    ..Default::default()
                }),
                rss: s.rss_bytes,
                ..Default::default()
            }),
            ..Default::default()
        };
        let value = m
            .write_to_bytes()
            .map_err(|e| ttrpc_err(ShimError::Host(e.to_string())))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v1.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = self
            .inner
            .state
            .lock()
            .await
            .pod
            .as_ref()
            .map(|p| p.sandbox.vm_pid())
            .unwrap_or_default();
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> ttrpc::Result<api::Empty> {
        let st = self.inner.state.lock().await;
        if !req.now && !st.containers.is_empty() {
            return Ok(api::Empty::default());
        }
        if let Some(p) = &st.pod {
            p.sandbox.kill();
        }
        drop(st);
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }
}
