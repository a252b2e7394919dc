//! `/1.0/events`: what happens, as a websocket stream of JSON messages.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kinds of event (the `type` query parameter selects them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// An operation changed.
    Operation,
    /// A daemon log line.
    Logging,
    /// Something was created, started, stopped, deleted, ...
    Lifecycle,
}

impl EventType {
    /// The name used in `?type=`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Operation => "operation",
            EventType::Logging => "logging",
            EventType::Lifecycle => "lifecycle",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Its kind.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// RFC 3339.
    pub timestamp: String,
    /// An [`crate::Operation`], a [`LifecycleEvent`] or a [`LoggingEvent`].
    pub metadata: Value,
    /// "none".
    #[serde(default)]
    pub location: String,
    /// "default".
    #[serde(default)]
    pub project: String,
}

/// A lifecycle event's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// `instance-created`, `instance-started`, `instance-stopped`,
    /// `instance-restarted`, `instance-deleted`, `instance-shutdown`,
    /// `instance-snapshot-created`, ... and Skiff's
    /// `instance-main-exited`, `instance-error`.
    pub action: String,
    /// The object (`/1.0/instances/web`).
    pub source: String,
    /// Details.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub context: Value,
}

/// A logging event's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggingEvent {
    /// The message.
    pub message: String,
    /// `debug`, `info`, `warning`, `error`.
    pub level: String,
    /// Key/value context.
    #[serde(default)]
    pub context: std::collections::BTreeMap<String, String>,
}
