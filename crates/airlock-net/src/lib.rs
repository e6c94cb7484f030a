//! Airlock's sealed network. The guest's NIC ends here, in a userspace TCP/IP stack: DNS is
//! answered locally, every connection is checked against the allow rules before anything is
//! dialled, TLS to hosts that carry secrets is terminated with a per-sandbox CA so placeholders
//! can be swapped for the real values in flight, and every decision is an audit event.
//!
//! ```no_run
//! # fn demo(sock: std::os::unix::net::UnixStream) -> Result<(), airlock_net::NetError> {
//! use airlock_net::{Network, NetworkConfig};
//! let net = Network::new(NetworkConfig {
//!     allow_hosts: vec!["api.example.com".into()],
//!     ..Default::default()
//! })?;
//! net.start(sock)?; // the host end of QEMU's `-netdev stream` socket; served on its own thread
//! net.allow("*.github.com")?;
//! # Ok(()) }
//! ```

pub mod audit;
pub mod ca;
pub mod dns;
pub mod policy;
pub mod proxy;
pub mod rewrite;
pub mod secrets;
pub mod stack;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

pub use audit::{Audit, Event, Record};
pub use policy::{AllowRule, HostPattern, Policy, PolicyError, Verdict};
pub use proxy::{ProxyContext, ProxyError, Secret, Target};

/// Errors setting up a sandbox network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A rule, pin or range is malformed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The TLS interception could not be set up.
    #[error("{0}")]
    Proxy(String),
    /// Host I/O (the audit file).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The netstack thread could not start or confine itself.
    #[error("cannot start the network: {0}")]
    Start(String),
}

/// A sandbox's network policy.
#[derive(Clone, Default)]
pub struct NetworkConfig {
    /// Allow rules (see [`policy`]).
    pub allow_hosts: Vec<String>,
    /// Names pinned to addresses.
    pub add_hosts: Vec<(String, IpAddr)>,
    /// Private ranges names may resolve to.
    pub allow_private: Vec<String>,
    /// Secrets to substitute in flight.
    pub secrets: Vec<Secret>,
    /// Extra PEM roots for upstream TLS.
    pub upstream_ca: Vec<PathBuf>,
    /// Audit log file (JSON lines).
    pub audit_file: Option<PathBuf>,
}

/// State shared by the netstack, the DNS server and the proxy tasks.
pub(crate) struct Shared {
    pub(crate) policy: RwLock<Policy>,
    pub(crate) table: Mutex<dns::Synthetic>,
    pub(crate) audit: Audit,
    pub(crate) proxy: Arc<proxy::ProxyContext>,
    pub(crate) counters: Counters,
}

/// Ethernet traffic of the guest NIC, counted where the frames cross QEMU's socket.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) rx_bytes: std::sync::atomic::AtomicU64,
    pub(crate) rx_frames: std::sync::atomic::AtomicU64,
    pub(crate) tx_bytes: std::sync::atomic::AtomicU64,
    pub(crate) tx_frames: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub(crate) fn add(
        bytes: &std::sync::atomic::AtomicU64,
        frames: &std::sync::atomic::AtomicU64,
        n: usize,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        bytes.fetch_add(n as u64, Relaxed);
        frames.fetch_add(1, Relaxed);
    }
}

/// What the guest NIC has moved, from the guest's point of view (as `docker stats` shows a
/// container's NET I/O): `rx` is what the guest received, `tx` what it sent, dropped frames
/// included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetCounters {
    /// Bytes of ethernet frames delivered to the guest.
    pub rx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes of ethernet frames the guest sent.
    pub tx_bytes: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
}

/// A netstack whose thread [`Network::spawn`] started.
#[must_use = "wait() says whether the netstack came up"]
pub struct Starting {
    ready: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Starting {
    /// Waits until the netstack is confined and serves the NIC, or says why it could not.
    pub fn wait(self) -> Result<(), NetError> {
        self.ready
            .recv()
            .map_err(|_| NetError::Start("the netstack thread ended at start".into()))?
            .map_err(NetError::Start)
    }
}

/// One sandbox's network: policy, DNS table, CA and audit log. Dropping it stops the stack.
pub struct Network {
    shared: Arc<Shared>,
    /// Ends the netstack thread when dropped (or replaced).
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("rules", &self.rules())
            .finish()
    }
}

impl Network {
    /// Checks the configuration and prepares everything but the NIC.
    pub fn new(cfg: NetworkConfig) -> Result<Network, NetError> {
        let policy = Policy::new(&cfg.allow_hosts, &cfg.add_hosts, &cfg.allow_private)?;
        let audit = Audit::new(cfg.audit_file.as_deref())?;
        let proxy = proxy::ProxyContext::new(cfg.secrets, &cfg.upstream_ca, audit.clone())
            .map_err(|e| NetError::Proxy(e.to_string()))?;
        Ok(Network {
            shared: Arc::new(Shared {
                policy: RwLock::new(policy),
                table: Mutex::new(dns::Synthetic::default()),
                audit,
                proxy: Arc::new(proxy),
                counters: Counters::default(),
            }),
            stop: Mutex::new(None),
        })
    }

    /// Serves the guest NIC on `sock` (the host end of QEMU's netdev stream socket) on a
    /// thread of its own, confined ([`airlock_confine::netstack`]) before it
    /// reads the first frame; the DNS server and every proxy connection run there too.
    pub fn start(&self, sock: std::os::unix::net::UnixStream) -> Result<(), NetError> {
        self.spawn(sock)?.wait()
    }

    /// As [`Network::start`], without waiting for the netstack's thread to be confined and
    /// serving: the guest's frames wait in `sock` meanwhile. [`Starting::wait`] says whether it
    /// came up; a claimed pooled VM resumes in the meantime.
    pub fn spawn(&self, sock: std::os::unix::net::UnixStream) -> Result<Starting, NetError> {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("airlock-net".into())
            .spawn(move || {
                let setup = || -> Result<tokio::runtime::Runtime, String> {
                    let ll = airlock_confine::netstack().map_err(|e| e.to_string())?;
                    tracing::debug!(landlock = ?ll, "netstack confined");
                    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .thread_name("airlock-net-blocking")
                        .build()
                        .map_err(|e| e.to_string())
                };
                let rt = match setup() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let sock = match tokio::net::UnixStream::from_std(sock) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        _ = stack::run(sock, shared) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime ends the proxy tasks still running.
            })
            .map_err(|e| NetError::Start(e.to_string()))?;
        // The stop sender is in place at once: dropping the Network ends the thread even if
        // nobody waits for it.
        self.stop.lock().unwrap().replace(stop_tx);
        Ok(Starting { ready: ready_rx })
    }

    /// The guest NIC's traffic so far.
    pub fn counters(&self) -> NetCounters {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared.counters;
        NetCounters {
            rx_bytes: c.rx_bytes.load(Relaxed),
            rx_frames: c.rx_frames.load(Relaxed),
            tx_bytes: c.tx_bytes.load(Relaxed),
            tx_frames: c.tx_frames.load(Relaxed),
        }
    }

    /// PEM of the per-sandbox CA the guest must trust.
    pub fn ca_pem(&self) -> String {
        self.shared.proxy.ca_pem()
    }

    /// `(name, placeholder)` of each secret, for the guest's environment.
    pub fn placeholders(&self) -> Vec<(String, String)> {
        self.shared.proxy.placeholders()
    }

    /// Adds an allow rule now; existing connections are unaffected.
    pub fn allow(&self, rule: &str) -> Result<(), NetError> {
        let r = self.shared.policy.write().unwrap().allow(rule)?;
        self.shared.audit.record(Event::Policy {
            action: "allow".into(),
            rule: r.to_string(),
        });
        Ok(())
    }

    /// Removes an allow rule; new connections and DNS answers stop matching it at once.
    /// Returns whether it was there.
    pub fn remove(&self, rule: &str) -> Result<bool, NetError> {
        let found = self.shared.policy.write().unwrap().remove(rule)?;
        if found {
            self.shared.audit.record(Event::Policy {
                action: "remove".into(),
                rule: rule.to_string(),
            });
        }
        Ok(found)
    }

    /// The allow rules in force.
    pub fn rules(&self) -> Vec<String> {
        self.shared
            .policy
            .read()
            .unwrap()
            .rules()
            .iter()
            .map(|r| r.to_string())
            .collect()
    }

    /// The audit log (subscribe for events).
    pub fn audit(&self) -> &Audit {
        &self.shared.audit
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.stop.lock().unwrap().take();
    }
}
