//! `/1.0/images` and `/1.0/images/aliases`: OCI images from the store
//! (pulled or imported by `skiff-oci`) and system images imported here
//! (`POST /1.0/images` with a unified tarball as the body, as LXD's
//! client sends it: `lxc image import FILE`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde_json::{json, Value};
use skiff_api::image::ImageSource;
use skiff_api::{Image, ImageAlias, ImageAliasesEntry, ImageAliasesPost};

use super::{recursion, sync, ApiErr, ApiResult, App, Body};
use crate::db::write;
use crate::images::chain;
use crate::sysimages::{disk, SystemImage, SystemImageError, SystemImages};

fn aliases_of(aliases: &BTreeMap<String, (String, String)>, fp: &str) -> Vec<ImageAlias> {
    aliases
        .iter()
        .filter(|(_, (t, _))| *t == fp)
        .map(|(n, (_, desc))| ImageAlias { name: n.clone(), description: desc.clone() })
        .collect()
}

fn image_api(d: &App, recs: &[skiff_oci::ImageRecord], aliases: &BTreeMap<String, (String, String)>) -> Vec<Image> {
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
            aliases: aliases_of(aliases, &fp),
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

/// A system image as the API shows it: type `container`, its metadata's
/// properties, `format: unified`.
fn system_api(d: &App, img: &SystemImage, aliases: &BTreeMap<String, (String, String)>) -> Image {
    let time = |s: u64| skiff_api::time::format(std::time::UNIX_EPOCH + Duration::from_secs(s));
    let used = SystemImages::use_key(&img.fingerprint).is_ok_and(|k| !d.images.store().users(&k).is_empty());
    let mut properties = img.properties.clone();
    properties.insert("in_use".into(), used.to_string());
    properties.insert("format".into(), img.disk_format.clone().unwrap_or_else(|| "unified".into()));
    Image {
        fingerprint: img.fingerprint.clone(),
        aliases: aliases_of(aliases, &img.fingerprint),
        architecture: img.architecture.clone(),
        cached: false,
        public: false,
        properties,
        size: img.size,
        kind: if img.disk_format.is_some() { "virtual-machine" } else { "container" }.into(),
        created_at: time(img.created_at),
        uploaded_at: time(img.uploaded_at),
        last_used_at: time(img.uploaded_at),
        update_source: None,
        filename: img.filename.clone(),
    }
}

fn all_images(d: &App) -> Result<Vec<Image>, ApiErr> {
    let recs = d.images.list().map_err(|e| ApiErr::new(500, e.to_string()))?;
    let aliases = d.db().aliases()?;
    let mut all: Vec<Image> = d.images.system().list().iter().map(|i| system_api(d, i, &aliases)).collect();
    all.extend(image_api(d, &recs, &aliases));
    Ok(all)
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
    let fp = d.images.fingerprint_of(fp).map_err(|e| ApiErr::new(404, e.to_string()))?;
    all_images(d)?.into_iter().find(|i| i.fingerprint == fp).ok_or_else(|| ApiErr::not_found("Image"))
}

/// `GET /1.0/images/{fp}`.
pub async fn image(State(d): State<App>, Path(fp): Path<String>) -> ApiResult {
    sync(find_image(&d, &fp)?)
}

/// `DELETE /1.0/images/{fp}`.
pub async fn image_delete(State(d): State<App>, Path(fp): Path<String>) -> ApiResult {
    let hex = if let Some(img) = d.images.system().find(&fp) {
        d.images.system().delete(&img.fingerprint).map_err(|e| ApiErr::new(e.status(), chain(&e)))?;
        img.fingerprint
    } else {
        let rec = d.images.find(&fp).map_err(|e| ApiErr::new(404, e.to_string()))?;
        d.images.delete(&rec).map_err(|e| ApiErr::new(409, e.to_string()))?;
        rec.manifest.hex().to_string()
    };
    d.db().tx(|tx| {
        tx.execute("DELETE FROM image_aliases WHERE target = ?1", [&hex]).map_err(crate::db::DbError::from)?;
        Ok::<_, crate::db::DbError>(())
    })?;
    let (op, _) = d.ops.create(skiff_api::OperationClass::Task, "Deleting image", None, Value::Null, false, &[]);
    d.ops.run(&op, async { Ok(None) });
    super::accepted(&op)
}

/// A header's text (LXD's `X-LXD-*` or Incus's `X-Incus-*` spelling).
fn header(h: &HeaderMap, name: &str) -> Option<String> {
    [format!("X-LXD-{name}"), format!("X-Incus-{name}")]
        .iter()
        .find_map(|k| h.get(k.as_str()))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|v| !v.is_empty())
}

/// `X-LXD-properties`: `key=value&...`, URL-encoded.
fn parse_properties(text: &str) -> Result<BTreeMap<String, String>, ApiErr> {
    let uri: axum::http::Uri = format!("/?{text}")
        .parse()
        .map_err(|_| ApiErr::bad(format!("X-LXD-properties {text:?} is not URL-encoded key=value pairs")))?;
    let Query(q) = Query::<HashMap<String, String>>::try_from_uri(&uri)
        .map_err(|e| ApiErr::bad(format!("X-LXD-properties: {}", e.body_text())))?;
    Ok(q.into_iter().filter(|(k, _)| !k.is_empty()).collect())
}

/// `POST /1.0/images`: a system image's unified tarball, or a VM's disk
/// image (raw or qcow2: `X-Skiff-Format`, else told by the qcow2 magic),
/// as the body. The upload is stored and checked here (neither: 400,
/// already there: 409); unpacking (a disk: its header and table check)
/// is the operation, whose metadata ends with the fingerprint (LXD's
/// client then makes the aliases).
pub async fn image_post(State(d): State<App>, headers: HeaderMap, body: axum::body::Body) -> ApiResult {
    let ctype = headers.get("Content-Type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if ctype.starts_with("multipart/") {
        return Err(ApiErr::bad(
            "split images (metadata and rootfs as two files) are not supported: \
             pack metadata.yaml and rootfs/ into one unified tarball",
        ));
    }
    if ctype.starts_with("application/json") {
        return Err(ApiErr::bad(
            "Skiff imports system images from a tarball sent as the body (application/octet-stream); \
             OCI images are pulled at launch or imported with skiff-oci",
        ));
    }
    let format = match headers.get("X-Skiff-Format").map(|v| v.to_str().unwrap_or("")) {
        Some(f) => Some(f.parse::<disk_image::Format>().map_err(|e| ApiErr::bad(format!("X-Skiff-Format: {e}")))?),
        None => None,
    };
    let filename = header(&headers, "filename").unwrap_or_default();
    let properties = match header(&headers, "properties") {
        Some(p) => parse_properties(&p)?,
        None => BTreeMap::new(),
    };
    let system = d.images.system().clone();
    let bad = |e: SystemImageError| ApiErr::new(e.status(), chain(&e));
    let upload = system.receive(body.into_data_stream()).await.map_err(bad)?;
    if let Some(want) = header(&headers, "fingerprint").filter(|f| f != upload.fingerprint()) {
        return Err(ApiErr::bad(format!(
            "the upload's fingerprint is {}, not {want} as X-LXD-fingerprint says",
            upload.fingerprint()
        )));
    }
    let disk = format.or_else(|| disk::is_qcow2(&upload).then_some(disk_image::Format::Qcow2));
    if disk.is_none() {
        SystemImages::sniff(&upload).map_err(|e| match e {
            SystemImageError::NotTarball(why) => ApiErr::bad(format!(
                "{}; a raw disk image needs --format raw (X-Skiff-Format: raw)",
                SystemImageError::NotTarball(why)
            )),
            e => bad(e),
        })?;
    }
    if system.find(upload.fingerprint()).is_some() {
        return Err(bad(SystemImageError::Exists(upload.fingerprint().to_string())));
    }
    if let Some(format) = disk {
        // Checked before the answer, so a bad image is a 400 of this request.
        let s = system.clone();
        let img = tokio::task::spawn_blocking(move || s.import_disk(&upload, format, &filename, properties))
            .await
            .map_err(|e| ApiErr::new(500, format!("import task: {e}")))?
            .map_err(bad)?;
        log::info!("imported {format} disk image {} ({} bytes)", img.fingerprint, img.size);
        let (op, _) = d.ops.create(skiff_api::OperationClass::Task, "Importing image", None, Value::Null, false, &[]);
        let done = json!({"fingerprint": img.fingerprint, "size": img.size});
        d.ops.run(&op, async move { Ok(Some(done)) });
        return super::accepted(&op);
    }
    let (op, _) = d.ops.create(skiff_api::OperationClass::Task, "Importing image", None, Value::Null, false, &[]);
    d.ops.run(&op, async move {
        let img = tokio::task::spawn_blocking(move || system.import(&upload, &filename, properties))
            .await
            .map_err(|e| crate::ops::OpError::Failed(format!("import task: {e}")))?
            .map_err(|e| crate::ops::OpError::Failed(chain(&e)))?;
        log::info!("imported system image {} ({} bytes)", img.fingerprint, img.size);
        Ok(Some(json!({"fingerprint": img.fingerprint, "size": img.size})))
    });
    super::accepted(&op)
}

fn alias_kind(d: &App, target: &str) -> String {
    match d.images.system().find(target) {
        Some(img) if img.disk_format.is_none() => "container",
        _ => "virtual-machine",
    }
    .into()
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
                    kind: alias_kind(&d, &target),
                    target,
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
    let hex = d.images.fingerprint_of(&req.target).map_err(|e| ApiErr::new(404, e.to_string()))?;
    if d.db().aliases()?.contains_key(&req.name) {
        return Err(ApiErr::new(409, format!("Alias {:?} already exists", req.name)));
    }
    d.db().tx(|tx| write::set_alias(tx, &req.name, &hex, &req.description))?;
    sync(Value::Null)
}

/// `GET /1.0/images/aliases/{alias}`.
pub async fn alias_get(State(d): State<App>, Path(alias): Path<String>) -> ApiResult {
    let a = d.db().aliases()?;
    let (target, description) = a.get(&alias).cloned().ok_or_else(|| ApiErr::not_found("Alias"))?;
    sync(ImageAliasesEntry { name: alias, description, kind: alias_kind(&d, &target), target })
}

/// `DELETE /1.0/images/aliases/{alias}`.
pub async fn alias_delete(State(d): State<App>, Path(alias): Path<String>) -> ApiResult {
    if !d.db().tx(|tx| write::delete_alias(tx, &alias))? {
        return Err(ApiErr::not_found("Alias"));
    }
    sync(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_header() {
        let p = parse_properties("os=debian&description=Debian%2012%20system").unwrap();
        assert_eq!(p["os"], "debian");
        assert_eq!(p["description"], "Debian 12 system");
        assert!(parse_properties("").unwrap().is_empty());
    }
}
