//! An `exec` artifact: upper-cases its inputs (concatenated in port order).
//!
//! It shows the protocol every artifact speaks (`schemas/capnp/exec.capnp`): read `ExecRequest`
//! messages from stdin, write one `ExecResponse` per request to stdout, same id. Upload the built
//! binary with `prescient upload` and name it in a graph as `code = { exec = "sha256:..." }`.
//! It also reports a gauge, `bytes_last` (its last input's size): a `[[scaling.signal]]` with
//! `metric = "custom.bytes_last"` sizes the task on it.

use prescient_schemas::exec_capnp::{exec_request, exec_response};
use std::io::Write;

fn main() -> capnp::Result<()> {
    let stdin = std::io::stdin();
    let mut input = std::io::BufReader::new(stdin.lock());
    let mut output = std::io::BufWriter::new(std::io::stdout().lock());
    let fail_on = std::env::args().nth(1);
    loop {
        let msg = match capnp::serialize::read_message(&mut input, Default::default()) {
            Ok(m) => m,
            Err(_) => return Ok(()), // stdin closed: the worker is gone
        };
        let req: exec_request::Reader<'_> = msg.get_root()?;
        let mut joined = Vec::new();
        for i in req.get_inputs()? {
            joined.extend_from_slice(i?);
        }
        let mut reply = capnp::message::Builder::new_default();
        {
            let mut r = reply.init_root::<exec_response::Builder<'_>>();
            r.set_id(req.get_id());
            match &fail_on {
                Some(word) if joined.windows(word.len()).any(|w| w == word.as_bytes()) => {
                    r.set_error(format!("input contains {word:?}").as_str());
                }
                _ => r.set_output(&joined.to_ascii_uppercase()),
            }
            let mut m = r.init_metrics(1).get(0);
            m.set_name("bytes_last");
            m.set_value(joined.len() as f64);
        }
        capnp::serialize::write_message(&mut output, &reply)?;
        output.flush()?;
    }
}
