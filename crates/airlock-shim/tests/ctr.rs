//! The shim end to end under a real containerd (started privately by `util::Containerd`),
//! driven by `ctr`, with real Airlock guests: output, exit codes, env, cwd, stdin, exec,
//! signals, terminals, cleanup, and what happens when the shim or its VM is killed.

mod util;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use util::{alive, children_named, mounts_under, text, Containerd, IMAGE};

const RUNTIME: &str = "io.containerd.airlock.v2";

/// Nothing of the pod is left: no shim, no QEMU, no mount, no pod directory.
fn assert_clean(c: &Containerd, id: &str) {
    c.wait_until(Duration::from_secs(20), "the shim to exit", || {
        c.shim_pids().is_empty()
    });
    let pod = Path::new("/run/airlock-shim").join(&c.ns).join(id);
    assert!(
        mounts_under(&pod).is_empty(),
        "mounts left under {}",
        pod.display()
    );
    assert!(!pod.exists(), "{} left behind", pod.display());
    let bundle = c
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task")
        .join(&c.ns)
        .join(id);
    assert!(mounts_under(&bundle).is_empty(), "rootfs still mounted");
}

/// The shim of this containerd and its VM (the QEMU child), once running.
fn shim_and_vm(c: &Containerd) -> (u32, u32) {
    let mut found = None;
    c.wait_until(Duration::from_secs(20), "a shim with its VM", || {
        found = c
            .shim_pids()
            .into_iter()
            .find_map(|s| children_named(s, "qemu-system").first().map(|q| (s, *q)));
        found.is_some()
    });
    found.unwrap()
}

fn task_status(c: &Containerd, id: &str) -> String {
    let out = c.ctr(&["task", "ls"]);
    text(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn run_prints_output_and_returns_the_exit_code() {
    if !util::available() {
        return;
    }
    let c = Containerd::start();
    let out = c.ctr(&[
        "run", "--rm", "--runtime", RUNTIME, "--env", "FOO=bar", "--cwd", "/tmp", IMAGE, "r1",
        "sh", "-c",
        "echo out $FOO; pwd; id -u; cat /etc/motd; test -e /proc/self/stat && echo proc; echo err >&2; exit 7",
    ]);
    assert_eq!(
        text(&out.stdout),
        "out bar\n/tmp\n0\nairlock demo (busybox)\nproc\n",
        "stderr: {}\n{}",
        text(&out.stderr),
        c.tail_log()
    );
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(7));
    assert_clean(&c, "r1");

    // Stdin reaches the process and its end is EOF there (containerd's CloseIO).
    let mut child = c
        .ctr_cmd(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "r2",
            "sh",
            "-c",
            "cat; echo done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "line one\nline two\ndone\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    assert_clean(&c, "r2");
}

#[test]
fn exec_signals_and_delete() {
    if !util::available() {
        return;
    }
    let c = Containerd::start();
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "e1",
        "sh",
        "-c",
        "trap 'echo got TERM; exit 42' TERM; while :; do sleep 0.1; done",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(task_status(&c, "e1"), "RUNNING");
    let (_, vm) = shim_and_vm(&c);

    // A second process in the same container: its own output, code and user.
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        "--cwd",
        "/home",
        "e1",
        "sh",
        "-c",
        "echo exec in $(pwd); echo to-err >&2; exit 5",
    ]);
    assert_eq!(
        text(&out.stdout),
        "exec in /home\n",
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("to-err"));
    assert_eq!(out.status.code(), Some(5));
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x2",
        "--user",
        "1000",
        "e1",
        "id",
    ]);
    assert!(
        text(&out.stdout).starts_with("uid=1000(alice) gid=1000(alice)"),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // ps lists the running process; metrics are the VM's.
    let out = c.ctr(&["task", "ps", "e1"]);
    assert!(
        out.status.success() && text(&out.stdout).lines().count() >= 2,
        "{}",
        text(&out.stderr)
    );
    let out = c.ctr(&["task", "metrics", "e1"]);
    assert!(
        text(&out.stdout).contains("memory.usage_in_bytes")
            && text(&out.stdout).contains("cpuacct.usage"),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // SIGTERM reaches the process in the guest: its trap runs, exit 42; the VM goes with it.
    let out = c.ctr(&["task", "kill", "e1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.wait_until(Duration::from_secs(20), "e1 to stop", || {
        task_status(&c, "e1") == "STOPPED"
    });
    c.wait_until(Duration::from_secs(10), "the VM to exit", || !alive(vm));
    let out = c.ctr(&["task", "delete", "e1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("exit code 42"),
        "{}",
        text(&out.stderr)
    );
    let out = c.ctr(&["container", "delete", "e1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_clean(&c, "e1");
}

#[test]
fn kill_9_of_the_task_or_the_shim_leaves_no_vm() {
    if !util::available() {
        return;
    }
    let c = Containerd::start();
    let run = |id: &str| {
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            id,
            "sleep",
            "1000",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    };

    run("k1");
    let (_, vm) = shim_and_vm(&c);
    let out = c.ctr(&["task", "kill", "-s", "9", "k1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.wait_until(
        Duration::from_secs(10),
        "QEMU to exit after kill -9",
        || !alive(vm),
    );
    c.wait_until(Duration::from_secs(10), "k1 to stop", || {
        task_status(&c, "k1") == "STOPPED"
    });
    assert!(c.ctr(&["task", "delete", "k1"]).status.success());
    assert!(c.ctr(&["container", "delete", "k1"]).status.success());
    assert_clean(&c, "k1");

    // SIGKILL of the shim itself: QEMU dies with it (PR_SET_PDEATHSIG), containerd runs
    // the shim's `delete` to undo the mounts, and the container can be removed.
    run("k2");
    let (shim, vm) = shim_and_vm(&c);
    // SAFETY: kill(2) on the shim this test's containerd started.
    unsafe { libc::kill(shim as i32, libc::SIGKILL) };
    c.wait_until(
        Duration::from_secs(10),
        "QEMU to exit after the shim's SIGKILL",
        || !alive(vm),
    );
    c.wait_until(Duration::from_secs(20), "containerd to notice", || {
        task_status(&c, "k2") != "RUNNING"
    });
    let _ = c.ctr(&["task", "delete", "k2"]);
    let out = c.ctr(&["container", "delete", "k2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_clean(&c, "k2");
}

#[test]
fn terminal() {
    if !util::available() {
        return;
    }
    let c = Containerd::start();
    // `script` gives ctr a real pty, as an interactive `ctr run -t` has.
    let ctr = format!(
        "ctr --address {} --namespace {} run -t --rm --runtime {RUNTIME} {IMAGE} t1 sh -c 'tty; stty size; exit 3'",
        c.socket.display(),
        c.ns
    );
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &ctr, "/dev/null"]);
    let out = util::output_within(&mut cmd, Duration::from_secs(120));
    let s = text(&out.stdout);
    assert!(s.contains("/dev/pts/"), "{s} {}", text(&out.stderr));
    // script's pty has no size here (0x0, which the shim ignores): the default stays.
    assert!(s.contains("24 80"), "stty size: {s}");
    assert_eq!(out.status.code(), Some(3), "{s}");
    assert_clean(&c, "t1");

    // An exec with a terminal, resized: ResizePty reaches the guest pty. ctr sends it only
    // after Start returns (containerd 1.6 puts no ConsoleSize in the exec spec), so the
    // process may run before it lands: it waits up to 10 s for the size, then prints it.
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t2",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ctr = format!(
        "stty cols 91 rows 33; ctr --address {} --namespace {} task exec -t --exec-id x t2 sh -c 'i=0; while [ \"$(stty size)\" != \"33 91\" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; stty size'",
        c.socket.display(),
        c.ns
    );
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", &ctr, "/dev/null"]);
    let out = util::output_within(&mut cmd, Duration::from_secs(120));
    assert!(text(&out.stdout).contains("33 91"), "{}", text(&out.stdout));
    assert!(c.ctr(&["task", "kill", "-s", "9", "t2"]).status.success());
    c.wait_until(Duration::from_secs(20), "t2 to stop", || {
        task_status(&c, "t2") == "STOPPED"
    });
    assert!(c.ctr(&["task", "delete", "t2"]).status.success());
    assert!(c.ctr(&["container", "delete", "t2"]).status.success());
    assert_clean(&c, "t2");
}

#[test]
fn bad_input_is_refused_through_containerd() {
    if !util::available() {
        return;
    }
    let c = Containerd::start();
    for (i, (args, want)) in [
        (
            vec!["--annotation", "airlock.io/allow-host=x.test"],
            "unknown Airlock annotation",
        ),
        (
            vec!["--annotation", "airlock.io/add-hosts=nothing"],
            "NAME:IP",
        ),
        (
            vec!["--annotation", "airlock.io/allow-hosts=a b"],
            "airlock.io annotations",
        ),
        (
            vec!["--annotation", "airlock.io/secrets=KEY@x.test"],
            "not set in the container",
        ),
        (vec!["--annotation", "airlock.io/memory=lots"], "MiB"),
        (vec!["--privileged"], "host devices"),
        (vec!["--device", "/dev/null"], "host devices"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("b{i}");
        let mut a = vec!["run", "--rm", "--runtime", RUNTIME];
        a.extend(args.iter().copied());
        a.extend([IMAGE, id.as_str(), "true"]);
        let out = c.ctr(&a);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            text(&out.stderr).contains(want),
            "{args:?}: want {want:?} in: {}",
            text(&out.stderr)
        );
        // ctr --rm does not remove a container whose task failed to create.
        let _ = c.ctr(&["container", "delete", &id]);
        assert_clean(&c, &id);
    }
}

#[test]
fn bind_mounts_become_volumes() {
    if !util::available() {
        return;
    }
    let c = Containerd::start();
    let rw = c.dir.path().join("vol-rw");
    let ro = c.dir.path().join("vol-ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("in"), "from the host\n").unwrap();
    let hosts = c.dir.path().join("hosts");
    std::fs::write(&hosts, "10.9.8.7 pinned.test\n").unwrap();
    let m_rw = format!("type=bind,src={},dst=/data,options=rbind:rw", rw.display());
    let m_ro = format!(
        "type=bind,src={},dst=/srv/ro,options=rbind:ro",
        ro.display()
    );
    let m_file = format!(
        "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
        hosts.display()
    );
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--mount",
        &m_rw,
        "--mount",
        &m_ro,
        "--mount",
        &m_file,
        IMAGE,
        "v1",
        "sh",
        "-c",
        "cat /srv/ro/in; echo written > /data/out; grep pinned /etc/hosts; \
         (echo x > /srv/ro/nope) 2>/dev/null && echo RO-WRITABLE || echo ro-refused",
    ]);
    assert_eq!(
        text(&out.stdout),
        "from the host\n10.9.8.7 pinned.test\nro-refused\n",
        "{}\n{}",
        text(&out.stderr),
        c.tail_log()
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "written\n"
    );
    assert!(!ro.join("nope").exists());
    assert_clean(&c, "v1");
    assert!(mounts_under(&rw).is_empty() && mounts_under(&ro).is_empty());
}
