//! The kubelet's path: containerd's CRI plugin with runtime handler `airlock` (runtime_type
//! io.containerd.airlock.v2), CNI from Debian's containernetworking-plugins, driven over gRPC
//! by a CRI client (k8s-cri) as the kubelet would: RunPodSandbox, CreateContainer,
//! StartContainer, ExecSync, ContainerStatus, StopPodSandbox, RemovePodSandbox.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};
use util::{text, Containerd, Options, IMAGE};

const SECRET: &str = "cri-s3cr3t-5b2e";
const CURL_IMAGE: &str = "docker.io/airlock/busybox-curl:test";

/// The namespace CRI keeps its images and containers in.
const K8S_NS: &str = "k8s.io";

async fn client(socket: &Path) -> RuntimeServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
            }
        }))
        .await
        .expect("connect to containerd's CRI");
    RuntimeServiceClient::new(channel)
}

fn cni_config(dir: &Path) -> std::path::PathBuf {
    let conf = dir.join("cni");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("10-airlock-test.conflist"),
        format!(
            r#"{{"cniVersion": "0.4.0", "name": "airlock-test", "plugins": [
  {{"type": "ptp", "ipMasq": false,
    "ipam": {{"type": "host-local", "subnet": "10.231.7.0/24", "dataDir": "{}"}}}}]}}"#,
            dir.join("ipam").display()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn cri_pod_lifecycle() {
    if !util::available() {
        return;
    }
    let cni_bin = Path::new("/usr/lib/cni");
    assert!(
        cni_bin.join("ptp").exists(),
        "CNI plugins missing: apt-get install containernetworking-plugins"
    );
    let work = tempfile::tempdir().unwrap();
    let conf = cni_config(work.path());
    let mut c = Containerd::start_with(Options {
        cri: Some((cni_bin.to_path_buf(), conf)),
        ..Default::default()
    });
    // CRI's images live in k8s.io; the sandbox image is the test image too.
    let ns = std::mem::replace(&mut c.ns, K8S_NS.into());
    c.import(&util::image_archive(c.dir.path(), IMAGE, &[]));
    // A second container of the pod runs another image, on its own root in the same VM.
    c.import(&util::image_archive(
        c.dir.path(),
        CURL_IMAGE,
        &["/usr/bin/curl"],
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let socket = c.socket.clone();
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let t0 = Instant::now();
    let log_of = |what: &str| format!("{what}\n{}", c.tail_log());
    let (pod, sandbox_config) = rt.block_on(async {
        let mut cri = client(&socket).await;
        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "agent".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "agent-pod".into(),
            log_directory: logs.display().to_string(),
            annotations: [
                (
                    "airlock.io/secrets".to_string(),
                    "API_KEY@api.example.com".to_string(),
                ),
                ("airlock.io/memory".to_string(), "384".to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let pod = cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: "airlock".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("{}", log_of(&format!("RunPodSandbox: {e}"))))
            .into_inner()
            .pod_sandbox_id;
        (pod, sandbox_config)
    });
    let result = rt.block_on(async {
        let mut cri = client(&socket).await;
        let created = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "main".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: IMAGE.into(),
                        ..Default::default()
                    }),
                    command: vec!["sh".into(), "-c".into(), "echo started; sleep 1000".into()],
                    envs: vec![
                        KeyValue { key: "API_KEY".into(), value: SECRET.into() },
                        KeyValue { key: "MODE".into(), value: "cri".into() },
                    ],
                    working_dir: "/home".into(),
                    log_path: "main.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .map_err(|e| format!("CreateContainer: {e}"))?
            .into_inner()
            .container_id;
        cri.start_container(StartContainerRequest { container_id: created.clone() })
            .await
            .map_err(|e| format!("StartContainer: {e}"))?;
        let started = t0.elapsed();
        let status = cri
            .container_status(ContainerStatusRequest { container_id: created.clone(), verbose: false })
            .await
            .map_err(|e| format!("ContainerStatus: {e}"))?
            .into_inner()
            .status
            .ok_or("no status")?;
        if status.state != ContainerState::ContainerRunning as i32 {
            return Err(format!("state {}", status.state));
        }
        let out = cri
            .exec_sync(ExecSyncRequest {
                container_id: created.clone(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo mode=$MODE key=$API_KEY cwd=$(pwd) host=$(hostname); cat /etc/motd; exit 4".into(),
                ],
                timeout: 60,
            })
            .await
            .map_err(|e| format!("ExecSync: {e}"))?
            .into_inner();
        // The sidecar: created after the VM booted, its rootfs bound into the pod directory
        // the VM already shares.
        let side = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata { name: "side".into(), attempt: 0 }),
                    image: Some(ImageSpec { image: CURL_IMAGE.into(), ..Default::default() }),
                    command: vec!["sleep".into(), "1000".into()],
                    log_path: "side.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .map_err(|e| format!("CreateContainer side: {e}"))?
            .into_inner()
            .container_id;
        cri.start_container(StartContainerRequest { container_id: side.clone() })
            .await
            .map_err(|e| format!("StartContainer side: {e}"))?;
        let roots = |id: String| {
            let mut cri = cri.clone();
            async move {
                let o = cri
                    .exec_sync(ExecSyncRequest {
                        container_id: id,
                        cmd: vec!["sh".into(), "-c".into(), "test -x /usr/bin/curl && echo curl || echo no-curl; uname -n".into()],
                        timeout: 60,
                    })
                    .await
                    .map_err(|e| format!("ExecSync: {e}"))?
                    .into_inner();
                Ok::<_, String>(text(&o.stdout))
            }
        };
        let main_root = roots(created.clone()).await?;
        let side_root = roots(side.clone()).await?;
        if !main_root.starts_with("no-curl\nagent-pod") || !side_root.starts_with("curl\nagent-pod") {
            return Err(format!("roots: main {main_root:?} side {side_root:?}"));
        }
        Ok::<_, String>((created, out, started))
    });
    let (container, out, started) = match result {
        Ok(r) => r,
        Err(e) => panic!("{e}\n{}", c.tail_log()),
    };
    let stdout = text(&out.stdout);
    eprintln!("CRI pod start (RunPodSandbox to StartContainer done): {started:?}");
    assert_eq!(out.exit_code, 4, "{stdout} {}", text(&out.stderr));
    assert!(
        stdout.contains("mode=cri key=AIRLOCK_PLACEHOLDER_"),
        "{stdout}"
    );
    assert!(stdout.contains("cwd=/home host=agent-pod"), "{stdout}");
    assert!(stdout.contains("airlock demo (busybox)"), "{stdout}");
    assert!(!stdout.contains(SECRET));
    let (shim, vm) = {
        let shims = c.shim_pids();
        assert_eq!(shims.len(), 1, "one shim per pod: {shims:?}");
        let vms = util::children_named(shims[0], "qemu-system");
        assert_eq!(vms.len(), 1, "one VM per pod");
        (shims[0], vms[0])
    };
    // The container's output reaches its CRI log.
    let log = logs.join("main.log");
    c.wait_until(Duration::from_secs(10), "the container log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("started"))
    });

    rt.block_on(async {
        let mut cri = client(&socket).await;
        cri.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("StopPodSandbox");
        let st = cri
            .container_status(ContainerStatusRequest {
                container_id: container.clone(),
                verbose: false,
            })
            .await
            .expect("ContainerStatus")
            .into_inner()
            .status
            .unwrap();
        assert_eq!(st.state, ContainerState::ContainerExited as i32);
        cri.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    });
    c.wait_until(Duration::from_secs(10), "the VM to exit", || {
        !util::alive(vm)
    });
    c.wait_until(Duration::from_secs(20), "the shim to exit", || {
        !util::alive(shim)
    });
    let pod_dir = Path::new("/run/airlock-shim").join(K8S_NS).join(&pod);
    assert!(!pod_dir.exists(), "{} left behind", pod_dir.display());
    assert!(util::mounts_under(&c.dir.path().join("state"))
        .iter()
        .all(|m| !m.ends_with("rootfs")));
    c.ns = ns;
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The bench of docs/benchmarks.md (benches/shim-cri runs it): a pod started through CRI
/// until its container's `true` has exited, against `airlock run` of the same busybox image
/// (cold boot, and the default warm start), alternated in one run.
#[test]
#[ignore = "a benchmark: benches/shim-cri"]
fn bench_cri_pod_start_vs_airlock_run() {
    assert!(util::available(), "needs root and containerd");
    let iterations: usize = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let airlock = std::env::var("AIRLOCK_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo.join("target/release/airlock"));
    let out = std::process::Command::new(repo.join("scripts/mkimage-busybox"))
        .env("AIRLOCK_BIN", &airlock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkimage-busybox: {}",
        text(&out.stderr)
    );
    let work = tempfile::tempdir().unwrap();
    let conf = cni_config(work.path());
    let mut c = Containerd::start_with(Options {
        cri: Some((Path::new("/usr/lib/cni").to_path_buf(), conf)),
        ..Default::default()
    });
    let ns = std::mem::replace(&mut c.ns, K8S_NS.into());
    c.import(&util::image_archive(c.dir.path(), IMAGE, &[]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let cli = |cold: bool| {
        let mut cmd = std::process::Command::new(&airlock);
        cmd.args(["run", "--image", "demo/busybox:latest"]);
        if cold {
            cmd.arg("--cold");
        }
        cmd.args(["--", "true"]);
        let t = Instant::now();
        let out = util::output_within(&mut cmd, Duration::from_secs(120));
        assert!(out.status.success(), "airlock run: {}", text(&out.stderr));
        t.elapsed()
    };
    // The warm template is made by the first warm run: not timed.
    cli(false);
    let (mut pods, mut colds, mut warms) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        let socket = c.socket.clone();
        let logs = logs.clone();
        pods.push(rt.block_on(async move {
            let mut cri = client(&socket).await;
            let config = PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: format!("bench{i}"),
                    uid: format!("uid-{i}"),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                log_directory: logs.display().to_string(),
                ..Default::default()
            };
            let t = Instant::now();
            let pod = cri
                .run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: "airlock".into(),
                })
                .await
                .expect("RunPodSandbox")
                .into_inner()
                .pod_sandbox_id;
            let id = cri
                .create_container(CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(ContainerConfig {
                        metadata: Some(ContainerMetadata {
                            name: "main".into(),
                            attempt: 0,
                        }),
                        image: Some(ImageSpec {
                            image: IMAGE.into(),
                            ..Default::default()
                        }),
                        command: vec!["true".into()],
                        log_path: format!("main{i}.log"),
                        ..Default::default()
                    }),
                    sandbox_config: Some(config),
                })
                .await
                .expect("CreateContainer")
                .into_inner()
                .container_id;
            cri.start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("StartContainer");
            loop {
                let st = cri
                    .container_status(ContainerStatusRequest {
                        container_id: id.clone(),
                        verbose: false,
                    })
                    .await
                    .expect("ContainerStatus")
                    .into_inner()
                    .status
                    .unwrap();
                if st.state == ContainerState::ContainerExited as i32 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let took = t.elapsed();
            cri.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .expect("StopPodSandbox");
            cri.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .expect("RemovePodSandbox");
            took
        }));
        colds.push(cli(true));
        warms.push(cli(false));
    }
    let (p, cd, w) = (median(&mut pods), median(&mut colds), median(&mut warms));
    println!(
        "BENCH iterations={iterations} cri_pod_p50={:.0}ms airlock_run_cold_p50={:.0}ms airlock_run_warm_p50={:.0}ms cri/cold={:.2} cri/warm={:.2}",
        p.as_secs_f64() * 1e3,
        cd.as_secs_f64() * 1e3,
        w.as_secs_f64() * 1e3,
        p.as_secs_f64() / cd.as_secs_f64(),
        p.as_secs_f64() / w.as_secs_f64()
    );
    println!("BENCH cri_pod_all={pods:?} cold_all={colds:?} warm_all={warms:?}");
    c.ns = ns;
}
