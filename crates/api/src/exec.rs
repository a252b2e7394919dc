//! `POST /1.0/instances/{name}/exec` and its control websocket.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Reads `null` as the type's default (clients such as pylxd send `null`
/// for fields they leave unset).
pub fn null_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An exec request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExecPost {
    /// argv.
    pub command: Vec<String>,
    /// Environment added to the instance's.
    #[serde(default, deserialize_with = "null_default")]
    pub environment: BTreeMap<String, String>,
    /// Answer at once and wait for the websockets to connect.
    #[serde(default, deserialize_with = "null_default")]
    pub wait_for_websocket: bool,
    /// Keep stdout/stderr as log files (non-websocket exec).
    #[serde(default, deserialize_with = "null_default")]
    pub record_output: bool,
    /// A TTY (one websocket for all stdio) rather than three pipes.
    #[serde(default, deserialize_with = "null_default")]
    pub interactive: bool,
    /// TTY columns.
    #[serde(default, deserialize_with = "null_default")]
    pub width: u16,
    /// TTY rows.
    #[serde(default, deserialize_with = "null_default")]
    pub height: u16,
    /// uid (0: the instance's default).
    #[serde(default, deserialize_with = "null_default")]
    pub user: u32,
    /// gid.
    #[serde(default, deserialize_with = "null_default")]
    pub group: u32,
    /// Working directory.
    #[serde(default, deserialize_with = "null_default")]
    pub cwd: String,
}

/// A message on the exec control websocket.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExecControl {
    /// `window-resize` or `signal`.
    pub command: String,
    /// `window-resize`: `{"width": "80", "height": "25"}` (strings).
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// `signal`: the signal number.
    #[serde(default)]
    pub signal: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lxd_exec() {
        let e: ExecPost = serde_json::from_str(
            r#"{"command": ["sh", "-c", "exit 3"], "environment": {"FOO": "bar"}, "wait-for-websocket": false,
                "record-output": true, "interactive": false, "width": 80, "height": 25}"#,
        )
        .unwrap();
        assert!(e.record_output && !e.interactive);
        assert_eq!(e.environment["FOO"], "bar");
        let p: ExecPost = serde_json::from_str(
            r#"{"command": ["true"], "environment": null, "user": null, "group": null, "cwd": null, "width": null}"#,
        )
        .unwrap();
        assert_eq!((p.user, p.cwd.as_str(), p.environment.len()), (0, "", 0));
        let c: ExecControl =
            serde_json::from_str(r#"{"command":"window-resize","args":{"width":"100","height":"30"}}"#).unwrap();
        assert_eq!(c.args["width"], "100");
    }
}
