//! Runtime configuration of an image (the `config` object of the image config blob).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The parts of an image configuration a runtime needs: what to run, where and as whom.
///
/// Read it with [`crate::Store::image_config`]. Field meanings follow the OCI image spec
/// (`config.Entrypoint`, `config.Cmd`, …); missing and `null` values read as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: Option<String>,
    user: Option<String>,
    os: String,
    architecture: String,
    variant: Option<String>,
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawImage {
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<RawConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

impl ImageConfig {
    /// Parses an image configuration JSON document (OCI or Docker).
    pub fn from_json(data: &[u8]) -> Result<ImageConfig> {
        let raw: RawImage =
            serde_json::from_slice(data).map_err(|e| Error::doc("image config", e))?;
        let c = raw.config.unwrap_or_default();
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: non_empty(c.working_dir),
            user: non_empty(c.user),
            os: raw.os.unwrap_or_default(),
            architecture: raw.architecture.unwrap_or_default(),
            variant: non_empty(raw.variant),
            labels: c.labels.unwrap_or_default(),
        })
    }

    /// `Entrypoint`: the executable (and leading arguments) of the container process.
    pub fn entrypoint(&self) -> &[String] {
        &self.entrypoint
    }

    /// `Cmd`: default arguments, appended to the entrypoint (or the command if none).
    pub fn cmd(&self) -> &[String] {
        &self.cmd
    }

    /// The default argv: entrypoint followed by cmd.
    pub fn command(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }

    /// `Env`: `KEY=value` strings, in image order.
    pub fn env(&self) -> &[String] {
        &self.env
    }

    /// `Env` split into `(key, value)` pairs; entries without `=` get an empty value.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }

    /// `WorkingDir`, if set.
    pub fn working_dir(&self) -> Option<&str> {
        self.working_dir.as_deref()
    }

    /// `User` (`name`, `uid`, `uid:gid`, …), if set.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// `Labels`.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// Operating system the image is built for (`linux`).
    pub fn os(&self) -> &str {
        &self.os
    }

    /// CPU architecture the image is built for (`amd64`, `arm64`, …).
    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    /// CPU variant (`v8`, …), if set.
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_style_config() {
        let j = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/sh","-c"],
            "Cmd":["echo hi"],"Env":["PATH=/bin","EMPTY","A=b=c"],"WorkingDir":"/w","User":"1000:1000",
            "Labels":{"a":"b"}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = ImageConfig::from_json(j).unwrap();
        assert_eq!(c.entrypoint(), ["/bin/sh", "-c"]);
        assert_eq!(c.cmd(), ["echo hi"]);
        assert_eq!(c.command(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.env().len(), 3);
        assert_eq!(c.env_pairs()[1], ("EMPTY".to_string(), String::new()));
        assert_eq!(c.env_pairs()[2], ("A".to_string(), "b=c".to_string()));
        assert_eq!(c.working_dir(), Some("/w"));
        assert_eq!(c.user(), Some("1000:1000"));
        assert_eq!(c.architecture(), "amd64");
        assert_eq!(c.labels()["a"], "b");
    }

    #[test]
    fn nulls_and_missing() {
        let c = ImageConfig::from_json(br#"{"config":{"Cmd":null,"Env":null,"User":""}}"#).unwrap();
        assert!(c.cmd().is_empty() && c.env().is_empty() && c.user().is_none());
        let c = ImageConfig::from_json(b"{}").unwrap();
        assert!(c.command().is_empty());
        assert!(ImageConfig::from_json(b"[").is_err());
    }
}
