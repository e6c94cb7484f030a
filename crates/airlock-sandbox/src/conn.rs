//! Host end of the control channel: one reader task demultiplexing guest frames to streams,
//! one writer task, per-stream flow control.
//!
//! # Threat notes
//! Every frame read here comes from the guest. The decoder bounds frame size; each stream's
//! output may only use the window the host granted ([`Window::receive`]), so a guest that
//! floods output stalls itself instead of growing host memory; frames of kinds the guest may
//! not send, or that violate the window, end the sandbox with [`Conn::fail`]. Frames for
//! streams the host does not know (already finished or never opened) are dropped. Port-forward
//! streams accept each one-shot frame (Connected, Eof) once and no data after Eof, so a guest
//! cannot queue unbounded events either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use airlock_proto::{
    ConnectError, Decoder, ExecError, ExitStatus, Frame, Hello, Kind, Ready, Started, StreamReset,
    Window, CONTROL_STREAM,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch, Notify};

/// What an exec stream delivers to its owner, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The process runs with this guest pid.
    Started(u32),
    /// Bytes from stdout (or the terminal).
    Stdout(Vec<u8>),
    /// Bytes from stderr.
    Stderr(Vec<u8>),
    /// The process ended; nothing follows.
    Exit(ExitStatus),
    /// The process could not be started; nothing follows.
    Failed(ExecError),
}

/// What a port-forward stream delivers to its [`crate::GuestStream`], in order.
#[derive(Debug)]
pub(crate) enum PortEvent {
    /// The guest connected to the port.
    Connected,
    /// The guest could not connect; nothing follows.
    Failed(ConnectError),
    /// Bytes from the guest server.
    Data(Vec<u8>),
    /// The guest server closed its sending side.
    Eof,
    /// The guest aborted the connection; nothing follows.
    Reset(String),
}

/// Who a stream belongs to.
enum Events {
    Exec(mpsc::UnboundedSender<ExecEvent>),
    Port {
        events: mpsc::UnboundedSender<PortEvent>,
        connected: bool,
        eof: bool,
    },
}

/// Control-stream messages the start-up sequence waits for.
#[derive(Debug)]
pub enum ControlEvent {
    Hello(Hello),
    Ready(Ready),
    /// The restored guest answered Resume.
    Resumed,
}

pub(crate) struct StreamState {
    events: Events,
    /// Guest → host data still allowed.
    recv: Window,
    /// Host → guest stdin still allowed, shared with the stdin writer.
    pub(crate) send: Arc<SendWindow>,
}

/// Stdin (or port data) credit for one stream.
#[derive(Default)]
pub(crate) struct SendWindow {
    pub(crate) window: Mutex<Window>,
    pub(crate) notify: Notify,
    /// A poll-based writer ([`crate::GuestStream`]) waiting for credit.
    pub(crate) waker: Mutex<Option<std::task::Waker>>,
    /// Set when the guest reset a port stream, so a waiting writer fails.
    pub(crate) reset: Mutex<Option<String>>,
}

impl SendWindow {
    fn wake(&self) {
        self.notify.notify_one();
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

/// The connection to one guest agent.
pub struct Conn {
    /// Unbounded on purpose: everything queued here is made by the host and already bounded
    /// (stdin by the guest's window, credit by received data), and credit must never be
    /// dropped or the window would shrink for good.
    out: mpsc::UnboundedSender<Frame>,
    streams: Mutex<HashMap<u32, StreamState>>,
    /// Why the connection ended; `None` while it is alive.
    closed: watch::Sender<Option<String>>,
    /// Held (by a snapshot) to keep the writer from starting another write.
    pub(crate) write_gate: Arc<tokio::sync::Mutex<()>>,
    /// The socket, for asking how much of what was written the VMM has not read yet.
    raw_fd: std::os::fd::RawFd,
    /// The reader and writer tasks, for [`Conn::abort`].
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Set by [`Conn::abort`]: the writer must not shut the socket down as it goes.
    handed_over: std::sync::atomic::AtomicBool,
}

impl Conn {
    /// Starts the reader and writer tasks on `stream`; control messages go to the returned
    /// receiver.
    pub fn start(
        stream: tokio::net::UnixStream,
    ) -> (Arc<Conn>, mpsc::UnboundedReceiver<ControlEvent>) {
        Conn::start_after(stream, None)
    }

    /// As [`Conn::start`], but for a guest restored from a user snapshot: every byte before
    /// `marker` (the exact encoding of the expected [`Kind::Resumed`] frame) is the old host's
    /// and is discarded; the marker itself is delivered as [`ControlEvent::Resumed`].
    pub fn start_after(
        stream: tokio::net::UnixStream,
        marker: Option<Vec<u8>>,
    ) -> (Arc<Conn>, mpsc::UnboundedReceiver<ControlEvent>) {
        use std::os::fd::AsRawFd;
        let raw_fd = stream.as_raw_fd();
        let (rd, wr) = stream.into_split();
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            closed: watch::channel(None).0,
            write_gate: Arc::new(tokio::sync::Mutex::new(())),
            raw_fd,
            tasks: Mutex::new(Vec::new()),
            handed_over: Default::default(),
        });
        let w = tokio::spawn(write_loop(wr, out_rx, conn.clone()));
        let r = tokio::spawn(read_loop(rd, conn.clone(), ctl_tx, marker));
        *conn.tasks.lock().unwrap() = vec![w.abort_handle(), r.abort_handle()];
        (conn, ctl_rx)
    }

    /// Bytes written to the guest's socket that the VMM has not read yet (SIOCOUTQ).
    pub(crate) fn unsent(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) into a c_int, on the socket this Conn's halves own.
        let r = unsafe { libc::ioctl(self.raw_fd, libc::TIOCOUTQ, &mut n) };
        if r < 0 {
            0
        } else {
            n as usize
        }
    }

    /// Stops reading and writing and lets go of the socket, without failing the streams'
    /// owners: for a pooled VM handed to another process, which then reads the socket
    /// (bytes this reader had buffered are lost; the new reader skips to a `Resumed` marker).
    pub(crate) fn abort(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Queues a frame for the guest.
    pub async fn send(&self, f: Frame) -> Result<(), String> {
        if let Some(why) = self.closed_reason() {
            return Err(why);
        }
        self.out.send(f).map_err(|_| {
            self.closed_reason()
                .unwrap_or_else(|| "connection closed".into())
        })
    }

    /// Queues a frame without waiting (dropped if the connection closed).
    pub fn try_send(&self, f: Frame) {
        let _ = self.out.send(f);
    }

    /// Why the connection ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// A watch on [`Conn::closed_reason`].
    pub fn closed_watch(&self) -> watch::Receiver<Option<String>> {
        self.closed.subscribe()
    }

    /// Ends the connection (first reason wins) and every stream with it.
    pub fn fail(&self, why: String) {
        self.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(why);
                true
            } else {
                false
            }
        });
        // Dropping the senders ends every stream's events; owners then read the reason.
        // Writers waiting for credit are woken to see it too.
        let gone: Vec<_> = self.streams.lock().unwrap().drain().collect();
        for (_, s) in gone {
            s.send.wake();
        }
    }

    /// Registers a new stream before its Exec frame is sent.
    pub(crate) fn open_stream(
        &self,
        id: u32,
    ) -> (mpsc::UnboundedReceiver<ExecEvent>, Arc<SendWindow>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (rx, self.insert_stream(id, Events::Exec(tx)))
    }

    /// Registers a new port-forward stream before its Connect frame is sent.
    pub(crate) fn open_port_stream(
        &self,
        id: u32,
    ) -> (mpsc::UnboundedReceiver<PortEvent>, Arc<SendWindow>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = Events::Port {
            events: tx,
            connected: false,
            eof: false,
        };
        (rx, self.insert_stream(id, events))
    }

    fn insert_stream(&self, id: u32, events: Events) -> Arc<SendWindow> {
        let send = Arc::new(SendWindow::default());
        let state = StreamState {
            events,
            recv: Window::default(),
            send: send.clone(),
        };
        // A stream registered after the connection ended would never see its end.
        if self.closed_reason().is_none() {
            self.streams.lock().unwrap().insert(id, state);
        }
        send
    }

    /// Output bytes of a stream received from the guest and not yet consumed by its owner.
    pub(crate) fn unconsumed(&self, id: u32) -> u32 {
        self.streams
            .lock()
            .unwrap()
            .get(&id)
            .map_or(0, |s| airlock_proto::INITIAL_WINDOW - s.recv.available())
    }

    /// Forgets a stream whose owner went away.
    pub(crate) fn close_stream(&self, id: u32) {
        self.streams.lock().unwrap().remove(&id);
    }

    /// Returns `n` bytes of output window to the guest once the owner consumed them.
    pub(crate) fn grant(&self, id: u32, n: u32) {
        let known = match self.streams.lock().unwrap().get_mut(&id) {
            Some(s) => s.recv.grant(n).is_ok(),
            None => false,
        };
        if known {
            let _ = self.out.send(Frame::credit(id, n));
        }
    }

    fn dispatch(&self, f: Frame, ctl: &mpsc::UnboundedSender<ControlEvent>) -> Result<(), String> {
        if f.stream == CONTROL_STREAM {
            return match f.kind {
                Kind::Hello => {
                    let _ = ctl.send(ControlEvent::Hello(f.parse().map_err(|e| e.to_string())?));
                    Ok(())
                }
                Kind::Ready => {
                    let _ = ctl.send(ControlEvent::Ready(f.parse().map_err(|e| e.to_string())?));
                    Ok(())
                }
                // A `Resume` this connection sent itself (a pooled VM's warm-up rehearses one).
                Kind::Resumed => {
                    let _ = ctl.send(ControlEvent::Resumed);
                    Ok(())
                }
                Kind::Error => Err(format!(
                    "guest reported: {}",
                    String::from_utf8_lossy(&f.payload)
                )),
                k => Err(format!("unexpected {k:?} on the control stream")),
            };
        }
        let mut streams = self.streams.lock().unwrap();
        let Some(s) = streams.get_mut(&f.stream) else {
            return Ok(());
        };
        if f.kind == Kind::Credit {
            let n = f.parse_credit().map_err(|e| e.to_string())?;
            s.send
                .window
                .lock()
                .unwrap()
                .grant(n)
                .map_err(|e| format!("stream {}: {e}", f.stream))?;
            s.send.wake();
            return Ok(());
        }
        if f.kind == Kind::Error {
            tracing::warn!(
                stream = f.stream,
                "guest protocol error: {}",
                String::from_utf8_lossy(&f.payload)
            );
            return Ok(());
        }
        let events = match &mut s.events {
            Events::Exec(events) => events,
            Events::Port {
                events,
                connected,
                eof,
            } => {
                let (ev, last) = match f.kind {
                    Kind::Connected if !*connected => {
                        *connected = true;
                        (PortEvent::Connected, false)
                    }
                    Kind::ConnectFailed if !*connected => (
                        PortEvent::Failed(f.parse().map_err(|e| e.to_string())?),
                        true,
                    ),
                    Kind::Data if *connected && !*eof => {
                        s.recv
                            .receive(f.payload.len())
                            .map_err(|e| format!("stream {}: {e}", f.stream))?;
                        (PortEvent::Data(f.payload), false)
                    }
                    Kind::Eof if *connected && !*eof => {
                        *eof = true;
                        (PortEvent::Eof, false)
                    }
                    Kind::Reset => {
                        let r: StreamReset = f.parse().map_err(|e| e.to_string())?;
                        *s.send.reset.lock().unwrap() = Some(r.message.clone());
                        s.send.wake();
                        (PortEvent::Reset(r.message), true)
                    }
                    k => {
                        return Err(format!(
                            "guest sent {k:?} on port stream {}, which is not allowed there now",
                            f.stream
                        ))
                    }
                };
                let _ = events.send(ev);
                if last {
                    streams.remove(&f.stream);
                }
                return Ok(());
            }
        };
        let ev = match f.kind {
            Kind::Stdout | Kind::Stderr => {
                s.recv
                    .receive(f.payload.len())
                    .map_err(|e| format!("stream {}: {e}", f.stream))?;
                if f.kind == Kind::Stdout {
                    ExecEvent::Stdout(f.payload)
                } else {
                    ExecEvent::Stderr(f.payload)
                }
            }
            Kind::Started => {
                ExecEvent::Started(f.parse::<Started>().map_err(|e| e.to_string())?.pid)
            }
            Kind::Exit => ExecEvent::Exit(f.parse().map_err(|e| e.to_string())?),
            Kind::ExecFailed => ExecEvent::Failed(f.parse().map_err(|e| e.to_string())?),
            k => {
                return Err(format!(
                    "guest sent {k:?} on exec stream {}, which is not allowed there",
                    f.stream
                ))
            }
        };
        let last = matches!(ev, ExecEvent::Exit(_) | ExecEvent::Failed(_));
        let _ = events.send(ev);
        if last {
            streams.remove(&f.stream);
        }
        Ok(())
    }
}

/// Most a restored guest may send before its Resumed answer (the old host's leftovers are
/// bounded by the agent's queue and the stream windows; this is far above that).
const MAX_RESUME_SKIP: usize = 64 << 20;

async fn read_loop(
    mut rd: OwnedReadHalf,
    conn: Arc<Conn>,
    ctl: mpsc::UnboundedSender<ControlEvent>,
    mut marker: Option<Vec<u8>>,
) {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 256 * 1024];
    // Bytes kept while looking for the marker: at most its length minus one past a read.
    let mut pending: Vec<u8> = Vec::new();
    let mut skipped = 0usize;
    let why = loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => break "guest closed the control channel".to_string(),
            Ok(n) => n,
            Err(e) => break format!("control channel read: {e}"),
        };
        match &marker {
            None => dec.push(&buf[..n]),
            Some(m) => {
                pending.extend_from_slice(&buf[..n]);
                match pending.windows(m.len()).position(|w| w == m.as_slice()) {
                    Some(at) => {
                        let rest = pending.split_off(at + m.len());
                        pending.clear();
                        marker = None;
                        let _ = ctl.send(ControlEvent::Resumed);
                        dec.push(&rest);
                    }
                    None => {
                        let keep = pending.len().min(m.len() - 1);
                        skipped += pending.len() - keep;
                        pending.drain(..pending.len() - keep);
                        if skipped > MAX_RESUME_SKIP {
                            break "restored guest never answered Resume".to_string();
                        }
                        continue;
                    }
                }
            }
        }
        let mut err = None;
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    if let Err(e) = conn.dispatch(f, &ctl) {
                        err = Some(format!("guest violated the protocol: {e}"));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    err = Some(format!("guest violated the protocol: {e}"));
                    break;
                }
            }
        }
        if let Some(e) = err {
            break e;
        }
    };
    conn.fail(why);
}

/// The writer's half of the socket. Dropping a tokio write half shuts the socket's write
/// side down for every descriptor of it, so after [`Conn::abort`] it is forgotten instead:
/// the other process that now has the socket keeps writing.
struct Writer {
    wr: Option<OwnedWriteHalf>,
    conn: Arc<Conn>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(wr) = self.wr.take() {
            if self
                .conn
                .handed_over
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                wr.forget();
            }
        }
    }
}

async fn write_loop(wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Frame>, conn: Arc<Conn>) {
    let mut wr = Writer {
        wr: Some(wr),
        conn: conn.clone(),
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut closed = conn.closed_watch();
    loop {
        let f = tokio::select! {
            f = rx.recv() => match f { Some(f) => f, None => return },
            _ = closed.wait_for(|c| c.is_some()) => return,
        };
        let _gate = conn.write_gate.clone().lock_owned().await;
        buf.clear();
        f.encode_into(&mut buf);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => f.encode_into(&mut buf),
                Err(_) => break,
            }
        }
        let Some(w) = wr.wr.as_mut() else { return };
        if let Err(e) = w.write_all(&buf).await {
            conn.fail(format!("control channel write: {e}"));
            return;
        }
    }
}

/// A hostile guest's frames against the real host connection: each rule breach ends the
/// sandbox, frames for unknown streams are dropped.
#[cfg(test)]
mod hostile_guest {
    use super::*;
    use airlock_proto::{ConnectErrorKind, INITIAL_WINDOW, MAX_CHUNK};
    use tokio::io::AsyncWriteExt;

    /// The host connection with port stream 5 open, and the guest's end of the channel.
    async fn setup() -> (
        Arc<Conn>,
        mpsc::UnboundedReceiver<PortEvent>,
        tokio::net::UnixStream,
    ) {
        let (host, guest) = tokio::net::UnixStream::pair().unwrap();
        let (conn, _ctl) = Conn::start(host);
        let (rx, _) = conn.open_port_stream(5);
        (conn, rx, guest)
    }

    async fn send(guest: &mut tokio::net::UnixStream, frames: &[Frame]) {
        let mut b = Vec::new();
        for f in frames {
            f.encode_into(&mut b);
        }
        guest.write_all(&b).await.unwrap();
    }

    async fn closed(conn: &Conn) -> String {
        let mut w = conn.closed_watch();
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            w.wait_for(|c| c.is_some()),
        )
        .await;
        assert!(ended.is_ok(), "the host must end the connection");
        drop(ended);
        conn.closed_reason().unwrap()
    }

    #[tokio::test]
    async fn restored_guest_leftovers_before_the_resumed_marker_are_skipped() {
        let (host, mut guest) = tokio::net::UnixStream::pair().unwrap();
        let marker = Frame::json(
            Kind::Resumed,
            CONTROL_STREAM,
            &airlock_proto::Resumed {
                nonce: "n0nce".into(),
            },
        )
        .encode();
        let (conn, mut ctl) = Conn::start_after(host, Some(marker.clone()));
        let (rx, _) = conn.open_port_stream(5);
        // Half a frame and an old stream's data (the old host's), then the marker split
        // across writes, then a real frame for the new host.
        let mut old = Frame::new(Kind::Data, 5, vec![7; 100]).encode();
        old.truncate(40);
        old.extend_from_slice(&[0xff; 300]);
        guest.write_all(&old).await.unwrap();
        guest.write_all(&marker[..5]).await.unwrap();
        guest.write_all(&marker[5..]).await.unwrap();
        send(&mut guest, &[Frame::new(Kind::Connected, 5, vec![])]).await;
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), ctl.recv())
            .await
            .unwrap();
        assert!(matches!(ev, Some(ControlEvent::Resumed)), "{ev:?}");
        let mut rx = rx;
        let ev = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(matches!(ev, Some(PortEvent::Connected)), "{ev:?}");
        assert!(conn.closed_reason().is_none());
    }

    #[tokio::test]
    async fn restored_guest_that_never_answers_resume_is_cut_off() {
        let (host, mut guest) = tokio::net::UnixStream::pair().unwrap();
        let (conn, _ctl) = Conn::start_after(host, Some(b"never-sent-marker".to_vec()));
        let junk = vec![0u8; 1 << 20];
        for _ in 0..(MAX_RESUME_SKIP >> 20) + 2 {
            if guest.write_all(&junk).await.is_err() {
                break;
            }
        }
        assert!(closed(&conn).await.contains("never answered Resume"));
    }

    fn data(n: usize) -> Frame {
        Frame::new(Kind::Data, 5, vec![0; n])
    }

    #[tokio::test]
    async fn data_beyond_the_window_ends_the_sandbox() {
        let (conn, _rx, mut g) = setup().await;
        let mut frames = vec![Frame::new(Kind::Connected, 5, vec![])];
        frames.extend((0..INITIAL_WINDOW as usize / MAX_CHUNK).map(|_| data(MAX_CHUNK)));
        frames.push(data(1));
        send(&mut g, &frames).await;
        assert!(closed(&conn).await.contains("window"));
    }

    #[tokio::test]
    async fn data_before_connected_or_after_eof_ends_the_sandbox() {
        let (conn, _rx, mut g) = setup().await;
        send(&mut g, &[data(10)]).await;
        assert!(closed(&conn).await.contains("guest violated"));

        let (conn, mut rx, mut g) = setup().await;
        let eof = Frame::new(Kind::Eof, 5, vec![]);
        send(
            &mut g,
            &[Frame::new(Kind::Connected, 5, vec![]), eof, data(10)],
        )
        .await;
        assert!(closed(&conn).await.contains("Data"));
        assert!(matches!(rx.recv().await, Some(PortEvent::Connected)));
        assert!(matches!(rx.recv().await, Some(PortEvent::Eof)));
    }

    #[tokio::test]
    async fn repeated_one_shot_frames_and_exec_kinds_end_the_sandbox() {
        for bad in [
            Frame::new(Kind::Connected, 5, vec![]),
            Frame::new(Kind::Stdout, 5, vec![1]),
            Frame::json(Kind::Exit, 5, &ExitStatus::default()),
            Frame::json(Kind::Connect, 5, &airlock_proto::ConnectRequest { port: 1 }),
            Frame::new(Kind::Reset, 5, b"not json".to_vec()),
        ] {
            let (conn, _rx, mut g) = setup().await;
            send(
                &mut g,
                &[Frame::new(Kind::Connected, 5, vec![]), bad.clone()],
            )
            .await;
            let why = closed(&conn).await;
            assert!(why.contains("guest violated"), "{:?}: {why}", bad.kind);
        }
    }

    #[tokio::test]
    async fn unknown_streams_are_ignored_and_failures_are_delivered() {
        let (conn, mut rx, mut g) = setup().await;
        let refused = airlock_proto::ConnectError {
            kind: ConnectErrorKind::Refused,
            message: "connection refused".into(),
        };
        send(
            &mut g,
            &[
                Frame::new(Kind::Data, 99, vec![0; MAX_CHUNK]),
                Frame::new(Kind::Eof, 1234, vec![]),
                Frame::json(Kind::ConnectFailed, 5, &refused),
                // The stream is gone after its last frame: more for it is dropped.
                Frame::new(Kind::Connected, 5, vec![]),
            ],
        )
        .await;
        match rx.recv().await {
            Some(PortEvent::Failed(e)) => assert_eq!(e, refused),
            other => panic!("{other:?}"),
        }
        assert!(rx.recv().await.is_none(), "nothing after the last frame");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(conn.closed_reason(), None);
    }
}
