//! `airlock mcp` driven by a real MCP client: the official Python SDK (PyPI `mcp`, installed
//! by scripts/setup) runs tests/mcp/client.py against the real binary, which boots real
//! guests. The key is given to the server only through its environment (MCP_KEY); an HTTPS
//! stand-in on the host (tests/agents/api.js, own test CA) records what arrived.

mod util;
use util::text;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod debian;

#[test]
fn mcp_client_creates_execs_edits_and_destroys_sandboxes() {
    debian::ensure_image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:api.anthropic.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let out = Command::new("sh")
        .arg("-ec")
        .arg(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout ca.key -out ca.crt -days 2 -subj /CN=airlock-test-mcp-ca 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout server.key -out server.csr -subj /CN=api.anthropic.com 2>/dev/null
             openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
               -out server.crt -days 2 -extfile ext.cnf 2>/dev/null
             mkdir project && echo 'from the host' > project/README.md",
        )
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", text(&out.stderr));
    let mut node = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agents/api.js"))
        .arg(d)
        .env("AGENT_SCRIPT", "true")
        .stdin(Stdio::null())
        .spawn()
        .expect("node (tests need Node.js on the host)");
    let t0 = Instant::now();
    while !d.join("ready.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "stand-in did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("ready.json")).unwrap()).unwrap();
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    let key = format!("sk-mcp-real-{}", hex::encode(b));
    let rt = tempfile::tempdir().unwrap();

    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py"))
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .arg(d.join("project"))
        .arg(ready["port"].to_string())
        .arg(d.join("ca.crt"))
        .env("MCP_KEY", &key)
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = node.kill();
    let _ = node.wait();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "client.py failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();

    // The stand-in got the real key; the guest and the client only ever saw the placeholder.
    let reqs: Vec<serde_json::Value> = std::fs::read_to_string(d.join("requests.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0]["headers"]["x-api-key"].as_str(), Some(key.as_str()));
    assert_ne!(report["seen"].as_str(), Some(key.as_str()));
    assert!(
        !stdout.contains(&key) && !stderr.contains(&key),
        "key in client output"
    );
    // A host not in allow_hosts does not even resolve.
    assert!(
        report["blocked_stderr"]
            .as_str()
            .unwrap_or("")
            .contains("Could not resolve host: example.com"),
        "{report}"
    );

    // The overlay kept the host tree as it was.
    assert!(!d.join("project/new.txt").exists());
    assert_eq!(
        std::fs::read_to_string(d.join("project/README.md")).unwrap(),
        "from the host\n"
    );

    // Every sandbox the server created is gone once the client disconnected.
    assert_cleaned_up(rt.path(), &report);
}

/// No sandbox state dir is left in the runtime dir `rt`, and no process (QEMU) refers to it.
fn assert_cleaned_up(rt: &Path, report: &serde_json::Value) {
    let t0 = Instant::now();
    loop {
        let left: Vec<String> = std::fs::read_dir(rt)
            .map(|r| {
                // Sandbox state dirs (files such as the cached TSC rate may stay, and the
                // directory where pool holders publish their status).
                r.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "pools")
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let rtp = rt.to_string_lossy().into_owned();
        let procs: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| text(&c).replace('\0', " "))
            .filter(|c| c.contains(&rtp))
            .collect();
        if left.is_empty() && procs.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "left behind: dirs {left:?}, processes {procs:?} (report {report})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the Python MCP client `script` with `args` (the airlock binary last) against a server
/// whose runtime dir is `rt`; returns the JSON report it prints.
fn run_client(script: &str, args: &[&str], rt: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/mcp")
                .join(script),
        )
        .args(args)
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .env("AIRLOCK_RUNTIME_DIR", rt)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn mcp_server_kills_its_sandboxes_on_sigterm() {
    debian::ensure_image();
    let rt = tempfile::tempdir().unwrap();
    let report = run_client("client.py", &["--sigterm"], rt.path());
    assert_eq!(report["sigterm"], "exited", "{report}");
    assert_cleaned_up(rt.path(), &report);
}

#[test]
fn mcp_pool_serves_the_second_create_of_a_shape() {
    debian::ensure_image();
    let rt = tempfile::tempdir().unwrap();
    let r = run_client("pool_client.py", &[], rt.path());
    assert_ne!(r["first_start"], "pool", "{r}");
    assert_eq!(r["second_start"], "pool", "{r}");
    let before = (
        r["before"]["size"].as_u64(),
        r["before"]["claimed"].as_u64(),
    );
    assert_eq!(before, (Some(1), Some(0)), "{r}");
    assert_eq!(r["after"]["claimed"].as_u64(), Some(1), "{r}");
    let (a, b) = (
        r["first_out"].as_str().unwrap(),
        r["second_out"].as_str().unwrap(),
    );
    assert!(a.ends_with("42\n") && b.ends_with("42\n"), "{r}");
    assert_ne!(a.lines().next(), b.lines().next(), "machine-id shared: {r}");
    // The pool's own VM went with the server, as its claims did.
    assert_cleaned_up(rt.path(), &r);
}
