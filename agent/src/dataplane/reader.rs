//! The receiving side: aligned reads, frames parsed where they were read, readiness cleared
//! on a short read; and `serve`, which accepts connections and hands frames to a `Handler`.

use super::*;
use std::rc::Rc;
use tokio::net::TcpStream;
use tracing::{debug, warn};

/// A read buffer of whole words, so frames (multiples of 8 bytes) stay aligned and are parsed
/// in place; io_uring may own it while a read is in flight.
pub(super) struct AlignedBuf {
    words: Vec<capnp::Word>,
}

impl AlignedBuf {
    pub(super) fn bytes(&self) -> &[u8] {
        capnp::Word::words_to_bytes(&self.words)
    }
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        capnp::Word::words_to_bytes_mut(&mut self.words)
    }
}

// SAFETY: the pointer is to the Vec's heap allocation, which does not move while the buffer is
// owned by an in-flight operation (the Vec itself is never resized then); all bytes are
// initialised (zeroed at allocation).
#[cfg(feature = "io-uring")]
unsafe impl tokio_uring::buf::IoBuf for AlignedBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.words.as_ptr() as *const u8
    }
    fn bytes_init(&self) -> usize {
        self.words.len() * 8
    }
    fn bytes_total(&self) -> usize {
        self.words.len() * 8
    }
}

// SAFETY: as above; every byte is always initialised, so `set_init` has nothing to record.
#[cfg(feature = "io-uring")]
unsafe impl tokio_uring::buf::IoBufMut for AlignedBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr() as *mut u8
    }
    unsafe fn set_init(&mut self, _pos: usize) {}
}

/// Bytes a frame occupies, once its segment table is readable; `Err` for a frame over limits.
pub(super) fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let segments = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize + 1;
    if segments > 512 {
        return Err(FrameError::Segments(segments));
    }
    let header = (4 + 4 * segments).div_ceil(8) * 8;
    if buf.len() < 4 + 4 * segments {
        return Ok(None);
    }
    let mut words = 0usize;
    for i in 0..segments {
        let at = 4 + 4 * i;
        words += u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
    }
    let total = header + words * 8;
    if total > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(total));
    }
    Ok(Some(total))
}

/// Reads frames from a connection until it ends; returns the reason it ended.
/// Reads what `stream` has, as `try_read` does, but when the read comes back short of `buf`
/// (the socket's queue is empty) it also clears the stream's read readiness, so the next wait
/// sleeps until new data instead of making one more `recv` only to get `EAGAIN`. That `recv`
/// was one in two of all receive calls on the request path (and fired the TCP probe).
///
/// Tokio clears readiness only if no newer readiness event arrived since the one this read
/// used, so data that lands right after the short read still wakes the next wait.
pub(super) fn read_draining(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut got = None;
    let r = stream.try_io(tokio::io::Interest::READABLE, || {
        // SAFETY: `buf` is valid for writes of its length; the fd is the stream's, open while
        // `stream` is borrowed.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        if n > 0 && n < buf.len() {
            got = Some(n);
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, got) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

pub(super) async fn read_frames(
    stream: Conn,
    mut on_frame: impl FnMut(Inbound),
) -> Result<(), FrameError> {
    // Words, not bytes: frames start 8-byte aligned, so they are read in place.
    let mut buf = AlignedBuf {
        words: capnp::Word::allocate_zeroed_vec(8 << 10),
    };
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        loop {
            let bytes = &buf.bytes()[start..end];
            let Some(len) = frame_len(bytes)? else { break };
            if bytes.len() < len {
                break;
            }
            let frame = {
                let mut slice = &bytes[..len];
                let msg =
                    capnp::serialize::read_message_from_flat_slice(&mut slice, reader_options())?;
                decode(&msg)?
            };
            start += len;
            on_frame(frame);
        }
        if start == end {
            start = 0;
            end = 0;
        }
        let capacity = buf.words.len() * 8;
        let need = frame_len(&buf.bytes()[start..end])?.unwrap_or(64);
        if start > 0 && (end == capacity || start + need > capacity) {
            buf.bytes_mut().copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if need > capacity {
            // Room for several frames of this size, so large frames are not compacted each time.
            let words = (need * 4).min(need + (64 << 20)).div_ceil(8);
            buf.words.resize(words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
        }
        let n = match &stream {
            Conn::Epoll(s) => {
                s.readable().await?;
                match read_draining(s, &mut buf.bytes_mut()[end..]) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            #[cfg(feature = "io-uring")]
            Conn::Uring(s) => {
                use tokio_uring::buf::BoundedBuf;
                let total = buf.words.len() * 8;
                let (result, slice) = s.read(buf.slice(end..total)).await;
                buf = slice.into_inner();
                result?
            }
        };
        count_io(n, 0);
        if n == 0 {
            return if start == end {
                Ok(())
            } else {
                Err(FrameError::Truncated)
            };
        }
        end += n;
    }
}

/// Frames an endpoint receives on connections others opened to it.
pub trait Handler: 'static {
    fn request(self: Rc<Self>, seq: u64, hop: Hop, from: &Sender);
    fn output(self: Rc<Self>, out: OutputMsg);
    fn invoke(self: Rc<Self>, inv: InvokeMsg, from: &Sender);
}

/// Accepts data-plane connections on `listener` and hands their frames to `handler`.
pub async fn serve<H: Handler>(listener: Listener, handler: Rc<H>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("data plane accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::task::spawn_local(async move {
            let sender = Sender::new(stream.clone());
            let result = read_frames(stream, |f| match f {
                Inbound::Request { seq, hop } => handler.clone().request(seq, hop, &sender),
                Inbound::Output(o) => handler.clone().output(o),
                Inbound::Invoke(i) => handler.clone().invoke(i, &sender),
                Inbound::Acks(_) | Inbound::Reply(_) => {
                    debug!(%peer, "unexpected frame on an inbound connection")
                }
            })
            .await;
            sender.close();
            if let Err(e) = result {
                debug!(%peer, "data plane connection ended: {e}");
            }
        });
    }
}
