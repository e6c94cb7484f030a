//! `airlock exec`: a command in a running sandbox, through the typed RPC client, with stdin,
//! terminal, resize and signals forwarded.

use std::io::{Read, Write};
use std::path::PathBuf;

use airlock_rpc::client::{Client, ExecKind, ExecMessage};
use airlock_rpc::wire;

use super::*;

/// The typed JSON-RPC client, connected to sandbox `id`'s supervisor.
pub async fn connect(id: &str) -> Result<(Client, PathBuf), String> {
    let dir = find(id)?;
    if status(&dir) != Status::Running {
        return Err(format!(
            "sandbox {} is not running (airlock ls -a)",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    let c = Client::connect(&dir.join("sock")).await?;
    Ok((c, dir))
}

/// Options of `airlock exec`.
pub struct ExecOpts {
    /// Sandbox id.
    pub id: String,
    /// Forward stdin.
    pub interactive: bool,
    /// Terminal.
    pub tty: bool,
    /// Working directory.
    pub workdir: Option<String>,
    /// User.
    pub user: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Program and arguments.
    pub cmd: Vec<String>,
}

/// `airlock exec`: the exit code of the command (125/126/127 as `run`).
pub async fn exec(o: ExecOpts) -> i32 {
    match exec_inner(o).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock: {e}");
            crate::EXIT_SANDBOX_FAILED
        }
    }
}

pub(crate) async fn exec_inner(o: ExecOpts) -> Result<i32, String> {
    if o.cmd.is_empty() {
        return Err("no command given: airlock exec ID -- CMD [ARG...]".into());
    }
    let (mut c, _) = connect(&o.id).await?;
    let tty = o
        .tty
        .then(crate::term::local_size)
        .map(|s| s.unwrap_or(airlock_sandbox::WinSize { rows: 24, cols: 80 }));
    let params = wire::ExecParams {
        argv: Some(o.cmd),
        env: o.env.into_iter().collect(),
        working_dir: o.workdir,
        user: o.user,
        rows: tty.map(|ws| ws.rows),
        cols: tty.map(|ws| ws.cols),
        ..Default::default()
    };
    let kind = if tty.is_some() {
        ExecKind::Tty
    } else {
        ExecKind::Pipe
    };
    let id = c.exec_start(kind, &params).await?;
    let mut signals = crate::term::Signals::new()?;
    let _raw = if tty.is_some() && o.interactive {
        crate::term::RawMode::enable()
    } else {
        None
    };
    // Stdin: read on a thread, queued to the loop below (bounded: backpressure to the reader).
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    let mut ready = false;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            m = c.exec_next(kind, id) => match m? {
                ExecMessage::Ready => {
                    ready = true;
                    if o.interactive {
                        let tx = in_tx.clone();
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 32 * 1024];
                            let mut stdin = std::io::stdin().lock();
                            loop {
                                match stdin.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => if tx.blocking_send(Some(buf[..n].to_vec())).is_err() { return },
                                }
                            }
                            let _ = tx.blocking_send(None);
                        });
                    } else {
                        c.exec_stdin_eof(kind, id).await?;
                    }
                }
                ExecMessage::Stdout(b) => {
                    if stdout.write_all(&b).and_then(|_| stdout.flush()).is_err() {
                        c.exec_signal(kind, id, libc::SIGPIPE).await?;
                    }
                }
                ExecMessage::Stderr(b) => {
                    let _ = stderr.write_all(&b);
                }
                ExecMessage::Done(r) => {
                    drop(_raw);
                    return Ok(match r {
                        Ok(r) => {
                            if r.oom_killed {
                                eprintln!("airlock: {}", crate::OOM_MESSAGE);
                            }
                            r.exit_code
                        }
                        Err(e) => {
                            eprintln!("airlock: {}", e.message);
                            if e.code != wire::EXEC_FAILED {
                                crate::EXIT_SANDBOX_FAILED
                            } else if e.message.contains("not found") {
                                127
                            } else if e.message.contains("ermission denied") {
                                126
                            } else {
                                125
                            }
                        }
                    });
                }
            },
            d = in_rx.recv(), if ready => match d {
                Some(Some(b)) => c.exec_stdin(kind, id, &b).await?,
                Some(None) | None => c.exec_stdin_eof(kind, id).await?,
            },
            ev = signals.next() => match ev {
                crate::term::SignalEvent::Resize => {
                    if let (Some(ws), true) = (crate::term::local_size(), tty.is_some()) {
                        c.exec_resize(id, ws.rows, ws.cols).await?;
                    }
                }
                crate::term::SignalEvent::Forward(sig) => {
                    c.exec_signal(kind, id, sig).await?;
                }
            },
        }
    }
}
