//! Pulls from a registry that sends too much (`fake_registry`).

use super::*;
use crate::fake_registry::{serve, Route, Send};

/// The error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s += &format!(": {x}");
        src = x.source();
    }
    s
}

struct Image {
    config: Vec<u8>,
    layer: Vec<u8>,
    manifest: Vec<u8>,
}

fn desc_json(media_type: &str, data: &[u8], size: u64) -> String {
    format!(
        r#"{{"mediaType":"{media_type}","digest":"{}","size":{size}}}"#,
        Digest::sha256_of(data)
    )
}

/// A one-layer image whose config descriptor declares `config_size`.
fn image(config_size: Option<u64>) -> Image {
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["sh"]}}"#.to_vec();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(2);
    h.set_mtime(1);
    b.append_data(&mut h, "hi", &b"hi"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{},"layers":[{}]}}"#,
        manifest::OCI_MANIFEST,
        desc_json(
            manifest::OCI_CONFIG,
            &config,
            config_size.unwrap_or(config.len() as u64)
        ),
        desc_json(manifest::OCI_LAYER_TAR, &layer, layer.len() as u64)
    )
    .into_bytes();
    Image {
        config,
        layer,
        manifest,
    }
}

fn blob_path(data: &[u8]) -> String {
    format!("/v2/x/blobs/{}", Digest::sha256_of(data))
}

/// Pulls `addr/x:1` into a fresh store, giving up after 20 seconds.
fn pull_from(addr: &str) -> Result<PullReport, String> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let image = Reference::parse(&format!("{addr}/x:1")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = PullOptions {
            docker_config: Some(dir.path().join("no-config.json")),
            ..PullOptions::default()
        };
        match tokio::time::timeout(Duration::from_secs(20), pull(&store, &image, &opts)).await {
            Ok(r) => r.map_err(|e| chain(&e)),
            Err(_) => Err("the pull hung".to_string()),
        }
    })
}

fn routes(img: &Image) -> Vec<Route> {
    vec![
        Route::ok(
            "/v2/x/manifests/1",
            Some(manifest::OCI_MANIFEST),
            &img.manifest,
        ),
        Route::ok(&blob_path(&img.config), None, &img.config),
        Route::ok(&blob_path(&img.layer), None, &img.layer),
    ]
}

#[test]
fn a_well_behaved_registry_pulls() {
    let img = image(None);
    let r = pull_from(&serve(routes(&img))).unwrap();
    assert_eq!(r.record.layers.len(), 1);
}

#[test]
fn oversized_manifests_are_refused_however_sent() {
    let big = vec![b' '; 5 << 20];
    for body in [Send::Sized(big.clone()), Send::Unsized(big.clone())] {
        let addr = serve(vec![Route {
            path: "/v2/x/manifests/1".into(),
            status: 200,
            content_type: Some(manifest::OCI_MANIFEST.into()),
            body,
        }]);
        let e = pull_from(&addr).unwrap_err();
        assert!(
            e.contains("manifest") && e.contains("over the 4194304-byte limit"),
            "{e}"
        );
        assert!(e.contains(&addr), "names the registry: {e}");
    }
}

#[test]
fn configs_over_the_limit_or_their_descriptor_are_refused() {
    // Declared larger than the limit: not even asked for.
    let img = image(Some(9 << 20));
    let e = pull_from(&serve(routes(&img))).unwrap_err();
    assert!(
        e.contains("image config") && e.contains("8388608-byte limit"),
        "{e}"
    );
    // Sent longer than declared, with or without a length.
    let img = image(None);
    let mut long = img.config.clone();
    long.extend_from_slice(&[b' '; 100]);
    for body in [Send::Sized(long.clone()), Send::Unsized(long.clone())] {
        let mut r = routes(&img);
        r[1].body = body;
        let e = pull_from(&serve(r)).unwrap_err();
        assert!(
            e.contains(&format!("more than the {} bytes", img.config.len())),
            "{e}"
        );
    }
}

#[test]
fn layers_longer_than_declared_are_cut_off() {
    let img = image(None);
    // A length over the descriptor's, then silence: refused at once.
    let mut r = routes(&img);
    r[2].body = Send::Lying {
        announced: 1 << 40,
        body: img.layer.clone(),
    };
    let e = pull_from(&serve(r)).unwrap_err();
    assert!(e.contains("announces 1099511627776 bytes"), "{e}");
    // No length, more bytes than declared: cut off.
    let mut r = routes(&img);
    let mut long = img.layer.clone();
    long.extend_from_slice(&[0; 4096]);
    r[2].body = Send::Unsized(long);
    let e = pull_from(&serve(r)).unwrap_err();
    assert!(e.contains("size mismatch"), "{e}");
}
