//! Tests of the Rust API against real guests (TCG where there is no hardware virtualization).
//! Needs the kernel, agent and demo rootfs from `scripts/setup`; fails loudly without them.

use std::time::{Duration, Instant};

use airlock_sandbox::{Error, ExecEvent, ExecSpec, Sandbox, WinSize};

mod common;
use common::spec;

async fn start() -> Sandbox {
    Sandbox::start(spec()).await.expect("sandbox start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_execs() {
    let sb = start().await;
    let mut tasks = Vec::new();
    let sb = std::sync::Arc::new(sb);
    for i in 0..16 {
        let sb = sb.clone();
        tasks.push(tokio::spawn(async move {
            let cmd = format!("i={i}; n=0; while [ $n -lt 200 ]; do echo $i-$n; n=$((n+1)); done; echo done-$i >&2; exit $i");
            sb.output(ExecSpec::new(["sh", "-c", &cmd])).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap().unwrap();
        assert_eq!(out.status.code, Some(i as i32));
        let lines: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        let want: Vec<String> = (0..200).map(|n| format!("{i}-{n}")).collect();
        assert_eq!(lines, want, "exec {i} output mixed up");
        assert_eq!(
            String::from_utf8(out.stderr).unwrap(),
            format!("done-{i}\n")
        );
    }
    std::sync::Arc::try_unwrap(sb)
        .unwrap()
        .stop()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_window_size_and_resize() {
    let sb = start().await;
    let mut e = sb
        .exec(ExecSpec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "stty size; read x; stty size".into(),
            ],
            tty: Some(WinSize {
                rows: 33,
                cols: 111,
            }),
            stdin: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let input = e.input();
    let mut seen = String::new();
    let mut resized = false;
    loop {
        match e.next().await.unwrap() {
            Some(ExecEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(ExecEvent::Exit(s)) => {
                assert_eq!(s.code, Some(0));
                break;
            }
            Some(ExecEvent::Stderr(_)) => panic!("a terminal has no separate stderr"),
            Some(_) => {}
            None => break,
        }
        if !resized && seen.contains("33 111") {
            resized = true;
            input
                .resize(WinSize {
                    rows: 50,
                    cols: 132,
                })
                .await
                .unwrap();
            input.write(b"go\r").await.unwrap();
        }
    }
    assert!(
        seen.contains("33 111") && seen.contains("50 132"),
        "{seen:?}"
    );
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_slows_the_guest_instead_of_buffering() {
    let sb = start().await;
    // The guest can write far more than the window; while nobody reads, it must stall with at
    // most one window (256 KiB) in flight towards us.
    let mut e = sb
        .exec(ExecSpec::new([
            "sh",
            "-c",
            "yes 0123456789abcdef | head -c 20000000; echo; echo end",
        ]))
        .await
        .unwrap();
    // The guest fills exactly the window and stops; had it sent more, the host would have
    // ended the sandbox for a protocol violation.
    common::wait_until(
        "the guest filled the window",
        Duration::from_secs(120),
        || {
            let n = e.buffered_bytes();
            async move { n >= airlock_proto::INITIAL_WINDOW }
        },
    )
    .await;
    assert_eq!(e.buffered_bytes(), airlock_proto::INITIAL_WINDOW);
    let mut total = 0usize;
    loop {
        match e.next().await.unwrap() {
            Some(ExecEvent::Stdout(b)) => total += b.len(),
            Some(ExecEvent::Exit(s)) => {
                assert_eq!(s.code, Some(0));
                break;
            }
            _ => {}
        }
        assert!(e.buffered_bytes() <= airlock_proto::INITIAL_WINDOW);
    }
    assert_eq!(total, 20_000_000 + 5);
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_errors_and_sandbox_keeps_working() {
    let sb = start().await;
    let err = sb.output(ExecSpec::new(["/nope"])).await.unwrap_err();
    assert_eq!(err.exec_exit_code(), Some(127), "{err}");
    let err = sb
        .output(ExecSpec::new(Vec::<String>::new()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no command"), "{err}");
    let mut s = ExecSpec::new(["true"]);
    s.cwd = Some("relative".into());
    assert!(sb.output(s).await.is_err());
    let out = sb
        .output(ExecSpec::new(["echo", "still here"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"still here\n");
    // Abandoning an exec kills it rather than leaving it blocked.
    let e = sb.exec(ExecSpec::new(["yes"])).await.unwrap();
    drop(e);
    let out = sb.output(ExecSpec::new(["echo", "ok"])).await.unwrap();
    assert_eq!(out.stdout, b"ok\n");
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_panic_is_a_clear_error() {
    let sb = start().await;
    let err = sb
        .output(ExecSpec::new(["sh", "-c", "echo c > /proc/sysrq-trigger"]))
        .await
        .unwrap_err();
    match &err {
        Error::GuestPanic { message, console } => {
            assert!(message.contains("Kernel panic"), "{message}");
            assert!(!console.is_empty());
        }
        other => panic!("expected a guest panic, got: {other}"),
    }
    // Later calls fail fast with the same story.
    assert!(sb.output(ExecSpec::new(["true"])).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_failure_is_a_clear_error() {
    let mut s = spec();
    s.kernel_args.push("rdinit=/does-not-exist".into());
    s.ready_timeout = Duration::from_secs(60);
    let t = Instant::now();
    let err = Sandbox::start(s).await.unwrap_err();
    assert!(matches!(err, Error::GuestPanic { .. }), "{err}");
    assert!(err.to_string().contains("Kernel panic"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_layer_is_per_sandbox() {
    let a = start().await;
    let b = start().await;
    a.output(ExecSpec::new(["sh", "-c", "echo a > /etc/marker"]))
        .await
        .unwrap();
    let out = b
        .output(ExecSpec::new([
            "sh",
            "-c",
            "cat /etc/marker 2>/dev/null || echo absent",
        ]))
        .await
        .unwrap();
    assert_eq!(
        out.stdout,
        b"absent\n" as &[u8],
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = a
        .output(ExecSpec::new(["cat", "/etc/marker"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"a\n");
    assert_ne!(a.id(), b.id());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Allow rules change at run time through the API: a host server becomes reachable, then not.
#[tokio::test(flavor = "multi_thread")]
async fn allow_list_changes_at_run_time() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = s.write_all(b"hello from the host\n").await;
            });
        }
    });
    let mut spec = spec();
    spec.network
        .add_hosts
        .push(("web.test".into(), "127.0.0.1".parse().unwrap()));
    let sb = Sandbox::start(spec).await.unwrap();
    let mut events = sb.network().unwrap().audit().subscribe();
    let probe = format!(
        "nslookup web.test 10.0.2.2 >/dev/null 2>&1 || echo nxdomain; \
         nc -w 5 $(nslookup web.test 10.0.2.2 2>/dev/null | awk '/^Address: 198/ {{print $2}}') {port} </dev/null || echo refused"
    );
    async fn run(sb: &Sandbox, probe: &str) -> String {
        let out = sb.output(ExecSpec::new(["sh", "-c", probe])).await.unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    assert!(run(&sb, &probe).await.contains("nxdomain"));
    sb.allow_host("web.test").unwrap();
    assert_eq!(run(&sb, &probe).await, "hello from the host\n");
    assert!(sb.remove_allowed_host("web.test").unwrap());
    assert!(run(&sb, &probe).await.contains("nxdomain"));
    assert!(sb.allow_host("not a host").is_err());
    let mut kinds = Vec::new();
    while let Ok(r) = events.try_recv() {
        kinds.push(serde_json::to_value(&r.event).unwrap()["type"].clone());
    }
    assert!(kinds.iter().any(|k| k == "policy"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "connection"), "{kinds:?}");
    sb.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_ops_write_read_list_large_and_errors() {
    let sb = start().await;
    // Small file, parents created, mode applied.
    sb.write_file("/tmp/a/b/hello.txt", b"hello\n", 0o600)
        .await
        .unwrap();
    assert_eq!(
        sb.read_file("/tmp/a/b/hello.txt").await.unwrap(),
        b"hello\n"
    );
    let out = sb
        .output(ExecSpec::new(["stat", "-c", "%a %s", "/tmp/a/b/hello.txt"]))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "600 6");
    // Append.
    sb.write_file_from("/tmp/a/b/hello.txt", &b"more\n"[..], 0o600, true)
        .await
        .unwrap();
    assert_eq!(
        sb.read_file("/tmp/a/b/hello.txt").await.unwrap(),
        b"hello\nmore\n"
    );
    // Several MiB: many windows' worth each way, byte-exact.
    let big: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let n = sb
        .write_file_from("/tmp/big.bin", &big[..], 0o644, false)
        .await
        .unwrap();
    assert_eq!(n, big.len() as u64);
    let back = sb.read_file("/tmp/big.bin").await.unwrap();
    assert!(back == big, "large file differs after round trip");
    let mut part = Vec::new();
    sb.read_file_range("/tmp/big.bin", 1000, Some(10), &mut part)
        .await
        .unwrap();
    assert_eq!(part, &big[1000..1010]);
    // Listing.
    let files = sb.list_files("/tmp").await.unwrap();
    let a = files.iter().find(|f| f.name == "a").expect("dir a listed");
    assert!(a.is_dir);
    let b = files.iter().find(|f| f.name == "big.bin").unwrap();
    assert_eq!(b.size, big.len() as u64);
    assert!(!b.is_dir);
    assert_eq!(b.mode & 0o777, 0o644);
    // Errors are clear and leave the sandbox usable.
    let e = sb.read_file("/nope/missing").await.unwrap_err();
    assert!(matches!(e, Error::File(_)), "{e:?}");
    assert!(e.to_string().contains("/nope/missing"), "{e}");
    let e = sb.read_file("relative").await.unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    let e = sb.list_files("/tmp/big.bin").await.unwrap_err();
    assert!(matches!(e, Error::File(_)), "{e:?}");
    let e = sb.read_file("/tmp").await.unwrap_err();
    assert!(e.to_string().contains("directory"), "{e}");
    // Writing under a read-only path fails without hanging even with a large body.
    let e = sb
        .write_file_from("/proc/nope/x", &big[..], 0o644, false)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::File(_)), "{e:?}");
    let out = sb.output(ExecSpec::new(["echo", "ok"])).await.unwrap();
    assert_eq!(out.stdout, b"ok\n");
    sb.stop().await.unwrap();
}
