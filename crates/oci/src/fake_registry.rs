//! A registry that lies, for tests: a plain HTTP/1.1 server on a loopback
//! port answering fixed routes, one connection per request.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// How a route's body is sent.
#[derive(Clone)]
pub enum Send {
    /// With a true `Content-Length`.
    Sized(Vec<u8>),
    /// Without a length: until the connection closes.
    Unsized(Vec<u8>),
    /// Announces `announced` bytes, sends `body`, then holds the
    /// connection open for a minute.
    Lying {
        /// The `Content-Length` sent.
        announced: u64,
        /// What is sent.
        body: Vec<u8>,
    },
}

/// One path and its answer.
#[derive(Clone)]
pub struct Route {
    /// The request path, `/v2/…`.
    pub path: String,
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Send,
}

impl Route {
    /// A 200 with a true length.
    pub fn ok(path: &str, content_type: Option<&str>, body: &[u8]) -> Self {
        Self {
            path: path.to_string(),
            status: 200,
            content_type: content_type.map(str::to_string),
            body: Send::Sized(body.to_vec()),
        }
    }
}

/// Serves `routes` (and a 200 at `/v2/`) until the test process ends;
/// returns `127.0.0.1:port`.
pub fn serve(routes: Vec<Route>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let routes = routes.clone();
            std::thread::spawn(move || answer(c, &routes));
        }
    });
    addr
}

fn answer(mut c: TcpStream, routes: &[Route]) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let route = if path == "/v2/" {
        Route::ok("/v2/", Some("application/json"), b"{}")
    } else {
        routes
            .iter()
            .find(|r| r.path == path)
            .cloned()
            .unwrap_or_else(|| Route {
                path,
                status: 404,
                content_type: None,
                body: Send::Sized(br#"{"errors":[{"code":"NOT_FOUND"}]}"#.to_vec()),
            })
    };
    let mut h = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", route.status);
    if let Some(t) = &route.content_type {
        h += &format!("Content-Type: {t}\r\n");
    }
    let (body, hold) = match route.body {
        Send::Sized(b) => {
            h += &format!("Content-Length: {}\r\n", b.len());
            (b, false)
        }
        Send::Unsized(b) => (b, false),
        Send::Lying { announced, body } => {
            h += &format!("Content-Length: {announced}\r\n");
            (body, true)
        }
    };
    h += "\r\n";
    if c.write_all(h.as_bytes()).is_err() || c.write_all(&body).is_err() {
        return;
    }
    let _ = c.flush();
    if hold {
        std::thread::sleep(Duration::from_secs(60));
    }
}
