//! `airlock pool start/ls/rm` and `airlock run` claiming from a holder, end to end with real
//! guests: claims are distinct machines with the claimer's network, other shapes start on
//! their own, a garbage claim does not hurt the holder, and kill -9 of the claimer or of
//! the holder leaves no QEMU and no state directory. Each test has its own runtime dir.

mod util;
use util::{rootfs, text, Env};

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

impl Env {
    /// `pool start --size 1` of the test rootfs; the holder's pid.
    fn start_pool(&self) -> u32 {
        let r = rootfs();
        let out = self.ok(&["pool", "start", "--size", "1", "--rootfs", &r]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("pool start printed {out:?}"))
    }

    /// The holder `pid`'s pool, as `pool ls --json` shows it.
    fn status(&self, pid: u32) -> serde_json::Value {
        let all: serde_json::Value =
            serde_json::from_str(&self.ok(&["pool", "ls", "--json"])).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|h| h["pid"] == pid)
            .map(|h| h["pools"][0].clone())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits until `pred` holds for the holder's status (published every 2 s).
    fn wait_status(&self, pid: u32, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let t0 = Instant::now();
        loop {
            let s = self.status(pid);
            if pred(&s) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{what}: {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Processes whose command line names this runtime dir (QEMU does, by its console log).
    fn processes(&self) -> Vec<String> {
        let rtp = self.rt.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| text(&c).replace('\0', " "))
            .filter(|c| c.contains(&rtp) && c.contains("qemu"))
            .collect()
    }

    /// Sandbox state directories left in the runtime dir.
    fn state_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.rt.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "pools")
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn wait_processes(&self, n: usize, what: &str) {
        let t0 = Instant::now();
        while self.processes().len() != n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: {:?}",
                self.processes()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn alive(pid: u32) -> bool {
    // A zombie (the holder is reaped by whatever adopted it) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
        .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X'))
}

#[test]
fn run_claims_from_a_pool_and_claims_are_distinct_machines() {
    let env = Env::new();
    let r = rootfs();
    let holder = env.start_pool();
    env.wait_status(holder, "one ready", |s| s["ready"] == 1);
    // The claimer's network policy: one host allowed, others unknown to the DNS.
    let probe =
        "cat /etc/machine-id; hostname; nslookup example.com; nslookup other.org 2>&1; echo end";
    let claim = [
        "run",
        "--allow-host",
        "example.com",
        "--rootfs",
        &r,
        "--",
        "sh",
        "-c",
        probe,
    ];
    let first = env.ok(&claim);
    env.wait_status(holder, "first claim, refilled", |s| {
        s["claimed"] == 1 && s["ready"] == 1
    });

    // A garbage claim gets the connection closed; the holder keeps serving.
    let sock = env.rt.path().join(format!("pools/{holder}.sock"));
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"{not json\n").unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut c, &mut rest);
    assert!(alive(holder), "the holder died of a bad claim");

    let second = env.ok(&claim);
    env.wait_status(holder, "second claim", |s| s["claimed"] == 2);
    let (a, b): (Vec<&str>, Vec<&str>) = (first.lines().collect(), second.lines().collect());
    assert_ne!(a[0], b[0], "machine-id shared by two claims");
    assert_ne!(a[1], b[1], "hostname shared by two claims");
    // The claimer's network and policy work as a cold boot's do.
    let mut cold = claim.to_vec();
    cold.insert(1, "--cold");
    let cold = env.ok(&cold);
    assert_eq!(a[2..], cold.lines().collect::<Vec<_>>()[2..], "{first}");
    assert!(
        first.contains("198.18.") && first.contains("NXDOMAIN"),
        "{first}"
    );

    // Another shape starts on its own and is not a claim.
    env.ok(&["run", "--memory", "320", "--rootfs", &r, "--", "true"]);
    // A failing command's status comes through a claimed sandbox.
    env.wait_status(holder, "refilled", |s| s["ready"] == 1);
    let o = env.run(&["run", "--rootfs", &r, "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    env.wait_status(holder, "claims", |s| s["claimed"] == 3);

    assert!(env
        .ok(&["pool", "rm", &holder.to_string()])
        .contains(&holder.to_string()));
    assert!(!alive(holder));
    env.wait_processes(0, "after pool rm");
    assert_eq!(env.state_dirs(), Vec::<String>::new());
    let o = env.run(&["pool", "rm", &holder.to_string()]);
    assert!(!o.status.success() && text(&o.stderr).contains("no pool holder"));
}

#[test]
fn killing_the_claimer_or_the_holder_leaves_nothing_behind() {
    let env = Env::new();
    let r = rootfs();
    let holder = env.start_pool();
    env.wait_status(holder, "one ready", |s| s["ready"] == 1);
    let mut run = env
        .cmd(&["run", "--rootfs", &r, "--", "sleep", "60"])
        .spawn()
        .unwrap();
    env.wait_status(holder, "claimed and refilled", |s| {
        s["claimed"] == 1 && s["ready"] == 1
    });
    assert_eq!(env.processes().len(), 2, "{:?}", env.processes());
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(run.id() as i32, libc::SIGKILL) };
    run.wait().unwrap();
    // The claimed VM goes with its claimer; the refilled one stays.
    env.wait_processes(1, "after kill -9 of the claimer");
    let t0 = Instant::now();
    while env.state_dirs().len() != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?}",
            env.state_dirs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A claimed sandbox dies with the holder (its QEMU's parent): the claimer says so.
    let run = env
        .cmd(&["run", "--rootfs", &r, "--", "sleep", "60"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_status(holder, "second claim", |s| s["claimed"] == 2);
    unsafe { libc::kill(holder as i32, libc::SIGKILL) };
    let o = run.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("stopped"), "{}", text(&o.stderr));
    env.wait_processes(0, "after kill -9 of the holder");
    // The next start sweeps what the dead holder left; `pool ls` forgets it.
    env.ok(&["run", "--rootfs", &r, "--", "true"]);
    assert_eq!(env.state_dirs(), Vec::<String>::new());
    assert_eq!(env.status(holder), serde_json::Value::Null);
    let left: Vec<_> = std::fs::read_dir(env.rt.path().join("pools"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn pool_rm_lets_claimed_sandboxes_finish() {
    let env = Env::new();
    let r = rootfs();
    let holder = env.start_pool();
    env.wait_status(holder, "one ready", |s| s["ready"] == 1);
    let run = env
        .cmd(&[
            "run",
            "--rootfs",
            &r,
            "--",
            "sh",
            "-c",
            "sleep 4; echo finished",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_status(holder, "claimed", |s| s["claimed"] == 1);
    env.ok(&["pool", "rm", "--all"]);
    let o = run.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(text(&o.stdout), "finished\n");
    assert!(!alive(holder));
    env.wait_processes(0, "after pool rm");
    assert_eq!(env.state_dirs(), Vec::<String>::new());
}

#[test]
fn pool_start_refuses_bad_input() {
    let env = Env::new();
    let o = env.run(&["pool", "start", "--size", "1"]);
    assert!(!o.status.success());
    let o = env.run(&["pool", "start", "--size", "0", "--rootfs", "/"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--size"));
    let o = env.run(&["pool", "start", "--rootfs", "/nonexistent/root"]);
    assert!(
        !o.status.success() && text(&o.stderr).contains("/nonexistent/root"),
        "{}",
        text(&o.stderr)
    );
    let o = env.run(&["pool", "rm", "1"]);
    assert!(!o.status.success() && text(&o.stderr).contains("no pool holder with pid 1"));
}
