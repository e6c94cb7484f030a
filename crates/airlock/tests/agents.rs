//! Real coding agents in Airlock, end to end: the Claude Code and Codex CLIs from npm (images
//! and run scripts from examples/), talking HTTPS through the MITM to a stand-in API server on
//! the host (tests/agents/api.js, own test CA, reached under the real API host names through
//! `--add-host`). The stand-in's scripted model makes the agent run one shell command, which
//! edits the project and prints the key the agent sees. The tests prove: the stand-in got the
//! real key, the agent only ever saw the placeholder, the key is nowhere in guest output or the
//! audit log, and the edits land (rw share) or stay in the overlay (default).

mod util;
use util::{repo, text};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const FINAL: &str = "All done: the stand-in model is finished.";

/// What the scripted model asks the agent to run: edit a file, create one, report the key.
const SCRIPT: &str = r#"echo edited-by-agent >> /workspace/README.md; echo new > /workspace/NEW.txt; echo "seen=[${KEYVAR}]""#;

/// The stand-in API server and its test CA.
struct StandIn {
    dir: tempfile::TempDir,
    node: Child,
    port: u16,
}

impl StandIn {
    fn start(keyvar: &str) -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:api.anthropic.com,DNS:api.openai.com\n\
             basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let out = Command::new("sh")
            .arg("-ec")
            .arg(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                   -keyout ca.key -out ca.crt -days 2 -subj /CN=airlock-test-api-ca 2>/dev/null
                 openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                   -keyout server.key -out server.csr -subj /CN=api.test 2>/dev/null
                 openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
                   -out server.crt -days 2 -extfile ext.cnf 2>/dev/null",
            )
            .current_dir(d)
            .output()
            .unwrap();
        assert!(out.status.success(), "openssl: {}", text(&out.stderr));
        let node = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agents/api.js"))
            .arg(d)
            .env("AGENT_SCRIPT", SCRIPT.replace("KEYVAR", keyvar))
            .stdin(Stdio::null())
            .spawn()
            .expect("node (tests need Node.js on the host)");
        let ready = d.join("ready.json");
        let t0 = Instant::now();
        while !ready.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "stand-in did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ready).unwrap()).unwrap();
        StandIn {
            port: v["port"].as_u64().unwrap() as u16,
            dir,
            node,
        }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.node.kill();
        let _ = self.node.wait();
    }
}

fn random_key(prefix: &str) -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    format!("{prefix}-{}", hex::encode(b))
}

/// Builds (or finds, cached) the example's image, one build at a time: two builds would both
/// create the shared Debian root on a cold cache.
fn build_image(example: &'static str) {
    static BUILT: std::sync::Mutex<Vec<&str>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.contains(&example) {
        return;
    }
    let out = Command::new(repo().join("examples").join(example).join("build-image"))
        .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{example}/build-image: {}",
        text(&out.stderr)
    );
    built.push(example);
}

struct Agent {
    example: &'static str,
    host: &'static str,
    keyvar: &'static str,
    /// Host env var that points the run script at another base URL, and its value's path.
    base_var: &'static str,
    base_path: &'static str,
    /// Request header carrying the key, and the prefix before the key in it.
    auth_header: &'static str,
    auth_prefix: &'static str,
}

const CLAUDE: Agent = Agent {
    example: "claude-code",
    host: "api.anthropic.com",
    keyvar: "ANTHROPIC_API_KEY",
    base_var: "ANTHROPIC_BASE_URL",
    base_path: "",
    auth_header: "x-api-key",
    auth_prefix: "",
};

const CODEX: Agent = Agent {
    example: "codex",
    host: "api.openai.com",
    keyvar: "OPENAI_API_KEY",
    base_var: "OPENAI_BASE_URL",
    base_path: "/v1",
    auth_header: "authorization",
    auth_prefix: "Bearer ",
};

/// Runs the example's run script on a fresh project; returns the output, the project dir,
/// the stand-in, the audit log and the key.
fn run_agent(
    a: &Agent,
    share: Option<&str>,
) -> (Output, tempfile::TempDir, StandIn, String, String) {
    build_image(a.example);
    let api = StandIn::start(a.keyvar);
    let key = random_key("sk-real");
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("README.md"), "original\n").unwrap();
    let rt = tempfile::tempdir().unwrap();
    let audit = api.path("audit.jsonl");
    let mut c = Command::new(repo().join("examples").join(a.example).join("run"));
    c.arg("--add-host")
        .arg(format!("{}:127.0.0.1", a.host))
        .arg("--upstream-ca")
        .arg(api.path("ca.crt"))
        .arg("--audit")
        .arg(&audit)
        .arg("Append a line to README.md and create NEW.txt.")
        .current_dir(project.path())
        .env("AIRLOCK", env!("CARGO_BIN_EXE_airlock"))
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .env(a.keyvar, &key)
        .env(
            a.base_var,
            format!("https://{}:{}{}", a.host, api.port, a.base_path),
        )
        .stdin(Stdio::null());
    match share {
        Some(s) => c.env("SHARE", s),
        None => c.env_remove("SHARE"),
    };
    let out = c.output().unwrap();
    let audit = std::fs::read_to_string(audit).unwrap_or_default();
    (out, project, api, audit, key)
}

/// What every agent run must show, whatever the share mode.
fn assert_key_stays_on_host(a: &Agent, out: &Output, api: &StandIn, audit: &str, key: &str) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    println!(
        "--- {} stdout\n{stdout}\n--- stderr\n{stderr}\n--- audit\n{audit}",
        a.example
    );
    assert!(out.status.success(), "{} failed: {stderr}", a.example);
    assert!(stdout.contains(FINAL), "no final answer: {stdout}");
    let reqs = api.requests();
    assert!(reqs.len() >= 2, "expected the tool round trip: {reqs:?}");
    // The stand-in received the real key on every request.
    for r in &reqs {
        assert_eq!(
            r["headers"][a.auth_header].as_str(),
            Some(format!("{}{key}", a.auth_prefix).as_str()),
            "{} {}",
            r["method"],
            r["path"]
        );
    }
    // The tool's output (sent back in the last request) shows what the agent's process saw.
    let last = reqs.last().unwrap()["body"].to_string();
    // (The command itself, also in the history, says `seen=[${NAME}]`: skip it.)
    let seen: Vec<&str> = last
        .split("seen=[")
        .skip(1)
        .filter_map(|s| s.split(']').next())
        .filter(|s| !s.starts_with('$'))
        .collect();
    assert!(
        !seen.is_empty(),
        "no tool output in the last request: {last}"
    );
    let seen = seen[0];
    assert!(
        seen.starts_with("AIRLOCK_PLACEHOLDER_"),
        "the agent saw {seen:?}, not a placeholder"
    );
    assert!(!seen.contains(key));
    // The key is nowhere the guest could have put it: its output, the bodies it sent, the audit.
    for (what, s) in [
        ("stdout", &stdout),
        ("stderr", &stderr),
        ("audit log", &audit.to_string()),
    ] {
        assert!(!s.contains(key), "key in {what}");
    }
    for r in &reqs {
        assert!(
            !r["body"].to_string().contains(key),
            "key in a request body"
        );
    }
    assert!(
        audit.contains(&format!(
            r#""type":"substitution","secret":"{}","host":"{}""#,
            a.keyvar, a.host
        )),
        "no substitution in the audit log"
    );
}

/// With the default overlay share the agent's edits stay in the sandbox.
fn assert_host_untouched(project: &std::path::Path) {
    assert_eq!(
        std::fs::read_to_string(project.join("README.md")).unwrap(),
        "original\n",
        "an overlay share must leave the host file untouched"
    );
    assert!(!project.join("NEW.txt").exists());
}

/// With a `rw` share the agent's edit and new file reach the host.
fn assert_edits_landed(project: &std::path::Path) {
    assert_eq!(
        std::fs::read_to_string(project.join("README.md")).unwrap(),
        "original\nedited-by-agent\n"
    );
    assert_eq!(
        std::fs::read_to_string(project.join("NEW.txt")).unwrap(),
        "new\n"
    );
}

#[test]
fn claude_code_edits_stay_in_the_overlay_and_the_key_on_the_host() {
    let (out, project, api, audit, key) = run_agent(&CLAUDE, None);
    assert_key_stays_on_host(&CLAUDE, &out, &api, &audit, &key);
    assert_host_untouched(project.path());
}

#[test]
fn claude_code_edits_land_with_a_rw_share() {
    let (out, project, api, audit, key) = run_agent(&CLAUDE, Some("rw"));
    assert_key_stays_on_host(&CLAUDE, &out, &api, &audit, &key);
    assert_edits_landed(project.path());
}

#[test]
fn codex_edits_stay_in_the_overlay() {
    let (out, project, api, audit, key) = run_agent(&CODEX, None);
    assert_key_stays_on_host(&CODEX, &out, &api, &audit, &key);
    assert_host_untouched(project.path());
}

#[test]
fn codex_edits_land_with_a_rw_share_and_the_key_stays_on_the_host() {
    let (out, project, api, audit, key) = run_agent(&CODEX, Some("rw"));
    assert_key_stays_on_host(&CODEX, &out, &api, &audit, &key);
    assert_edits_landed(project.path());
    // Codex's own update and telemetry traffic hits the sealed network and is denied.
    assert!(audit.contains(r#""allowed":false"#), "{audit}");
}
