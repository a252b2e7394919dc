//! `/1.0/instances/{name}/files?path=...`: read, write and delete files in
//! a running instance through its agent, with LXD's and Incus's
//! uid/gid/mode/type headers. Transfers go through a private temporary
//! tree under `$SKIFF_DIR/tmp`, removed afterwards whatever happens.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use skiff_agent_client::{AgentClient, PullOptions, PushOptions};
use skiff_agent_proto::ExecRequest;
use skiff_api::files as hdr;

use super::{sync, ApiErr, ApiResult, App};
use crate::db::Status;
use crate::images::chain;
use crate::instances as inst;

/// A temporary directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(d: &App) -> Result<Scratch, ApiErr> {
        let p = d.dir().join("tmp").join(format!("files-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).map_err(|e| ApiErr::new(500, format!("scratch directory: {e}")))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ApiErr::new(500, format!("scratch directory: {e}")))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn target(d: &App, name: &str, q: &HashMap<String, String>) -> Result<(AgentClient, String), ApiErr> {
    let r = inst::row(d, name)?;
    if r.status == Status::Frozen {
        return Err(ApiErr::bad(format!("Instance {name:?} is frozen (paused): resume it with skiff start")));
    }
    if r.status != Status::Running {
        return Err(ApiErr::bad(format!("Instance {name:?} is not running (file transfers go through its agent)")));
    }
    // LXD's client sends paths without their leading '/' (`lxc file pull
    // web/etc/hosts` asks for `etc/hosts`); they are all from the root.
    let path = q.get("path").filter(|p| !p.is_empty()).ok_or_else(|| ApiErr::bad("the path parameter is missing"))?;
    let path = if path.starts_with('/') { path.clone() } else { format!("/{path}") };
    if path.split('/').any(|c| c == "..") {
        return Err(ApiErr::bad(format!("path {path:?} must not contain '..'")));
    }
    let spec = inst::spec(d, &r)?;
    let agent = inst::driver(d, &r)?.agent(&spec).map_err(|e| ApiErr::bad(chain(&e)))?;
    Ok((agent, path))
}

fn header(h: &HeaderMap, names: [&str; 2]) -> Option<String> {
    names.iter().find_map(|n| h.get(*n).and_then(|v| v.to_str().ok()).map(str::to_string))
}

fn agent_err(path: &str, e: skiff_agent_client::ClientError) -> ApiErr {
    let text = chain(&e);
    let status = if text.contains("not_found") || text.contains("No such file") || text.contains("not found") {
        404
    } else {
        500
    };
    ApiErr::new(status, format!("{path}: {text}"))
}

fn meta_headers(h: &mut HeaderMap, uid: u32, gid: u32, mode: u32, kind: &str) {
    for (names, v) in [
        (hdr::UID, uid.to_string()),
        (hdr::GID, gid.to_string()),
        (hdr::MODE, format!("{:04o}", mode & 0o7777)),
        (hdr::TYPE, kind.to_string()),
    ] {
        for n in names {
            if let (Ok(name), Ok(val)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(&v)) {
                h.insert(name, val);
            }
        }
    }
}

/// `GET`: a file's bytes, a directory's entry names, or a symlink's target.
pub async fn get(
    State(d): State<App>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (agent, path) = target(&d, &name, &q)?;
    let scratch = Scratch::new(&d)?;
    let local = scratch.0.join("x");
    agent.pull(&path, &local, &PullOptions { owners: true }).await.map_err(|e| agent_err(&path, e))?;
    let m = std::fs::symlink_metadata(&local).map_err(|e| ApiErr::new(500, format!("{path}: {e}")))?;
    if m.file_type().is_symlink() {
        let t = std::fs::read_link(&local).map_err(|e| ApiErr::new(500, e.to_string()))?;
        let mut resp = t.to_string_lossy().into_owned().into_response();
        meta_headers(resp.headers_mut(), m.uid(), m.gid(), m.mode(), "symlink");
        return Ok(resp);
    }
    if m.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(&local)
            .map_err(|e| ApiErr::new(500, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        let mut resp = sync(names)?;
        meta_headers(resp.headers_mut(), m.uid(), m.gid(), m.mode(), "directory");
        return Ok(resp);
    }
    // Streamed from the scratch copy (open, so it outlives the scratch
    // directory's removal): a guest's big file never sits in memory whole.
    let file = tokio::fs::File::open(&local).await.map_err(|e| ApiErr::new(500, format!("{path}: {e}")))?;
    let stream = futures::stream::unfold(Some(file), |state| async move {
        use tokio::io::AsyncReadExt;
        let mut f = state?;
        let mut buf = vec![0u8; 64 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    resp.headers_mut().insert("Content-Length", HeaderValue::from(m.len()));
    resp.headers_mut().insert("Content-Type", HeaderValue::from_static("application/octet-stream"));
    meta_headers(resp.headers_mut(), m.uid(), m.gid(), m.mode(), "file");
    Ok(resp)
}

/// `POST`: writes a file (or makes a directory or symlink).
pub async fn post(
    State(d): State<App>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let (agent, path) = target(&d, &name, &q)?;
    let num = |names, what: &str| -> Result<Option<u32>, ApiErr> {
        header(&h, names)
            .map(|v| v.parse::<i64>().map_err(|_| ApiErr::bad(format!("bad {what} header {v:?}"))))
            .transpose()
            .map(|o| o.filter(|n| *n >= 0).map(|n| n as u32))
    };
    let uid = num(hdr::UID, "uid")?;
    let gid = num(hdr::GID, "gid")?;
    let mode = match header(&h, hdr::MODE) {
        Some(m) => Some(hdr::parse_mode(&m).ok_or_else(|| ApiErr::bad(format!("bad mode header {m:?}")))?),
        None => None,
    };
    let kind = header(&h, hdr::TYPE).unwrap_or_else(|| "file".into());
    let append = header(&h, hdr::WRITE).is_some_and(|w| w == "append");
    if append && kind == "file" {
        let request = ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), "cat >> \"$1\"".into(), "sh".into(), path.clone()],
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
            stdin: true,
        };
        let out = agent.exec_output(request, Some(body.to_vec())).await.map_err(|e| agent_err(&path, e))?;
        if out.status.code() != 0 {
            return Err(ApiErr::new(
                500,
                format!("appending to {path}: {}", String::from_utf8_lossy(&out.stderr).trim()),
            ));
        }
        return sync(serde_json::Value::Null);
    }
    let scratch = Scratch::new(&d)?;
    let local = scratch.0.join("x");
    match kind.as_str() {
        "file" => std::fs::write(&local, &body),
        "directory" => std::fs::create_dir(&local),
        "symlink" => std::os::unix::fs::symlink(String::from_utf8_lossy(&body).as_ref(), &local),
        other => return Err(ApiErr::bad(format!("unknown file type {other:?} (file, directory or symlink)"))),
    }
    .map_err(|e| ApiErr::new(500, format!("staging {path}: {e}")))?;
    let default_mode = if kind == "directory" { 0o755 } else { 0o644 };
    if kind != "symlink" {
        let _ = std::fs::set_permissions(&local, std::fs::Permissions::from_mode(mode.unwrap_or(default_mode)));
    }
    let opts =
        PushOptions { uid, gid, mode: mode.or(Some(default_mode)).filter(|_| kind != "symlink"), parents: false };
    agent.push(&local, &path, &opts).await.map_err(|e| agent_err(&path, e))?;
    sync(serde_json::Value::Null)
}

/// `DELETE`: removes a file, a symlink or a directory tree.
pub async fn delete(
    State(d): State<App>,
    axum::extract::Path(name): axum::extract::Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let (agent, path) = target(&d, &name, &q)?;
    if path == "/" {
        return Err(ApiErr::bad("refusing to delete /"));
    }
    let request = ExecRequest {
        argv: vec!["rm".into(), "-rf".into(), "--".into(), path.clone()],
        env: vec![],
        cwd: None,
        user: None,
        tty: None,
        stdin: false,
    };
    let out = agent.exec_output(request, None).await.map_err(|e| agent_err(&path, e))?;
    if out.status.code() != 0 {
        return Err(ApiErr::new(500, format!("deleting {path}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    sync(serde_json::Value::Null)
}
