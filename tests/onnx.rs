//! `onnx` task code: a model uploaded as an artifact and run with ONNX Runtime on CPU.

mod common;
use common::*;

fn floats_from_hex(hex: &str) -> Vec<f32> {
    (0..hex.len())
        .step_by(8)
        .map(|i| {
            let b: Vec<u8> = (0..4)
                .map(|k| u8::from_str_radix(&hex[i + 2 * k..i + 2 * k + 2], 16).unwrap())
                .collect();
            f32::from_le_bytes(b.try_into().unwrap())
        })
        .collect()
}

#[test]
fn an_onnx_model_serves_a_task() {
    let runtime =
        std::path::PathBuf::from(CLI).with_file_name("../onnxruntime/lib/libonnxruntime.so");
    assert!(
        runtime.exists(),
        "{} is missing: `cargo xtask test` fetches it (or run `cargo xtask onnxruntime`)",
        runtime.display()
    );
    let dir = TempDir::new("onnx");
    let control = Control::start(dir.path(), &["--startup-grace-ms", "0"]);
    let _a = Agent::start(&control.addr, "a1", 2, dir.path());
    let up = control.cli_json(&["upload", &repo_path("models/affine.onnx")]);
    let digest = up["sha256"].as_str().unwrap();
    let graph = dir.path().join("affine.toml");
    std::fs::write(
        &graph,
        format!(
            r#"
name = "affine"
[[task]]
id = "model"
code = {{ onnx = "{digest}" }}
inputs = {{ x = "tensor<f32>[?,4]" }}
outputs = {{ y = "tensor<f32>[?,4]" }}
estimate = "200us"
"#
        ),
    )
    .unwrap();
    control.cli_ok(&["submit", graph.to_str().unwrap()]);
    wait_deployed(&control, "g1", 1, 1);

    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect();
    let input = dir.path().join("x.bin");
    std::fs::write(
        &input,
        x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = control.cli_json(&[
        "invoke",
        "affine",
        "--input",
        &format!("=@{}", input.display()),
    ]);
    let y = floats_from_hex(out["outputs"]["model.y"]["hex"].as_str().unwrap());
    let expected: Vec<f32> = x.iter().map(|v| v * 2.0 + 1.0).collect();
    assert_eq!(y, expected);

    // Three floats do not fit rows of four: a clear error, not a crash.
    std::fs::write(&input, [0u8; 12]).unwrap();
    let bad = control.cli(&[
        "invoke",
        "affine",
        "--input",
        &format!("=@{}", input.display()),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("do not fit shape"), "{err}");
}
