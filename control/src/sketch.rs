//! A mergeable quantile sketch with bounded relative error (logarithmic buckets, as in
//! DDSketch): every quantile it returns is within `ALPHA` of a value that was recorded at that
//! rank, and two sketches merge by adding bucket counts, so windows roll up exactly.

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
            let index = (v.ln() / gamma().ln()).ceil() as i32;
            *self.buckets.entry(index).or_insert(0) += 1;
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
}
