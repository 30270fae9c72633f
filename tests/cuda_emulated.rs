//! Our CUDA kernels (src/engine/cuda/attention.cu, attention_hopper.cu, elementwise.cu), run on
//! the CPU: g++ compiles the kernels' own source with the CUDA primitives emulated
//! (tests/cuda_emulator/emulate.h: every CUDA thread a host thread, mma/ldmatrix/shuffles lane by
//! lane from the PTX fragment layouts, wgmma from its fragment and shared-memory layouts),
//! under AddressSanitizer and UBSan, and each kernel runs at awkward shapes with the launch
//! geometry the engine uses (engine::cuda_geometry). Checked against an exact f64 attention of
//! the same rounded inputs. A GPU is lent rarely; this catches indexing, masking, padding and
//! out-of-bounds bugs of a new kernel before one is.

use std::path::{Path, PathBuf};
use std::process::Command;

use candela::engine::cuda_geometry::{padded_head_dim, AttentionKernel};

/// Compiles tests/cuda_emulator/NAME.cpp (which includes the kernels' source) into `dir`.
fn compile_harness(dir: &Path, name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = dir.join(name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let output = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-g0",
            "-fno-strict-aliasing",
            "-Wno-unknown-pragmas",
        ])
        .args([
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-pthread",
        ])
        .arg("-DCANDELA_EMULATE")
        .arg(root.join(format!("tests/cuda_emulator/{name}.cpp")))
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx} (a C++20 compiler is needed): {e}"));
    assert!(
        output.status.success(),
        "compiling the emulated kernels failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

/// (relative L2 error, max abs error) of one kernel at one shape.
fn run(
    binary: &Path,
    kernel: AttentionKernel,
    dtype: &str,
    (batch, heads, n, m, d): (usize, usize, usize, usize, usize),
    layout: &str,
) -> (f64, f64) {
    let padded = padded_head_dim(d).expect("a supported head size");
    let element_bytes = 2;
    let args = [
        kernel.name().to_string(),
        dtype.to_string(),
        padded.to_string(),
        batch.to_string(),
        heads.to_string(),
        n.to_string(),
        m.to_string(),
        d.to_string(),
        layout.to_string(),
        n.div_ceil(kernel.queries_per_block()).to_string(),
        kernel.threads().to_string(),
        kernel.shared_bytes(padded, element_bytes).to_string(),
        "7".to_string(),
    ];
    errors(binary, &args)
}

/// Runs a harness; its output is "relative_l2 max_abs".
fn errors(binary: &Path, args: &[String]) -> (f64, f64) {
    let output = Command::new(binary).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: Vec<f64> = stdout
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    (figures[0], figures[1])
}

/// Relative L2 limits: two unit roundoffs of the output type (f16 2⁻¹¹, bf16 2⁻⁸) — the kernels
/// compute in f32 and round once; f32 outputs to 1e-6 (f32 sums of a few thousand values).
fn limits() -> [(&'static str, f64); 3] {
    [
        ("f32", 1e-6),
        ("f16", 2.0 * 2f64.powi(-11)),
        ("bf16", 2.0 * 2f64.powi(-8)),
    ]
}

fn failed(relative: f64, max_abs: f64, limit: f64) -> bool {
    // NaN (a value never written) fails too.
    relative.is_nan() || relative > limit || max_abs.is_nan()
}

#[test]
fn attention_kernels_match_exact_attention() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_harness(dir.path(), "attention");
    // (batch, heads, queries, keys, head size) and the operands' layout: partial query blocks
    // and key tiles, every padding of the head size (40 → 48, 72 → 80), head size 160 (the wide
    // kernel's 32-key tiles), more keys than one tile, fewer keys than one tile; q, k and v
    // heads-first copies or token-major projections read in place (the output is token-major).
    // The Hopper kernels take head sizes 64 and 128 only (16 KiB tiles: 128 keys at 64, 64 keys
    // at 128; the `k128` candidates 128 keys at both): full, partial and several tiles of each,
    // more tiles than the three-stage kernels' stages.
    let shapes = [
        ((2, 1, 130, 100, 64), "heads_first"),
        ((1, 2, 70, 150, 40), "tokens_first"),
        ((2, 2, 129, 65, 72), "tokens_first"),
        ((1, 1, 64, 64, 128), "heads_first"),
        ((1, 1, 140, 70, 160), "tokens_first"),
        ((1, 3, 30, 20, 64), "heads_first"),
        ((1, 2, 100, 150, 128), "tokens_first"),
        ((1, 2, 70, 300, 64), "tokens_first"),
        ((1, 1, 70, 400, 128), "heads_first"),
    ];
    // Relative L2 limits of two unit roundoffs of the operand type (f16 2⁻¹¹, bf16 2⁻⁸): the
    // probabilities and the output are rounded to it once each. A wrong fragment, mask or
    // padding gives errors of order one.
    let mut failures = Vec::new();
    for (dtype, limit) in limits().into_iter().skip(1) {
        for kernel in AttentionKernel::ALL {
            for (shape, layout) in shapes.into_iter().filter(|(s, _)| kernel.handles(s.4)) {
                let (relative, max_abs) = run(&binary, kernel, dtype, shape, layout);
                println!(
                    "{} {dtype} {shape:?}: relative L2 {relative:.2e}, max |Δ| {max_abs:.2e}",
                    kernel.name()
                );
                if failed(relative, max_abs, limit) {
                    failures.push(format!(
                        "{} {dtype} {shape:?}: {relative:.2e} > {limit:.2e}",
                        kernel.name()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Every kernel of elementwise.cu against f64: the DiT's fused LayerNorm + modulation, the
/// GroupNorm(+SiLU) pair, modulate, gated add (with a Linear's bias folded in, with a second
/// product too, and without), bias
/// add (with a residual, and a residual alone), the per-channel add (time embeddings), nearest ×2
/// upsampling, GEGLU and the tanh GELU (with and without a bias), the per-head q/k norm with the bias and
/// the rotary embedding folded in (each stream written at its place in the joint sequence), a
/// bias added while placing a stream there, the rotary embedding and the FP8
/// activation quantization (code for code against a search over all e4m3 values); with
/// 16-byte packs and without, rows shorter and longer than a block's threads, several samples.
#[test]
fn elementwise_kernels_match_exact_results() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_harness(dir.path(), "elementwise");
    // (op, rows or blocks, values per row or group, samples, 16-byte packs)
    let cases = [
        ("layer_norm_modulate", 6, 200, 2, 1),
        ("layer_norm_modulate", 4, 3000, 2, 1),
        ("layer_norm_modulate", 3, 203, 3, 0),
        // A LayerNorm's weight and bias, shared by every row: SDXL's d = 640 (128 threads a
        // row), SD 1.5's 320 (64), a short row (32 threads, some idle), an odd one (256).
        ("layer_norm_affine", 6, 640, 1, 1),
        ("layer_norm_affine", 4, 320, 1, 1),
        ("layer_norm_affine", 5, 136, 1, 1),
        ("layer_norm_affine", 3, 203, 1, 0),
        // group_norm: the "samples" field is the statistics' slices per group (3 and 5: a
        // shorter last slice; 40 of 8 values over 148: empty ones at the end).
        ("group_norm", 6, 512, 1, 1),
        ("group_norm", 6, 512, 3, 1),
        ("group_norm", 4, 148, 1, 0),
        ("group_norm", 4, 148, 5, 0),
        ("group_norm", 4, 148, 40, 0),
        ("modulate", 6, 40, 2, 1),
        ("modulate", 5, 36, 1, 0),
        ("gated_add", 6, 40, 2, 1),
        ("gated_add", 5, 36, 1, 0),
        ("gated_add_bias", 6, 40, 2, 1),
        ("gated_add_bias", 5, 36, 1, 0),
        ("gated_add_sum", 6, 40, 2, 1),
        ("gated_add_sum", 5, 36, 1, 0),
        ("gelu_tanh", 70, 40, 1, 1),
        ("gelu_tanh", 5, 36, 1, 0),
        ("gelu_tanh_bias", 70, 40, 1, 1),
        ("gelu_tanh_bias", 5, 36, 1, 0),
        // qk_norm: rows = 2 samples · tokens · heads (the "samples" field), head size; the last
        // field: with FLUX's rotary embedding (1) or without (SD3.5: 0). Head sizes 64 and 128,
        // and 80 (pairs that leave some lanes idle in the last round).
        ("qk_norm", 2 * 7 * 3, 128, 3, 1),
        ("qk_norm", 2 * 5 * 2, 64, 2, 0),
        ("qk_norm", 2 * 9 * 4, 80, 4, 1),
        // Rows per warp (4 at head size 64, 16 and 8 lanes a row) not dividing the rows; 32
        // lanes a row at 256.
        ("qk_norm", 2 * 3 * 3, 64, 3, 1),
        ("qk_norm", 2 * 7 * 5, 16, 5, 1),
        ("qk_norm", 2 * 5, 256, 1, 0),
        // bias_join: 2 samples' rows placed at token 3 of a longer joint sequence.
        ("bias_join", 2 * 7, 48, 1, 1),
        ("bias_join", 2 * 5, 36, 1, 0),
        ("bias_add", 70, 40, 1, 1),
        ("bias_add", 5, 36, 1, 0),
        ("geglu", 70, 40, 1, 1),
        ("geglu", 5, 36, 1, 0),
        ("bias_add_residual", 70, 40, 1, 1),
        ("bias_add_residual", 5, 36, 1, 0),
        ("residual_add", 70, 40, 1, 1),
        ("residual_add", 5, 36, 1, 0),
        ("geglu_bias", 70, 40, 1, 1),
        ("geglu_bias", 5, 36, 1, 0),
        // channel_add: rows = samples · channels of `d` values each.
        ("channel_add", 12, 64, 1, 1),
        ("channel_add", 6, 35, 1, 0),
        // upsample: rows = planes · height, the "samples" field = height, then width.
        ("upsample", 6 * 4, 8, 4, 1),
        ("upsample", 3 * 5, 7, 5, 0),
        // rope: the last field is the heads between a token and its values (token-major: 2).
        ("rope", 6, 40, 3, 1),
        ("rope", 12, 40, 3, 2),
        // FP8 (16-bit activations only): every e4m3 code exact, or the case fails.
        ("fp8_quantize", 70, 48, 1, 1),
        ("fp8_quantize", 5, 37, 1, 0),
        // Row-wise: 48 and 3 000 values a row (one and several passes of the block), and an
        // unaligned width.
        ("fp8_quantize_rows", 9, 48, 1, 1),
        ("fp8_quantize_rows", 4, 3000, 1, 1),
        ("fp8_quantize_rows", 5, 37, 1, 0),
        // fp8_gemv: outputs, inner width, rows of activations: outputs not filling the last
        // block, lanes left idle, several steps a lane, one to four rows.
        ("fp8_gemv", 37, 64, 2, 1),
        ("fp8_gemv", 20, 1024, 4, 1),
        ("fp8_gemv", 9, 48, 1, 1),
        ("fp8_rescale", 70, 40, 1, 1),
        ("fp8_rescale", 5, 36, 1, 0),
        // Weight casts to e4m3 and back (every dtype): any wrong code or value fails the case.
        ("cast_e4m3", 33, 31, 1, 0),
    ];
    let mut failures = Vec::new();
    for (dtype, limit) in limits() {
        let cases = cases
            .iter()
            .filter(|case| dtype != "f32" || !case.0.starts_with("fp8"));
        for &(op, rows, d, samples, vec) in cases {
            let args = [op, dtype]
                .map(String::from)
                .into_iter()
                .chain([rows, d, samples, vec, 5].map(|n: usize| n.to_string()))
                .collect::<Vec<_>>();
            let (relative, max_abs) = errors(&binary, &args);
            println!("{op} {dtype} rows {rows} × {d}, vec {vec}: relative L2 {relative:.2e}, max |Δ| {max_abs:.2e}");
            if failed(relative, max_abs, limit) {
                failures.push(format!(
                    "{op} {dtype} {rows}×{d} vec {vec}: {relative:.2e} > {limit:.2e}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
