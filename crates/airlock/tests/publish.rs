//! `airlock run -p`: a real server in a real guest, curl on the host. Needs the kernel, agent
//! and demo rootfs from `scripts/setup`; fails loudly without them.

mod util;
use util::rootfs;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

mod debian;

fn airlock(rt: &tempfile::TempDir, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
    c.arg("run")
        .arg("--rootfs")
        .arg(rootfs())
        .args(args)
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .stdin(Stdio::null());
    c
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn publish_serves_curl_on_a_picked_and_a_fixed_port() {
    // A free port for the fixed -p, found by binding and releasing it.
    let fixed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rt = tempfile::tempdir().unwrap();
    let mut child = airlock(
        &rt,
        &[
            "-p",
            "0:80",
            "-p",
            &format!("127.0.0.1:{fixed}:80"),
            "--",
            "sh",
            "-c",
            "mkdir -p /www && head -c 8000000 /dev/urandom > /www/big && sha256sum < /www/big && exec httpd -f -p 80 -h /www",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let picked = line
        .strip_prefix("airlock: publishing ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no published address on stderr: {line:?}"))
        .to_string();
    assert!(line.contains("-> sandbox port 80"), "{line}");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut sha = String::new();
    out.read_line(&mut sha).unwrap();
    let sha = sha.split_whitespace().next().unwrap().to_string();

    // httpd may need a moment after the hash is printed: retry until it answers.
    let mut got = None;
    for _ in 0..100 {
        let o = curl(&["--fail", &format!("http://{picked}/big")]);
        if o.status.success() {
            got = Some(o.stdout);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let got = got.expect("curl through -p 0:80 never succeeded");
    assert_eq!(hex::encode(Sha256::digest(&got)), sha);
    let o = curl(&["--fail", &format!("http://127.0.0.1:{fixed}/big")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hex::encode(Sha256::digest(&o.stdout)), sha);

    // Ctrl-C reaches the server; airlock exits and the ports are released.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(!status.success(), "{rest}");
    assert!(std::net::TcpListener::bind(("127.0.0.1", fixed)).is_ok());
    assert!(std::net::TcpStream::connect(&picked).is_err());
}

#[test]
fn publish_errors_say_what_to_do() {
    let rt = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let o = airlock(&rt, &["-p", &format!("{port}:80"), "--", "true"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{e}");
    assert!(
        e.contains("already in use") && e.contains("pick another host port"),
        "{e}"
    );
    // Refused before any VM was booted: no state was made.
    assert_eq!(std::fs::read_dir(rt.path()).unwrap().count(), 0);

    for (bad, want) in [
        ("80", "[ADDR:]HOST:GUEST"),
        ("8080:0", "guest port 0"),
        ("8080:99999", "guest port"),
        ("nohost:8080:80", "not an IP address"),
    ] {
        let o = airlock(&rt, &["-p", bad, "--", "true"]).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(e.contains(want), "-p {bad}: {e}");
    }
    let o = airlock(&rt, &["-p", "192.0.2.1:8080:80", "--", "true"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not an address of this host"), "{e}");
}

/// python3's http.server in the real Debian image (built once by scripts/mkimage-debian,
/// cached in the default store), running as nobody, reached with curl through `-p 0:8000`.
#[test]
fn publish_reaches_python_http_server_in_debian() {
    debian::ensure_image();
    let rt = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "run",
            "--image",
            "demo/debian:bookworm",
            "-u",
            "nobody",
            "-w",
            "/tmp/www",
        ])
        .args(["-p", "0:8000", "--", "sh", "-c"])
        .arg("head -c 3000000 /dev/urandom > f && sha256sum f && exec python3 -m http.server 8000")
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("airlock: publishing ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no published address on stderr: {line:?}"))
        .to_string();
    let mut sha = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut sha)
        .unwrap();
    let mut got = None;
    for _ in 0..300 {
        let o = curl(&["--fail", &format!("http://{addr}/f")]);
        if o.status.success() {
            got = Some(o.stdout);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    let got = got.expect("python http.server never answered through -p");
    assert_eq!(
        Some(hex::encode(Sha256::digest(&got)).as_str()),
        sha.split_whitespace().next()
    );
}

/// Forwards ride the control channel, not the NIC: with `--no-network` the guest has no
/// network device at all, and `-p` still works.
#[test]
fn publish_works_with_no_network() {
    let rt = tempfile::tempdir().unwrap();
    let mut child = airlock(
        &rt,
        &[
            "--no-network",
            "-p",
            "0:80",
            "--",
            "sh",
            "-c",
            "mkdir -p /www && echo sealed-ok > /www/i && ls /sys/class/net && exec httpd -f -p 80 -h /www",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .strip_prefix("airlock: publishing ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no published address on stderr: {line:?}"))
        .to_string();
    let mut ifaces = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ifaces)
        .unwrap();
    let mut body = None;
    for _ in 0..100 {
        let o = curl(&["--fail", &format!("http://{addr}/i")]);
        if o.status.success() {
            body = Some(o.stdout);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    assert_eq!(ifaces.trim(), "lo", "--no-network guest has a NIC");
    assert_eq!(
        body.expect("curl through -p never answered"),
        b"sealed-ok\n"
    );
}
