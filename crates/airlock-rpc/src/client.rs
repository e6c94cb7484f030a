//! A typed client of the JSON-RPC API: what the CLI uses to drive a detached sandbox through
//! its supervisor's socket. Parameters and results are the [`wire`] types the server itself
//! uses, so a method's shape is written once.
//!
//! Answers are read by a task of their own into a bounded queue, so [`Client::recv`] is
//! cancel-safe (it can sit in a `select!` beside stdin and signals without losing a line).

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::wire::{self, RpcError};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach the sandbox's supervisor: {0}")]
    Connect(std::io::Error),
    /// Reading or writing the connection failed.
    #[error("supervisor connection: {0}")]
    Io(std::io::Error),
    /// The server closed the connection.
    #[error("the supervisor closed the connection (sandbox stopped?)")]
    Closed,
    /// The server sent something that is not a JSON-RPC message of the expected shape.
    #[error("bad answer from the supervisor: {0}")]
    BadAnswer(String),
    /// The server answered with an error.
    #[error("{}", .0.message)]
    Rpc(RpcError),
}

impl ClientError {
    /// The JSON-RPC error code when the server answered with an error.
    pub fn code(&self) -> Option<i32> {
        match self {
            ClientError::Rpc(e) => Some(e.code),
            _ => None,
        }
    }
}

impl From<ClientError> for String {
    fn from(e: ClientError) -> String {
        e.to_string()
    }
}

/// One message from the server.
#[derive(Debug, Clone)]
pub enum Message {
    /// The answer to request `id`.
    Answer {
        /// The request's id.
        id: u64,
        /// Its result or error.
        result: Result<Value, RpcError>,
    },
    /// A notification (exec output, readiness).
    Notification {
        /// Method name, e.g. `exec_pipe.stdout`.
        method: String,
        /// Its parameters.
        params: Value,
    },
}

/// Parses one line from the server.
pub fn parse_message(line: &[u8]) -> Result<Message, ClientError> {
    let v: Value =
        serde_json::from_slice(line).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
    if let Some(m) = v.get("method").and_then(Value::as_str) {
        return Ok(Message::Notification {
            method: m.to_string(),
            params: v.get("params").cloned().unwrap_or(Value::Null),
        });
    }
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| ClientError::BadAnswer("an answer without a numeric id".into()))?;
    let result = match v.get("error") {
        Some(e) => Err(RpcError::new(
            e.get("code")
                .and_then(Value::as_i64)
                .map_or(wire::INTERNAL_ERROR, |c| c as i32),
            e.get("message").and_then(Value::as_str).unwrap_or("error"),
        )),
        None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
    };
    Ok(Message::Answer { id, result })
}

/// Which streaming exec: the prefix of its notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecKind {
    /// `exec_pipe`: separate stdout and stderr, stdin by notifications.
    Pipe,
    /// `exec_tty`: one terminal stream.
    Tty,
}

impl ExecKind {
    fn method(self) -> &'static str {
        match self {
            ExecKind::Pipe => "exec_pipe",
            ExecKind::Tty => "exec_tty",
        }
    }
}

/// What a streaming exec reported.
#[derive(Debug, Clone)]
pub enum ExecMessage {
    /// The command runs; stdin may be sent.
    Ready,
    /// Output bytes.
    Stdout(Vec<u8>),
    /// Error output bytes (`exec_pipe`).
    Stderr(Vec<u8>),
    /// The end: its status, or why it could not run.
    Done(Result<wire::ExecResult, RpcError>),
}

/// A connection to a JSON-RPC server.
pub struct Client {
    rx: mpsc::Receiver<Result<Message, ClientError>>,
    wr: Box<dyn AsyncWrite + Unpin + Send>,
    next: u64,
}

impl Client {
    /// Connects to the unix socket at `path` (a supervisor's `sock`).
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(ClientError::Connect)?;
        let (r, w) = s.into_split();
        Ok(Client::new(tokio::io::BufReader::new(r), w))
    }

    /// A client over any byte stream pair.
    pub fn new<R, W>(mut rd: R, wr: W) -> Client
    where
        R: AsyncBufRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let m = match wire::read_line(&mut rd, wire::MAX_LINE).await {
                    Ok(wire::Line::Line(l)) => parse_message(&l),
                    Ok(wire::Line::TooLong) => Err(ClientError::BadAnswer(format!(
                        "a line longer than {} bytes",
                        wire::MAX_LINE
                    ))),
                    Ok(wire::Line::Eof) => Err(ClientError::Closed),
                    Err(e) => Err(ClientError::Io(e)),
                };
                let end = matches!(m, Err(ClientError::Closed | ClientError::Io(_)));
                if tx.send(m).await.is_err() || end {
                    return;
                }
            }
        });
        Client {
            rx,
            wr: Box::new(wr),
            next: 1,
        }
    }

    /// Sends a request; returns its id.
    pub async fn send<P: Serialize>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<u64, ClientError> {
        let id = self.next;
        self.next += 1;
        self.write(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await?;
        Ok(id)
    }

    /// Sends a notification (no answer).
    pub async fn notify<P: Serialize>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<(), ClientError> {
        self.write(json!({"jsonrpc": "2.0", "method": method, "params": params}))
            .await
    }

    async fn write(&mut self, v: Value) -> Result<(), ClientError> {
        let mut line = v.to_string();
        line.push('\n');
        self.wr
            .write_all(line.as_bytes())
            .await
            .map_err(ClientError::Io)
    }

    /// The next message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        self.rx.recv().await.unwrap_or(Err(ClientError::Closed))
    }

    /// Calls `method` and waits for its answer (notifications meanwhile are dropped).
    pub async fn call<P: Serialize, R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: &P,
    ) -> Result<R, ClientError> {
        let want = self.send(method, params).await?;
        loop {
            if let Message::Answer { id, result } = self.recv().await? {
                if id == want {
                    let v = result.map_err(ClientError::Rpc)?;
                    return serde_json::from_value(v)
                        .map_err(|e| ClientError::BadAnswer(format!("{method}: {e}")));
                }
            }
        }
    }

    /// `info`: the sandbox's id, VM pid, kernel and accelerator.
    pub async fn info(&mut self) -> Result<wire::InfoResult, ClientError> {
        self.call("info", &json!({})).await
    }

    /// `stats`: one sample of the sandbox's resource use.
    pub async fn stats(&mut self) -> Result<airlock_sandbox::Stats, ClientError> {
        self.call("stats", &json!({})).await
    }

    /// `shutdown`: power off at once (`None`), or SIGTERM, `grace`, SIGKILL.
    pub async fn shutdown(&mut self, grace: Option<Duration>) -> Result<(), ClientError> {
        let p = wire::ShutdownParams {
            grace_ms: grace.map(|g| g.as_millis() as u64),
        };
        self.call::<_, Value>("shutdown", &p).await.map(drop)
    }

    /// `port_forward`.
    pub async fn port_forward(
        &mut self,
        p: &wire::PortForwardParams,
    ) -> Result<wire::PortForwardResult, ClientError> {
        self.call("port_forward", p).await
    }

    /// `allow_list_add` (`add`) or `allow_list_delete`.
    pub async fn allow_list(&mut self, add: bool, hosts: &[String]) -> Result<(), ClientError> {
        let m = if add {
            "allow_list_add"
        } else {
            "allow_list_delete"
        };
        let p = wire::HostsParams {
            hosts: hosts.to_vec(),
        };
        self.call::<_, Value>(m, &p).await.map(drop)
    }

    /// `share_diff`.
    pub async fn share_diff(&mut self) -> Result<wire::ShareDiffResult, ClientError> {
        self.call("share_diff", &json!({})).await
    }

    /// `top`: the guest's processes.
    pub async fn top(&mut self) -> Result<wire::TopResult, ClientError> {
        self.call("top", &json!({})).await
    }

    /// `copy_in`.
    pub async fn copy_in(
        &mut self,
        p: &wire::CopyInParams,
    ) -> Result<wire::CopyInResult, ClientError> {
        self.call("copy_in", p).await
    }

    /// `copy_out`.
    pub async fn copy_out(
        &mut self,
        p: &wire::CopyOutParams,
    ) -> Result<wire::CopyOutResult, ClientError> {
        self.call("copy_out", p).await
    }

    /// `snapshot`.
    pub async fn snapshot(&mut self, name: &str) -> Result<wire::SnapshotResult, ClientError> {
        let p = wire::SnapshotParams { name: name.into() };
        self.call("snapshot", &p).await
    }

    /// Starts a streaming exec; its messages come from [`Client::exec_next`].
    pub async fn exec_start(
        &mut self,
        kind: ExecKind,
        p: &wire::ExecParams,
    ) -> Result<u64, ClientError> {
        self.send(kind.method(), p).await
    }

    /// The next message of exec `id` (others are dropped). Cancel-safe.
    pub async fn exec_next(&mut self, kind: ExecKind, id: u64) -> Result<ExecMessage, ClientError> {
        let pfx = kind.method();
        loop {
            match self.recv().await? {
                Message::Answer { id: got, result } if got == id => {
                    return Ok(ExecMessage::Done(result.and_then(|v| {
                        serde_json::from_value(v).map_err(|e| {
                            RpcError::new(wire::INTERNAL_ERROR, format!("bad exec result: {e}"))
                        })
                    })))
                }
                Message::Answer { .. } => {}
                Message::Notification { method, params } => {
                    if params.get("id").and_then(Value::as_u64) != Some(id) {
                        continue;
                    }
                    let Some(what) = method.strip_prefix(pfx).and_then(|m| m.strip_prefix('.'))
                    else {
                        continue;
                    };
                    let data = || {
                        let p: wire::OutputParams = serde_json::from_value(params.clone())
                            .map_err(|e| ClientError::BadAnswer(format!("{method}: {e}")))?;
                        base64::engine::general_purpose::STANDARD
                            .decode(p.data)
                            .map_err(|e| ClientError::BadAnswer(format!("{method}: {e}")))
                    };
                    match what {
                        "ready" => return Ok(ExecMessage::Ready),
                        "stdout" => return data().map(ExecMessage::Stdout),
                        "stderr" => return data().map(ExecMessage::Stderr),
                        _ => {}
                    }
                }
            }
        }
    }

    fn input(id: u64) -> wire::InputParams {
        wire::InputParams {
            id: json!(id),
            data: None,
            rows: None,
            cols: None,
            signal: None,
        }
    }

    /// Sends stdin bytes to exec `id`.
    pub async fn exec_stdin(
        &mut self,
        kind: ExecKind,
        id: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let mut p = Client::input(id);
        p.data = Some(base64::engine::general_purpose::STANDARD.encode(data));
        self.notify(&format!("{}.stdin", kind.method()), &p).await
    }

    /// Closes exec `id`'s stdin.
    pub async fn exec_stdin_eof(&mut self, kind: ExecKind, id: u64) -> Result<(), ClientError> {
        self.notify(&format!("{}.stdin_eof", kind.method()), &Client::input(id))
            .await
    }

    /// Sends signal `sig` to exec `id`.
    pub async fn exec_signal(
        &mut self,
        kind: ExecKind,
        id: u64,
        sig: i32,
    ) -> Result<(), ClientError> {
        let mut p = Client::input(id);
        p.signal = Some(sig);
        self.notify(&format!("{}.signal", kind.method()), &p).await
    }

    /// Resizes exec `id`'s terminal (`exec_tty`).
    pub async fn exec_resize(&mut self, id: u64, rows: u16, cols: u16) -> Result<(), ClientError> {
        let mut p = Client::input(id);
        p.rows = Some(rows);
        p.cols = Some(cols);
        self.notify("exec_tty.resize", &p).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_bad_ones_are_errors() {
        match parse_message(br#"{"jsonrpc":"2.0","id":3,"result":{"bytes":5}}"#).unwrap() {
            Message::Answer {
                id: 3,
                result: Ok(v),
            } => assert_eq!(v["bytes"], 5),
            m => panic!("{m:?}"),
        }
        match parse_message(br#"{"jsonrpc":"2.0","id":4,"error":{"code":-32001,"message":"no"}}"#)
            .unwrap()
        {
            Message::Answer {
                id: 4,
                result: Err(e),
            } => {
                assert_eq!((e.code, e.message.as_str()), (wire::EXEC_FAILED, "no"))
            }
            m => panic!("{m:?}"),
        }
        assert!(matches!(
            parse_message(br#"{"jsonrpc":"2.0","method":"exec_pipe.ready","params":{"id":1}}"#),
            Ok(Message::Notification { .. })
        ));
        for bad in [&b"not json"[..], br#"{"id":"x","result":1}"#, br#"[1]"#] {
            assert!(
                matches!(parse_message(bad), Err(ClientError::BadAnswer(_))),
                "{bad:?}"
            );
        }
    }

    /// The typed client against the real server loop over an in-memory pipe: the shapes the
    /// server writes are the ones the client reads.
    #[tokio::test]
    async fn typed_calls_against_the_server() {
        let (client_end, server_end) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server_end);
        let shared = crate::server::Shared::empty();
        tokio::spawn(crate::server::serve(
            shared,
            tokio::io::BufReader::new(sr),
            sw,
        ));
        let (cr, cw) = tokio::io::split(client_end);
        let mut c = Client::new(tokio::io::BufReader::new(cr), cw);
        // No sandbox in the slot: every sandbox method is a typed RPC error, not a hang.
        let e = c.info().await.unwrap_err();
        assert!(e.code().is_some(), "{e}");
        let e = c.share_diff().await.unwrap_err();
        assert!(e.code().is_some(), "{e}");
        // An unknown method keeps its JSON-RPC code.
        let e = c.call::<_, Value>("no_such", &json!({})).await.unwrap_err();
        assert_eq!(e.code(), Some(wire::METHOD_NOT_FOUND));
    }

    /// The result shapes stay what SDKs read: optional fields are left out, not `null`.
    #[test]
    fn exec_result_shape() {
        let r = wire::ExecResult {
            exit_code: 3,
            duration_ms: 7,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"exit_code": 3, "duration_ms": 7})
        );
        let r = wire::ExecResult {
            signal: Some(9),
            oom_killed: true,
            stdout: Some(String::new()),
            ..r
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"exit_code": 3, "duration_ms": 7, "signal": 9, "oom_killed": true, "stdout": ""})
        );
    }
}
