//! A process's stdio: the FIFOs (or files) containerd hands over, joined to a guest exec.
//!
//! Every FIFO is opened read-write: opening never blocks waiting for the other side, and a
//! client that goes away and comes back (`ctr task attach`) finds it still there. Stdin's
//! end is therefore never seen as EOF: containerd says so with `CloseIO`, after which what the
//! FIFO still holds is passed on and the guest gets EOF.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::pin::Pin;

use airlock_sandbox::ExecInput;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::error::ShimError;

/// Where a process's output goes.
pub type Sink = Pin<Box<dyn AsyncWrite + Send>>;
/// Where its input comes from.
pub type Source = Pin<Box<dyn AsyncRead + Send>>;

/// The stdio paths of a process, as containerd gave them (empty: not attached).
#[derive(Debug, Clone, Default)]
pub struct Paths {
    /// Stdin FIFO.
    pub stdin: String,
    /// Stdout FIFO.
    pub stdout: String,
    /// Stderr FIFO.
    pub stderr: String,
    /// Whether the process has a terminal (stdout then carries both streams).
    pub terminal: bool,
}

/// containerd also passes logging URIs (`binary://`, `file://`): plain paths are FIFOs, a
/// `file://` URI is a file to append to.
fn plain(path: &str) -> Result<&str, ShimError> {
    if let Some(p) = path.strip_prefix("file://") {
        return Ok(p);
    }
    if path.contains("://") {
        return Err(ShimError::Invalid(format!(
            "stdio {path}: only FIFOs and file:// are supported"
        )));
    }
    Ok(path)
}

/// Opens an output path.
pub async fn open_sink(path: &str) -> Result<Option<Sink>, ShimError> {
    if path.is_empty() {
        return Ok(None);
    }
    let p = plain(path)?;
    let err = |e: std::io::Error| ShimError::Host(format!("open {p}: {e}"));
    let is_fifo = std::fs::metadata(p).is_ok_and(|m| m.file_type().is_fifo());
    if is_fifo {
        let tx = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(p)
            .map_err(err)?;
        Ok(Some(Box::pin(tx)))
    } else {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .await
            .map_err(err)?;
        Ok(Some(Box::pin(f)))
    }
}

/// Opens the stdin FIFO.
pub fn open_source(path: &str) -> Result<Option<Source>, ShimError> {
    if path.is_empty() {
        return Ok(None);
    }
    let p = plain(path)?;
    if !Path::new(p).exists() {
        return Err(ShimError::Host(format!("stdin {p}: no such FIFO")));
    }
    let rx = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(p)
        .map_err(|e| ShimError::Host(format!("open {p}: {e}")))?;
    Ok(Some(Box::pin(rx)))
}

/// Copies `src` into the guest process until `close` is notified (then drains what is
/// buffered without waiting) or the guest stops taking input.
pub async fn pump_stdin(mut src: Source, input: ExecInput, close: std::sync::Arc<Notify>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            biased;
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => if input.write(&buf[..n]).await.is_err() { return },
            },
            _ = close.notified() => {
                // What the client wrote before CloseIO is in the FIFO already.
                loop {
                    let r = tokio::time::timeout(
                        std::time::Duration::from_millis(20),
                        src.read(&mut buf),
                    )
                    .await;
                    match r {
                        Ok(Ok(n)) if n > 0 => {
                            if input.write(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        _ => break,
                    }
                }
                break;
            }
        }
    }
    let _ = input.close().await;
}

/// Writes `data` to a sink; a sink whose reader has gone is dropped (output is discarded so
/// the guest never stalls on it).
pub async fn write(sink: &mut Option<Sink>, data: &[u8]) {
    if let Some(s) = sink {
        if s.write_all(data).await.is_err() {
            *sink = None;
        }
    }
}
