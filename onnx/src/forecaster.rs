//! The load forecaster's model (`models/forecaster.onnx`, embedded in the binary), run batched on
//! ONNX Runtime; the decision crate's selection weighs it against the baselines.

use crate::RuntimeError;
use prescient_policy::forecast::{self, FEATURES, MODEL_HORIZON};
use thiserror::Error;

/// The model `cargo xtask train-forecaster` wrote.
pub static MODEL: &[u8] = include_bytes!("../../models/forecaster.onnx");

/// Why the forecaster could not load or run.
#[derive(Debug, Clone, Error)]
pub enum ForecasterError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("loading the forecasting model: {0}")]
    Model(String),
    #[error("the forecasting model takes {expected} inputs per row, not {got}")]
    Rows { expected: usize, got: usize },
    #[error("running the forecasting model: {0}")]
    Inference(String),
}

/// A session on the forecasting model.
pub struct Forecaster {
    session: ort::session::Session,
    /// A failure to run is reported once, not every step.
    warned: bool,
}

impl std::fmt::Debug for Forecaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forecaster")
    }
}

impl Forecaster {
    /// The embedded model on this process's ONNX Runtime, or the file
    /// `PRESCIENT_FORECASTER_MODEL` names (a retrained model with the same inputs and outputs).
    pub fn load() -> Result<Forecaster, ForecasterError> {
        match std::env::var_os("PRESCIENT_FORECASTER_MODEL") {
            Some(path) => {
                let bytes = std::fs::read(&path).map_err(|e| {
                    ForecasterError::Model(format!(
                        "{}: {e}",
                        std::path::Path::new(&path).display()
                    ))
                })?;
                Forecaster::from_bytes(&bytes)
            }
            None => Forecaster::from_bytes(MODEL),
        }
    }

    /// A model with the same inputs and outputs, from its bytes.
    pub fn from_bytes(model: &[u8]) -> Result<Forecaster, ForecasterError> {
        let env = crate::runtime()?;
        let session = ort::session::Session::builder(env)
            .and_then(|mut b| {
                // One thread: the control node forecasts between decisions, and a batch of a
                // few thousand rows is microseconds of work per row.
                b = b.with_intra_threads(1)?;
                b.commit_from_memory(model)
            })
            .map_err(|e| ForecasterError::Model(e.to_string()))?;
        let has = |name: &str| session.outputs().iter().any(|o| o.name() == name);
        if !(has("point") && has("upper")) {
            return Err(ForecasterError::Model(
                "expected outputs `point` and `upper`".into(),
            ));
        }
        Ok(Forecaster {
            session,
            warned: false,
        })
    }

    /// Runs `rows` (`FEATURES` each): `MODEL_HORIZON` points and uppers per row, in units of
    /// each row's scale.
    pub fn infer(
        &mut self,
        rows: &[f32],
        point: &mut Vec<f32>,
        upper: &mut Vec<f32>,
    ) -> Result<(), ForecasterError> {
        if !rows.len().is_multiple_of(FEATURES) {
            return Err(ForecasterError::Rows {
                expected: FEATURES,
                got: rows.len() % FEATURES,
            });
        }
        let n = rows.len() / FEATURES;
        point.clear();
        upper.clear();
        if n == 0 {
            return Ok(());
        }
        let fail = |e: &dyn std::fmt::Display| ForecasterError::Inference(e.to_string());
        let input = ort::value::Tensor::from_array((vec![n, FEATURES], rows.to_vec()))
            .map_err(|e| fail(&e))?;
        let outputs = self
            .session
            .run(ort::inputs!["features" => input])
            .map_err(|e| fail(&e))?;
        for (name, out) in [("point", &mut *point), ("upper", &mut *upper)] {
            let (_, data) = outputs[name]
                .try_extract_tensor::<f32>()
                .map_err(|e| fail(&e))?;
            if data.len() != n * MODEL_HORIZON {
                return Err(ForecasterError::Inference(format!(
                    "{name}: {} values for {n} rows",
                    data.len()
                )));
            }
            out.extend_from_slice(data);
        }
        Ok(())
    }
}

impl forecast::Model for Forecaster {
    fn run(&mut self, rows: &[f32], point: &mut Vec<f32>, upper: &mut Vec<f32>) -> bool {
        match self.infer(rows, point, upper) {
            Ok(()) => true,
            Err(e) => {
                if !self.warned {
                    tracing::warn!("forecasting with the baselines alone: {e}");
                    self.warned = true;
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `models/forecaster_fixture.json`: histories with the rows and outputs the training
    /// script computed for them.
    fn fixture() -> Vec<serde_json::Value> {
        let text = include_str!("../../models/forecaster_fixture.json");
        serde_json::from_str(text).expect("fixture is JSON")
    }

    fn floats(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    #[test]
    fn rows_match_the_training_script() {
        let cases = fixture();
        assert!(cases.len() >= 6);
        for c in &cases {
            let history = floats(&c["history"]);
            let season = c["season"].as_u64().expect("season") as usize;
            let mut row = vec![0f32; FEATURES];
            let scale = forecast::features(&history, season, &mut row);
            assert!((scale - c["scale"].as_f64().expect("scale")).abs() < 1e-9);
            for (i, (a, b)) in row.iter().zip(floats(&c["features"])).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{}: feature {i}: {a} vs {b}",
                    c["dataset"]
                );
            }
        }
    }

    #[test]
    fn the_model_gives_the_training_scripts_outputs_batched() {
        let mut f = match Forecaster::load() {
            Ok(f) => f,
            // The test suite installs ONNX Runtime (`cargo xtask test`); without it, say so.
            Err(ForecasterError::Runtime(e)) => panic!("{e}"),
            Err(e) => panic!("{e}"),
        };
        let cases = fixture();
        let mut rows = Vec::new();
        for c in &cases {
            rows.extend(floats(&c["features"]).into_iter().map(|x| x as f32));
        }
        let (mut point, mut upper) = (Vec::new(), Vec::new());
        f.infer(&rows, &mut point, &mut upper).expect("runs");
        for (i, c) in cases.iter().enumerate() {
            for (name, got) in [("point", &point), ("upper", &upper)] {
                let want = floats(&c[name]);
                for (h, w) in want.iter().enumerate() {
                    let g = f64::from(got[i * MODEL_HORIZON + h]);
                    assert!(
                        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                        "{} {name}[{h}]: {g} vs {w}",
                        c["dataset"]
                    );
                }
            }
        }
        // A ragged batch is refused with a reason, not run.
        assert!(matches!(
            f.infer(&rows[1..], &mut point, &mut upper),
            Err(ForecasterError::Rows { .. })
        ));
    }
}
