//! `file push|pull|delete`: `/1.0/instances/{name}/files?path=ABS`.
//!
//! - push: `POST` with the bytes (a symlink: its target) and the headers
//!   `X-LXD-type` (file, directory, symlink), `X-LXD-mode` (octal, the local
//!   file's unless `--mode`), `X-LXD-uid`/`X-LXD-gid` (when given) and
//!   `X-LXD-write: overwrite`. `-p` creates missing parents (GET, then
//!   POST a directory), `-r` walks a local tree.
//! - pull: `GET`; a file comes back raw with `X-LXD-type/mode/uid/gid`, a
//!   directory as an envelope listing its entries (`-r` walks it); the
//!   mode is kept.
//! - delete: `DELETE`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use hyper::body::Bytes;
use hyper::Method;
use skiff_api::files::{parse_mode, GID, MODE, TYPE, UID, WRITE};
use skiff_api::ResponseType;

use super::{instance_path, Ctx};
use crate::cli::FileCmd;
use crate::client::{self, Body, Client, ClientError};

/// `NAME/PATH` → (`NAME`, `/PATH`).
pub fn split_target(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('/') {
        Some((name, rest)) if !name.is_empty() => Ok((name.to_string(), format!("/{rest}"))),
        _ => bail!("Invalid target \"{s}\": expected NAME/PATH"),
    }
}

fn files_path(name: &str, path: &str) -> String {
    instance_path(name, &format!("/files?path={}", client::encode_query(path)))
}

/// Joins a remote directory and a name.
fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn base_name(p: &str) -> anyhow::Result<&str> {
    p.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| anyhow!("No file name in \"{p}\""))
}

/// Owner and mode for pushes.
#[derive(Debug, Clone, Default)]
struct PushOpts {
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
}

/// Runs a `file` command.
pub async fn run(ctx: &Ctx, c: FileCmd) -> anyhow::Result<i32> {
    let client = &ctx.client;
    match c {
        FileCmd::Push { paths, recursive, create_dirs, uid, gid, mode } => {
            let mode = match mode {
                Some(m) => Some(parse_mode(&m).ok_or_else(|| anyhow!("Invalid mode \"{m}\" (octal, e.g. 0644)"))?),
                None => None,
            };
            let opts = PushOpts { uid, gid, mode };
            let (target, sources) = paths.split_last().context("Nothing to push")?;
            let (name, tpath) = split_target(target)?;
            let into_dir = sources.len() > 1 || recursive || tpath.ends_with('/');
            for src in sources {
                let local = Path::new(src);
                let remote = if into_dir { join(&tpath, base_name(src)?) } else { tpath.clone() };
                let fail = || format!("Failed to push {src} to {name}{remote}");
                if create_dirs {
                    let parent = remote.rsplit_once('/').map_or("/", |(p, _)| if p.is_empty() { "/" } else { p });
                    mkdir_p(client, &name, parent).await.with_context(fail)?;
                }
                push(client, &name, local, &remote, &opts, recursive).await.with_context(fail)?;
            }
        }
        FileCmd::Pull { paths, recursive, create_dirs } => {
            let (dest, sources) = paths.split_last().context("Nothing to pull")?;
            for src in sources {
                let (name, path) = split_target(src)?;
                let fail = || format!("Failed to pull {src}");
                if dest == "-" {
                    let f = get(client, &name, &path).await.with_context(fail)?;
                    crate::format::emit(&f.body);
                    continue;
                }
                let d = Path::new(dest);
                let local = if sources.len() > 1 || d.is_dir() || dest.ends_with('/') {
                    d.join(base_name(&path)?)
                } else {
                    d.to_path_buf()
                };
                if create_dirs {
                    if let Some(p) = local.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::create_dir_all(p).with_context(fail)?;
                    }
                }
                pull(client, &name, &path, &local, recursive).await.with_context(fail)?;
            }
        }
        FileCmd::Delete { targets } => {
            for t in targets {
                let (name, path) = split_target(&t)?;
                client
                    .run(Method::DELETE, &files_path(&name, &path), None)
                    .await
                    .with_context(|| format!("Failed to delete {t}"))?;
            }
        }
    }
    Ok(0)
}

/// POSTs one file, directory or symlink.
async fn post(
    client: &Client,
    name: &str,
    path: &str,
    kind: &str,
    mode: u32,
    opts: &PushOpts,
    body: Bytes,
) -> anyhow::Result<()> {
    let mut headers = vec![(TYPE[0], kind.to_string()), (MODE[0], format!("{:04o}", mode & 0o7777))];
    headers.push((WRITE[0], "overwrite".into()));
    if let Some(u) = opts.uid {
        headers.push((UID[0], u.to_string()));
    }
    if let Some(g) = opts.gid {
        headers.push((GID[0], g.to_string()));
    }
    let raw = client.raw(Method::POST, &files_path(name, path), &headers, Body::Raw(body)).await?;
    let env = raw.envelope()?;
    if env.kind == ResponseType::Error {
        return Err(ClientError::Remote { code: env.error_code, message: env.error }.into());
    }
    if env.kind == ResponseType::Async {
        let op: skiff_api::Operation = client::decode(env.metadata)?;
        client.wait(&op.id).await?;
    }
    Ok(())
}

/// Pushes `local` to `remote` (a tree when `recursive`).
async fn push(
    client: &Client,
    name: &str,
    local: &Path,
    remote: &str,
    opts: &PushOpts,
    recursive: bool,
) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(local).with_context(|| format!("Failed to read {}", local.display()))?;
    let mode = opts.mode.unwrap_or(meta.mode());
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(local)?;
        let bytes = Bytes::from(target.as_os_str().as_encoded_bytes().to_vec());
        return post(client, name, remote, "symlink", 0o777, opts, bytes).await;
    }
    if ft.is_dir() {
        if !recursive {
            bail!("{} is a directory (use -r)", local.display());
        }
        let dir_opts = PushOpts { mode: None, ..opts.clone() };
        post(client, name, remote, "directory", meta.mode(), &dir_opts, Bytes::new()).await?;
        let mut entries: Vec<_> = std::fs::read_dir(local)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let child = join(remote, &e.file_name().to_string_lossy());
            Box::pin(push(client, name, &e.path(), &child, opts, true)).await?;
        }
        return Ok(());
    }
    let bytes = std::fs::read(local).with_context(|| format!("Failed to read {}", local.display()))?;
    post(client, name, remote, "file", mode, opts, Bytes::from(bytes)).await
}

/// Creates `dir` and its missing parents in the instance.
async fn mkdir_p(client: &Client, name: &str, dir: &str) -> anyhow::Result<()> {
    let mut cur = String::new();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        cur = format!("{cur}/{part}");
        match get(client, name, &cur).await {
            Ok(f) if f.kind == "directory" => {}
            Ok(_) => bail!("{cur} exists and is not a directory"),
            Err(e) if e.downcast_ref::<ClientError>().and_then(ClientError::code) == Some(404) => {
                post(client, name, &cur, "directory", 0o755, &PushOpts::default(), Bytes::new()).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A file as read from the instance.
struct Remote {
    kind: String,
    mode: Option<u32>,
    body: Bytes,
    entries: Vec<String>,
}

async fn get(client: &Client, name: &str, path: &str) -> anyhow::Result<Remote> {
    let raw = client.raw(Method::GET, &files_path(name, path), &[], Body::Empty).await?;
    if !raw.status.is_success() {
        let env = raw.envelope()?;
        return Err(ClientError::Remote { code: env.error_code.max(raw.status.as_u16()), message: env.error }.into());
    }
    let kind = raw.header(&TYPE).unwrap_or_else(|| if raw.is_json() { "directory".into() } else { "file".into() });
    let mode = raw.header(&MODE).and_then(|m| parse_mode(&m));
    let mut entries = Vec::new();
    if kind == "directory" {
        let env = raw.envelope()?;
        if env.kind == ResponseType::Error {
            return Err(ClientError::Remote { code: env.error_code, message: env.error }.into());
        }
        entries = client::decode(env.metadata)?;
    }
    Ok(Remote { kind, mode, body: raw.body, entries })
}

/// Pulls `path` to `local` (a tree when `recursive`).
async fn pull(client: &Client, name: &str, path: &str, local: &Path, recursive: bool) -> anyhow::Result<()> {
    let f = get(client, name, path).await?;
    match f.kind.as_str() {
        "directory" => {
            if !recursive {
                bail!("{path} is a directory (use -r)");
            }
            if !local.is_dir() {
                std::fs::create_dir(local).with_context(|| format!("Failed to create {}", local.display()))?;
            }
            if let Some(m) = f.mode {
                std::fs::set_permissions(local, std::fs::Permissions::from_mode(m))?;
            }
            for e in f.entries {
                let child: PathBuf = local.join(&e);
                Box::pin(pull(client, name, &join(path, &e), &child, true)).await?;
            }
        }
        "symlink" => {
            let target = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&f.body);
            let _ = std::fs::remove_file(local);
            std::os::unix::fs::symlink(target, local)
                .with_context(|| format!("Failed to create the symlink {}", local.display()))?;
        }
        _ => {
            std::fs::write(local, &f.body).with_context(|| format!("Failed to write {}", local.display()))?;
            if let Some(m) = f.mode {
                std::fs::set_permissions(local, std::fs::Permissions::from_mode(m))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(split_target("web/etc/hosts").unwrap(), ("web".into(), "/etc/hosts".into()));
        assert_eq!(split_target("web/").unwrap(), ("web".into(), "/".into()));
        assert!(split_target("web").is_err() && split_target("/etc").is_err());
        assert_eq!(join("/srv/", "a"), "/srv/a");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(base_name("/etc/hosts/").unwrap(), "hosts");
        assert_eq!(files_path("web", "/a b"), "/1.0/instances/web/files?path=/a%20b");
    }
}
