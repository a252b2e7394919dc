//! `image list|info|delete|import|alias`: `GET /1.0/images?recursion=1`,
//! `GET /1.0/images/{fingerprint}`, `DELETE /1.0/images/{fingerprint}`,
//! `POST /1.0/images` (the tarball as the body, as LXD's client sends it:
//! `X-LXD-filename`, `X-LXD-properties`; then the aliases),
//! `POST|DELETE|GET /1.0/images/aliases`. An image is named by an alias
//! (`GET /1.0/images/aliases/{alias}`) or a fingerprint (prefix).

use std::fmt::Write as _;

use anyhow::Context;
use hyper::Method;
use serde_json::Value;
use skiff_api::{Image, ImageAliasesEntry, ImageAliasesPost};

use super::Ctx;
use crate::cli::{AliasCmd, ImageCmd};
use crate::client::{self, encode_query, encode_segment, Body, Client};
use crate::format::{self, Table};

/// The description column: `description`, else the OCI reference.
fn describe(i: &Image) -> String {
    i.properties.get("description").or_else(|| i.properties.get("oci.reference")).cloned().unwrap_or_default()
}

/// ALIASES, FINGERPRINT, DESCRIPTION, TYPE, SIZE, UPLOADED.
pub fn image_table(images: &[Image]) -> Table {
    let mut t = Table::new(&["ALIASES", "FINGERPRINT", "DESCRIPTION", "TYPE", "SIZE", "UPLOADED"]);
    for i in images {
        let aliases: Vec<&str> = i.aliases.iter().map(|a| a.name.as_str()).collect();
        t.row(vec![
            aliases.join("\n"),
            i.fingerprint.chars().take(12).collect(),
            describe(i),
            i.kind.to_uppercase(),
            format::bytes(i.size),
            format::time(if i.uploaded_at.is_empty() { &i.created_at } else { &i.uploaded_at }),
        ]);
    }
    t
}

/// The fingerprint of an alias or fingerprint (prefix).
async fn resolve(client: &Client, image: &str) -> anyhow::Result<String> {
    let alias = format!("/1.0/images/aliases/{}", encode_segment(image));
    if let Ok(a) = client.get::<ImageAliasesEntry>(&alias).await {
        return Ok(a.target);
    }
    let img: Image = client.get(&format!("/1.0/images/{}", encode_segment(image))).await?;
    Ok(img.fingerprint)
}

/// The text of `image info`.
pub fn render(i: &Image) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Fingerprint: {}", i.fingerprint);
    let _ = writeln!(o, "Size: {}", format::bytes(i.size));
    let _ = writeln!(o, "Architecture: {}", i.architecture);
    let _ = writeln!(o, "Type: {}", i.kind);
    let _ = writeln!(o, "Public: {}", if i.public { "yes" } else { "no" });
    let _ = writeln!(o, "Timestamps:");
    let _ = writeln!(o, "    Created: {}", format::time(&i.created_at));
    let _ = writeln!(o, "    Uploaded: {}", format::time(&i.uploaded_at));
    let _ = writeln!(o, "    Last used: {}", format::time(&i.last_used_at));
    let _ = writeln!(o, "Properties:");
    for (k, v) in &i.properties {
        let _ = writeln!(o, "    {k}: {v}");
    }
    let _ = writeln!(o, "Aliases:");
    for a in &i.aliases {
        let _ = writeln!(o, "    - {}", a.name);
    }
    let _ = writeln!(o, "Cached: {}", if i.cached { "yes" } else { "no" });
    if let Some(s) = &i.update_source {
        let _ = writeln!(o, "Source:\n    Server: {}\n    Protocol: {}\n    Alias: {}", s.server, s.protocol, s.alias);
    }
    o
}

/// Sends a tarball or a disk image to `POST /1.0/images`, waits for the import; its fingerprint.
async fn import(
    client: &Client,
    file: &std::path::Path,
    format: Option<&str>,
    properties: &[(String, String)],
) -> anyhow::Result<String> {
    let f = tokio::fs::File::open(file).await.with_context(|| format!("opening {}", file.display()))?;
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let props: Vec<String> =
        properties.iter().map(|(k, v)| format!("{}={}", encode_query(k), encode_query(v))).collect();
    let mut headers = vec![("X-LXD-filename", name), ("X-LXD-public", "0".to_string())];
    if !props.is_empty() {
        headers.push(("X-LXD-properties", props.join("&")));
    }
    if let Some(f) = format {
        headers.push(("X-Skiff-Format", f.to_string()));
    }
    let raw = client.raw(Method::POST, "/1.0/images", &headers, Body::File(f)).await?;
    let env = raw.envelope()?;
    if env.kind == skiff_api::ResponseType::Error {
        let code = if env.error_code != 0 { env.error_code } else { raw.status.as_u16() };
        return Err(client::ClientError::Remote { code, message: env.error }.into());
    }
    let op: skiff_api::Operation = client::decode(env.metadata)?;
    let done = client.wait(&op.id).await?;
    done.metadata["fingerprint"].as_str().map(str::to_string).context("the import's operation gave no fingerprint")
}

/// Runs an `image` command.
pub async fn run(ctx: &Ctx, c: ImageCmd) -> anyhow::Result<i32> {
    let client = &ctx.client;
    match c {
        ImageCmd::List { format } => {
            let raw: Vec<Value> = client.get("/1.0/images?recursion=1").await.context("Failed to list images")?;
            let images: Vec<Image> = client::decode(Value::Array(raw.clone()))?;
            format::print_list(format, &image_table(&images), &raw)?;
        }
        ImageCmd::Info { image } => {
            let fail = || format!("Failed to get the image \"{image}\"");
            let fp = resolve(client, &image).await.with_context(fail)?;
            let img: Image = client.get(&format!("/1.0/images/{}", encode_segment(&fp))).await.with_context(fail)?;
            format::emit(render(&img));
        }
        ImageCmd::Delete { images } => {
            for image in images {
                let fail = || format!("Failed to delete the image \"{image}\"");
                let fp = resolve(client, &image).await.with_context(fail)?;
                client
                    .run(Method::DELETE, &format!("/1.0/images/{}", encode_segment(&fp)), None)
                    .await
                    .with_context(fail)?;
            }
        }
        ImageCmd::Import { file, format, aliases, properties } => {
            let fail = || format!("Failed to import {}", file.display());
            let fp = import(client, &file, format.as_deref(), &properties).await.with_context(fail)?;
            println!("Image imported with fingerprint: {fp}");
            for alias in aliases {
                let body = ImageAliasesPost { name: alias.clone(), description: String::new(), target: fp.clone() };
                client
                    .run(Method::POST, "/1.0/images/aliases", Some(&client::json(&body)))
                    .await
                    .with_context(|| format!("Failed to create the alias \"{alias}\""))?;
            }
        }
        ImageCmd::Alias(AliasCmd::Create { alias, fingerprint, description }) => {
            let body = ImageAliasesPost { name: alias.clone(), description, target: fingerprint };
            client
                .run(Method::POST, "/1.0/images/aliases", Some(&client::json(&body)))
                .await
                .with_context(|| format!("Failed to create the alias \"{alias}\""))?;
        }
        ImageCmd::Alias(AliasCmd::Delete { alias }) => {
            client
                .run(Method::DELETE, &format!("/1.0/images/aliases/{}", encode_segment(&alias)), None)
                .await
                .with_context(|| format!("Failed to delete the alias \"{alias}\""))?;
        }
        ImageCmd::Alias(AliasCmd::List { format }) => {
            let raw: Vec<Value> =
                client.get("/1.0/images/aliases?recursion=1").await.context("Failed to list image aliases")?;
            let aliases: Vec<ImageAliasesEntry> = client::decode(Value::Array(raw.clone()))?;
            let mut t = Table::new(&["ALIAS", "FINGERPRINT", "TYPE", "DESCRIPTION"]);
            for a in &aliases {
                let fp = a.target.chars().take(12).collect();
                t.row(vec![a.name.clone(), fp, a.kind.to_uppercase(), a.description.clone()]);
            }
            format::print_list(format, &t, &raw)?;
        }
    }
    Ok(0)
}
