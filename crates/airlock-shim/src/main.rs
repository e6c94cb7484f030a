//! `containerd-shim-airlock-v2`: a containerd shim v2 that runs every pod in a disposable
//! Airlock microVM with a sealed network. One shim process and one VM per pod (the pod
//! sandbox, or the container of a plain `ctr run`, boots it); each container runs in that VM
//! chrooted into its own rootfs, shared from the host over virtio-fs. See docs/kubernetes.md.

mod error;
mod mounts;
mod policy;
mod service;
mod spec;
mod stdio;

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

/// The runtime name containerd knows this shim by.
const RUNTIME: &str = "io.containerd.airlock.v2";

/// The shim: its lifecycle verbs (`start`, `delete`) and the task service.
struct AirlockShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for AirlockShim {
    type T = service::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        AirlockShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    /// Containers of one pod share one shim (and so one VM): the grouping is the pod's id.
    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd runs `start` in the bundle directory.
        let grouping = spec::Spec::load(std::path::Path::new("."))
            .map(|s| s.pod(&opts.id).1)
            .unwrap_or_else(|_| opts.id.clone());
        spawn(opts, &grouping, Vec::new()).await
    }

    /// After a shim died (or a task could not be deleted): undo the mounts of the bundle in
    /// the working directory and report the task killed.
    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::path::Path::new(".");
        if let Ok(s) = spec::Spec::load(bundle) {
            let pod = s.pod(&self.id).1;
            if spec::check_id(&pod).is_ok() && spec::check_id(&self.id).is_ok() {
                let dir = mounts::pod_dir(&self.namespace, &pod);
                let bind = dir.join("c").join(&self.id);
                mounts::unmount(&bind);
                let _ = std::fs::remove_dir(&bind);
                if pod == self.id {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
            mounts::unmount(&s.rootfs(bundle));
        }
        Ok(DeleteResponse {
            exit_status: 137,
            exited_at: MessageField::some(containerd_shim::util::timestamp()?),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(&self.namespace, publisher, self.exit.clone())
    }
}

fn main() {
    // containerd started by an init system often has no HOME: keep Airlock's caches (the
    // guest kernel, the VM root image) in a fixed system place then.
    if std::env::var_os("AIRLOCK_CACHE_DIR").is_none()
        && std::env::var_os("XDG_CACHE_HOME").is_none()
        && std::env::var_os("HOME").is_none()
    {
        std::env::set_var("AIRLOCK_CACHE_DIR", "/var/cache/airlock");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{RUNTIME}: {e}");
            std::process::exit(1);
        }
    };
    // The shim reaps nothing itself: QEMU is waited for by the thread that spawned it (which
    // is also what ties QEMU's life to the shim's, PR_SET_PDEATHSIG), and a reaper calling
    // waitpid(-1) would steal its status.
    let config = Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    rt.block_on(run::<AirlockShim>(RUNTIME, Some(config)));
}
