//! Background operations (`/1.0/operations`): each has a record that
//! clients poll, wait on or watch through events; a task that does the
//! work; optionally a cancel flag; and for websocket operations (exec,
//! console) a secret per stream that the client presents to connect.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::WebSocket;
use serde_json::Value;
use skiff_api::{Operation, OperationClass, StatusCode};
use tokio::sync::{oneshot, watch};

use crate::events::Events;

/// How long a finished operation stays visible.
const KEEP_FINISHED: Duration = Duration::from_secs(300);
/// How long a websocket operation waits for its clients to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long optional streams may still take once the required ones are in.
const OPTIONAL_GRACE: Duration = Duration::from_millis(200);

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Cancelled by a client.
    #[error("operation cancelled")]
    Cancelled,
    /// The clients did not connect their websockets in time.
    #[error("timed out waiting for the websocket connections")]
    NoClients,
    /// The work failed.
    #[error("{0}")]
    Failed(String),
}

/// One operation.
pub struct Op {
    record: Mutex<Operation>,
    done: watch::Sender<bool>,
    cancel: watch::Sender<bool>,
    /// Websocket streams still to be connected: secret → (fd name, sender).
    pending: Mutex<HashMap<String, (String, oneshot::Sender<WebSocket>)>>,
    events: Events,
}

impl Op {
    /// The record now.
    pub fn record(&self) -> Operation {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The id.
    pub fn id(&self) -> String {
        self.record.lock().unwrap_or_else(|e| e.into_inner()).id.clone()
    }

    fn update(&self, f: impl FnOnce(&mut Operation)) {
        let rec = {
            let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut r);
            r.updated_at = skiff_api::time::now();
            r.clone()
        };
        self.events.operation(&rec);
    }

    /// Replaces the metadata (progress).
    pub fn set_metadata(&self, metadata: Value) {
        self.update(|r| r.metadata = metadata);
    }

    fn set_status(&self, s: StatusCode) {
        self.update(|r| {
            r.status = s.name().into();
            r.status_code = s.code();
        });
    }

    /// Resolves when a client asks to cancel.
    pub async fn on_cancel(&self) {
        let mut rx = self.cancel.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Waits until it ends or `limit` passes; whether it ended.
    pub async fn wait(&self, limit: Option<Duration>) -> bool {
        let mut rx = self.done.subscribe();
        let w = rx.wait_for(|d| *d);
        match limit {
            Some(l) => tokio::time::timeout(l, w).await.map(|r| r.is_ok()).unwrap_or(false),
            None => w.await.is_ok(),
        }
    }

    /// Hands the websocket of `secret` to the operation's task; false when
    /// the secret is unknown or already used.
    pub fn connect(&self, secret: &str, ws: WebSocket) -> bool {
        let entry = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(secret);
        match entry {
            Some((_, tx)) => tx.send(ws).is_ok(),
            None => false,
        }
    }

    /// Whether `secret` belongs to a stream not connected yet.
    pub fn knows_secret(&self, secret: &str) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).contains_key(secret)
    }
}

/// Websocket streams of an operation, to be awaited by its task.
pub struct Streams {
    /// fd name → receiver of the connected socket.
    pub sockets: BTreeMap<String, oneshot::Receiver<WebSocket>>,
}

impl Streams {
    /// Waits for the `required` streams to connect (bounded by
    /// [`CONNECT_TIMEOUT`]), then gives the others a short grace: LXD's own
    /// client connects `control` first, pylxd never does.
    pub async fn connect(mut self, required: &[&str]) -> Result<BTreeMap<String, WebSocket>, OpError> {
        let mut out = BTreeMap::new();
        let needed = async {
            for fd in required {
                let rx = self.sockets.remove(*fd).ok_or(OpError::NoClients)?;
                out.insert(fd.to_string(), rx.await.map_err(|_| OpError::NoClients)?);
            }
            Ok::<_, OpError>(())
        };
        tokio::time::timeout(CONNECT_TIMEOUT, needed).await.map_err(|_| OpError::NoClients)??;
        for (fd, mut rx) in self.sockets {
            match rx.try_recv() {
                Ok(ws) => {
                    out.insert(fd, ws);
                }
                Err(_) => {
                    if let Ok(Ok(ws)) = tokio::time::timeout(OPTIONAL_GRACE, rx).await {
                        out.insert(fd, ws);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Every operation.
#[derive(Clone)]
pub struct Operations {
    ops: Arc<Mutex<HashMap<String, Arc<Op>>>>,
    events: Events,
}

/// A random 64-hex-digit secret.
pub fn secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

impl Operations {
    /// An empty registry.
    pub fn new(events: Events) -> Self {
        Operations { ops: Arc::default(), events }
    }

    /// One operation.
    pub fn get(&self, id: &str) -> Option<Arc<Op>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// All operations.
    pub fn all(&self) -> Vec<Arc<Op>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Registers a new pending operation. `fds` names websocket streams
    /// (exec: "0", "1", "2", "control"); their secrets go in the metadata
    /// under `fds`, as LXD does.
    pub fn create(
        &self,
        class: OperationClass,
        description: &str,
        instance: Option<&str>,
        mut metadata: Value,
        may_cancel: bool,
        fds: &[&str],
    ) -> (Arc<Op>, Streams) {
        let id = uuid::Uuid::new_v4().to_string();
        let now = skiff_api::time::now();
        let mut resources = BTreeMap::new();
        if let Some(name) = instance {
            resources.insert("instances".to_string(), vec![format!("/1.0/instances/{name}")]);
            resources.insert("containers".to_string(), vec![format!("/1.0/containers/{name}")]);
        }
        let mut pending = HashMap::new();
        let mut sockets = BTreeMap::new();
        if !fds.is_empty() {
            let mut map = serde_json::Map::new();
            for fd in fds {
                let s = secret();
                let (tx, rx) = oneshot::channel();
                pending.insert(s.clone(), (fd.to_string(), tx));
                sockets.insert(fd.to_string(), rx);
                map.insert(fd.to_string(), Value::String(s));
            }
            if !metadata.is_object() {
                metadata = Value::Object(Default::default());
            }
            metadata["fds"] = Value::Object(map);
        }
        let record = Operation {
            id: id.clone(),
            class,
            description: description.into(),
            created_at: now.clone(),
            updated_at: now,
            status: StatusCode::Pending.name().into(),
            status_code: StatusCode::Pending.code(),
            resources,
            metadata,
            may_cancel,
            err: String::new(),
            location: "none".into(),
        };
        let op = Arc::new(Op {
            record: Mutex::new(record),
            done: watch::channel(false).0,
            cancel: watch::channel(false).0,
            pending: Mutex::new(pending),
            events: self.events.clone(),
        });
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).insert(id, op.clone());
        self.events.operation(&op.record());
        (op, Streams { sockets })
    }

    /// Runs the operation's work in the background: Running, then Success
    /// (with the metadata the work returns, if any) or Failure.
    pub fn run<F>(&self, op: &Arc<Op>, work: F)
    where
        F: Future<Output = Result<Option<Value>, OpError>> + Send + 'static,
    {
        op.set_status(StatusCode::Running);
        let (op, ops) = (op.clone(), self.ops.clone());
        tokio::spawn(async move {
            let result = work.await;
            op.update(|r| {
                let s = match &result {
                    Ok(meta) => {
                        if let Some(m) = meta {
                            r.metadata = m.clone();
                        }
                        StatusCode::Success
                    }
                    Err(OpError::Cancelled) => StatusCode::Cancelled,
                    Err(_) => StatusCode::Failure,
                };
                if let Err(e) = &result {
                    r.err = e.to_string();
                }
                r.status = s.name().into();
                r.status_code = s.code();
                r.may_cancel = false;
            });
            op.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
            op.done.send_replace(true);
            tokio::time::sleep(KEEP_FINISHED).await;
            ops.lock().unwrap_or_else(|e| e.into_inner()).remove(&op.id());
        });
    }

    /// Asks an operation to cancel; false if it cannot be cancelled.
    pub fn cancel(&self, id: &str) -> Option<bool> {
        let op = self.get(id)?;
        let rec = op.record();
        if !rec.may_cancel || rec.is_final() {
            return Some(false);
        }
        op.cancel.send_replace(true);
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lifecycle_and_cancel() {
        let ops = Operations::new(Events::default());
        let (op, _) = ops.create(OperationClass::Task, "Doing", Some("web"), Value::Null, false, &[]);
        assert_eq!(op.record().status_code, 105);
        ops.run(&op, async { Ok(Some(serde_json::json!({"return": 3}))) });
        assert!(op.wait(Some(Duration::from_secs(5))).await);
        let r = op.record();
        assert_eq!((r.status.as_str(), r.metadata["return"].as_i64()), ("Success", Some(3)));
        assert_eq!(r.resources["instances"], vec!["/1.0/instances/web".to_string()]);

        let (op2, _) = ops.create(OperationClass::Task, "Long", None, Value::Null, true, &[]);
        let o = op2.clone();
        ops.run(&op2, async move {
            o.on_cancel().await;
            Err(OpError::Cancelled)
        });
        assert!(!op2.wait(Some(Duration::from_millis(50))).await, "still running");
        assert_eq!(ops.cancel(&op2.id()), Some(true));
        assert!(op2.wait(Some(Duration::from_secs(5))).await);
        assert_eq!(op2.record().status, "Cancelled");
        assert_eq!(ops.cancel(&op.id()), Some(false), "a finished operation cannot be cancelled");
        assert_eq!(ops.cancel("nope"), None);

        let (op3, streams) = ops.create(OperationClass::Websocket, "Exec", None, Value::Null, false, &["0", "control"]);
        let fds = op3.record().metadata["fds"].clone();
        assert_eq!(fds.as_object().unwrap().len(), 2);
        assert!(op3.knows_secret(fds["0"].as_str().unwrap()));
        assert_eq!(streams.sockets.len(), 2);
    }
}
