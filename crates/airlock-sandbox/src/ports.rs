//! Port forwards: TCP connections to guest-local ports carried over the control channel, so
//! they work whatever the guest's network (none at all included).
//!
//! # Threat notes
//! The guest server's bytes arrive as Data frames checked against the window the host granted
//! ([`crate::conn`] enforces it), so a guest that floods a forward stalls itself; the host only
//! returns credit as the client consumes bytes. A guest may reset or refuse any connection at
//! any time: that closes the one client, never the listener or the sandbox.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use airlock_proto::{ConnectRequest, Frame, Kind, StreamReset, MAX_CHUNK};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Semaphore};

use crate::conn::{Conn, PortEvent, SendWindow};
use crate::Error;

/// Connections one [`PortForward`] carries at once; more wait in the listen backlog. Each one
/// costs the guest agent two threads.
pub const MAX_FORWARD_CONNECTIONS: usize = 256;

/// How long a forward waits for the guest to accept or refuse a connection (the agent itself
/// gives up after 10 s).
const CONNECT_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A TCP connection to a port inside the sandbox, from [`crate::Sandbox::connect`].
///
/// Implements tokio's [`AsyncRead`] and [`AsyncWrite`]; [`AsyncWriteExt::shutdown`] half-closes
/// (the guest server reads end of file and may still answer). Dropping it before both sides
/// closed aborts the connection (the guest server sees a reset).
///
/// ```no_run
/// # async fn demo(sb: &airlock_sandbox::Sandbox) -> Result<(), Box<dyn std::error::Error>> {
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// let mut s = sb.connect(80).await?;
/// s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
/// s.shutdown().await?;
/// let mut page = Vec::new();
/// s.read_to_end(&mut page).await?;
/// # Ok(()) }
/// ```
///
/// [`AsyncWriteExt::shutdown`]: tokio::io::AsyncWriteExt::shutdown
pub struct GuestStream {
    id: u32,
    conn: Arc<Conn>,
    send: Arc<SendWindow>,
    events: mpsc::UnboundedReceiver<PortEvent>,
    chunk: Vec<u8>,
    pos: usize,
    read_eof: bool,
    write_shut: bool,
    /// Set once the connection is aborted (by either side) or the sandbox ended.
    dead: bool,
}

impl std::fmt::Debug for GuestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestStream").field("id", &self.id).finish()
    }
}

/// Opens a stream and waits for the guest's answer.
pub(crate) async fn connect(
    conn: &Arc<Conn>,
    next_stream: &AtomicU32,
    port: u16,
) -> Result<GuestStream, Error> {
    if port == 0 {
        return Err(Error::Setup(
            "guest port 0 is not a port: give 1-65535".into(),
        ));
    }
    let id = next_stream.fetch_add(1, Ordering::Relaxed);
    let (events, send) = conn.open_port_stream(id);
    // Built before the request goes out: if this future is dropped mid-connect, its Drop
    // resets the stream so the guest does not keep a connection nobody reads.
    let mut s = GuestStream {
        id,
        conn: conn.clone(),
        send,
        events,
        chunk: Vec::new(),
        pos: 0,
        read_eof: false,
        write_shut: false,
        dead: false,
    };
    conn.send(Frame::json(Kind::Connect, id, &ConnectRequest { port }))
        .await
        .map_err(Error::Protocol)?;
    match s.events.recv().await {
        Some(PortEvent::Connected) => Ok(s),
        Some(PortEvent::Failed(e)) => {
            s.dead = true;
            Err(Error::Connect { port, error: e })
        }
        Some(PortEvent::Reset(m)) => {
            s.dead = true;
            Err(Error::Protocol(format!(
                "guest reset the connection to port {port}: {m}"
            )))
        }
        // Data or Eof before Connected cannot reach here: conn refuses them.
        Some(_) => Err(Error::Protocol("unexpected port-forward event".into())),
        None => {
            s.dead = true;
            Err(Error::Protocol(
                conn.closed_reason()
                    .unwrap_or_else(|| "sandbox stopped".into()),
            ))
        }
    }
}

impl GuestStream {
    /// Bytes received from the guest that this stream has not yet returned to a reader.
    /// Flow control keeps it at most [`airlock_proto::INITIAL_WINDOW`], however fast the guest
    /// sends.
    ///
    /// ```no_run
    /// # fn demo(s: &airlock_sandbox::GuestStream) {
    /// assert!(s.buffered_bytes() <= airlock_proto::INITIAL_WINDOW);
    /// # }
    /// ```
    pub fn buffered_bytes(&self) -> u32 {
        self.conn.unconsumed(self.id)
    }

    fn closed_error(&self) -> io::Error {
        let why = self
            .conn
            .closed_reason()
            .unwrap_or_else(|| "sandbox stopped".into());
        io::Error::new(io::ErrorKind::BrokenPipe, why)
    }
}

impl AsyncRead for GuestStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.chunk.len() {
                let n = buf.remaining().min(this.chunk.len() - this.pos);
                buf.put_slice(&this.chunk[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.chunk.len() {
                    // Credit goes back only once the reader took the bytes.
                    this.conn.grant(this.id, this.chunk.len() as u32);
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            if this.dead {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            match this.events.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(PortEvent::Data(d))) => {
                    this.chunk = d;
                    this.pos = 0;
                }
                Poll::Ready(Some(PortEvent::Eof)) => this.read_eof = true,
                Poll::Ready(Some(PortEvent::Reset(m))) => {
                    this.dead = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("guest reset the connection: {m}"),
                    )));
                }
                Poll::Ready(Some(_)) => {}
                Poll::Ready(None) => {
                    this.dead = true;
                    return Poll::Ready(Err(this.closed_error()));
                }
            }
        }
    }
}

impl AsyncWrite for GuestStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if self.conn.closed_reason().is_some() {
                return Poll::Ready(Err(self.closed_error()));
            }
            if let Some(m) = self.send.reset.lock().unwrap().clone() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("guest reset the connection: {m}"),
                )));
            }
            if self.dead {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = self
                .send
                .window
                .lock()
                .unwrap()
                .take(data.len().min(MAX_CHUNK));
            if n > 0 {
                self.conn
                    .try_send(Frame::new(Kind::Data, self.id, data[..n].to_vec()));
                return Poll::Ready(Ok(n));
            }
            let mut w = self.send.waker.lock().unwrap();
            // Re-check under the waker lock: credit that arrived in between would not wake us.
            if self.send.window.lock().unwrap().available() > 0 {
                continue;
            }
            *w = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are queued to the control channel's writer task at once.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_shut {
            self.write_shut = true;
            if !self.dead {
                self.conn.try_send(Frame::new(Kind::Eof, self.id, vec![]));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for GuestStream {
    fn drop(&mut self) {
        let reset_by_guest = self.send.reset.lock().unwrap().is_some();
        let finished = self.read_eof && self.write_shut;
        if !(self.dead || reset_by_guest || finished) {
            self.conn.try_send(Frame::json(
                Kind::Reset,
                self.id,
                &StreamReset {
                    message: "host closed the connection".into(),
                },
            ));
        }
        self.conn.close_stream(self.id);
    }
}

/// A host TCP listener forwarding each connection to a port inside the sandbox, from
/// [`crate::Sandbox::forward_port`]. Dropping it (or the sandbox) stops listening; connections
/// already accepted run until either end closes them or the sandbox stops.
///
/// ```no_run
/// # async fn demo(sb: &airlock_sandbox::Sandbox) -> Result<(), airlock_sandbox::Error> {
/// let fwd = sb.forward_port("127.0.0.1:0".parse().unwrap(), 80).await?;
/// println!("guest port 80 is at http://{}", fwd.local_addr());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PortForward {
    local: SocketAddr,
    guest_port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl PortForward {
    /// The host address it listens on (with the real port when 0 was asked for).
    ///
    /// ```no_run
    /// # fn demo(fwd: &airlock_sandbox::PortForward) {
    /// let port = fwd.local_addr().port();
    /// # }
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The port inside the sandbox connections go to.
    ///
    /// ```no_run
    /// # fn demo(fwd: &airlock_sandbox::PortForward) {
    /// assert_eq!(fwd.guest_port(), 80);
    /// # }
    /// ```
    pub fn guest_port(&self) -> u16 {
        self.guest_port
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `listener` until the sandbox ends or the returned forward is dropped.
pub(crate) fn forward(
    conn: Arc<Conn>,
    next_stream: Arc<AtomicU32>,
    listener: std::net::TcpListener,
    guest_port: u16,
) -> Result<PortForward, Error> {
    if guest_port == 0 {
        return Err(Error::Setup(
            "guest port 0 is not a port: give 1-65535".into(),
        ));
    }
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut closed = conn.closed_watch();
        let permits = Arc::new(Semaphore::new(MAX_FORWARD_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = closed.wait_for(|c| c.is_some()) => return,
            };
            let client = tokio::select! {
                r = listener.accept() => r,
                _ = closed.wait_for(|c| c.is_some()) => return,
            };
            let (client, peer) = match client {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!("port forward {local}: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (conn, next) = (conn.clone(), next_stream.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = client.set_nodelay(true);
                // A guest that never answers must not pin a connection slot for good.
                let answer =
                    tokio::time::timeout(CONNECT_ANSWER_TIMEOUT, connect(&conn, &next, guest_port))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Error::Protocol(format!(
                                "the sandbox did not answer a connect to port {guest_port} in {} s",
                                CONNECT_ANSWER_TIMEOUT.as_secs()
                            )))
                        });
                let mut guest = match answer {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::info!("port forward {local} from {peer}: {e}");
                        return; // dropping the client closes it
                    }
                };
                let mut client = client;
                let res = tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut guest,
                    64 * 1024,
                    64 * 1024,
                )
                .await;
                if let Err(e) = res {
                    tracing::debug!("port forward {local} from {peer}: {e}");
                    // Pass the abort on: the client sees a reset, not a clean end.
                    let _ = client.set_zero_linger();
                }
            });
        }
    });
    Ok(PortForward {
        local,
        guest_port,
        task,
    })
}
