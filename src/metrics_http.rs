//! A minimal HTTP/1.1 server for `GET /metrics` (Prometheus text format), shared by the daemons.
//! Anything else gets 404; slow or oversized requests are dropped.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `render()` on `GET /metrics` until the future is dropped. Must run in a `LocalSet`.
pub async fn serve(listener: tokio::net::TcpListener, render: std::rc::Rc<dyn Fn() -> String>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let render = render.clone();
        tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let head = loop {
                let read =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[n..])).await;
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
                if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
                    break String::from_utf8_lossy(&buf[..end]).into_owned();
                }
                if n == buf.len() {
                    return;
                }
            };
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if head.starts_with("GET ")
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                ("200 OK", render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
