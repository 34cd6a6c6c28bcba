//! A mergeable quantile sketch with bounded relative error (logarithmic buckets, as in
//! DDSketch): every quantile it returns is within `ALPHA` of a value that was recorded at that
//! rank, and two sketches merge by adding bucket counts, so windows roll up exactly.

use crate::agent_capnp::sketch;
use std::collections::BTreeMap;

/// Relative accuracy of quantiles.
pub const ALPHA: f64 = 0.01;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    buckets: BTreeMap<i32, u64>,
    zeros: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

fn gamma() -> f64 {
    (1.0 + ALPHA) / (1.0 - ALPHA)
}

/// ln(gamma) for ALPHA = 0.01, precomputed: `record` is on every request's path.
const LN_GAMMA: f64 = 0.020000666706669435;

impl Sketch {
    /// Records a non-negative value (negative values count as zero).
    pub fn record(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum += v.max(0.0);
        if v <= 1e-9 {
            self.zeros += 1;
        } else {
            let index = (v.ln() / LN_GAMMA).ceil() as i32;
            *self.buckets.entry(index).or_insert(0) += 1;
        }
    }

    /// Records `n` occurrences of the same value.
    pub fn record_n(&mut self, v: f64, n: u64) {
        if n == 0 {
            return;
        }
        self.record(v);
        self.count += n - 1;
        self.sum += v.max(0.0) * (n - 1) as f64;
        if v <= 1e-9 {
            self.zeros += n - 1;
        } else {
            let index = (v.ln() / LN_GAMMA).ceil() as i32;
            *self.buckets.entry(index).or_insert(0) += n - 1;
        }
    }

    pub fn merge(&mut self, other: &Sketch) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        for (i, c) in &other.buckets {
            *self.buckets.entry(*i).or_insert(0) += c;
        }
        self.zeros += other.zeros;
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    pub fn max(&self) -> f64 {
        self.max
    }

    pub fn encode(&self, mut b: sketch::Builder<'_>) {
        b.set_count(self.count);
        b.set_zeros(self.zeros);
        b.set_sum(self.sum);
        b.set_min(self.min);
        b.set_max(self.max);
        let mut idx = b.reborrow().init_indices(self.buckets.len() as u32);
        for (i, k) in self.buckets.keys().enumerate() {
            idx.set(i as u32, *k);
        }
        let mut counts = b.init_counts(self.buckets.len() as u32);
        for (i, c) in self.buckets.values().enumerate() {
            counts.set(i as u32, *c);
        }
    }

    pub fn decode(r: sketch::Reader<'_>) -> capnp::Result<Sketch> {
        let (idx, counts) = (r.get_indices()?, r.get_counts()?);
        if idx.len() != counts.len() {
            return Err(capnp::Error::failed(
                "sketch: indices and counts differ in length".into(),
            ));
        }
        let buckets: BTreeMap<i32, u64> = idx.iter().zip(counts.iter()).collect();
        let total: u64 = buckets.values().sum::<u64>() + r.get_zeros();
        if total != r.get_count() {
            return Err(capnp::Error::failed(
                "sketch: bucket counts do not add up".into(),
            ));
        }
        Ok(Sketch {
            buckets,
            zeros: r.get_zeros(),
            count: r.get_count(),
            sum: r.get_sum(),
            min: r.get_min(),
            max: r.get_max(),
        })
    }

    /// The value at quantile `q` (0..=1); 0 for an empty sketch.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = (q.clamp(0.0, 1.0) * (self.count - 1) as f64).round() as u64;
        if rank < self.zeros {
            return 0.0;
        }
        let mut seen = self.zeros;
        for (i, c) in &self.buckets {
            seen += c;
            if seen > rank {
                // The bucket's representative: within ALPHA of every value in it.
                let g = gamma();
                let v = 2.0 * g.powi(*i) / (g + 1.0);
                return v.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_relative_error() {
        let mut s = Sketch::default();
        let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 1.7).collect();
        for v in &values {
            s.record(*v);
        }
        for q in [0.5, 0.9, 0.99, 0.999] {
            let exact = values[((values.len() - 1) as f64 * q).round() as usize];
            let got = s.quantile(q);
            assert!(
                (got - exact).abs() / exact <= ALPHA * 1.01,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(s.count(), 10_000);
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (Sketch::default(), Sketch::default(), Sketch::default());
        for i in 0..1000 {
            let v = (i * 37 % 1000) as f64;
            if i % 2 == 0 {
                a.record(v)
            } else {
                b.record(v)
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a.quantile(0.5), all.quantile(0.5));
        assert_eq!(a.quantile(0.99), all.quantile(0.99));
        assert_eq!(a.count(), all.count());
        assert_eq!(Sketch::default().quantile(0.5), 0.0);
    }

    #[test]
    fn the_precomputed_log_matches_alpha() {
        assert!((LN_GAMMA - gamma().ln()).abs() < 1e-15);
    }

    #[test]
    fn sketches_round_trip_through_capnp() {
        let mut s = Sketch::default();
        for v in [0.0, 1.0, 5.5, 1e6, 3e9] {
            s.record(v);
        }
        let mut msg = capnp::message::Builder::new_default();
        s.encode(msg.init_root());
        let back = Sketch::decode(msg.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
