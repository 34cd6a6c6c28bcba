//! A mergeable quantile sketch with bounded relative error (logarithmic buckets, as in
//! DDSketch): every quantile it returns is within `ALPHA` of a value that was recorded at that
//! rank, and two sketches merge by adding bucket counts, so windows roll up exactly.

use crate::agent_capnp::sketch;

/// Relative accuracy of quantiles.
pub const ALPHA: f64 = 0.01;

/// Most bucket indices one sketch may span: 1 ns to 10^15 ns needs about 1,730; a decoded
/// sketch wider than this is refused rather than allocated.
pub const MAX_SPAN: usize = 4096;

/// Bucket counts stored densely from the lowest index in use: recording is an array increment
/// (a tree map cost a fifth of all the time telemetry took on the request path), and the
/// values one task produces cluster in a few dozen neighbouring buckets.
#[derive(Debug, Clone, Default)]
struct Buckets {
    lo: i32,
    counts: Vec<u64>,
}

impl Buckets {
    /// Adds `n` to bucket `index`: an increment when the bucket is within the range in use.
    #[inline]
    fn add(&mut self, index: i32, n: u64) {
        // A negative offset wraps to a huge one and takes the slow path.
        let at = index.wrapping_sub(self.lo) as u32 as usize;
        match self.counts.get_mut(at) {
            Some(c) => *c += n,
            None => self.add_outside(index, n),
        }
    }

    /// Adds to a bucket outside the range in use, growing it.
    #[cold]
    fn add_outside(&mut self, index: i32, n: u64) {
        if self.counts.is_empty() {
            self.lo = index;
            self.counts.push(n);
            return;
        }
        if index < self.lo {
            let grow = (self.lo - index) as usize;
            let mut counts = vec![0; grow + self.counts.len()];
            counts[grow..].copy_from_slice(&self.counts);
            self.counts = counts;
            self.lo = index;
        }
        let at = (index - self.lo) as usize;
        if at >= self.counts.len() {
            self.counts.resize(at + 1, 0);
        }
        self.counts[at] += n;
    }

    /// Non-empty buckets in increasing index order.
    fn iter(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(k, c)| (self.lo + k as i32, *c))
    }

    fn len(&self) -> usize {
        self.counts.iter().filter(|c| **c > 0).count()
    }
}

impl PartialEq for Buckets {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sketch {
    buckets: Buckets,
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

/// Mantissa bits that select an entry of [`LN_CENTRE`] and [`INV_CENTRE`].
const TABLE_BITS: u32 = 7;

/// `ln(c_i)` for the centres `c_i = 1 + (i + 0.5) / 128` of the mantissa's 128 slices.
static LN_CENTRE: [f64; 1 << TABLE_BITS] = centres(true);

/// `1 / c_i`, so that `m / c_i` is a multiplication.
static INV_CENTRE: [f64; 1 << TABLE_BITS] = centres(false);

/// `ln(x)` for x in [1, 2], by `2 atanh((x-1)/(x+1))` summed until the terms vanish: exact to
/// the last bit or two, and evaluated at compile time.
const fn const_ln(x: f64) -> f64 {
    let t = (x - 1.0) / (x + 1.0);
    let t2 = t * t;
    let mut term = t;
    let mut sum = 0.0;
    let mut k = 1.0;
    while k < 80.0 {
        sum += term / k;
        term *= t2;
        k += 2.0;
    }
    2.0 * sum
}

const fn centres(ln: bool) -> [f64; 1 << TABLE_BITS] {
    let mut out = [0.0; 1 << TABLE_BITS];
    let mut i = 0;
    while i < out.len() {
        let c = 1.0 + (i as f64 + 0.5) / (1 << TABLE_BITS) as f64;
        out[i] = if ln { const_ln(c) } else { 1.0 / c };
        i += 1;
    }
    out
}

/// `ceil(ln(v) / ln(gamma))` for a positive, finite `v`, without calling libm and without a
/// division: `record` runs several times per request, and `ln`, `ceil` and then a division
/// were most of its cost.
///
/// `v = m * 2^e` with `m` in [1, 2); the mantissa's top 7 bits pick a slice of [1, 2) with
/// centre `c`, and `ln m = ln c + ln(1 + r)` with `r = m / c - 1` (|r| < 1/257), summed to r^4:
/// the error is below 1e-12, so only a value within a relative 1e-12 of a bucket boundary can
/// land in the neighbouring bucket.
#[inline]
fn index_of(v: f64) -> i32 {
    let bits = v.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    let slice = ((bits >> (52 - TABLE_BITS)) & ((1 << TABLE_BITS) - 1)) as usize;
    let r = m * INV_CENTRE[slice] - 1.0;
    let r2 = r * r;
    let ln_m = LN_CENTRE[slice] + r - r2 * (0.5 - r * (1.0 / 3.0) + r2 * 0.25);
    let x = (e as f64 * std::f64::consts::LN_2 + ln_m) * (1.0 / LN_GAMMA);
    // `as` truncates toward zero: that is the ceiling of a negative number, and one below the
    // ceiling of a positive one that is not whole.
    let i = x as i32;
    if (i as f64) < x {
        i + 1
    } else {
        i
    }
}

/// The largest value recorded as itself (about 11.6 days in ns); larger ones, and NaN, are
/// recorded as this, so one wild value cannot stretch a sketch past `MAX_SPAN`.
const MAX_VALUE: f64 = 1e15;

impl Sketch {
    /// Records a non-negative value (negative values count as zero).
    #[inline]
    pub fn record(&mut self, v: f64) {
        self.record_n(v, 1);
    }

    /// Records `n` occurrences of the same value.
    #[inline]
    pub fn record_n(&mut self, v: f64, n: u64) {
        if n == 0 {
            return;
        }
        // `min` returns the other operand for NaN.
        let v = v.min(MAX_VALUE);
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += n;
        self.sum += v.max(0.0) * n as f64;
        if v <= 1e-9 {
            self.zeros += n;
        } else {
            self.buckets.add(index_of(v), n);
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
        for (i, c) in other.buckets.iter() {
            self.buckets.add(i, c);
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
        let n = self.buckets.len() as u32;
        let mut idx = b.reborrow().init_indices(n);
        for (i, (k, _)) in self.buckets.iter().enumerate() {
            idx.set(i as u32, k);
        }
        let mut counts = b.init_counts(n);
        for (i, (_, c)) in self.buckets.iter().enumerate() {
            counts.set(i as u32, c);
        }
    }

    pub fn decode(r: sketch::Reader<'_>) -> capnp::Result<Sketch> {
        let (idx, counts) = (r.get_indices()?, r.get_counts()?);
        if idx.len() != counts.len() {
            return Err(capnp::Error::failed(
                "sketch: indices and counts differ in length".into(),
            ));
        }
        if let (Some(lo), Some(hi)) = (idx.iter().min(), idx.iter().max()) {
            if i64::from(hi) - i64::from(lo) >= MAX_SPAN as i64 {
                return Err(capnp::Error::failed(format!(
                    "sketch: bucket indices {lo}..{hi} span more than {MAX_SPAN}"
                )));
            }
        }
        let mut buckets = Buckets::default();
        let mut total = r.get_zeros();
        for (i, c) in idx.iter().zip(counts.iter()) {
            buckets.add(i, c);
            total = total.saturating_add(c);
        }
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

    /// How many values are above `x`, and their sum, from the buckets (each value taken at its
    /// bucket's representative, so within the sketch's relative error).
    pub fn above(&self, x: f64) -> (u64, f64) {
        if self.count == 0 || self.max <= x {
            return (0, 0.0);
        }
        let g = gamma();
        let (mut n, mut sum) = (if x < 0.0 { self.zeros } else { 0 }, 0.0);
        for (i, c) in self.buckets.iter() {
            let v = (2.0 * g.powi(i) / (g + 1.0)).clamp(self.min, self.max);
            if v > x {
                n += c;
                sum += v * c as f64;
            }
        }
        (n, sum)
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
        for (i, c) in self.buckets.iter() {
            seen += c;
            if seen > rank {
                // The bucket's representative: within ALPHA of every value in it.
                let g = gamma();
                let v = 2.0 * g.powi(i) / (g + 1.0);
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
    fn the_index_agrees_with_libm_away_from_bucket_boundaries() {
        // Log-uniform values from 1e-6 to 1e15 (a fixed xorshift sequence).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut near_boundary = 0;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 10f64.powf(-6.0 + 21.0 * (x >> 11) as f64 / (1u64 << 53) as f64);
            let exact = v.ln() / LN_GAMMA;
            if (exact - exact.round()).abs() < 1e-9 {
                near_boundary += 1;
                assert!((index_of(v) - exact.ceil() as i32).abs() <= 1, "{v}");
                continue;
            }
            assert_eq!(index_of(v), exact.ceil() as i32, "{v}");
        }
        assert!(near_boundary < 100, "{near_boundary}");
        // Whole powers of gamma sit on boundaries: within one bucket either way.
        for i in [-500, -1, 1, 2, 700, 1700] {
            let v = gamma().powi(i);
            assert!((index_of(v) - i).abs() <= 1, "{i}");
        }
    }

    #[test]
    fn wild_values_are_clamped_not_spread() {
        let mut s = Sketch::default();
        s.record(1_000.0);
        s.record(f64::INFINITY);
        s.record(f64::NAN);
        s.record(1e300);
        assert_eq!(s.count(), 4);
        assert!(
            s.buckets.counts.len() < MAX_SPAN,
            "{}",
            s.buckets.counts.len()
        );
        assert!(s.quantile(1.0) <= MAX_VALUE * (1.0 + ALPHA));
    }

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
    fn counts_and_sums_above_a_value_within_the_relative_error() {
        let mut s = Sketch::default();
        for i in 0..1000 {
            s.record(f64::from(i));
        }
        s.record(0.0);
        let (n, sum) = s.above(899.5);
        // 900..=999: 100 values summing to 94,950; a bucket straddling 899.5 may move a few.
        assert!((98..=102).contains(&n), "{n}");
        assert!((sum - 94_950.0).abs() / 94_950.0 < 0.03, "{sum}");
        assert_eq!(s.above(999.0), (0, 0.0));
        assert_eq!(Sketch::default().above(0.0), (0, 0.0));
        assert_eq!(s.above(-1.0).0, 1001, "zeros too");
        assert_eq!(s.above(0.0).0, 999);
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

    #[test]
    fn buckets_grow_both_ways_and_compare_by_content() {
        let mut a = Sketch::default();
        for v in [1000.0, 10.0, 1e6, 10.0] {
            a.record(v);
        }
        let mut b = Sketch::default();
        for v in [1e6, 10.0, 10.0, 1000.0] {
            b.record(v);
        }
        assert_eq!(a, b, "the same values in another order");
        assert!((a.quantile(0.0) - 10.0).abs() <= 10.0 * ALPHA);
        assert!((a.quantile(1.0) - 1e6).abs() <= 1e6 * ALPHA);
        let mut msg = capnp::message::Builder::new_default();
        a.encode(msg.init_root());
        let back = Sketch::decode(msg.get_root_as_reader().unwrap()).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn a_sketch_spanning_too_many_buckets_is_refused() {
        let mut msg = capnp::message::Builder::new_default();
        {
            let mut b: sketch::Builder<'_> = msg.init_root();
            b.set_count(2);
            let mut idx = b.reborrow().init_indices(2);
            idx.set(0, i32::MIN);
            idx.set(1, i32::MAX);
            let mut counts = b.init_counts(2);
            counts.set(0, 1);
            counts.set(1, 1);
        }
        let err = Sketch::decode(msg.get_root_as_reader().unwrap()).unwrap_err();
        assert!(err.to_string().contains("span more than"), "{err}");
    }
}
