//! The wire protocol between Airlock (the host) and its guest agent.
//!
//! One byte stream (a virtio-serial port) carries length-prefixed frames. Each frame belongs to a
//! *stream*: stream 0 is the control stream (hello, init, shutdown), every other stream is one
//! exec or one forwarded TCP connection ([`Kind::Connect`]) opened by the host. Data frames are raw bytes; control payloads are JSON so that adding
//! an optional field never breaks an older peer.
//!
//! # Threat notes
//! The guest is hostile. Everything here that decodes guest bytes is bounded: a frame header
//! announces at most [`MAX_PAYLOAD`] bytes or the decoder fails; data sent beyond the receive
//! window ([`Window`]) is a protocol violation the host treats as fatal for that sandbox. No
//! decoding path panics on any input (see `fuzz/` and the tests below).

use serde::{Deserialize, Serialize};

/// Protocol version. The agent announces it in [`Hello`]; the host refuses a different one.
pub const VERSION: u32 = 1;

/// Bytes in a frame header: payload length (u32 LE), stream id (u32 LE), kind (u8), 3 reserved.
pub const HEADER_LEN: usize = 12;

/// Hard cap on one frame's payload. Larger announcements are rejected before any allocation.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// Largest data chunk a sender puts in one Stdin/Stdout/Stderr frame.
pub const MAX_CHUNK: usize = 32 * 1024;

/// Receive window every stream starts with, in each direction. A sender may have at most this
/// many unacknowledged data bytes in flight; the receiver returns credit as it consumes data.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// The control stream.
pub const CONTROL_STREAM: u32 = 0;

/// Frame kinds. The numbers are the wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// guest → host, control stream, JSON [`Hello`]: the agent is up.
    Hello = 1,
    /// host → guest, control stream, JSON [`Init`]: per-sandbox settings.
    Init = 2,
    /// guest → host, control stream, JSON [`Ready`]: the sandbox can run commands.
    Ready = 3,
    /// host → guest, opens a stream, JSON [`ExecRequest`].
    Exec = 4,
    /// guest → host, JSON [`Started`]: the process runs.
    Started = 5,
    /// host → guest, raw bytes for the process's stdin (or its terminal).
    Stdin = 6,
    /// host → guest, empty: stdin is closed.
    StdinEof = 7,
    /// guest → host, raw bytes from stdout (or the terminal).
    Stdout = 8,
    /// guest → host, raw bytes from stderr.
    Stderr = 9,
    /// guest → host, JSON [`ExitStatus`]: last frame of the stream.
    Exit = 10,
    /// host → guest, JSON [`SignalRequest`].
    Signal = 11,
    /// host → guest, JSON [`WinSize`]: terminal resize.
    Resize = 12,
    /// both ways, 4 bytes u32 LE: the receiver consumed this many data bytes of the stream.
    Credit = 13,
    /// guest → host, JSON [`ExecError`]: the process could not be started; last frame.
    ExecFailed = 14,
    /// host → guest, control stream, empty: sync disks and power off.
    Shutdown = 15,
    /// Either way, JSON [`ProtocolError`]: the peer sent something it should not have.
    Error = 16,
    /// host → guest, opens a stream, JSON [`ConnectRequest`]: connect to a guest-local TCP port.
    Connect = 17,
    /// guest → host, empty: the connection is up; [`Kind::Data`] may flow both ways.
    Connected = 18,
    /// guest → host, JSON [`ConnectError`]: the connection could not be made; last frame.
    ConnectFailed = 19,
    /// Both ways on a port stream, raw bytes (at most [`MAX_CHUNK`]), within the receiver's
    /// window; the receiver returns [`Kind::Credit`] as it consumes them.
    Data = 20,
    /// Both ways on a port stream, empty: the sender sends no more data (TCP half-close).
    /// The stream ends once both sides sent it.
    Eof = 21,
    /// Both ways on a port stream, JSON [`StreamReset`]: abort the connection; last frame
    /// the sender sends, and the receiver forgets the stream.
    Reset = 22,
    /// host → guest, opens a stream, JSON [`FileRequest`]: a file operation. It then runs like
    /// an exec without a process: a write takes its bytes as [`Kind::Stdin`] up to
    /// [`Kind::StdinEof`]; a read or list answers with [`Kind::Stdout`] data (a list as one
    /// JSON [`FileEntry`] per line); both within the usual credit windows. The stream ends
    /// with [`Kind::Exit`] (code 0) on success or [`Kind::ExecFailed`] with the reason.
    FileOp = 24,
    /// host → guest, control stream, JSON [`Resume`]: this VM was restored from a user
    /// snapshot and talks to a new host; forget the old one's streams, apply the new `Init`.
    Resume = 25,
    /// guest → host, control stream, JSON [`Resumed`]: the answer to [`Kind::Resume`]. The
    /// new host discards every byte before this frame (the old host's leftovers, possibly a
    /// partial frame) by looking for its exact encoding, nonce included.
    Resumed = 26,
}

impl Kind {
    /// Parses a wire value.
    pub fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => Init,
            3 => Ready,
            4 => Exec,
            5 => Started,
            6 => Stdin,
            7 => StdinEof,
            8 => Stdout,
            9 => Stderr,
            10 => Exit,
            11 => Signal,
            12 => Resize,
            13 => Credit,
            14 => ExecFailed,
            15 => Shutdown,
            16 => Error,
            17 => Connect,
            18 => Connected,
            19 => ConnectFailed,
            20 => Data,
            21 => Eof,
            22 => Reset,
            24 => FileOp,
            25 => Resume,
            26 => Resumed,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: Kind,
    /// Which stream it belongs to (0 = control).
    pub stream: u32,
    /// The payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame with a raw payload.
    pub fn new(kind: Kind, stream: u32, payload: Vec<u8>) -> Frame {
        Frame {
            kind,
            stream,
            payload,
        }
    }

    /// A frame whose payload is `msg` as JSON.
    pub fn json<T: Serialize>(kind: Kind, stream: u32, msg: &T) -> Frame {
        // Serializing our own plain structs cannot fail.
        let payload = serde_json::to_vec(msg).unwrap_or_default();
        Frame::new(kind, stream, payload)
    }

    /// A credit frame returning `n` bytes of window.
    pub fn credit(stream: u32, n: u32) -> Frame {
        Frame::new(Kind::Credit, stream, n.to_le_bytes().to_vec())
    }

    /// Parses the JSON payload.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtoError::BadPayload {
            kind: self.kind,
            reason: e.to_string(),
        })
    }

    /// Parses a credit payload.
    pub fn parse_credit(&self) -> Result<u32, ProtoError> {
        let b: [u8; 4] =
            self.payload
                .as_slice()
                .try_into()
                .map_err(|_| ProtoError::BadPayload {
                    kind: self.kind,
                    reason: format!("credit needs 4 bytes, got {}", self.payload.len()),
                })?;
        Ok(u32::from_le_bytes(b))
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        debug_assert!(self.payload.len() <= MAX_PAYLOAD);
        out.reserve(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.payload);
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }
}

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The header announces a payload above [`MAX_PAYLOAD`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The reserved header bytes are not zero (a desynchronised or foreign stream).
    #[error("reserved header bytes are not zero")]
    BadHeader,
    /// A payload does not parse as its kind requires.
    #[error("bad {kind:?} payload: {reason}")]
    BadPayload {
        /// The frame's kind.
        kind: Kind,
        /// What was wrong.
        reason: String,
    },
    /// Data arrived beyond the window the receiver granted.
    #[error("peer sent {got} bytes with only {window} bytes of window")]
    WindowExceeded {
        /// Bytes in the offending frame.
        got: usize,
        /// Window that was left.
        window: u32,
    },
    /// A credit would grow the window past what the receiver could ever grant.
    #[error("credit overflows the window")]
    CreditOverflow,
}

/// Incremental frame decoder: feed it bytes as they arrive, take frames out.
///
/// It buffers at most one partial frame (≤ `HEADER_LEN + MAX_PAYLOAD` bytes) beyond what was
/// pushed and not yet taken; after an error it stays failed, since the stream is desynchronised.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    failed: Option<ProtoError>,
}

impl Decoder {
    /// A fresh decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet part of a returned frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.try_next();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn try_next(&mut self) -> Result<Option<Frame>, ProtoError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        let stream = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
        let kind = Kind::from_u8(avail[8]).ok_or(ProtoError::UnknownKind(avail[8]))?;
        if avail[9..12] != [0, 0, 0] {
            return Err(ProtoError::BadHeader);
        }
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.pos += HEADER_LEN + len;
        Ok(Some(Frame {
            kind,
            stream,
            payload,
        }))
    }
}

/// Flow-control accounting for one direction of one stream, kept by both ends.
///
/// The sender calls [`Window::take`] before sending data; the receiver calls
/// [`Window::receive`] on arrival (failing on a peer that ignores the window) and
/// [`Window::grant`] when the consumer has taken the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    available: u32,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            available: INITIAL_WINDOW,
        }
    }
}

impl Window {
    /// Bytes that may still be sent.
    pub fn available(&self) -> u32 {
        self.available
    }

    /// Sender side: reserves up to `want` bytes, returns how many may be sent now (maybe 0).
    pub fn take(&mut self, want: usize) -> usize {
        let n = want.min(self.available as usize);
        self.available -= n as u32;
        n
    }

    /// Receiver side: accounts for `n` bytes that arrived.
    pub fn receive(&mut self, n: usize) -> Result<(), ProtoError> {
        if n > self.available as usize {
            return Err(ProtoError::WindowExceeded {
                got: n,
                window: self.available,
            });
        }
        self.available -= n as u32;
        Ok(())
    }

    /// Adds credit. Fails if the window would exceed [`INITIAL_WINDOW`], which only a peer that
    /// invents credit can cause.
    pub fn grant(&mut self, n: u32) -> Result<(), ProtoError> {
        let v = self
            .available
            .checked_add(n)
            .filter(|v| *v <= INITIAL_WINDOW)
            .ok_or(ProtoError::CreditOverflow)?;
        self.available = v;
        Ok(())
    }
}

/// The agent is up and speaks this protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// [`VERSION`] of the agent.
    pub version: u32,
    /// The agent's build (crate version), for diagnostics.
    pub agent: String,
}

/// Per-sandbox settings the host sends once, after [`Hello`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Init {
    /// Hostname to set.
    pub hostname: String,
    /// Host wall clock, nanoseconds since the Unix epoch: the guest steps its clock to it.
    #[serde(default)]
    pub time_unix_ns: u64,
    /// The NIC's settings; `None`: the sandbox has no network.
    #[serde(default)]
    pub net: Option<NetInit>,
    /// A CA certificate (PEM) every TLS client in the guest must trust (Airlock's
    /// per-sandbox interception CA).
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// Environment every command gets (below its own), e.g. secret placeholders.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// virtio-fs shares to mount, in order.
    #[serde(default)]
    pub shares: Vec<ShareMount>,
    /// Named volumes (virtio-blk, ext4) to mount.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Run commands with every capability and without no_new_privs (`--privileged`). By
    /// default commands run with no_new_privs and without CAP_SYS_MODULE, CAP_SYS_RAWIO and
    /// CAP_SYS_BOOT in any of their capability sets.
    #[serde(default)]
    pub privileged: bool,
    /// Fresh entropy the guest mixes into its RNG and credits, then forces a reseed: a VM
    /// restored from a snapshot otherwise shares its RNG state with every sibling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rng_seed: Vec<u8>,
    /// 32 lowercase hex digits for /etc/machine-id (unique per sandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// The writable disk's ext4 UUID is this VM's own already (a pooled VM's warm-up renewed
    /// it from that VM's own seed): keep it. Otherwise the agent renews it, as a VM booted or
    /// restored from a shared disk template must.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_uuid_own: bool,
}

/// Sent to a guest restored from a user snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resume {
    /// Echoed in [`Resumed`] (random, so old bytes cannot mimic the answer).
    pub nonce: String,
    /// Streams below this id belonged to the old host: their frames are dropped from now on
    /// (their processes keep running). The new host opens streams from here.
    pub first_stream: u32,
    /// The new sandbox's settings (hostname, clock, RNG seed, machine-id, network, CA, env).
    pub init: Init,
}

/// Answer to [`Resume`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resumed {
    /// The [`Resume::nonce`].
    pub nonce: String,
}

/// How a share appears in the guest.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Read-only share under an overlay whose upper layer is on the sandbox's writable disk:
    /// the guest may write, the host tree never changes.
    #[default]
    Overlay,
    /// Live read-write.
    Rw,
    /// Read-only.
    Ro,
}

/// One virtio-fs share to mount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareMount {
    /// virtio-fs tag.
    pub tag: String,
    /// Absolute guest path.
    pub target: String,
    /// Mode.
    #[serde(default)]
    pub mode: ShareMode,
}

/// What happened to a path in an overlay share (output of the agent's `share-diff` builtin,
/// one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareChange {
    /// `added`, `modified` or `deleted`.
    pub kind: String,
    /// Guest path.
    pub path: String,
}

/// One process in the guest (output of the agent's `ps` builtin, one JSON object per line).
/// Comes from the guest: the host bounds how much it reads and shows it as text only.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestProcess {
    /// Pid in the guest.
    pub pid: i32,
    /// Parent's pid (1 for what the agent started or adopted).
    pub ppid: i32,
    /// Real uid.
    pub uid: u32,
    /// State letter, as `ps` shows it (`R`, `S`, `D`, `Z`, ...).
    pub state: String,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// User plus system CPU time, ms.
    pub cpu_ms: u64,
    /// Since the guest booted, ms.
    pub started_ms: u64,
    /// Its command line, arguments joined by spaces (`[name]` when it has none).
    pub command: String,
}

/// One volume (an ext4 virtio-blk disk found by its serial) to mount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeMount {
    /// virtio-blk serial.
    pub serial: String,
    /// Absolute guest path.
    pub target: String,
}

/// Static configuration of the guest's NIC (no DHCP: the host knows it all in advance).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetInit {
    /// The guest's IPv4 address.
    pub address: std::net::Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway, also the DNS server.
    pub gateway: std::net::Ipv4Addr,
    /// Link MTU.
    pub mtu: u32,
}

/// `Shutdown` (host → agent): power off. An empty payload (older hosts) means no grace.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShutdownRequest {
    /// Milliseconds the guest's processes get between SIGTERM and SIGKILL (0: neither; the
    /// disks are synced and the VM ends at once).
    #[serde(default)]
    pub grace_ms: u64,
}

/// The sandbox is ready for commands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    /// Kernel release inside the guest.
    #[serde(default)]
    pub kernel: String,
}

/// Terminal size.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Start a process in the guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the command's `PATH`.
    pub argv: Vec<String>,
    /// Environment on top of the agent's defaults (`PATH`, `HOME`, `HOSTNAME`, `TERM`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; created if missing. Default: the user's home or `/`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid`, `name:group` or `uid:gid`. Default: root.
    #[serde(default)]
    pub user: Option<String>,
    /// Allocate a terminal of this size: stdout and stderr then both arrive as [`Kind::Stdout`].
    #[serde(default)]
    pub tty: Option<WinSize>,
    /// Attach stdin. Otherwise the process reads from /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Run one of the agent's own operations instead of a program (`apply-layer`: stdin is an
    /// uncompressed layer tar applied onto the root of an image-builder VM; `reap`: SIGKILL to
    /// every process but the agent, ending once none is alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// Run the program chrooted into this guest directory (a share's mount point: a
    /// container's root filesystem), with /proc, /dev and /sys mounted inside it once by the
    /// agent; `cwd` and `user` are then resolved inside it. Absolute, at most 4096 bytes,
    /// no `.` or `..` components, not `/`. Optional on the wire, so requests without it are
    /// unchanged for every agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// The process started.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    /// Its pid inside the guest.
    pub pid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// The guest kernel's OOM killer ended it (SIGKILL, and the kernel log names its pid).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
}

/// Why a process could not be started.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExecErrorKind {
    /// The program was not found.
    NotFound,
    /// The program exists but cannot be executed.
    PermissionDenied,
    /// The request is invalid (empty argv, unknown user, bad working directory).
    Invalid,
    /// Anything else.
    Other,
}

/// The process could not be started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecError {
    /// Class of failure.
    pub kind: ExecErrorKind,
    /// Human-readable reason.
    pub message: String,
}

/// Deliver a signal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalRequest {
    /// Signal number (Linux x86_64 numbering).
    pub signal: i32,
    /// Send it to the whole process group rather than the process alone.
    #[serde(default)]
    pub group: bool,
}

/// What a [`Kind::FileOp`] stream does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileOpKind {
    /// Write the stream's stdin bytes to `path` (parents created).
    Write,
    /// Send the bytes of `path` (from `offset`, at most `len`).
    Read,
    /// Send the entries of directory `path`.
    List,
}

/// A file operation in the guest, as root.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRequest {
    /// The operation.
    pub op: FileOpKind,
    /// Absolute guest path.
    pub path: String,
    /// Write: permission bits of the file (default 0644).
    #[serde(default)]
    pub mode: Option<u32>,
    /// Write: append instead of truncating.
    #[serde(default)]
    pub append: bool,
    /// Read: start at this byte.
    #[serde(default)]
    pub offset: u64,
    /// Read: at most this many bytes (default: to the end).
    #[serde(default)]
    pub len: Option<u64>,
}

/// One directory entry of a [`FileOpKind::List`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// File name (lossy UTF-8).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// A directory.
    pub is_dir: bool,
}

/// A peer's complaint about what it received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProtocolError {
    /// What was wrong.
    pub message: String,
}

/// Open a TCP connection to a port inside the guest (a port forward's one connection).
///
/// The agent connects to `127.0.0.1:port`, then to `[::1]:port` if that is refused, so a
/// server bound to the IPv4 or IPv6 loopback or to a wildcard address is reached. Servers bound
/// only to another guest address are not: forwards reach what the guest serves locally.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectRequest {
    /// TCP port inside the guest.
    pub port: u16,
}

/// Why a [`ConnectRequest`] failed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConnectErrorKind {
    /// Nothing listens on the port.
    Refused,
    /// The connection did not complete in time.
    TimedOut,
    /// The request is invalid (port 0, stream already in use).
    Invalid,
    /// Anything else.
    Other,
}

/// A [`ConnectRequest`] failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectError {
    /// Class of failure.
    pub kind: ConnectErrorKind,
    /// Human-readable reason.
    pub message: String,
}

/// Why a port stream was aborted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamReset {
    /// Human-readable reason.
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, ProtoError> {
        let mut d = Decoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn round_trip_many_frames_in_one_push() {
        let frames = vec![
            Frame::json(
                Kind::Hello,
                0,
                &Hello {
                    version: VERSION,
                    agent: "x".into(),
                },
            ),
            Frame::new(Kind::Stdout, 7, vec![1; MAX_CHUNK]),
            Frame::credit(7, 1234),
            Frame::new(Kind::StdinEof, 9, vec![]),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire);
        }
        assert_eq!(decode_all(&wire).unwrap(), frames);
    }

    #[test]
    fn exec_root_is_optional_on_the_wire() {
        let old: ExecRequest = serde_json::from_str(r#"{"argv":["sh"]}"#).unwrap();
        assert_eq!(old.root, None);
        let plain = serde_json::to_string(&ExecRequest::default()).unwrap();
        assert!(!plain.contains("root"), "{plain}");
        let r = ExecRequest {
            root: Some("/run/airlock/c/x".into()),
            ..Default::default()
        };
        let back: ExecRequest = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn byte_at_a_time() {
        let f = Frame::json(
            Kind::Exec,
            3,
            &ExecRequest {
                argv: vec!["echo".into(), "hi".into()],
                ..Default::default()
            },
        );
        let wire = f.encode();
        let mut d = Decoder::new();
        for (i, b) in wire.iter().enumerate() {
            assert_eq!(d.next_frame().unwrap(), None, "early frame at {i}");
            d.push(&[*b]);
        }
        let got = d.next_frame().unwrap().unwrap();
        assert_eq!(got, f);
        let req: ExecRequest = got.parse().unwrap();
        assert_eq!(req.argv, vec!["echo", "hi"]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn truncated_frame_waits() {
        let wire = Frame::new(Kind::Stdout, 1, vec![5; 100]).encode();
        assert!(decode_all(&wire[..wire.len() - 1]).unwrap().is_empty());
        assert!(decode_all(&wire[..5]).unwrap().is_empty());
    }

    #[test]
    fn oversized_frame_rejected_before_payload_arrives() {
        let mut wire = ((MAX_PAYLOAD + 1) as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&[0, 0, 0, 0, Kind::Stdout as u8, 0, 0, 0]);
        assert!(matches!(
            decode_all(&wire),
            Err(ProtoError::TooLarge { .. })
        ));
        let mut wire = u32::MAX.to_le_bytes().to_vec();
        wire.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_all(&wire),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_kind_and_bad_header_rejected_and_sticky() {
        let mut wire = Frame::new(Kind::Stdout, 1, vec![]).encode();
        wire[8] = 200;
        let mut d = Decoder::new();
        d.push(&wire);
        assert_eq!(d.next_frame(), Err(ProtoError::UnknownKind(200)));
        d.push(&Frame::new(Kind::Stdout, 1, vec![]).encode());
        assert!(d.next_frame().is_err(), "decoder must stay failed");

        let mut wire = Frame::new(Kind::Stdout, 1, vec![]).encode();
        wire[10] = 1;
        assert_eq!(decode_all(&wire), Err(ProtoError::BadHeader));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let f = Frame::new(Kind::Exec, 1, b"{not json".to_vec());
        assert!(f.parse::<ExecRequest>().is_err());
        let f = Frame::new(Kind::Credit, 1, vec![1, 2, 3]);
        assert!(f.parse_credit().is_err());
        // Unknown fields are tolerated, so a newer peer can add optional fields.
        let f = Frame::new(
            Kind::Exec,
            1,
            br#"{"argv":["true"],"future_field":1}"#.to_vec(),
        );
        assert_eq!(f.parse::<ExecRequest>().unwrap().argv, vec!["true"]);
    }

    #[test]
    fn port_forward_kinds_round_trip() {
        for v in 17..=22u8 {
            let k = Kind::from_u8(v).unwrap();
            assert_eq!(k as u8, v);
        }
        assert_eq!(Kind::from_u8(23), None);
        let f = Frame::json(Kind::Connect, 5, &ConnectRequest { port: 8080 });
        let got = decode_all(&f.encode()).unwrap();
        assert_eq!(got[0].parse::<ConnectRequest>().unwrap().port, 8080);
        // Ports out of u16 range or missing are payload errors, not panics.
        for bad in [&br#"{"port":70000}"#[..], br#"{}"#, br#"{"port":-1}"#] {
            assert!(Frame::new(Kind::Connect, 5, bad.to_vec())
                .parse::<ConnectRequest>()
                .is_err());
        }
        let e: ConnectError = Frame::new(
            Kind::ConnectFailed,
            5,
            br#"{"kind":"refused","message":"connection refused"}"#.to_vec(),
        )
        .parse()
        .unwrap();
        assert_eq!(e.kind, ConnectErrorKind::Refused);
        let r: StreamReset = Frame::new(Kind::Reset, 5, b"{}".to_vec()).parse().unwrap();
        assert_eq!(r.message, "");
    }

    #[test]
    fn window_accounting() {
        let mut w = Window::default();
        assert_eq!(
            w.take(INITIAL_WINDOW as usize + 10),
            INITIAL_WINDOW as usize
        );
        assert_eq!(w.take(1), 0);
        w.grant(100).unwrap();
        assert_eq!(w.take(1000), 100);

        let mut r = Window::default();
        r.receive(INITIAL_WINDOW as usize).unwrap();
        assert!(matches!(
            r.receive(1),
            Err(ProtoError::WindowExceeded { .. })
        ));
        r.grant(10).unwrap();
        r.receive(10).unwrap();
        let mut full = Window::default();
        assert_eq!(full.grant(1), Err(ProtoError::CreditOverflow));
        assert_eq!(full.grant(u32::MAX), Err(ProtoError::CreditOverflow));
    }

    /// Deterministic garbage: the decoder returns frames or errors, never panics, and never
    /// holds more than one maximal frame.
    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut d = Decoder::new();
            let len = (next() % 256) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias towards plausible headers so the payload paths run too.
            if bytes.len() >= HEADER_LEN && next() % 2 == 0 {
                bytes[0..4].copy_from_slice(&((next() % 300) as u32).to_le_bytes());
                bytes[8] = (next() % 24) as u8;
                bytes[9..12].copy_from_slice(&[0, 0, 0]);
            }
            for chunk in bytes.chunks(1 + (next() % 17) as usize) {
                d.push(chunk);
                while let Ok(Some(f)) = d.next_frame() {
                    let _ = f.parse::<ExecRequest>();
                    let _ = f.parse::<ConnectError>();
                    let _ = f.parse::<StreamReset>();
                    let _ = f.parse_credit();
                }
            }
            assert!(d.buffered() <= HEADER_LEN + MAX_PAYLOAD);
        }
    }
}
