//! Progress of a background operation, drawn from its metadata while
//! polling `GET /1.0/operations/{id}` every 200 ms. skiffd reports pulls as
//!
//! ```json
//! {"progress": {"stage": "pull", "percent": "45", "speed": "1234567"},
//!  "pull": {"total": N, "done": N, "layers": [{"digest": "sha256:…", "size": N, "done": N}]}}
//! ```
//!
//! One bar per layer and a total bar with bytes and rate; other stages
//! (`{"progress": {"stage", "percent"}}`) show as a one-line spinner.
//! Nothing is drawn when stdout is not a terminal.

use std::collections::BTreeMap;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::Value;
use skiff_api::Operation;

use crate::client::{Client, Result};
use crate::format;

/// The pull part of an operation's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Pull {
    /// Bytes to fetch in all.
    #[serde(default)]
    pub total: u64,
    /// Bytes fetched.
    #[serde(default)]
    pub done: u64,
    /// Layers.
    #[serde(default)]
    pub layers: Vec<Layer>,
}

/// One layer being fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Layer {
    /// `sha256:…`.
    pub digest: String,
    /// Its size.
    #[serde(default)]
    pub size: u64,
    /// Bytes fetched.
    #[serde(default)]
    pub done: u64,
}

/// Bars for one operation.
pub struct Progress {
    multi: MultiProgress,
    layers: BTreeMap<String, ProgressBar>,
    total: Option<ProgressBar>,
    stage: Option<ProgressBar>,
}

/// `sha256:0123456789abcdef…` → `0123456789ab`.
pub fn short_digest(d: &str) -> &str {
    let hex = d.split_once(':').map_or(d, |(_, h)| h);
    hex.get(..12).unwrap_or(hex)
}

/// A number that the API may send as a string or a number.
fn num(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

impl Progress {
    /// Bars drawn on stdout (a terminal).
    pub fn new() -> Progress {
        Progress {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            layers: BTreeMap::new(),
            total: None,
            stage: None,
        }
    }

    fn bar(&self, len: u64, prefix: String, template: &str) -> ProgressBar {
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let pb = self.multi.add(ProgressBar::new(len));
        pb.set_style(style);
        pb.set_prefix(prefix);
        pb
    }

    /// Redraws from an operation's metadata.
    pub fn update(&mut self, metadata: &Value) {
        let speed = metadata.pointer("/progress/speed").and_then(num);
        if let Some(pull) = metadata.get("pull").and_then(|p| serde_json::from_value::<Pull>(p.clone()).ok()) {
            if let Some(s) = self.stage.take() {
                s.finish_and_clear();
            }
            for layer in &pull.layers {
                let short = short_digest(&layer.digest).to_string();
                if !self.layers.contains_key(&layer.digest) {
                    let pb = self.bar(layer.size, short, "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10}");
                    self.layers.insert(layer.digest.clone(), pb);
                }
                let pb = &self.layers[&layer.digest];
                pb.set_length(layer.size);
                pb.set_position(layer.done);
            }
            if self.total.is_none() {
                let t = "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}";
                self.total = Some(self.bar(pull.total, "total".into(), t));
            }
            if let Some(t) = &self.total {
                t.set_length(pull.total);
                t.set_position(pull.done);
                t.set_message(speed.map(|s| format!("{}/s", format::bytes(s))).unwrap_or_default());
            }
            return;
        }
        if let Some(stage) = metadata.pointer("/progress/stage").and_then(Value::as_str) {
            let percent = metadata.pointer("/progress/percent").and_then(num);
            let mut msg = stage.to_string();
            if let Some(p) = percent {
                msg += &format!(": {p}%");
            }
            if let Some(s) = speed {
                msg += &format!(" ({}/s)", format::bytes(s));
            }
            if self.stage.is_none() {
                let pb = self.multi.add(ProgressBar::new_spinner());
                pb.enable_steady_tick(Duration::from_millis(120));
                self.stage = Some(pb);
            }
            if let Some(pb) = &self.stage {
                pb.set_message(msg);
            }
        }
    }

    /// Removes the bars.
    pub fn finish(self) {
        for pb in self.layers.values().chain(self.total.iter()).chain(self.stage.iter()) {
            pb.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// Waits for an operation, with bars when `show` (stdout a terminal, not quiet).
pub async fn wait(client: &Client, op: &Operation, show: bool) -> Result<Operation> {
    if !show {
        return client.wait(&op.id).await;
    }
    let mut progress = Progress::new();
    let result = client.poll(&op.id, Duration::from_millis(200), |op| progress.update(&op.metadata)).await;
    progress.finish();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_pull_metadata() {
        let m = json!({"progress":{"stage":"pull","percent":"45","speed":"1234567"},
            "pull":{"total":100,"done":45,"layers":[{"digest":"sha256:0123456789abcdef","size":60,"done":45}]}});
        let p: Pull = serde_json::from_value(m["pull"].clone()).unwrap();
        assert_eq!((p.total, p.done, p.layers[0].size), (100, 45, 60));
        assert_eq!(short_digest(&p.layers[0].digest), "0123456789ab");
        assert_eq!(num(&m["progress"]["speed"]), Some(1234567));
        // Drawing into a hidden target must not panic.
        let mut pr = Progress::new();
        pr.multi.set_draw_target(ProgressDrawTarget::hidden());
        pr.update(&m);
        pr.update(&json!({"progress":{"stage":"unpack","percent":"10"}}));
        assert_eq!(pr.layers.len(), 1);
        pr.finish();
    }
}
