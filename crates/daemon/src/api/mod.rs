//! The REST API: routes of the Incus/LXD `/1.0` API over the Unix socket.
//! Every answer is the API's envelope ([`skiff_api::Response`]); errors
//! carry the HTTP status in `error_code`; bodies that are not valid JSON
//! for the route get a 400 saying where they are wrong.

mod console;
mod exec;
mod files;
mod images;
mod instances;
mod misc;

use std::sync::Arc;

use axum::extract::FromRequest;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use serde_json::Value;

use crate::daemon::Daemon;
use crate::instances::InstanceError;
use crate::ops::Op;

/// Largest request body (file pushes included).
const MAX_BODY: usize = 1 << 30;

/// The shared state of handlers.
pub type App = Arc<Daemon>;

/// An error answer.
#[derive(Debug)]
pub struct ApiErr {
    status: u16,
    message: String,
}

impl ApiErr {
    /// An error with an HTTP status.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiErr { status, message: message.into() }
    }

    /// 400.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404.
    pub fn not_found(what: &str) -> Self {
        Self::new(404, format!("{what} not found"))
    }
}

impl From<InstanceError> for ApiErr {
    fn from(e: InstanceError) -> Self {
        ApiErr::new(e.status(), e.to_string())
    }
}

impl From<crate::db::DbError> for ApiErr {
    fn from(e: crate::db::DbError) -> Self {
        ApiErr::new(500, e.to_string())
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(skiff_api::Response::error(self.status, self.message))).into_response()
    }
}

/// A handler's result.
pub type ApiResult = Result<Response, ApiErr>;

/// A sync success.
pub fn sync<T: Serialize>(v: T) -> ApiResult {
    Ok(axum::Json(skiff_api::Response::sync(v)).into_response())
}

/// A sync success with an ETag header.
pub fn sync_etag<T: Serialize>(v: T, etag: String) -> ApiResult {
    let mut r = sync(v)?;
    if let Ok(h) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        r.headers_mut().insert("ETag", h);
    }
    Ok(r)
}

/// An async answer for `op` (202, with a Location header).
pub fn accepted(op: &Op) -> ApiResult {
    let rec = op.record();
    let url = format!("/1.0/operations/{}", rec.id);
    let mut r = (StatusCode::ACCEPTED, axum::Json(skiff_api::Response::async_op(url.clone(), rec))).into_response();
    if let Ok(h) = HeaderValue::from_str(&url) {
        r.headers_mut().insert("Location", h);
    }
    Ok(r)
}

/// A JSON body whose parse errors are API errors (400 with the reason).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiErr;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        // Any content type: clients differ in what they send.
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiErr::bad(format!("reading the request body: {}", e.body_text())))?;
        let text = if bytes.is_empty() { &b"{}"[..] } else { &bytes[..] };
        serde_json::from_slice(text).map(Body).map_err(|e| ApiErr::bad(format!("malformed request body: {e}")))
    }
}

/// `?recursion=N` (0 when absent or bad).
pub fn recursion(q: &std::collections::HashMap<String, String>) -> u8 {
    q.get("recursion").and_then(|r| r.parse().ok()).unwrap_or(0)
}

/// The `If-Match` ETag, without quotes.
pub fn if_match(h: &HeaderMap) -> Option<String> {
    h.get("If-Match").and_then(|v| v.to_str().ok()).map(|s| s.trim_matches('"').to_string())
}

/// The ETag of a JSON value (sha256 of its canonical text).
pub fn etag_of(v: &Value) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(v.to_string().as_bytes()))
}

/// The whole API.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(misc::root))
        .route("/1.0", get(misc::server).put(misc::server_put).patch(misc::server_put))
        .route("/1.0/instances", get(instances::list).post(instances::create))
        .route(
            "/1.0/instances/{name}",
            get(instances::get_one).put(instances::put).patch(instances::patch).delete(instances::delete),
        )
        .route("/1.0/instances/{name}/state", get(instances::state).put(instances::state_put))
        .route("/1.0/instances/{name}/exec", post(exec::exec))
        .route(
            "/1.0/instances/{name}/console",
            get(misc::console_log).post(console::console).delete(misc::console_clear),
        )
        .route("/1.0/instances/{name}/files", get(files::get).post(files::post).delete(files::delete))
        .route("/1.0/instances/{name}/logs", get(misc::logs))
        .route("/1.0/instances/{name}/logs/{file}", get(misc::log_get).delete(misc::log_delete))
        .route("/1.0/instances/{name}/snapshots", get(instances::snapshots).post(instances::snapshot_post))
        .route(
            "/1.0/instances/{name}/snapshots/{snap}",
            get(instances::snapshot_get).post(instances::snapshot_rename).delete(instances::snapshot_delete),
        )
        .route("/1.0/operations", get(misc::operations))
        .route("/1.0/operations/{id}", get(misc::operation).delete(misc::operation_cancel))
        .route("/1.0/operations/{id}/wait", get(misc::operation_wait))
        .route("/1.0/operations/{id}/websocket", get(misc::operation_websocket))
        .route("/1.0/events", get(misc::events))
        .route("/1.0/images", get(images::images).post(images::image_post))
        .route("/1.0/images/aliases", get(images::aliases).post(images::alias_post))
        .route("/1.0/images/aliases/{*alias}", get(images::alias_get).delete(images::alias_delete))
        .route("/1.0/images/{*fp}", get(images::image).delete(images::image_delete))
        .route("/1.0/networks", get(misc::networks))
        .route("/1.0/networks/{net}", get(misc::network))
        .route("/1.0/networks/{net}/leases", get(misc::leases))
        .route("/1.0/profiles", get(misc::profiles))
        .route("/1.0/profiles/{p}", get(misc::profile))
        .route("/1.0/projects", get(misc::projects))
        .route("/1.0/projects/{p}", get(misc::project))
        .fallback(misc::fallback)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}
