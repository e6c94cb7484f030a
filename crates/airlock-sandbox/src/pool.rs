//! A warm pool: sandboxes restored from their template ahead of time and paused, so a start
//! is a claim (resume, attach the claimer's network, `Init`) instead of a QEMU launch and a
//! restore. Refilled in the background, one VM at a time.
//!
//! A pooled VM has had only a throw-away `Init` and its warm-up ([`warm_up`]): it holds no
//! identity of a claimer, no CA whose key anyone has, no network policy, no secret. The claim
//! gives it all of those as a warm start does (new hostname, machine-id, RNG seed, clock, CA;
//! the ext4 UUID its warm-up renewed from the VM's own seed), so pool siblings are as
//! distinct as warm ones.
//! Every pooled QEMU dies with the process holding the pool (`PR_SET_PDEATHSIG`), and
//! dropping the [`Pool`] kills them and removes their state directories.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use airlock_backend::Backend;
use serde_json::json;

use crate::launch::{self, Launched};
use crate::{network, qmp, stats, template, Error, Sandbox, SandboxSpec};

/// Sandboxes kept restored and paused for one sandbox shape. Cheap to share (`Clone`).
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    shape: SandboxSpec,
    key: Shape,
    size: usize,
    backend: Arc<dyn Backend>,
    state: Mutex<State>,
    /// Wakes the refill task (apart from `Inner`, so the waiting task holds no pool alive).
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Launched>,
    /// VMs being restored now.
    filling: usize,
    /// The template the pool restores; known after its first fill.
    inputs: Option<template::Inputs>,
    claimed: u64,
    /// Claims that found the pool empty (or the spec unlike the pool's) and started anew.
    missed: u64,
    last_error: Option<String>,
    /// [`Pool::close`] was called: no refill.
    closed: bool,
    /// When a VM was last taken.
    last_take: Option<std::time::Instant>,
}

/// How long after a VM is taken the refill waits before restoring another: a restore is about
/// a second of CPU, and on a small machine it would otherwise compete with the claimed
/// sandbox's first steps, which are what a claim is for.
const REFILL_AFTER_TAKE: std::time::Duration = std::time::Duration::from_millis(300);

/// What a pool holds now.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PoolStatus {
    /// Sandboxes it keeps ready.
    pub size: usize,
    /// Ready now (restored, paused).
    pub ready: usize,
    /// Being restored now.
    pub filling: usize,
    /// Claims served from the pool.
    pub claimed: u64,
    /// Claims that started a sandbox anew instead.
    pub missed: u64,
    /// Proportional set size of the ready VMs' QEMU processes, summed (bytes).
    pub idle_pss_bytes: u64,
    /// QEMU process ids of the ready VMs.
    pub pids: Vec<u32>,
    /// The template key, once the first VM is in.
    pub template: Option<String>,
    /// Why the last refill failed, if it did.
    pub last_error: Option<String>,
}

impl Pool {
    /// Keeps `size` sandboxes of `shape` ready, with the default backend (QEMU). Must be called
    /// within a tokio runtime; filling starts at once, in the background. `shape` must be able
    /// to start warm: no shares, volumes, snapshot, fixed id, kept disk or `cold`.
    pub fn new(shape: SandboxSpec, size: usize) -> Result<Pool, Error> {
        Pool::with_backend(
            shape,
            size,
            Arc::new(airlock_backend::qemu::Qemu::default()),
        )
    }

    /// [`Pool::new`] with `backend`.
    pub fn with_backend(
        shape: SandboxSpec,
        size: usize,
        backend: Arc<dyn Backend>,
    ) -> Result<Pool, Error> {
        let Some(key) = Shape::of(&shape) else {
            return Err(Error::Setup(format!(
                "a pool cannot hold sandboxes that {}",
                unpoolable(&shape).unwrap_or("differ")
            )));
        };
        if size == 0 || size > MAX_POOL {
            return Err(Error::Setup(format!(
                "pool size {size}: give 1 to {MAX_POOL}"
            )));
        }
        let inner = Arc::new(Inner {
            shape,
            key,
            size,
            backend,
            state: Mutex::new(State::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
        });
        tokio::spawn(refill(Arc::downgrade(&inner)));
        Ok(Pool { inner })
    }

    /// A sandbox for `spec`: a pooled one when the pool has one ready and `spec` has the
    /// pool's shape (root, CPUs, memory, disk, kernel, accelerator, NIC), else one started
    /// as [`Sandbox::start`] would. The network policy, secrets, hostname and `privileged`
    /// come from `spec` either way.
    pub async fn start(&self, spec: SandboxSpec) -> Result<Sandbox, Error> {
        let fits = self.fits(&spec);
        if fits {
            crate::boot::check(&spec)?;
        }
        let Some(l) = fits.then(|| self.take_ready()).flatten() else {
            self.lock().missed += 1;
            return Sandbox::start_with(spec, self.inner.backend.as_ref()).await;
        };
        self.inner.wake.notify_one();
        // A bad rule drops the VM taken; the refill replaces it.
        let network = match spec.network.disabled {
            true => None,
            false => Some(network::build(&spec.network)?),
        };
        let l = match resume(l).await {
            Ok(l) => l,
            Err(why) => {
                tracing::warn!("a pooled sandbox would not resume ({why}); starting anew");
                self.lock().missed += 1;
                return Sandbox::start_with(spec, self.inner.backend.as_ref()).await;
            }
        };
        self.lock().claimed += 1;
        // `finish` marks it pooled; a claim that fell back to a cold boot (the restored VM did
        // not come up) is a new, unpooled sandbox.
        Sandbox::finish(l, spec, network, self.inner.backend.as_ref(), true).await
    }

    /// Kills the ready VMs and stops refilling; claimed sandboxes are not touched.
    pub fn close(&self) {
        let ready: Vec<_> = {
            let mut st = self.lock();
            st.closed = true;
            st.ready.drain(..).collect()
        };
        drop(ready);
    }

    /// Sizes, counters and idle memory.
    pub fn status(&self) -> PoolStatus {
        let st = self.lock();
        PoolStatus {
            size: self.inner.size,
            ready: st.ready.len(),
            filling: st.filling,
            claimed: st.claimed,
            missed: st.missed,
            idle_pss_bytes: st
                .ready
                .iter()
                .map(|l| stats::of_process(l.vm.pid()).pss_bytes)
                .sum(),
            pids: st.ready.iter().map(|l| l.vm.pid()).collect(),
            template: st.inputs.as_ref().map(|i| i.key()),
            last_error: st.last_error.clone(),
        }
    }

    /// Waits until the pool holds `n` ready sandboxes (at most its size) or a refill fails.
    pub async fn wait_ready(&self, n: usize) -> Result<(), Error> {
        let n = n.min(self.inner.size);
        loop {
            {
                let st = self.lock();
                if st.ready.len() >= n {
                    return Ok(());
                }
                if let Some(e) = &st.last_error {
                    return Err(Error::Setup(format!("the pool cannot fill: {e}")));
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `spec` would restore the same template the pool holds.
    fn fits(&self, spec: &SandboxSpec) -> bool {
        Shape::of(spec).is_some_and(|s| s == self.inner.key)
    }

    /// The shape of the sandboxes it holds.
    pub fn shape(&self) -> &Shape {
        &self.inner.key
    }

    pub(crate) fn count_miss(&self) {
        self.lock().missed += 1;
    }

    pub(crate) fn count_claim(&self) {
        self.lock().claimed += 1;
    }

    /// Wakes the refill task (a VM was taken).
    pub(crate) fn refill_now(&self) {
        self.inner.wake.notify_one();
    }

    /// A ready VM that is still alive; dead ones are dropped.
    pub(crate) fn take_ready(&self) -> Option<Launched> {
        let mut st = self.lock();
        while let Some(l) = st.ready.pop_front() {
            if l.vm.exit_watch().borrow().is_none() {
                st.last_take = Some(std::time::Instant::now());
                return Some(l);
            }
            tracing::warn!("a pooled sandbox had died; dropped it");
        }
        None
    }
}

/// What must be equal for a claim to fit a pool: everything the template's restore depends
/// on. Compared within one process and across processes (a claim from `airlock run`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// The root (image manifest and store, or the path), as this build of Airlock names it.
    rootfs: String,
    cpus: u32,
    memory_mib: u32,
    disk_mib: u64,
    kernel: Option<std::path::PathBuf>,
    kernel_args: Vec<String>,
    accel: Option<String>,
    no_network: bool,
    /// The warm-up's Init fixed the agent's privilege (a restriction is for good).
    privileged: bool,
    /// Which Airlock (protocol, version and binary) holds the pool: another build may boot
    /// another agent or kernel.
    airlock: String,
}

impl Shape {
    /// `spec`'s shape; `None` if it cannot come from a pool.
    pub fn of(spec: &SandboxSpec) -> Option<Shape> {
        if unpoolable(spec).is_some() {
            return None;
        }
        Some(Shape {
            rootfs: spec.rootfs.identity(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            disk_mib: spec.disk_mib,
            kernel: spec.kernel.clone(),
            kernel_args: spec.kernel_args.clone(),
            accel: spec.accel.map(|a| a.to_string()),
            no_network: spec.network.disabled,
            privileged: spec.privileged,
            airlock: build_identity(),
        })
    }
}

/// This binary: protocol, version, and its file's size and mtime.
fn build_identity() -> String {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::metadata("/proc/self/exe")
        .map(|m| format!("{}.{}.{}", m.size(), m.mtime(), m.mtime_nsec()))
        .unwrap_or_default();
    format!(
        "{}/{}/{exe}",
        airlock_proto::VERSION,
        env!("CARGO_PKG_VERSION")
    )
}

/// Most sandboxes one pool keeps.
pub const MAX_POOL: usize = 64;

/// Why `spec` cannot come from (or make) a pool, if it cannot.
fn unpoolable(spec: &SandboxSpec) -> Option<&'static str> {
    if spec.cold {
        Some("must boot cold")
    } else if !spec.shares.is_empty() {
        Some("have shares (vhost-user-fs cannot migrate)")
    } else if !spec.volumes.is_empty() {
        Some("have volumes")
    } else if spec.from_snapshot.is_some() {
        Some("start from a snapshot")
    } else if spec.id.is_some() {
        Some("have a fixed id")
    } else if spec.writable_disk.is_some() {
        Some("keep their writable disk")
    } else if spec.builder_target.is_some() || crate::warm::bench_9p(spec) {
        Some("are image builders or benchmark VMs")
    } else {
        None
    }
}

/// Keeps the pool full while it exists.
async fn refill(pool: Weak<Inner>) {
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let pool = Pool { inner };
        let (want, quiet) = {
            let mut st = pool.lock();
            let want = st.ready.len() + st.filling < pool.inner.size
                && st.last_error.is_none()
                && !st.closed;
            let quiet = st
                .last_take
                .map(|t| REFILL_AFTER_TAKE.saturating_sub(t.elapsed()))
                .unwrap_or_default();
            if want && quiet.is_zero() {
                st.filling += 1;
            }
            (want, quiet)
        };
        if want && !quiet.is_zero() {
            drop(pool);
            tokio::time::sleep(quiet).await;
            continue;
        }
        if !want {
            let wake = pool.inner.wake.clone();
            drop(pool);
            // Woken by a claim; the timeout lets a dropped pool end this task.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), wake.notified()).await;
            continue;
        }
        let made = prepare(&pool.inner.shape, pool.inner.backend.as_ref()).await;
        let mut st = pool.lock();
        st.filling -= 1;
        match made {
            Ok(_) if st.closed => {}
            Ok(l) => {
                if st.inputs.is_none() {
                    st.inputs = l.inputs.clone();
                }
                st.ready.push_back(l);
            }
            Err(e) => {
                tracing::warn!("cannot fill the pool: {e}");
                st.last_error = Some(e.to_string());
            }
        }
    }
}

/// One VM restored from the shape's template (built first if there is none) and paused.
async fn prepare(shape: &SandboxSpec, backend: &dyn Backend) -> Result<Launched, Error> {
    let mut l = match launch::launch(shape, backend, true).await? {
        launch::Outcome::Up(l) => l,
        launch::Outcome::RestoreFailed => match launch::launch(shape, backend, true).await? {
            launch::Outcome::Up(l) => l,
            launch::Outcome::RestoreFailed => {
                return Err(Error::Setup(
                    "the template could not be restored twice".into(),
                ))
            }
        },
    };
    if l.template.is_none() {
        return Err(Error::Setup(
            "no template could be made for the pool's sandboxes (see the warnings above)".into(),
        ));
    }
    l = warm_up(l, shape.privileged).await?;
    l = qmp_command(l, "stop").await?;
    Ok(l)
}

/// Runs the paths a claim will take once in this QEMU process, so the claim finds them
/// translated (under TCG every new QEMU process translates the guest's code afresh): a
/// throw-away `Init` (no network policy, secret or share, a CA whose key is dropped: the
/// claim's `Init` replaces every field), a throw-away `Resume`, then the execs of [`crate::warmup`]. The
/// image's own code runs here as it would in the claim, with nothing of any claimer in the
/// VM, and `reap` ends whatever it left running.
async fn warm_up(mut l: Launched, privileged: bool) -> Result<Launched, Error> {
    let nic = l.nic_host.is_some();
    let launch::Control::Raw(s) = l.control else {
        return Err(Error::Setup("the pooled VM was greeted already".into()));
    };
    let raw = s.try_clone()?;
    s.set_nonblocking(true)?;
    let (conn, mut ctl) = crate::conn::Conn::start(tokio::net::UnixStream::from_std(s)?);
    // The claim's Init repeats what this one does, then finds it translated and its files
    // written already (see crate::warmup).
    let throwaway = || crate::warmup::throwaway_init(nic, privileged);
    let kernel = crate::handshake(&conn, &mut ctl, &throwaway()?, crate::RESTORE_TIMEOUT).await?;
    // A claim from another process greets with `Resume`, whose paths (and the second-time
    // ones of every `Init` step) then run here once too.
    let rehearsal = airlock_proto::Resume {
        nonce: hex::encode(crate::random_bytes::<16>()),
        first_stream: 1,
        init: throwaway()?,
    };
    conn.send(airlock_proto::Frame::json(
        airlock_proto::Kind::Resume,
        airlock_proto::CONTROL_STREAM,
        &rehearsal,
    ))
    .await
    .map_err(Error::Protocol)?;
    match tokio::time::timeout(crate::RESTORE_TIMEOUT, ctl.recv()).await {
        Ok(Some(crate::conn::ControlEvent::Resumed)) => {}
        other => {
            return Err(Error::Setup(format!(
                "the pooled VM answered {other:?} to its warm-up Resume"
            )))
        }
    }
    let next_stream = crate::warmup::run_execs(&conn, 1).await?;
    l.control = launch::Control::Started {
        conn,
        ctl,
        next_stream,
        raw,
        kernel,
    };
    Ok(l)
}

/// Resumes a paused pooled VM.
async fn resume(l: Launched) -> Result<Launched, Error> {
    qmp_command(l, "cont").await
}

/// Runs one argument-less QMP command on the VM's monitor.
async fn qmp_command(mut l: Launched, cmd: &'static str) -> Result<Launched, Error> {
    let Some(mut mon) = l.monitor.take() else {
        return Err(Error::Setup("the pooled VM has no monitor".into()));
    };
    let (mon, res) = tokio::task::spawn_blocking(move || {
        let r = mon
            .session()
            .and_then(|q: &mut qmp::Qmp| q.execute(cmd, json!({})))
            .map(|_| ());
        (mon, r)
    })
    .await
    .map_err(|e| Error::Setup(e.to_string()))?;
    l.monitor = Some(mon);
    res.map_err(|e| Error::Setup(format!("QMP {cmd}: {e}")))?;
    Ok(l)
}
