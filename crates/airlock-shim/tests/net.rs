//! The sealed network of a pod from its `airlock.io/` annotations, end to end under a real
//! containerd: names pinned with `airlock.io/add-hosts` to servers on the host's loopback
//! (tests/net/server.py, HTTP and HTTPS with a test CA), reachable only when allowed; a
//! secret taken from the container's env reaches only its host, and the guest sees only a
//! placeholder.

mod util;

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use util::{text, Containerd, Options};

const RUNTIME: &str = "io.containerd.airlock.v2";
/// busybox plus the host's curl (busybox's own wget crashes in this guest).
const IMAGE: &str = "docker.io/airlock/busybox-curl:test";
const SECRET: &str = "s3cr3t-value-7f1c2a9e";

struct Upstream {
    child: Child,
    http: u16,
    https: u16,
    log: std::path::PathBuf,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA, a certificate for allowed.test and denied.test, and the servers.
fn upstream(dir: &Path) -> Upstream {
    let sh = |cmd: &str| {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(cmd)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:allowed.test,DNS:denied.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
          -keyout ca.key -out ca.crt -days 2 -subj /CN=airlock-shim-test-ca 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
          -keyout server.key -out server.csr -subj /CN=allowed.test 2>/dev/null
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
          -out server.crt -days 2 -extfile ext.cnf 2>/dev/null",
    );
    let log = dir.join("requests.log");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/net/server.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args([dir.join("server.crt"), dir.join("server.key"), log.clone()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ports: Vec<u16> = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    Upstream {
        child,
        http: ports[0],
        https: ports[1],
        log,
    }
}

#[test]
fn annotations_allow_hosts_and_bind_secrets() {
    if !util::available() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let up = upstream(work.path());
    let c = Containerd::start_with(Options {
        env: vec![(
            "AIRLOCK_UPSTREAM_CA".into(),
            work.path().join("ca.crt").display().to_string(),
        )],
        ..Default::default()
    });
    c.import(&util::image_archive(
        c.dir.path(),
        IMAGE,
        &["/usr/bin/curl"],
    ));
    let script = format!(
        r#"echo "key=$KEY"
c="curl -sS --max-time 10"
$c http://allowed.test:{http}/plain && echo allowed-ok
$c http://denied.test:{http}/denied && echo denied-REACHED || echo denied-refused
$c -H "Authorization: Bearer $KEY" https://allowed.test:{https}/secret && echo tls-ok
$c -f -H "Authorization: Bearer $KEY" http://allowed.test:{http}/secret-plain && echo plain-secret-SENT || echo plain-secret-refused
true"#,
        http = up.http,
        https = up.https
    );
    let env = format!("KEY={SECRET}");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "airlock.io/add-hosts=allowed.test:127.0.0.1,denied.test:127.0.0.1",
        "--annotation",
        "airlock.io/allow-hosts=allowed.test",
        "--annotation",
        "airlock.io/secrets=KEY@allowed.test",
        "--env",
        &env,
        IMAGE,
        "n1",
        "sh",
        "-c",
        &script,
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}\n{}", c.tail_log());
    // The guest holds a placeholder, never the value.
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key="))
        .unwrap_or_default();
    assert!(!key.is_empty() && key != SECRET, "{stdout}");
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
    assert!(
        stdout.contains("hello from the host\nallowed-ok"),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("denied-refused"), "{stdout}");
    assert!(stdout.contains("tls-ok"), "{stdout}\n{stderr}");
    // Plain HTTP would carry the secret in clear: refused unless allowed per secret.
    assert!(stdout.contains("plain-secret-refused"), "{stdout}");

    let log = std::fs::read_to_string(&up.log).unwrap_or_default();
    // The allowed host got the real value over TLS, swapped in on the way out.
    assert!(log.contains("GET /secret HTTP"), "{log}");
    assert!(log.contains(&format!("Bearer {SECRET}")), "{log}");
    // Nothing reached the denied name, and no placeholder or plain-HTTP secret arrived.
    assert!(!log.contains("/denied"), "{log}");
    assert!(!log.contains("/secret-plain"), "{log}");
    assert!(!log.contains(key), "{log}");
    // The shim never wrote the value anywhere under its state or logs.
    let shim_log = c.log();
    assert!(
        !shim_log.contains(SECRET),
        "the secret is in containerd's log"
    );
}
