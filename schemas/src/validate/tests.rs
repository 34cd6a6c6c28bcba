//! Validation on hand-built graphs: every problem it finds, and what it derives.

use super::*;
use crate::model::*;

fn task(id: &str, inputs: &[(&str, &str)], outputs: &[(&str, &str)]) -> Task {
    let ports = |ps: &[(&str, &str)]| {
        ps.iter()
            .map(|(n, t)| Port {
                name: n.to_string(),
                ty: t.parse().unwrap(),
            })
            .collect()
    };
    Task {
        id: id.into(),
        code: CodeRef {
            kind: CodeKind::Builtin {
                name: "identity".into(),
            },
            params: vec![],
        },
        inputs: ports(inputs),
        outputs: ports(outputs),
        estimated_execution_time_ns: 1000,
        resources: Resources::default(),
    }
}

fn edge(from: &str, to: &str) -> Edge {
    Edge {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
    }
}

fn graph(tasks: Vec<Task>, edges: Vec<Edge>) -> TaskGraph {
    TaskGraph {
        name: "g".into(),
        tasks,
        edges,
        objective: None,
        scaling: None,
    }
}

fn diamond() -> TaskGraph {
    graph(
        vec![
            task("a", &[("in", "bytes")], &[("out", "bytes")]),
            task("b", &[("in", "bytes")], &[("out", "bytes")]),
            task("c", &[("in", "bytes")], &[("out", "bytes")]),
            task(
                "d",
                &[("left", "bytes"), ("right", "bytes")],
                &[("out", "bytes")],
            ),
        ],
        vec![
            edge("a.out", "b.in"),
            edge("a.out", "c.in"),
            edge("b.out", "d.left"),
            edge("c.out", "d.right"),
        ],
    )
}

#[test]
fn diamond_has_two_chains_and_a_topological_order() {
    let v = ValidatedGraph::new(diamond()).unwrap();
    assert_eq!(v.chains(), vec![vec!["a", "b", "d"], vec!["a", "c", "d"]]);
    let order = v.topological_order();
    let pos = |t| order.iter().position(|x| *x == t).unwrap();
    assert!(pos("a") < pos("b") && pos("b") < pos("d") && pos("c") < pos("d"));
    assert_eq!(v.graph_inputs().len(), 1);
    assert_eq!(v.graph_outputs()[0].to_string(), "d.out");
    assert_eq!(v.upstream("d"), vec!["b", "c"]);
}

#[test]
fn cycle_is_printed() {
    let mut g = diamond();
    g.tasks[0].inputs[0].name = "in".into();
    g.edges.push(edge("d.out", "a.in"));
    let problems = ValidatedGraph::new(g).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let msg = problems[0].to_string();
    assert!(msg.starts_with("cycle: a -> "), "{msg}");
    assert!(msg.ends_with("-> d -> a"), "{msg}");
}

#[test]
fn every_problem_is_reported() {
    let mut g = diamond();
    g.tasks.push(task("a", &[], &[])); // duplicate
    g.tasks[1].estimated_execution_time_ns = 0;
    g.tasks[2].resources.cpu_millicores = 0;
    g.tasks[2].resources.gpus = 1000;
    g.edges.push(edge("a.out", "nowhere.in")); // dangling
    g.edges.push(edge("a.nope", "d.left")); // unknown port
    g.edges[3] = edge("c.out", "d.left"); // d.left fed twice, d.right unfed
    let kinds: Vec<&str> = ValidatedGraph::new(g)
        .unwrap_err()
        .iter()
        .map(|p| p.kind())
        .collect();
    for k in [
        "duplicate-task",
        "non-positive-estimate",
        "zero-resource",
        "absurd-resource",
        "unknown-task",
        "unknown-port",
        "port-fed-twice",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
}

#[test]
fn type_mismatch_names_the_edge() {
    let g = graph(
        vec![
            task("a", &[], &[("out", "tensor<f32>[1,3]")]),
            task("b", &[("in", "tensor<f32>[1,4]")], &[]),
        ],
        vec![edge("a.out", "b.in")],
    );
    let p = ValidatedGraph::new(g).unwrap_err();
    assert_eq!(p[0].kind(), "type-mismatch");
    assert_eq!(p[0].edge(), Some(0));
    assert!(p[0].to_string().contains("a.out -> b.in"));
}

#[test]
fn exponential_paths_are_refused() {
    // 20 stages of two parallel tasks: 2^20 source-to-sink paths.
    let mut tasks = Vec::new();
    let mut edges = Vec::new();
    for s in 0..20 {
        for k in 0..2 {
            tasks.push(task(
                &format!("t{s}_{k}"),
                &[("a", "bytes"), ("b", "bytes")],
                &[("out", "bytes")],
            ));
            if s > 0 {
                edges.push(edge(&format!("t{}_0.out", s - 1), &format!("t{s}_{k}.a")));
                edges.push(edge(&format!("t{}_1.out", s - 1), &format!("t{s}_{k}.b")));
            }
        }
    }
    let p = ValidatedGraph::new(graph(tasks, edges)).unwrap_err();
    assert_eq!(p[0].kind(), "too-many-chains");
}

#[test]
fn empty_graph() {
    let p = ValidatedGraph::new(graph(vec![], vec![])).unwrap_err();
    assert_eq!(p[0], Problem::EmptyGraph);
}
