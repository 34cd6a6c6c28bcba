//! TCP bytes per VM from the kernel's own per-socket counters. Once a second the agent finds
//! each VM's sockets (its processes' open files), reads every TCP socket's counters through
//! sock_diag (`tcp_info`'s `bytes_acked` and `bytes_received`, with the socket's queues) and
//! charges each socket's growth to its VM; a socket that closed since the previous read is
//! settled from the final counts the probes kept (`inet_sock_set_state`). So nothing runs per
//! send or receive, and every path that moves TCP bytes counts (sendfile, splice, io_uring),
//! not only `sendmsg`.
//!
//! API boundary: [`Diag`] speaks sock_diag in one network namespace; [`SocketLedger`] keeps
//! what each socket had carried at the previous read; [`settle`] is its pure core (tested
//! without a kernel).

use crate::telemetry::probes::Closed;
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use tracing::warn;

/// One TCP socket's counters as sock_diag reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpCounts {
    /// The kernel's cookie for the socket: unique while the system runs, and the key the
    /// probes record its close under.
    pub cookie: u64,
    /// Its inode (0 once no process holds it: closed, still finishing).
    pub inode: u64,
    /// Bytes the application wrote: `bytes_acked` plus what waits in the send queue.
    pub written: u64,
    /// Bytes the application read: `bytes_received` less what waits in the receive queue.
    pub read: u64,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_INFO: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
const INET_DIAG_MSG: usize = 72;
/// `tcp_info` up to and including `tcpi_bytes_received` (Linux 4.1).
const TCP_INFO_BYTES: usize = 136;

/// TCP states whose sockets are full sockets with counters: all but LISTEN, SYN_RECV,
/// TIME_WAIT and NEW_SYN_RECV (mini sockets; a socket's counts are final when it enters
/// TIME_WAIT, and the probes record them then).
const STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 11);

/// A sock_diag socket bound to one network namespace (the one it was opened in).
pub struct Diag {
    fd: OwnedFd,
}

impl Diag {
    /// A sock_diag socket in this process's network namespace.
    pub fn open() -> io::Result<Diag> {
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor, owned from here on.
        Ok(Diag {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// A sock_diag socket in the network namespace of process `pid`: opened by a thread that
    /// joins that namespace and then ends, so the agent's own threads never move.
    pub fn open_in_netns_of(pid: u32) -> io::Result<Diag> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a namespace descriptor we hold.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Diag::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })
    }

    /// Every TCP socket of this namespace (IPv4 and IPv6) with its counters.
    pub fn tcp_sockets(&self) -> io::Result<Vec<TcpCounts>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            self.dump(family, &mut buf, &mut out)?;
        }
        Ok(out)
    }

    fn dump(&self, family: u8, buf: &mut [u8], out: &mut Vec<TcpCounts>) -> io::Result<()> {
        const REQ: usize = NLMSG_HDR + 56;
        let mut req = [0u8; REQ];
        req[0..4].copy_from_slice(&(REQ as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        req[6..8].copy_from_slice(&flags.to_ne_bytes());
        req[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // inet_diag_req_v2: family, protocol, extensions wanted, pad, states, then a zero id.
        req[16] = family;
        req[17] = libc::IPPROTO_TCP as u8;
        req[18] = 1 << (INET_DIAG_INFO - 1);
        req[20..24].copy_from_slice(&STATES.to_ne_bytes());
        // SAFETY: a zeroed sockaddr_nl addressed to the kernel (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: the buffer and address outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            // SAFETY: reads into our buffer, at most its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            match parse_dump(&buf[..n as usize], out) {
                Ok(true) => return Ok(()),
                Ok(false) if n > 0 => {}
                Ok(false) => return Err(io::Error::other("sock_diag: the dump ended early")),
                Err(e) => return Err(e),
            }
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Parses one datagram of a sock_diag dump into `out`; true once the dump is done.
fn parse_dump(mut b: &[u8], out: &mut Vec<TcpCounts>) -> io::Result<bool> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0).ok_or_else(|| bad("short header"))? as usize;
        let kind = u16_at(b, 4).ok_or_else(|| bad("short header"))?;
        if len < NLMSG_HDR || len > b.len() {
            return Err(bad("a message's length runs past the datagram"));
        }
        let body = &b[NLMSG_HDR..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(body, 0).map_or(0, |e| e as i32);
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = parse_socket(body) {
                    out.push(s);
                }
            }
            _ => {}
        }
        b = &b[align4(len).min(b.len())..];
    }
    Ok(false)
}

/// One `inet_diag_msg` with its attributes; None without `tcp_info` counters (a kernel
/// before 4.1, or a socket in a state that has none).
fn parse_socket(m: &[u8]) -> Option<TcpCounts> {
    let cookie = u32_at(m, 44)? as u64 | (u32_at(m, 48)? as u64) << 32;
    let rqueue = u32_at(m, 56)? as u64;
    let wqueue = u32_at(m, 60)? as u64;
    let inode = u32_at(m, 68)? as u64;
    let mut attrs = m.get(INET_DIAG_MSG..)?;
    while attrs.len() >= 4 {
        let len = u16_at(attrs, 0)? as usize;
        let kind = u16_at(attrs, 2)?;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == INET_DIAG_INFO && len - 4 >= TCP_INFO_BYTES {
            let info = &attrs[4..len];
            let acked = u64_at(info, 120)?;
            let received = u64_at(info, 128)?;
            return Some(TcpCounts {
                cookie,
                inode,
                written: acked + wqueue,
                read: received.saturating_sub(rqueue),
            });
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

/// The socket inodes process `pid` holds open (empty when it is gone or unreadable).
pub fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// What a socket had carried when last read, and whose it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub vm: String,
    pub written: u64,
    pub read: u64,
}

/// What one read changes: bytes per VM (written, read), sockets to watch for their close
/// (newly found in a VM), and sockets no longer worth watching.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub bytes: HashMap<String, (u64, u64)>,
    pub watch: Vec<(u64, String)>,
    pub unwatch: Vec<u64>,
}

/// Charges each VM for what its sockets carried since the previous read. `live` is every
/// socket read now, `owner` says which VM holds a socket inode, `closed` is the probes' final
/// counts of sockets that closed. A socket seen before is charged its growth; a new one in a
/// VM its whole count (it opened since, or its process just joined); a closed one what it
/// carried after its last read (all of it, when it lived and died between two reads).
pub fn settle(
    seen: &mut HashMap<u64, Seen>,
    live: &[TcpCounts],
    owner: &HashMap<u64, String>,
    closed: &[Closed],
) -> Settled {
    let mut out = Settled::default();
    let charge = |out: &mut Settled, vm: &str, written: u64, read: u64| {
        let b = out.bytes.entry(vm.to_string()).or_default();
        b.0 += written;
        b.1 += read;
    };
    let mut present = HashSet::with_capacity(live.len());
    for s in live {
        present.insert(s.cookie);
        if let Some(before) = seen.get_mut(&s.cookie) {
            // Counters only grow; a smaller one is a reused cookie's (not on one boot).
            let (w, r) = (
                s.written.saturating_sub(before.written),
                s.read.saturating_sub(before.read),
            );
            charge(&mut out, &before.vm, w, r);
            before.written = before.written.max(s.written);
            before.read = before.read.max(s.read);
        } else if let Some(vm) = (s.inode != 0).then(|| owner.get(&s.inode)).flatten() {
            charge(&mut out, vm, s.written, s.read);
            seen.insert(
                s.cookie,
                Seen {
                    vm: vm.clone(),
                    written: s.written,
                    read: s.read,
                },
            );
            out.watch.push((s.cookie, vm.clone()));
        }
    }
    for c in closed {
        match seen.remove(&c.cookie) {
            Some(before) => charge(
                &mut out,
                &before.vm,
                c.written.saturating_sub(before.written),
                c.read.saturating_sub(before.read),
            ),
            None => {
                if let Some(vm) = &c.vm {
                    charge(&mut out, vm, c.written, c.read);
                }
            }
        }
    }
    seen.retain(|cookie, _| {
        let keep = present.contains(cookie);
        if !keep {
            out.unwatch.push(*cookie);
        }
        keep
    });
    // A socket found and closed in this one round needs no watching.
    out.watch.retain(|(cookie, _)| seen.contains_key(cookie));
    out
}

/// Reads every VM's TCP sockets once a second and keeps what each had carried.
#[derive(Default)]
pub struct SocketLedger {
    seen: HashMap<u64, Seen>,
    /// One sock_diag socket per network namespace that holds a VM's process.
    diags: HashMap<u64, Diag>,
    warned: HashSet<u64>,
}

impl SocketLedger {
    /// TCP bytes (written, read) each VM's sockets carried since the previous call; `vms` is
    /// each VM's name and processes. Sockets that closed meanwhile are settled from the
    /// probes' final counts, and the VMs' new sockets are watched for their close.
    pub fn sample(
        &mut self,
        vms: &[(String, Vec<u32>)],
        probes: &crate::telemetry::probes::Probes,
    ) -> HashMap<String, (u64, u64)> {
        let mut owner = HashMap::new();
        // Each namespace's sockets are read through a process that lives in it.
        let mut namespaces: HashMap<u64, u32> = HashMap::new();
        for (vm, procs) in vms {
            for &pid in procs {
                let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
                    continue;
                };
                namespaces.entry(ns.ino()).or_insert(pid);
                for inode in socket_inodes(pid) {
                    owner.entry(inode).or_insert_with(|| vm.clone());
                }
            }
        }
        let mut live = Vec::new();
        for (&ns, &pid) in &namespaces {
            let diag = match self.diags.entry(ns) {
                std::collections::hash_map::Entry::Occupied(d) => d.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let own = std::fs::metadata("/proc/self/ns/net").is_ok_and(|m| m.ino() == ns);
                    let opened = if own {
                        Diag::open()
                    } else {
                        Diag::open_in_netns_of(pid)
                    };
                    match opened {
                        Ok(d) => slot.insert(d),
                        Err(e) => {
                            if self.warned.insert(ns) {
                                warn!(
                                    pid,
                                    "cannot read TCP sockets in process {pid}'s network \
                                     namespace: {e}"
                                );
                            }
                            continue;
                        }
                    }
                }
            };
            match diag.tcp_sockets() {
                Ok(s) => live.extend(s),
                Err(e) => {
                    if self.warned.insert(ns) {
                        warn!("reading TCP sockets through sock_diag failed: {e}");
                    }
                }
            }
        }
        // Namespaces no VM lives in any more give back their socket.
        self.diags.retain(|ns, _| namespaces.contains_key(ns));
        // Taken after the read: a socket that closed in between is read live, then settled.
        let closed = probes.take_closed();
        let settled = settle(&mut self.seen, &live, &owner, &closed);
        for (cookie, vm) in &settled.watch {
            probes.watch(*cookie, vm);
        }
        for cookie in &settled.unwatch {
            probes.unwatch(*cookie);
        }
        settled.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn counts(cookie: u64, inode: u64, written: u64, read: u64) -> TcpCounts {
        TcpCounts {
            cookie,
            inode,
            written,
            read,
        }
    }

    #[test]
    fn sockets_are_charged_their_growth_once() {
        let mut seen = HashMap::new();
        let owner: HashMap<u64, String> = [(100, "a".to_string()), (200, "b".to_string())].into();
        // Found: charged in full, and watched.
        let s = settle(
            &mut seen,
            &[
                counts(1, 100, 500, 40),
                counts(2, 200, 7, 0),
                counts(3, 300, 9, 9),
            ],
            &owner,
            &[],
        );
        assert_eq!(s.bytes["a"], (500, 40));
        assert_eq!(s.bytes["b"], (7, 0));
        assert_eq!(s.bytes.len(), 2, "a socket of no VM counts nowhere");
        assert_eq!(s.watch.len(), 2);
        // Growth only; an orphaned socket (inode 0) seen before still counts.
        let s = settle(
            &mut seen,
            &[counts(1, 0, 800, 40), counts(2, 200, 7, 0)],
            &owner,
            &[],
        );
        assert_eq!(s.bytes["a"], (300, 0));
        assert_eq!(s.bytes["b"], (0, 0));
        assert!(s.watch.is_empty());
        // Socket 1 closed after carrying 50 more; a socket of "b" lived and died between two
        // reads; one of a gone VM counts nowhere. Socket 2 vanished without a close record.
        let closed = [
            Closed {
                cookie: 1,
                written: 850,
                read: 41,
                vm: Some("a".into()),
            },
            Closed {
                cookie: 9,
                written: 1000,
                read: 2000,
                vm: Some("b".into()),
            },
            Closed {
                cookie: 10,
                written: 5,
                read: 5,
                vm: None,
            },
        ];
        let s = settle(&mut seen, &[], &owner, &closed);
        assert_eq!(s.bytes["a"], (50, 1));
        assert_eq!(s.bytes["b"], (1000, 2000));
        assert_eq!(s.unwatch, vec![2]);
        assert!(seen.is_empty());
        // A socket read live and then closed in the same round: live growth, then the rest.
        settle(&mut seen, &[counts(4, 100, 10, 10)], &owner, &[]);
        let s = settle(
            &mut seen,
            &[counts(4, 100, 15, 10)],
            &owner,
            &[Closed {
                cookie: 4,
                written: 18,
                read: 12,
                vm: Some("a".into()),
            }],
        );
        assert_eq!(s.bytes["a"], (8, 2));
    }

    #[test]
    fn truncated_dumps_are_errors_not_panics() {
        let mut out = Vec::new();
        // A header claiming more than the datagram holds.
        let mut b = vec![0u8; 20];
        b[0..4].copy_from_slice(&100u32.to_ne_bytes());
        b[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(parse_dump(&b, &mut out).is_err());
        // A socket message cut short is skipped.
        b[0..4].copy_from_slice(&20u32.to_ne_bytes());
        assert_eq!(parse_dump(&b, &mut out).ok(), Some(false));
        assert!(out.is_empty());
        // A whole message: one socket with its tcp_info, then the end of the dump.
        let mut m = vec![0u8; NLMSG_HDR + INET_DIAG_MSG + 4 + TCP_INFO_BYTES];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let body = NLMSG_HDR;
        m[body + 44..body + 48].copy_from_slice(&5u32.to_ne_bytes());
        m[body + 48..body + 52].copy_from_slice(&1u32.to_ne_bytes());
        m[body + 56..body + 60].copy_from_slice(&30u32.to_ne_bytes());
        m[body + 60..body + 64].copy_from_slice(&20u32.to_ne_bytes());
        m[body + 68..body + 72].copy_from_slice(&77u32.to_ne_bytes());
        let attr = body + INET_DIAG_MSG;
        m[attr..attr + 2].copy_from_slice(&(4 + TCP_INFO_BYTES as u16).to_ne_bytes());
        m[attr + 2..attr + 4].copy_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        m[attr + 4 + 120..attr + 4 + 128].copy_from_slice(&1000u64.to_ne_bytes());
        m[attr + 4 + 128..attr + 4 + 136].copy_from_slice(&500u64.to_ne_bytes());
        let mut done = vec![0u8; NLMSG_HDR + 4];
        let done_len = done.len() as u32;
        done[0..4].copy_from_slice(&done_len.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&done);
        assert_eq!(parse_dump(&m, &mut out).ok(), Some(true));
        assert_eq!(out, vec![counts(5 | 1 << 32, 77, 1020, 470)]);
        // Every prefix parses without panicking.
        for cut in 0..m.len() {
            let _ = parse_dump(&m[..cut], &mut Vec::new());
        }
    }

    /// The kernel's counters, read through sock_diag, match what went through a loopback
    /// connection, and the connection is found by the inodes this process holds.
    #[test]
    fn sock_diag_counts_a_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let sent = vec![7u8; 300_000];
        let writer = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client
        });
        let mut got = vec![0u8; 200_000];
        server.read_exact(&mut got).unwrap();
        let _client = writer.join().unwrap();
        // Let the last segments be acknowledged.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let inodes = socket_inodes(std::process::id());
        let sockets = Diag::open().unwrap().tcp_sockets().unwrap();
        let mine: Vec<&TcpCounts> = sockets
            .iter()
            .filter(|s| inodes.contains(&s.inode))
            .collect();
        // The client wrote 300,000 (its SYN counts one); the server read 200,000.
        assert!(
            mine.iter()
                .any(|s| (300_000..=300_001).contains(&s.written)),
            "{mine:?}"
        );
        assert!(mine.iter().any(|s| s.read == 200_000), "{mine:?}");
        assert!(mine.iter().all(|s| s.cookie != 0));
    }
}
