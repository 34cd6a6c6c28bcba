//! Frames as Cap'n Proto messages: decoding in place and encoding each kind of frame.

use super::*;
use bytes::Bytes;
use capnp::message::ReaderOptions;
use prescient_schemas::codec::text;
use prescient_schemas::dataplane_capnp::{frame, request};
use std::rc::Rc;

/// Decodes one whole frame (for tools and benchmarks; connections decode in place).
pub fn decode_frame(bytes: &[u8]) -> Result<Inbound, FrameError> {
    let mut words = capnp::Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
    capnp::Word::words_to_bytes_mut(&mut words)[..bytes.len()].copy_from_slice(bytes);
    let mut slice = &capnp::Word::words_to_bytes(&words)[..bytes.len()];
    let msg = capnp::serialize::read_message_from_flat_slice(&mut slice, reader_options())?;
    Ok(decode(&msg)?)
}

pub(super) fn reader_options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(MAX_FRAME_BYTES / 8));
    o
}

/// One input of one task for one invocation, as carried between replicas.
#[derive(Clone, Debug)]
pub struct Hop {
    pub invocation: u64,
    pub graph_id: Rc<str>,
    pub epoch: u64,
    pub task: Rc<str>,
    pub port: Rc<str>,
    pub payload: Bytes,
    pub deadline_unix_us: u64,
    /// The ingress that waits for the outputs.
    pub reply_to: Rc<str>,
    pub attempt: u32,
    /// When the sender wrote it (set on receipt from the frame).
    pub sent_unix_ns: u64,
    /// When the ingress admitted the invocation (0: unknown).
    pub admitted_unix_ns: u64,
}

/// A graph output (or an error) travelling back to the ingress.
#[derive(Clone, Debug)]
pub struct OutputMsg {
    pub invocation: u64,
    pub task: String,
    pub port: String,
    pub payload: Bytes,
    pub error: String,
}

#[derive(Clone, Debug)]
pub struct InvokeMsg {
    pub id: u64,
    pub graph: String,
    pub inputs: Vec<(String, Bytes)>,
    pub deadline_ms: u32,
}

#[derive(Clone, Debug)]
pub struct ReplyMsg {
    pub id: u64,
    pub outputs: Vec<(String, Bytes)>,
    pub error: String,
}

/// A decoded frame.
#[derive(Debug)]
pub enum Inbound {
    Request { seq: u64, hop: Hop },
    Acks(Vec<u64>),
    Output(OutputMsg),
    Invoke(InvokeMsg),
    Reply(ReplyMsg),
}

pub(super) fn decode<S: capnp::message::ReaderSegments>(
    msg: &capnp::message::Reader<S>,
) -> capnp::Result<Inbound> {
    let f: frame::Reader<'_> = msg.get_root()?;
    Ok(match f.which()? {
        frame::Request(r) => {
            let r = r?;
            let hop = Hop {
                invocation: r.get_invocation(),
                graph_id: text(r.get_graph_id())?.into(),
                epoch: r.get_epoch(),
                task: text(r.get_task())?.into(),
                port: text(r.get_port())?.into(),
                payload: Bytes::copy_from_slice(r.get_payload()?),
                deadline_unix_us: r.get_deadline_unix_us(),
                reply_to: text(r.get_reply_to())?.into(),
                attempt: r.get_attempt(),
                sent_unix_ns: r.get_sent_unix_ns(),
                admitted_unix_ns: r.get_admitted_unix_ns(),
            };
            Inbound::Request {
                seq: r.get_hop_seq(),
                hop,
            }
        }
        frame::Acks(a) => Inbound::Acks(a?.iter().collect()),
        frame::Result(o) => {
            let o = o?;
            Inbound::Output(OutputMsg {
                invocation: o.get_invocation(),
                task: text(o.get_task())?,
                port: text(o.get_port())?,
                payload: Bytes::copy_from_slice(o.get_payload()?),
                error: text(o.get_error())?,
            })
        }
        frame::Invoke(i) => {
            let i = i?;
            let mut inputs = Vec::new();
            for v in i.get_inputs()? {
                inputs.push((text(v.get_name())?, Bytes::copy_from_slice(v.get_value()?)));
            }
            Inbound::Invoke(InvokeMsg {
                id: i.get_id(),
                graph: text(i.get_graph())?,
                inputs,
                deadline_ms: i.get_deadline_ms(),
            })
        }
        frame::Reply(r) => {
            let r = r?;
            let mut outputs = Vec::new();
            for v in r.get_outputs()? {
                outputs.push((text(v.get_name())?, Bytes::copy_from_slice(v.get_value()?)));
            }
            Inbound::Reply(ReplyMsg {
                id: r.get_id(),
                outputs,
                error: text(r.get_error())?,
            })
        }
    })
}

pub(super) fn finish(msg: capnp::message::Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(&msg)
}

pub(super) fn builder(
    size_hint_bytes: usize,
) -> capnp::message::Builder<capnp::message::HeapAllocator> {
    // One segment big enough for the payload avoids a multi-segment message and a copy.
    let words = (size_hint_bytes / 8 + 64) as u32;
    capnp::message::Builder::new(capnp::message::HeapAllocator::new().first_segment_words(words))
}

pub fn encode_request(seq: u64, hop: &Hop) -> Vec<u8> {
    let mut msg = builder(hop.payload.len());
    {
        let mut r: request::Builder<'_> = msg.init_root::<frame::Builder<'_>>().init_request();
        r.set_hop_seq(seq);
        r.set_invocation(hop.invocation);
        r.set_graph_id(&*hop.graph_id);
        r.set_epoch(hop.epoch);
        r.set_task(&*hop.task);
        r.set_port(&*hop.port);
        r.set_payload(&hop.payload);
        r.set_deadline_unix_us(hop.deadline_unix_us);
        r.set_reply_to(&*hop.reply_to);
        // A hop the peer pool stamped keeps its time; others are sent now.
        r.set_sent_unix_ns(if hop.sent_unix_ns > 0 {
            hop.sent_unix_ns
        } else {
            now_unix_ns()
        });
        r.set_attempt(hop.attempt);
        r.set_admitted_unix_ns(hop.admitted_unix_ns);
    }
    finish(msg)
}

pub fn encode_acks(seqs: &[u64]) -> Vec<u8> {
    let mut msg = builder(seqs.len() * 8);
    let mut l = msg
        .init_root::<frame::Builder<'_>>()
        .init_acks(seqs.len() as u32);
    for (i, s) in seqs.iter().enumerate() {
        l.set(i as u32, *s);
    }
    finish(msg)
}

pub fn encode_output(o: &OutputMsg) -> Vec<u8> {
    let mut msg = builder(o.payload.len());
    {
        let mut b = msg.init_root::<frame::Builder<'_>>().init_result();
        b.set_invocation(o.invocation);
        b.set_task(o.task.as_str());
        b.set_port(o.port.as_str());
        b.set_payload(&o.payload);
        b.set_error(o.error.as_str());
    }
    finish(msg)
}

pub fn encode_invoke(i: &InvokeMsg) -> Vec<u8> {
    let size: usize = i.inputs.iter().map(|(_, v)| v.len()).sum();
    let mut msg = builder(size);
    {
        let mut b = msg.init_root::<frame::Builder<'_>>().init_invoke();
        b.set_id(i.id);
        b.set_graph(i.graph.as_str());
        b.set_deadline_ms(i.deadline_ms);
        let mut l = b.init_inputs(i.inputs.len() as u32);
        for (k, (name, value)) in i.inputs.iter().enumerate() {
            let mut v = l.reborrow().get(k as u32);
            v.set_name(name.as_str());
            v.set_value(value);
        }
    }
    finish(msg)
}

pub fn encode_reply(r: &ReplyMsg) -> Vec<u8> {
    let size: usize = r.outputs.iter().map(|(_, v)| v.len()).sum();
    let mut msg = builder(size);
    {
        let mut b = msg.init_root::<frame::Builder<'_>>().init_reply();
        b.set_id(r.id);
        b.set_error(r.error.as_str());
        let mut l = b.init_outputs(r.outputs.len() as u32);
        for (k, (name, value)) in r.outputs.iter().enumerate() {
            let mut v = l.reborrow().get(k as u32);
            v.set_name(name.as_str());
            v.set_value(value);
        }
    }
    finish(msg)
}
