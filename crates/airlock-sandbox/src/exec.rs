//! The handles of a running command: [`Exec`] (its events) and [`ExecInput`] (stdin, signals,
//! terminal size).

use std::sync::Arc;

use airlock_proto::{Frame, Kind, SignalRequest, MAX_CHUNK};

use tokio::sync::mpsc;

use crate::{conn, Error, ExecEvent, WinSize};

/// The input side of an exec: stdin, signals, terminal size. Cloneable.
#[derive(Clone)]
pub struct ExecInput {
    pub(crate) id: u32,
    pub(crate) conn: Arc<conn::Conn>,
    pub(crate) send: Arc<conn::SendWindow>,
}

impl ExecInput {
    /// Writes to the command's stdin, waiting for the guest's flow-control credit.
    pub async fn write(&self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            let n = self
                .send
                .window
                .lock()
                .unwrap()
                .take(data.len().min(MAX_CHUNK));
            if n == 0 {
                let mut closed = self.conn.closed_watch();
                tokio::select! {
                    _ = self.send.notify.notified() => {}
                    _ = closed.wait_for(|c| c.is_some()) => {}
                }
                if let Some(why) = self.conn.closed_reason() {
                    return Err(Error::Protocol(why));
                }
                continue;
            }
            self.conn
                .send(Frame::new(Kind::Stdin, self.id, data[..n].to_vec()))
                .await
                .map_err(Error::Protocol)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes stdin (the command sees end of file).
    pub async fn close(&self) -> Result<(), Error> {
        self.conn
            .send(Frame::new(Kind::StdinEof, self.id, vec![]))
            .await
            .map_err(Error::Protocol)
    }

    /// Sends a signal to the process (`group`: to its whole process group).
    pub async fn signal(&self, signal: i32, group: bool) -> Result<(), Error> {
        self.conn
            .send(Frame::json(
                Kind::Signal,
                self.id,
                &SignalRequest { signal, group },
            ))
            .await
            .map_err(Error::Protocol)
    }

    /// Resizes the command's terminal.
    pub async fn resize(&self, size: WinSize) -> Result<(), Error> {
        self.conn
            .send(Frame::json(Kind::Resize, self.id, &size))
            .await
            .map_err(Error::Protocol)
    }
}

/// A running command.
pub struct Exec {
    pub(crate) input: ExecInput,
    pub(crate) events: mpsc::UnboundedReceiver<ExecEvent>,
    pub(crate) done: bool,
}

impl Exec {
    /// Stdin, signals and resize for this command.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// Output bytes the host holds for this command that [`Exec::next`] has not yet returned.
    /// Flow control keeps it at most [`airlock_proto::INITIAL_WINDOW`].
    pub fn buffered_bytes(&self) -> u32 {
        self.input.conn.unconsumed(self.input.id)
    }

    /// The next event; `Ok(None)` after the last one. Consuming output returns flow-control
    /// credit to the guest, so a slow reader slows the command instead of buffering.
    /// `Err` means the sandbox died; [`Sandbox::failure`] says why.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, Error> {
        if self.done {
            return Ok(None);
        }
        match self.events.recv().await {
            Some(ev) => {
                match &ev {
                    ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => {
                        self.input.conn.grant(self.input.id, b.len() as u32)
                    }
                    ExecEvent::Exit(_) | ExecEvent::Failed(_) => self.done = true,
                    ExecEvent::Started(_) => {}
                }
                Ok(Some(ev))
            }
            None => {
                self.done = true;
                Err(Error::Protocol(
                    self.input
                        .conn
                        .closed_reason()
                        .unwrap_or_else(|| "sandbox stopped".into()),
                ))
            }
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if !self.done {
            // Nobody reads its output any more: kill the process group rather than leave it
            // blocked on flow control forever.
            let kill = SignalRequest {
                signal: libc::SIGKILL,
                group: true,
            };
            self.input
                .conn
                .try_send(Frame::json(Kind::Signal, self.input.id, &kill));
            self.input.conn.close_stream(self.input.id);
        }
    }
}
