//! Prometheus text exposition (format 0.0.4): a writer that gets names, help, types, label
//! escaping and sample formatting right, shared by the control node and agents.

use std::fmt::Write;

#[derive(Default)]
pub struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

impl Exposition {
    /// Starts a metric family: `kind` is counter, gauge or summary.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        if value.is_finite() {
            let _ = writeln!(self.out, " {value}");
        } else {
            let _ = writeln!(self.out, " NaN");
        }
        self
    }

    /// Writes one histogram series: `buckets` are (upper bound, count in that bucket alone),
    /// in increasing order; the cumulative `_bucket` lines, `+Inf`, `_sum` and `_count`
    /// follow from them.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        sum: f64,
    ) -> &mut Self {
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (le, n) in buckets {
            cumulative += n;
            let le = le.to_string();
            let mut l = labels.to_vec();
            l.push(("le", le.as_str()));
            self.sample(&bucket, &l, cumulative as f64);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&bucket, &l, cumulative as f64);
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative as f64)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let mut e = Exposition::default();
        e.family("w_seconds", "histogram", "Waits.").histogram(
            "w_seconds",
            &[("cpu", "0")],
            &[(0.5, 2), (1.0, 0), (2.0, 3)],
            4.5,
        );
        assert_eq!(
            e.finish(),
            "# HELP w_seconds Waits.\n# TYPE w_seconds histogram\n\
             w_seconds_bucket{cpu=\"0\",le=\"0.5\"} 2\n\
             w_seconds_bucket{cpu=\"0\",le=\"1\"} 2\n\
             w_seconds_bucket{cpu=\"0\",le=\"2\"} 5\n\
             w_seconds_bucket{cpu=\"0\",le=\"+Inf\"} 5\n\
             w_seconds_sum{cpu=\"0\"} 4.5\nw_seconds_count{cpu=\"0\"} 5\n"
        );
    }

    #[test]
    fn writes_families_and_escapes_labels() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "Things.")
            .sample("x_total", &[("task", "a\"b")], 3.0);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{task=\"a\\\"b\"} 3\n"
        );
    }
}
