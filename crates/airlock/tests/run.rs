//! End-to-end tests of `airlock run`: real guests under the detected accelerator (TCG on
//! machines without hardware virtualization). They need the guest kernel, the static agent and
//! the demo rootfs, which `scripts/setup` builds; missing pieces fail loudly, never skip.

mod util;
use util::{rootfs, text};

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// `airlock run --rootfs R ARGS...` with a private runtime dir, returning (cmd, runtime dir).
fn airlock(args: &[&str]) -> (Command, tempfile::TempDir) {
    let rt = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
    c.arg("run")
        .arg("--rootfs")
        .arg(rootfs())
        .args(args)
        .env("AIRLOCK_RUNTIME_DIR", rt.path());
    (c, rt)
}

fn run(args: &[&str]) -> std::process::Output {
    let (mut c, rt) = airlock(args);
    let out = c.stdin(Stdio::null()).output().unwrap();
    // Only the host-wide TSC cache may remain; no sandbox's state.
    let left: Vec<_> = std::fs::read_dir(rt.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "tsc_khz")
        .collect();
    assert!(left.is_empty(), "state left behind after run: {left:?}");
    out
}

/// Starts `airlock run ARGS` and waits until the command printed "up\n".
fn start_until_up(
    args: &[&str],
) -> (
    std::process::Child,
    std::process::ChildStdout,
    tempfile::TempDir,
) {
    let (mut c, rt) = airlock(args);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut b = [0u8; 3];
    stdout.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"up\n");
    (child, stdout, rt)
}

#[test]
fn echo_stdout_stderr_apart_and_exit_code() {
    let out = run(&["--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status.code(), Some(7));
}

#[test]
fn signal_exit_codes_and_missing_commands() {
    let out = run(&["--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15));
    let out = run(&["--", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("executable file not found"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["--", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
}

#[test]
fn env_workdir_user_hostname() {
    let out = run(&[
        "-e",
        "FOO=bar baz",
        "-w",
        "/tmp/work",
        "-u",
        "alice",
        "--hostname",
        "box1",
        "--",
        "sh",
        "-c",
        "echo \"$FOO|$(pwd)|$(id -u):$(id -g)|$HOME|$(hostname)\"",
    ]);
    assert_eq!(
        text(&out.stdout),
        "bar baz|/tmp/work|1000:1000|/home/alice|box1\n",
        "{}",
        text(&out.stderr)
    );
    let out = run(&["-u", "mallory", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("unable to find user mallory"));
}

#[test]
fn hundred_megabytes_of_output_intact() {
    // The guest writes 100 MB of random bytes and prints their sha256 on stderr; the bytes
    // that reach our stdout must hash the same.
    let out = run(&[
        "--memory",
        "512",
        "--",
        "sh",
        "-c",
        "head -c 100000000 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 100_000_000);
    let want = text(&out.stderr)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    let got = hex::encode(Sha256::digest(&out.stdout));
    assert_eq!(got, want);
}

#[test]
fn stdin_round_trip() {
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (mut c, _rt) = airlock(&["-i", "--", "sha256sum"]);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let d = data.clone();
    let w = std::thread::spawn(move || stdin.write_all(&d));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&hex::encode(Sha256::digest(&data))),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn timeout_kills_the_command() {
    let t = Instant::now();
    let out = run(&[
        "--timeout",
        "10",
        "--",
        "sh",
        "-c",
        "echo started; sleep 60",
    ]);
    assert_eq!(out.status.code(), Some(124));
    assert_eq!(text(&out.stdout), "started\n");
    assert!(
        t.elapsed() < Duration::from_secs(50),
        "timeout did not cut the command short"
    );
}

#[test]
fn tty_has_a_terminal() {
    let out = run(&["-t", "--", "sh", "-c", "tty; stty size"]);
    let s = text(&out.stdout);
    assert!(s.starts_with("/dev/pts/"), "{s}");
    assert!(s.contains("24 80"), "{s}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let out = run(&["--", "true"]);
    assert_eq!(out.status.code(), Some(0));
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["run", "--rootfs", "/nonexistent", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/nonexistent"));
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![0u8; 8192]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["run", "--rootfs"])
        .arg(f.path())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("not an ext4"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn doctor_reports_accelerator() {
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .arg("doctor")
        .output()
        .unwrap();
    let s = text(&out.stdout);
    assert!(s.contains("accelerator"), "{s}");
    assert!(s.contains("QEMU emulator version"), "{s}");
    assert_eq!(out.status.code(), Some(0), "{s}");
}

#[test]
fn ctrl_c_is_forwarded_to_the_command() {
    let (mut child, mut stdout, _rt) = start_until_up(&[
        "--",
        "sh",
        "-c",
        "trap 'echo got-int; exit 42' INT; echo up; while :; do sleep 0.1; done",
    ]);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got-int\n");
    assert_eq!(child.wait().unwrap().code(), Some(42));
}

#[test]
fn two_cpus() {
    let out = run(&[
        "--cpus",
        "2",
        "--memory",
        "256",
        "--",
        "sh",
        "-c",
        "grep -c ^processor /proc/cpuinfo; free -m | grep Mem",
    ]);
    let s = text(&out.stdout);
    assert!(s.starts_with("2\n"), "{s}");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn guest_clock_is_precise_and_set() {
    let out = run(&[
        "--",
        "sh",
        "-c",
        "cat /sys/devices/system/clocksource/clocksource0/current_clocksource; date +%s",
    ]);
    let s = text(&out.stdout);
    let mut lines = s.lines();
    let source = lines.next().unwrap_or("");
    assert!(
        !source.contains("jiffies"),
        "guest fell back to the 4 ms jiffies clock: {s}"
    );
    let guest: u64 = lines.next().unwrap_or("0").trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        host.abs_diff(guest) <= 5,
        "guest clock {guest} vs host {host}"
    );
}

#[test]
fn disk_size_sets_the_writable_layer() {
    let out = run(&["--disk-size", "300", "--", "sh", "-c", "df -m / | tail -n1"]);
    let s = text(&out.stdout);
    let total: u64 = s
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    assert!(
        (200..=300).contains(&total),
        "overlay size {total} MiB for --disk-size 300: {s}"
    );
    let out = run(&["--disk-size", "1", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a too small disk");
}

/// `airlock completion SHELL` prints a script the shell takes: bash completes subcommands and
/// flags with it; an unknown shell is a usage error, and a closed pipe is no panic.
#[test]
fn shell_completions() {
    let bin = env!("CARGO_BIN_EXE_airlock");
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let script = format!(
            "source <('{bin}' completion bash) && COMP_WORDS=({}) COMP_CWORD={} \
             COMP_LINE='{line}' COMP_POINT={} && _airlock airlock '{}' '{}' && echo \"${{COMPREPLY[*]}}\"",
            words.join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let o = Command::new("bash").args(["-c", &script]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(complete("airlock r").trim(), "run restart rename rm rpc");
    assert!(complete("airlock run --sec").contains("--secret-allow-http"));
    for sh in ["zsh", "fish"] {
        let o = Command::new(bin).args(["completion", sh]).output().unwrap();
        assert!(o.status.success() && o.stdout.len() > 1000, "{sh}");
    }
    let o = Command::new(bin)
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new("sh")
        .args([
            "-c",
            &format!("'{bin}' completion zsh | head -c 10 >/dev/null; echo ok"),
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}
