//! The JSON-RPC 2.0 wire format, newline-delimited, as matchlock speaks it: requests, responses,
//! notifications, error codes, the parameter shapes of every method, and a bounded line reader.
//!
//! # Threat notes
//! Input comes from whoever holds the socket or stdio (the user's own process), but a
//! malformed or oversized line must still get a JSON-RPC error, never a crash or unbounded
//! memory: lines are capped at [`MAX_LINE`] (the rest of a longer line is discarded unread into
//! memory) and every parameter parses into a typed struct (see `fuzz/fuzz_targets/rpc_input.rs`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Invalid JSON.
pub const PARSE_ERROR: i32 = -32700;
/// Not a valid request object (or a line over [`MAX_LINE`]).
pub const INVALID_REQUEST: i32 = -32600;
/// No such method.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// The parameters do not fit the method.
pub const INVALID_PARAMS: i32 = -32602;
/// A bug on our side.
pub const INTERNAL_ERROR: i32 = -32603;
/// The sandbox could not be created, is not there, or died (matchlock's VM_FAILED).
pub const VM_FAILED: i32 = -32000;
/// The command could not be run (matchlock's EXEC_FAILED).
pub const EXEC_FAILED: i32 = -32001;
/// A file operation failed (matchlock's FILE_FAILED).
pub const FILE_FAILED: i32 = -32002;

/// Longest request line accepted (a `write_file` carries its content base64 in one line; use
/// `append` chunks for larger files).
pub const MAX_LINE: usize = 32 * 1024 * 1024;

/// A JSON-RPC error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// One of the codes above.
    pub code: i32,
    /// What was wrong and what to do.
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: i32, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// [`INVALID_PARAMS`].
    pub fn params(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, message)
    }
}

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The id to answer with; `None` for a notification (no answer).
    pub id: Option<Value>,
    /// Method name.
    pub method: String,
    /// Parameters (`null` when absent).
    pub params: Value,
}

/// Parses one line. An `Err` carries the id to answer (`null` if unknown) and the error.
pub fn parse_request(line: &[u8]) -> Result<Request, (Value, RpcError)> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        (
            Value::Null,
            RpcError::new(PARSE_ERROR, format!("Parse error: {e}")),
        )
    })?;
    let Value::Object(mut obj) = v else {
        let what = if v.is_array() {
            "batch requests are not supported"
        } else {
            "a request must be a JSON object"
        };
        return Err((Value::Null, RpcError::new(INVALID_REQUEST, what)));
    };
    let id = obj.remove("id");
    let id_for_err = id.clone().unwrap_or(Value::Null);
    if let Some(id) = &id {
        if !(id.is_number() || id.is_string() || id.is_null()) {
            return Err((
                Value::Null,
                RpcError::new(INVALID_REQUEST, "id must be a number, a string or null"),
            ));
        }
    }
    match obj.get("jsonrpc") {
        None => {}
        Some(Value::String(s)) if s == "2.0" => {}
        Some(_) => {
            return Err((
                id_for_err,
                RpcError::new(INVALID_REQUEST, "jsonrpc must be \"2.0\""),
            ))
        }
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => {
            return Err((
                id_for_err,
                RpcError::new(INVALID_REQUEST, "method must be a string"),
            ))
        }
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    if !(params.is_object() || params.is_null()) {
        return Err((id_for_err, RpcError::params("params must be an object")));
    }
    Ok(Request { id, method, params })
}

/// Parses `params` as `T` (absent params are `{}`).
pub fn params<T: for<'de> Deserialize<'de>>(p: &Value) -> Result<T, RpcError> {
    let p = if p.is_null() {
        Value::Object(Default::default())
    } else {
        p.clone()
    };
    serde_json::from_value(p).map_err(|e| RpcError::params(e.to_string()))
}

/// A success answer line (without the newline).
pub fn ok_line(id: &Value, result: Value) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
}

/// An error answer line.
pub fn err_line(id: &Value, e: &RpcError) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
        .to_string()
}

/// A notification line.
pub fn notify_line(method: &str, params: Value) -> String {
    serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string()
}

/// What [`read_line`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A complete line (newline stripped).
    Line(Vec<u8>),
    /// A line longer than the limit; it was skipped.
    TooLong,
    /// End of input.
    Eof,
}

/// Reads one line of at most `max` bytes; a longer one is consumed without being stored.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Line> {
    let mut out = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if too_long {
                Line::TooLong
            } else if out.is_empty() {
                Line::Eof
            } else {
                Line::Line(out)
            });
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if out.len() + chunk.len() > max {
                too_long = true;
                out = Vec::new();
            } else {
                out.extend_from_slice(chunk);
            }
        }
        let used = done.unwrap_or(buf.len());
        r.consume(used);
        if done.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Line(out)
            });
        }
    }
}

/// `create` parameters: matchlock's config, plus Airlock's optional extensions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateParams {
    /// Image reference.
    #[serde(default)]
    pub image: String,
    /// Airlock extension: boot this root filesystem (directory or ext4 file) instead of an
    /// image.
    #[serde(default)]
    pub rootfs: Option<String>,
    /// CPUs, memory, disk, lifetime.
    #[serde(default)]
    pub resources: Resources,
    /// Network policy.
    #[serde(default)]
    pub network: Option<NetworkParams>,
    /// Workspace mounts.
    #[serde(default)]
    pub vfs: Option<VfsParams>,
    /// Environment of every command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Airlock extension: hostname (matchlock puts it under `network`).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Commands keep every capability and may gain privileges (see `SandboxSpec::privileged`).
    #[serde(default)]
    pub privileged: bool,
    /// Accepted for compatibility (Airlock does not start an image entrypoint on create).
    #[serde(default)]
    pub launch_entrypoint: bool,
    /// Accepted for compatibility; the image's own config applies.
    #[serde(default)]
    pub image_config: Option<Value>,
    /// Accepted for compatibility; Airlock boots its own kernel.
    #[serde(default)]
    pub kernel: Option<Value>,
}

/// `create.resources`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resources {
    /// vCPUs (matchlock allows fractions: rounded up).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Guest RAM, MiB.
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Writable layer size, MiB.
    #[serde(default)]
    pub disk_size_mb: Option<u64>,
    /// Kill the sandbox after this many seconds.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// `create.network`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetworkParams {
    /// Allow rules.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Keep private ranges unreachable (Airlock always does unless `allow_private` says).
    #[serde(default)]
    pub block_private_ips: Option<bool>,
    /// No NIC at all.
    #[serde(default)]
    pub no_network: bool,
    /// Pinned names.
    #[serde(default)]
    pub add_hosts: Vec<HostIp>,
    /// Secrets by environment variable name.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretParams>,
    /// Guest hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Airlock extension: private ranges names may resolve to.
    #[serde(default)]
    pub allow_private: Vec<String>,
    /// Accepted for compatibility (Airlock answers DNS itself).
    #[serde(default)]
    pub dns_servers: Vec<String>,
    /// Accepted for compatibility.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Accepted for compatibility (Airlock always intercepts).
    #[serde(default)]
    pub intercept: bool,
    /// Network hooks: not supported.
    #[serde(default)]
    pub interception: Option<Value>,
}

/// One `add_hosts` entry.
#[derive(Debug, Clone, Deserialize)]
pub struct HostIp {
    /// Name.
    pub host: String,
    /// Address.
    pub ip: String,
}

/// One secret.
#[derive(Clone, Deserialize)]
pub struct SecretParams {
    /// The value (kept in memory only).
    pub value: String,
    /// Hosts it may go to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Placeholder the guest sees.
    #[serde(default)]
    pub placeholder: Option<String>,
    /// Airlock extension: also substitute in request bodies.
    #[serde(default)]
    pub in_body: bool,
    /// Airlock extension: also substitute over plain HTTP.
    #[serde(default)]
    pub allow_http: bool,
}

impl std::fmt::Debug for SecretParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretParams")
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// `create.vfs`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct VfsParams {
    /// Guest path → mount config (matchlock's shape, kept as JSON).
    #[serde(default)]
    pub mounts: BTreeMap<String, Value>,
    /// Guest mount point of the workspace.
    #[serde(default)]
    pub workspace: Option<String>,
    /// VFS hooks: not supported.
    #[serde(default)]
    pub interception: Option<Value>,
}

/// Parameters of `exec`, `exec_stream`, `exec_pipe`, `exec_tty`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ExecParams {
    /// Shell command line (run with `sh -c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Airlock extension: program and arguments, no shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// User (`name`, `uid`, `uid:gid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Airlock extension: extra environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Terminal rows (`exec_tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Terminal columns (`exec_tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    /// Airlock extension for `exec`/`exec_stream`: stdin bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// Parameters of `*.stdin`, `*.stdin_eof`, `*.resize`, `*.signal`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct InputParams {
    /// The id of the exec request.
    pub id: Value,
    /// Base64 bytes (`stdin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Rows (`resize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Columns (`resize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    /// Signal number (`signal`, an Airlock extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// `write_file`.
#[derive(Debug, Clone, Deserialize)]
pub struct WriteFileParams {
    /// Guest path.
    pub path: String,
    /// Base64 content.
    #[serde(default)]
    pub content: String,
    /// Permission bits (default 0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Airlock extension: append (to write large files in chunks).
    #[serde(default)]
    pub append: bool,
}

/// `read_file` and `list_files`.
#[derive(Debug, Clone, Deserialize)]
pub struct PathParams {
    /// Guest path.
    pub path: String,
    /// Airlock extension (`read_file`): first byte.
    #[serde(default)]
    pub offset: u64,
    /// Airlock extension (`read_file`): at most this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

/// `port_forward`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PortForwardParams {
    /// Mappings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<Forward>,
    /// Host addresses to bind (default 127.0.0.1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// One port mapping.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct Forward {
    /// Host port (0: pick one).
    pub local_port: u16,
    /// Guest port.
    pub remote_port: u16,
}

/// `allow_list_add` / `allow_list_delete`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HostsParams {
    /// Allow rules.
    pub hosts: Vec<String>,
}

/// `copy_out` (Airlock extension).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CopyOutParams {
    /// Guest path (a file or a directory tree).
    pub path: String,
    /// Absolute host path that must not exist yet.
    pub dest: String,
    /// Most bytes accepted (default [`COPY_OUT_DEFAULT_MAX`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// The client's umask, applied to what is written (default: the server's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
}

/// `copy_in` (Airlock extension).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CopyInParams {
    /// Absolute host path of a file or directory tree.
    pub src: String,
    /// Absolute guest path: an existing directory to copy into, or the new name.
    pub dest: String,
}

/// `shutdown` (supervisor sockets). Without `grace_ms` the VM powers off at once (`kill`); with
/// it the guest's processes get SIGTERM and that long before SIGKILL (`stop`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ShutdownParams {
    /// Milliseconds between SIGTERM and SIGKILL (at most 600 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_ms: Option<u64>,
}

/// Size cap of `copy_out` when the request names none: 1 GiB.
pub const COPY_OUT_DEFAULT_MAX: u64 = 1 << 30;

/// `cancel`.
#[derive(Debug, Clone, Deserialize)]
pub struct CancelParams {
    /// Id of the request to cancel.
    pub id: Value,
}

/// `close`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CloseParams {
    /// Grace period for a clean shutdown.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
}

// Results. The server serializes these and the client ([`crate::client`]) parses them, so the
// two cannot drift apart.

/// Result of `exec`, `exec_stream`, `exec_pipe` and `exec_tty`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct ExecResult {
    /// Exit code; 128 + N for a command killed by signal N; -1 if unknown.
    pub exit_code: i32,
    /// Wall time of the command, milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// The signal that killed the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The guest's OOM killer ended it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
    /// `exec` only: its standard output, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// `exec` only: its standard error, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
}

/// Parameters of the `*.stdout` / `*.stderr` notifications a streaming exec sends.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OutputParams {
    /// The id of the exec request.
    pub id: Value,
    /// Base64 bytes.
    #[serde(default)]
    pub data: String,
}

/// One bound forward in the result of `port_forward`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Binding {
    /// Host address bound.
    pub address: String,
    /// Host port bound (the one picked when 0 was asked).
    pub local_port: u16,
    /// Guest port.
    pub remote_port: u16,
}

/// Result of `port_forward`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PortForwardResult {
    /// What was bound.
    #[serde(default)]
    pub bindings: Vec<Binding>,
}

/// Result of `share_diff`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ShareDiffResult {
    /// Changed guest paths.
    #[serde(default)]
    pub changes: Vec<airlock_sandbox::ShareChange>,
}

/// Result of `top` (an Airlock extension).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct TopResult {
    /// The guest's processes by pid, but the agent and kernel threads.
    #[serde(default)]
    pub processes: Vec<airlock_sandbox::GuestProcess>,
}

/// Result of `copy_out`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
pub struct CopyOutResult {
    /// Regular files written.
    #[serde(default)]
    pub files: u64,
    /// Directories made.
    #[serde(default)]
    pub dirs: u64,
    /// Entries left out (symlinks, devices).
    #[serde(default)]
    pub skipped: u64,
}

/// Result of `copy_in`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
pub struct CopyInResult {
    /// Bytes of file content copied.
    #[serde(default)]
    pub bytes: u64,
}

/// Result of `snapshot`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SnapshotResult {
    /// The snapshot's name.
    pub name: String,
    /// Id of the sandbox it was taken from.
    pub source: String,
}

/// Result of `info` (an Airlock extension).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct InfoResult {
    /// Sandbox id.
    pub id: String,
    /// Pid of the VM process.
    #[serde(default)]
    pub vm_pid: u32,
    /// The guest kernel's release string.
    #[serde(default)]
    pub kernel: String,
    /// `kvm` or `tcg`.
    #[serde(default)]
    pub accel: String,
    /// Pid of the process serving this socket.
    #[serde(default)]
    pub supervisor_pid: u32,
}

/// Every method this server knows.
pub const METHODS: &[&str] = &[
    "create",
    "exec",
    "exec_stream",
    "exec_pipe",
    "exec_tty",
    "exec_pipe.stdin",
    "exec_pipe.stdin_eof",
    "exec_pipe.signal",
    "exec_tty.stdin",
    "exec_tty.stdin_eof",
    "exec_tty.resize",
    "exec_tty.signal",
    "write_file",
    "read_file",
    "list_files",
    "port_forward",
    "allow_list_add",
    "allow_list_delete",
    "share_diff",
    "top",
    "snapshot",
    "copy_out",
    "copy_in",
    "cancel",
    "close",
    "info",
    "stats",
    "shutdown",
];

/// `snapshot` (an Airlock extension): capture the running sandbox under `name`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SnapshotParams {
    /// Snapshot name.
    pub name: String,
}

/// Checks that `req` names a known method with parameters of the right shape.
pub fn validate(req: &Request) -> Result<(), RpcError> {
    let p = &req.params;
    match req.method.as_str() {
        "create" => params::<CreateParams>(p).map(drop),
        "exec" | "exec_stream" | "exec_pipe" | "exec_tty" => params::<ExecParams>(p).map(drop),
        m if m.starts_with("exec_pipe.") || m.starts_with("exec_tty.") => {
            params::<InputParams>(p).map(drop)
        }
        "write_file" => params::<WriteFileParams>(p).map(drop),
        "read_file" | "list_files" => params::<PathParams>(p).map(drop),
        "port_forward" => params::<PortForwardParams>(p).map(drop),
        "allow_list_add" | "allow_list_delete" => params::<HostsParams>(p).map(drop),
        "cancel" => params::<CancelParams>(p).map(drop),
        "close" => params::<CloseParams>(p).map(drop),
        "copy_out" => params::<CopyOutParams>(p).map(drop),
        "copy_in" => params::<CopyInParams>(p).map(drop),
        "snapshot" => params::<SnapshotParams>(p).map(drop),
        "shutdown" => params::<ShutdownParams>(p).map(drop),
        "info" | "stats" | "share_diff" | "top" => Ok(()),
        _ => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!("Method not found: {}", req.method),
        )),
    }
    .and_then(|()| {
        if METHODS.contains(&req.method.as_str()) {
            Ok(())
        } else {
            Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("Method not found: {}", req.method),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_requests_get_codes() {
        let code = |l: &str| parse_request(l.as_bytes()).err().map(|(_, e)| e.code);
        assert_eq!(code("{"), Some(PARSE_ERROR));
        assert_eq!(code("[]"), Some(INVALID_REQUEST));
        assert_eq!(code("3"), Some(INVALID_REQUEST));
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":1}"#), Some(INVALID_REQUEST));
        assert_eq!(
            code(r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#),
            Some(INVALID_REQUEST)
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#),
            Some(INVALID_REQUEST)
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":1,"method":"exec","params":[1]}"#),
            Some(INVALID_PARAMS)
        );
        let r = parse_request(br#"{"jsonrpc":"2.0","id":7,"method":"nope"}"#).unwrap();
        assert_eq!(validate(&r).unwrap_err().code, METHOD_NOT_FOUND);
        let r =
            parse_request(br#"{"jsonrpc":"2.0","id":7,"method":"write_file","params":{"path":3}}"#)
                .unwrap();
        assert_eq!(validate(&r).unwrap_err().code, INVALID_PARAMS);
        let r = parse_request(
            br#"{"jsonrpc":"2.0","id":7,"method":"exec","params":{"command":"true"}}"#,
        )
        .unwrap();
        validate(&r).unwrap();
    }

    #[tokio::test]
    async fn long_lines_are_skipped_not_stored() {
        let data = format!("{}\nok\n{}", "x".repeat(1000), "tail");
        let mut r = tokio::io::BufReader::with_capacity(16, data.as_bytes());
        assert_eq!(read_line(&mut r, 100).await.unwrap(), Line::TooLong);
        assert_eq!(
            read_line(&mut r, 100).await.unwrap(),
            Line::Line(b"ok".to_vec())
        );
        assert_eq!(
            read_line(&mut r, 100).await.unwrap(),
            Line::Line(b"tail".to_vec())
        );
        assert_eq!(read_line(&mut r, 100).await.unwrap(), Line::Eof);
    }
}
