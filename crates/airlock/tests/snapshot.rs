//! Warm starts and snapshots through the CLI: a damaged template is reported and the sandbox
//! boots cold; `template ls|rm|gc`; `snapshot ID NAME` of a detached sandbox, `run --from`,
//! `fork`; clear refusals. Real guests (TCG here); each test has its own runtime dir and its
//! own memory size (so its own template).

mod util;
use util::{rootfs, Env};

fn template_keys(e: &Env) -> Vec<(String, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_str(&e.ok(&["template", "ls", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| (t["key"].as_str().unwrap().to_string(), t.clone()))
        .collect()
}

#[test]
fn damaged_template_warns_boots_cold_and_template_commands_work() {
    let e = Env::new();
    let r = rootfs();
    let args = ["run", "--memory", "336", "--rootfs", &r, "--", "echo", "hi"];
    let before: Vec<String> = template_keys(&e).into_iter().map(|t| t.0).collect();
    assert_eq!(e.ok(&args), "hi\n");
    let after = template_keys(&e);
    let (key, t) = after
        .iter()
        .find(|(k, t)| !before.contains(k) || t["inputs"]["memory_mib"] == 336)
        .expect("the run left a template")
        .clone();
    assert_eq!(t["inputs"]["memory_mib"], 336);
    assert_eq!(t["current"], true);
    assert!(e.ok(&["template", "ls"]).contains(&key));

    // Truncate the RAM file: the next run says so, boots cold, and still gives the output.
    let dir = std::path::Path::new(&std::env::var("HOME").unwrap())
        .join(".cache/airlock/templates")
        .join(&key);
    let dir = if dir.is_dir() {
        dir
    } else {
        std::path::PathBuf::from(t["inputs"]["kernel"]["path"].as_str().unwrap())
            .ancestors()
            .nth(3)
            .unwrap()
            .join("templates")
            .join(&key)
    };
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("ram"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let o = e.run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("damaged") && err.contains("booting cold"),
        "a damaged template must be reported: {err}"
    );
    // Rebuilt, and `--cold` neither uses nor needs it.
    assert!(template_keys(&e)
        .iter()
        .any(|(k, t)| *k == key && t["problem"].is_null()));
    let mut cold = args.to_vec();
    cold.insert(1, "--cold");
    assert_eq!(e.ok(&cold), "hi\n");

    // rm by prefix, unknown keys are an error, gc runs.
    e.ok(&["template", "rm", &key[..10]]);
    assert!(!template_keys(&e).iter().any(|(k, _)| *k == key));
    let o = e.run(&["template", "rm", "zzzz"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no template zzzz"));
    e.ok(&["template", "gc"]);
}

#[test]
fn snapshot_of_a_detached_sandbox_run_from_and_fork() {
    let e = Env::new();
    let r = rootfs();
    let name = format!("cli-{}", std::process::id());
    let id = e
        .ok(&[
            "run", "-d", "--memory", "344", "--rootfs", &r, "--", "sleep", "1000",
        ])
        .trim()
        .to_string();
    e.ok(&["exec", &id, "--", "sh", "-c", "echo kept > /root/state"]);
    assert_eq!(e.ok(&["snapshot", &id, &name]).trim(), name);
    assert!(e.ok(&["snapshot", "--ls"]).contains(&name));
    let o = e.run(&["snapshot", &id, &name]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));

    // Copies: the file and the detached command's process are there; a new hostname.
    let out = e.ok(&[
        "run",
        "--from",
        &name,
        "--",
        "sh",
        "-c",
        "cat /root/state; pidof sleep >/dev/null && echo sleeping; hostname",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["kept", "sleeping"], "{out}");
    assert_ne!(lines[2], id);

    let fork = e.ok(&["fork", &id]).trim().to_string();
    assert_eq!(fork.len(), 12, "{fork}");
    assert_ne!(fork, id);
    assert_eq!(e.ok(&["exec", &fork, "--", "cat", "/root/state"]), "kept\n");
    // The fork is its own machine: a write there is not seen by the source.
    e.ok(&["exec", &fork, "--", "sh", "-c", "echo forked > /root/state"]);
    assert_eq!(e.ok(&["exec", &id, "--", "cat", "/root/state"]), "kept\n");

    e.ok(&["snapshot", "--rm", &name]);
    let o = e.run(&["run", "--from", &name, "--", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no snapshot named"));
}

#[test]
fn sandbox_with_a_share_cannot_be_snapshotted_and_says_why() {
    let e = Env::new();
    let r = rootfs();
    let host = tempfile::tempdir().unwrap();
    let share = format!("{}:/work", host.path().display());
    let id = e
        .ok(&[
            "run", "-d", "-v", &share, "--rootfs", &r, "--", "sleep", "1000",
        ])
        .trim()
        .to_string();
    let o = e.run(&["snapshot", &id, "never"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shares") && err.contains("QEMU 7.2"), "{err}");
}
