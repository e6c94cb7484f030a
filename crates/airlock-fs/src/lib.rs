//! Workspace sharing for Airlock sandboxes: an in-process virtio-fs server.
//!
//! Each share is one vhost-user-fs device: QEMU's `vhost-user-fs-device` connects to a unix
//! socket served by a thread of the Airlock process ([`FsServer`]), which answers FUSE requests
//! from fuse-backend-rs's passthrough filesystem confined to the shared directory, behind
//! [`guard::GuardFs`]: read-only shares, [file rules](rules) with audit events, no device
//! nodes, and files the guest creates owned by the invoking host user.

pub mod guard;
pub mod rules;
mod vu;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use guard::{Access, IdMap};
pub use rules::{Action, FsRule, Op, RuleSet};

/// One file-rule decision worth logging: every denial, and allowed operations an `audit` rule
/// names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FsEvent {
    /// Share tag.
    pub share: String,
    /// Operation.
    #[serde(serialize_with = "ser_op")]
    pub op: Op,
    /// Guest path (lossy UTF-8).
    pub path: String,
    /// Whether it was refused.
    pub denied: bool,
}

fn ser_op<S: serde::Serializer>(op: &Op, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(op.name())
}

/// Where [`FsEvent`]s go. Called on the serving thread: keep it quick.
pub type FsEventSink = Arc<dyn Fn(FsEvent) + Send + Sync>;

/// What to serve.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    /// Host directory (the confinement root).
    pub host_dir: PathBuf,
    /// Where the guest sees it (for rule paths and events).
    pub guest_path: String,
    /// virtio-fs tag.
    pub tag: String,
    /// Read-write or read-only.
    pub access: Access,
    /// Owner mapping.
    pub ids: IdMap,
    /// File rules.
    pub rules: Vec<FsRule>,
    /// Most bytes the guest may add to a read-write share (`None`: unbounded).
    pub quota: Option<u64>,
}

/// Errors starting a share.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host directory is unusable.
    #[error("share {path}: {why}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The vhost-user socket or server could not be set up.
    #[error("virtio-fs server for {tag}: {why}")]
    Server {
        /// Share tag.
        tag: String,
        /// Why.
        why: String,
    },
}

/// The policy-wrapped passthrough filesystem for `cfg` (what [`FsServer`] serves; public so the
/// confinement can be tested with hostile requests directly).
pub fn guard_for(cfg: &ShareConfig, sink: Option<FsEventSink>) -> Result<guard::GuardFs, Error> {
    let dir_err = |why: String| Error::Dir {
        path: cfg.host_dir.clone(),
        why,
    };
    let meta = std::fs::metadata(&cfg.host_dir).map_err(|e| dir_err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(dir_err("not a directory".into()));
    }
    let root = cfg
        .host_dir
        .canonicalize()
        .map_err(|e| dir_err(e.to_string()))?;
    let root = root
        .to_str()
        .ok_or_else(|| dir_err("the path is not UTF-8".into()))?
        .to_string();
    let srv_err = |why: String| Error::Server {
        tag: cfg.tag.clone(),
        why,
    };
    let pcfg = Config {
        root_dir: root,
        do_import: true,
        xattr: false,
        writeback: false,
        cache_policy: CachePolicy::Auto,
        ..Default::default()
    };
    let inner = PassthroughFs::<()>::new(pcfg).map_err(|e| srv_err(e.to_string()))?;
    inner.import().map_err(|e| dir_err(e.to_string()))?;
    let fs = guard::GuardFs::new(
        inner,
        cfg.access,
        cfg.ids,
        RuleSet::new(cfg.rules.clone()),
        &cfg.guest_path,
        &cfg.tag,
        sink,
    );
    Ok(match cfg.quota {
        Some(q) => fs.with_quota(q),
        None => fs,
    })
}

/// A running virtio-fs server for one share. It serves one VMM connection and ends when the
/// VMM disconnects; dropping it also ends a server no VMM ever connected to.
pub struct FsServer {
    socket: PathBuf,
    done: Arc<AtomicBool>,
}

impl FsServer {
    /// Listens on `socket` (created; QEMU connects to it) and serves `cfg` on a new thread.
    pub fn start(
        cfg: ShareConfig,
        socket: &Path,
        sink: Option<FsEventSink>,
    ) -> Result<FsServer, Error> {
        let fs = Arc::new(guard_for(&cfg, sink)?);
        let srv_err = |why: String| Error::Server {
            tag: cfg.tag.clone(),
            why,
        };
        let backend = Arc::new(vu::FsBackend::new(fs));
        let mut daemon = VhostUserDaemon::new(
            format!("airlock-fs-{}", cfg.tag),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| srv_err(e.to_string()))?;
        let mut listener = Listener::new(socket, true).map_err(|e| srv_err(e.to_string()))?;
        // Only QEMU, running as this user, connects; the directory is private already.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| srv_err(format!("chmod {}: {e}", socket.display())))?;
        }
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let tag = cfg.tag.clone();
        let allowed = [airlock_confine::Allowed {
            path: cfg.host_dir.canonicalize().map_err(|e| Error::Dir {
                path: cfg.host_dir.clone(),
                why: e.to_string(),
            })?,
            writable: cfg.access == Access::ReadWrite,
        }];
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("airlock-fs-{tag}"))
            .spawn(move || {
                // Confined before the first guest byte; the queue workers inherit it.
                let confined = airlock_confine::fs_server(&allowed);
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if !ok {
                    d.store(true, Ordering::SeqCst);
                    return;
                }
                match daemon.start(&mut listener) {
                    Ok(()) => {
                        if let Err(e) = daemon.wait() {
                            tracing::debug!(%tag, "virtio-fs server ended: {e}");
                        }
                    }
                    Err(e) => tracing::debug!(%tag, "virtio-fs server not started: {e}"),
                }
                d.store(true, Ordering::SeqCst);
                // Dropping the daemon stops and joins its queue workers.
            })
            .map_err(|e| srv_err(e.to_string()))?;
        let server = FsServer {
            socket: socket.to_path_buf(),
            done,
        };
        match ready_rx.recv() {
            Ok(Ok(ll)) => {
                tracing::debug!(tag = %cfg.tag, landlock = ?ll, "virtio-fs server confined")
            }
            Ok(Err(e)) => return Err(srv_err(e.to_string())),
            Err(_) => return Err(srv_err("the server thread ended at start".into())),
        }
        Ok(server)
    }

    /// The socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for FsServer {
    fn drop(&mut self) {
        if !self.done.load(Ordering::SeqCst) {
            // Wakes a server still waiting in accept(); its handshake then fails and it ends.
            let _ = UnixStream::connect(&self.socket);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
