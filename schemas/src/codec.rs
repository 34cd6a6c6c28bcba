//! Lossless conversion between the graph model and its Cap'n Proto encoding.

use crate::graph_capnp as wire;
use crate::model::*;
use crate::scaling::{Predictive, PredictiveMode, ScalingPolicy, Signal, TaskScaling};
use thiserror::Error;

/// A Cap'n Proto message that does not describe a valid model value.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The message could not be read (malformed, over a limit, or a pointer out of bounds).
    #[error("malformed message: {0}")]
    Capnp(#[from] capnp::Error),
    #[error("unknown union variant in {0}")]
    NotInSchema(&'static str),
    #[error("text field is not UTF-8: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("digest in task {task:?} is {len} bytes, expected 32")]
    DigestLength { task: String, len: usize },
    #[error("unknown tensor dtype {0:?}")]
    DType(String),
}

impl From<capnp::NotInSchema> for DecodeError {
    fn from(_: capnp::NotInSchema) -> Self {
        DecodeError::NotInSchema("an enum")
    }
}

/// A Cap'n Proto text field as a `String`: the one helper every crate uses. A field that is
/// malformed or not UTF-8 is an error naming why.
pub fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    r?.to_string()
        .map_err(|e| capnp::Error::failed(format!("text field is not UTF-8: {e}")))
}

/// Writes `graph` into `b`. Deterministic: the same graph always yields the same bytes.
pub fn encode_graph(graph: &TaskGraph, mut b: wire::graph::Builder<'_>) {
    b.set_name(graph.name.as_str());
    let mut tasks = b.reborrow().init_tasks(graph.tasks.len() as u32);
    for (i, t) in graph.tasks.iter().enumerate() {
        encode_task(t, tasks.reborrow().get(i as u32));
    }
    let mut edges = b.reborrow().init_edges(graph.edges.len() as u32);
    for (i, e) in graph.edges.iter().enumerate() {
        let mut eb = edges.reborrow().get(i as u32);
        let mut from = eb.reborrow().init_from();
        from.set_task(e.from.task.as_str());
        from.set_port(e.from.port.as_str());
        let mut to = eb.init_to();
        to.set_task(e.to.task.as_str());
        to.set_port(e.to.port.as_str());
    }
    b.set_has_objective(graph.objective.is_some());
    if let Some(o) = &graph.objective {
        let mut ob = b.reborrow().init_objective();
        ob.set_percentile(o.percentile);
        ob.set_target_ns(o.target_ns);
    }
    b.set_has_scaling(graph.scaling.is_some());
    if let Some(s) = &graph.scaling {
        let mut sb = b.init_scaling();
        sb.set_min_replicas(s.min_replicas);
        sb.set_max_replicas(s.max_replicas);
        sb.set_max_vms(s.max_vms.unwrap_or(0));
        sb.set_target_utilisation(s.target_utilisation);
        sb.set_window_ns(s.window_ns);
        sb.set_scale_out_cooldown_ns(s.scale_out_cooldown_ns);
        sb.set_scale_in_cooldown_ns(s.scale_in_cooldown_ns);
        sb.set_max_scale_out_step(s.max_scale_out_step.unwrap_or(0));
        sb.set_warm_vms(s.warm_vms);
        sb.set_max_concurrency(s.max_concurrency);
        sb.set_slow_factor(s.slow_factor);
        sb.set_error_rate(s.error_rate);
        sb.set_throttled_share(s.throttled_share);
        sb.set_detect_window_ns(s.detect_window_ns);
        sb.set_hedge(s.hedge);
        sb.set_hedge_delay_ns(s.hedge_delay_ns.unwrap_or(0));
        sb.set_hedge_budget(s.hedge_budget);
        sb.set_predictive_mode(s.predictive.mode.code());
        sb.set_predictive_attainment(s.predictive.attainment);
        sb.set_predictive_max_wait_ns(s.predictive.max_wait_ns.unwrap_or(0));
        sb.set_predictive_lead_ns(s.predictive.lead_ns);
        let mut signals = sb.reborrow().init_signals(s.signals.len() as u32);
        for (i, x) in s.signals.iter().enumerate() {
            let mut b = signals.reborrow().get(i as u32);
            b.set_task(x.task.as_str());
            b.set_metric(x.metric.as_str());
            b.set_target(x.target);
        }
        let mut tasks = sb.init_tasks(s.tasks.len() as u32);
        for (i, t) in s.tasks.iter().enumerate() {
            let mut tb = tasks.reborrow().get(i as u32);
            tb.set_task(t.task.as_str());
            tb.set_min_replicas(t.min_replicas.unwrap_or(0));
            tb.set_max_replicas(t.max_replicas.unwrap_or(0));
            tb.set_max_concurrency(t.max_concurrency.unwrap_or(0));
            tb.set_target_utilisation(t.target_utilisation.unwrap_or(0.0));
            tb.set_has_warm_vms(t.warm_vms.is_some());
            tb.set_warm_vms(t.warm_vms.unwrap_or(0));
        }
    }
}

fn decode_scaling(s: wire::scaling_policy::Reader<'_>) -> Result<ScalingPolicy, DecodeError> {
    // Records stored before the replacement keys existed read 0 there: the defaults apply.
    let d = ScalingPolicy::default();
    let or_default = |v: f64, d: f64| if v > 0.0 { v } else { d };
    let some64 = |v: u64| (v > 0).then_some(v);
    let some = |v: u32| (v > 0).then_some(v);
    let mut signals = Vec::new();
    for x in s.get_signals()? {
        signals.push(Signal {
            task: text(x.get_task())?,
            metric: text(x.get_metric())?,
            target: x.get_target(),
        });
    }
    let mut tasks = Vec::new();
    for t in s.get_tasks()? {
        let u = t.get_target_utilisation();
        tasks.push(TaskScaling {
            task: text(t.get_task())?,
            min_replicas: some(t.get_min_replicas()),
            max_replicas: some(t.get_max_replicas()),
            max_concurrency: some(t.get_max_concurrency()),
            target_utilisation: (u > 0.0).then_some(u),
            warm_vms: t.get_has_warm_vms().then(|| t.get_warm_vms()),
        });
    }
    Ok(ScalingPolicy {
        min_replicas: s.get_min_replicas(),
        max_replicas: s.get_max_replicas(),
        max_vms: some(s.get_max_vms()),
        target_utilisation: s.get_target_utilisation(),
        window_ns: s.get_window_ns(),
        scale_out_cooldown_ns: s.get_scale_out_cooldown_ns(),
        scale_in_cooldown_ns: s.get_scale_in_cooldown_ns(),
        max_scale_out_step: some(s.get_max_scale_out_step()),
        warm_vms: s.get_warm_vms(),
        max_concurrency: s.get_max_concurrency(),
        tasks,
        slow_factor: or_default(s.get_slow_factor(), d.slow_factor),
        error_rate: or_default(s.get_error_rate(), d.error_rate),
        throttled_share: or_default(s.get_throttled_share(), d.throttled_share),
        detect_window_ns: match s.get_detect_window_ns() {
            0 => d.detect_window_ns,
            n => n,
        },
        hedge: s.get_hedge(),
        hedge_delay_ns: some64(s.get_hedge_delay_ns()),
        hedge_budget: or_default(s.get_hedge_budget(), d.hedge_budget),
        signals,
        predictive: Predictive {
            // A mode this version does not know acts as off.
            mode: PredictiveMode::from_code(s.get_predictive_mode()).unwrap_or_default(),
            attainment: or_default(s.get_predictive_attainment(), d.predictive.attainment),
            max_wait_ns: some64(s.get_predictive_max_wait_ns()),
            lead_ns: match s.get_predictive_lead_ns() {
                0 => d.predictive.lead_ns,
                n => n,
            },
        },
    })
}

pub fn encode_task(t: &Task, mut b: wire::task::Builder<'_>) {
    b.set_id(t.id.as_str());
    b.set_estimated_execution_time_ns(t.estimated_execution_time_ns);
    encode_code(&t.code, b.reborrow().init_code());
    encode_ports(&t.inputs, b.reborrow().init_inputs(t.inputs.len() as u32));
    encode_ports(
        &t.outputs,
        b.reborrow().init_outputs(t.outputs.len() as u32),
    );
    let mut r = b.init_resources();
    r.set_cpu_millicores(t.resources.cpu_millicores);
    r.set_memory_bytes(t.resources.memory_bytes);
    r.set_gpus(t.resources.gpus);
    r.set_gpu_memory_bytes(t.resources.gpu_memory_bytes);
    r.set_network_bits_per_sec(t.resources.network_bits_per_sec);
}

fn encode_code(c: &CodeRef, mut b: wire::code_ref::Builder<'_>) {
    let mut params = b.reborrow().init_params(c.params.len() as u32);
    for (i, (k, v)) in c.params.iter().enumerate() {
        let mut p = params.reborrow().get(i as u32);
        p.set_key(k.as_str());
        p.set_value(v.as_str());
    }
    let artifact = |mut a: wire::artifact::Builder<'_>, sha: &Digest, args: &[String]| {
        a.set_sha256(&sha.0);
        let mut l = a.init_args(args.len() as u32);
        for (i, arg) in args.iter().enumerate() {
            l.set(i as u32, arg.as_str());
        }
    };
    match &c.kind {
        CodeKind::Builtin { name } => b.init_builtin().set_name(name.as_str()),
        CodeKind::Exec { sha256, args } => artifact(b.init_exec(), sha256, args),
        CodeKind::Onnx { sha256, args } => artifact(b.init_onnx(), sha256, args),
        CodeKind::GpuKernel { sha256, entry } => {
            let mut g = b.init_gpu_kernel();
            g.set_sha256(&sha256.0);
            g.set_entry(entry.as_str());
        }
    }
}

fn encode_ports(ports: &[Port], mut l: capnp::struct_list::Builder<'_, wire::port::Owned>) {
    for (i, p) in ports.iter().enumerate() {
        let mut b = l.reborrow().get(i as u32);
        b.set_name(p.name.as_str());
        let mut t = b.init_type();
        match &p.ty {
            PortType::Any => t.set_any(()),
            PortType::Bytes => t.set_bytes(()),
            PortType::Text => t.set_text(()),
            PortType::Json => t.set_json(()),
            PortType::Tensor { dtype, shape } => {
                let mut tb = t.init_tensor();
                tb.set_dtype(dtype.as_str());
                if let Some(dims) = shape {
                    let mut sl = tb.init_shape(dims.len() as u32);
                    for (j, d) in dims.iter().enumerate() {
                        sl.set(j as u32, *d);
                    }
                }
            }
        }
    }
}

pub fn decode_graph(r: wire::graph::Reader<'_>) -> Result<TaskGraph, DecodeError> {
    let mut tasks = Vec::new();
    for t in r.get_tasks()? {
        tasks.push(decode_task(t)?);
    }
    let mut edges = Vec::new();
    for e in r.get_edges()? {
        let (from, to) = (e.get_from()?, e.get_to()?);
        edges.push(Edge {
            from: Endpoint {
                task: text(from.get_task())?,
                port: text(from.get_port())?,
            },
            to: Endpoint {
                task: text(to.get_task())?,
                port: text(to.get_port())?,
            },
        });
    }
    let objective = if r.get_has_objective() {
        let o = r.get_objective()?;
        Some(LatencyObjective {
            percentile: o.get_percentile(),
            target_ns: o.get_target_ns(),
        })
    } else {
        None
    };
    let scaling = if r.get_has_scaling() {
        Some(decode_scaling(r.get_scaling()?)?)
    } else {
        None
    };
    Ok(TaskGraph {
        name: text(r.get_name())?,
        tasks,
        edges,
        objective,
        scaling,
    })
}

pub fn decode_task(t: wire::task::Reader<'_>) -> Result<Task, DecodeError> {
    let id = text(t.get_id())?;
    let r = t.get_resources()?;
    Ok(Task {
        code: decode_code(&id, t.get_code()?)?,
        inputs: decode_ports(t.get_inputs()?)?,
        outputs: decode_ports(t.get_outputs()?)?,
        estimated_execution_time_ns: t.get_estimated_execution_time_ns(),
        resources: Resources {
            cpu_millicores: r.get_cpu_millicores(),
            memory_bytes: r.get_memory_bytes(),
            gpus: r.get_gpus(),
            gpu_memory_bytes: r.get_gpu_memory_bytes(),
            network_bits_per_sec: r.get_network_bits_per_sec(),
        },
        id,
    })
}

fn digest(task: &str, d: &[u8]) -> Result<Digest, DecodeError> {
    <[u8; 32]>::try_from(d)
        .map(Digest)
        .map_err(|_| DecodeError::DigestLength {
            task: task.into(),
            len: d.len(),
        })
}

fn decode_code(task: &str, c: wire::code_ref::Reader<'_>) -> Result<CodeRef, DecodeError> {
    use wire::code_ref::Which;
    let args = |a: wire::artifact::Reader<'_>| -> Result<(Digest, Vec<String>), DecodeError> {
        let mut args = Vec::new();
        for arg in a.get_args()? {
            args.push(text(arg)?);
        }
        Ok((digest(task, a.get_sha256()?)?, args))
    };
    let kind = match c.which().map_err(|_| DecodeError::NotInSchema("code"))? {
        Which::Builtin(b) => CodeKind::Builtin {
            name: text(b?.get_name())?,
        },
        Which::Exec(a) => {
            let (sha256, args) = args(a?)?;
            CodeKind::Exec { sha256, args }
        }
        Which::Onnx(a) => {
            let (sha256, args) = args(a?)?;
            CodeKind::Onnx { sha256, args }
        }
        Which::GpuKernel(g) => {
            let g = g?;
            CodeKind::GpuKernel {
                sha256: digest(task, g.get_sha256()?)?,
                entry: text(g.get_entry())?,
            }
        }
    };
    let mut params = Vec::new();
    for p in c.get_params()? {
        params.push((text(p.get_key())?, text(p.get_value())?));
    }
    Ok(CodeRef { kind, params })
}

fn decode_ports(
    l: capnp::struct_list::Reader<'_, wire::port::Owned>,
) -> Result<Vec<Port>, DecodeError> {
    use wire::port_type::Which;
    let mut out = Vec::with_capacity(l.len() as usize);
    for p in l {
        let t = p.get_type()?;
        let ty = match t
            .which()
            .map_err(|_| DecodeError::NotInSchema("port type"))?
        {
            Which::Any(()) => PortType::Any,
            Which::Bytes(()) => PortType::Bytes,
            Which::Text(()) => PortType::Text,
            Which::Json(()) => PortType::Json,
            Which::Tensor(tr) => {
                let tr = tr?;
                let name = text(tr.get_dtype())?;
                let dtype = DType::parse(&name).ok_or(DecodeError::DType(name))?;
                let shape = if tr.has_shape() {
                    Some(tr.get_shape()?.iter().collect())
                } else {
                    None
                };
                PortType::Tensor { dtype, shape }
            }
        };
        out.push(Port {
            name: text(p.get_name())?,
            ty,
        });
    }
    Ok(out)
}

/// The sha256 of the graph's canonical encoding: equal graphs have equal digests.
pub fn graph_digest(graph: &TaskGraph) -> Digest {
    let mut msg = capnp::message::Builder::new_default();
    encode_graph(graph, msg.init_root());
    Digest::of(&capnp::serialize::write_message_to_words(&msg))
}

pub fn encode_record(rec: &GraphRecord, mut b: wire::graph_record::Builder<'_>) {
    b.set_id(rec.id.as_str());
    b.set_version(rec.version);
    b.set_submitted_at_ms(rec.submitted_at_ms);
    b.set_digest(&rec.digest.0);
    encode_graph(&rec.graph, b.init_graph());
}

pub fn decode_record(r: wire::graph_record::Reader<'_>) -> Result<GraphRecord, DecodeError> {
    let id = text(r.get_id())?;
    Ok(GraphRecord {
        digest: digest(&id, r.get_digest()?)?,
        version: r.get_version(),
        submitted_at_ms: r.get_submitted_at_ms(),
        graph: decode_graph(r.get_graph()?)?,
        id,
    })
}

/// A graph record as a standalone message (what the registry stores on disk).
pub fn record_to_bytes(rec: &GraphRecord) -> Vec<u8> {
    let mut msg = capnp::message::Builder::new_default();
    encode_record(rec, msg.init_root());
    capnp::serialize::write_message_to_words(&msg)
}

pub fn record_from_bytes(bytes: &[u8]) -> Result<GraphRecord, DecodeError> {
    let reader = capnp::serialize::read_message(
        // Copies into aligned segments: stored bytes (e.g. from redb) need not be aligned.
        &mut &bytes[..],
        capnp::message::ReaderOptions::new(),
    )?;
    decode_record(reader.get_root()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_-]{0,10}"
    }

    fn port_type() -> impl Strategy<Value = PortType> {
        prop_oneof![
            Just(PortType::Any),
            Just(PortType::Bytes),
            Just(PortType::Text),
            Just(PortType::Json),
            (
                prop::sample::select(DType::ALL.to_vec()),
                prop::option::of(prop::collection::vec(-1i64..4096, 0..5))
            )
                .prop_map(|(dtype, shape)| PortType::Tensor { dtype, shape }),
        ]
    }

    fn port() -> impl Strategy<Value = Port> {
        (name(), port_type()).prop_map(|(name, ty)| Port { name, ty })
    }

    fn digest() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(Digest)
    }

    fn code() -> impl Strategy<Value = CodeRef> {
        let kind = prop_oneof![
            name().prop_map(|name| CodeKind::Builtin { name }),
            (digest(), prop::collection::vec(".{0,8}", 0..3))
                .prop_map(|(sha256, args)| CodeKind::Exec { sha256, args }),
            (digest(), prop::collection::vec(".{0,8}", 0..3))
                .prop_map(|(sha256, args)| CodeKind::Onnx { sha256, args }),
            (digest(), name()).prop_map(|(sha256, entry)| CodeKind::GpuKernel { sha256, entry }),
        ];
        (kind, prop::collection::vec((name(), ".{0,8}"), 0..3))
            .prop_map(|(kind, params)| CodeRef { kind, params })
    }

    fn task() -> impl Strategy<Value = Task> {
        (
            name(),
            code(),
            prop::collection::vec(port(), 0..4),
            prop::collection::vec(port(), 0..4),
            any::<u64>(),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
            ),
        )
            .prop_map(|(id, code, inputs, outputs, est, r)| Task {
                id,
                code,
                inputs,
                outputs,
                estimated_execution_time_ns: est,
                resources: Resources {
                    cpu_millicores: r.0,
                    memory_bytes: r.1,
                    gpus: r.2,
                    gpu_memory_bytes: r.3,
                    network_bits_per_sec: r.4,
                },
            })
    }

    fn graph() -> impl Strategy<Value = TaskGraph> {
        (
            name(),
            prop::collection::vec(task(), 0..6),
            prop::collection::vec(
                (name(), name(), name(), name()).prop_map(|(a, b, c, d)| Edge {
                    from: Endpoint { task: a, port: b },
                    to: Endpoint { task: c, port: d },
                }),
                0..6,
            ),
            prop::option::of(
                (0.0f64..100.0, any::<u64>()).prop_map(|(percentile, target_ns)| {
                    LatencyObjective {
                        percentile,
                        target_ns,
                    }
                }),
            ),
            prop::option::of(scaling()),
        )
            .prop_map(|(name, tasks, edges, objective, scaling)| TaskGraph {
                name,
                tasks,
                edges,
                objective,
                scaling,
            })
    }

    fn scaling() -> impl Strategy<Value = ScalingPolicy> {
        let task = (
            name(),
            prop::option::of(1u32..100),
            prop::option::of(1u32..100),
            prop::option::of(1u32..100),
            prop::option::of(0.01f64..1.0),
            prop::option::of(0u32..4),
        )
            .prop_map(
                |(task, min_replicas, max_replicas, max_concurrency, u, warm)| TaskScaling {
                    task,
                    min_replicas,
                    max_replicas,
                    max_concurrency,
                    target_utilisation: u,
                    warm_vms: warm,
                },
            );
        (
            (any::<u32>(), any::<u32>(), prop::option::of(1u32..1000)),
            (0.01f64..1.0, any::<u64>(), any::<u64>(), any::<u64>()),
            any::<u32>(),
            prop::collection::vec(task, 0..3),
        )
            .prop_map(
                |((min, max, vms), (u, w, out, inn), mc, tasks)| ScalingPolicy {
                    min_replicas: min,
                    max_replicas: max,
                    max_vms: vms,
                    target_utilisation: u,
                    window_ns: w,
                    scale_out_cooldown_ns: out,
                    scale_in_cooldown_ns: inn,
                    max_scale_out_step: (mc % 5 > 0).then_some(mc % 5),
                    warm_vms: mc % 3,
                    max_concurrency: mc,
                    tasks,
                    slow_factor: 1.0 + u * 4.0,
                    error_rate: u,
                    throttled_share: 1.0 - u / 2.0,
                    detect_window_ns: w.max(1),
                    hedge: mc % 2 == 0,
                    hedge_delay_ns: (out % 3 > 0).then_some(out.max(1)),
                    hedge_budget: u,
                    predictive: Predictive {
                        mode: PredictiveMode::from_code((mc % 3) as u8).unwrap_or_default(),
                        attainment: u.min(0.999),
                        max_wait_ns: (inn % 2 == 0).then_some(inn.max(1)),
                        lead_ns: w.max(1),
                    },
                    signals: if mc % 3 == 0 {
                        vec![Signal {
                            task: "t".into(),
                            metric: "custom.kv".into(),
                            target: u,
                        }]
                    } else {
                        Vec::new()
                    },
                },
            )
    }

    proptest! {
        #[test]
        fn graph_round_trips_losslessly(g in graph(), id in name(), version in any::<u32>(), at in any::<u64>()) {
            let rec = GraphRecord { id, version, submitted_at_ms: at, digest: graph_digest(&g), graph: g };
            let bytes = record_to_bytes(&rec);
            let back = record_from_bytes(&bytes).unwrap();
            prop_assert_eq!(&back, &rec);
            prop_assert_eq!(graph_digest(&back.graph), rec.digest);
        }
    }

    #[test]
    fn truncated_record_is_an_error_not_a_panic() {
        let g = TaskGraph {
            name: "x".into(),
            tasks: vec![],
            edges: vec![],
            objective: None,
            scaling: None,
        };
        let rec = GraphRecord {
            id: "g1".into(),
            version: 1,
            submitted_at_ms: 0,
            digest: graph_digest(&g),
            graph: g,
        };
        let bytes = record_to_bytes(&rec);
        for cut in [0, 4, 8, bytes.len() / 2, bytes.len() - 1] {
            assert!(record_from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
