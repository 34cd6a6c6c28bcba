//! The Azure Functions sample's busiest functions as services, each simulated on its own like
//! `kpa-nasa`'s one service: arrivals Poisson within each minute (uniform given the minute's
//! count), a deterministic service time of the function's mean duration, one request at a time
//! per replica, within objective when the wait is at most that mean; the last third of the day
//! measured after 600 s unmeasured. Shared hosts come with the whole-cluster simulation.

use crate::kpa_nasa::{self, Policy, Run};
use crate::queue::Outcome;
use crate::trace::{spread_minutes, Function};
use prescient_policy::balance::Rng;

/// The `top` functions by invocations, busiest first.
pub fn busiest(functions: &[Function], top: usize) -> Vec<&Function> {
    let mut v: Vec<&Function> = functions.iter().collect();
    v.sort_by_key(|f| std::cmp::Reverse(f.per_minute.iter().map(|c| u64::from(*c)).sum::<u64>()));
    v.truncate(top);
    v
}

/// `policy` at `lead_s` over `functions`, their outcomes added up.
pub fn run(functions: &[&Function], policy: Policy, lead_s: f64, seed: u64) -> Run {
    let mut total = Outcome::empty();
    for (i, f) in functions.iter().enumerate() {
        // The same arrivals for every policy and lead: seeded per function.
        let counts = spread_minutes(&f.per_minute, &Rng::new(seed ^ (i as u64 + 1)));
        let out = kpa_nasa::service(&counts, f.mean_s, policy, lead_s, seed);
        kpa_nasa::merge(&mut total, &out);
    }
    kpa_nasa::summarize(policy, lead_s, &total)
}

/// Every function of `functions` as a one-task graph on the shared fleet (`prescient simulate
/// --trace azure-functions --hosts N`): arrivals Poisson within each minute, the function's
/// mean duration as a deterministic service time, one request at a time per replica (a core
/// and 256 MiB each), within objective when it waits at most that mean; sized by the
/// replication controller (KPA's cadence: changes every tick, 60 s before a scale-in).
pub fn fleet_services(functions: &[&Function], seed: u64) -> Vec<crate::fleet::Service> {
    functions
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let counts = spread_minutes(&f.per_minute, &Rng::new(seed ^ (i as u64 + 1)));
            let arrivals =
                crate::fleet::arrivals_from_counts(&counts, &Rng::new(seed ^ !(i as u64)));
            let mean = f.mean_s.max(0.001);
            crate::fleet::Service {
                record: crate::fleet::one_task_graph(&format!("f{}", i + 1), mean),
                arrivals,
                service: vec![crate::fleet::Dist::Fixed(mean)],
                objective_s: 2.0 * mean,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_come_first_and_runs_add_up() {
        let f = |id: &str, per_minute: u32, mean_s: f64| Function {
            id: id.into(),
            per_minute: vec![per_minute; 60],
            mean_s,
        };
        let all = [f("quiet", 1, 0.1), f("busy", 120, 0.5), f("mid", 30, 1.0)];
        let top = busiest(&all, 2);
        assert_eq!((top[0].id.as_str(), top[1].id.as_str()), ("busy", "mid"));
        let r = run(&top, Policy::Oracle, 2.0, 1);
        // The last third of 60 minutes of 150/min.
        assert!((r.requests as i64 - 3000).abs() < 200, "{r:?}");
        assert!(r.within_objective_pct > 95.0, "{r:?}");
    }
}
