//! The sending side of a connection: direct writes when it is quiet, batched (vectored) writes
//! under load, delayed and batched acknowledgements; large frames never copied into a batch.

use super::*;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// The sending side of a connection. When the connection has been quiet for a while, a frame is
/// written straight to the socket (no task switch on the request path: what latency at low load
/// needs); when frames come close together, they join a buffer that a writer task flushes in one
/// write after the current task yields (batched writes: what throughput under load needs).
#[derive(Clone)]
pub struct Sender(Rc<Out>);

/// Frames closer together than this are batched instead of written one by one.
pub(super) const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_micros(50);

/// How long acknowledgements wait to be sent together.
pub(super) const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(1);

pub(super) struct Out {
    stream: Conn,
    pending: RefCell<OutQueue>,
    /// An io_uring write owns queued bytes: nothing may be written around it.
    writing: Cell<bool>,
    last_write: Cell<std::time::Instant>,
    acks: RefCell<Vec<u64>>,
    closed: Cell<bool>,
    wake: tokio::sync::Notify,
}

impl Sender {
    pub(super) fn new(stream: Conn) -> Sender {
        let out = Rc::new(Out {
            stream,
            pending: RefCell::new(OutQueue::default()),
            writing: Cell::new(false),
            last_write: Cell::new(std::time::Instant::now() - BATCH_WINDOW),
            acks: RefCell::new(Vec::new()),
            closed: Cell::new(false),
            wake: tokio::sync::Notify::new(),
        });
        let o = out.clone();
        tokio::task::spawn_local(async move {
            // Ends when the connection closes or every Sender is gone (this task holds the other
            // reference).
            while Rc::strong_count(&o) > 1 && !o.closed.get() {
                if o.pending.borrow().is_empty() {
                    o.wake.notified().await;
                    continue;
                }
                match &o.stream {
                    Conn::Epoll(stream) => {
                        if stream.writable().await.is_err() {
                            o.closed.set(true);
                            break;
                        }
                        let mut pending = o.pending.borrow_mut();
                        let result = {
                            let slices = pending.io_slices();
                            stream.try_write_vectored(&slices)
                        };
                        match result {
                            Ok(n) => {
                                count_io(0, n);
                                pending.advance(n)
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => o.closed.set(true),
                        }
                    }
                    #[cfg(feature = "io-uring")]
                    Conn::Uring(stream) => {
                        // The ring owns each buffer while writing it; new frames gather meanwhile.
                        let chunks = o.pending.borrow_mut().take_all();
                        o.writing.set(true);
                        for chunk in chunks {
                            count_io(0, chunk.len());
                            let (result, _) = stream.write_all(chunk).await;
                            if result.is_err() {
                                o.closed.set(true);
                                break;
                            }
                        }
                        o.writing.set(false);
                    }
                }
            }
        });
        Sender(out)
    }

    /// Queues a frame; false when the connection is gone.
    pub fn send(&self, frame: Vec<u8>) -> bool {
        let o = &self.0;
        if o.closed.get() {
            return false;
        }
        let mut pending = o.pending.borrow_mut();
        let now = std::time::Instant::now();
        let quiet = now.duration_since(o.last_write.replace(now)) >= BATCH_WINDOW;
        // Large frames always go through the writer: with io_uring the kernel copies them on
        // its own worker threads while this thread goes on (3x the bulk throughput here).
        let idle = pending.is_empty() && quiet && !o.writing.get() && frame.len() < COALESCE_BELOW;
        let direct = match &o.stream {
            Conn::Epoll(stream) if idle => Some(stream.try_write(&frame)),
            #[cfg(feature = "io-uring")]
            Conn::Uring(stream) if idle => Some(try_send_now(stream, &frame)),
            _ => None,
        };
        if let Some(result) = direct {
            if let Ok(n) = &result {
                count_io(0, *n);
            }
            match result {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => pending.push_partly_written(frame, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => pending.push(frame),
                Err(_) => {
                    o.closed.set(true);
                    return false;
                }
            }
        } else {
            pending.push(frame);
        }
        drop(pending);
        o.wake.notify_one();
        true
    }

    /// Acknowledges a request. Acks are gathered for up to a millisecond and sent as one frame:
    /// they feed load estimates and retries, neither of which needs them sooner, and sending
    /// each alone would cost the sender a wake-up per request.
    pub fn ack(&self, seq: u64) {
        let mut acks = self.0.acks.borrow_mut();
        acks.push(seq);
        if acks.len() == 1 {
            let this = self.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(ACK_DELAY).await;
                let seqs = std::mem::take(&mut *this.0.acks.borrow_mut());
                this.send(encode_acks(&seqs));
            });
        }
    }

    /// Stops writing; the writer task ends.
    pub fn close(&self) {
        self.0.closed.set(true);
        self.0.wake.notify_one();
    }
}

/// A non-blocking `send` on an io_uring socket: when the connection is idle, a small frame
/// leaves at once instead of waiting for the writer task and a ring submission.
#[cfg(feature = "io-uring")]
pub(super) fn try_send_now(
    stream: &tokio_uring::net::TcpStream,
    frame: &[u8],
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for as long as `stream` lives; the buffer is valid for its length.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Frames waiting to be written: small ones coalesced into one buffer (one write for many), large
/// ones kept as they are (written from where they were encoded, never copied again).
#[derive(Default)]
pub(super) struct OutQueue {
    chunks: std::collections::VecDeque<Vec<u8>>,
    /// Bytes of the first chunk already written.
    head: usize,
    /// Whether the last chunk is a batch of small frames that more may join.
    small_tail: bool,
}

/// Frames under this size are copied into a shared batch; larger ones are queued whole.
pub(super) const COALESCE_BELOW: usize = 16 << 10;

impl OutQueue {
    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub(super) fn push(&mut self, frame: Vec<u8>) {
        if frame.len() < COALESCE_BELOW {
            if self.small_tail {
                if let Some(last) = self.chunks.back_mut() {
                    if last.len() + frame.len() <= 256 << 10 {
                        last.extend_from_slice(&frame);
                        return;
                    }
                }
            }
            self.small_tail = true;
        } else {
            self.small_tail = false;
        }
        self.chunks.push_back(frame);
    }

    pub(super) fn push_partly_written(&mut self, frame: Vec<u8>, written: usize) {
        debug_assert!(self.chunks.is_empty());
        self.chunks.push_back(frame);
        self.head = written;
        self.small_tail = false;
    }

    pub(super) fn io_slices(&self) -> Vec<std::io::IoSlice<'_>> {
        self.chunks
            .iter()
            .take(64)
            .enumerate()
            .map(|(i, c)| std::io::IoSlice::new(if i == 0 { &c[self.head..] } else { c }))
            .collect()
    }

    pub(super) fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(first) = self.chunks.front() else {
                return;
            };
            let left = first.len() - self.head;
            if n < left {
                self.head += n;
                return;
            }
            n -= left;
            self.head = 0;
            self.chunks.pop_front();
        }
        if self.chunks.is_empty() {
            self.small_tail = false;
        }
    }

    #[cfg_attr(not(feature = "io-uring"), allow(dead_code))]
    pub(super) fn take_all(&mut self) -> Vec<Vec<u8>> {
        let mut chunks: Vec<Vec<u8>> = self.chunks.drain(..).collect();
        if self.head > 0 {
            chunks[0].drain(..self.head);
            self.head = 0;
        }
        self.small_tail = false;
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_out_queue_coalesces_small_frames_and_keeps_large_ones_whole() {
        let mut q = OutQueue::default();
        q.push(vec![1; 10]);
        q.push(vec![2; 10]);
        q.push(vec![3; 100 << 10]);
        q.push(vec![4; 10]);
        assert_eq!(q.chunks.len(), 3);
        assert_eq!(q.chunks[0].len(), 20);
        q.advance(25);
        assert_eq!((q.chunks.len(), q.head), (2, 5));
        let all = q.take_all();
        assert_eq!(all[0].len(), (100 << 10) - 5);
        assert!(q.is_empty());
    }
}
