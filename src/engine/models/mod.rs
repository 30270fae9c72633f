//! Network definitions. Each reads its sizes from the component's `config.json`.

/// One instruction-set tier of the dispatch macros below, inside the dispatching function:
/// `$imp` compiled with every `$feature`, called — and the function returned from — when the CPU
/// has each of them (a hypervisor may hide any one, so each is checked).
macro_rules! simd_tier {
    ([$($feature:tt),+] $imp:ident($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        {
            $(#[target_feature(enable = $feature)])+
            #[allow(unused_unsafe)]
            unsafe fn tier($($arg: $ty),*) {
                // SAFETY: an `unsafe` `$imp`'s contract is kept by the dispatcher's caller.
                unsafe { $imp($($arg),*) }
            }
            if $(is_x86_feature_detected!($feature))&&+ {
                // SAFETY: the CPU has the features `tier` is compiled for; the contract is
                // forwarded as above.
                return unsafe { tier($($arg),*) };
            }
        }
    };
}

/// `fn $name(args) = $imp`: calls `$imp` compiled with AVX2 and FMA when the CPU has them (its
/// `#[inline(always)]` loops then vectorise 8 wide; a plain build targets SSE2), else as is.
/// The `unsafe fn` form passes the callee's contract on to its callers.
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $imp:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            simd_tier!(["avx2", "fma"] $imp($($arg: $ty),*));
            $imp($($arg),*)
        }
    };
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $imp:ident) => {
        $(#[$m])*
        $vis unsafe fn $name($($arg: $ty),*) {
            simd_tier!(["avx2", "fma"] $imp($($arg: $ty),*));
            // SAFETY: the caller keeps `$imp`'s contract.
            unsafe { $imp($($arg),*) }
        }
    };
}

/// `fn $name(args) = $imp`: calls `$imp` compiled with AVX-512 when the CPU has it (16 lanes; on
/// a Zen 4 attention 1.05–1.12× faster for its softmax, GEGLU and GroupNorm+SiLU 1.3–1.8×, the
/// tanh GELU 1.6×), else as [`avx2_dispatch`] does. Not for the Winograd transforms: their
/// `[f32; 8]` lanes ran 5–30 % slower compiled so.
macro_rules! avx512_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $imp:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            simd_tier!(["avx512f", "avx2", "fma"] $imp($($arg: $ty),*));
            simd_tier!(["avx2", "fma"] $imp($($arg: $ty),*));
            $imp($($arg),*)
        }
    };
}

pub mod attention;
pub mod blocks;
pub mod clip;
pub mod cpu_activation;
pub mod cpu_attention;
pub mod cpu_conv;
pub mod cpu_half_linear;
pub mod cpu_int8_tiles;
pub mod cpu_norm;
pub mod cpu_pointwise;
pub mod cpu_quantized_linear;
pub mod cpu_util;
pub mod cpu_winograd;
pub mod dit;
pub mod flux;
pub mod mmdit;
pub mod quantized;
pub mod t5;
pub mod unet;
pub mod vae;

/// Bytes a tensor's elements take.
pub(crate) fn tensor_bytes(t: &candle_core::Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// The largest absolute difference between two tensors of one shape (kernel tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).expect("comparable tensors"))
}

/// The largest absolute value of an f32 tensor (kernel tests' limits).
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("an f32 tensor")
}
