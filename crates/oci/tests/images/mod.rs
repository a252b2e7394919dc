//! The test images, built from the host's busybox-static.

#![allow(dead_code)]

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::common::layer::Layer;
use crate::common::Layout;

/// Tags in the layout built by [`build`].
pub const APP: &str = "app"; // multi-arch index: amd64 (3 layers) + arm64
pub const OTHER: &str = "other"; // shares the base layer with app/amd64
pub const ZSTD: &str = "zstd"; // a zstd-compressed layer
pub const HOSTILE: &str = "hostile"; // a path-traversal layer
pub const UMOCI: &str = "umoci"; // layers written by umoci (Go's archive/tar)

fn busybox() -> Result<Vec<u8>> {
    std::fs::read("/bin/busybox").context("reading /bin/busybox (apt install busybox-static)")
}

/// The base layer: a busybox rootfs with users, links, special files.
pub fn base_layer() -> Result<Vec<u8>> {
    let bb = busybox()?;
    let mut l = Layer::new();
    l.dir("./", 0o755)
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &bb)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "busybox")
        .symlink("bin/cat", "busybox")
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .file(
            "etc/group",
            0o644,
            b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
        )
        .file("etc/old.conf", 0o600, b"old")
        .dir("home", 0o755)
        .owner(1000, 1000)
        .dir("home/app", 0o750)
        .owner(0, 0)
        .dir("tmp", 0o1777)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("usr/lib", 0o755)
        .hardlink("usr/bin/bb-hard", "bin/busybox")
        .file("usr/bin/suid", 0o4755, b"#!/bin/sh\nid\n")
        .symlink("lib", "usr/lib")
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .dir("var/cache/a", 0o700)
        .file("var/cache/a/b", 0o644, b"b")
        .file("var/cache/c", 0o644, b"c")
        .dir("opq", 0o755)
        .file("opq/x", 0o644, b"x")
        .dir("opq/y", 0o755)
        .file("opq/y/z", 0o644, b"z")
        .dir("run", 0o755)
        .fifo("run/fifo", 0o620)
        .dir("dev", 0o755)
        .chardev("dev/null", 0o666, 1, 3)
        .dir("data", 0o755)
        .file_xattrs("data/x.txt", 0o644, b"xattr", &[("user.skiff", b"yes")])
        .symlink("sw", "/tmp");
    Ok(l.finish())
}

fn second_layer() -> Vec<u8> {
    Layer::new()
        .mtime(1_650_000_000)
        .whiteout("etc", "old.conf")
        .opaque("var/cache")
        .file("var/cache/new", 0o644, b"new")
        .whiteout("opq/y", "z")
        // Written through the lib -> usr/lib symlink.
        .file("lib/libfoo.so", 0o755, b"\x7fELF")
        .hardlink("usr/bin/bb-hard2", "usr/bin/bb-hard")
        .finish()
}

fn third_layer() -> Vec<u8> {
    Layer::new()
        .mtime(1_700_000_000)
        .owner(1000, 1000)
        .file("home/app/.profile", 0o644, b"export X=1\n")
        .owner(0, 0)
        .opaque("opq")
        .file("opq/new", 0o644, b"new")
        // The symlink sw -> /tmp becomes a directory.
        .dir("sw", 0o755)
        .file("sw/f", 0o644, b"f")
        .finish()
}

/// The run config of the app image.
pub fn app_config() -> serde_json::Value {
    json!({
        "User": "app",
        "Env": ["PATH=/bin:/usr/bin", "GREETING=hi"],
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo $GREETING"],
        "WorkingDir": "/home/app",
        "ExposedPorts": {"8080/tcp": {}},
        "Volumes": {"/data": {}},
        "StopSignal": "SIGINT",
        "Labels": {"org.example": "skiff"},
    })
}

/// Builds the test layout with every tag.
pub fn build(dir: &Path) -> Result<Layout> {
    let mut lay = Layout::new(dir)?;
    let base = base_layer()?;
    let amd = lay.image(
        "amd64",
        &[
            (base.clone(), "gzip"),
            (second_layer(), "none"),
            (third_layer(), "gzip"),
        ],
        app_config(),
    )?;
    let arm_layer = Layer::new().file("arch", 0o644, b"arm64").finish();
    let arm = lay.image("arm64", &[(arm_layer, "gzip")], json!({"Cmd": ["/arch"]}))?;
    let ix = lay.index(vec![amd, arm])?;
    lay.tag(ix, APP)?;
    let other_top = Layer::new().file("other", 0o644, b"other").finish();
    let other = lay.image(
        "amd64",
        &[(base.clone(), "gzip"), (other_top, "gzip")],
        json!({"Cmd": ["/bin/sh"]}),
    )?;
    lay.tag(other, OTHER)?;
    let z = Layer::new()
        .dir("z", 0o755)
        .file("z/zstd", 0o644, b"zstd!")
        .finish();
    let zi = lay.image(
        "amd64",
        &[(base.clone(), "gzip"), (z, "zstd")],
        json!({"Cmd": ["/bin/sh"]}),
    )?;
    lay.tag(zi, ZSTD)?;
    let evil = Layer::new()
        .file("../../../../tmp/skiff-evil", 0o644, b"pwned")
        .finish();
    let hi = lay.image(
        "amd64",
        &[(base, "gzip"), (evil, "gzip")],
        json!({"Cmd": ["/bin/sh"]}),
    )?;
    lay.tag(hi, HOSTILE)?;
    Ok(lay)
}

/// Adds the tag [`UMOCI`]: an image whose layers `umoci insert` writes from
/// a directory tree made here (after all other tags: umoci rewrites
/// index.json).
pub fn add_umoci_image(layout: &Path, scratch: &Path) -> Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let src = scratch.join("umoci-src");
    std::fs::create_dir_all(src.join("bin"))?;
    std::fs::create_dir_all(src.join("srv/data/deep"))?;
    std::fs::copy("/bin/busybox", src.join("bin/busybox"))?;
    symlink("busybox", src.join("bin/sh"))?;
    std::fs::write(src.join("srv/data/deep/file"), b"deep")?;
    std::fs::hard_link(src.join("srv/data/deep/file"), src.join("srv/hard"))?;
    std::fs::write(src.join("srv/secret"), b"s")?;
    std::fs::set_permissions(
        src.join("srv/secret"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    std::os::unix::fs::chown(src.join("srv/data"), Some(1000), Some(1000))?;
    let tag = format!("{}:{UMOCI}", layout.display());
    let umoci = |args: &[&str]| {
        crate::common::run(std::process::Command::new("umoci").args(args)).map(drop)
    };
    umoci(&["new", "--image", &tag])?;
    umoci(&[
        "insert",
        "--image",
        &tag,
        &src.join("bin").display().to_string(),
        "/bin",
    ])?;
    umoci(&[
        "insert",
        "--image",
        &tag,
        &src.join("srv").display().to_string(),
        "/srv",
    ])?;
    umoci(&["config", "--image", &tag, "--config.cmd", "/bin/sh"])?;
    Ok(())
}
