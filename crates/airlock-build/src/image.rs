//! The image being built: its layers and its config document, edited step by step as
//! Docker does (`config.Env`, `WorkingDir`, `Cmd`, …; `rootfs.diff_ids`, `history`).

use airlock_image::{ImageRecord, LayerRecord, Store, MEDIA_TYPE_OCI_LAYER_GZIP};
use serde_json::{json, Map, Value};

use crate::cache::Layer;
use crate::error::Result;

/// The PATH a RUN gets when the image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Layers and config of a stage so far.
#[derive(Debug, Clone)]
pub struct State {
    /// Layers, base first.
    pub layers: Vec<Layer>,
    /// The full image config document.
    pub config: Value,
}

impl State {
    /// An empty image (`FROM scratch`).
    pub fn scratch() -> State {
        State {
            layers: Vec::new(),
            config: json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": []},
                "history": [],
            }),
        }
    }

    /// The state of a stored image.
    pub fn of_image(store: &Store, rec: &ImageRecord) -> Result<State> {
        let config: Value =
            serde_json::from_slice(&store.read_blob(&rec.config_digest)?).map_err(|e| {
                airlock_image::Error::InvalidDocument {
                    what: "image config".into(),
                    reason: e.to_string(),
                }
            })?;
        let diff_ids: Vec<String> = config
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if diff_ids.len() != rec.layers.len() {
            return Err(airlock_image::Error::InvalidDocument {
                what: format!("config of {}", rec.reference),
                reason: format!(
                    "{} diff_ids for {} layers",
                    diff_ids.len(),
                    rec.layers.len()
                ),
            }
            .into());
        }
        let layers = rec
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, d)| Layer {
                digest: l.digest.clone(),
                diff_id: d,
                size: l.size,
            })
            .collect();
        let mut s = State { layers, config };
        // Build time differs every run; leaving it out keeps the digest reproducible.
        if let Some(o) = s.config.as_object_mut() {
            o.remove("created");
        }
        Ok(s)
    }

    /// The `config` object (created if missing).
    pub fn cfg(&mut self) -> &mut Map<String, Value> {
        let root = self.config.as_object_mut().expect("config is an object");
        let c = root.entry("config").or_insert_with(|| json!({}));
        if !c.is_object() {
            *c = json!({});
        }
        c.as_object_mut().expect("just made an object")
    }

    fn cfg_ref(&self) -> Option<&Map<String, Value>> {
        self.config.get("config").and_then(Value::as_object)
    }

    /// `Env` as pairs.
    pub fn env(&self) -> Vec<(String, String)> {
        self.cfg_ref()
            .and_then(|c| c.get("Env"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(|e| match e.split_once('=') {
                        Some((k, v)) => (k.to_string(), v.to_string()),
                        None => (e.to_string(), String::new()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sets (or replaces) `key` in `Env`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let mut env = self.env();
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value.to_string(),
            None => env.push((key.to_string(), value.to_string())),
        }
        let list: Vec<Value> = env.iter().map(|(k, v)| json!(format!("{k}={v}"))).collect();
        self.cfg().insert("Env".into(), Value::Array(list));
    }

    /// A string field of `config` (`WorkingDir`, `User`).
    pub fn get_str(&self, field: &str) -> Option<String> {
        self.cfg_ref()
            .and_then(|c| c.get(field))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from)
    }

    /// Adds `key` to an object-valued field (`ExposedPorts`, `Volumes`).
    pub fn add_to_set(&mut self, field: &str, key: &str) {
        let c = self.cfg();
        let v = c.entry(field).or_insert_with(|| json!({}));
        if !v.is_object() {
            *v = json!({});
        }
        v.as_object_mut()
            .expect("object")
            .insert(key.into(), json!({}));
    }

    /// Sets a label.
    pub fn set_label(&mut self, key: &str, value: &str) {
        let c = self.cfg();
        let v = c.entry("Labels").or_insert_with(|| json!({}));
        if !v.is_object() {
            *v = json!({});
        }
        v.as_object_mut()
            .expect("object")
            .insert(key.into(), json!(value));
    }

    /// Appends a layer (and its diff_id and a history entry).
    pub fn push_layer(&mut self, layer: Layer, created_by: &str) {
        self.layers.push(layer);
        self.sync_rootfs();
        self.history(created_by, false);
    }

    /// Records a step that changed only the config.
    pub fn push_history(&mut self, created_by: &str) {
        self.history(created_by, true);
    }

    fn history(&mut self, created_by: &str, empty: bool) {
        let root = self.config.as_object_mut().expect("object");
        let h = root.entry("history").or_insert_with(|| json!([]));
        if !h.is_array() {
            *h = json!([]);
        }
        let mut e = json!({"created_by": created_by, "comment": "airlock build"});
        if empty {
            e["empty_layer"] = json!(true);
        }
        h.as_array_mut().expect("array").push(e);
    }

    fn sync_rootfs(&mut self) {
        let ids: Vec<Value> = self.layers.iter().map(|l| json!(l.diff_id)).collect();
        self.config["rootfs"] = json!({"type": "layers", "diff_ids": ids});
    }

    /// The config document as stored (rootfs in step with the layers).
    pub fn config_bytes(&self) -> Vec<u8> {
        let mut s = self.clone();
        s.sync_rootfs();
        serde_json::to_vec(&s.config).expect("config serializes")
    }

    /// The layers as store records.
    pub fn layer_records(&self) -> Vec<LayerRecord> {
        self.layers
            .iter()
            .map(|l| LayerRecord {
                digest: l.digest.clone(),
                media_type: MEDIA_TYPE_OCI_LAYER_GZIP.into(),
                size: l.size,
            })
            .collect()
    }

    /// An unrecorded image of this state to boot a RUN step from (config and manifest
    /// stored as blobs, so anything reading them finds them; not tagged).
    pub fn intermediate(&self, store: &Store) -> Result<ImageRecord> {
        let config = self.config_bytes();
        let layers = self.layer_records();
        let (manifest, config_digest) = airlock_image::compose_manifest(&config, &layers);
        store.put_blob(&config)?;
        let manifest_digest = store.put_blob(&manifest)?;
        Ok(ImageRecord {
            reference: "airlock-build/intermediate".into(),
            manifest_digest,
            manifest_media_type: airlock_image::MEDIA_TYPE_OCI_MANIFEST.into(),
            index_digest: None,
            config_digest,
            size: layers.iter().map(|l| l.size).sum(),
            layers,
            platform: Default::default(),
            created: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_edits() {
        let mut s = State::scratch();
        s.set_env("A", "1");
        s.set_env("B", "2");
        s.set_env("A", "3");
        assert_eq!(
            s.env(),
            [("A".into(), "3".into()), ("B".into(), "2".into())]
        );
        s.cfg().insert("WorkingDir".into(), json!("/app"));
        assert_eq!(s.get_str("WorkingDir").as_deref(), Some("/app"));
        s.add_to_set("ExposedPorts", "80/tcp");
        s.set_label("k", "v");
        s.push_history("ENV A=1");
        s.push_layer(
            Layer {
                digest: "sha256:d".into(),
                diff_id: "sha256:i".into(),
                size: 1,
            },
            "RUN x",
        );
        let v: Value = serde_json::from_slice(&s.config_bytes()).unwrap();
        assert_eq!(v["rootfs"]["diff_ids"], json!(["sha256:i"]));
        assert_eq!(v["config"]["ExposedPorts"], json!({"80/tcp": {}}));
        assert_eq!(v["history"][0]["empty_layer"], json!(true));
        assert!(v["history"][1].get("empty_layer").is_none());
        airlock_image::ImageConfig::from_json(&s.config_bytes()).unwrap();
    }
}
