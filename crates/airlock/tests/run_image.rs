//! `airlock run --image`: images built here layer by layer (tar crate), imported as OCI
//! archives, and booted for real. Checks that the root filesystem is exactly what the layers
//! say (owners, setuid, hardlinks, devices, whiteouts, opaque directories) and that the image
//! config (Cmd, Entrypoint, Env, WorkingDir, User) is honoured.

mod util;
use util::text;

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

mod debian;

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn header(
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// One layer: (path, kind, mode, uid, gid, data or link target).
type Entry<'a> = (&'a str, tar::EntryType, u32, u64, u64, &'a str);

fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, mode, uid, gid, data) in entries {
        match kind {
            tar::EntryType::Regular => {
                let mut h = header(path, *kind, *mode, *uid, *gid, data.len() as u64);
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let mut h = header(path, *kind, *mode, *uid, *gid, 0);
                h.set_link_name(data).unwrap();
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            tar::EntryType::Char => {
                let mut h = header(path, *kind, *mode, *uid, *gid, 0);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
            _ => {
                let mut h = header(path, *kind, *mode, *uid, *gid, 0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// Writes an OCI archive with `layers` and `config` (the "config" object of the image config).
fn oci_archive(dest: &Path, layers: &[Vec<u8>], config: serde_json::Value) {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        diff_ids.push(digest(l));
        let gz = gzip(l);
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest(&gz), "size": gz.len(),
        }));
        blobs.push((digest(&gz), gz));
    }
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&cfg), "size": cfg.len()},
        "layers": descs,
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "t"},
        }],
    }))
    .unwrap();
    blobs.push((digest(&cfg), cfg));
    blobs.push((digest(&manifest), manifest));
    let mut b = tar::Builder::new(std::fs::File::create(dest).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = header(
            name,
            tar::EntryType::Regular,
            0o644,
            0,
            0,
            data.len() as u64,
        );
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (d, data) in &blobs {
        add(
            &format!("blobs/sha256/{}", d.trim_start_matches("sha256:")),
            data,
        );
    }
    b.finish().unwrap();
}

fn airlock(data: &Path, rt: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .env("AIRLOCK_DATA_DIR", data)
        .env("AIRLOCK_RUNTIME_DIR", rt)
        .output()
        .unwrap()
}

/// Imports `archive` as `name` into a store under `work`; returns (data dir, runtime dir).
fn import(work: &Path, name: &str, archive: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (data, rt) = (work.join("data"), work.join("rt"));
    let out = airlock(
        &data,
        &rt,
        &["image", "import", name, archive.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    (data, rt)
}

#[test]
fn image_layers_come_out_exactly_and_config_is_honoured() {
    use tar::EntryType::{Char, Directory as Dir, Link, Regular as File, Symlink};
    let busybox =
        std::fs::read("/bin/busybox").expect("busybox-static (scripts/setup installs it)");
    let base = {
        let mut b = tar::Builder::new(Vec::new());
        for (p, k, m) in [
            ("bin/", Dir, 0o755),
            ("etc/", Dir, 0o755),
            ("data/", Dir, 0o755),
            ("data/old/", Dir, 0o755),
            ("home/", Dir, 0o755),
            ("home/alice/", Dir, 0o700),
        ] {
            let mut h = header(p, k, m, 0, 0, 0);
            if p == "home/alice/" {
                h.set_uid(1000);
                h.set_gid(1000);
            }
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        let mut h = header("bin/busybox", File, 0o755, 0, 0, busybox.len() as u64);
        h.set_cksum();
        b.append(&h, busybox.as_slice()).unwrap();
        for app in ["sh", "stat", "cat", "ls", "id", "pwd", "echo", "test"] {
            let mut h = header(&format!("bin/{app}"), Symlink, 0o777, 0, 0, 0);
            h.set_link_name("busybox").unwrap();
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.into_inner().unwrap()
    };
    let files = layer(&[
        (
            "etc/passwd",
            File,
            0o644,
            0,
            0,
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        ),
        ("etc/group", File, 0o644, 0, 0, "root:x:0:\nalice:x:1000:\n"),
        ("usr/bin/su-thing", File, 0o4755, 0, 0, "#!/bin/sh\n"),
        ("usr/bin/alias", Link, 0o4755, 0, 0, "usr/bin/su-thing"),
        ("srv/owned", File, 0o640, 1000, 100, "mine"),
        ("srv/null", Char, 0o666, 0, 0, ""),
        ("data/gone", File, 0o644, 0, 0, "x"),
        ("data/old/inner", File, 0o644, 0, 0, "x"),
        ("abs-link", Symlink, 0o777, 0, 0, "/etc/passwd"),
    ]);
    let top = layer(&[
        ("data/.wh.gone", File, 0o644, 0, 0, ""),
        ("data/old/new", File, 0o644, 0, 0, "kept"),
        ("data/old/.wh..wh..opq", File, 0o644, 0, 0, ""),
    ]);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("img.tar");
    oci_archive(
        &archive,
        &[base, files, top],
        serde_json::json!({
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo \"$GREETING from $(pwd) as $(id -u)\""],
            "Env": ["PATH=/bin:/usr/bin", "GREETING=hi"],
            "WorkingDir": "/home/alice",
            "User": "alice",
        }),
    );
    let (data, rt) = import(work.path(), "test/exact:1", &archive);

    // The image's own command, env, workdir and user.
    let out = airlock(&data, &rt, &["run", "--image", "test/exact:1"]);
    assert_eq!(
        text(&out.stdout),
        "hi from /home/alice as 1000\n",
        "{}",
        text(&out.stderr)
    );

    // Overrides, and the tree exactly as the layers say.
    let script = "stat -c '%a %u:%g %h %F %t,%T %n' /usr/bin/su-thing /usr/bin/alias /srv/owned /srv/null; \
                  cat /abs-link | head -n1; ls /data; ls /data/old; test -e /lost+found && echo lost+found";
    let out = airlock(
        &data,
        &rt,
        &[
            "run",
            "--image",
            "test/exact:1",
            "-u",
            "root",
            "-e",
            "GREETING=yo",
            "--",
            script,
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "4755 0:0 2 regular file 0,0 /usr/bin/su-thing\n\
         4755 0:0 2 regular file 0,0 /usr/bin/alias\n\
         640 1000:100 1 regular file 0,0 /srv/owned\n\
         666 0:0 1 character special file 1,3 /srv/null\n\
         root:x:0:0:root:/root:/bin/sh\n\
         old\n\
         new\n",
        "{}",
        text(&out.stderr)
    );
    let out = airlock(
        &data,
        &rt,
        &[
            "run",
            "--image",
            "test/exact:1",
            "--entrypoint",
            "/bin/echo",
            "--",
            "plain",
        ],
    );
    assert_eq!(text(&out.stdout), "plain\n", "{}", text(&out.stderr));

    // The built root is cached per manifest: a second image build is not needed.
    let cached: Vec<_> = std::fs::read_dir(data.join("images/rootfs"))
        .unwrap()
        .flatten()
        .collect();
    assert!(cached
        .iter()
        .any(|e| e.file_name().to_string_lossy().starts_with("oci-")));
}

#[test]
fn hostile_layer_is_refused_without_touching_the_host() {
    use tar::EntryType::Regular as File;
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    // set_path refuses "..", so write the name bytes directly.
    h.as_gnu_mut().unwrap().name[..22].copy_from_slice(b"../../../../tmp/pwned!");
    h.set_entry_type(File);
    h.set_mode(0o644);
    h.set_size(1);
    h.set_cksum();
    evil.append(&h, &b"x"[..]).unwrap();
    let evil = evil.into_inner().unwrap();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("evil.tar");
    oci_archive(&archive, &[evil], serde_json::json!({"Cmd": ["/bin/true"]}));
    let (data, rt) = import(work.path(), "test/evil:1", &archive);
    let out = airlock(&data, &rt, &["run", "--image", "test/evil:1"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains(".."), "{}", text(&out.stderr));
    assert!(!Path::new("/tmp/pwned!").exists());
}

/// A real Debian image (debootstrap: curl, python3, git, ca-certificates), built once by
/// scripts/mkimage-debian and cached between runs in the default store.
#[test]
fn debian_image_runs_real_tools() {
    debian::ensure_image();
    let rt = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["run", "--image", "demo/debian:bookworm", "-u", "nobody", "--", "sh", "-c"])
        .arg("python3 -c 'import ssl, sys; print(sys.version_info[:2] >= (3, 11), ssl.OPENSSL_VERSION[:7])'; \
              git --version | cut -d' ' -f1-2; curl --version | head -n1 | cut -d' ' -f1; \
              ls /etc/ssl/certs/ca-certificates.crt; id -un; ls -ld /usr/bin/passwd 2>/dev/null | cut -c1-10")
        .env("AIRLOCK_RUNTIME_DIR", rt.path())
        .output()
        .unwrap();
    assert_eq!(
        text(&out.stdout),
        "True OpenSSL\ngit version\ncurl\n/etc/ssl/certs/ca-certificates.crt\nnobody\n-rwsr-xr-x\n",
        "{}",
        text(&out.stderr)
    );
}
