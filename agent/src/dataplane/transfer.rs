//! The transfer benchmark's two ends: a sink that acknowledges and drops request frames, and a
//! source that streams a given number of bytes to it in fixed-size payloads through the data
//! plane, with a window of unacknowledged requests. Each runs as its own process.

use crate::dataplane::{self, Hop, InvokeMsg, OutputMsg, PeerPool, Sender};
use bytes::Bytes;
use std::rc::Rc;
use std::time::Instant;

struct Sink;

impl dataplane::Handler for Sink {
    fn request(self: Rc<Self>, seq: u64, _hop: Hop, from: &Sender) {
        from.ack(seq);
    }
    fn output(self: Rc<Self>, _: OutputMsg) {}
    fn invoke(self: Rc<Self>, _: InvokeMsg, _: &Sender) {}
}

/// Serves as a sink until killed; prints `prescient-sink ready ADDR`.
pub async fn sink(listen: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    let listener = dataplane::Listener::bind(listen).await?;
    println!("prescient-sink ready {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    dataplane::serve(listener, Rc::new(Sink)).await;
    Ok(())
}

/// The sink went away during a transfer.
#[derive(Debug, thiserror::Error)]
#[error("sink lost: {0}")]
pub struct SinkLost(pub String);

/// Sends `total` bytes in `payload`-byte requests to `to`; returns seconds taken.
pub async fn source(
    to: &str,
    total: u64,
    payload: usize,
    window_bytes: usize,
) -> Result<f64, SinkLost> {
    let (pool, mut lost) = PeerPool::new();
    let addr: Rc<str> = to.into();
    let body = Bytes::from(vec![0xa5u8; payload]);
    let count = total.div_ceil(payload as u64);
    let window = (window_bytes / payload).max(1);
    let hop = |i: u64| Hop {
        invocation: i,
        graph_id: "bench".into(),
        epoch: 1,
        task: "sink".into(),
        port: "in".into(),
        payload: body.clone(),
        deadline_unix_us: u64::MAX,
        reply_to: "".into(),
        attempt: 0,
        sent_unix_ns: 0,
        admitted_unix_ns: 0,
    };
    // One small request first, so connecting is not timed.
    pool.send_request(
        &addr,
        Hop {
            payload: Bytes::new(),
            ..hop(0)
        },
    );
    while pool.outstanding(&addr) > 0 {
        pool.acked().await;
        if let Ok(l) = lost.try_recv() {
            return Err(SinkLost(l.reason));
        }
    }
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < count || pool.outstanding(&addr) > 0 {
        while sent < count && pool.outstanding(&addr) < window {
            sent += 1;
            pool.send_request(&addr, hop(sent));
        }
        pool.acked().await;
        if let Ok(l) = lost.try_recv() {
            return Err(SinkLost(l.reason));
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The physical reference: plain blocking TCP, one `write` per payload, no framing.
pub fn raw_source(to: &str, total: u64, payload: usize) -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(to)?;
    s.set_nodelay(true)?;
    let buf = vec![0xa5u8; payload];
    let started = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(payload as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut done = [0u8; 1];
    let _ = s.read(&mut done)?; // the sink answers once it has read everything
    Ok(started.elapsed().as_secs_f64())
}

/// The raw sink: reads everything, then answers one byte. Prints `prescient-sink ready ADDR`.
pub fn raw_sink(listen: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(listen)?;
    println!("prescient-sink ready {}", l.local_addr()?);
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 1 << 20];
    for conn in l.incoming() {
        let mut c = conn?;
        while c.read(&mut buf)? > 0 {}
        c.write_all(b"k")?;
    }
    Ok(())
}
