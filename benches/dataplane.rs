//! In-process costs on the request path: frame encoding and decoding, replica choice, and the
//! validation a submit pays. The multi-process figures come from `prescient bench chain` and
//! `prescient bench transfer`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prescient_agent::dataplane::{decode_frame, encode_request, Hop, PeerPool};
use prescient_agent::request_path::routes::{GraphRoutes, Rng, Route};
use prescient_schemas::{codec, file, GraphRecord, ValidatedGraph};
use std::collections::HashMap;
use std::hint::black_box;

fn hop(size: usize) -> Hop {
    Hop {
        invocation: 1,
        graph_id: "g1".into(),
        epoch: 1,
        task: "infer".into(),
        port: "features".into(),
        payload: Bytes::from(vec![7u8; size]),
        deadline_unix_us: u64::MAX,
        reply_to: "127.0.0.1:7500".into(),
        attempt: 0,
        sent_unix_ns: 0,
        admitted_unix_ns: 0,
    }
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in [64usize, 64 << 10, 1 << 20] {
        let h = hop(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode", size), &h, |b, h| {
            b.iter(|| black_box(encode_request(1, h)))
        });
        let frame = encode_request(1, &h);
        g.bench_with_input(BenchmarkId::new("decode", size), &frame, |b, f| {
            b.iter(|| black_box(decode_frame(f).unwrap()))
        });
    }
    g.finish();
}

fn example(name: &str) -> GraphRecord {
    let text =
        std::fs::read_to_string(format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let graph = file::parse(name, &text).unwrap().graph;
    GraphRecord {
        id: "g1".into(),
        version: 1,
        submitted_at_ms: 0,
        digest: codec::graph_digest(&graph),
        graph,
    }
}

fn routing(c: &mut Criterion) {
    let record = example("fan-out-fan-in.toml");
    let mut replicas: HashMap<String, Vec<Route>> = HashMap::new();
    for t in &record.graph.tasks {
        for r in 0..4 {
            replicas.entry(t.id.clone()).or_default().push(Route {
                replica: format!("g1.{}.r{r}", t.id).into(),
                host: format!("h{}", r % 2).into(),
                addr: format!("127.0.0.1:{}", 9000 + r).into(),
            });
        }
    }
    let routes = GraphRoutes::new(record, 1, replicas);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let _guard = local.enter();
    let _rt = rt.enter();
    let (pool, _lost) = PeerPool::new();
    let rng = Rng::new(1);
    let mut inv = 0u64;
    c.bench_function("choose/p2c-with-affinity", |b| {
        b.iter(|| {
            inv += 1;
            black_box(
                routes
                    .choose("detect", inv, "h1", &pool, &[], &rng)
                    .unwrap(),
            );
        })
    });
    c.bench_function("choose/join-rendezvous", |b| {
        b.iter(|| {
            inv += 1;
            black_box(routes.choose("merge", inv, "h1", &pool, &[], &rng).unwrap());
        })
    });
}

fn validation(c: &mut Criterion) {
    let record = example("fan-out-fan-in.toml");
    c.bench_function("validate/fan-out-fan-in", |b| {
        b.iter(|| black_box(ValidatedGraph::new(record.graph.clone()).unwrap()))
    });
}

/// What telemetry adds per execution: one sketch record (execution time, lognormal-ish).
fn telemetry(c: &mut Criterion) {
    let values: Vec<f64> = (0..1024)
        .map(|i| 200_000.0 * (1.0 + 0.3 * ((i * 7919 % 1024) as f64 / 1024.0)))
        .collect();
    c.bench_function("sketch/record", |b| {
        let mut s = prescient_schemas::sketch::Sketch::default();
        let mut i = 0;
        b.iter(|| {
            s.record(std::hint::black_box(values[i & 1023]));
            i += 1;
        })
    });
}

/// One timestamp: a span takes three per execution.
fn stamp(c: &mut Criterion) {
    prescient_agent::telemetry::clock::init();
    c.bench_function("clock/stamp", |b| {
        b.iter(|| black_box(prescient_agent::telemetry::clock::Stamp::now()))
    });
}

/// Everything a worker adds to one execution when spans are on: the arrival on its edge, three
/// stamps, and the execution's record (sketches, a sample check). The arrival's wall-clock time
/// is read for the deadline check with spans on or off.
fn span_path(c: &mut Criterion) {
    use prescient_agent::dataplane::now_unix_ns;
    use prescient_agent::telemetry::clock::Stamp;
    use prescient_agent::telemetry::spans::{Execution, SpanBuffer};
    use std::rc::Rc;
    let spans = SpanBuffer::default();
    let (graph, task, port, replica): (Rc<str>, Rc<str>, Rc<str>, Rc<str>) =
        ("g1".into(), "s2".into(), "x".into(), "g1.s2.r1".into());
    let mut invocation = 0u64;
    let now_unix = now_unix_ns();
    prescient_agent::telemetry::clock::init();
    c.bench_function("telemetry/execution", |b| {
        b.iter(|| {
            invocation += 1;
            let received = now_unix;
            let arrived = Stamp::now();
            spans.record_arrival(&graph, &task, &port, received, 20_000, 64);
            let start = Stamp::now();
            let exec_ns = Stamp::now().ns_since(start);
            let queue_ns = start.ns_since(arrived);
            spans.record(
                &graph,
                &task,
                &replica,
                Execution {
                    invocation,
                    queue_ns,
                    exec_ns,
                    input_bytes: 64,
                    output_bytes: 64,
                    transfer_ns: 20_000,
                    start_unix_ns: received + queue_ns,
                    ok: true,
                    sink_ns: 0,
                },
            );
        });
        // Keep the buffer at a steady size, as the worker's 1 Hz flush does.
        spans.take_batch("h1");
    });
}

criterion_group!(benches, frames, routing, validation, telemetry, stamp, span_path);
criterion_main!(benches);
