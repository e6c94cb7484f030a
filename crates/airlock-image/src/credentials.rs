//! Registry credentials from the user's Docker config, as docker finds them: a per-registry
//! `credHelpers` entry, else the `credsStore` helper, else the inline `auths` entry.
//!
//! Helpers are docker's external programs (`docker-credential-NAME get`, the server address
//! on stdin, `{"Username","Secret"}` JSON on stdout). Hand-written rather than the
//! `docker_credential` crate, which reads only the default config path and waits on a helper
//! without a time limit.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::error::{Error, Result};

/// How long a helper may take (a keychain may be slow to unlock, never forever).
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes read from a helper's stdout or stderr.
const HELPER_OUTPUT_MAX: u64 = 64 * 1024;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::HashMap<String, DockerAuth>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

fn default_docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Normalizes an `auths` key (`https://index.docker.io/v1/`, `host:port`, …) to a registry.
fn normalize_auth_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        other => other.to_string(),
    }
}

/// Credentials for `registry` from the Docker config at `path` (default `$DOCKER_CONFIG/
/// config.json` or `~/.docker/config.json`); no file, or nothing for the registry, is
/// anonymous access.
pub(crate) fn docker_credentials(path: Option<&Path>, registry: &str) -> Result<RegistryAuth> {
    credentials_with_path(path, registry, std::env::var_os("PATH"))
}

/// [`docker_credentials`], finding helpers in `search` (a `PATH` value).
fn credentials_with_path(
    path: Option<&Path>,
    registry: &str,
    search: Option<OsString>,
) -> Result<RegistryAuth> {
    let Some(path) = path.map(Path::to_path_buf).or_else(default_docker_config) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    };
    let cred_err = |reason: String| Error::Credentials {
        path: path.clone(),
        reason,
    };
    let cfg: DockerConfig =
        serde_json::from_slice(&data).map_err(|e| cred_err(format!("not valid JSON: {e}")))?;
    let helper = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_auth_key(k) == registry)
        .map(|(_, v)| (v.clone(), "credHelpers"))
        .or_else(|| {
            cfg.creds_store
                .clone()
                .filter(|s| !s.is_empty())
                .map(|s| (s, "credsStore"))
        });
    if let Some((name, key)) = helper {
        return from_helper(&name, key, registry, search.as_deref()).map_err(cred_err);
    }
    let Some(entry) = cfg
        .auths
        .iter()
        .find(|(k, _)| normalize_auth_key(k) == registry)
        .map(|(_, v)| v)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| cred_err(format!("auths.{registry}.auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| cred_err(format!("auths.{registry}.auth is not UTF-8")))?;
        let (u, p) = text
            .split_once(':')
            .ok_or_else(|| cred_err(format!("auths.{registry}.auth is not user:password")))?;
        return Ok(RegistryAuth::Basic(u.to_string(), p.to_string()));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// Asks `docker-credential-NAME get` for `registry`'s credentials. "Not found" is anonymous
/// access, as in docker; everything else that goes wrong is an error saying what to do.
fn from_helper(
    name: &str,
    key: &str,
    registry: &str,
    search: Option<&std::ffi::OsStr>,
) -> std::result::Result<RegistryAuth, String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "{key} names {name:?}, which is not a credential helper name"
        ));
    }
    let program = format!("docker-credential-{name}");
    let exe = search
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(&program))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            format!(
                "{key} uses {program}, which is not on PATH: install it, or remove the \
                 {key} entry to use the auths in the file"
            )
        })?;
    // Docker Hub is stored under its historical address; others under host[:port].
    let server = if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    let mut child = Command::new(&exe)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading gives EPIPE here; its status says more.
        let _ = stdin.write_all(server.as_bytes());
    }
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        let mut e = Vec::new();
        if let Some(s) = out.as_mut() {
            let _ = s.take(HELPER_OUTPUT_MAX).read_to_end(&mut o);
        }
        if let Some(s) = err.as_mut() {
            let _ = s.take(HELPER_OUTPUT_MAX).read_to_end(&mut e);
        }
        (o, e)
    });
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{program} get did not answer within {} s",
                    HELPER_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("{program}: {e}")),
        }
    };
    let (stdout, stderr) = reader.join().unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(if stdout.is_empty() { &stderr } else { &stdout });
        let said = said.trim();
        if said.to_ascii_lowercase().contains("credentials not found") {
            return Ok(RegistryAuth::Anonymous);
        }
        let said: String = said.chars().take(300).collect();
        return Err(format!("{program} get failed ({status}): {said}"));
    }
    let answer: HelperAnswer = serde_json::from_slice(&stdout)
        .map_err(|e| format!("{program} get answered something that is not its JSON: {e}"))?;
    if answer.username == "<token>" {
        return Err(format!(
            "{program} holds an identity token for {registry}, which Airlock cannot use yet: \
             log in with a username and password or an access token (docker login -u USER)"
        ));
    }
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(RegistryAuth::Anonymous);
    }
    Ok(RegistryAuth::Basic(answer.username, answer.secret))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}},
                "reg.example:5000":{{"username":"bob","password":"pw"}}}}}}"#
            ),
        )
        .unwrap();
        match docker_credentials(Some(&path), "docker.io").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("alice", "s3:cret")),
            _ => panic!("expected basic auth"),
        }
        match docker_credentials(Some(&path), "reg.example:5000").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("bob", "pw")),
            _ => panic!("expected basic auth"),
        }
        assert!(matches!(
            docker_credentials(Some(&path), "ghcr.io").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(matches!(
            docker_credentials(Some(&dir.path().join("missing.json")), "ghcr.io").unwrap(),
            RegistryAuth::Anonymous
        ));
        std::fs::write(&path, r#"{"auths":{"ghcr.io":{"auth":"!!!"}}}"#).unwrap();
        assert!(matches!(
            docker_credentials(Some(&path), "ghcr.io"),
            Err(Error::Credentials { .. })
        ));
    }

    /// A real helper program, speaking docker's protocol from a shell script.
    fn helper(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn helpers_as_docker_uses_them() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // Answers only for the address it is asked about, as a keychain does.
        helper(
            &bin,
            "store",
            r#"[ "$1" = get ] || exit 2; read -r addr
case "$addr" in
  reg.example:5000) echo '{"ServerURL":"reg.example:5000","Username":"bob","Secret":"from-store"}' ;;
  https://index.docker.io/v1/) echo '{"Username":"hub","Secret":"hub-pw"}' ;;
  tok.example) echo '{"Username":"<token>","Secret":"x"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac"#,
        );
        helper(
            &bin,
            "special",
            r#"read -r addr; echo "{\"Username\":\"sp\",\"Secret\":\"$addr\"}""#,
        );
        helper(&bin, "broken", "echo 'keychain locked' >&2; exit 3");
        helper(&bin, "garbage", "echo not-json");
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"credsStore":"store","credHelpers":{"special.example":"special","bad.example":"broken","junk.example":"garbage","none.example":"absent"},
               "auths":{"reg.example:5000":{"auth":"aWdub3JlZDppZ25vcmVk"}}}"#,
        )
        .unwrap();
        let get = |reg: &str| credentials_with_path(Some(&path), reg, Some(bin.clone().into()));
        let basic = |r: Result<RegistryAuth>| match r {
            Ok(RegistryAuth::Basic(u, p)) => (u, p),
            other => panic!("expected basic auth, got {other:?}"),
        };
        // credsStore wins over auths; Docker Hub is asked by its historical address.
        assert_eq!(
            basic(get("reg.example:5000")),
            ("bob".into(), "from-store".into())
        );
        assert_eq!(basic(get("docker.io")), ("hub".into(), "hub-pw".into()));
        // credHelpers wins over credsStore, and gets the registry on stdin.
        assert_eq!(
            basic(get("special.example")),
            ("sp".into(), "special.example".into())
        );
        // Not found in the store: anonymous, as docker.
        assert!(matches!(get("other.example"), Ok(RegistryAuth::Anonymous)));
        let err = |r: Result<RegistryAuth>| match r {
            Err(Error::Credentials { reason, .. }) => reason,
            other => panic!("expected an error, got {other:?}"),
        };
        assert!(err(get("bad.example")).contains("keychain locked"));
        assert!(err(get("junk.example")).contains("not its JSON"));
        assert!(err(get("none.example")).contains("docker-credential-absent, which is not on PATH"));
        assert!(err(get("tok.example")).contains("identity token"));
    }
}
