//! A small blocking QMP (QEMU Machine Protocol) client over the monitor socket QEMU inherits.
//!
//! Hand-written: the handful of commands snapshots need are JSON lines, and the crates.io QMP
//! clients either lack fd passing (`getfd` needs SCM_RIGHTS) or pull in a second async stack.
//! QEMU runs guest-driven device models, so its replies are bounded like any other input.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What can go wrong talking to QEMU's monitor. A caller can tell a dead QEMU
/// ([`QmpError::Closed`]) and a slow one ([`QmpError::Timeout`]) from a refusal.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QmpError {
    /// Reading or writing the socket failed.
    #[error("QMP {what}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// QEMU closed the monitor (it exited).
    #[error("QEMU closed its monitor (it exited)")]
    Closed,
    /// QEMU sent something that is not the protocol.
    #[error("QMP: {0}")]
    Protocol(String),
    /// A command was refused.
    #[error("QMP {cmd}: {desc}")]
    Command {
        /// The command.
        cmd: String,
        /// QEMU's description.
        desc: String,
    },
    /// The migration stream could not be written or loaded, or left the VM in a bad state.
    #[error("{0}")]
    Migration(String),
    /// QEMU did not finish in time.
    #[error("{0} did not finish in time")]
    Timeout(&'static str),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> QmpError {
    move |source| QmpError::Io { what, source }
}

/// Longest reply line accepted.
const MAX_LINE: u64 = 1 << 20;

/// A monitor socket: not yet greeted, or in command mode.
pub(crate) enum Monitor {
    /// QEMU's greeting is still unread.
    Raw(UnixStream),
    /// A session in command mode.
    Ready(Qmp),
}

impl Monitor {
    /// The session, greeting QEMU first if that has not happened yet.
    #[allow(dead_code)]
    pub(crate) fn session(&mut self) -> Result<&mut Qmp, QmpError> {
        if let Monitor::Raw(s) = self {
            let s = s.try_clone().map_err(io("clone"))?;
            *self = Monitor::Ready(Qmp::connect(s)?);
        }
        match self {
            Monitor::Ready(q) => Ok(q),
            Monitor::Raw(_) => unreachable!("just replaced"),
        }
    }
}

/// A QMP session in command mode.
pub(crate) struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub(crate) fn connect(stream: UnixStream) -> Result<Qmp, QmpError> {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("set timeout"))?;
        let reader = BufReader::new(stream.try_clone().map_err(io("clone"))?);
        let mut q = Qmp { stream, reader };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("not a greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// A session on `stream`, already in command mode (handed over by another process).
    pub(crate) fn in_command_mode(stream: UnixStream) -> Result<Qmp, QmpError> {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(io("set timeout"))?;
        let reader = BufReader::new(stream.try_clone().map_err(io("clone"))?);
        Ok(Qmp { stream, reader })
    }

    /// The monitor socket.
    pub(crate) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn read_msg(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(io("read"))?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("reply: {e}")))
    }

    fn send(&mut self, cmd: &str, args: Value, fd: Option<RawFd>) -> Result<(), QmpError> {
        let mut msg = serde_json::to_vec(&json!({"execute": cmd, "arguments": args}))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        msg.push(b'\n');
        match fd {
            None => self.stream.write_all(&msg).map_err(io("write")),
            Some(fd) => send_with_fd(&self.stream, &msg, fd),
        }
    }

    fn reply(&mut self, cmd: &str) -> Result<Value, QmpError> {
        loop {
            let m = self.read_msg()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Err(QmpError::Command {
                    cmd: cmd.to_string(),
                    desc: desc.to_string(),
                });
            }
            // An asynchronous event (STOP, MIGRATION, ...): not the reply.
        }
    }

    /// Runs one command and returns its `return` value.
    pub(crate) fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        self.send(cmd, args, None)?;
        self.reply(cmd)
    }

    /// Runs one command with `fd` attached (for `getfd`).
    pub(crate) fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Value,
        fd: RawFd,
    ) -> Result<Value, QmpError> {
        self.send(cmd, args, Some(fd))?;
        self.reply(cmd)
    }

    /// Sets (or clears) migration capability `x-ignore-shared`: RAM in a shared file backend
    /// is not copied into the migration stream.
    pub(crate) fn ignore_shared(&mut self, on: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]}),
        )
        .map(drop)
    }

    /// Pauses the VM and writes its migration stream (device state, plus RAM not in a shared
    /// file) to `out`; returns once it is complete. The VM stays paused.
    pub(crate) fn save(&mut self, out: &std::fs::File, timeout: Duration) -> Result<(), QmpError> {
        self.execute("stop", json!({}))?;
        self.execute_with_fd("getfd", json!({"fdname": "airlock-snap"}), out.as_raw_fd())?;
        self.execute("migrate", json!({"uri": "fd:airlock-snap"}))?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.execute("query-migrate", json!({}))?;
            match st.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = st.get("error-desc").and_then(Value::as_str).unwrap_or("?");
                    return Err(QmpError::Migration(format!("migration failed: {why}")));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(QmpError::Timeout("migration"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Qmp {
    /// Loads the migration stream QEMU inherited as fd `fd` (`-incoming defer`) and runs the
    /// guest once it is in. The saving side paused the guest first, so QEMU would otherwise
    /// keep it paused.
    pub(crate) fn restore(&mut self, fd: i32, timeout: Duration) -> Result<(), QmpError> {
        self.execute("migrate-incoming", json!({"uri": format!("fd:{fd}")}))?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.execute("query-status", json!({}))?;
            match st.get("status").and_then(Value::as_str).unwrap_or("") {
                "inmigrate" => {}
                "running" => return Ok(()),
                "paused" | "postmigrate" | "prelaunch" => {
                    self.execute("cont", json!({}))?;
                    return Ok(());
                }
                other => {
                    return Err(QmpError::Migration(format!(
                        "QEMU is {other} after loading the snapshot"
                    )))
                }
            }
            if Instant::now() > deadline {
                return Err(QmpError::Timeout("loading the snapshot"));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

/// Writes `msg` with `fd` as SCM_RIGHTS ancillary data (std's ancillary API is unstable).
fn send_with_fd(stream: &UnixStream, msg: &[u8], fd: RawFd) -> Result<(), QmpError> {
    // SAFETY: a msghdr over valid local buffers; the control buffer is sized with CMSG_SPACE
    // and written through the CMSG_* accessors.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut cbuf = vec![0u8; space];
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = cbuf.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        let c = libc::CMSG_FIRSTHDR(&hdr);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        let n = libc::sendmsg(stream.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(QmpError::Io {
                what: "sendmsg",
                source: std::io::Error::last_os_error(),
            });
        }
        if (n as usize) < msg.len() {
            (&*stream)
                .write_all(&msg[n as usize..])
                .map_err(io("write"))?;
        }
    }
    Ok(())
}
