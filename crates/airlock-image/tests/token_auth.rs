//! Pulling from a registry that demands a bearer token: Debian's docker-registry with `auth:
//! token`, and a token server of ours on loopback that checks Basic credentials and issues ES256
//! JWTs (x5c header, self-signed certificate the registry trusts). Credentials come from a
//! Docker config file, as a user's would.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{SystemTime, UNIX_EPOCH};

use airlock_image::{pull, PullOptions, Reference, Store};
use base64::Engine;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};

const USER: &str = "alice";
const PASS: &str = "s3cret";

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Serves `GET /token?...&scope=repository:NAME:ACTIONS` on a thread: Basic auth must match.
fn token_server(key: EcdsaKeyPair, cert_der: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rng = ring::rand::SystemRandom::new();
        for conn in l.incoming().take(200) {
            let Ok(mut s) = conn else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut auth = String::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h
                    .split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                {
                    auth = v.1.trim().to_string();
                }
            }
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"))
            );
            if auth != want {
                let _ = s.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
            let mut access = Vec::new();
            for kv in query.split('&') {
                if let Some(scope) = kv.strip_prefix("scope=") {
                    let scope = scope
                        .replace("%3A", ":")
                        .replace("%2F", "/")
                        .replace("%2C", ",");
                    let parts: Vec<&str> = scope.split(':').collect();
                    if parts.len() == 3 {
                        access.push(serde_json::json!({"type": parts[0], "name": parts[1], "actions": parts[2].split(',').collect::<Vec<_>>()}));
                    }
                }
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [base64::engine::general_purpose::STANDARD.encode(&cert_der)]});
            let claims = serde_json::json!({"iss": "airlock-test", "sub": USER, "aud": "airlock-registry", "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()), "access": access});
            let signing_input = format!(
                "{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(claims.to_string().as_bytes())
            );
            let sig = key.sign(&rng, signing_input.as_bytes()).unwrap();
            let token = format!("{signing_input}.{}", b64url(sig.as_ref()));
            let body =
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300})
                    .to_string();
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_a_registry_that_needs_a_token() {
    let work = tempfile::tempdir().unwrap();
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let _ = key.public_key();
    let kp = rcgen::KeyPair::try_from(pkcs8.as_ref()).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["airlock-token".to_string()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let bundle = work.path().join("token.pem");
    std::fs::write(&bundle, cert.pem()).unwrap();
    let token_port = token_server(key, cert.der().to_vec());

    let auth = format!(
        "auth:\n  token:\n    realm: http://127.0.0.1:{token_port}/token\n    service: airlock-registry\n    issuer: airlock-test\n    rootcertbundle: {}\n",
        bundle.display()
    );
    let reg = common::Registry::start_with(work.path(), &auth);
    let layout = common::build_layout(work.path());
    let image = format!("{}/secure/bb:1", reg.host());
    common::skopeo_copy(&[
        "--dest-tls-verify=false",
        &format!("--dest-creds={USER}:{PASS}"),
        &format!("oci:{}:bb", layout.dir.display()),
        &format!("docker://{image}"),
    ]);

    let store = Store::open(work.path().join("store")).unwrap();
    let reference = Reference::parse(&image).unwrap();
    // No credentials: the token server refuses, the pull fails cleanly, nothing is stored.
    let none = PullOptions {
        docker_config: Some(work.path().join("no-config.json")),
        ..Default::default()
    };
    assert!(pull(&store, &reference, &none).await.is_err());
    assert!(store.list().unwrap().is_empty());
    // Credentials from a Docker config file: the bearer-token dance succeeds.
    let cfg = work.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    std::fs::write(
        &cfg,
        serde_json::json!({"auths": {reg.host(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let with = PullOptions {
        docker_config: Some(cfg),
        ..Default::default()
    };
    let rec = pull(&store, &reference, &with).await.unwrap();
    assert_eq!(rec.manifest_digest, layout.amd64_manifest);

    // The same credentials from a docker credential helper (credsStore), as docker finds
    // them: a real program on PATH answering `get` for the registry's address.
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let helper = bin.join("docker-credential-airlocktest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r addr\n[ \"$addr\" = \"{}\" ] || \
             {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             echo '{{\"ServerURL\":\"'$addr'\",\"Username\":\"{USER}\",\"Secret\":\"{PASS}\"}}'\n",
            reg.host()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The only test in this binary: nothing else reads PATH concurrently.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.clone()];
    dirs.extend(std::env::split_paths(&path));
    std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());
    let cfg = work.path().join("helper.json");
    std::fs::write(&cfg, r#"{"credsStore":"airlocktest"}"#).unwrap();
    let store = Store::open(work.path().join("store2")).unwrap();
    let via_helper = PullOptions {
        docker_config: Some(cfg.clone()),
        ..Default::default()
    };
    let rec = pull(&store, &reference, &via_helper).await.unwrap();
    assert_eq!(rec.manifest_digest, layout.amd64_manifest);
    // A helper without credentials for the registry: anonymous, which the registry refuses.
    std::fs::write(
        &cfg,
        r#"{"credHelpers":{"127.0.0.1:1":"airlocktest"},"credsStore":"missing"}"#,
    )
    .unwrap();
    let err = pull(
        &Store::open(work.path().join("store3")).unwrap(),
        &reference,
        &via_helper,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("docker-credential-missing, which is not on PATH"),
        "{err}"
    );
}
