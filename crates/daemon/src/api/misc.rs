//! The rest of the API: the server, operations, events, console and logs,
//! images, networks, and the fixed `default` profile and project.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Method, Uri};
use axum::response::IntoResponse;
use serde_json::{json, Value};
use skiff_api::image::ImageSource;
use skiff_api::{
    Image, ImageAlias, ImageAliasesEntry, ImageAliasesPost, Network, NetworkLease, Server, ServerEnvironment,
};

use super::{recursion, sync, ApiErr, ApiResult, App, Body};
use crate::db::write;
use crate::instances as inst;

/// `GET /`.
pub async fn root() -> ApiResult {
    sync(vec!["/1.0"])
}

fn uname() -> (String, String) {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return ("unknown".into(), "unknown".into());
    }
    let s = |f: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates its fields.
        unsafe { std::ffi::CStr::from_ptr(f.as_ptr()) }.to_string_lossy().into_owned()
    };
    (s(&u.nodename), s(&u.release))
}

/// `GET /1.0`.
pub async fn server() -> ApiResult {
    let (host, release) = uname();
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    sync(Server {
        config: Default::default(),
        api_extensions: skiff_api::server::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        api_status: "stable".into(),
        api_version: "1.0".into(),
        auth: "trusted".into(),
        public: false,
        auth_methods: vec!["unix".into()],
        environment: ServerEnvironment {
            addresses: vec![],
            architectures: vec!["x86_64".into()],
            certificate: String::new(),
            certificate_fingerprint: String::new(),
            driver: "skiff-vmm".into(),
            driver_version: env!("CARGO_PKG_VERSION").into(),
            firewall: "nftables".into(),
            kernel: "Linux".into(),
            kernel_architecture: "x86_64".into(),
            kernel_features: Default::default(),
            kernel_version: release,
            lxc_features: Default::default(),
            os_name: field("NAME"),
            os_version: field("VERSION_ID"),
            project: "default".into(),
            server: "skiff".into(),
            server_clustered: false,
            server_event_mode: "full-mesh".into(),
            server_name: host,
            server_pid: std::process::id(),
            server_version: env!("CARGO_PKG_VERSION").into(),
            storage: "dir".into(),
            storage_version: String::new(),
            storage_supported_drivers: vec![],
        },
    })
}

/// `PUT/PATCH /1.0`: Skiff has no server config keys yet.
pub async fn server_put(Body(v): Body<Value>) -> ApiResult {
    match v.get("config").and_then(Value::as_object) {
        Some(c) if !c.is_empty() => Err(ApiErr::bad(format!(
            "unknown server config keys: {}",
            c.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
        _ => sync(Value::Null),
    }
}

/// `GET /1.0/instances/{name}/console`: the console log of the last boot.
pub async fn console_log(State(d): State<App>, Path(name): Path<String>) -> ApiResult {
    let r = inst::row(&d, &name)?;
    let spec = inst::spec(&d, &r)?;
    let path = inst::driver(&d, &r)?.console_log(&spec);
    let bytes = std::fs::read(&path).unwrap_or_default();
    let mut resp = bytes.into_response();
    resp.headers_mut().insert("Content-Type", HeaderValue::from_static("application/octet-stream"));
    Ok(resp)
}

/// `DELETE /1.0/instances/{name}/console`: clears the log.
pub async fn console_clear(State(d): State<App>, Path(name): Path<String>) -> ApiResult {
    let r = inst::row(&d, &name)?;
    let path = inst::driver(&d, &r)?.console_log(&inst::spec(&d, &r)?);
    if path.exists() {
        std::fs::write(&path, b"").map_err(|e| ApiErr::new(500, format!("clearing the console log: {e}")))?;
    }
    sync(Value::Null)
}

fn log_files(d: &App, name: &str) -> Vec<String> {
    let mut v = vec!["console.log".to_string()];
    if let Ok(rd) = std::fs::read_dir(inst::instance_dir(d, name).join("logs")) {
        v.extend(rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()));
    }
    v.sort();
    v
}

/// `GET /1.0/instances/{name}/logs`.
pub async fn logs(State(d): State<App>, Path(name): Path<String>) -> ApiResult {
    inst::row(&d, &name)?;
    sync(log_files(&d, &name).iter().map(|f| format!("/1.0/instances/{name}/logs/{f}")).collect::<Vec<_>>())
}

fn log_path(d: &App, name: &str, file: &str) -> Result<std::path::PathBuf, ApiErr> {
    let r = inst::row(d, name)?;
    if file == "console.log" {
        return Ok(inst::driver(d, &r)?.console_log(&inst::spec(d, &r)?));
    }
    if file.contains('/') || file.starts_with('.') || !log_files(d, name).iter().any(|f| f == file) {
        return Err(ApiErr::not_found("Log file"));
    }
    Ok(inst::instance_dir(d, name).join("logs").join(file))
}

/// `GET /1.0/instances/{name}/logs/{file}`.
pub async fn log_get(State(d): State<App>, Path((name, file)): Path<(String, String)>) -> ApiResult {
    let p = log_path(&d, &name, &file)?;
    let bytes = std::fs::read(&p).unwrap_or_default();
    let mut resp = bytes.into_response();
    resp.headers_mut().insert("Content-Type", HeaderValue::from_static("application/octet-stream"));
    Ok(resp)
}

/// `DELETE /1.0/instances/{name}/logs/{file}` (exec logs only).
pub async fn log_delete(State(d): State<App>, Path((name, file)): Path<(String, String)>) -> ApiResult {
    if file == "console.log" {
        return Err(ApiErr::bad("the console log is cleared with DELETE /1.0/instances/NAME/console"));
    }
    let p = log_path(&d, &name, &file)?;
    std::fs::remove_file(&p).map_err(|e| ApiErr::new(500, format!("{file}: {e}")))?;
    sync(Value::Null)
}

/// `GET /1.0/operations`.
pub async fn operations(State(d): State<App>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let mut by: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for op in d.ops.all() {
        let r = op.record();
        let key = r.status.to_lowercase();
        let v = if recursion(&q) >= 1 {
            serde_json::to_value(&r).unwrap_or(Value::Null)
        } else {
            json!(format!("/1.0/operations/{}", r.id))
        };
        by.entry(key).or_default().push(v);
    }
    sync(by)
}

/// `GET /1.0/operations/{id}`.
pub async fn operation(State(d): State<App>, Path(id): Path<String>) -> ApiResult {
    let op = d.ops.get(&id).ok_or_else(|| ApiErr::not_found("Operation"))?;
    sync(op.record())
}

/// `DELETE /1.0/operations/{id}`: cancel.
pub async fn operation_cancel(State(d): State<App>, Path(id): Path<String>) -> ApiResult {
    match d.ops.cancel(&id) {
        None => Err(ApiErr::not_found("Operation")),
        Some(false) => Err(ApiErr::bad("This operation can't be cancelled")),
        Some(true) => sync(Value::Null),
    }
}

/// `GET /1.0/operations/{id}/wait?timeout=N` (-1 or absent: forever).
pub async fn operation_wait(
    State(d): State<App>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let op = d.ops.get(&id).ok_or_else(|| ApiErr::not_found("Operation"))?;
    let limit = q.get("timeout").and_then(|t| t.parse::<f64>().ok()).filter(|t| *t >= 0.0).map(Duration::from_secs_f64);
    op.wait(limit).await;
    sync(op.record())
}

/// `GET /1.0/operations/{id}/websocket?secret=S`.
pub async fn operation_websocket(
    State(d): State<App>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> ApiResult {
    let op = d.ops.get(&id).ok_or_else(|| ApiErr::not_found("Operation"))?;
    let secret = q.get("secret").cloned().unwrap_or_default();
    if !op.knows_secret(&secret) {
        return Err(ApiErr::new(403, "wrong or already used websocket secret"));
    }
    Ok(ws.on_upgrade(move |socket| async move {
        op.connect(&secret, socket);
    }))
}

/// `GET /1.0/events?type=lifecycle,operation,logging` (websocket).
pub async fn events(
    State(d): State<App>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> impl IntoResponse {
    let types: Vec<String> = q.get("type").map(|t| t.split(',').map(str::to_string).collect()).unwrap_or_default();
    let mut rx = d.events.subscribe();
    ws.on_upgrade(move |mut socket| async move {
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        if !types.is_empty() && !types.iter().any(|t| t == ev.kind.as_str()) {
                            continue;
                        }
                        let text = serde_json::to_string(&ev).unwrap_or_default();
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                },
                msg = socket.recv() => match msg {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    _ => {}
                },
            }
        }
    })
}

fn image_api(
    d: &App,
    recs: &[skiff_oci::ImageRecord],
    aliases: &std::collections::BTreeMap<String, (String, String)>,
) -> Vec<Image> {
    let mut out: Vec<Image> = Vec::new();
    for r in recs {
        let fp = r.manifest.hex().to_string();
        if let Some(img) = out.iter_mut().find(|i| i.fingerprint == fp) {
            img.properties.entry("oci.references".into()).and_modify(|v| {
                v.push(' ');
                v.push_str(&r.name)
            });
            continue;
        }
        let when = std::time::UNIX_EPOCH + Duration::from_secs(r.stored_at);
        let t = skiff_api::time::format(when);
        let used = !d.images.store().users(&r.manifest).is_empty();
        out.push(Image {
            fingerprint: fp.clone(),
            aliases: aliases
                .iter()
                .filter(|(_, (t, _))| *t == fp)
                .map(|(n, (_, desc))| ImageAlias { name: n.clone(), description: desc.clone() })
                .collect(),
            architecture: "x86_64".into(),
            cached: true,
            public: false,
            properties: [
                ("oci.references".to_string(), r.name.clone()),
                ("description".to_string(), r.name.clone()),
                ("in_use".to_string(), used.to_string()),
                ("format".to_string(), "oci".to_string()),
            ]
            .into(),
            size: r.size(),
            // OCI images run as thin VMs (LXD's clients check the type
            // against --vm); `properties.format` says they are OCI.
            kind: "virtual-machine".into(),
            created_at: t.clone(),
            uploaded_at: t.clone(),
            last_used_at: t,
            update_source: Some(ImageSource { alias: r.name.clone(), server: String::new(), protocol: "oci".into() }),
            filename: r.name.clone(),
        });
    }
    out
}

fn all_images(d: &App) -> Result<Vec<Image>, ApiErr> {
    let recs = d.images.list().map_err(|e| ApiErr::new(500, e.to_string()))?;
    let aliases = d.db().aliases()?;
    Ok(image_api(d, &recs, &aliases))
}

/// `GET /1.0/images`.
pub async fn images(State(d): State<App>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let all = all_images(&d)?;
    if recursion(&q) >= 1 {
        sync(all)
    } else {
        sync(all.iter().map(|i| format!("/1.0/images/{}", i.fingerprint)).collect::<Vec<_>>())
    }
}

fn find_image(d: &App, fp: &str) -> Result<Image, ApiErr> {
    let rec = d.images.find(fp).map_err(|e| ApiErr::new(404, e.to_string()))?;
    all_images(d)?.into_iter().find(|i| i.fingerprint == rec.manifest.hex()).ok_or_else(|| ApiErr::not_found("Image"))
}

/// `GET /1.0/images/{fp}`.
pub async fn image(State(d): State<App>, Path(fp): Path<String>) -> ApiResult {
    sync(find_image(&d, &fp)?)
}

/// `DELETE /1.0/images/{fp}`.
pub async fn image_delete(State(d): State<App>, Path(fp): Path<String>) -> ApiResult {
    let rec = d.images.find(&fp).map_err(|e| ApiErr::new(404, e.to_string()))?;
    d.images.delete(&rec).map_err(|e| ApiErr::new(409, e.to_string()))?;
    let hex = rec.manifest.hex().to_string();
    d.db().tx(|tx| {
        tx.execute("DELETE FROM image_aliases WHERE target = ?1", [&hex]).map_err(crate::db::DbError::from)?;
        Ok::<_, crate::db::DbError>(())
    })?;
    let (op, _) = d.ops.create(skiff_api::OperationClass::Task, "Deleting image", None, Value::Null, false, &[]);
    d.ops.run(&op, async { Ok(None) });
    super::accepted(&op)
}

/// `GET /1.0/images/aliases`.
pub async fn aliases(State(d): State<App>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let a = d.db().aliases()?;
    if recursion(&q) >= 1 {
        sync(
            a.into_iter()
                .map(|(name, (target, description))| ImageAliasesEntry {
                    name,
                    description,
                    target,
                    kind: "virtual-machine".into(),
                })
                .collect::<Vec<_>>(),
        )
    } else {
        sync(a.keys().map(|n| format!("/1.0/images/aliases/{n}")).collect::<Vec<_>>())
    }
}

/// `POST /1.0/images/aliases`.
pub async fn alias_post(State(d): State<App>, Body(req): Body<ImageAliasesPost>) -> ApiResult {
    if req.name.is_empty() || req.name.contains('/') && !req.name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiErr::bad(format!("invalid alias name {:?}", req.name)));
    }
    let rec = d.images.find(&req.target).map_err(|e| ApiErr::new(404, e.to_string()))?;
    if d.db().aliases()?.contains_key(&req.name) {
        return Err(ApiErr::new(409, format!("Alias {:?} already exists", req.name)));
    }
    let hex = rec.manifest.hex().to_string();
    d.db().tx(|tx| write::set_alias(tx, &req.name, &hex, &req.description))?;
    sync(Value::Null)
}

/// `GET /1.0/images/aliases/{alias}`.
pub async fn alias_get(State(d): State<App>, Path(alias): Path<String>) -> ApiResult {
    let a = d.db().aliases()?;
    let (target, description) = a.get(&alias).cloned().ok_or_else(|| ApiErr::not_found("Alias"))?;
    sync(ImageAliasesEntry { name: alias, description, target, kind: "virtual-machine".into() })
}

/// `DELETE /1.0/images/aliases/{alias}`.
pub async fn alias_delete(State(d): State<App>, Path(alias): Path<String>) -> ApiResult {
    if !d.db().tx(|tx| write::delete_alias(tx, &alias))? {
        return Err(ApiErr::not_found("Alias"));
    }
    sync(Value::Null)
}

fn network_api(d: &App) -> Option<Network> {
    let net = d.net.as_ref()?;
    let (_, prefix) = net.subnet();
    let used_by = d
        .db()
        .instances()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.status != crate::db::Status::Creating)
        .map(|r| format!("/1.0/instances/{}", r.name))
        .collect();
    Some(Network {
        name: net.name().into(),
        description: "Skiff's managed bridge".into(),
        kind: "bridge".into(),
        managed: true,
        status: "Created".into(),
        config: [
            ("ipv4.address".to_string(), format!("{}/{prefix}", net.gateway())),
            ("ipv4.nat".to_string(), "true".into()),
            ("ipv6.address".to_string(), "none".into()),
            ("dns.domain".to_string(), net.domain().into()),
        ]
        .into(),
        used_by,
        locations: vec![],
    })
}

/// `GET /1.0/networks`.
pub async fn networks(State(d): State<App>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let nets: Vec<Network> = network_api(&d).into_iter().collect();
    if recursion(&q) >= 1 {
        sync(nets)
    } else {
        sync(nets.iter().map(|n| format!("/1.0/networks/{}", n.name)).collect::<Vec<_>>())
    }
}

/// `GET /1.0/networks/{net}`.
pub async fn network(State(d): State<App>, Path(name): Path<String>) -> ApiResult {
    sync(network_api(&d).filter(|n| n.name == name).ok_or_else(|| ApiErr::not_found("Network"))?)
}

/// `GET /1.0/networks/{net}/leases`.
pub async fn leases(State(d): State<App>, Path(name): Path<String>) -> ApiResult {
    let net = d.net.as_ref().filter(|n| n.name() == name).ok_or_else(|| ApiErr::not_found("Network"))?;
    sync(
        net.leases()
            .into_iter()
            .map(|l| NetworkLease {
                hostname: l.hostname.clone().unwrap_or_default(),
                hwaddr: l.mac.clone(),
                address: l.ip.to_string(),
                kind: "dynamic".into(),
                location: "none".into(),
            })
            .collect::<Vec<_>>(),
    )
}

/// `GET /1.0/profiles`.
pub async fn profiles(Query(q): Query<HashMap<String, String>>) -> ApiResult {
    if recursion(&q) >= 1 {
        sync(vec![default_profile()])
    } else {
        sync(vec!["/1.0/profiles/default"])
    }
}

fn default_profile() -> Value {
    json!({"name": "default", "description": "Default profile", "config": {}, "devices": {}, "used_by": []})
}

/// `GET /1.0/profiles/{p}`.
pub async fn profile(Path(p): Path<String>) -> ApiResult {
    if p != "default" {
        return Err(ApiErr::not_found("Profile"));
    }
    sync(default_profile())
}

/// `GET /1.0/projects`.
pub async fn projects(Query(q): Query<HashMap<String, String>>) -> ApiResult {
    if recursion(&q) >= 1 {
        sync(vec![default_project()])
    } else {
        sync(vec!["/1.0/projects/default"])
    }
}

fn default_project() -> Value {
    json!({"name": "default", "description": "Default project", "config": {"features.images": "true", "features.profiles": "true"}, "used_by": []})
}

/// `GET /1.0/projects/{p}`.
pub async fn project(Path(p): Path<String>) -> ApiResult {
    if p != "default" {
        return Err(ApiErr::not_found("Project"));
    }
    sync(default_project())
}

/// Anything else: 404 in the API's shape.
pub async fn fallback(method: Method, uri: Uri) -> ApiErr {
    ApiErr::new(404, format!("{method} {}: no such API endpoint", uri.path()))
}
