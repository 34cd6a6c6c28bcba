//! The monitor on hand-made windows: per-task and per-chain statistics, expiry, and the
//! per-second execution counts forecasts read.

use super::*;

fn span(task: &str, second: u64, exec_ms: u64, ok: bool) -> SpanView {
    SpanView {
        graph_id: "g1".into(),
        task: task.into(),
        replica: "r".into(),
        start_unix_ns: second * 1_000_000_000,
        queue_ns: 1000,
        exec_ns: exec_ms * 1_000_000,
        transfer_ns: 50_000,
        input_bytes: 10,
        output_bytes: 20,
        ok,
    }
}

#[test]
fn an_absurd_second_is_refused_and_cannot_overflow_the_windows() {
    let now = 1_800_000_000;
    assert!(plausible_second(now, now));
    assert!(plausible_second(now + MAX_SKEW_S, now));
    assert!(!plausible_second(u64::MAX, now));
    assert!(!plausible_second(now - RETENTION_S - 1, now));
    // Even if one got in, the windows' arithmetic saturates instead of overflowing.
    let mut m = Monitor::default();
    m.record(&span("a", u64::MAX / 1_000_000_000, 1, true));
    m.record(&span("a", 1000, 1, true));
    m.record_edge("g1", "a", "x", u64::MAX, 1, &Sketch::default());
    m.record_edge("g1", "a", "x", 1000, 1, &Sketch::default());
    assert_eq!(m.task_stats("g1", 10, 1000)[0].count, 1);
}

#[test]
fn windows_roll_up_and_expire() {
    let mut m = Monitor::default();
    for s in 0..20 {
        for k in 1..=10 {
            m.record(&span("a", 1000 + s, k, k != 10));
        }
    }
    let last10 = m.task_stats("g1", 10, 1019);
    assert_eq!(last10[0].count, 100);
    assert_eq!(last10[0].per_second, 10.0);
    assert_eq!(last10[0].errors, 10);
    // 1..=10 ms, ten of each: the median rank holds 6 ms.
    assert!(
        (last10[0].exec_p50_ns as f64 - 6e6).abs() / 6e6 < 0.02,
        "{:?}",
        last10[0]
    );
    assert_eq!(m.task_stats("g1", 60, 1019)[0].count, 200);
    assert!(m.task_stats("g2", 60, 1019).is_empty());
    m.record(&span("a", 1000 + RETENTION_S + 30, 1, true));
    assert_eq!(
        m.task_stats("g1", 10_000, 5000)[0].count,
        1,
        "old seconds expired"
    );
}

#[test]
fn chains_are_timed_at_their_sink_and_joins_wait_outside_path_sums() {
    // a -> b -> d and a -> c -> d; d joins both (queue 5 ms waiting for c) and is the sink.
    let mut m = Monitor::default();
    let window = |task: &str, exec_us: f64, queue_us: f64, sink_us: Option<f64>| {
        let mut w = WindowView {
            graph_id: "g1".into(),
            task: task.into(),
            second: 100,
            ..Default::default()
        };
        for _ in 0..10 {
            w.exec.record(exec_us * 1e3);
            w.queue.record(queue_us * 1e3);
            w.transfer.record(100e3);
            if let Some(s) = sink_us {
                w.sink.record(s * 1e3);
            }
        }
        w
    };
    m.record_window(&window("a", 1000.0, 10.0, None));
    m.record_window(&window("b", 1000.0, 10.0, None));
    m.record_window(&window("c", 6000.0, 10.0, None));
    m.record_window(&window("d", 500.0, 5000.0, Some(8000.0)));
    let of = ChainsOf {
        chains: vec![
            vec!["a".into(), "b".into(), "d".into()],
            vec!["a".into(), "c".into(), "d".into()],
        ],
        joins: ["d".to_string()].into_iter().collect(),
        objective: Some((99.0, 10_000_000)),
    };
    let stats = m.chain_stats("g1", &of, 10, 100);
    assert_eq!(stats.len(), 2);
    for c in &stats {
        assert_eq!(c.count, 10);
        assert!((c.p50_ns as f64 - 8e6).abs() < 8e4, "{c:?}");
        let (p, target, measured) = c.objective.unwrap();
        assert_eq!((p, target), (99.0, 10_000_000));
        assert!((measured as f64 - 8e6).abs() < 8e4);
    }
    let sum = |i: usize| stats[i].path_p50_sum_ns as f64 / 1e3;
    // Transfers 3 x 100 us, queues 10 + 10 us (not d's 5 ms), executions.
    assert!(
        (sum(0) - (300.0 + 20.0 + 2500.0)).abs() < 60.0,
        "{}",
        sum(0)
    );
    assert!(
        (sum(1) - (300.0 + 20.0 + 7500.0)).abs() < 160.0,
        "{}",
        sum(1)
    );
    // A graph nobody invoked has chains with no counts.
    assert_eq!(m.chain_stats("g2", &of, 10, 100)[0].count, 0);
}

#[test]
fn host_windows_average_samples_and_merge_run_queue_waits() {
    let mut m = Monitor::default();
    for (i, util) in [0.2f32, 0.4, 0.9].iter().enumerate() {
        let mut rq = Sketch::default();
        rq.record_n(1000.0 * (i + 1) as f64, 10);
        m.record_host(
            "a1",
            HostPoint {
                at_unix_ms: 100_000 + i as u64 * 1000,
                cpu_util: *util,
                cpu_steal: 0.0,
                memory_used_bytes: 10 + i as u64,
                memory_total_bytes: 100,
                net_rx_bytes: 0,
                net_tx_bytes: 0,
                run_delay_ns: 1000,
                gpu_util: vec![],
                gpu_memory_used_bytes: vec![],
                gpu_power_watts: vec![],
                gpu_temperature_c: vec![],
                run_queue: Some(rq),
            },
        );
    }
    let w = m.host_window("a1", 2).unwrap();
    assert_eq!(w.samples, 2, "the window holds the last two seconds");
    assert!((w.cpu_util - 0.65).abs() < 1e-6);
    assert_eq!(w.memory_used_bytes, 12);
    let rq = w.run_queue.unwrap();
    assert_eq!(rq.count(), 20);
    assert!((rq.quantile(0.99) - 3000.0).abs() < 60.0);
    assert_eq!(m.host_window("a1", 10).unwrap().samples, 3);
    assert!(m.host_window("a2", 10).is_none());
}

#[test]
fn executions_per_second_fill_gaps_with_zero_and_keep_to_the_retention() {
    let mut m = Monitor::default();
    for (second, n) in [(1000u64, 3u64), (1002, 5)] {
        let mut w = WindowView {
            graph_id: "g1".into(),
            task: "a".into(),
            second,
            ..WindowView::default()
        };
        for _ in 0..n {
            w.exec.record(1e6);
        }
        m.record_window(&w);
    }
    assert_eq!(
        m.executions_per_second("g1", "a", 999, 1003),
        [0, 3, 0, 5, 0]
    );
    assert_eq!(m.executions_per_second("g1", "b", 1000, 1001), [0, 0]);
    // A range reaching further back than the monitor keeps starts where it keeps.
    let v = m.executions_per_second("g1", "a", 0, 1002);
    assert_eq!(v.len() as u64, RETENTION_S + 1);
    assert_eq!(v[v.len() - 3..], [3, 0, 5]);
}
