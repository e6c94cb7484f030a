//! Pool claims across processes: a holder (`airlock pool serve`) hands one of its ready VMs
//! to the process that will run it (`airlock run`), over a unix socket, with SCM_RIGHTS.
//!
//! The holder answers a claim with a [`Ticket`] and the VM's descriptors: the control
//! channel, QEMU's monitor, a pidfd of QEMU and, with a NIC, the NIC's host end. It keeps the
//! QEMU child (it is QEMU's parent for `PR_SET_PDEATHSIG` and reaps it) and the state
//! directory's lock, and the connection stays open as a lifeline: when it closes (the
//! claimer is done, or was killed) the holder kills QEMU and removes the state directory;
//! when QEMU ends first, the holder writes its exit status on the connection. The claimer
//! greets the agent with `Resume`, whose nonce marks where its reads begin, so whatever the
//! holder's reader had buffered does not matter; the claimer's netstack is the NIC's first
//! reader (the VM had no network until then).
//!
//! Threat note: both ends are one user (the socket lives in the private runtime directory,
//! and the peer's uid is checked), so this is no trust boundary; messages are still bounded.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use airlock_backend::{Vm, VmExit};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use crate::pool::{Pool, Shape};
use crate::{conn, launch, network, qmp, snapshot, state, Error, Sandbox, SandboxSpec};

/// Longest line either side sends.
const MAX_LINE: usize = 64 * 1024;
/// How long a peer may take to send its line.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct Request {
    shape: Shape,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    /// Nothing of that shape is ready; the text says why.
    Miss(String),
    Ticket(Box<Ticket>),
}

/// What comes with a handed-over VM's descriptors.
#[derive(Serialize, Deserialize)]
struct Ticket {
    id: String,
    accel: String,
    accel_reason: String,
    pid: u32,
    template: Option<String>,
    launch: Option<snapshot::LaunchInfo>,
    /// Streams below this one were the holder's (its warm-up).
    next_stream: u32,
    kernel: String,
    /// Whether a NIC host end is the fourth descriptor.
    nic: bool,
}

/// QEMU's end, as the holder saw it.
#[derive(Serialize, Deserialize)]
struct Ended {
    code: Option<i32>,
    signal: Option<i32>,
}

impl Pool {
    /// Serves one claim from another process on `stream` (a connection to the holder's
    /// socket), then holds the handed-over VM until the claimer closes the connection.
    pub async fn serve_claim(&self, mut stream: UnixStream) -> Result<(), Error> {
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        match stream.peer_cred() {
            Ok(c) if c.uid() == me => {}
            _ => return Err(Error::Setup("a claim from another user was refused".into())),
        }
        let line = read_line(&mut stream).await?;
        let req: Request = serde_json::from_slice(&line)
            .map_err(|e| Error::Protocol(format!("bad claim: {e}")))?;
        let taken = match req.shape == *self.shape() {
            true => self.take_ready(),
            false => None,
        };
        let Some(l) = taken else {
            self.count_miss();
            let why = match req.shape == *self.shape() {
                true => "the pool has no sandbox ready",
                false => "the pool holds sandboxes of another shape",
            };
            stream
                .write_all(&json_line(&Answer::Miss(why.into()))?)
                .await?;
            return Ok(());
        };
        self.refill_now();
        let launch::Launched {
            id,
            accel,
            state,
            vm,
            control,
            nic_host,
            monitor,
            template,
            launch,
            ..
        } = l;
        let launch::Control::Started {
            conn,
            next_stream,
            raw,
            kernel,
            ..
        } = control
        else {
            vm.kill();
            return Err(Error::Setup("a pooled VM was not warmed up".into()));
        };
        // This process reads the control channel no more.
        conn.abort();
        drop(conn);
        let mon = match &monitor {
            Some(qmp::Monitor::Ready(q)) => q.stream().try_clone()?,
            _ => {
                vm.kill();
                return Err(Error::Setup("a pooled VM has no monitor session".into()));
            }
        };
        let Some(pidfd) = vm.pidfd() else {
            vm.kill();
            return Err(Error::Setup("the backend cannot hand over its VMs".into()));
        };
        let ticket = Ticket {
            id,
            accel: accel.accel.to_string(),
            accel_reason: accel.reason,
            pid: vm.pid(),
            template,
            launch,
            next_stream,
            kernel,
            nic: nic_host.is_some(),
        };
        let mut fds = vec![raw.as_raw_fd(), mon.as_raw_fd(), pidfd];
        fds.extend(nic_host.as_ref().map(|n| n.as_raw_fd()));
        let answer = json_line(&Answer::Ticket(Box::new(ticket)))?;
        if let Err(e) = send_with_fds(&stream, &answer, &fds).await {
            vm.kill();
            return Err(e.into());
        }
        drop((raw, mon, nic_host, monitor));
        self.count_claim();

        // The lifeline: the claimer's end of this connection.
        let mut exit = vm.exit_watch();
        let mut buf = [0u8; 256];
        let ended = tokio::select! {
            _ = async { while !matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {} } => None,
            e = exit.wait_for(|e| e.is_some()) => {
                let e = e.ok().and_then(|e| *e);
                Some(Ended { code: e.and_then(|e| e.code), signal: e.and_then(|e| e.signal) })
            }
        };
        let claimer_gone = ended.is_none();
        if let Some(ended) = ended {
            let _ = stream.write_all(&json_line(&ended)?).await;
        }
        if !claimer_gone {
            // Held until the claimer lets go: the state directory is its sandbox's too.
            while !matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {}
        }
        vm.kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), exit.wait_for(|e| e.is_some())).await;
        drop(state);
        Ok(())
    }
}

/// Claims a sandbox for `spec` from the pool holder listening on `socket`: `Ok(None)` when
/// the holder has none of `spec`'s shape ready, so the caller starts one anew. The network policy, secrets, hostname and identity are `spec`'s,
/// as for any warm start.
///
/// `shape` is `Shape::of(spec)`, computed once by the caller (which compares it with the
/// shapes holders publish; for a directory root it walks the tree).
pub async fn claim(
    socket: &Path,
    spec: &SandboxSpec,
    shape: &Shape,
) -> Result<Option<Sandbox>, Error> {
    tracing::debug!("claiming from {}", socket.display());
    crate::boot::check(spec)?;
    let mut stream = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(socket))
        .await
        .map_err(|_| {
            Error::Setup(format!(
                "{}: the pool holder does not answer",
                socket.display()
            ))
        })??;
    stream
        .write_all(&json_line(&Request {
            shape: shape.clone(),
        })?)
        .await?;
    let (line, fds) = tokio::time::timeout(LINE_TIMEOUT, recv_with_fds(&stream))
        .await
        .map_err(|_| Error::Setup("the pool holder did not answer the claim".into()))??;
    let ticket = match serde_json::from_slice::<Answer>(&line) {
        Ok(Answer::Miss(why)) => {
            tracing::debug!(%why, "pool miss");
            return Ok(None);
        }
        Ok(Answer::Ticket(t)) => t,
        Err(e) => {
            return Err(Error::Protocol(format!(
                "bad answer from the pool holder: {e}"
            )))
        }
    };
    tracing::debug!(id = %ticket.id, "pool handed over a VM");
    let want = if ticket.nic { 4 } else { 3 };
    if fds.len() != want || ticket.nic == spec.network.disabled {
        return Err(Error::Protocol(format!(
            "the pool holder sent {} descriptors, not {want}",
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted above");
    let (control, mon, pidfd) = (next(), next(), next());
    let nic_host = ticket.nic.then(next);
    // The guest wakes while the rest is set up: it only waits for `Resume` (nothing but the
    // agent runs in a pooled VM: its warm-up ends with `reap`), and its frames wait in the
    // sockets until read.
    let mon = std::os::unix::net::UnixStream::from(mon);
    let cont = tokio::task::spawn_blocking(move || {
        let mut q = qmp::Qmp::in_command_mode(mon)?;
        q.execute("cont", json!({}))?;
        Ok::<_, qmp::QmpError>(q)
    });
    // Built on a hit only (a miss starts anew, which builds its own); a bad rule drops the
    // VM taken, and the holder refills.
    let network = match spec.network.disabled {
        true => None,
        false => Some(network::build(&spec.network)?),
    };

    let (lifeline_rd, lifeline) = stream.into_split();
    let vm = Adopted::new(ticket.pid, pidfd, lifeline_rd, lifeline);
    let state = state::StateDir::adopt(&ticket.id)?;
    let net_starting = match (&network, nic_host) {
        (Some(net), Some(host)) => Some(net.spawn(std::os::unix::net::UnixStream::from(host))?),
        _ => None,
    };
    let (nonce, marker) = crate::resume_marker();
    let control = std::os::unix::net::UnixStream::from(control);
    control.set_nonblocking(true)?;
    let (conn, mut ctl) = conn::Conn::start_after(UnixStream::from_std(control)?, Some(marker));
    let mut launch = ticket.launch;
    if let Some(li) = &mut launch {
        li.privileged = spec.privileged;
    }
    let sb = Sandbox {
        id: ticket.id,
        accel: airlock_backend::AccelChoice {
            accel: ticket.accel.parse().map_err(Error::Protocol)?,
            reason: ticket.accel_reason,
        },
        conn: conn.clone(),
        vm: Box::new(vm),
        scratch: state.path().join("scratch.ext4"),
        state,
        next_stream: Arc::new(AtomicU32::new(ticket.next_stream)),
        kernel_release: ticket.kernel,
        network,
        _fs: Vec::new(),
        _volumes: Vec::new(),
        ram_file: None,
        monitor: std::sync::Mutex::new(None),
        template: ticket.template,
        launch,
        pooled: true,
    };
    sb.watch_vm();
    // The Resume waits in the socket while QEMU resumes.
    let resumed = crate::resume(
        &sb,
        &mut ctl,
        spec,
        nonce,
        ticket.next_stream,
        crate::RESTORE_TIMEOUT.min(spec.ready_timeout),
    );
    let (resumed, cont) = tokio::join!(resumed, cont);
    tracing::debug!("pooled VM resumed");
    if let Some(n) = net_starting {
        n.wait()?;
    }
    let q = cont
        .map_err(|e| Error::Setup(e.to_string()))?
        .map_err(|e| Error::Setup(format!("resume the pooled VM: {e}")))?;
    *sb.monitor.lock().unwrap_or_else(|e| e.into_inner()) = Some(qmp::Monitor::Ready(q));
    resumed?;
    Ok(Some(sb))
}

/// A VM another process (the pool holder) is the parent of.
struct Adopted {
    pid: u32,
    pidfd: OwnedFd,
    exit: tokio::sync::watch::Receiver<Option<VmExit>>,
    /// Dropping it closes the lifeline: the holder then kills QEMU.
    _lifeline: tokio::net::unix::OwnedWriteHalf,
}

impl Adopted {
    fn new(
        pid: u32,
        pidfd: OwnedFd,
        mut rd: tokio::net::unix::OwnedReadHalf,
        lifeline: tokio::net::unix::OwnedWriteHalf,
    ) -> Adopted {
        let (tx, exit) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            // The holder's one line: how QEMU ended (EOF: the holder itself is gone, and
            // QEMU with it, by its death signal).
            let mut line = Vec::new();
            let mut buf = [0u8; 256];
            let ended = loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => line.extend_from_slice(&buf[..n]),
                }
                if line.contains(&b'\n') || line.len() > MAX_LINE {
                    break serde_json::from_slice::<Ended>(
                        line.split(|b| *b == b'\n').next().unwrap_or(&[]),
                    )
                    .ok();
                }
            };
            let _ = tx.send(Some(match ended {
                Some(e) => VmExit {
                    code: e.code,
                    signal: e.signal,
                },
                None => VmExit {
                    code: None,
                    signal: None,
                },
            }));
        });
        Adopted {
            pid,
            pidfd,
            exit,
            _lifeline: lifeline,
        }
    }
}

impl Vm for Adopted {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn kill(&self) {
        if self.exit.borrow().is_none() {
            airlock_backend::pidfd_kill(self.pidfd.as_raw_fd());
        }
    }

    fn exit_watch(&self) -> tokio::sync::watch::Receiver<Option<VmExit>> {
        self.exit.clone()
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `v` as one JSON line.
fn json_line<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    let mut line = serde_json::to_vec(v).map_err(|e| Error::Setup(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

/// One line (without its newline), at most [`MAX_LINE`] bytes, within [`LINE_TIMEOUT`].
async fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>, Error> {
    let read = async {
        let mut line = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(Error::Protocol("the claim ended early".into()));
            }
            line.extend_from_slice(&buf[..n]);
            if let Some(at) = line.iter().position(|b| *b == b'\n') {
                line.truncate(at);
                return Ok(line);
            }
            if line.len() > MAX_LINE {
                return Err(Error::Protocol("claim too long".into()));
            }
        }
    };
    tokio::time::timeout(LINE_TIMEOUT, read)
        .await
        .map_err(|_| Error::Protocol("the claim was not sent in time".into()))?
}

/// Sends `bytes` with `fds` attached to the first byte.
async fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let r = stream.try_io(Interest::WRITABLE, || {
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&bytes[sent..])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one line and every descriptor sent with it (close-on-exec).
async fn recv_with_fds(stream: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    loop {
        stream.readable().await?;
        let mut buf = [0u8; 4096];
        let r = stream.try_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut got = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(list) = c {
                    // SAFETY: descriptors the kernel just installed in this process.
                    got.extend(
                        list.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
            Ok((msg.bytes, got, truncated))
        });
        let (n, got, truncated) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        fds.extend(got);
        if truncated {
            return Err(Error::Protocol(
                "the pool holder sent too many descriptors".into(),
            ));
        }
        if n == 0 {
            return Err(Error::Protocol("the pool holder closed the claim".into()));
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(at) = line.iter().position(|b| *b == b'\n') {
            line.truncate(at);
            return Ok((line, fds));
        }
        if line.len() > MAX_LINE {
            return Err(Error::Protocol(
                "the pool holder's answer is too long".into(),
            ));
        }
    }
}
