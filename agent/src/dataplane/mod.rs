//! The data plane: Cap'n Proto frames over TCP between clients, ingresses and workers.
//!
//! Each connection has one writer task that drains its queue into one buffer per wake-up, so
//! frames produced together leave in one `write` (batched writes). Requests are tracked per
//! connection until the receiver acknowledges them; a broken connection hands every unacked
//! request back to its owner (through `lost`) to be retried on another replica.
//!
//! Architecture invariant: nothing here blocks; all of it runs on one `LocalSet` thread.

pub mod transfer;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};

/// Why a connection's frames stopped being read.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame has {0} segments")]
    Segments(usize),
    #[error("frame of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(#[from] capnp::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why a transport could not be used.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("io_uring was requested but is unavailable: {0}")]
    Unavailable(std::io::Error),
    #[error("unknown data plane {0:?}: expected auto, epoll or io_uring")]
    Unknown(String),
}

/// Why an invocation through an ingress connection got no outputs.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum InvokeError {
    #[error("connection to the ingress is closed")]
    Closed,
    #[error("connection to the ingress closed before the reply")]
    ClosedBeforeReply,
    /// The ingress answered with an error (a task's, a deadline, an unknown graph).
    #[error("{0}")]
    Failed(String),
}

/// How data-plane sockets are driven: readiness (epoll, through tokio) or completion (io_uring,
/// through tokio-uring). Chosen once per process at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Epoll,
    IoUring,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Epoll => "epoll",
            Transport::IoUring => "io_uring",
        }
    }

    /// `auto` takes io_uring when this kernel lets the process create a ring, else epoll;
    /// the reason for the choice is returned for a log line.
    pub fn choose(requested: &str) -> Result<(Transport, String), TransportError> {
        let probe = || {
            if cfg!(feature = "io-uring") {
                io_uring::IoUring::new(8).map(|_| ())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "built without io_uring",
                ))
            }
        };
        match requested {
            "epoll" => Ok((Transport::Epoll, "requested".into())),
            "io_uring" => probe()
                .map(|()| (Transport::IoUring, "requested".into()))
                .map_err(TransportError::Unavailable),
            "auto" => Ok(match probe() {
                Ok(()) => (Transport::IoUring, "the kernel supports io_uring".into()),
                Err(e) => (Transport::Epoll, format!("io_uring unavailable ({e})")),
            }),
            other => Err(TransportError::Unknown(other.to_string())),
        }
    }
}

static TRANSPORT: std::sync::OnceLock<Transport> = std::sync::OnceLock::new();

/// Sets this process's transport (once, before any connection); epoll when never set.
pub fn set_transport(t: Transport) {
    let _ = TRANSPORT.set(t);
}

pub fn transport() -> Transport {
    TRANSPORT.get().copied().unwrap_or(Transport::Epoll)
}

/// A connected socket, driven by the process's transport.
#[derive(Clone)]
enum Conn {
    Epoll(Rc<TcpStream>),
    #[cfg(feature = "io-uring")]
    Uring(Rc<tokio_uring::net::TcpStream>),
}

static LOOPBACK_VIA: std::sync::OnceLock<std::net::IpAddr> = std::sync::OnceLock::new();

/// In a microVM guest: connections to a loopback address go to `ip` instead (the host's
/// loopback as QEMU's user network presents it), since routing tables name host addresses.
pub fn set_loopback_via(ip: std::net::IpAddr) {
    let _ = LOOPBACK_VIA.set(ip);
}

/// `addr` as this process must dial it (see [`set_loopback_via`]).
fn dialled(addr: &str) -> std::borrow::Cow<'_, str> {
    match (LOOPBACK_VIA.get(), addr.parse::<std::net::SocketAddr>()) {
        (Some(via), Ok(sa)) if sa.ip().is_loopback() => std::net::SocketAddr::new(*via, sa.port())
            .to_string()
            .into(),
        _ => addr.into(),
    }
}

async fn connect(addr: &str) -> std::io::Result<Conn> {
    let addr = &*dialled(addr);
    match transport() {
        Transport::Epoll => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Conn::Epoll(Rc::new(s)))
        }
        #[cfg(not(feature = "io-uring"))]
        Transport::IoUring => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "built without io_uring",
        )),
        #[cfg(feature = "io-uring")]
        Transport::IoUring => {
            let sa: std::net::SocketAddr = addr.parse().map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
            })?;
            let s = tokio_uring::net::TcpStream::connect(sa).await?;
            s.set_nodelay(true)?;
            Ok(Conn::Uring(Rc::new(s)))
        }
    }
}

/// A data-plane listener.
pub enum Listener {
    Epoll(TcpListener),
    #[cfg(feature = "io-uring")]
    Uring(tokio_uring::net::TcpListener),
}

impl Listener {
    /// Binds with this process's transport.
    pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<Listener> {
        Ok(match transport() {
            Transport::Epoll => Listener::Epoll(TcpListener::bind(addr).await?),
            #[cfg(feature = "io-uring")]
            Transport::IoUring => Listener::Uring(tokio_uring::net::TcpListener::bind(addr)?),
            #[cfg(not(feature = "io-uring"))]
            Transport::IoUring => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "built without io_uring",
                ))
            }
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Listener::Epoll(l) => l.local_addr(),
            #[cfg(feature = "io-uring")]
            Listener::Uring(l) => l.local_addr(),
        }
    }

    async fn accept(&self) -> std::io::Result<(Conn, std::net::SocketAddr)> {
        match self {
            Listener::Epoll(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Epoll(Rc::new(s)), peer))
            }
            #[cfg(feature = "io-uring")]
            Listener::Uring(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Uring(Rc::new(s)), peer))
            }
        }
    }
}

thread_local! {
    static IO_BYTES: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Data-plane bytes (read, written) by this thread's connections.
pub fn io_bytes() -> (u64, u64) {
    IO_BYTES.with(Cell::get)
}

fn count_io(read: usize, written: usize) {
    IO_BYTES.with(|c| {
        let (r, w) = c.get();
        c.set((r + read as u64, w + written as u64));
    });
}

/// Largest frame accepted (a payload plus its envelope).
pub const MAX_FRAME_BYTES: usize = 256 << 20;

pub fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

mod codec;
mod peers;
mod reader;
mod writer;

pub use codec::*;
pub use peers::*;
pub use reader::*;
pub use writer::*;

#[cfg(test)]
mod tests;
