//! `airlock build` and `airlock push` end to end: Dockerfiles built on the busybox test image
//! (RUN steps in real sandboxes), run with `airlock run --image`, rebuilt from the cache,
//! pushed to a real loopback `docker-registry` and pulled back. Missing tools fail loudly.

mod util;
use util::{repo, rootfs, text};

#[path = "../../airlock-image/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A private data dir (image store, build cache) and runtime dir.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// With the busybox test image stored as `demo/busybox`.
    fn new() -> Env {
        let e = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        let out = Command::new(repo().join("scripts/mkimage-from-dir"))
            .args(["demo/busybox:latest", &rootfs(), "/bin/sh"])
            .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
            .env("AIRLOCK_DATA_DIR", e.data())
            .output()
            .unwrap();
        assert!(out.status.success(), "mkimage: {}", text(&out.stderr));
        e
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn rt(&self) -> PathBuf {
        self.dir.path().join("rt")
    }

    fn airlock(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(args)
            .env("AIRLOCK_DATA_DIR", self.data())
            .env("AIRLOCK_RUNTIME_DIR", self.rt())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.airlock(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "airlock {args:?}:\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// No sandbox state, temp blob or running VM left behind.
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.rt())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "tsc_khz")
            .collect();
        assert!(left.is_empty(), "sandbox state left behind: {left:?}");
        let tmp = self.data().join("images/tmp");
        let temps: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
        assert!(temps.is_empty(), "temp files left in the store: {temps:?}");
    }
}

fn write(dir: &Path, files: &[(&str, &str)]) {
    for (p, data) in files {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=demo/busybox
FROM ${BASE}
ARG GREETING=hi
ENV APP_HOME=/app \
    MSG="${GREETING} there"
WORKDIR $APP_HOME
COPY hello.txt sub ./
RUN echo "built $MSG" > built.txt && rm /etc/motd && echo "run output on stdout"
USER alice
CMD ["/bin/sh", "-c", "pwd; cat built.txt hello.txt inner.txt; echo $MSG; id -u; ls /app; test -e /etc/motd || echo motd-deleted"]
"#;

/// Steps after the FROM (each prints "Using cache" when cached).
const CACHED_STEPS: usize = 7;

#[test]
fn build_runs_rebuilds_from_cache_and_invalidates_on_change() {
    let env = Env::new();
    let ctx = env.dir.path().join("ctx");
    write(
        &ctx,
        &[
            ("Dockerfile", DOCKERFILE),
            ("hello.txt", "hello v1\n"),
            ("sub/inner.txt", "inner\n"),
            ("sub/skip.log", "ignored\n"),
            ("secret.log", "ignored\n"),
            (".dockerignore", "*.log\n**/*.log\n"),
        ],
    );
    let ctx_s = ctx.to_str().unwrap();
    let rebuild = || {
        env.ok(&[
            "build",
            "-t",
            "built/app:1",
            "--build-arg",
            "GREETING=hey",
            ctx_s,
        ])
    };
    let out = rebuild();
    assert!(out.contains("Step 1/8 : FROM ${BASE}"), "{out}");
    assert!(out.contains("Step 6/8 : RUN echo"), "{out}");
    assert!(out.contains(" ---> Running in "), "{out}");
    assert!(
        out.contains("run output on stdout"),
        "RUN output streamed: {out}"
    );
    assert!(
        out.contains("Successfully tagged docker.io/built/app:1"),
        "{out}"
    );
    assert!(!out.contains("Using cache"), "{out}");
    env.assert_clean();

    let run = env.ok(&["run", "--image", "built/app:1"]);
    assert_eq!(
        run,
        "/app\nbuilt hey there\nhello v1\ninner\nhey there\n1000\nbuilt.txt\nhello.txt\ninner.txt\nmotd-deleted\n",
        "WORKDIR, COPY (ignored files left out), RUN files and deletion, ENV, USER, CMD"
    );

    // Unchanged: every step from the cache, no sandbox booted.
    let out = rebuild();
    assert_eq!(
        out.matches(" ---> Using cache").count(),
        CACHED_STEPS,
        "{out}"
    );
    assert!(
        !out.contains("Running in"),
        "no VM on a cached rebuild: {out}"
    );

    // A changed build arg invalidates from the ARG on.
    let out = env.ok(&["build", "-t", "built/app:2", ctx_s]);
    assert_eq!(out.matches(" ---> Using cache").count(), 0, "{out}");

    // A changed copied file invalidates from its COPY on; earlier steps stay cached.
    std::fs::write(ctx.join("hello.txt"), "hello v2\n").unwrap();
    // An ignored file's change does not matter: it is not in the context.
    std::fs::write(ctx.join("sub/skip.log"), "changed\n").unwrap();
    let out = rebuild();
    assert_eq!(
        out.matches(" ---> Using cache").count(),
        3,
        "ARG, ENV, WORKDIR cached: {out}"
    );
    assert!(
        out.contains("Running in"),
        "RUN after the changed COPY re-runs: {out}"
    );
    let run = env.ok(&[
        "run",
        "--image",
        "built/app:1",
        "--",
        "cat",
        "/app/hello.txt",
    ]);
    assert_eq!(run, "hello v2\n");
    std::fs::write(ctx.join("sub/skip.log"), "changed again\n").unwrap();
    let out = rebuild();
    assert_eq!(
        out.matches(" ---> Using cache").count(),
        CACHED_STEPS,
        "{out}"
    );
    env.assert_clean();
}

#[test]
fn multi_stage_copy_from_a_stage_and_an_image() {
    let env = Env::new();
    let ctx = env.dir.path().join("ctx");
    write(
        &ctx,
        &[(
            "Dockerfile",
            "FROM demo/busybox AS build\n\
             RUN mkdir -p /out && echo made-in-build > /out/result.txt && ln /out/result.txt /out/hard\n\
             FROM scratch\n\
             COPY --from=demo/busybox /bin/busybox /bin/busybox\n\
             COPY --from=build /out /copied/\n\
             ENTRYPOINT [\"/bin/busybox\"]\n\
             CMD [\"cat\", \"/copied/result.txt\", \"/copied/hard\"]\n",
        )],
    );
    let out = env.ok(&["build", "-t", "built/ms", ctx.to_str().unwrap()]);
    assert!(out.contains("Step 3/7 : FROM scratch"), "{out}");
    let run = env.ok(&["run", "--image", "built/ms"]);
    assert_eq!(run, "made-in-build\nmade-in-build\n");
    // Nothing of the build stage but what was copied.
    let run = env.ok(&["run", "--image", "built/ms", "--", "ls", "/", "/bin"]);
    assert!(run.contains("copied") && !run.contains("home"), "{run}");
    assert!(!run.contains("sh\n"), "only busybox itself in /bin: {run}");
    env.assert_clean();
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing_behind() {
    let env = Env::new();
    let ctx = env.dir.path().join("ctx");
    write(
        &ctx,
        &[
            ("ok.txt", "x"),
            ("no.log", "x"),
            (".dockerignore", "*.log\n"),
        ],
    );
    std::fs::write(env.dir.path().join("outside.txt"), "secret").unwrap();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "FROM demo/busybox\nRUN echo before; exit 3\n",
            &[],
            "returned a non-zero code: 3",
        ),
        (
            "FROM demo/busybox\nFROB x\n",
            &[],
            "line 2: unknown instruction FROB",
        ),
        (
            "FROM demo/busybox\nCOPY missing.txt /\n",
            &[],
            "missing.txt: no such file",
        ),
        (
            "FROM demo/busybox\nCOPY ../outside.txt /\n",
            &[],
            "outside the build context",
        ),
        (
            "FROM demo/busybox\nCOPY no.log /\n",
            &[],
            "excluded by .dockerignore",
        ),
        (
            "FROM demo/busybox\n",
            &["--build-arg", "=oops"],
            "--build-arg",
        ),
        (
            "FROM 127.0.0.1:1/nope/missing:1\n",
            &[],
            "not in the local store",
        ),
        (
            "FROM demo/busybox\nCOPY --from=127.0.0.1:1/nostage:1 /x /\n",
            &[],
            "--from=127.0.0.1:1/nostage:1",
        ),
        ("RUN true\n", &[], "only ARG may come before FROM"),
    ];
    for (df, extra, msg) in cases {
        std::fs::write(ctx.join("Dockerfile"), df).unwrap();
        let mut args = vec!["build", "-t", "built/bad"];
        args.extend_from_slice(extra);
        args.push(ctx.to_str().unwrap());
        let out = env.airlock(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{df}: {err}");
        assert!(err.contains(msg), "{df}: expected {msg:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
        env.assert_clean();
    }
    let out = env.airlock(&[
        "build",
        "-t",
        "x",
        env.dir.path().join("nope").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("build context"),
        "{}",
        text(&out.stderr)
    );
    let out = env.airlock(&["push", "never/built", "127.0.0.1:1/x/y:1"]);
    assert!(
        text(&out.stderr).contains("not in the local store"),
        "{}",
        text(&out.stderr)
    );
    // No image recorded for the failures.
    assert!(!env.ok(&["image", "ls"]).contains("built/bad"));
}

#[test]
fn push_to_a_registry_then_pull_back_and_run() {
    let env = Env::new();
    let ctx = env.dir.path().join("ctx");
    write(
        &ctx,
        &[(
            "Dockerfile",
            "FROM demo/busybox\nRUN echo pushed-build > /hello\nCMD [\"cat\", \"/hello\"]\n",
        )],
    );
    env.ok(&["build", "-t", "built/push:1", ctx.to_str().unwrap()]);
    let reg = common::Registry::start(env.dir.path());
    let target = format!("{}/test/built:1", reg.host());
    let out = env.ok(&["push", "built/push:1", &target]);
    assert!(out.contains(&target) && out.contains("@sha256:"), "{out}");
    // Again: every blob already there.
    let again = env.airlock(&["push", "built/push:1", &target]);
    assert!(
        text(&again.stderr).contains("already in the registry"),
        "{}",
        text(&again.stderr)
    );

    // A fresh store pulls it and runs it.
    let other = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    other.ok(&["pull", &target]);
    let run = other.ok(&["run", "--image", &target]);
    assert_eq!(run, "pushed-build\n");
}

#[test]
fn copy_into_an_existing_directory_and_chown_by_name() {
    let env = Env::new();
    let ctx = env.dir.path().join("ctx");
    write(
        &ctx,
        &[
            ("tool.sh", "#!/bin/sh\necho tool ran\n"),
            (
                "Dockerfile",
                "FROM demo/busybox\n\
                 COPY --chmod=0755 tool.sh /bin\n\
                 COPY --chown=alice tool.sh /home/alice/mine\n\
                 CMD [\"/bin/sh\", \"-c\", \"/bin/tool.sh; stat -c '%U %a' /home/alice/mine /bin/tool.sh\"]\n",
            ),
        ],
    );
    // ADD unpacks a local tar.gz into the destination.
    {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            std::fs::File::create(ctx.join("app.tar.gz")).unwrap(),
            flate2::Compression::fast(),
        ));
        let mut h = tar::Header::new_gnu();
        h.set_size(8);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "x/file", &b"unpacked"[..]).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    let df = std::fs::read_to_string(ctx.join("Dockerfile")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        df.replace(
            "COPY --chmod",
            "ADD app.tar.gz /opt/app/\nRUN cat /opt/app/x/file\nCOPY --chmod",
        ),
    )
    .unwrap();
    let out = env.ok(&["build", "-t", "built/copy", ctx.to_str().unwrap()]);
    assert!(out.contains("unpacked"), "{out}");
    let run = env.ok(&["run", "--image", "built/copy"]);
    assert_eq!(run, "tool ran\nalice 644\nroot 755\n");
    env.assert_clean();
}

/// Every file under `dir`, gzip blobs decompressed, as bytes.
fn all_bytes(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_bytes(&p, out);
        } else if let Ok(data) = std::fs::read(&p) {
            let data = if data.starts_with(&[0x1f, 0x8b]) {
                let mut d = Vec::new();
                let _ = std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(&data[..]),
                    &mut d,
                );
                d
            } else {
                data
            };
            out.push((p, data));
        }
    }
}

#[test]
fn run_steps_see_secret_placeholders_and_the_agents_files_stay_out_of_layers() {
    let env = Env::new();
    let ctx = env.dir.path().join("ctx");
    write(
        &ctx,
        &[(
            "Dockerfile",
            "FROM demo/busybox\nRUN echo \"tok=$TOK\" > /tok.txt\n",
        )],
    );
    let value = "hunter2-build-secret";
    env.ok(&[
        "build",
        "-t",
        "built/sec",
        "--secret",
        &format!("TOK={value}@example.com"),
        ctx.to_str().unwrap(),
    ]);
    let run = env.ok(&[
        "run",
        "--image",
        "built/sec",
        "--no-network",
        "--",
        "sh",
        "-c",
        "cat /tok.txt",
    ]);
    assert!(
        run.starts_with("tok=") && run.lines().next().unwrap().len() > 12,
        "{run}"
    );
    assert!(!run.contains(value), "{run}");
    // The RUN layer holds the command's file only: not the CA, bundle or resolv.conf the
    // agent wrote for the build sandbox, nor the directories it made for them.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.data().join("images/index.json")).unwrap())
            .unwrap();
    let digest = index["images"]["docker.io/built/sec:latest"]["layers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let blob = std::fs::read(env.data().join("images/blobs/sha256").join(digest)).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["tok.txt"]);
    let mut files = Vec::new();
    all_bytes(&env.data(), &mut files);
    for (p, data) in files {
        assert!(
            !data.windows(value.len()).any(|w| w == value.as_bytes()),
            "secret value on disk in {}",
            p.display()
        );
    }
}

#[test]
fn interrupting_a_build_leaves_no_vm_state_or_temp_files() {
    use std::io::BufRead;
    let env = Env::new();
    let ctx = env.dir.path().join("ctx");
    write(
        &ctx,
        &[(
            "Dockerfile",
            "FROM demo/busybox\nRUN echo started; sleep 60\n",
        )],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["build", "-t", "built/int", ctx.to_str().unwrap()])
        .env("AIRLOCK_DATA_DIR", env.data())
        .env("AIRLOCK_RUNTIME_DIR", env.rt())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let l = lines
            .next()
            .expect("build ended before RUN started")
            .unwrap();
        if l == "started" {
            break;
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("interrupted"),
        "{}",
        text(&out.stderr)
    );
    env.assert_clean();
    assert!(!env.ok(&["image", "ls"]).contains("built/int"));
}
