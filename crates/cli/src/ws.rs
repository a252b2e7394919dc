//! Moving bytes over operation websockets the way LXD's client does: data
//! travels as binary messages; the end of a stream is an empty text
//! message (LXD's "barrier") or a close frame.

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A websocket over the daemon's socket.
pub type Ws = WebSocketStream<UnixStream>;
/// Its sending half.
pub type WsSink = SplitSink<Ws, Message>;
/// Its receiving half.
pub type WsStream = SplitStream<Ws>;

/// Copies the binary messages of `stream` to `out` until a barrier, a close
/// frame or the end of the connection. Returns the bytes copied.
pub async fn copy_to<W: AsyncWrite + Unpin>(mut stream: WsStream, mut out: W) -> u64 {
    let mut n = 0u64;
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Binary(b)) => {
                if out.write_all(&b).await.is_err() || out.flush().await.is_err() {
                    break;
                }
                n += b.len() as u64;
            }
            Ok(Message::Text(_)) | Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    n
}

/// Sends every chunk from `input` as a binary message; at its end, the
/// barrier (an empty text message), and a close frame when `close`.
pub async fn send_from(sink: &mut WsSink, mut input: mpsc::Receiver<Vec<u8>>, close: bool) {
    while let Some(chunk) = input.recv().await {
        if sink.send(Message::binary(chunk)).await.is_err() {
            return;
        }
    }
    finish(sink, close).await;
}

/// Ends the stream sent on `sink`: the barrier, then a close frame when `close`.
pub async fn finish(sink: &mut WsSink, close: bool) {
    let _ = sink.send(Message::text("")).await;
    if close {
        let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await;
    }
}

/// Sends one JSON control message.
pub async fn send_json(sink: &mut WsSink, v: &serde_json::Value) -> bool {
    sink.send(Message::text(v.to_string())).await.is_ok()
}

/// Reads and drops everything the peer sends (keeps a control socket alive
/// and answers pings).
pub async fn drain(mut stream: WsStream) {
    while let Some(Ok(msg)) = stream.next().await {
        if msg.is_close() {
            break;
        }
    }
}
