//! Shared by the integration tests: a real `docker-registry` on a free
//! loopback port (with or without htpasswd basic auth), OCI layouts built
//! from layer tarballs, `skopeo` pushes, `umoci` unpacks, and a tree
//! comparison of two rootfs.

#![allow(dead_code)]

pub mod layer;

use std::collections::BTreeMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use skiff_oci::manifest::{self, Descriptor};
use skiff_oci::Digest;

/// A `docker-registry` process, killed and its storage removed on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Scratch directory (config, storage).
    pub dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; with `auth`, htpasswd basic auth for that user.
    pub fn start(auth: Option<(&str, &str)>) -> Result<Self> {
        Self::start_with(auth, |_| String::new())
    }

    /// Starts a registry whose config ends with what `extra` returns for
    /// the scratch directory (an `auth:` section, say).
    pub fn start_with(
        auth: Option<(&str, &str)>,
        extra: impl FnOnce(&Path) -> String,
    ) -> Result<Self> {
        Self::start_on("127.0.0.1", auth, extra)
    }

    /// Starts a registry listening on `host` (an address of this machine).
    pub fn start_on(
        host: &str,
        auth: Option<(&str, &str)>,
        extra: impl FnOnce(&Path) -> String,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind(format!("{host}:0"))?.local_addr()?.port();
        let addr = format!("{host}:{port}");
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((u, p)) = auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .context("running htpasswd")?;
            if !out.status.success() {
                bail!("htpasswd failed");
            }
            fs::write(dir.path().join("htpasswd"), &out.stdout)?;
            cfg += &format!(
                "auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        cfg += &extra(dir.path());
        fs::write(dir.path().join("config.yml"), cfg)?;
        let log = fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (apt install docker-registry)")?;
        let reg = Self { child, addr, dir };
        let t0 = Instant::now();
        while TcpStream::connect(&reg.addr).is_err() {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "registry did not come up: {}",
                    fs::read_to_string(reg.dir.path().join("registry.log"))?
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(reg)
    }

    /// Where the registry keeps a blob.
    pub fn blob_file(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs")
            .join(d.algorithm().name())
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pushes `layout:tag` to `docker://addr/repo:tag` (all platforms).
pub fn push(layout: &Path, tag: &str, addr: &str, repo: &str, creds: Option<&str>) -> Result<()> {
    push_args(layout, tag, addr, repo, creds, &[])
}

/// [`push`] with extra `skopeo copy` arguments (`--format v2s2`).
pub fn push_args(
    layout: &Path,
    tag: &str,
    addr: &str,
    repo: &str,
    creds: Option<&str>,
    extra: &[&str],
) -> Result<()> {
    let mut c = Command::new("skopeo");
    c.args(["copy", "--quiet", "--all", "--dest-tls-verify=false"]);
    c.args(extra);
    if let Some(cr) = creds {
        c.args(["--dest-creds", cr]);
    }
    c.arg(format!("oci:{}:{tag}", layout.display()));
    c.arg(format!("docker://{addr}/{repo}:{tag}"));
    run(&mut c).map(drop)
}

/// An OCI image layout being written.
pub struct Layout {
    /// Its directory.
    pub dir: PathBuf,
    index: Vec<Descriptor>,
}

impl Layout {
    /// A fresh layout at `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir.join("blobs/sha256"))?;
        fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        })
    }

    /// Writes a blob.
    pub fn blob(&self, media_type: &str, data: &[u8]) -> Result<Descriptor> {
        let d = Digest::sha256_of(data);
        fs::write(self.dir.join("blobs/sha256").join(d.hex()), data)?;
        Ok(Descriptor {
            media_type: media_type.into(),
            digest: d,
            size: data.len() as u64,
            platform: None,
            annotations: Default::default(),
        })
    }

    /// Writes layers (uncompressed tar, compression) and a config built from
    /// `config` (its rootfs is filled in); returns the manifest descriptor.
    pub fn image(
        &self,
        arch: &str,
        layers: &[(Vec<u8>, &str)],
        config: serde_json::Value,
    ) -> Result<Descriptor> {
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, comp) in layers {
            diff_ids.push(Digest::sha256_of(tar).to_string());
            let (data, mt) = match *comp {
                "gzip" => (layer::gzip(tar), manifest::OCI_LAYER_GZIP),
                "zstd" => (layer::zstd(tar), manifest::OCI_LAYER_ZSTD),
                _ => (tar.clone(), manifest::OCI_LAYER_TAR),
            };
            descs.push(self.blob(mt, &data)?);
        }
        let cfg = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let c = self.blob(manifest::OCI_CONFIG, &serde_json::to_vec(&cfg)?)?;
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_MANIFEST,
            "config": c,
            "layers": descs,
        });
        let mut d = self.blob(manifest::OCI_MANIFEST, &serde_json::to_vec(&m)?)?;
        d.platform = Some(skiff_oci::Platform {
            architecture: arch.into(),
            os: "linux".into(),
            variant: None,
        });
        Ok(d)
    }

    /// Writes an index of manifests.
    pub fn index(&self, manifests: Vec<Descriptor>) -> Result<Descriptor> {
        let ix = serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": manifests});
        self.blob(manifest::OCI_INDEX, &serde_json::to_vec(&ix)?)
    }

    /// Tags a manifest or index in index.json.
    pub fn tag(&mut self, mut d: Descriptor, tag: &str) -> Result<()> {
        d.annotations
            .insert("org.opencontainers.image.ref.name".into(), tag.into());
        if d.media_type == manifest::OCI_INDEX {
            d.platform = None;
        }
        self.index.push(d);
        let ix = serde_json::json!({"schemaVersion": 2, "manifests": self.index});
        fs::write(self.dir.join("index.json"), serde_json::to_vec(&ix)?)?;
        Ok(())
    }
}

/// What a tree comparison looks at, per path.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<i64>,
    content: String,
    xattrs: BTreeMap<String, Vec<u8>>,
    link_group: Option<String>,
}

/// Describes every path of a rootfs (hard links grouped by first path).
pub fn describe(root: &Path, dir_mtimes: bool) -> Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let m = fs::symlink_metadata(&p)?;
        let ft = m.file_type();
        let (kind, content) = if ft.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort();
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
            ("dir", String::new())
        } else if ft.is_symlink() {
            ("symlink", fs::read_link(&p)?.display().to_string())
        } else if ft.is_file() {
            ("file", Digest::sha256_of(&fs::read(&p)?).to_string())
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else if ft.is_char_device() {
            ("char", format!("{}", m.rdev()))
        } else if ft.is_block_device() {
            ("block", format!("{}", m.rdev()))
        } else {
            ("other", String::new())
        };
        let key = format!("/{}", rel.display());
        let link_group = if ft.is_file() && m.nlink() > 1 {
            Some(inodes.entry(m.ino()).or_insert_with(|| key.clone()).clone())
        } else {
            None
        };
        let mtime = (kind != "dir" || dir_mtimes).then_some(m.mtime());
        out.insert(
            key,
            Node {
                kind,
                mode: if ft.is_symlink() {
                    0
                } else {
                    m.mode() & 0o7777
                },
                uid: m.uid(),
                gid: m.gid(),
                mtime: if rel.as_os_str().is_empty() {
                    None
                } else {
                    mtime
                },
                content,
                xattrs: user_xattrs(&p),
                link_group,
            },
        );
    }
    Ok(out)
}

fn user_xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = BTreeMap::new();
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path without NUL");
    let mut names = vec![0u8; 4096];
    // SAFETY: c is NUL-terminated; names is a writable buffer of its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| s.starts_with(b"user."))
    {
        let cn = std::ffi::CString::new(name).expect("xattr name");
        let mut v = vec![0u8; 4096];
        // SAFETY: both strings NUL-terminated; v is writable for its length.
        let k = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        v.truncate(k.max(0) as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    out
}

/// Asserts two rootfs are the same tree with the same metadata.
pub fn assert_same_tree(ours: &Path, theirs: &Path, dir_mtimes: bool) -> Result<()> {
    let a = describe(ours, dir_mtimes)?;
    let b = describe(theirs, dir_mtimes)?;
    let mut diffs = Vec::new();
    for (k, v) in &a {
        match b.get(k) {
            None => diffs.push(format!("only in ours: {k}")),
            Some(w) if w != v => diffs.push(format!("{k}: ours {v:?}\n     theirs {w:?}")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        diffs.push(format!("only in theirs: {k}"));
    }
    if !diffs.is_empty() {
        bail!("trees differ:\n{}", diffs.join("\n"));
    }
    Ok(())
}

/// The skiff-oci binary built for these tests.
pub fn skiff_oci() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skiff-oci"))
}

/// A TCP proxy in front of a registry that cuts one response stream after
/// `cut_after` bytes, once (a download breaking off mid-blob).
pub struct CuttingProxy {
    /// `127.0.0.1:PORT` to connect to instead of the registry.
    pub addr: String,
    /// Whether the cut happened.
    pub cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Starts a [`CuttingProxy`] to `target`.
pub fn cutting_proxy(target: &str, cut_after: u64) -> Result<CuttingProxy> {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let cut = Arc::new(AtomicBool::new(false));
    let flag = cut.clone();
    let target = target.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(&target) else {
                continue;
            };
            let (mut c_in, mut u_out) = (
                client.try_clone().expect("clone"),
                upstream.try_clone().expect("clone"),
            );
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut u_out);
                let _ = u_out.shutdown(std::net::Shutdown::Write);
            });
            let flag = flag.clone();
            std::thread::spawn(move || {
                let (mut up, mut down) = (upstream, client);
                let mut sent = 0u64;
                let mut buf = [0u8; 16 * 1024];
                loop {
                    let n = match up.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if !flag.load(Ordering::SeqCst) && sent + n as u64 > cut_after {
                        let keep = (cut_after - sent) as usize;
                        let _ = down.write_all(&buf[..keep]);
                        flag.store(true, Ordering::SeqCst);
                        let _ = down.shutdown(std::net::Shutdown::Both);
                        let _ = up.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    if down.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
                let _ = down.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(CuttingProxy { addr, cut })
}
