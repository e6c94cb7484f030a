//! The vhost-user device: QEMU's `vhost-user-fs-device` connects to our socket, hands over the
//! guest's (shared) RAM and the virtqueues; each request chain is decoded by fuse-backend-rs's
//! hardened FUSE server and answered by [`GuardFs`](crate::guard::GuardFs).
//!
//! **Threat notes.** The guest controls the descriptor chains (addresses, lengths, flags) and
//! every FUSE request inside them; QEMU (itself confined) controls the vhost-user messages.
//! Descriptor addresses are resolved only through vm-memory against the regions QEMU handed
//! over, so a chain cannot reach outside guest RAM; virtio-queue bounds the chains (queue size
//! 1024, indirect tables checked); fuse-backend-rs's server validates each request's lengths
//! before `GuardFs` sees it, and `GuardFs` confines paths to the share and applies file rules.
//! A malformed chain fails that request only; the thread serving it runs under the
//! `airlock-confine` seccomp filter and Landlock (fuzz target `fs_guard` drives `GuardFs`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::guard::GuardFs;

/// High-priority queue plus one request queue (QEMU's default `num-request-queues=1`).
const NUM_QUEUES: usize = 2;
const QUEUE_SIZE: usize = 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// One share's device backend.
pub struct FsBackend {
    server: Server<Arc<GuardFs>>,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    /// Consumer ends of the exit events handed out. vhost-user-backend 0.21 registers each
    /// with epoll through `into_raw_fd` and never closes it (one eventfd leaked per share per
    /// sandbox, found by the 200-cycle load test); we close them when the backend goes, which
    /// is after the daemon's worker threads have been joined.
    exit_fds: std::sync::Mutex<Vec<std::os::fd::RawFd>>,
}

impl Drop for FsBackend {
    fn drop(&mut self) {
        for fd in self.exit_fds.get_mut().unwrap().drain(..) {
            // SAFETY: the fd was created by `exit_event` and given away with `into_raw_fd` to
            // an epoll set that is gone (its worker was joined before the last Arc dropped);
            // nothing else closes it.
            unsafe { libc::close(fd) };
        }
    }
}

impl FsBackend {
    /// A backend serving `fs`.
    pub fn new(fs: Arc<GuardFs>) -> FsBackend {
        FsBackend {
            server: Server::new(fs),
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            exit_fds: Default::default(),
        }
    }

    fn process(&self, vring: &VringMutex) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap().clone() else {
            return Err(io::Error::other("no guest memory yet"));
        };
        let mem = atomic.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(|e| io::Error::other(format!("queue: {e}")))?
            .collect();
        for chain in chains {
            let head = chain.head_index();
            // A malformed chain is the guest's problem: answer it with nothing, keep serving.
            let len = match (
                Reader::from_descriptor_chain(&*mem, chain.clone()),
                VirtioFsWriter::new(&*mem, chain),
            ) {
                (Ok(r), Ok(w)) => match self.server.handle_message(r, w.into(), None, None) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::debug!("virtio-fs request failed: {e}");
                        0
                    }
                },
                _ => {
                    tracing::debug!("virtio-fs: malformed descriptor chain");
                    0
                }
            };
            vring
                .add_used(head, len as u32)
                .map_err(|e| io::Error::other(format!("add_used: {e}")))?;
        }
        vring.signal_used_queue()
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        use std::os::fd::AsRawFd;
        self.exit_fds.lock().unwrap().push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event set"));
        }
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other("event for an unknown queue"))?;
        if self.event_idx.load(Ordering::Relaxed) {
            // Drain, re-enable notifications, and drain again if more arrived meanwhile.
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e}")))?;
                self.process(vring)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e}")))?
                {
                    break;
                }
            }
        } else {
            self.process(vring)?;
        }
        Ok(())
    }
}

// Keep the imported trait in use for `get_mut()` on the vring.
#[allow(dead_code)]
fn _vring_state(_: &VringState) {}
