//! File operations in a running sandbox: write, read, list. Each runs on its own stream of the
//! control channel with the usual credit windows, so large files stream in bounded chunks.
//!
//! ```no_run
//! # async fn demo(sb: &airlock_sandbox::Sandbox) -> Result<(), airlock_sandbox::Error> {
//! sb.write_file("/tmp/hello.txt", b"hello\n", 0o644).await?;
//! assert_eq!(sb.read_file("/tmp/hello.txt").await?, b"hello\n");
//! for f in sb.list_files("/tmp").await? {
//!     println!("{} {} bytes", f.name, f.size);
//! }
//! # Ok(()) }
//! ```
//!
//! **Threat notes.** Reads and listings come back from the guest, which may lie about sizes,
//! stream forever or send malformed entries: a read collects at most [`READ_FILE_MAX`] bytes
//! in memory (bigger files go to a writer in bounded chunks), a listing at most a million
//! entries of bounded line length, and everything arrives under the control channel's credit
//! windows, so a guest cannot make the host buffer more than one window per stream. Names in a
//! listing are data for the caller, never paths the host opens: callers that write guest files
//! to the host (`airlock cp` out) must confine them themselves.

use airlock_proto::{FileEntry, FileOpKind, FileRequest, Kind, MAX_CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Error, Exec, ExecEvent, Sandbox};

/// Largest file [`Sandbox::read_file`] collects in memory; read bigger ones with
/// [`Sandbox::read_file_to`] or in ranges.
pub const READ_FILE_MAX: u64 = 256 * 1024 * 1024;

/// Most entries [`Sandbox::list_files`] accepts from the guest.
const LIST_MAX_ENTRIES: usize = 1_000_000;
/// Longest line of a listing (one JSON entry).
const LIST_MAX_LINE: usize = 64 * 1024;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// A directory.
    pub is_dir: bool,
}

impl Sandbox {
    async fn file_op(&self, req: FileRequest) -> Result<Exec, Error> {
        self.open_exec_stream(Kind::FileOp, &req, "file path and options")
            .await
    }

    /// The next data chunk of a file operation; `None` once it succeeded.
    async fn file_next(&self, exec: &mut Exec) -> Result<Option<Vec<u8>>, Error> {
        match exec.next().await {
            Ok(Some(ExecEvent::Stdout(b))) => Ok(Some(b)),
            Ok(Some(ExecEvent::Exit(s))) if s.code == Some(0) => Ok(None),
            Ok(Some(ExecEvent::Failed(e))) => Err(Error::File(e)),
            Ok(Some(other)) => Err(Error::Protocol(format!(
                "guest sent {other:?} on a file stream"
            ))),
            Ok(None) => Err(Error::Protocol("file operation ended early".into())),
            Err(_) => Err(self.death_error().await),
        }
    }

    /// Writes `data` to `path` in the guest (parents created, mode e.g. `0o644`), as root.
    pub async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), Error> {
        self.write_file_from(path, data, mode, false)
            .await
            .map(|_| ())
    }

    /// Streams `reader` into `path` in the guest (truncating it, or appending with `append`);
    /// returns the bytes written. Memory use is bounded by the guest's credit window.
    pub async fn write_file_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        mut reader: R,
        mode: u32,
        append: bool,
    ) -> Result<u64, Error> {
        let mut exec = self
            .file_op(FileRequest {
                op: FileOpKind::Write,
                path: path.into(),
                mode: Some(mode),
                append,
                offset: 0,
                len: None,
            })
            .await?;
        let input = exec.input();
        let pump = send_all(&input, &mut reader);
        tokio::pin!(pump);
        // Watch the stream while sending: a guest that fails early (bad path) ends it.
        let mut sent = None;
        loop {
            tokio::select! {
                r = &mut pump, if sent.is_none() => sent = Some(r?),
                r = self.file_next(&mut exec) => {
                    if r?.is_some() {
                        return Err(Error::Protocol("guest sent data on a write".into()));
                    }
                    return sent.ok_or_else(|| Error::Protocol("guest finished a write before its end".into()));
                }
            }
        }
    }

    /// Reads all of `path` (at most [`READ_FILE_MAX`] bytes, else an error saying so).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        self.read_file_range(path, 0, Some(READ_FILE_MAX + 1), &mut out)
            .await?;
        if out.len() as u64 > READ_FILE_MAX {
            return Err(Error::File(airlock_proto::ExecError {
                kind: airlock_proto::ExecErrorKind::Invalid,
                message: format!(
                    "read {path}: larger than {READ_FILE_MAX} bytes; stream it with read_file_to or read ranges"
                ),
            }));
        }
        Ok(out)
    }

    /// Streams `path` into `w`; returns the bytes copied.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        w: &mut W,
    ) -> Result<u64, Error> {
        self.read_range_to(path, 0, None, w).await
    }

    /// Appends at most `len` bytes of `path` from `offset` to `out`.
    pub async fn read_file_range(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Result<u64, Error> {
        self.read_range_to(path, offset, len, out).await
    }

    async fn read_range_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        offset: u64,
        len: Option<u64>,
        w: &mut W,
    ) -> Result<u64, Error> {
        let mut exec = self
            .file_op(FileRequest {
                op: FileOpKind::Read,
                path: path.into(),
                mode: None,
                append: false,
                offset,
                len,
            })
            .await?;
        let mut total = 0u64;
        while let Some(b) = self.file_next(&mut exec).await? {
            total += b.len() as u64;
            w.write_all(&b).await?;
        }
        w.flush().await?;
        Ok(total)
    }

    /// The entries of directory `path` (without `.` and `..`), in directory order.
    pub async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>, Error> {
        let mut exec = self
            .file_op(FileRequest {
                op: FileOpKind::List,
                path: path.into(),
                mode: None,
                append: false,
                offset: 0,
                len: None,
            })
            .await?;
        let mut partial: Vec<u8> = Vec::new();
        let mut files = Vec::new();
        while let Some(b) = self.file_next(&mut exec).await? {
            partial.extend_from_slice(&b);
            while let Some(nl) = partial.iter().position(|c| *c == b'\n') {
                let line: Vec<u8> = partial.drain(..=nl).collect();
                let e: FileEntry = serde_json::from_slice(&line[..line.len() - 1])
                    .map_err(|e| Error::Protocol(format!("bad listing entry from guest: {e}")))?;
                if files.len() >= LIST_MAX_ENTRIES {
                    return Err(Error::Protocol(format!(
                        "listing of {path} exceeds {LIST_MAX_ENTRIES} entries"
                    )));
                }
                files.push(FileInfo {
                    name: e.name,
                    size: e.size,
                    mode: e.mode,
                    is_dir: e.is_dir,
                });
            }
            if partial.len() > LIST_MAX_LINE {
                return Err(Error::Protocol("listing line from guest too long".into()));
            }
        }
        if !partial.is_empty() {
            return Err(Error::Protocol("listing ends mid-line".into()));
        }
        Ok(files)
    }
}

/// Sends all of `reader` as an exec's stdin, then closes it; returns the bytes sent.
pub(crate) async fn send_all<R: AsyncRead + Unpin>(
    input: &crate::ExecInput,
    mut reader: R,
) -> Result<u64, Error> {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        input.write(&buf[..n]).await?;
        total += n as u64;
    }
    input.close().await?;
    Ok(total)
}
