//! `airlock run -v` and `--fs-rule`, and `airlock volume`, end to end with real guests.

mod util;
use util::rootfs;

use std::process::Command;

fn airlock(data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
    c.env("AIRLOCK_DATA_DIR", data);
    c
}

fn run(data: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = airlock(data)
        .args(["run", "--rootfs", &rootfs()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_with_shares_rules_and_a_volume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join(".git/hooks")).unwrap();
    std::fs::write(work.join("a"), "host\n").unwrap();
    let w = work.display().to_string();

    let out = airlock(&data)
        .args(["volume", "create", "cache", "--size", "64"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, out, err) = run(
        &data,
        &[
            "-v", &format!("{w}:/ov"),
            "-v", &format!("{w}:/rw:rw"),
            "-v", &format!("{w}:/ro:ro"),
            "-v", "cache:/data",
            "--fs-rule", "deny create /rw/.git/hooks/**",
            "--", "sh", "-c",
            "echo guest >> /ov/a; cat /ov/a; echo live > /rw/b; echo x > /ro/c || echo ro-refused; \
             echo x > /rw/.git/hooks/pre-commit || echo rule-refused; echo kept > /data/f",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "host\nguest\nro-refused\nrule-refused\n");
    assert!(
        err.contains("file rule: denied create /rw/.git/hooks/pre-commit"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("a")).unwrap(),
        "host\n",
        "overlay left the host alone"
    );
    assert_eq!(std::fs::read_to_string(work.join("b")).unwrap(), "live\n");
    assert!(!work.join("c").exists() && !work.join(".git/hooks/pre-commit").exists());

    let (code, out, err) = run(&data, &["-v", "cache:/data", "--", "cat", "/data/f"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");

    let out = airlock(&data)
        .args(["volume", "ls", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "cache");
    assert_eq!(v[0]["in_use"], false);
    let out = airlock(&data)
        .args(["volume", "rm", "cache"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let (code, _, err) = run(&data, &["-v", "cache:/data", "--", "true"]);
    assert_eq!(code, 125);
    assert!(
        err.contains("no volume cache (create it with: airlock volume create cache)"),
        "{err}"
    );
}

#[test]
fn bad_share_arguments_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, want) in [
        (vec!["-v", "/tmp:relative"], "guest path must be absolute"),
        (vec!["-v", "/tmp:/w:rx"], "unknown mode"),
        (vec!["--fs-rule", "deny frob /x"], "unknown operation"),
        (
            vec!["-v", "/does/not/exist:/w"],
            "No such file or directory",
        ),
    ] {
        let mut a = args.clone();
        a.extend(["--", "true"]);
        let (code, _, err) = run(tmp.path(), &a);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
