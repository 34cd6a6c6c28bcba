//! Frames, batching and connections, tested on loopback.

use super::*;
use bytes::Bytes;

fn hop(payload: &'static [u8]) -> Hop {
    Hop {
        invocation: 7,
        graph_id: "g1".into(),
        epoch: 3,
        task: "t".into(),
        port: "in".into(),
        payload: Bytes::from_static(payload),
        deadline_unix_us: 99,
        reply_to: "127.0.0.1:1".into(),
        attempt: 1,
        sent_unix_ns: 0,
        admitted_unix_ns: 0,
    }
}

#[test]
fn request_frames_round_trip() {
    let frame = encode_request(42, &hop(b"payload"));
    assert_eq!(frame_len(&frame).ok(), Some(Some(frame.len())));
    assert_eq!(frame_len(&frame[..3]).ok(), Some(None));
    let Ok(Inbound::Request { seq, hop: back }) = decode_frame(&frame) else {
        panic!("not a request");
    };
    assert_eq!(seq, 42);
    assert_eq!(
        (&*back.task, &back.payload[..], back.epoch, back.attempt),
        ("t", &b"payload"[..], 3, 1)
    );
    assert!(
        back.sent_unix_ns > 0,
        "the send time travels for transfer measurements"
    );
}

#[test]
fn oversized_and_garbage_frames_are_refused() {
    let mut huge = vec![0u8; 8];
    huge[4..8].copy_from_slice(&(u32::MAX).to_le_bytes());
    assert!(frame_len(&huge).is_err());
    let garbage = b"GET / HTTP/1.1\r\n";
    assert!(frame_len(garbage).is_err());
}
