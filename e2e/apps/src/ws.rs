//! WebSocket for the demo apps, on `tokio-tungstenite` (RFC 6455 framing,
//! masking, fragment reassembly, automatic pong and close replies, the
//! client's opening handshake): the server's `Sec-WebSocket-Accept`, its
//! echo loop over an upgraded connection, and the client end of a
//! connection whose handshake is already done.

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

pub use tokio_tungstenite::tungstenite::Message;
pub use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest message (and frame) the demo apps accept.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The limits of both ends.
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Echoes text and binary messages back on the upgraded connection `io`
/// until the peer closes; pings and the peer's close are answered by
/// tungstenite. A peer that breaks the protocol gets a close frame with
/// 1002 (1009 for a message over [`MAX_MESSAGE`]) and the error.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(io: S) -> Result<(), Error> {
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
    while let Some(message) = ws.next().await {
        match message {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => ws.send(message).await?,
            Ok(_) => {}
            // A peer that leaves without the closing handshake is done too.
            Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => break,
            Err(e) => {
                let code = match e {
                    Error::Capacity(_) => CloseCode::Size,
                    _ => CloseCode::Protocol,
                };
                let close = CloseFrame {
                    code,
                    reason: "".into(),
                };
                // Best effort: the peer may already be gone.
                let _ = ws.close(Some(close)).await;
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The client end of `io`, on which the opening handshake is already done
/// (the tests write it by hand to check the server's answer byte for byte).
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(io: S) -> WebSocketStream<S> {
    WebSocketStream::from_raw_socket(io, Role::Client, Some(config())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_accept_key() {
        assert_eq!(
            derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn echo_loop() {
        let (client_io, server_io) = tokio::io::duplex(1024);
        let task = tokio::spawn(echo(server_io));
        let mut ws = client(client_io).await;
        ws.send(Message::text("hi there")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi there"));
        let big = vec![7u8; 100_000];
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
        ws.send(Message::Ping("p".into())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::Pong("p".into()));
        ws.close(None).await.unwrap();
        assert!(matches!(
            ws.next().await.unwrap().unwrap(),
            Message::Close(_)
        ));
        assert!(ws.next().await.is_none());
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn oversized_message_is_closed_with_1009() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut raw, server_io) = tokio::io::duplex(1024);
        let task = tokio::spawn(echo(server_io));
        // A masked binary frame header declaring 2^40 bytes.
        raw.write_all(&[0x82, 0xFF, 0, 0, 1, 0, 0, 0, 0, 0, 1, 2, 3, 4])
            .await
            .unwrap();
        let mut answer = Vec::new();
        raw.read_to_end(&mut answer).await.unwrap();
        // An unmasked close frame: 0x88, length 2, code 1009.
        assert_eq!(answer, [0x88, 0x02, 0x03, 0xF1]);
        assert!(matches!(task.await.unwrap(), Err(Error::Capacity(_))));
    }
}
