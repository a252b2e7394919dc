//! The event hub behind `/1.0/events`: lifecycle, operation and logging
//! events, fanned out to every websocket listener.

use serde_json::{json, Value};
use skiff_api::{Event, EventType, DEFAULT_PROJECT};
use tokio::sync::broadcast;

/// Events queued per slow listener before it starts losing the oldest.
const BACKLOG: usize = 1024;

/// Where events go.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events { tx: broadcast::channel(BACKLOG).0 }
    }
}

impl Events {
    /// A new listener.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    fn send(&self, kind: EventType, metadata: Value) {
        let _ = self.tx.send(Event {
            kind,
            timestamp: skiff_api::time::now(),
            metadata,
            location: "none".into(),
            project: DEFAULT_PROJECT.into(),
        });
    }

    /// A lifecycle event (`instance-started` on `/1.0/instances/web`).
    pub fn lifecycle(&self, action: &str, source: &str, context: Value) {
        log::info!("{action} {source}");
        self.send(EventType::Lifecycle, json!({"action": action, "source": source, "context": context}));
    }

    /// An operation's new state.
    pub fn operation(&self, op: &skiff_api::Operation) {
        self.send(EventType::Operation, serde_json::to_value(op).unwrap_or(Value::Null));
    }

    /// A log line, also to the daemon's own log.
    pub fn log(&self, level: &str, message: &str, context: Value) {
        match level {
            "error" => log::error!("{message} {context}"),
            "warning" => log::warn!("{message} {context}"),
            _ => log::info!("{message} {context}"),
        }
        self.send(EventType::Logging, json!({"message": message, "level": level, "context": context}));
    }
}
