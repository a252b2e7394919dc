//! Pull from a real `docker-registry`, unpack, and compare with what
//! `skopeo` + `umoci` make of the same image.

mod common;
mod images;

use std::fs;
use std::path::Path;

use anyhow::Result;
use common::{assert_same_tree, push, run, skiff_oci, Registry};
use skiff_oci::pull::{self, PullOptions};
use skiff_oci::{Platform, Reference, Store};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

fn umoci_unpack(addr: &str, repo_tag: &str, work: &Path, bundle: &Path) -> Result<()> {
    fs::create_dir_all(work)?;
    let layout = work.join("umoci-layout");
    run(std::process::Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{addr}/{repo_tag}"),
        &format!("oci:{}:t", layout.display()),
    ]))?;
    run(std::process::Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(bundle))?;
    Ok(())
}

#[test]
fn pull_unpack_matches_umoci() -> Result<()> {
    let work = tempfile::tempdir()?;
    let lay = images::build(&work.path().join("layout"))?;
    images::add_umoci_image(&lay.dir, work.path())?;
    let reg = Registry::start(None)?;
    for tag in [images::APP, images::OTHER, images::ZSTD, images::UMOCI] {
        push(&lay.dir, tag, &reg.addr, "test/busybox", None)?;
    }
    let store_dir = work.path().join("store");
    let image = format!("{}/test/busybox:{}", reg.addr, images::APP);

    // The CLI, as a user would run it.
    let dest = work.path().join("bundle");
    let out = run(skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(&image)
        .arg(&dest))?;
    assert!(out.contains("sha256:"), "{out}");
    let theirs = work.path().join("umoci-bundle");
    umoci_unpack(
        &reg.addr,
        &format!("test/busybox:{}", images::APP),
        work.path(),
        &theirs,
    )?;
    assert_same_tree(&dest.join("rootfs"), &theirs.join("rootfs"), true)?;

    // The same multi-arch image as Docker schema 2 (manifest list and
    // docker media types) unpacks to the same tree.
    common::push_args(
        &lay.dir,
        images::APP,
        &reg.addr,
        "test/docker",
        None,
        &["--format", "v2s2"],
    )?;
    let dd = work.path().join("docker-v2s2");
    let dref = format!("{}/test/docker:{}", reg.addr, images::APP);
    run(skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(&dref)
        .arg(&dd))?;
    assert_same_tree(&dd.join("rootfs"), &dest.join("rootfs"), true)?;
    {
        let store = Store::open(&store_dir)?;
        let rec = store.inspect(&dref)?;
        let m: serde_json::Value = serde_json::from_slice(&store.read_blob(&rec.manifest)?)?;
        assert_eq!(m["mediaType"], skiff_oci::manifest::DOCKER_MANIFEST);
        assert_eq!(
            m["layers"][0]["mediaType"],
            skiff_oci::manifest::DOCKER_LAYER_GZIP
        );
        let ix: serde_json::Value =
            serde_json::from_slice(&store.read_blob(rec.index.as_ref().expect("index"))?)?;
        assert_eq!(ix["mediaType"], skiff_oci::manifest::DOCKER_LIST);
    }

    // Layers written by Go's archive/tar (umoci insert), too.
    let ud = work.path().join("umoci-made");
    let uref = format!("{}/test/busybox:{}", reg.addr, images::UMOCI);
    run(skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(&uref)
        .arg(&ud))?;
    let ub = work.path().join("umoci-made-umoci");
    umoci_unpack(
        &reg.addr,
        &format!("test/busybox:{}", images::UMOCI),
        &work.path().join("u2"),
        &ub,
    )?;
    assert_same_tree(&ud.join("rootfs"), &ub.join("rootfs"), true)?;
    assert_eq!(fs::read(ud.join("rootfs/srv/hard"))?, b"deep");

    // Whiteouts, opaque dirs, links, special files: spot checks on top of
    // the comparison.
    let r = dest.join("rootfs");
    assert!(!r.join("etc/old.conf").exists());
    assert!(!r.join("var/cache/a").exists() && r.join("var/cache/new").exists());
    assert!(!r.join("opq/x").exists() && r.join("opq/new").exists());
    assert_eq!(fs::read(r.join("usr/lib/libfoo.so"))?, b"\x7fELF");
    assert!(fs::symlink_metadata(r.join("sw"))?.is_dir());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(r.join("bin/busybox"))?.nlink(), 3);

    // The runtime config has the resolved process.
    let cfg: serde_json::Value = serde_json::from_slice(&fs::read(dest.join("config.json"))?)?;
    let p = &cfg["process"];
    assert_eq!(
        p["args"],
        serde_json::json!(["/bin/sh", "-c", "echo $GREETING"])
    );
    assert_eq!(p["cwd"], "/home/app");
    assert_eq!(
        (p["user"]["uid"].as_u64(), p["user"]["gid"].as_u64()),
        (Some(1000), Some(1000))
    );
    assert_eq!(p["user"]["additionalGids"], serde_json::json!([50]));
    let env: Vec<String> = serde_json::from_value(p["env"].clone())?;
    assert!(
        env.contains(&"GREETING=hi".to_string()) && env.contains(&"HOME=/home/app".to_string()),
        "{env:?}"
    );
    assert_eq!(
        cfg["annotations"]["org.opencontainers.image.stopSignal"],
        "SIGINT"
    );
    assert_eq!(cfg["annotations"]["org.example"], "skiff");
    assert_eq!(cfg["root"]["path"], "rootfs");

    // A second pull into an existing bundle is refused, naming the path.
    let e = skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(&image)
        .arg(&dest)
        .output()?;
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("already exists"));

    // The other platform of the multi-arch index (in another store: a
    // name refers to the platform last pulled, as with docker).
    let arm = work.path().join("arm");
    let arm_store = work.path().join("arm-store");
    run(skiff_oci()
        .args(["pull", "--platform", "linux/arm64", "--store"])
        .arg(&arm_store)
        .arg(&image)
        .arg(&arm))?;
    assert_eq!(fs::read(arm.join("rootfs/arch"))?, b"arm64");
    // (The comparison does see differences.)
    assert!(assert_same_tree(&arm.join("rootfs"), &theirs.join("rootfs"), true).is_err());
    assert!(common::describe(&r, true)?.len() > 30);
    assert!(!arm.join("rootfs/bin").exists());

    // inspect, list.
    let out = run(skiff_oci()
        .arg("inspect")
        .arg("--store")
        .arg(&store_dir)
        .arg(&image))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        v["args"],
        serde_json::json!(["/bin/sh", "-c", "echo $GREETING"])
    );
    assert!(v["image"]["index"].is_string(), "{v}");
    let remote = run(skiff_oci()
        .arg("inspect")
        .arg("--store")
        .arg(work.path().join("empty"))
        .arg(&image))?;
    let rv: serde_json::Value = serde_json::from_str(&remote)?;
    assert_eq!(rv["image"]["manifest"], v["image"]["manifest"]);
    let list = run(skiff_oci().arg("list").arg("--store").arg(&store_dir))?;
    assert!(list.contains(&image), "{list}");

    // A layer shared with another image is fetched and stored once.
    let store = Store::open(&store_dir)?;
    let other = Reference::parse(&format!("{}/test/busybox:{}", reg.addr, images::OTHER))?;
    let rep = rt().block_on(pull::pull(&store, &other, &PullOptions::default()))?;
    assert_eq!(rep.reused, 1);
    assert_eq!(rep.fetched, rep.record.layers[1].size);

    // Two pulls at once sharing the base layer: one fetches it, the other
    // waits and uses it.
    let both = Store::open(work.path().join("both"))?;
    let app = Reference::parse(&image)?;
    let po = PullOptions::default();
    let (a, b) = rt().block_on(async {
        tokio::join!(pull::pull(&both, &app, &po), pull::pull(&both, &other, &po))
    });
    let (a, b) = (a?, b?);
    assert_eq!(a.record.layers[0].digest, b.record.layers[0].digest);
    assert_eq!(
        a.fetched + b.fetched,
        a.record.size() + b.record.size() - b.record.layers[0].size
    );
    assert_eq!(fs::read_dir(work.path().join("both/ingest"))?.count(), 0);

    // By digest: the index digest picks the same image; an unknown
    // digest is a clear error.
    let pinned = Reference::parse(&format!(
        "{}/test/busybox@{}",
        reg.addr,
        a.record.index.as_ref().expect("index")
    ))?;
    let by_digest = rt().block_on(pull::pull(&both, &pinned, &PullOptions::default()))?;
    assert_eq!(by_digest.record.manifest, a.record.manifest);
    assert_eq!(by_digest.fetched, 0);
    let unknown = Reference::parse(&format!(
        "{}/test/busybox@sha256:{}",
        reg.addr,
        "0".repeat(64)
    ))?;
    let e = rt()
        .block_on(pull::pull(&both, &unknown, &PullOptions::default()))
        .unwrap_err();
    assert!(e.to_string().contains(&"0".repeat(64)), "{e}");

    // A layout with several images needs a tag.
    let out = skiff_oci()
        .arg("import")
        .arg("--store")
        .arg(&store_dir)
        .arg(&lay.dir)
        .arg(work.path().join("untagged"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("several images"),
        "{err}"
    );

    // zstd layers.
    let zdest = work.path().join("zstd");
    run(skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(format!("{}/test/busybox:{}", reg.addr, images::ZSTD))
        .arg(&zdest))?;
    assert_eq!(fs::read(zdest.join("rootfs/z/zstd"))?, b"zstd!");

    // An interrupted download resumes where it stopped.
    let fresh = Store::open(work.path().join("fresh"))?;
    let big = rep.record.layers[0].clone();
    let bytes = store.read_blob(&big.digest)?;
    let half = bytes.len() / 2;
    {
        let mut w = fresh.ingest(&big.digest, big.size)?;
        w.write(&bytes[..half])?;
    }
    let rep2 = rt().block_on(pull::pull(&fresh, &other, &PullOptions::default()))?;
    assert_eq!(rep2.resumed, half as u64);
    assert_eq!(
        rep2.fetched,
        big.size - half as u64 + rep2.record.layers[1].size
    );
    assert!(fresh.has_blob(&big.digest, big.size));

    // Import: the same image from an OCI layout and from a docker archive.
    let from_layout = work.path().join("from-layout");
    run(skiff_oci()
        .arg("import")
        .arg("--store")
        .arg(&store_dir)
        .arg(format!("{}:{}", lay.dir.display(), images::APP))
        .arg(&from_layout))?;
    assert_same_tree(&from_layout.join("rootfs"), &dest.join("rootfs"), true)?;
    let arm_import = work.path().join("arm-import");
    run(skiff_oci()
        .args([
            "import",
            "--platform",
            "linux/arm64",
            "--name",
            "local/arm:1",
            "--store",
        ])
        .arg(&store_dir)
        .arg(format!("{}:{}", lay.dir.display(), images::APP))
        .arg(&arm_import))?;
    assert_eq!(fs::read(arm_import.join("rootfs/arch"))?, b"arm64");
    let archive = work.path().join("app.tar");
    run(std::process::Command::new("skopeo").args([
        "copy",
        "--quiet",
        &format!("oci:{}:{}", lay.dir.display(), images::OTHER),
        &format!("docker-archive:{}:example/other:1", archive.display()),
    ]))?;
    let from_archive = work.path().join("from-archive");
    let out = run(skiff_oci()
        .arg("import")
        .arg("--store")
        .arg(&store_dir)
        .arg(&archive)
        .arg(&from_archive))?;
    assert!(out.contains("docker.io/example/other:1"), "{out}");
    let other_dest = work.path().join("other");
    run(skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(other.to_string())
        .arg(&other_dest))?;
    assert_same_tree(
        &from_archive.join("rootfs"),
        &other_dest.join("rootfs"),
        true,
    )?;

    // The rootfs cache, delete and prune.
    let rec = store.inspect(&image)?;
    let cached = skiff_oci::bundle::cached_rootfs(&store, &rec, &Default::default())?;
    assert_same_tree(&cached, &dest.join("rootfs"), true)?;
    assert_eq!(
        fs::read_dir(store_dir.join("tmp"))?.count(),
        0,
        "no work dirs left"
    );
    store.add_use(&rec.manifest, "web")?;
    assert!(store.delete(&image).is_err());
    store.remove_use(&rec.manifest, "web")?;
    run(skiff_oci()
        .arg("delete")
        .arg("--store")
        .arg(&store_dir)
        .arg(&image))?;
    assert!(!cached.exists());
    let out = run(skiff_oci().arg("prune").arg("--store").arg(&store_dir))?;
    assert!(out.starts_with("removed "), "{out}");
    // The other image is intact and still unpacks.
    let again = work.path().join("again");
    run(skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(other.to_string())
        .arg(&again))?;
    Ok(())
}

#[test]
fn basic_auth_registry() -> Result<()> {
    let work = tempfile::tempdir()?;
    let lay = images::build(&work.path().join("layout"))?;
    let reg = Registry::start(Some(("skiff", "s3cret")))?;
    push(
        &lay.dir,
        images::OTHER,
        &reg.addr,
        "priv/img",
        Some("skiff:s3cret"),
    )?;
    let image = Reference::parse(&format!("{}/priv/img:{}", reg.addr, images::OTHER))?;
    let store = Store::open(work.path().join("store"))?;
    let empty_cfg = work.path().join("none.json");

    // Anonymous and wrong credentials are refused, naming the image.
    let anon = PullOptions {
        docker_config: Some(empty_cfg.clone()),
        ..Default::default()
    };
    let e = rt()
        .block_on(pull::pull(&store, &image, &anon))
        .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains(&image.to_string()), "{msg}");
    let wrong = PullOptions {
        credentials: Some(skiff_oci::auth::Credentials::Basic(
            "skiff".into(),
            "nope".into(),
        )),
        ..Default::default()
    };
    assert!(rt().block_on(pull::pull(&store, &image, &wrong)).is_err());
    assert!(store.list()?.is_empty());

    // Explicit credentials; progress adds up to what was fetched.
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let ok = PullOptions {
        credentials: Some(skiff_oci::auth::Credentials::Basic(
            "skiff".into(),
            "s3cret".into(),
        )),
        progress: Some(std::sync::Arc::new(move |p: &pull::Progress| {
            sink.lock().unwrap().push(p.clone())
        })),
        ..Default::default()
    };
    let rep = rt().block_on(pull::pull(&store, &image, &ok))?;
    assert_eq!(store.list()?.len(), 1);
    let ev = events.lock().unwrap();
    let total: u64 = rep.record.layers.iter().map(|l| l.size).sum();
    assert_eq!(
        ev.first(),
        Some(&pull::Progress::Start {
            layers: 2,
            total,
            present: 0
        })
    );
    let bytes: u64 = ev
        .iter()
        .map(|e| {
            if let pull::Progress::Bytes { n, .. } = e {
                *n
            } else {
                0
            }
        })
        .sum();
    assert_eq!((bytes, rep.fetched), (total, total));
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, pull::Progress::LayerDone { .. }))
            .count(),
        2
    );
    drop(ev);

    // Docker's config.json `auths`, through the CLI.
    let dc = work.path().join("docker");
    fs::create_dir(&dc)?;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode("skiff:s3cret");
    fs::write(
        dc.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{b64}"}}}}}}"#, reg.addr),
    )?;
    run(skiff_oci()
        .env("DOCKER_CONFIG", &dc)
        .arg("pull")
        .arg("--store")
        .arg(work.path().join("s2"))
        .arg(image.to_string())
        .arg(work.path().join("b1")))?;

    // --username, password from the environment.
    run(skiff_oci()
        .env("DOCKER_CONFIG", work.path().join("nothing"))
        .env("SKIFF_OCI_PASSWORD", "s3cret")
        .args(["pull", "--username", "skiff", "--store"])
        .arg(work.path().join("s5"))
        .arg(image.to_string())
        .arg(work.path().join("b5")))?;
    assert!(work.path().join("b5/rootfs/other").exists());

    // A credential helper.
    let bin = work.path().join("bin");
    fs::create_dir(&bin)?;
    let helper = bin.join("docker-credential-skifftest");
    fs::write(&helper, "#!/bin/sh\nread server\necho \"{\\\"ServerURL\\\":\\\"$server\\\",\\\"Username\\\":\\\"skiff\\\",\\\"Secret\\\":\\\"s3cret\\\"}\"\n")?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755))?;
    fs::write(
        dc.join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"skifftest"}}}}"#, reg.addr),
    )?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(skiff_oci()
        .env("DOCKER_CONFIG", &dc)
        .env("PATH", path)
        .arg("pull")
        .arg("--store")
        .arg(work.path().join("s3"))
        .arg(image.to_string())
        .arg(work.path().join("b2")))?;
    assert!(work.path().join("b2/rootfs/other").exists());

    // And without any, the CLI fails with the image and the cause.
    let out = skiff_oci()
        .env("DOCKER_CONFIG", work.path().join("nothing"))
        .arg("pull")
        .arg("--store")
        .arg(work.path().join("s4"))
        .arg(image.to_string())
        .arg(work.path().join("b3"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&image.to_string()) && err.to_lowercase().contains("auth"),
        "{err}"
    );
    assert!(!work.path().join("b3/rootfs").exists());
    Ok(())
}

#[test]
fn bad_input_leaves_nothing() -> Result<()> {
    let work = tempfile::tempdir()?;
    let lay = images::build(&work.path().join("layout"))?;
    let reg = Registry::start(None)?;
    push(&lay.dir, images::OTHER, &reg.addr, "bad/img", None)?;
    push(&lay.dir, images::HOSTILE, &reg.addr, "bad/img", None)?;
    let store_dir = work.path().join("store");
    let store = Store::open(&store_dir)?;
    let opts = PullOptions::default();

    // Corrupt the top layer in the registry's storage (same length).
    let image = Reference::parse(&format!("{}/bad/img:{}", reg.addr, images::OTHER))?;
    let (res, _) = rt().block_on(pull::fetch_config(&image, &opts))?;
    let victim = res.manifest.layers[1].digest.clone();
    let f = reg.blob_file(&victim);
    let orig = fs::read(&f)?;
    let mut data = orig.clone();
    let n = data.len();
    data[n / 2] ^= 0xff;
    fs::write(&f, data)?;
    let e = rt()
        .block_on(pull::pull(&store, &image, &opts))
        .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(
        msg.contains(&image.to_string()) && msg.contains("digest mismatch"),
        "{msg}"
    );
    assert!(store.list()?.is_empty(), "no image left");
    assert!(!store.has_blob(&victim, res.manifest.layers[1].size));
    assert_eq!(
        fs::read_dir(store_dir.join("ingest"))?.count(),
        0,
        "no partial file of a bad blob"
    );
    let out = skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(image.to_string())
        .arg(work.path().join("b"))
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("digest mismatch"));
    // Base layer unpacked while the top one failed: the work dir is gone too.
    let left: Vec<_> = fs::read_dir(work.path().join("b"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert!(left.is_empty(), "left behind: {left:?}");

    // A truncated blob: a size error, no image, no partial file.
    fs::write(&f, &orig)?;
    let f = reg.blob_file(&res.manifest.layers[0].digest);
    let data = fs::read(&f)?;
    fs::write(&f, &data[..data.len() / 3])?;
    let fresh = Store::open(work.path().join("fresh"))?;
    let e = rt()
        .block_on(pull::pull(&fresh, &image, &opts))
        .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(
        msg.contains(&image.to_string()) && msg.contains("size mismatch"),
        "{msg}"
    );
    assert!(fresh.list()?.is_empty());
    assert_eq!(fs::read_dir(work.path().join("fresh/ingest"))?.count(), 0);

    // Unknown tag, unknown repository, registry down.
    for (r, want) in [
        (format!("{}/bad/img:nope", reg.addr), "nope"),
        (format!("{}/no/such:1", reg.addr), "no/such"),
    ] {
        let out = skiff_oci()
            .arg("pull")
            .arg("--store")
            .arg(&store_dir)
            .arg(&r)
            .arg(work.path().join("x"))
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want) && err.contains("registry"),
            "{err}"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let down = format!("127.0.0.1:{port}/x/y:z");
    let out = skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(&down)
        .arg(work.path().join("x"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&down), "{err}");
    let out = skiff_oci()
        .args(["pull", "Not/A:Valid:Ref", "/tmp/x"])
        .arg("--store")
        .arg(&store_dir)
        .output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("Not/A"));

    // A hostile layer is refused and leaves no rootfs, no work dir.
    let hostile = format!("{}/bad/img:{}", reg.addr, images::HOSTILE);
    let hd = work.path().join("hostile");
    let out = skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store_dir)
        .arg(&hostile)
        .arg(&hd)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("escapes the rootfs") && err.contains(&hostile),
        "{err}"
    );
    assert!(!Path::new("/tmp/skiff-evil").exists());
    let left: Vec<_> = fs::read_dir(&hd)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert!(left.is_empty(), "left behind: {left:?}");
    // Platform missing from a single-arch image is not an issue; from an index it is.
    let _ = Platform::host();
    Ok(())
}

/// An address of this machine that is not loopback, if it has one.
fn non_loopback_ipv4() -> Option<String> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| !a.contains(':') && !a.starts_with("127."))
        .map(str::to_string)
}

#[test]
fn plain_http_only_when_insecure() -> Result<()> {
    let Some(ip) = non_loopback_ipv4() else {
        eprintln!("plain_http_only_when_insecure: skipped (no non-loopback IPv4 address)");
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let lay = images::build(&work.path().join("layout"))?;
    let reg = Registry::start_on(&ip, None, |_| String::new())?;
    push(&lay.dir, images::OTHER, &reg.addr, "plain/img", None)?;
    let image = format!("{}/plain/img:{}", reg.addr, images::OTHER);
    let store = work.path().join("store");
    // Not loopback, not asked: https only, which this registry does not speak.
    let out = skiff_oci()
        .arg("pull")
        .arg("--store")
        .arg(&store)
        .arg(&image)
        .arg(work.path().join("a"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&image), "{err}");
    assert!(!work.path().join("a/rootfs").exists());
    // Asked: plain http.
    run(skiff_oci()
        .args(["pull", "--insecure", "--store"])
        .arg(&store)
        .arg(&image)
        .arg(work.path().join("b")))?;
    assert_eq!(fs::read(work.path().join("b/rootfs/other"))?, b"other");
    Ok(())
}

#[test]
fn broken_download_resumes_within_the_pull() -> Result<()> {
    let work = tempfile::tempdir()?;
    let lay = images::build(&work.path().join("layout"))?;
    let reg = Registry::start(None)?;
    push(&lay.dir, images::OTHER, &reg.addr, "cut/img", None)?;
    // The busybox layer is over 500 kB compressed: the cut lands inside it.
    let proxy = common::cutting_proxy(&reg.addr, 300_000)?;
    let store = Store::open(work.path().join("store"))?;
    let image = Reference::parse(&format!("{}/cut/img:{}", proxy.addr, images::OTHER))?;
    let opts = PullOptions {
        max_concurrent: 1,
        ..Default::default()
    };
    let rep = rt().block_on(pull::pull(&store, &image, &opts))?;
    assert!(
        proxy.cut.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy never cut"
    );
    assert!(rep.resumed > 0, "{rep:?}");
    let base = &rep.record.layers[0];
    assert!(store.has_blob(&base.digest, base.size));
    assert_eq!(fs::read_dir(work.path().join("store/ingest"))?.count(), 0);
    Ok(())
}
