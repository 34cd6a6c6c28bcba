//! Broken or hostile clients are disconnected with an error logged, and a well-behaved client
//! connected at the same time keeps being served.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Waits until the server closes `s` (EOF or reset), or fails after a timeout.
fn assert_closed_by_server(mut s: TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue, // an abort message from the RPC layer is fine
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: connection not closed by the server: {e}"),
        }
    }
}

fn segment_header(words: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&0u32.to_le_bytes()); // one segment
    h.extend_from_slice(&words.to_le_bytes());
    h
}

#[test]
fn hostile_clients_are_cut_off_and_others_unaffected() {
    let dir = TempDir::new("hostile");
    let mut control = Control::start(dir.path(), &["--max-message-bytes", "1048576"]);
    control.cli_ok(&["submit", &repo_path("examples/three-stage-chain.toml")]);

    // A well-behaved client holding a connection open for the whole test.
    let mut follower = Command::new(CLI)
        .args(["--control", &control.addr, "events", "--follow", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("follower saw the backlog");
    assert!(first.contains("graph-submitted"), "{first}");

    // 1. Garbage bytes.
    let mut garbage = TcpStream::connect(&control.addr).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: prescient\r\n\r\n\xff\xfe\x00\x13garbage")
        .unwrap();
    assert_closed_by_server(garbage, "garbage");

    // 2. A truncated message: the header promises 100 words, 10 arrive, then EOF.
    let mut truncated = TcpStream::connect(&control.addr).unwrap();
    let mut msg = segment_header(100);
    msg.extend_from_slice(&[0u8; 80]);
    truncated.write_all(&msg).unwrap();
    truncated.shutdown(Shutdown::Write).unwrap();
    assert_closed_by_server(truncated, "truncated");

    // 3. A header claiming 2 GiB: refused from the header alone, before any body arrives
    //    (the client keeps its side open, so only the server can end this).
    let mut oversized = TcpStream::connect(&control.addr).unwrap();
    oversized.write_all(&segment_header(1 << 28)).unwrap();
    assert_closed_by_server(oversized, "oversized header");

    // 4. A real submit over the 1 MiB limit, through the CLI.
    let big = dir.path().join("big.toml");
    std::fs::write(
        &big,
        format!(
            "name = \"big\"\n[[task]]\nid = \"a\"\ncode = {{ builtin = \"identity\", params = {{ blob = \"{}\" }} }}\nestimate = \"1ms\"\n",
            "x".repeat(2 << 20)
        ),
    )
    .unwrap();
    let out = control.cli(&["submit", big.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "a 2 MiB message passed a 1 MiB limit"
    );

    // The node is alive, serves new clients, and the old connection still gets events.
    assert!(control.is_running(), "control node died");
    let g = control.cli_json(&["submit", &repo_path("examples/fan-out-fan-in.toml")]);
    assert_eq!(g["id"], "g2");
    let next = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("follower still served");
    assert!(next.contains("\"subject\":\"g2\""), "{next}");
    assert_eq!(control.cli_json(&["graphs"]).as_array().unwrap().len(), 2);

    let _ = follower.kill();
    let _ = follower.wait();
    let log = control.log_text();
    let errors = log.matches("client disconnected on error").count();
    assert!(
        errors >= 4,
        "expected 4 logged disconnects, found {errors}:\n{log}"
    );
    assert!(log.contains("which is too large"), "{log}");
    assert!(log.contains("Premature end of file"), "{log}");
}
