//! Forwarded TCP connections: the host opens a stream with Connect, the agent connects to the
//! guest-local port and pumps bytes both ways within each direction's credit window.
//!
//! Two threads per connection (socket → host, host → socket), like an exec's pipes. Nothing
//! here blocks the frame reader: the connect runs on the connection's own thread.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use airlock_proto::{
    ConnectError, ConnectErrorKind, ConnectRequest, Frame, Kind, StreamReset, Window, MAX_CHUNK,
};

use crate::{log, Tx};

/// A guest-local connect that takes longer than this is reported as timed out. A listener
/// with a full backlog drops SYNs and the kernel retries after 1, 3, 7 and 15 s: under TCG a
/// burst of connections to a forking server needs those retries. Below the host's 30 s wait
/// for an answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(22);

enum ToSocket {
    Data(Vec<u8>),
    Eof,
}

#[derive(Default)]
struct State {
    /// The host aborted the stream, or we did.
    reset: bool,
    /// Directions finished cleanly (ours: we sent Eof; theirs: we wrote their Eof).
    sent_eof: bool,
    wrote_eof: bool,
    socket: Option<Arc<TcpStream>>,
}

struct Conn {
    stream: u32,
    /// Our window towards the host.
    out: Mutex<Window>,
    out_cv: Condvar,
    /// The host's window towards us, checked on arrival.
    inbound: Mutex<Window>,
    to_socket: Mutex<Option<Sender<ToSocket>>>,
    state: Mutex<State>,
}

/// All forwarded connections by stream id.
pub struct Ports {
    tx: Tx,
    conns: Mutex<HashMap<u32, Arc<Conn>>>,
}

impl Ports {
    pub fn new(tx: Tx) -> Ports {
        Ports {
            tx,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `stream` is a forwarded connection (so its frames come here, not to execs).
    pub fn owns(&self, stream: u32) -> bool {
        self.conns.lock().unwrap().contains_key(&stream)
    }

    fn refuse(&self, stream: u32, kind: ConnectErrorKind, message: String) {
        self.tx.send(Frame::json(
            Kind::ConnectFailed,
            stream,
            &ConnectError { kind, message },
        ));
    }

    /// Handles a Connect frame: registers the stream at once (so a Reset racing the connect is
    /// seen), then connects on the connection's own thread.
    pub fn start(self: &Arc<Self>, stream: u32, frame: &Frame, stream_in_use: bool) {
        let req: ConnectRequest = match frame.parse() {
            Ok(r) => r,
            Err(e) => return self.refuse(stream, ConnectErrorKind::Invalid, e.to_string()),
        };
        if req.port == 0 {
            return self.refuse(stream, ConnectErrorKind::Invalid, "port 0".into());
        }
        let (to_tx, to_rx) = channel();
        let conn = Arc::new(Conn {
            stream,
            out: Mutex::new(Window::default()),
            out_cv: Condvar::new(),
            inbound: Mutex::new(Window::default()),
            to_socket: Mutex::new(Some(to_tx)),
            state: Mutex::new(State::default()),
        });
        {
            let mut conns = self.conns.lock().unwrap();
            if stream_in_use || conns.contains_key(&stream) {
                drop(conns);
                return self.refuse(
                    stream,
                    ConnectErrorKind::Invalid,
                    format!("stream {stream} is already in use"),
                );
            }
            conns.insert(stream, conn.clone());
        }
        let (ports, c) = (self.clone(), conn.clone());
        if let Err(e) = pump_thread().spawn(move || ports.connect_and_pump(c, req.port, to_rx)) {
            self.conns.lock().unwrap().remove(&stream);
            self.refuse(
                stream,
                ConnectErrorKind::Other,
                format!("agent thread: {e}"),
            );
        }
    }

    fn connect_and_pump(self: Arc<Self>, c: Arc<Conn>, port: u16, to_rx: Receiver<ToSocket>) {
        let sock = match connect_local(port) {
            Ok(s) => Arc::new(s),
            Err((kind, message)) => {
                self.conns.lock().unwrap().remove(&c.stream);
                if !c.state.lock().unwrap().reset {
                    self.refuse(c.stream, kind, message);
                }
                return;
            }
        };
        let _ = sock.set_nodelay(true);
        {
            let mut st = c.state.lock().unwrap();
            if st.reset {
                // The host gave up while we connected.
                abort(&sock);
                return;
            }
            st.socket = Some(sock.clone());
        }
        // Connected goes into the queue before any Data the reader thread sends.
        self.tx.send(Frame::new(Kind::Connected, c.stream, vec![]));
        let (ports, c2, sock2) = (self.clone(), c.clone(), sock.clone());
        if let Err(e) = pump_thread().spawn(move || ports.pump_to_socket(&c2, &sock2, to_rx)) {
            return self.reset_from_guest(&c, format!("agent thread: {e}"));
        }
        self.pump_to_host(&c, &sock);
    }

    /// Socket → host, within the host's window.
    fn pump_to_host(&self, c: &Conn, mut sock: &TcpStream) {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let want = {
                let mut w = c.out.lock().unwrap();
                loop {
                    if c.state.lock().unwrap().reset {
                        return;
                    }
                    if w.available() > 0 {
                        break;
                    }
                    w = c.out_cv.wait(w).unwrap();
                }
                w.take(MAX_CHUNK)
            };
            let n = loop {
                match sock.read(&mut buf[..want]) {
                    Ok(n) => break Ok(n),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                }
            };
            match n {
                Ok(0) => {
                    if self.mark(c, |st| st.sent_eof = true) {
                        self.tx.send(Frame::new(Kind::Eof, c.stream, vec![]));
                    }
                    self.maybe_done(c);
                    return;
                }
                Ok(n) => {
                    if n < want {
                        let _ = c.out.lock().unwrap().grant((want - n) as u32);
                    }
                    if c.state.lock().unwrap().reset
                        || !self
                            .tx
                            .send(Frame::new(Kind::Data, c.stream, buf[..n].to_vec()))
                    {
                        return;
                    }
                }
                Err(e) => {
                    self.reset_from_guest(c, format!("guest socket read: {e}"));
                    return;
                }
            }
        }
    }

    /// Host → socket; returns credit as bytes are written.
    fn pump_to_socket(&self, c: &Conn, mut sock: &TcpStream, rx: Receiver<ToSocket>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                ToSocket::Data(d) => {
                    if let Err(e) = sock.write_all(&d) {
                        self.reset_from_guest(c, format!("guest socket write: {e}"));
                        return;
                    }
                    let _ = c.inbound.lock().unwrap().grant(d.len() as u32);
                    self.tx.send(Frame::credit(c.stream, d.len() as u32));
                }
                ToSocket::Eof => {
                    let _ = sock.shutdown(Shutdown::Write);
                    self.mark(c, |st| st.wrote_eof = true);
                    self.maybe_done(c);
                    return;
                }
            }
        }
    }

    /// Applies `f` unless the stream was reset; returns whether it was applied.
    fn mark(&self, c: &Conn, f: impl FnOnce(&mut State)) -> bool {
        let mut st = c.state.lock().unwrap();
        if st.reset {
            return false;
        }
        f(&mut st);
        true
    }

    /// Both directions ended cleanly: close the socket and forget the stream.
    fn maybe_done(&self, c: &Conn) {
        let sock = {
            let mut st = c.state.lock().unwrap();
            if !(st.sent_eof && st.wrote_eof) || st.reset {
                return;
            }
            st.socket.take()
        };
        drop(sock);
        self.conns.lock().unwrap().remove(&c.stream);
    }

    /// Tears the connection down: the socket is shut both ways, both pumps stop.
    /// Returns false if it was already torn down.
    fn teardown(&self, c: &Conn) -> bool {
        let sock = {
            let mut st = c.state.lock().unwrap();
            if std::mem::replace(&mut st.reset, true) {
                return false;
            }
            st.socket.take()
        };
        if let Some(s) = sock {
            abort(&s);
        }
        *c.to_socket.lock().unwrap() = None;
        c.out_cv.notify_all();
        self.conns.lock().unwrap().remove(&c.stream);
        true
    }

    fn reset_from_guest(&self, c: &Conn, message: String) {
        if self.teardown(c) {
            self.tx
                .send(Frame::json(Kind::Reset, c.stream, &StreamReset { message }));
        }
    }

    /// Handles a host frame for a forwarded connection.
    pub fn handle(&self, stream: u32, frame: Frame) {
        let Some(c) = self.conns.lock().unwrap().get(&stream).cloned() else {
            return;
        };
        match frame.kind {
            Kind::Data => {
                if let Err(err) = c.inbound.lock().unwrap().receive(frame.payload.len()) {
                    log(&format!("stream {stream}: {err}"));
                    return self.reset_from_guest(&c, err.to_string());
                }
                if let Some(tx) = c.to_socket.lock().unwrap().as_ref() {
                    let _ = tx.send(ToSocket::Data(frame.payload));
                }
            }
            Kind::Eof => {
                if let Some(tx) = c.to_socket.lock().unwrap().take() {
                    let _ = tx.send(ToSocket::Eof);
                }
            }
            Kind::Credit => {
                if let Ok(n) = frame.parse_credit() {
                    if c.out.lock().unwrap().grant(n).is_ok() {
                        c.out_cv.notify_all();
                    }
                }
            }
            Kind::Reset => {
                self.teardown(&c);
            }
            other => log(&format!("stream {stream}: unexpected {other:?} from host")),
        }
    }
}

/// Pump threads only copy through one 32 KiB heap buffer: a small stack keeps many
/// connections cheap, and a failed spawn (out of memory) refuses one connection instead of
/// panicking PID 1.
fn pump_thread() -> std::thread::Builder {
    std::thread::Builder::new().stack_size(128 * 1024)
}

/// Connects to the guest's loopback: IPv4 first, then IPv6 if that was refused.
fn connect_local(port: u16) -> Result<TcpStream, (ConnectErrorKind, String)> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let first = match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    if first.kind() == ErrorKind::ConnectionRefused {
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        if let Ok(s) = TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT) {
            return Ok(s);
        }
    }
    let kind = match first.kind() {
        ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => ConnectErrorKind::TimedOut,
        _ => ConnectErrorKind::Other,
    };
    Err((
        kind,
        format!("connect to port {port} in the sandbox: {first}"),
    ))
}

/// Closes with a TCP reset, so the guest server sees the abort the host client made.
fn abort(sock: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER with a valid linger struct on our socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = sock.shutdown(Shutdown::Both);
}
