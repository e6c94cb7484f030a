//! Long-lived sandboxes end to end: `run -d`, `exec`, `ls`, `logs`, `kill`, `rm`, `prune`,
//! supervisor death, secrets kept out of state files and `ps`, and `airlock rpc`'s handling of
//! malformed input. Real guests (TCG here); each test has its own runtime dir.

mod util;
use util::{rootfs, Env};

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

impl Env {
    /// `airlock ARGS` under `umask` (through a shell, as a user's would be).
    fn run_umask(&self, umask: &str, args: &[&str]) -> Output {
        Command::new("sh")
            .args(["-c", &format!("umask {umask}; exec \"$@\""), "sh"])
            .arg(env!("CARGO_BIN_EXE_airlock"))
            .args(args)
            .env("AIRLOCK_RUNTIME_DIR", self.rt.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn start(&self, extra: &[&str]) -> String {
        let r = rootfs();
        let mut args = vec!["run", "-d", "--rootfs", &r];
        args.extend_from_slice(extra);
        let id = self.ok(&args).trim().to_string();
        assert_eq!(id.len(), 12, "run -d prints the id: {id:?}");
        id
    }

    /// `name` runs again on the writable layer it had (the `kept` file its first run's exec
    /// wrote), and its command ran a second time with the log kept ("started" twice).
    fn assert_started_again(&self, name: &str) {
        let out = self.ok(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "cat /root/kept 2>/dev/null || cat /tmp/kept",
        ]);
        assert_eq!(out, "layer\n", "the writable layer survived");
        let mut logs = String::new();
        for _ in 0..100 {
            logs = self.ok(&["logs", name]);
            if logs.matches("started").count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            logs.matches("started").count(),
            2,
            "the command ran again: {logs}"
        );
    }

    fn ls(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["ls", "-a", "--json"])).unwrap()
    }

    fn status(&self, id: &str) -> Option<String> {
        self.ls()
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == id)
            .map(|v| v["status"].as_str().unwrap().to_string())
    }
}

/// Whether `pid` has fully exited: gone, or every one of its threads a zombie. A killed
/// multi-threaded process shows its leader as a zombie while other threads still unwind and
/// hold its files (and flocks), so the leader's state alone is not enough.
fn gone_or_zombie(pid: u64) -> bool {
    let zombie = |stat: &str| {
        std::fs::read_to_string(stat).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        zombie(&format!(
            "/proc/{pid}/task/{}/stat",
            t.file_name().to_string_lossy()
        ))
    })
}

#[test]
fn lifecycle_run_exec_ls_logs_kill_rm_prune() {
    let env = Env::new();
    let id = env.start(&["--", "sh", "-c", "echo main-out; echo main-err >&2"]);

    // exec: exit code, stdout/stderr separated, env/workdir/user, stdin.
    let o = env.run(&[
        "exec",
        "-e",
        "FOO=bar",
        "-w",
        "/tmp/wd",
        "-u",
        "nobody",
        &id,
        "--",
        "sh",
        "-c",
        "echo $FOO $(pwd) $(id -u); echo oops >&2; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "bar /tmp/wd 65534\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "oops\n");
    let mut c = env
        .cmd(&["exec", "-i", &id, "--", "sh", "-c", "tr a-z A-Z; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b"hello stdin\n").unwrap();
    let o = c.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "HELLO STDIN\ndone\n");
    // State persists between execs (the same VM).
    env.ok(&["exec", &id, "--", "sh", "-c", "echo kept > /root/f"]);
    assert_eq!(env.ok(&["exec", &id, "--", "cat", "/root/f"]), "kept\n");
    let o = env.run(&["exec", &id, "--", "no-such-program"]);
    assert_eq!(o.status.code(), Some(127));

    // Two concurrent execs into one sandbox, each gets its own output.
    let spawn = |tag: &str| {
        env.cmd(&[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            &format!("for i in 1 2 3 4 5; do echo {tag}$i; sleep 0.2; done"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(String::from_utf8_lossy(&a.stdout), "a1\na2\na3\na4\na5\n");
    assert_eq!(String::from_utf8_lossy(&b.stdout), "b1\nb2\nb3\nb4\nb5\n");

    // ls / logs / inspect.
    assert_eq!(env.status(&id).as_deref(), Some("running"));
    let table = env.ok(&["ls"]);
    assert!(table.contains(&id) && table.contains("running"), "{table}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = env.ok(&["logs", &id]);
        if logs.contains("main-out") && logs.contains("main-err") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logs never showed the output: {logs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let insp: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", &id[..6]])).unwrap();
    assert_eq!(insp["id"], id.as_str());
    let vm_pid = insp["vm_pid"].as_u64().unwrap();
    // Only this user can reach the supervisor.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let rec = env.rt.path().join("sandboxes").join(&id);
    assert_eq!(mode(&rec), 0o700);
    assert_eq!(mode(&rec.join("sock")), 0o600);
    // A port forward held by the supervisor reaches a server started with exec.
    env.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "mkdir -p /www && echo served > /www/i && httpd -p 80 -h /www",
    ]);
    let bound = env.ok(&["port-forward", &id, "0:80"]);
    let port = bound
        .trim()
        .rsplit_once(" -> ")
        .and_then(|(a, _)| a.rsplit_once(':'))
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| panic!("no binding printed: {bound:?}"));
    let got = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "20",
            &format!("http://127.0.0.1:{port}/i"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout), "served\n");
    // Allow-list changes reach the running sandbox's policy; bad rules are refused clearly.
    env.ok(&["allow-list", "add", &id, "example.com", "*.example.org"]);
    env.ok(&["allow-list", "rm", &id, "example.com"]);
    let o = env.run(&["allow-list", "add", &id, "not a host"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not a host"),
        "{o:?}"
    );
    assert!(env.run(&["port-forward", &id, "nonsense"]).status.code() == Some(1));
    assert_eq!(env.ok(&["exec", &id, "--", "echo", "still"]), "still\n");

    // logs -f ends when the sandbox stops.
    let follower = env
        .cmd(&["logs", "-f", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // kill: stops, keeps the record.
    env.ok(&["kill", &id]);
    assert_eq!(env.status(&id).as_deref(), Some("exited"));
    let f = follower.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&f.stdout).contains("main-out"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone_or_zombie(vm_pid) {
        assert!(Instant::now() < deadline, "VM still running after kill");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!env.run(&["exec", &id, "--", "true"]).status.success());
    assert!(
        env.ok(&["ls"]).lines().count() == 1,
        "ls without -a lists running only"
    );

    // rm refuses a running sandbox without -f; rm -f kills it; prune removes the rest.
    let id2 = env.start(&[]);
    let o = env.run(&["rm", &id2]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("running"));
    env.ok(&["rm", "-f", &id2]);
    assert_eq!(env.status(&id2), None);
    let id3 = env.start(&[]);
    assert_eq!(env.ok(&["prune"]).trim(), id);
    assert_eq!(env.status(&id), None);
    assert_eq!(
        env.status(&id3).as_deref(),
        Some("running"),
        "prune keeps running ones"
    );
    env.ok(&["rm", "-f", &id3]);
    assert!(env.ls().as_array().unwrap().is_empty());
    // Nothing left but the host-wide TSC cache and the (empty) records dir.
    let left: Vec<_> = std::fs::read_dir(env.rt.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "tsc_khz" && n != "sandboxes")
        .collect();
    assert!(left.is_empty(), "state left: {left:?}");
}

/// Fault: `kill -9` of a detached sandbox's supervisor. Its QEMU is gone within 2 s, `ls`
/// marks the sandbox dead, and `prune` removes everything it left.
#[test]
fn supervisor_sigkill_takes_vm_ls_says_dead_prune_cleans() {
    let env = Env::new();
    let id = env.start(&[]);
    let insp: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", &id])).unwrap();
    let (sup, vm) = (
        insp["supervisor_pid"].as_u64().unwrap(),
        insp["vm_pid"].as_u64().unwrap(),
    );
    assert!(!gone_or_zombie(vm));
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(2);
    while !(gone_or_zombie(vm) && gone_or_zombie(sup)) {
        assert!(
            Instant::now() < deadline,
            "VM {vm} outlived its supervisor by 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.status(&id).as_deref(), Some("dead"));
    let o = env.run(&["exec", &id, "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not running"));
    assert_eq!(env.ok(&["prune"]).trim(), id);
    assert!(env.ls().as_array().unwrap().is_empty());
    // The dead VM's disk and console went too.
    let left: Vec<_> = std::fs::read_dir(env.rt.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "tsc_khz" && n != "sandboxes")
        .collect();
    assert!(left.is_empty(), "state left after prune: {left:?}");
}

#[test]
fn secret_values_stay_out_of_state_files_and_ps() {
    let env = Env::new();
    let value = "sk-airlock-test-7f3a9c1e5b";
    let r = rootfs();
    let o = env
        .cmd(&[
            "run",
            "-d",
            "--rootfs",
            &r,
            "--allow-host",
            "api.example.com",
            "--secret",
            "API_TOKEN@api.example.com",
            "--secret",
            &format!("OTHER={value}-2@other.example.com"),
        ])
        .env("API_TOKEN", value)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    // inspect shows names and hosts, never values.
    let insp = env.ok(&["inspect", &id]);
    assert!(insp.contains("API_TOKEN") && insp.contains("api.example.com"));
    assert!(!insp.contains(value), "inspect leaks the secret");
    // No file under the runtime dir holds it.
    fn walk(p: &std::path::Path, value: &str) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&p, value);
            } else if ft.is_file() {
                let b = std::fs::read(&p).unwrap_or_default();
                assert!(
                    !b.windows(value.len()).any(|w| w == value.as_bytes()),
                    "{} holds the secret value",
                    p.display()
                );
            }
        }
    }
    walk(env.rt.path(), value);
    // No process's argv (what ps shows), and not the supervisor's environment.
    let ps = Command::new("ps")
        .args(["-eww", "-o", "args"])
        .output()
        .unwrap();
    assert!(ps.status.success());
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains(value),
        "ps shows the secret"
    );
    let sup = serde_json::from_str::<serde_json::Value>(&insp).unwrap()["supervisor_pid"]
        .as_u64()
        .unwrap();
    let environ = std::fs::read(format!("/proc/{sup}/environ")).unwrap();
    assert!(!environ.windows(value.len()).any(|w| w == value.as_bytes()));
    assert!(!String::from_utf8_lossy(&environ).contains("API_TOKEN="));
    env.ok(&["rm", "-f", &id]);
}

#[test]
fn rpc_answers_malformed_and_oversized_input_with_errors() {
    let env = Env::new();
    let mut c = env
        .cmd(&["rpc"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut ask = |line: &[u8]| -> serde_json::Value {
        stdin.write_all(line).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"))
    };
    let code = |v: &serde_json::Value| v["error"]["code"].as_i64();
    assert_eq!(code(&ask(b"{not json")), Some(-32700));
    assert_eq!(code(&ask(b"\xff\xfe\x00")), Some(-32700));
    assert_eq!(code(&ask(b"[]")), Some(-32600));
    assert_eq!(code(&ask(br#"{"jsonrpc":"2.0","id":1}"#)), Some(-32600));
    assert_eq!(
        code(&ask(br#"{"jsonrpc":"2.0","id":2,"method":"warp_drive"}"#)),
        Some(-32601)
    );
    let v = ask(br#"{"jsonrpc":"2.0","id":3,"method":"exec","params":{"command":5}}"#);
    assert_eq!((code(&v), v["id"].as_i64()), (Some(-32602), Some(3)));
    let v = ask(br#"{"jsonrpc":"2.0","id":4,"method":"exec","params":{"command":"true"}}"#);
    assert_eq!(code(&v), Some(-32000), "no sandbox yet: {v}");
    let v = ask(br#"{"jsonrpc":"2.0","id":5,"method":"create","params":{}}"#);
    assert_eq!(code(&v), Some(-32602), "image required: {v}");
    // 40 MiB line: refused, and the server reads on.
    let big = vec![b'a'; 40 * 1024 * 1024];
    assert_eq!(code(&ask(&big)), Some(-32600));
    let v = ask(br#"{"jsonrpc":"2.0","id":6,"method":"list_files","params":{"path":"/"}}"#);
    assert_eq!((code(&v), v["id"].as_i64()), (Some(-32000), Some(6)));
    drop(stdin);
    assert!(c.wait().unwrap().success());
}

/// Paths and contents of every file under `dir`, sorted: equal before and after means the
/// host tree is untouched.
fn tree_snapshot(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &std::path::Path, p: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.push((rel + "/", Vec::new()));
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn diff_and_cp_show_and_copy_out_overlay_changes() {
    let env = Env::new();
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("changed"), "host version\n").unwrap();
    std::fs::write(host.path().join("gone"), "delete me\n").unwrap();
    std::fs::write(host.path().join("kept"), "untouched\n").unwrap();
    std::fs::create_dir(host.path().join("sub")).unwrap();
    std::fs::write(host.path().join("sub/inner"), "inner\n").unwrap();
    let before = tree_snapshot(host.path());
    let vol = format!("{}:/workspace", host.path().display());
    let id = env.start(&["-v", &vol]);
    assert_eq!(env.ok(&["diff", &id]), "", "nothing changed yet");
    env.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "printf 'made in the guest\\n\\001\\377' > /workspace/new.txt \
         && echo guest edit >> /workspace/changed && rm /workspace/gone",
    ]);

    // diff: exactly those three, docker-style, by a unique id prefix too.
    assert_eq!(
        env.ok(&["diff", &id[..5]]),
        "C /workspace/changed\nD /workspace/gone\nA /workspace/new.txt\n"
    );
    let j: serde_json::Value = serde_json::from_str(&env.ok(&["diff", "--json", &id])).unwrap();
    assert_eq!(
        j,
        serde_json::json!([
            {"kind": "modified", "path": "/workspace/changed"},
            {"kind": "deleted", "path": "/workspace/gone"},
            {"kind": "added", "path": "/workspace/new.txt"},
        ])
    );

    // cp: the guest's bytes on the host; a relative HOSTPATH is the caller's cwd's.
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("new.txt");
    env.ok(&[
        "cp",
        &format!("{id}:/workspace/new.txt"),
        dest.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        b"made in the guest\n\x01\xff"
    );
    let o = env
        .cmd(&["cp", &format!("{id}:/workspace/changed"), "rel-changed"])
        .current_dir(out.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.path().join("rel-changed")).unwrap(),
        "host version\nguest edit\n"
    );
    // A directory tree.
    env.ok(&[
        "cp",
        &format!("{id}:/workspace/sub"),
        out.path().join("sub").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_to_string(out.path().join("sub/inner")).unwrap(),
        "inner\n"
    );

    // Clear refusals: existing destination (left as it was), missing guest path, unknown id,
    // malformed source.
    let o = env.run(&[
        "cp",
        &format!("{id}:/workspace/kept"),
        dest.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        b"made in the guest\n\x01\xff"
    );
    let o = env.run(&[
        "cp",
        &format!("{id}:/workspace/no-such"),
        out.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/workspace/no-such") && err.contains("No such file"),
        "{err}"
    );
    assert!(!out.path().join("x").exists());
    let o = env.run(&["cp", "ffffffffffff:/workspace/kept", "/tmp/never"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no sandbox ffffffffffff"),
        "{o:?}"
    );
    let o = env.run(&["diff", "ffffffffffff"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no sandbox ffffffffffff"),
        "{o:?}"
    );
    let o = env.run(&["cp", &id, "/tmp/never"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ID:/absolute/guest/path"),
        "{o:?}"
    );

    // The overlay kept the host tree bit-identical.
    assert_eq!(tree_snapshot(host.path()), before, "host tree changed");
    env.ok(&["rm", "-f", &id]);
    assert_eq!(tree_snapshot(host.path()), before, "host tree changed");
    assert!(env.ls().as_array().unwrap().is_empty());
}

/// A runtime directory another local user could reach (issue 18: a pre-created
/// `/tmp/airlock-<uid>`) is refused with a message saying what to do, before any guest starts.
/// `AIRLOCK_RUNTIME_DIR` stands in for `/tmp/airlock-<uid>`: the same check guards every source.
#[test]
fn runtime_dir_reachable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let private = base.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let cases: Vec<(&str, &str, Box<dyn Fn(&std::path::Path)>)> = vec![
        (
            "open-mode",
            "has mode 1777",
            Box::new(|d| {
                std::fs::create_dir(d).unwrap();
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o1777)).unwrap();
            }),
        ),
        (
            "group-writable",
            "has mode 770",
            Box::new(|d| {
                std::fs::create_dir(d).unwrap();
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o770)).unwrap();
            }),
        ),
        (
            "other-owner",
            "is owned by uid 65534",
            Box::new(|d| {
                std::fs::create_dir(d).unwrap();
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
                std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
            }),
        ),
        (
            "symlink",
            "is a symlink",
            Box::new(|d| std::os::unix::fs::symlink(&private, d).unwrap()),
        ),
    ];
    let r = rootfs();
    for (name, why, setup) in cases {
        let rt = base.path().join(name);
        setup(&rt);
        for detach in [false, true] {
            let mut args = vec!["run", "--rootfs", &r];
            if detach {
                args.insert(1, "-d");
            }
            args.extend(["--", "true"]);
            let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
                .args(&args)
                .env("AIRLOCK_RUNTIME_DIR", &rt)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{name} detach={detach}: ran: {err}");
            assert!(
                err.contains("refusing the runtime directory")
                    && err.contains(why)
                    && err.contains("AIRLOCK_RUNTIME_DIR"),
                "{name} detach={detach}: {err}"
            );
        }
        // Nothing was written into it.
        let target = if name == "symlink" {
            private.clone()
        } else {
            rt.clone()
        };
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "{name}");
    }
    // One of ours that others may only read (mkdir under umask 022) is closed and used.
    let rt = base.path().join("readable");
    std::fs::create_dir(&rt).unwrap();
    std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["run", "--rm", "--rootfs", &r, "--", "true"])
        .env("AIRLOCK_RUNTIME_DIR", &rt)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mode = std::fs::metadata(&rt).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "a readable runtime dir was not tightened");
}

/// Everything Airlock makes under a fresh runtime directory is the user's only (0700 dirs,
/// 0600 files and sockets), whatever the umask: the guest's disk, console log, records and
/// virtio-fs sockets of a running sandbox.
#[test]
fn runtime_dir_entries_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    // Airlock must create it itself.
    std::fs::remove_dir(env.rt.path()).unwrap();
    let share = tempfile::tempdir().unwrap();
    let r = rootfs();
    let vol = format!("{}:/mnt/w:rw", share.path().display());
    let o = env.run_umask("000", &["run", "-d", "--rootfs", &r, "-v", &vol]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    env.ok(&["exec", &id, "--", "sh", "-c", "echo hi > /mnt/w/f"]);
    let mut seen = Vec::new();
    let mut stack = vec![env.rt.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if m.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert!(!m.file_type().is_symlink(), "{}", p.display());
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
        }
        seen.push(name);
    }
    for want in [
        "scratch.ext4",
        "console.log",
        "fs0.sock",
        "meta.json",
        "log",
        "sock",
    ] {
        assert!(seen.iter().any(|n| n == want), "no {want} among {seen:?}");
    }
    env.ok(&["rm", "-f", &id]);
}

/// `cp` out gives what it writes the guest's permission bits less the *caller's* umask (the
/// supervisor writing it was started with its own, here 000), never a setuid bit, and a
/// symlink source is refused with nothing made (issue 18.3).
#[test]
fn cp_out_follows_the_callers_umask_and_makes_nothing_it_skips() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let r = rootfs();
    let o = env.run_umask("000", &["run", "-d", "--rootfs", &r]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    env.ok(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "set -e; mkdir -p /tmp/t/d; echo f > /tmp/t/f; chmod 644 /tmp/t/f; \
         echo x > /tmp/t/x.sh; chmod 755 /tmp/t/x.sh; echo s > /tmp/t/s; chmod 4755 /tmp/t/s; \
         echo r > /tmp/t/ro; chmod 400 /tmp/t/ro; echo i > /tmp/t/d/i; ln -s f /tmp/t/link; \
         ln -s /tmp/t/f /tmp/lnk",
    ]);
    let out = tempfile::tempdir().unwrap();
    let cp = |umask: &str, src: &str, dest: &std::path::Path| {
        env.run_umask(
            umask,
            &["cp", &format!("{id}:{src}"), dest.to_str().unwrap()],
        )
    };
    let mode = |p: &str| {
        std::fs::symlink_metadata(out.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    for (umask, dir, want) in [
        (
            "077",
            "t77",
            [0o700, 0o700, 0o600, 0o700, 0o700, 0o600, 0o600],
        ),
        (
            "022",
            "t22",
            [0o755, 0o755, 0o644, 0o755, 0o755, 0o600, 0o644],
        ),
    ] {
        let o = cp(umask, "/tmp/t", &out.path().join(dir));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("skipped 1"),
            "the symlink inside is reported skipped: {o:?}"
        );
        let got =
            ["", "/d", "/f", "/x.sh", "/s", "/ro", "/d/i"].map(|p| mode(&format!("{dir}{p}")));
        assert_eq!(
            got, want,
            "umask {umask}: modes of t, d, f, x.sh, s, ro, d/i"
        );
        assert!(!out.path().join(dir).join("link").exists());
        assert!(std::fs::symlink_metadata(out.path().join(dir).join("link")).is_err());
    }
    // A symlink as the source: a clear error and nothing at the destination.
    let o = cp("022", "/tmp/lnk", &out.path().join("lnk"));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("symlink") && err.contains("nothing was copied"),
        "{err}"
    );
    assert!(std::fs::symlink_metadata(out.path().join("lnk")).is_err());
    env.ok(&["rm", "-f", &id]);
}

/// `run -d --name`: commands take the name for the id, a taken name is refused (also when two
/// starts race for it), and `rm` frees it (issue 17).
#[test]
fn names_stand_for_ids_and_are_unique() {
    let env = Env::new();
    let id = env.start(&["--name", "web"]);
    assert_eq!(env.ok(&["exec", "web", "--", "echo", "hi"]), "hi\n");
    let insp: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "web"])).unwrap();
    assert_eq!(
        (insp["id"].as_str(), insp["name"].as_str()),
        (Some(id.as_str()), Some("web"))
    );
    assert!(env
        .ok(&["ls"])
        .lines()
        .any(|l| l.starts_with(&id) && l.ends_with(" web")));
    let r = rootfs();
    let o = env.run(&["run", "-d", "--name", "web", "--rootfs", &r]);
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already in use") && err.contains(&id), "{err}");
    for bad in ["bad name", "-x", ""] {
        let o = env.run(&["run", "-d", "--name", bad, "--rootfs", &r]);
        assert!(!o.status.success(), "{bad:?} accepted");
    }
    // Two starts racing for one name: exactly one gets it.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| env.run(&["run", "-d", "--name", "race", "--rootfs", &r]));
        let b = s.spawn(|| env.run(&["run", "-d", "--name", "race", "--rootfs", &r]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        [a.status.success(), b.status.success()]
            .iter()
            .filter(|x| **x)
            .count(),
        1,
        "{a:?}\n{b:?}"
    );
    let named: Vec<_> = env
        .ls()
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "race")
        .cloned()
        .collect();
    assert_eq!(named.len(), 1, "{named:?}");
    // rm by name frees it.
    env.ok(&["rm", "-f", "web", "race"]);
    let id2 = env.start(&["--name", "web"]);
    assert_ne!(id2, id);
    env.ok(&["rm", "-f", "web"]);
    assert!(env.ls().as_array().unwrap().is_empty());
}

/// `wait` prints the detached command's exit code once it ends (137 for a sandbox killed
/// before), and `--env-file` feeds docker-format files, with `-e` winning (issue 17).
#[test]
fn wait_and_env_file() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("env");
    std::fs::write(&f, "# comment\nFOO=bar baz\n\n  B=1\nPASSED\n").unwrap();
    let f = f.to_str().unwrap();
    let id = env.start(&[
        "--env-file",
        f,
        "-e",
        "B=2",
        "--",
        "sh",
        "-c",
        "sleep 1; echo \"$FOO|$B|$PASSED\"; exit 7",
    ]);
    assert_eq!(env.ok(&["wait", &id]), "7\n");
    assert_eq!(env.ok(&["logs", &id]), "bar baz|2|\n");
    let idle = env.start(&[]);
    env.ok(&["kill", &idle]);
    assert_eq!(env.ok(&["wait", &idle, &id]), "137\n7\n");
    let o = env.run(&["wait", "ffffffffffff"]);
    assert!(!o.status.success());
    let r = rootfs();
    std::fs::write(dir.path().join("bad"), "=x\n").unwrap();
    for (file, want) in [("missing", "No such file"), ("bad", "bad:1")] {
        let p = dir.path().join(file);
        let o = env.run(&[
            "run",
            "--rootfs",
            &r,
            "--env-file",
            p.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert_eq!(o.status.code(), Some(125));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--env-file") && err.contains(want), "{err}");
    }
    env.ok(&["rm", "-f", &id, &idle]);
}

/// `cp HOSTPATH ID:/path` copies into a running sandbox as `docker cp` does: a tree into an
/// existing directory, a file under a new name, links as links; bad paths are clear errors.
#[test]
fn cp_in_copies_trees_and_files_into_a_running_sandbox() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("proj");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), "hello\n").unwrap();
    std::fs::write(src.join("sub/run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(
        src.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    let id = env.start(&["--name", "cpin"]);
    env.ok(&["cp", src.to_str().unwrap(), "cpin:/root"]);
    env.ok(&[
        "cp",
        src.join("a.txt").to_str().unwrap(),
        &format!("{id}:/tmp/renamed"),
    ]);
    let out = env.ok(&[
        "exec",
        "cpin",
        "--",
        "sh",
        "-c",
        "cat /root/proj/a.txt /tmp/renamed; /root/proj/sub/run.sh; readlink /root/proj/link",
    ]);
    assert_eq!(out, "hello\nhello\nran\na.txt\n");
    let o = env.run(&["cp", src.join("a.txt").to_str().unwrap(), "cpin:/no/such/x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("parent directory does not exist"));
    let o = env.run(&[
        "cp",
        host.path().join("none").to_str().unwrap(),
        "cpin:/tmp",
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file"),
        "{o:?}"
    );
    env.ok(&["rm", "-f", "cpin"]);
}

/// `run -d -p` publishes like foreground `run -p` (the supervisor holds the forward, the
/// binding is said on stderr, stdout stays the id); a port in use fails before the boot.
#[test]
fn run_detached_publishes_ports() {
    use std::io::{Read, Write};
    let env = Env::new();
    let r = rootfs();
    let o = env.run(&[
        "run",
        "-d",
        "-p",
        "0:80",
        "--rootfs",
        &r,
        "--",
        "sh",
        "-c",
        "mkdir -p /www && echo served > /www/i && exec httpd -f -p 80 -h /www",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(id.len(), 12, "{id:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let port: u16 = err
        .lines()
        .find_map(|l| l.strip_suffix(" -> 80")?.rsplit_once(':')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no binding in {err:?}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let mut got = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /i HTTP/1.0\r\n\r\n");
            let _ = s.read_to_string(&mut got);
        }
        if got.contains("served") || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.ends_with("served\n"), "{body:?}");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = format!("{}:80", busy.local_addr().unwrap().port());
    let o = env.run(&["run", "-d", "-p", &spec, "--rootfs", &r]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in use"));
    env.ok(&["rm", "-f", &id]);
    assert!(env.ls().as_array().unwrap().is_empty());
}

/// `--label K=V` on `run -d`, and `ls --filter label=K[=V] | name= | status=` (issue 17).
#[test]
fn labels_and_ls_filters() {
    let env = Env::new();
    let a = env.start(&[
        "--label",
        "team=web",
        "--label",
        "tier=front",
        "--name",
        "fa",
    ]);
    let b = env.start(&["--label", "team=db"]);
    let ids = |filters: &[&str]| -> Vec<String> {
        let mut args = vec!["ls", "--json"];
        for f in filters {
            args.extend(["--filter", f]);
        }
        let v: serde_json::Value = serde_json::from_str(&env.ok(&args)).unwrap();
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(ids(&["label=team"]), both);
    assert_eq!(ids(&["label=team=web"]), vec![a.clone()]);
    assert_eq!(ids(&["label=team", "label=tier=front"]), vec![a.clone()]);
    assert_eq!(ids(&["name=fa"]), vec![a.clone()]);
    assert!(ids(&["label=nope"]).is_empty());
    env.ok(&["kill", &b]);
    assert_eq!(ids(&["status=exited"]), vec![b.clone()]);
    let insp: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", &a])).unwrap();
    assert_eq!(insp["labels"]["tier"], "front");
    for bad in ["label=", "colour=red", "status=paused"] {
        let o = env.run(&["ls", "--filter", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
    }
    env.ok(&["rm", "-f", &a, &b]);
}

/// `stop` ends a sandbox gracefully (its command sees SIGTERM) and keeps its writable layer;
/// `start` boots it again on that layer with the same id, name and command; `stats` shows the
/// running ones; `-d --rm` leaves nothing once stopped; detached `-v` files belong to the
/// sandbox user inside.
#[test]
fn stop_start_keep_the_writable_layer_and_stats_show_use() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let share = format!("{}:/w:rw", work.path().display());
    let id = env.start(&[
        "--name",
        "keep",
        "--user",
        "1000:1000",
        "-v",
        &share,
        "--",
        "sh",
        "-c",
        "trap 'echo got-term; exit 3' TERM; echo started; while :; do sleep 1; done",
    ]);
    // The sandbox user owns what the guest creates in the share, the host user on the host.
    let out = env.ok(&[
        "exec",
        "keep",
        "--",
        "sh",
        "-c",
        "echo layer > /root/kept 2>/dev/null || echo layer > /tmp/kept; echo x > /w/made; \
         stat -c %u:%g /w/made; id -u",
    ]);
    assert_eq!(out, "1000:1000\n1000\n");
    use std::os::unix::fs::MetadataExt;
    let host = std::fs::metadata(work.path().join("made")).unwrap();
    // SAFETY: geteuid cannot fail.
    assert_eq!(host.uid(), unsafe { libc::geteuid() });

    let stats: serde_json::Value =
        serde_json::from_str(&env.ok(&["stats", "--no-stream", "--json"])).unwrap();
    let row = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .expect("stats lists the running sandbox");
    assert_eq!(row["name"], "keep");
    let pss = row["memory_bytes"].as_u64().unwrap();
    assert!(
        pss > 1 << 20 && pss <= row["rss_bytes"].as_u64().unwrap(),
        "{row}"
    );
    assert_eq!(
        row["memory_limit_bytes"].as_u64().unwrap(),
        512 << 20,
        "{row}"
    );
    assert!(row["cpu_percent"].as_f64().unwrap() >= 0.0, "{row}");
    assert!(
        row["net_tx_bytes"].as_u64().is_some() && row["net_rx_bytes"].as_u64().is_some(),
        "{row}"
    );
    let table = env.ok(&["stats", "--no-stream", "keep"]);
    assert!(
        table.starts_with("ID") && table.contains("MEM USAGE / LIMIT") && table.contains(&id),
        "{table}"
    );

    assert_eq!(env.ok(&["stop", "-t", "5", "keep"]), "keep\n");
    assert_eq!(env.status(&id).as_deref(), Some("exited"));
    assert_eq!(
        env.ok(&["wait", "keep"]),
        "3\n",
        "the command saw SIGTERM and exited"
    );
    let logs = env.ok(&["logs", "keep"]);
    assert!(
        logs.starts_with("started\n") && logs.contains("got-term\n"),
        "{logs:?}"
    );
    // Stopping a stopped sandbox is no error, as in docker.
    assert_eq!(env.ok(&["stop", "keep"]), "keep\n");

    assert_eq!(env.ok(&["start", "keep"]), "keep\n");
    assert_eq!(env.status(&id).as_deref(), Some("running"));
    env.assert_started_again("keep");
    let o = env.run(&["start", "nosuch"]);
    assert!(!o.status.success());
    env.ok(&["kill", "keep"]);
    env.ok(&["rm", "keep"]);

    // -d --rm: the record goes with the sandbox.
    let gone = env.start(&["--rm"]);
    env.ok(&["stop", "-t", "0", &gone]);
    assert_eq!(env.status(&gone), None, "--rm removed the record");
    let leftover: Vec<_> = std::fs::read_dir(env.rt.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&gone))
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");
}

/// A secret's value is never stored, so `start` takes it from its caller's environment and
/// says so when it is missing.
#[test]
fn start_takes_secrets_from_the_environment() {
    let env = Env::new();
    let r = rootfs();
    let o = env
        .cmd(&["run", "-d", "--rootfs", &r, "--secret", "TOKEN@example.com"])
        .env("TOKEN", "s3cret-value-123")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    env.ok(&["stop", "-t", "0", &id]);
    let saved = std::fs::read_to_string(
        env.rt
            .path()
            .join("sandboxes")
            .join(&id)
            .join("request.json"),
    )
    .unwrap();
    assert!(!saved.contains("s3cret-value-123"), "{saved}");
    let o = env
        .cmd(&["start", &id])
        .env_remove("TOKEN")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("export TOKEN"), "{err}");
    let o = env
        .cmd(&["start", &id])
        .env("TOKEN", "s3cret-value-123")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = env.ok(&["exec", &id, "--", "sh", "-c", "echo $TOKEN"]);
    assert!(
        !out.contains("s3cret-value-123") && !out.trim().is_empty(),
        "{out}"
    );
    env.ok(&["rm", "-f", &id]);
}

/// `ps` lists as `ls` does; `rename` gives a running sandbox a new name that commands accept
/// at once and `restart` keeps; `restart` is stop then start on the same writable layer (and
/// only a start for a stopped sandbox); bad names and taken names are refused.
#[test]
fn ps_rename_and_restart() {
    let env = Env::new();
    let id = env.start(&[
        "--name",
        "first",
        "--",
        "sh",
        "-c",
        "echo started; while :; do sleep 1; done",
    ]);
    let other = env.start(&["--name", "taken"]);
    assert!(
        env.ok(&["ps"]).lines().any(|l| l.starts_with(&id)),
        "ps lists the sandbox"
    );
    env.ok(&[
        "exec",
        "first",
        "--",
        "sh",
        "-c",
        "echo layer > /root/kept 2>/dev/null || echo layer > /tmp/kept",
    ]);

    assert_eq!(env.ok(&["rename", "first", "second"]), "");
    assert_eq!(env.ok(&["exec", "second", "--", "echo", "hi"]), "hi\n");
    assert!(!env.run(&["exec", "first", "--", "true"]).status.success());
    for (new, want) in [
        ("taken", "already in use"),
        ("bad name", "not a valid name"),
        ("second", "already named"),
    ] {
        let o = env.run(&["rename", "second", new]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{new}: {err}");
    }
    assert!(!env.run(&["rename", "nosuch", "x"]).status.success());

    assert_eq!(env.ok(&["restart", "-t", "1", "second"]), "second\n");
    assert_eq!(env.status(&id).as_deref(), Some("running"));
    let insp: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", &id])).unwrap();
    assert_eq!(insp["name"], "second", "restart keeps the new name");
    env.assert_started_again("second");

    // A stopped sandbox is only started; the name it was renamed to while stopped stays too.
    env.ok(&["stop", "-t", "0", "second"]);
    env.ok(&["rename", "second", "third"]);
    assert_eq!(env.ok(&["restart", "third"]), "third\n");
    assert_eq!(env.status(&id).as_deref(), Some("running"));
    assert_eq!(env.ok(&["exec", "third", "--", "echo", "ok"]), "ok\n");
    let o = env.run(&["restart", "nosuch"]);
    assert!(!o.status.success());

    // A --rm sandbox would be gone once stopped: restart refuses and leaves it running.
    let doomed = env.start(&["--rm"]);
    let o = env.run(&["restart", &doomed]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--rm"), "{err}");
    assert_eq!(env.status(&doomed).as_deref(), Some("running"));
    env.ok(&["kill", &doomed]);

    // A damaged saved request is an error, not a crash, and the name stays.
    env.ok(&["stop", "-t", "0", "third"]);
    let req = env
        .rt
        .path()
        .join("sandboxes")
        .join(&id)
        .join("request.json");
    std::fs::write(&req, "[]").unwrap();
    let o = env.run(&["rename", "third", "fourth"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a JSON object"),
        "{err}"
    );
    assert_eq!(o.status.code(), Some(1), "{err}");
    let insp: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", &id])).unwrap();
    assert_eq!(insp["name"], "third");
    env.ok(&["rm", "-f", "third", &other]);
}

/// `top` lists the guest's processes with their parents, as a table and as JSON; the agent
/// (pid 1) and kernel threads are not among them; a stopped sandbox has none to show.
#[test]
fn top_lists_the_guests_processes() {
    let env = Env::new();
    // `; echo`: the shell cannot exec its last command in its own place.
    let id = env.start(&["--", "sh", "-c", "sleep 1000 & sleep 2000; echo done"]);
    let mut procs = Vec::new();
    for _ in 0..100 {
        let v: serde_json::Value = serde_json::from_str(&env.ok(&["top", "--json", &id])).unwrap();
        procs = v.as_array().unwrap().clone();
        if procs.iter().any(|p| p["command"] == "sleep 2000") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let find = |cmd: &str| {
        procs
            .iter()
            .find(|p| p["command"] == cmd)
            .unwrap_or_else(|| panic!("{cmd} not listed: {procs:?}"))
            .clone()
    };
    let (sh, one, two) = (
        find("sh -c sleep 1000 & sleep 2000; echo done"),
        find("sleep 1000"),
        find("sleep 2000"),
    );
    assert_eq!(one["ppid"], sh["pid"], "{procs:?}");
    assert_eq!(two["ppid"], sh["pid"], "{procs:?}");
    assert_eq!(two["uid"], 0);
    assert_eq!(two["state"], "S");
    // The guest kernel syncs a task's RSS counters lazily: a number, maybe a small one.
    assert!(two["rss_kib"].is_u64() && two["cpu_ms"].is_u64(), "{two}");
    for p in &procs {
        assert!(
            p["pid"].as_i64().unwrap() > 2,
            "agent or kthreadd listed: {p}"
        );
        assert!(
            !p["command"].as_str().unwrap().starts_with("[k"),
            "kernel thread listed: {p}"
        );
    }
    let table = env.ok(&["top", &id]);
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap().contains("PID") && table.contains("PPID"),
        "{table}"
    );
    assert!(lines.any(|l| l.ends_with(" sleep 1000")), "{table}");
    env.ok(&["stop", "-t", "0", &id]);
    let o = env.run(&["top", &id]);
    assert!(!o.status.success(), "top of a stopped sandbox");
    env.ok(&["rm", &id]);
}
