//! With the `cuda` feature: compiles our CUDA kernels (src/engine/cuda/*.cu) to PTX with nvcc, as
//! candle's own kernels are built (CUDA_COMPUTE_CAP picks the target, like candle-kernels'). The
//! PTX is embedded and loaded at run time; the driver compiles it for the card in use.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/engine/cuda/attention.cu");
    println!("cargo:rerun-if-changed=src/engine/cuda/attention_common.cuh");
    println!("cargo:rerun-if-changed=src/engine/cuda/attention_hopper.cu");
    println!("cargo:rerun-if-changed=src/engine/cuda/elementwise.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rustc-check-cfg=cfg(candela_flash_attention)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().replace('.', "").parse().ok())
        .unwrap_or(80);
    // Element-wise kernels: every architecture candle supports.
    compile(&out, "elementwise", &format!("compute_{cap}"));
    // The attention kernel uses mma.m16n8k16 with f16 and bf16 operands: Ampere (8.0) and newer.
    if cap < 80 {
        println!("cargo:warning=CUDA_COMPUTE_CAP {cap} < 80: fused attention left out");
        std::fs::write(out.join("attention.ptx"), "").expect("writing an empty PTX");
        std::fs::write(out.join("attention_hopper.ptx"), "").expect("writing an empty PTX");
        return;
    }
    println!("cargo:rustc-cfg=candela_flash_attention");
    compile(&out, "attention", &format!("compute_{cap}"));
    // The Hopper kernel (wgmma) is compute_90a code, which only a 9.0 device loads; the engine
    // asks the device before choosing it. Built whenever the build targets 9.0 or newer.
    if cap >= 90 {
        compile(&out, "attention_hopper", "compute_90a");
    } else {
        std::fs::write(out.join("attention_hopper.ptx"), "").expect("writing an empty PTX");
    }
}

/// src/engine/cuda/NAME.cu → OUT_DIR/NAME.ptx for a virtual architecture (`compute_80`, …).
fn compile(out: &std::path::Path, name: &str, arch: &str) {
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let source = format!("src/engine/cuda/{name}.cu");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch={arch}"))
        .arg(&source)
        .arg("-o")
        .arg(out.join(format!("{name}.ptx")))
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (needed by the cuda feature): {e}"));
    assert!(status.success(), "nvcc failed on {source}");
}
