//! File operations for the host ([`Kind::FileOp`]): write, read, list, as root, each on its
//! own stream with the same flow control as an exec.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use airlock_proto::{
    ExecErrorKind, ExitStatus, FileEntry, FileOpKind, FileRequest, Frame, Kind, MAX_CHUNK,
};

use crate::exec::{Entry, Registry, StdinReader};

type OpError = (ExecErrorKind, String);

/// Handles a FileOp frame: runs the operation on its own thread.
pub fn start(reg: &Arc<Registry>, stream: u32, frame: &Frame) {
    if reg.by_stream.lock().unwrap().contains_key(&stream) {
        return reg.fail(
            stream,
            ExecErrorKind::Invalid,
            format!("stream {stream} is already in use"),
        );
    }
    let req: FileRequest = match frame.parse() {
        Ok(r) => r,
        Err(e) => return reg.fail(stream, ExecErrorKind::Invalid, e.to_string()),
    };
    let (entry, stdin_rx) = Entry::builtin(stream);
    reg.by_stream.lock().unwrap().insert(stream, entry.clone());
    let reg = reg.clone();
    std::thread::spawn(move || {
        let res = match check_path(&req.path) {
            Err(e) => Err(e),
            Ok(()) => match req.op {
                FileOpKind::Write => {
                    let mut input = StdinReader::new(&reg, &entry, stdin_rx);
                    let r = write(&req, &mut input);
                    // Drain to EOF so a host still sending never waits for credit.
                    while input.fill() {}
                    r
                }
                FileOpKind::Read => read(&reg, &entry, &req),
                FileOpKind::List => list(&reg, &entry, &req),
            },
        };
        match res {
            Ok(()) => {
                {
                    let mut p = entry.progress.lock().unwrap();
                    p.exit = Some(ExitStatus {
                        code: Some(0),
                        ..Default::default()
                    });
                    p.done = true;
                }
                reg.finish(&entry);
            }
            Err((kind, message)) => {
                reg.by_stream.lock().unwrap().remove(&stream);
                reg.fail(stream, kind, message);
            }
        }
    });
}

fn check_path(p: &str) -> Result<(), OpError> {
    if !p.starts_with('/') {
        return Err((
            ExecErrorKind::Invalid,
            format!("{p:?}: the path must be absolute"),
        ));
    }
    if p.contains('\0') {
        return Err((
            ExecErrorKind::Invalid,
            "the path must not contain NUL bytes".into(),
        ));
    }
    Ok(())
}

fn io_err(path: &str, what: &str, e: std::io::Error) -> OpError {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ExecErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ExecErrorKind::PermissionDenied,
        _ => ExecErrorKind::Other,
    };
    (kind, format!("{what} {path}: {e}"))
}

fn write(req: &FileRequest, input: &mut StdinReader<'_>) -> Result<(), OpError> {
    let path = std::path::Path::new(&req.path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(&req.path, "create parent of", e))?;
    }
    let mode = req.mode.unwrap_or(0o644) & 0o7777;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(req.append)
        .truncate(!req.append)
        .mode(mode)
        .open(path)
        .map_err(|e| io_err(&req.path, "open", e))?;
    std::io::copy(input, &mut f).map_err(|e| io_err(&req.path, "write", e))?;
    // The umask applied at creation; an existing file keeps its old bits otherwise.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(&req.path, "chmod", e))?;
    f.flush().map_err(|e| io_err(&req.path, "write", e))
}

/// Sends `data` as Stdout frames within the stream's window. Err if the host cancelled.
fn send(reg: &Registry, e: &Entry, mut data: &[u8]) -> Result<(), OpError> {
    while !data.is_empty() {
        let n = {
            let mut w = e.out.lock().unwrap();
            while w.available() == 0 && !e.cancelled.load(Ordering::SeqCst) {
                w = e.out_cv.wait(w).unwrap();
            }
            if e.cancelled.load(Ordering::SeqCst) {
                return Err((ExecErrorKind::Other, "cancelled by the host".into()));
            }
            w.take(data.len().min(MAX_CHUNK))
        };
        if !reg
            .tx
            .send(Frame::new(Kind::Stdout, e.stream, data[..n].to_vec()))
        {
            return Err((ExecErrorKind::Other, "host connection gone".into()));
        }
        data = &data[n..];
    }
    Ok(())
}

fn read(reg: &Registry, e: &Entry, req: &FileRequest) -> Result<(), OpError> {
    let mut f = File::open(&req.path).map_err(|err| io_err(&req.path, "open", err))?;
    let meta = f.metadata().map_err(|err| io_err(&req.path, "stat", err))?;
    if meta.is_dir() {
        return Err((
            ExecErrorKind::Invalid,
            format!("read {}: is a directory", req.path),
        ));
    }
    if req.offset > 0 {
        f.seek(SeekFrom::Start(req.offset))
            .map_err(|err| io_err(&req.path, "seek", err))?;
    }
    let mut left = req.len.unwrap_or(u64::MAX);
    let mut buf = vec![0u8; MAX_CHUNK];
    while left > 0 {
        let want = (buf.len() as u64).min(left) as usize;
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_err(&req.path, "read", err)),
        };
        send(reg, e, &buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn list(reg: &Registry, e: &Entry, req: &FileRequest) -> Result<(), OpError> {
    let dir = std::fs::read_dir(&req.path).map_err(|err| io_err(&req.path, "list", err))?;
    let mut out = Vec::with_capacity(MAX_CHUNK);
    for ent in dir {
        let ent = ent.map_err(|err| io_err(&req.path, "list", err))?;
        // An entry removed meanwhile is skipped rather than failing the listing.
        let Ok(m) = ent.metadata() else { continue };
        let line = FileEntry {
            name: ent.file_name().to_string_lossy().into_owned(),
            size: m.size(),
            mode: m.mode(),
            is_dir: m.is_dir(),
        };
        serde_json::to_writer(&mut out, &line)
            .map_err(|err| (ExecErrorKind::Other, err.to_string()))?;
        out.push(b'\n');
        if out.len() >= MAX_CHUNK {
            send(reg, e, &out)?;
            out.clear();
        }
    }
    send(reg, e, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_nul_free() {
        assert!(check_path("/etc/hosts").is_ok());
        assert_eq!(
            check_path("etc/hosts").unwrap_err().0,
            ExecErrorKind::Invalid
        );
        assert_eq!(check_path("/a\0b").unwrap_err().0, ExecErrorKind::Invalid);
        assert_eq!(check_path("").unwrap_err().0, ExecErrorKind::Invalid);
    }

    #[test]
    fn io_errors_keep_their_kind_and_name_the_path() {
        let e = io_err(
            "/x",
            "open",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(e.0, ExecErrorKind::NotFound);
        assert!(e.1.starts_with("open /x: "), "{}", e.1);
        let e = io_err(
            "/y",
            "write",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(e.0, ExecErrorKind::PermissionDenied);
        let e = io_err("/z", "read", std::io::Error::other("boom"));
        assert_eq!(e.0, ExecErrorKind::Other);
    }
}
