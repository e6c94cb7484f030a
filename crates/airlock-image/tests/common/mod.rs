//! Shared helpers of the integration tests: real tools (umoci, skopeo, docker-registry),
//! installed with apt-get when missing. Tests fail loudly if that is impossible.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use sha2::{Digest, Sha256};

const TOOLS: &[(&str, &str)] = &[
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
];

fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Makes sure docker-registry, skopeo, umoci and a static busybox exist, installing the
/// Debian packages when one is missing. Panics (never skips) if they cannot be had.
pub fn ensure_tools() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut missing: Vec<&str> = TOOLS
            .iter()
            .filter(|(bin, _)| !have(bin))
            .map(|(_, pkg)| *pkg)
            .collect();
        if !Path::new("/bin/busybox").is_file() {
            missing.push("busybox-static");
        }
        if missing.is_empty() {
            return;
        }
        eprintln!("installing missing test tools: {missing:?}");
        let update = Command::new("apt-get").arg("update").status();
        assert!(
            matches!(update, Ok(s) if s.success()),
            "apt-get update failed ({update:?}); cannot install {missing:?} needed by the tests"
        );
        let status = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "apt-get install {missing:?} failed ({status:?}); these tests need real tools"
        );
        for (bin, _) in TOOLS {
            assert!(have(bin), "{bin} still missing after apt-get install");
        }
        assert!(Path::new("/bin/busybox").is_file(), "/bin/busybox missing");
    });
}

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Digests of the test images in an OCI layout built by [`build_layout`].
#[derive(Debug, Clone)]
pub struct Layout {
    /// The layout directory.
    pub dir: PathBuf,
    /// Manifest digest of the amd64 image (tag `bb`).
    pub amd64_manifest: String,
    /// Manifest digest of the arm64 image (tag `bb-arm`, same layer, other config).
    pub arm64_manifest: String,
    /// Digest of the two-platform index (tag `multi`).
    pub index: String,
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn ref_digest(dir: &Path, name: &str) -> (String, u64) {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let m = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("no {name} in index.json"));
    (
        m["digest"].as_str().unwrap().to_string(),
        m["size"].as_u64().unwrap(),
    )
}

/// Builds an OCI layout under `work` with umoci: a busybox image `bb` (linux/amd64; cmd,
/// env, workdir and user set), `bb-arm` (same layer, arm64 config) and `multi`, an image
/// index listing both with platforms.
pub fn build_layout(work: &Path) -> Layout {
    ensure_tools();
    let dir = work.join("layout");
    let bundle = work.join("bundle");
    let img = |tag: &str| format!("{}:{tag}", dir.display());
    run(Command::new("umoci").arg("init").arg("--layout").arg(&dir));
    run(Command::new("umoci").args(["new", "--image", &img("bb")]));
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &img("bb")])
        .arg(&bundle));
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", bin.join("sh")).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &img("bb")])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img("bb"),
        "--architecture",
        "amd64",
        "--os",
        "linux",
        "--config.cmd",
        "/bin/sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "echo hi",
        "--config.env",
        "FOO=bar",
        "--config.workingdir",
        "/tmp",
        "--config.user",
        "1000:1000",
    ]));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &img("bb"),
        "--tag",
        "bb-arm",
        "--architecture",
        "arm64",
    ]));
    let (amd64_manifest, amd64_size) = ref_digest(&dir, "bb");
    let (arm64_manifest, arm64_size) = ref_digest(&dir, "bb-arm");
    let entry = |d: &str, size: u64, arch: &str| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d, "size": size,
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry(&amd64_manifest, amd64_size, "amd64"), entry(&arm64_manifest, arm64_size, "arm64")],
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = sha256(&bytes);
    std::fs::write(dir.join("blobs/sha256").join(&index_digest[7..]), &bytes).unwrap();
    let idx_path = dir.join("index.json");
    let mut top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&idx_path).unwrap()).unwrap();
    top["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }));
    std::fs::write(&idx_path, serde_json::to_vec(&top).unwrap()).unwrap();
    Layout {
        dir,
        amd64_manifest,
        arm64_manifest,
        index: index_digest,
    }
}

/// `skopeo copy` with signature policy checks off.
pub fn skopeo_copy(args: &[&str]) {
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--quiet"])
        .args(args));
}

/// Every `blobs/sha256/<hex>` file of a store hashes to its name; returns the names.
pub fn check_store_blobs(root: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(root.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let data = std::fs::read(e.path()).unwrap();
        assert_eq!(
            sha256(&data),
            format!("sha256:{name}"),
            "corrupt blob in store"
        );
        names.push(format!("sha256:{name}"));
    }
    names.sort();
    names
}

/// Number of entries in the store's temp directory.
pub fn temp_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A running `docker-registry`; killed when dropped.
pub struct Registry {
    child: std::process::Child,
    /// Port on 127.0.0.1.
    pub port: u16,
    data: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        Registry::start_with(dir, "")
    }

    /// Starts a registry with extra top-level config (for example an `auth:` section).
    pub fn start_with(dir: &Path, extra_config: &str) -> Registry {
        ensure_tools();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let data = dir.join("registry-data");
        std::fs::create_dir_all(&data).unwrap();
        let cfg = dir.join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra_config}",
                data.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve")
            .arg(&cfg)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Belt and braces: the registry dies with the test process even if Drop never runs.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start docker-registry");
        let reg = Registry { child, port, data };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut resp = String::new();
                let _ = s.read_to_string(&mut resp);
                if matches!(resp.split_whitespace().nth(1), Some("200" | "401")) {
                    break;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not answer on 127.0.0.1:{port}: {}",
                std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        reg
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Path of a blob's data in the registry's filesystem storage.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}
