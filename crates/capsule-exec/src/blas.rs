//! The BLAS kernels the data runtime leaves to the host: OpenBLAS's GEMM micro-kernel in
//! double and single precision, `C += alpha * A * B` on packed panels, imported as
//! `capsule_blas.dgemm_kernel` and `capsule_blas.sgemm_kernel` and computed here, natively,
//! on the sandbox's memory.
//!
//! Why: Wasm has 128-bit SIMD and no fused multiply-add, so a matrix product in Wasm runs
//! ~8x slower than native OpenBLAS on a CPU with AVX-512. Every real level-3 routine (and
//! LAPACK's blocked factorisations above them) spends its time in this one kernel;
//! OpenBLAS's drivers, its packing and everything else stay in the sandbox.
//!
//! What a task can rely on:
//! - The same result on every host: each element of C is its products added in order of
//!   `k` with fused multiply-adds, starting from zero, then `alpha * sum + c`, fused. Every
//!   code path below (AVX-512, AVX2, plain) does exactly these operations.
//! - Fuel: one unit per multiply-add, charged before the kernel runs (under time metering
//!   the kernel's time is not counted; the deadline still holds, and one call is bounded by
//!   OpenBLAS's block sizes, a few milliseconds).
//! - Nothing outside the sandbox's memory is read or written: A, B and C are checked
//!   against it, and C may not overlap A or B.

use std::fmt::Debug;
use std::ops::Range;

use python_runtime::{BLAS_MODULE, exports, imports};
use wasmtime::{Caller, Extern, Linker, Trap, WasmTy};

// Wasm memory is little-endian; the operands are read in place as the host's floats.
const _: () = assert!(cfg!(target_endian = "little"), "the BLAS kernels read Wasm memory as native floats");

/// Width of OpenBLAS's packed panels (`?GEMM_DEFAULT_UNROLL_M/N` in the runtime's OpenBLAS
/// patch); the last panels of a dimension are 4, 2 and 1 wide, as it needs.
const PANEL: usize = 8;

pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    add_kernel::<T, f64>(linker, imports::DGEMM_KERNEL)?;
    add_kernel::<T, f32>(linker, imports::SGEMM_KERNEL)
}

fn add_kernel<T: 'static, F: Float>(linker: &mut Linker<T>, name: &'static str) -> wasmtime::Result<()> {
    linker.func_wrap(
        BLAS_MODULE,
        name,
        move |mut caller: Caller<'_, T>,
              m: i32,
              n: i32,
              k: i32,
              alpha: F,
              a: i32,
              b: i32,
              c: i32,
              ldc: i32|
              -> wasmtime::Result<()> {
            let shape = Shape::new(m, n, k, ldc).map_err(|message| kernel_error(name, message))?;
            charge_fuel(&mut caller, shape.multiply_adds())?;
            let Some(Extern::Memory(memory)) = caller.get_export(exports::MEMORY) else {
                return Err(kernel_error(name, "the module exports no memory".to_string()));
            };
            let Operands { a, b, c } = shape
                .operands(memory.data_mut(&mut caller), a as u32, b as u32, c as u32)
                .map_err(|message| kernel_error(name, message))?;
            gemm(shape, alpha, a, b, c);
            Ok(())
        },
    )?;
    Ok(())
}

/// The two element types. Private: the kernels read them from any bytes of guest memory,
/// which is sound only for types where every bit pattern is a value.
trait Float: Copy + Debug + Send + Sync + WasmTy + 'static {
    const ZERO: Self;
    /// `self * a + b` with one rounding.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// A 24 x 8 tile of C: three A panels against one full B panel.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX-512VL and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_24x8(k: usize, alpha: Self, a: &[Self], b: &[Self], c: &mut [Self], ldc: usize);
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_24x8(k: usize, alpha: Self, a: &[Self], b: &[Self], c: &mut [Self], ldc: usize) {
        // SAFETY: the caller has checked the CPU's features.
        unsafe { x86::tile_24x8_f64(k, alpha, a, b, c, ldc) }
    }
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_24x8(k: usize, alpha: Self, a: &[Self], b: &[Self], c: &mut [Self], ldc: usize) {
        // SAFETY: the caller has checked the CPU's features.
        unsafe { x86::tile_24x8_f32(k, alpha, a, b, c, ldc) }
    }
}

/// One kernel call's dimensions: A is `m x k`, B is `k x n`, C is `m x n` with columns `ldc`
/// apart.
#[derive(Clone, Copy, Debug)]
struct Shape {
    m: usize,
    n: usize,
    k: usize,
    ldc: usize,
}

impl Shape {
    fn new(m: i32, n: i32, k: i32, ldc: i32) -> Result<Self, String> {
        let size = |value: i32, name: &str| usize::try_from(value).map_err(|_| format!("{name} = {value} is negative"));
        let shape = Self { m: size(m, "m")?, n: size(n, "n")?, k: size(k, "k")?, ldc: size(ldc, "ldc")? };
        if shape.n > 1 && shape.ldc < shape.m {
            return Err(format!("ldc = {ldc} is less than m = {m}"));
        }
        Ok(shape)
    }

    fn multiply_adds(self) -> u64 {
        self.m as u64 * self.n as u64 * self.k as u64
    }

    /// A, B and C in `memory` (Wasm addresses `a`, `b`, `c`): in bounds, aligned, and C
    /// apart from A and B.
    fn operands<F: Float>(self, memory: &mut [u8], a: u32, b: u32, c: u32) -> Result<Operands<'_, F>, String> {
        let c_len = if self.m == 0 || self.n == 0 { 0 } else { (self.n - 1) * self.ldc + self.m };
        let a = elements_at::<F>(a, self.m * self.k, memory.len(), "A")?;
        let b = elements_at::<F>(b, self.n * self.k, memory.len(), "B")?;
        let c = elements_at::<F>(c, c_len, memory.len(), "C")?;
        let (below, rest) = memory.split_at_mut(c.start);
        let (c_bytes, above) = rest.split_at_mut(c.len());
        let (below, above) = (&*below, &*above);
        let read = |range: Range<usize>, name: &str| -> Result<&[u8], String> {
            if range.is_empty() {
                Ok(&[])
            } else if range.end <= c.start {
                Ok(&below[range])
            } else if range.start >= c.end {
                Ok(&above[range.start - c.end..range.end - c.end])
            } else {
                Err(format!("{name} overlaps C"))
            }
        };
        let misaligned = || format!("an operand is not aligned to {} bytes", size_of::<F>());
        let a = as_floats(read(a, "A")?).ok_or_else(misaligned)?;
        let b = as_floats(read(b, "B")?).ok_or_else(misaligned)?;
        // SAFETY: `F` is f32 or f64, for which every bit pattern is a value; `align_to_mut`
        // puts only whole, aligned elements in the middle part.
        let (head, c, tail) = unsafe { c_bytes.align_to_mut::<F>() };
        if !head.is_empty() || !tail.is_empty() {
            return Err(misaligned());
        }
        Ok(Operands { a, b, c })
    }
}

/// A kernel call's matrices, in the sandbox's memory.
struct Operands<'m, F> {
    a: &'m [F],
    b: &'m [F],
    c: &'m mut [F],
}

/// The byte range of `count` elements at Wasm address `address`, if inside a memory of
/// `memory_len` bytes.
fn elements_at<F>(address: u32, count: usize, memory_len: usize, name: &str) -> Result<Range<usize>, String> {
    let start = address as usize;
    count
        .checked_mul(size_of::<F>())
        .and_then(|len| start.checked_add(len))
        .filter(|end| *end <= memory_len)
        .map(|end| start..end)
        .ok_or_else(|| format!("{name} ({count} elements at {address:#x}) is outside the sandbox's memory"))
}

fn as_floats<F: Float>(bytes: &[u8]) -> Option<&[F]> {
    // SAFETY: `F` is f32 or f64, for which every bit pattern is a value; `align_to` puts
    // only whole, aligned elements in the middle part.
    let (head, floats, tail) = unsafe { bytes.align_to::<F>() };
    (head.is_empty() && tail.is_empty()).then_some(floats)
}

fn kernel_error(name: &str, message: String) -> wasmtime::Error {
    wasmtime::format_err!("{BLAS_MODULE}.{name}: {message}")
}

/// Takes `cost` from the store's fuel, or stops the task as out of fuel. Under time metering
/// the store has no fuel to take.
fn charge_fuel<T>(caller: &mut Caller<'_, T>, cost: u64) -> wasmtime::Result<()> {
    let Ok(left) = caller.get_fuel() else {
        return Ok(());
    };
    if cost > left {
        caller.set_fuel(0)?;
        return Err(Trap::OutOfFuel.into());
    }
    caller.set_fuel(left - cost)
}

/// `c += alpha * a * b` with the widest code this CPU runs.
fn gemm<F: Float>(shape: Shape, alpha: F, a: &[F], b: &[F], c: &mut [F]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { x86::gemm_avx512(shape, alpha, a, b, c) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { x86::gemm_avx2(shape, alpha, a, b, c) };
        }
    }
    kernel::<F, false>(shape, alpha, a, b, c);
}

/// The panels of a dimension of `len`: `(start, width)`, full panels first, then 4, 2, 1.
fn panels(len: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = len / PANEL * PANEL;
    let remainders = [4, 2, 1].into_iter().filter(move |width| len & width != 0).scan(full, |start, width| {
        let panel = (*start, width);
        *start += width;
        Some(panel)
    });
    (0..full).step_by(PANEL).map(|start| (start, PANEL)).chain(remainders)
}

/// Every tile of C, panel by panel. `WIDE` uses [`Float::tile_24x8`] for rows in threes of
/// full panels; only `x86::gemm_avx512` sets it.
#[inline(always)]
fn kernel<F: Float, const WIDE: bool>(shape: Shape, alpha: F, a: &[F], b: &[F], c: &mut [F]) {
    let Shape { m, n, k, ldc } = shape;
    for (column, width) in panels(n) {
        let b_panel = &b[column * k..][..width * k];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if WIDE && width == PANEL {
            while m - done >= x86::WIDE_ROWS {
                let a_panels = &a[done * k..][..x86::WIDE_ROWS * k];
                // SAFETY: `WIDE` is set only by `x86::gemm_avx512`, which runs only on CPUs
                // with AVX-512F, AVX-512VL and FMA.
                unsafe { F::tile_24x8(k, alpha, a_panels, b_panel, &mut c[column * ldc + done..], ldc) };
                done += x86::WIDE_ROWS;
            }
        }
        for (start, height) in panels(m - done) {
            let row = done + start;
            let a_panel = &a[row * k..][..height * k];
            let c = &mut c[column * ldc + row..];
            macro_rules! tiles {
                ($(($h:literal, $w:literal)),*) => {
                    match (height, width) {
                        $(($h, $w) => tile::<F, $h, $w>(k, alpha, a_panel, b_panel, c, ldc),)*
                        _ => unreachable!("panels are 8, 4, 2 or 1 wide"),
                    }
                };
            }
            tiles!(
                (8, 8),
                (8, 4),
                (8, 2),
                (8, 1),
                (4, 8),
                (4, 4),
                (4, 2),
                (4, 1),
                (2, 8),
                (2, 4),
                (2, 2),
                (2, 1),
                (1, 8),
                (1, 4),
                (1, 2),
                (1, 1)
            );
        }
    }
}

/// One `H x W` tile of C from an A panel `H` rows high and a B panel `W` columns wide.
#[inline(always)]
fn tile<F: Float, const H: usize, const W: usize>(k: usize, alpha: F, a: &[F], b: &[F], c: &mut [F], ldc: usize) {
    let mut sums = [[F::ZERO; H]; W];
    for (a, b) in a.chunks_exact(H).zip(b.chunks_exact(W)).take(k) {
        for (sums, b) in sums.iter_mut().zip(b) {
            for (sum, a) in sums.iter_mut().zip(a) {
                *sum = a.mul_add(*b, *sum);
            }
        }
    }
    for (j, sums) in sums.iter().enumerate() {
        for (c, sum) in c[j * ldc..][..H].iter_mut().zip(sums) {
            *c = alpha.mul_add(*sum, *c);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256, __m512d, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
        _mm512_fmadd_pd, _mm512_loadu_pd, _mm512_set1_pd, _mm512_setzero_pd, _mm512_storeu_pd,
    };

    use super::{Float, PANEL, Shape, kernel};

    /// Rows of C a wide tile covers: three A panels, 24 of AVX-512's 32 registers as sums.
    pub(super) const WIDE_ROWS: usize = 3 * PANEL;

    #[target_feature(enable = "avx512f,avx512vl,fma")]
    pub(super) fn gemm_avx512<F: Float>(shape: Shape, alpha: F, a: &[F], b: &[F], c: &mut [F]) {
        kernel::<F, true>(shape, alpha, a, b, c);
    }

    /// The plain kernel, vectorised by the compiler for AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gemm_avx2<F: Float>(shape: Shape, alpha: F, a: &[F], b: &[F], c: &mut [F]) {
        kernel::<F, false>(shape, alpha, a, b, c);
    }

    /// Three A panels and the C block of a wide tile, checked once so the loops below index
    /// nothing out of bounds.
    fn wide_operands<'a, F>(k: usize, a: &'a [F], b: &[F], c: &[F], ldc: usize) -> [&'a [F]; 3] {
        assert!(a.len() >= WIDE_ROWS * k && b.len() >= PANEL * k && c.len() >= (PANEL - 1) * ldc + WIDE_ROWS);
        [&a[..PANEL * k], &a[PANEL * k..2 * PANEL * k], &a[2 * PANEL * k..3 * PANEL * k]]
    }

    /// Double precision: each panel row is one 512-bit register.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn tile_24x8_f64(k: usize, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64], ldc: usize) {
        let panels = wide_operands(k, a, b, c, ldc);
        let mut sums: [[__m512d; PANEL]; 3] = [[_mm512_setzero_pd(); PANEL]; 3];
        for (step, b) in b.chunks_exact(PANEL).take(k).enumerate() {
            // SAFETY: each panel holds `PANEL * k` elements, so the 8 at `step * PANEL` are in it.
            let rows = panels.map(|panel| unsafe { _mm512_loadu_pd(panel.as_ptr().add(step * PANEL)) });
            for (j, b) in b.iter().enumerate() {
                let b = _mm512_set1_pd(*b);
                for (sums, rows) in sums.iter_mut().zip(rows) {
                    sums[j] = _mm512_fmadd_pd(rows, b, sums[j]);
                }
            }
        }
        let alpha = _mm512_set1_pd(alpha);
        for (panel, sums) in sums.iter().enumerate() {
            for (j, sum) in sums.iter().enumerate() {
                let c = &mut c[j * ldc + panel * PANEL..][..PANEL];
                // SAFETY: `c` is 8 elements long.
                unsafe { _mm512_storeu_pd(c.as_mut_ptr(), _mm512_fmadd_pd(alpha, *sum, _mm512_loadu_pd(c.as_ptr()))) };
            }
        }
    }

    /// Single precision: each panel row is one 256-bit register (AVX-512VL gives 32 of them).
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    pub(super) fn tile_24x8_f32(k: usize, alpha: f32, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize) {
        let panels = wide_operands(k, a, b, c, ldc);
        let mut sums: [[__m256; PANEL]; 3] = [[_mm256_setzero_ps(); PANEL]; 3];
        for (step, b) in b.chunks_exact(PANEL).take(k).enumerate() {
            // SAFETY: each panel holds `PANEL * k` elements, so the 8 at `step * PANEL` are in it.
            let rows = panels.map(|panel| unsafe { _mm256_loadu_ps(panel.as_ptr().add(step * PANEL)) });
            for (j, b) in b.iter().enumerate() {
                let b = _mm256_set1_ps(*b);
                for (sums, rows) in sums.iter_mut().zip(rows) {
                    sums[j] = _mm256_fmadd_ps(rows, b, sums[j]);
                }
            }
        }
        let alpha = _mm256_set1_ps(alpha);
        for (panel, sums) in sums.iter().enumerate() {
            for (j, sum) in sums.iter().enumerate() {
                let c = &mut c[j * ldc + panel * PANEL..][..PANEL];
                // SAFETY: `c` is 8 elements long.
                unsafe { _mm256_storeu_ps(c.as_mut_ptr(), _mm256_fmadd_ps(alpha, *sum, _mm256_loadu_ps(c.as_ptr()))) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test values of each element type, with full mantissas, so that any change in the order
    /// of operations shows.
    trait Noise: Float + PartialEq {
        fn from_f64(value: f64) -> Self;
    }
    impl Noise for f64 {
        fn from_f64(value: f64) -> Self {
            value
        }
    }
    impl Noise for f32 {
        fn from_f64(value: f64) -> Self {
            value as f32
        }
    }

    fn noise<F: Noise>(seed: usize) -> impl Fn(usize, usize) -> F {
        move |i, p| {
            let x = (i * 7919 + p * 104_729 + seed * 1_299_709) as f64;
            F::from_f64((x * 0.618_033_988_749_894_9).fract() - 0.5)
        }
    }

    /// Packs the `rows x k` matrix `value(i, p)` as OpenBLAS does: panels of rows, `k` steps each.
    fn packed<F: Noise>(rows: usize, k: usize, value: impl Fn(usize, usize) -> F) -> Vec<F> {
        let mut out = Vec::with_capacity(rows * k);
        for (start, width) in panels(rows) {
            for p in 0..k {
                out.extend((start..start + width).map(|i| value(i, p)));
            }
        }
        out
    }

    /// The documented arithmetic, one element at a time.
    fn reference<F: Noise>(shape: Shape, alpha: F, c: &[F]) -> Vec<F> {
        let (a, b) = (noise::<F>(1), noise::<F>(2));
        let mut out = c.to_vec();
        for j in 0..shape.n {
            for i in 0..shape.m {
                let sum = (0..shape.k).fold(F::ZERO, |sum, p| a(i, p).mul_add(b(j, p), sum));
                out[j * shape.ldc + i] = alpha.mul_add(sum, c[j * shape.ldc + i]);
            }
        }
        out
    }

    fn run<F: Noise>(shape: Shape, alpha: F, kernel: fn(Shape, F, &[F], &[F], &mut [F])) {
        let a = packed(shape.m, shape.k, noise::<F>(1));
        let b = packed(shape.n, shape.k, noise::<F>(2));
        let c: Vec<F> = (0..(shape.n.max(1) - 1) * shape.ldc + shape.m).map(|i| noise::<F>(3)(i, 0)).collect();
        let mut out = c.clone();
        kernel(shape, alpha, &a, &b, &mut out);
        // Finite values: `==` fails on any difference in rounding.
        assert!(out == reference(shape, alpha, &c), "{shape:?}: the kernel's result differs from the reference");
    }

    fn shapes() -> impl Iterator<Item = Shape> {
        let sizes = [1, 2, 3, 7, 8, 9, 15, 23, 24, 25, 48, 61];
        sizes.into_iter().flat_map(move |m| {
            sizes
                .into_iter()
                .flat_map(move |n| [0, 1, 5, 33].into_iter().map(move |k| Shape { m, n, k, ldc: m + n % 3 }))
        })
    }

    fn every_path<F: Noise>(alpha: f64) {
        for shape in shapes() {
            run(shape, F::from_f64(alpha), gemm);
            run(shape, F::from_f64(alpha), kernel::<F, false>);
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features.
                    run(shape, F::from_f64(alpha), |shape, alpha, a, b, c| unsafe {
                        x86::gemm_avx512(shape, alpha, a, b, c)
                    });
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features.
                    run(shape, F::from_f64(alpha), |shape, alpha, a, b, c| unsafe {
                        x86::gemm_avx2(shape, alpha, a, b, c)
                    });
                }
            }
        }
    }

    #[test]
    fn every_path_gives_the_documented_result_bit_for_bit_in_double_precision() {
        every_path::<f64>(-0.75);
    }

    #[test]
    fn every_path_gives_the_documented_result_bit_for_bit_in_single_precision() {
        every_path::<f32>(1.5);
    }

    #[test]
    fn panels_follow_openblas_packing() {
        assert_eq!(panels(0).collect::<Vec<_>>(), []);
        assert_eq!(panels(23).collect::<Vec<_>>(), [(0, 8), (8, 8), (16, 4), (20, 2), (22, 1)]);
        assert_eq!(panels(6).collect::<Vec<_>>(), [(0, 4), (4, 2)]);
    }

    #[test]
    fn operands_stay_inside_memory_and_apart() {
        let shape = Shape::new(8, 2, 4, 8).unwrap();
        let mut buffer = vec![0u8; 1032];
        let skew = buffer.as_ptr().align_offset(8);
        let memory = &mut buffer[skew..skew + 1024];
        let error = |a, b, c, memory: &mut [u8]| shape.operands::<f64>(memory, a, b, c).err().unwrap();
        // A: 32 doubles, B: 8, C: 16.
        assert!(shape.operands::<f64>(memory, 0, 256, 512).is_ok());
        assert!(error(0, 256, 1000, memory).contains("C (16 elements at 0x3e8) is outside"));
        assert!(error(u32::MAX - 3, 256, 512, memory).contains("A (32 elements at 0xfffffffc) is outside"));
        assert!(error(0, 256, 128, memory).contains("A overlaps C"));
        assert!(error(0, 520, 512, memory).contains("B overlaps C"));
        assert!(error(0, 257, 512, memory).contains("not aligned to 8 bytes"));
        // Single precision: 4-byte alignment suffices.
        assert!(shape.operands::<f32>(memory, 4, 260, 516).is_ok());
        assert!(shape.operands::<f32>(memory, 0, 258, 512).err().unwrap().contains("not aligned to 4 bytes"));
        assert!(Shape::new(4, 2, 1, 3).unwrap_err().contains("ldc = 3 is less than m = 4"));
        assert!(Shape::new(-1, 2, 1, 3).unwrap_err().contains("m = -1 is negative"));
    }
}
