//! Replica choice, the one copy: the agents' data plane and the simulator both pick replicas
//! here. A join (a task with several inputs) needs every input of one invocation at the same
//! replica, so it is chosen by rendezvous hashing on the invocation; any other task by power of
//! two choices on load among the replicas on the sender's host when there are any (chain
//! affinity keeps a chain local), else among all.
//!
//! Generic over [`Load`], as linkerd2-proxy's balancer is over `tower::load::Load`: the data
//! plane's load is outstanding requests per peer, the simulator's its replicas' queues.

use std::cell::Cell;

/// A replica as replica choice sees it.
pub trait Candidate {
    /// The replica's id (what rendezvous hashing hashes).
    fn replica(&self) -> &str;
    /// The host it runs on (what chain affinity compares).
    fn host(&self) -> &str;
}

/// How loaded each endpoint is, smaller is better (outstanding requests, a latency estimate).
pub trait Load<E> {
    type Metric: PartialOrd;
    fn load(&self, candidate: &E) -> Self::Metric;
}

/// What one choice is for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The invocation the request belongs to (a join's inputs meet by it).
    pub invocation: u64,
    /// The task has several inputs.
    pub join: bool,
    /// The sender's host.
    pub local_host: &'a str,
}

/// Picks the replica for `req` among the `usable` ones of `candidates`, without allocating.
pub fn choose<'a, E, L>(
    candidates: &'a [E],
    req: &Request<'_>,
    usable: impl Fn(&E) -> bool,
    loads: &L,
    rng: &Rng,
) -> Option<&'a E>
where
    E: Candidate,
    L: Load<E>,
{
    if req.join {
        return candidates
            .iter()
            .filter(|e| usable(e))
            .max_by_key(|e| rendezvous(req.invocation, e.replica()));
    }
    // One pass: the first usable candidates' indices on the stack (local ones apart), so a
    // choice allocates nothing and reads each candidate once; past `SMALL` of either, the
    // rest are counted and found again by position.
    const SMALL: usize = 32;
    let (mut all, mut local) = ([0u32; SMALL], [0u32; SMALL]);
    let (mut n_all, mut n_local) = (0usize, 0usize);
    for (i, e) in candidates.iter().enumerate() {
        if !usable(e) {
            continue;
        }
        if n_all < SMALL {
            all[n_all] = i as u32;
        }
        n_all += 1;
        if e.host() == req.local_host {
            if n_local < SMALL {
                local[n_local] = i as u32;
            }
            n_local += 1;
        }
    }
    let (pool, n, local_only) = if n_local > 0 {
        (&local, n_local, true)
    } else {
        (&all, n_all, false)
    };
    let nth = |k: usize| -> Option<&'a E> {
        if k < SMALL {
            return candidates.get(pool[k] as usize);
        }
        candidates
            .iter()
            .filter(|e| usable(e) && (!local_only || e.host() == req.local_host))
            .nth(k)
    };
    match n {
        0 => None,
        1 => nth(0),
        _ => {
            let a = rng.below(n);
            let mut b = rng.below(n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (nth(a)?, nth(b)?);
            Some(if loads.load(eb) < loads.load(ea) {
                eb
            } else {
                ea
            })
        }
    }
}

/// A peak-EWMA latency estimate of one replica, as linkerd2-proxy's `PeakEwma`: a slower
/// observation is taken at once (the peak), faster ones pull the estimate down with time
/// constant `decay`, so a replica that turns slow loses traffic on its next answer and wins it
/// back gradually. No clock is read: times are arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakEwma {
    cost_ns: f64,
    updated_ns: u64,
    decay_ns: f64,
}

/// How fast a latency estimate forgets a slow spell.
pub const DEFAULT_DECAY: std::time::Duration = std::time::Duration::from_secs(2);

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma::new(DEFAULT_DECAY)
    }
}

impl PeakEwma {
    pub fn new(decay: std::time::Duration) -> PeakEwma {
        PeakEwma {
            cost_ns: 0.0,
            updated_ns: 0,
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    /// Takes one round trip of `rtt_ns`, observed at `now_ns`.
    pub fn observe(&mut self, rtt_ns: u64, now_ns: u64) {
        let rtt = rtt_ns as f64;
        if rtt >= self.cost_ns || self.updated_ns == 0 {
            self.cost_ns = rtt;
        } else {
            let elapsed = now_ns.saturating_sub(self.updated_ns) as f64;
            let w = (-elapsed / self.decay_ns).exp();
            self.cost_ns = self.cost_ns * w + rtt * (1.0 - w);
        }
        self.updated_ns = now_ns;
    }

    /// The estimate, ns (0 before the first observation).
    pub fn estimate_ns(&self) -> f64 {
        self.cost_ns
    }

    /// The load replica choice compares: the estimate weighted by the requests outstanding
    /// (plus the one being placed), so an unmeasured replica is tried and a slow one is
    /// chosen less.
    pub fn load(&self, outstanding: usize) -> f64 {
        self.cost_ns * (outstanding + 1) as f64
    }
}

/// Rendezvous (highest random weight) score of a replica for an invocation.
pub fn rendezvous(invocation: u64, replica: &str) -> u64 {
    // FNV-1a over the replica name, mixed with the invocation (splitmix64 finaliser).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in replica.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut z = h ^ invocation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast, non-cryptographic generator (xorshift64*), one per thread of execution;
/// seeded by the caller (from entropy on the data plane, from `--seed` in the simulator).
#[derive(Debug)]
pub struct Rng(Cell<u64>);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(Cell::new(seed | 1))
    }
    pub fn next_u64(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Uniform in (0, 1].
    pub fn unit(&self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop, prop_assert, prop_assert_eq, proptest, Strategy};

    #[derive(Debug, Clone)]
    struct E {
        id: String,
        host: String,
        load: u32,
    }
    impl Candidate for E {
        fn replica(&self) -> &str {
            &self.id
        }
        fn host(&self) -> &str {
            &self.host
        }
    }
    struct Own;
    impl Load<E> for Own {
        type Metric = u32;
        fn load(&self, e: &E) -> u32 {
            e.load
        }
    }

    fn candidates() -> impl Strategy<Value = Vec<E>> {
        prop::collection::vec((0u8..3, 0u32..5), 1..80).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (h, load))| E {
                    id: format!("g1.t.r{i}"),
                    host: format!("h{h}"),
                    load,
                })
                .collect()
        })
    }

    fn req(invocation: u64, join: bool) -> Request<'static> {
        Request {
            invocation,
            join,
            local_host: "h0",
        }
    }

    proptest! {
        #[test]
        fn a_local_replica_is_chosen_whenever_there_is_one(es in candidates(), seed: u64) {
            let rng = Rng::new(seed);
            let got = choose(&es, &req(1, false), |_| true, &Own, &rng).unwrap();
            let any_local = es.iter().any(|e| e.host == "h0");
            prop_assert_eq!(got.host == "h0", any_local);
        }

        #[test]
        fn two_choices_never_pick_the_one_most_loaded(es in candidates(), seed: u64) {
            let rng = Rng::new(seed);
            let pool: Vec<&E> = if es.iter().any(|e| e.host == "h0") {
                es.iter().filter(|e| e.host == "h0").collect()
            } else {
                es.iter().collect()
            };
            let max = pool.iter().map(|e| e.load).max().unwrap();
            let at_max = pool.iter().filter(|e| e.load == max).count();
            let got = choose(&es, &req(1, false), |_| true, &Own, &rng).unwrap();
            if pool.len() > 1 && at_max == 1 {
                prop_assert!(got.load < max, "{:?} from {:?}", got, pool);
            }
        }

        #[test]
        fn joins_are_sticky_and_skip_what_is_unusable(es in candidates(), inv: u64, seed: u64) {
            let rng = Rng::new(seed);
            let first = choose(&es, &req(inv, true), |_| true, &Own, &rng).unwrap();
            let again = choose(&es, &req(inv, true), |_| true, &Own, &rng).unwrap();
            prop_assert_eq!(&first.id, &again.id);
            // Without the chosen one, another is chosen (or none is left).
            let other = choose(&es, &req(inv, true), |e| e.id != first.id, &Own, &rng);
            prop_assert_eq!(other.is_none(), es.len() == 1);
            prop_assert!(other.is_none_or(|o| o.id != first.id));
        }
    }

    #[test]
    fn peak_ewma_takes_peaks_at_once_and_forgets_them_gradually() {
        let mut e = PeakEwma::new(std::time::Duration::from_secs(1));
        e.observe(1_000_000, 1);
        assert_eq!(e.estimate_ns(), 1e6);
        e.observe(10_000_000, 2);
        assert_eq!(e.estimate_ns(), 1e7, "a slower answer counts at once");
        // Fast answers pull it down: after one decay constant, 1/e of the gap is left.
        e.observe(1_000_000, 1_000_000_002);
        let left = (e.estimate_ns() - 1e6) / 9e6;
        assert!((left - (-1.0f64).exp()).abs() < 1e-6, "{left}");
        // A slow replica with one request out loses to a fast one with three.
        let mut fast = PeakEwma::default();
        fast.observe(1_000_000, 1);
        let mut slow = PeakEwma::default();
        slow.observe(10_000_000, 1);
        assert!(fast.load(3) < slow.load(1));
    }

    #[test]
    fn joins_spread_across_invocations() {
        let es: Vec<E> = (0..3)
            .map(|i| E {
                id: format!("r{i}"),
                host: "h0".into(),
                load: 0,
            })
            .collect();
        let rng = Rng::new(7);
        let seen: std::collections::HashSet<&str> = (0..100)
            .map(|inv| {
                choose(&es, &req(inv, true), |_| true, &Own, &rng)
                    .unwrap()
                    .id
                    .as_str()
            })
            .collect();
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn nothing_usable_chooses_nothing() {
        let es = vec![E {
            id: "r1".into(),
            host: "h0".into(),
            load: 0,
        }];
        let rng = Rng::new(1);
        assert!(choose(&es, &req(1, false), |_| false, &Own, &rng).is_none());
        assert!(choose(&[] as &[E], &req(1, true), |_| true, &Own, &rng).is_none());
    }
}
