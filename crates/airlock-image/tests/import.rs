//! Import tests: real `skopeo copy` archives (oci-archive, docker-archive) and hostile
//! tarballs built here with the `tar` crate.

mod common;

use std::io::{Cursor, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use airlock_image::{import, Error, Reference, Store};
use common::*;

fn assert_empty_store(store: &Store) {
    assert!(store.list().unwrap().is_empty());
    assert!(
        check_store_blobs(store.root()).is_empty(),
        "blobs were stored"
    );
    assert_eq!(temp_files(store.root()), 0, "temp files left");
}

#[test]
fn import_skopeo_archives() {
    let work = tempfile::tempdir().unwrap();
    let layout = build_layout(work.path());
    let oci = |tag: &str| format!("oci:{}:{tag}", layout.dir.display());
    let store = Store::open(work.path().join("store")).unwrap();

    // OCI archive from a file: digests are preserved exactly.
    let oci_tar = work.path().join("bb-oci.tar");
    skopeo_copy(&[&oci("bb"), &format!("oci-archive:{}:bb", oci_tar.display())]);
    let rec = import(
        &store,
        "imported/bb:oci",
        std::fs::File::open(&oci_tar).unwrap(),
    )
    .unwrap();
    assert_eq!(rec.reference, "docker.io/imported/bb:oci");
    assert_eq!(rec.manifest_digest, layout.amd64_manifest);
    assert_eq!(rec.layers.len(), 1);
    let cfg = store.image_config(&rec).unwrap();
    assert_eq!(cfg.cmd(), ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(cfg.user(), Some("1000:1000"));
    let blobs = check_store_blobs(store.root());
    assert_eq!(blobs.len(), 3);
    assert_eq!(temp_files(store.root()), 0);

    // The same archive, gzip-compressed as a whole, read from a pipe (like stdin).
    let gz = work.path().join("bb-oci.tar.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "gzip -c {} > {}",
        oci_tar.display(),
        gz.display()
    )));
    let mut cat = Command::new("cat")
        .arg(&gz)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rec_gz = import(&store, "imported/bb:gz", cat.stdout.take().unwrap()).unwrap();
    cat.wait().unwrap();
    assert_eq!(rec_gz.manifest_digest, layout.amd64_manifest);

    // docker-archive (docker save format, uncompressed layers), from a pipe.
    let docker_tar = work.path().join("bb-docker.tar");
    skopeo_copy(&[
        &oci("bb"),
        &format!("docker-archive:{}:test/bb:1", docker_tar.display()),
    ]);
    let mut cat = Command::new("cat")
        .arg(&docker_tar)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rec_d = import(&store, "imported/bb:docker", cat.stdout.take().unwrap()).unwrap();
    cat.wait().unwrap();
    assert_eq!(rec_d.layers.len(), 1);
    assert_eq!(
        rec_d.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar"
    );
    let cfg_json: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&rec_d.config_digest).unwrap()).unwrap();
    assert_eq!(
        cfg_json["rootfs"]["diff_ids"][0].as_str().unwrap(),
        rec_d.layers[0].digest,
        "uncompressed layer digest is its diff_id"
    );
    let cfg = store.image_config(&rec_d).unwrap();
    assert_eq!(cfg.cmd(), ["/bin/sh", "-c", "echo hi"]);
    assert!(cfg.env().iter().any(|e| e == "FOO=bar"));
    assert_eq!(cfg.working_dir(), Some("/tmp"));
    check_store_blobs(store.root());
    assert_eq!(store.list().unwrap().len(), 3);
    let r = Reference::parse("imported/bb:docker").unwrap();
    assert_eq!(
        store.resolve(&r).unwrap().manifest_digest,
        rec_d.manifest_digest
    );

    // A multi-image OCI archive: the tag picks by ref.name annotation.
    let multi_tar = work.path().join("multi.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&multi_tar)
        .arg("-C")
        .arg(&layout.dir)
        .arg("."));
    let other = Store::open(work.path().join("other")).unwrap();
    let rec_m = import(
        &other,
        "x/y:multi",
        std::fs::File::open(&multi_tar).unwrap(),
    )
    .unwrap();
    assert_eq!(rec_m.manifest_digest, layout.amd64_manifest);
    assert_eq!(rec_m.index_digest.as_deref(), Some(layout.index.as_str()));
    let rec_a = import(
        &other,
        "x/y:bb-arm",
        std::fs::File::open(&multi_tar).unwrap(),
    )
    .unwrap();
    assert_eq!(rec_a.manifest_digest, layout.arm64_manifest);
    assert_eq!(rec_a.platform.architecture, "arm64");
}

// ----- hostile tarballs -----

/// Appends a raw entry, bypassing the tar crate's path checks (hostile names allowed).
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    kind: tar::EntryType,
    name: &str,
    link: &str,
    data: &[u8],
) {
    let mut h = tar::Header::new_old();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    raw_entry(b, tar::EntryType::Regular, name, "", data);
}

/// A small but valid OCI layout, as (path, bytes) pairs, plus its manifest digest.
fn valid_oci_files() -> (Vec<(String, Vec<u8>)>, String) {
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let layer_d = sha256(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_d]},
    }))
    .unwrap();
    let config_d = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_d, "size": layer.len()}],
    }))
    .unwrap();
    let manifest_d = sha256(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_d, "size": manifest.len()}],
    }))
    .unwrap();
    let blob = |d: &str| format!("blobs/sha256/{}", &d[7..]);
    (
        vec![
            (
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".into(), index),
            (blob(&manifest_d), manifest),
            (blob(&config_d), config),
            (blob(&layer_d), layer),
        ],
        manifest_d,
    )
}

fn tar_of(files: &[(String, Vec<u8>)], extra: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        file(&mut b, name, data);
    }
    extra(&mut b);
    b.into_inner().unwrap()
}

fn try_import(dir: &Path, data: Vec<u8>) -> (Store, Result<airlock_image::ImageRecord, Error>) {
    let store = Store::open(dir.join("store")).unwrap();
    let r = import(&store, "hostile:1", Cursor::new(data));
    (store, r)
}

#[test]
fn hand_built_layout_imports() {
    let dir = tempfile::tempdir().unwrap();
    let (files, manifest_d) = valid_oci_files();
    // With a harmless in-archive symlink and a leading "./" on names.
    let files: Vec<_> = files
        .into_iter()
        .map(|(n, d)| (format!("./{n}"), d))
        .collect();
    let data = tar_of(&files, |b| {
        raw_entry(
            b,
            tar::EntryType::Symlink,
            "extra/link",
            "../index.json",
            b"",
        )
    });
    let (store, r) = try_import(dir.path(), data);
    let rec = r.unwrap();
    assert_eq!(rec.manifest_digest, manifest_d);
    assert_eq!(store.image_config(&rec).unwrap().cmd(), ["/hello"]);
    assert_eq!(check_store_blobs(store.root()).len(), 3);
    assert_eq!(temp_files(store.root()), 0);
}

#[test]
fn hostile_paths_are_rejected_without_writing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("escaped");
    let (files, _) = valid_oci_files();
    type Extra = Box<dyn FnOnce(&mut tar::Builder<Vec<u8>>)>;
    let cases: Vec<(&str, Extra)> = vec![
        ("dotdot", Box::new(|b| file(b, "../../escaped", b"pwned"))),
        (
            "nested dotdot",
            Box::new(|b| file(b, "blobs/../../escaped", b"pwned")),
        ),
        (
            "absolute",
            Box::new({
                let p = canary.display().to_string();
                move |b| file(b, &p, b"pwned")
            }),
        ),
        (
            "symlink out",
            Box::new(|b| {
                raw_entry(
                    b,
                    tar::EntryType::Symlink,
                    "evil",
                    "../../../etc/passwd",
                    b"",
                )
            }),
        ),
        (
            "absolute symlink",
            Box::new(|b| raw_entry(b, tar::EntryType::Symlink, "evil", "/etc/passwd", b"")),
        ),
        (
            "hardlink out",
            Box::new(|b| raw_entry(b, tar::EntryType::Link, "evil", "../escaped", b"")),
        ),
    ];
    for (name, extra) in cases {
        let sub = dir.path().join(name.replace(' ', "_"));
        let (store, r) = try_import(&sub, tar_of(&files, extra));
        let err = r.expect_err(name);
        assert!(matches!(err, Error::InvalidArchive(_)), "{name}: {err}");
        assert_empty_store(&store);
        assert!(!canary.exists(), "{name}: wrote outside the store");
        assert!(!dir.path().parent().unwrap().join("escaped").exists());
    }
}

#[test]
fn hostile_links_replacing_metadata_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (files, _) = valid_oci_files();
    // index.json is a symlink to /etc/passwd: never followed on disk.
    let without_index: Vec<_> = files
        .iter()
        .filter(|(n, _)| n != "index.json")
        .cloned()
        .collect();
    let data = tar_of(&without_index, |b| {
        raw_entry(b, tar::EntryType::Symlink, "index.json", "/etc/passwd", b"")
    });
    let (store, r) = try_import(dir.path(), data);
    assert!(r.is_err());
    assert_empty_store(&store);

    // A blob path that is a symlink to a host file is rejected the same way.
    let dir2 = tempfile::tempdir().unwrap();
    let (files, _) = valid_oci_files();
    let (last, rest) = files.split_last().unwrap();
    let data = tar_of(rest, |b| {
        raw_entry(b, tar::EntryType::Symlink, &last.0, "/etc/hostname", b"")
    });
    let (store, r) = try_import(dir2.path(), data);
    assert!(r.is_err());
    assert_empty_store(&store);
}

#[test]
fn digest_mismatch_in_archive_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut files, _) = valid_oci_files();
    // Corrupt the layer (last file) but keep its name.
    let last = files.last_mut().unwrap();
    let n = last.1.len();
    last.1[n / 2] ^= 0xff;
    let (store, r) = try_import(dir.path(), tar_of(&files, |_| {}));
    let err = r.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_empty_store(&store);

    // docker-save style archive whose layer does not match the config's diff_id.
    let dir = tempfile::tempdir().unwrap();
    let config = br#"{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
    let manifest = br#"[{"Config":"config.json","RepoTags":["a:b"],"Layers":["l/layer.tar"]}]"#;
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "manifest.json", manifest);
    file(&mut b, "config.json", config);
    file(&mut b, "l/layer.tar", &[0u8; 1024]);
    let (store, r) = try_import(dir.path(), b.into_inner().unwrap());
    let err = r.unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_empty_store(&store);
}

#[test]
fn garbage_input_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (store, r) = try_import(dir.path(), b"definitely not a tar archive".repeat(40));
    assert!(r.is_err());
    assert_empty_store(&store);
    let (store, r) = try_import(dir.path(), Vec::new());
    assert!(r.is_err());
    assert_empty_store(&store);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"garbage inside gzip").unwrap();
    let (store, r) = try_import(dir.path(), gz.finish().unwrap());
    assert!(r.is_err());
    assert_empty_store(&store);
}
