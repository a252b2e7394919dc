//! Bearer-token auth: `docker-registry` with `auth.token`, and a token
//! server written here that checks basic credentials and issues RS256 JWTs
//! signed (with `openssl`) by a key whose certificate the registry trusts.

mod common;
mod images;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use common::{push, run, Registry};
use skiff_oci::auth::Credentials;
use skiff_oci::pull::{self, PullOptions};
use skiff_oci::{Reference, Store};

const USER: &str = "skiff";
const PASS: &str = "t0ken-pass";
const ISSUER: &str = "skiff-test-issuer";
const SERVICE: &str = "skiff-registry";

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn jwt(key: &Path, cert_der_b64: &str, scopes: &[String]) -> Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut it = s.splitn(3, ':');
            let (kind, name, actions) = (it.next()?, it.next()?, it.next()?);
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [cert_der_b64]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": USER, "aud": SERVICE,
        "exp": now + 600, "nbf": now - 60, "iat": now - 60,
        "jti": format!("{now}-{}", scopes.len()), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
    );
    let dir = key.parent().expect("key dir");
    let input = dir.join(format!("input-{}", std::process::id()));
    std::fs::write(&input, &signing_input)?;
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg(&input)
        .output()?;
    if !out.status.success() {
        bail!("openssl dgst: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(out.stdout)
    ))
}

/// Serves `GET /token?...`: 401 without the right basic credentials.
fn token_server(dir: &Path) -> Result<String> {
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=skiff-token",
            "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem")))?;
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(dir.join("cert.pem"))
        .output()?;
    let cert_b64 = STANDARD.encode(der.stdout);
    let key = dir.join("key.pem");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let want = format!("Basic {}", STANDARD.encode(format!("{USER}:{PASS}")));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().expect("clone socket"));
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut authorized = false;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") && v.trim() == want {
                        authorized = true;
                    }
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let query = path.split_once('?').map_or("", |(_, q)| q);
            let scopes: Vec<String> = query
                .split('&')
                .filter_map(|kv| kv.strip_prefix("scope="))
                .map(percent_decode)
                .collect();
            let (status, body) = if !authorized {
                (
                    "401 Unauthorized",
                    r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.to_string(),
                )
            } else {
                match jwt(&key, &cert_b64, &scopes) {
                    Ok(t) => (
                        "200 OK",
                        serde_json::json!({"token": t, "access_token": t, "expires_in": 600})
                            .to_string(),
                    ),
                    Err(e) => ("500 Internal Server Error", e.to_string()),
                }
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(addr)
}

#[test]
fn bearer_token_registry() -> Result<()> {
    let work = tempfile::tempdir()?;
    let lay = images::build(&work.path().join("layout"))?;
    let token_addr = token_server(work.path())?;
    let cert = work.path().join("cert.pem");
    let reg = Registry::start_with(None, |_| {
        format!(
            "auth:\n  token:\n    realm: http://{token_addr}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            cert.display()
        )
    })?;
    push(
        &lay.dir,
        images::OTHER,
        &reg.addr,
        "priv/img",
        Some(&format!("{USER}:{PASS}")),
    )?;
    let image = Reference::parse(&format!("{}/priv/img:{}", reg.addr, images::OTHER))?;

    // Anonymous: the token server refuses, and so the pull fails.
    let store = Store::open(work.path().join("store"))?;
    let anon = PullOptions {
        docker_config: Some(work.path().join("none.json")),
        ..Default::default()
    };
    let e = rt()
        .block_on(pull::pull(&store, &image, &anon))
        .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(msg.contains(&image.to_string()), "{msg}");
    assert!(store.list()?.is_empty());

    // With credentials, the client gets a bearer token and pulls.
    let ok = PullOptions {
        credentials: Some(Credentials::Basic(USER.into(), PASS.into())),
        ..Default::default()
    };
    let rep = rt().block_on(pull::pull(&store, &image, &ok))?;
    assert_eq!(rep.record.layers.len(), 2);
    let dest = work.path().join("bundle");
    skiff_oci::bundle::write_bundle(
        &store,
        &rep.record,
        &dest,
        &Default::default(),
        &Default::default(),
        None,
    )?;
    assert_eq!(std::fs::read(dest.join("rootfs/other"))?, b"other");
    Ok(())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}
