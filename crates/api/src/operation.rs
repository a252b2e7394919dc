//! Background operations (`/1.0/operations`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::instance::StatusCode;

/// What kind of operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationClass {
    /// Runs in the background.
    Task,
    /// Waits for websockets to connect (exec, console).
    Websocket,
    /// Token-based (not used by Skiff).
    Token,
}

/// An operation's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// Its UUID.
    pub id: String,
    /// Its class.
    pub class: OperationClass,
    /// What it does ("Creating instance").
    pub description: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// "Pending", "Running", "Success", "Failure", "Cancelled".
    pub status: String,
    /// 105, 103, 200, 400, 401.
    pub status_code: u16,
    /// The objects it touches: `{"instances": ["/1.0/instances/c1"]}`.
    #[serde(default)]
    pub resources: BTreeMap<String, Vec<String>>,
    /// Progress or result (exec: `{"return": N}`).
    #[serde(default)]
    pub metadata: Value,
    /// Whether `DELETE /1.0/operations/{id}` cancels it.
    #[serde(default)]
    pub may_cancel: bool,
    /// The error when it failed.
    #[serde(default)]
    pub err: String,
    /// Cluster member ("none").
    #[serde(default)]
    pub location: String,
}

impl Operation {
    /// The status as a code.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_code(self.status_code)
    }

    /// Whether it has ended (success, failure or cancelled).
    pub fn is_final(&self) -> bool {
        matches!(self.status_code(), StatusCode::Success | StatusCode::Failure | StatusCode::Cancelled)
    }
}
