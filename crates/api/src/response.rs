//! The envelope of every answer, and API errors.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `type` of a [`Response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseType {
    /// The result is in `metadata`.
    Sync,
    /// An operation was created; `metadata` is the [`crate::Operation`].
    Async,
    /// The request failed; see `error_code` and `error`.
    Error,
}

/// The envelope: `{"type", "status", "status_code", "operation",
/// "error_code", "error", "metadata"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response<T = Value> {
    /// sync, async or error.
    #[serde(rename = "type")]
    pub kind: ResponseType,
    /// "Success", "Operation created", or "" for errors.
    #[serde(default)]
    pub status: String,
    /// 200, 100, or 0 for errors.
    #[serde(default)]
    pub status_code: u16,
    /// The operation's URL for async answers, else "".
    #[serde(default)]
    pub operation: String,
    /// The HTTP status for errors, else 0.
    #[serde(default)]
    pub error_code: u16,
    /// The error message, else "".
    #[serde(default)]
    pub error: String,
    /// The payload.
    pub metadata: T,
}

impl<T> Response<T> {
    /// A sync success.
    pub fn sync(metadata: T) -> Self {
        Response {
            kind: ResponseType::Sync,
            status: "Success".into(),
            status_code: 200,
            operation: String::new(),
            error_code: 0,
            error: String::new(),
            metadata,
        }
    }

    /// An async answer for the operation `op_url` whose record is `metadata`.
    pub fn async_op(op_url: String, metadata: T) -> Self {
        Response {
            kind: ResponseType::Async,
            status: "Operation created".into(),
            status_code: 100,
            operation: op_url,
            error_code: 0,
            error: String::new(),
            metadata,
        }
    }
}

impl Response<Value> {
    /// An error answer with the HTTP status `code`.
    pub fn error(code: u16, message: impl Into<String>) -> Self {
        Response {
            kind: ResponseType::Error,
            status: String::new(),
            status_code: 0,
            operation: String::new(),
            error_code: code,
            error: message.into(),
            metadata: Value::Null,
        }
    }

    /// The payload of a sync or async answer as `T`, or the error it carries.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        if self.kind == ResponseType::Error {
            return Err(ApiError::Remote { code: self.error_code, message: self.error });
        }
        serde_json::from_value(self.metadata).map_err(|e| ApiError::Decode(e.to_string()))
    }
}

/// What a client sees go wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The server answered with an error.
    #[error("{message}")]
    Remote {
        /// The HTTP status.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// The answer did not have the expected shape.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_lxd() {
        let e = serde_json::to_value(Response::error(404, "Instance not found")).unwrap();
        assert_eq!(
            e,
            serde_json::json!({"type":"error","status":"","status_code":0,"operation":"","error_code":404,
                "error":"Instance not found","metadata":null})
        );
        let s: Response = serde_json::from_str(
            r#"{"type":"sync","status":"Success","status_code":200,"operation":"","error_code":0,"error":"",
                "metadata":["/1.0/instances/c1"]}"#,
        )
        .unwrap();
        assert_eq!(s.into_result::<Vec<String>>().unwrap(), vec!["/1.0/instances/c1".to_string()]);
        let err = Response::error(409, "in use").into_result::<Value>().unwrap_err();
        assert_eq!(err, ApiError::Remote { code: 409, message: "in use".into() });
    }
}
