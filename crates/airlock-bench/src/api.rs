//! Exec round trip through each API surface, in the same run: the in-process Rust API (the
//! baseline), `airlock rpc` (JSON-RPC over a pipe to a sandbox in that process), and the CLI
//! (`airlock exec ID -- true`: a new process talking to the sandbox's supervisor socket).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock_sandbox::{ExecSpec, RootfsSource, Sandbox, SandboxSpec};
use anyhow::{bail, Context, Result};

use crate::{airlock_bin, ms, pct};

/// Runs the three measurements; returns the markdown table.
pub async fn bench_api(n: usize, rootfs: &Path) -> Result<String> {
    // All three sandboxes up at once; the measurements interleave, so load drift on a busy
    // host hits each surface alike.
    let sb = Sandbox::start(SandboxSpec::new(RootfsSource::from_path(rootfs)?)).await?;
    let bin = airlock_bin()?;
    let mut child = Command::new(&bin)
        .arg("rpc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start airlock rpc")?;
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut next_id = 0u64;
    let mut call = |method: &str, params: serde_json::Value| -> Result<serde_json::Value> {
        next_id += 1;
        let req = serde_json::json!({"jsonrpc": "2.0", "id": next_id, "method": method, "params": params});
        writeln!(stdin, "{req}")?;
        stdin.flush()?;
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line).context("rpc answer")?;
        if v.get("error").is_some() {
            bail!("rpc {method}: {}", v["error"]);
        }
        Ok(v["result"].clone())
    };
    call("create", serde_json::json!({"image": "", "rootfs": rootfs}))?;
    let rt = tempfile::tempdir()?;
    let out = Command::new(&bin)
        .args(["run", "-d", "--rootfs"])
        .arg(rootfs)
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .output()?;
    if !out.status.success() {
        bail!("run -d: {}", String::from_utf8_lossy(&out.stderr));
    }
    let id = String::from_utf8(out.stdout)?.trim().to_string();

    let (mut api, mut rpc, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    let r: Result<()> = async {
        for i in 0..n + 5 {
            let t = Instant::now();
            let out = sb.output(ExecSpec::new(["true"])).await?;
            let d_api = t.elapsed();
            if out.status.code != Some(0) {
                bail!("true exited with {:?}", out.status);
            }
            let t = Instant::now();
            let r = call("exec", serde_json::json!({"argv": ["true"]}))?;
            let d_rpc = t.elapsed();
            if r["exit_code"] != 0 {
                bail!("rpc exec: {r}");
            }
            let t = Instant::now();
            let st = Command::new(&bin)
                .args(["exec", &id, "--", "true"])
                .env("AIRLOCK_RUNTIME_DIR", rt.path())
                .status()?;
            let d_cli = t.elapsed();
            if !st.success() {
                bail!("airlock exec exited with {st}");
            }
            // The first few page things in: not counted.
            if i >= 5 {
                api.push(d_api);
                rpc.push(d_rpc);
                cli.push(d_cli);
            }
        }
        Ok(())
    }
    .await;
    let _ = call("close", serde_json::json!({}));
    drop(stdin);
    let _ = child.wait();
    let _ = Command::new(&bin)
        .args(["rm", "-f", &id])
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .output();
    sb.stop().await?;
    r?;

    let base = ms(pct(&api, 0.5));
    let row = |name: &str, v: &[Duration]| {
        format!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} |\n",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.9)),
            ms(pct(v, 0.5)) / base
        )
    };
    Ok(format!(
        "### exec round trip by API ({n} × `true`, one sandbox each)\n\n\
         | | p50 | p90 | p50 ÷ Rust API |\n|---|---:|---:|---:|\n{}{}{}",
        row("in-process Rust API (`Sandbox::output`)", &api),
        row("`airlock rpc` (JSON-RPC `exec` over stdio)", &rpc),
        row(
            "CLI `airlock exec ID -- true` (new process + supervisor socket)",
            &cli
        ),
    ))
}
