//! The BLAS kernel the data runtime leaves to the host: OpenBLAS's double-precision GEMM
//! micro-kernel, `C += alpha * A * B` on packed panels, imported as
//! `capsule_blas.dgemm_kernel` and computed here, natively, on the sandbox's memory.
//!
//! Why: Wasm has 128-bit SIMD and no fused multiply-add, so a matrix product in Wasm runs
//! ~8x slower than native OpenBLAS on a CPU with AVX-512. Every level-3 routine in double
//! precision (and LAPACK's blocked factorisations above them) spends its time in this one
//! kernel; OpenBLAS's drivers, its packing and everything else stay in the sandbox.
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

use std::ops::Range;

use python_runtime::{BLAS_MODULE, exports, imports};
use wasmtime::{Caller, Extern, Linker, Trap};

// Wasm memory is little-endian; the operands are read in place as the host's f64.
const _: () = assert!(cfg!(target_endian = "little"), "the BLAS kernel reads Wasm memory as native f64");

/// Width of OpenBLAS's packed panels (`DGEMM_DEFAULT_UNROLL_M/N` in the runtime's OpenBLAS
/// patch); the last panels of a dimension are 4, 2 and 1 wide, as it needs.
const PANEL: usize = 8;

pub(crate) fn add_to_linker<T: 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.func_wrap(
        BLAS_MODULE,
        imports::DGEMM_KERNEL,
        |mut caller: Caller<'_, T>,
         m: i32,
         n: i32,
         k: i32,
         alpha: f64,
         a: i32,
         b: i32,
         c: i32,
         ldc: i32|
         -> wasmtime::Result<()> {
            let shape = Shape::new(m, n, k, ldc)?;
            charge_fuel(&mut caller, shape.multiply_adds())?;
            let Some(Extern::Memory(memory)) = caller.get_export(exports::MEMORY) else {
                return Err(kernel_error("the module exports no memory".to_string()));
            };
            let (a, b, c) = shape.operands(memory.data_mut(&mut caller), a as u32, b as u32, c as u32)?;
            dgemm(shape, alpha, a, b, c);
            Ok(())
        },
    )?;
    Ok(())
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
    fn new(m: i32, n: i32, k: i32, ldc: i32) -> wasmtime::Result<Self> {
        let size = |value: i32, name: &str| {
            usize::try_from(value).map_err(|_| kernel_error(format!("{name} = {value} is negative")))
        };
        let shape = Self { m: size(m, "m")?, n: size(n, "n")?, k: size(k, "k")?, ldc: size(ldc, "ldc")? };
        if shape.n > 1 && shape.ldc < shape.m {
            return Err(kernel_error(format!("ldc = {ldc} is less than m = {m}")));
        }
        Ok(shape)
    }

    fn multiply_adds(self) -> u64 {
        self.m as u64 * self.n as u64 * self.k as u64
    }

    /// A, B and C in `memory` (Wasm addresses `a`, `b`, `c`): in bounds, aligned, and C
    /// apart from A and B.
    fn operands(
        self,
        memory: &mut [u8],
        a: u32,
        b: u32,
        c: u32,
    ) -> wasmtime::Result<(&[f64], &[f64], &mut [f64])> {
        let c_len = if self.m == 0 || self.n == 0 { 0 } else { (self.n - 1) * self.ldc + self.m };
        let a = doubles_at(a, self.m * self.k, memory.len(), "A")?;
        let b = doubles_at(b, self.n * self.k, memory.len(), "B")?;
        let c = doubles_at(c, c_len, memory.len(), "C")?;
        let (below, rest) = memory.split_at_mut(c.start);
        let (c_bytes, above) = rest.split_at_mut(c.len());
        let (below, above) = (&*below, &*above);
        let read = |range: Range<usize>, name: &str| -> wasmtime::Result<&[u8]> {
            if range.is_empty() {
                Ok(&[])
            } else if range.end <= c.start {
                Ok(&below[range])
            } else if range.start >= c.end {
                Ok(&above[range.start - c.end..range.end - c.end])
            } else {
                Err(kernel_error(format!("{name} overlaps C")))
            }
        };
        let (a, b) = (read(a, "A")?, read(b, "B")?);
        let misaligned = || kernel_error("an operand is not aligned to 8 bytes".to_string());
        Ok((as_doubles(a).ok_or_else(misaligned)?, as_doubles(b).ok_or_else(misaligned)?, {
            // SAFETY: every bit pattern is a valid f64 and every f64 a valid byte sequence;
            // `align_to_mut` puts only whole, aligned f64s in the middle part.
            let (head, c, tail) = unsafe { c_bytes.align_to_mut::<f64>() };
            if !head.is_empty() || !tail.is_empty() {
                return Err(misaligned());
            }
            c
        }))
    }
}

/// The byte range of `count` f64s at Wasm address `address`, if inside a memory of `memory_len` bytes.
fn doubles_at(address: u32, count: usize, memory_len: usize, name: &str) -> wasmtime::Result<Range<usize>> {
    let start = address as usize;
    count
        .checked_mul(8)
        .and_then(|len| start.checked_add(len))
        .filter(|end| *end <= memory_len)
        .map(|end| start..end)
        .ok_or_else(|| kernel_error(format!("{name} ({count} doubles at {address:#x}) is outside the sandbox's memory")))
}

fn as_doubles(bytes: &[u8]) -> Option<&[f64]> {
    // SAFETY: every bit pattern is a valid f64; `align_to` puts only whole, aligned f64s in
    // the middle part.
    let (head, doubles, tail) = unsafe { bytes.align_to::<f64>() };
    (head.is_empty() && tail.is_empty()).then_some(doubles)
}

fn kernel_error(message: String) -> wasmtime::Error {
    wasmtime::format_err!("{BLAS_MODULE}.{}: {message}", imports::DGEMM_KERNEL)
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
fn dgemm(shape: Shape, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { x86::dgemm_avx512(shape, alpha, a, b, c) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { x86::dgemm_avx2(shape, alpha, a, b, c) };
        }
    }
    kernel::<false>(shape, alpha, a, b, c);
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

/// Every tile of C, panel by panel. `WIDE` uses `x86::tile_24x8` for rows in threes of full
/// panels; only `x86::dgemm_avx512` sets it.
#[inline(always)]
fn kernel<const WIDE: bool>(shape: Shape, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64]) {
    let Shape { m, n, k, ldc } = shape;
    for (column, width) in panels(n) {
        let b_panel = &b[column * k..][..width * k];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if WIDE && width == PANEL {
            while m - done >= x86::WIDE_ROWS {
                let a_panels = &a[done * k..][..x86::WIDE_ROWS * k];
                // SAFETY: `WIDE` is set only by `x86::dgemm_avx512`, which runs only on CPUs
                // with AVX-512F and FMA.
                unsafe { x86::tile_24x8(k, alpha, a_panels, b_panel, &mut c[column * ldc + done..], ldc) };
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
                        $(($h, $w) => tile::<$h, $w>(k, alpha, a_panel, b_panel, c, ldc),)*
                        _ => unreachable!("panels are 8, 4, 2 or 1 wide"),
                    }
                };
            }
            tiles!(
                (8, 8), (8, 4), (8, 2), (8, 1), (4, 8), (4, 4), (4, 2), (4, 1),
                (2, 8), (2, 4), (2, 2), (2, 1), (1, 8), (1, 4), (1, 2), (1, 1)
            );
        }
    }
}

/// One `H x W` tile of C from an A panel `H` rows high and a B panel `W` columns wide.
#[inline(always)]
fn tile<const H: usize, const W: usize>(k: usize, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64], ldc: usize) {
    let mut sums = [[0.0f64; H]; W];
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
    use std::arch::x86_64::{__m512d, _mm512_fmadd_pd, _mm512_loadu_pd, _mm512_set1_pd, _mm512_setzero_pd, _mm512_storeu_pd};

    use super::{PANEL, Shape, kernel};

    /// Rows of C a wide tile covers: three A panels, 24 of AVX-512's 32 registers as sums.
    pub(super) const WIDE_ROWS: usize = 3 * PANEL;

    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn dgemm_avx512(shape: Shape, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64]) {
        kernel::<true>(shape, alpha, a, b, c);
    }

    /// The plain kernel, vectorised by the compiler for AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dgemm_avx2(shape: Shape, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64]) {
        kernel::<false>(shape, alpha, a, b, c);
    }

    /// A 24 x 8 tile of C: three A panels against one full B panel.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn tile_24x8(k: usize, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64], ldc: usize) {
        assert!(a.len() >= WIDE_ROWS * k && b.len() >= PANEL * k && c.len() >= (PANEL - 1) * ldc + WIDE_ROWS);
        let mut sums: [[__m512d; PANEL]; 3] = [[_mm512_setzero_pd(); PANEL]; 3];
        let panels = [&a[..PANEL * k], &a[PANEL * k..2 * PANEL * k], &a[2 * PANEL * k..3 * PANEL * k]];
        for (step, b) in b.chunks_exact(PANEL).take(k).enumerate() {
            // SAFETY: each panel holds `PANEL * k` doubles (asserted above), so the 8 at
            // `step * PANEL` are inside it.
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
                let start = j * ldc + panel * PANEL;
                let c = &mut c[start..start + PANEL];
                // SAFETY: `c` is 8 doubles long.
                unsafe { _mm512_storeu_pd(c.as_mut_ptr(), _mm512_fmadd_pd(alpha, *sum, _mm512_loadu_pd(c.as_ptr()))) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs the `m x k` matrix `value(i, p)` as OpenBLAS does: panels of rows, `k` steps each.
    fn packed(rows: usize, k: usize, value: impl Fn(usize, usize) -> f64) -> Vec<f64> {
        let mut out = Vec::with_capacity(rows * k);
        for (start, width) in panels(rows) {
            for p in 0..k {
                out.extend((start..start + width).map(|i| value(i, p)));
            }
        }
        out
    }

    /// Values with full mantissas, so that any change in the order of operations shows.
    fn noise(seed: usize) -> impl Fn(usize, usize) -> f64 {
        move |i, p| {
            let x = (i * 7919 + p * 104_729 + seed * 1_299_709) as f64;
            (x * 0.618_033_988_749_894_9).fract() - 0.5
        }
    }

    /// The documented arithmetic, one element at a time.
    fn reference(shape: Shape, alpha: f64, c: &[f64]) -> Vec<f64> {
        let (a, b) = (noise(1), noise(2));
        let mut out = c.to_vec();
        for j in 0..shape.n {
            for i in 0..shape.m {
                let sum = (0..shape.k).fold(0.0f64, |sum, p| a(i, p).mul_add(b(j, p), sum));
                out[j * shape.ldc + i] = alpha.mul_add(sum, c[j * shape.ldc + i]);
            }
        }
        out
    }

    fn run(shape: Shape, alpha: f64, kernel: fn(Shape, f64, &[f64], &[f64], &mut [f64])) {
        let a = packed(shape.m, shape.k, noise(1));
        let b = packed(shape.n, shape.k, noise(2));
        let c: Vec<f64> = (0..(shape.n.max(1) - 1) * shape.ldc + shape.m).map(|i| noise(3)(i, 0)).collect();
        let mut out = c.clone();
        kernel(shape, alpha, &a, &b, &mut out);
        let expected = reference(shape, alpha, &c);
        let same = out.iter().zip(&expected).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{shape:?}: the kernel's result differs from the reference");
    }

    fn shapes() -> impl Iterator<Item = Shape> {
        let sizes = [1, 2, 3, 7, 8, 9, 15, 23, 24, 25, 48, 61];
        sizes.into_iter().flat_map(move |m| {
            sizes.into_iter().flat_map(move |n| {
                [0, 1, 5, 33].into_iter().map(move |k| Shape { m, n, k, ldc: m + n % 3 })
            })
        })
    }

    #[test]
    fn every_shape_gives_the_documented_result_bit_for_bit() {
        for shape in shapes() {
            run(shape, -0.75, dgemm);
            run(shape, 1.0, |shape, alpha, a, b, c| kernel::<false>(shape, alpha, a, b, c));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_paths_agree_with_the_plain_one() {
        for shape in shapes() {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features.
                run(shape, 0.5, |shape, alpha, a, b, c| unsafe { x86::dgemm_avx512(shape, alpha, a, b, c) });
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features.
                run(shape, 0.5, |shape, alpha, a, b, c| unsafe { x86::dgemm_avx2(shape, alpha, a, b, c) });
            }
        }
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
        // A: 32 doubles, B: 8, C: 16.
        assert!(shape.operands(memory, 0, 256, 512).is_ok());
        let error = |a, b, c, memory: &mut [u8]| shape.operands(memory, a, b, c).unwrap_err().to_string();
        assert!(error(0, 256, 1000, memory).contains("C (16 doubles at 0x3e8) is outside"));
        assert!(error(u32::MAX - 3, 256, 512, memory).contains("A (32 doubles at 0xfffffffc) is outside"));
        assert!(error(0, 256, 128, memory).contains("A overlaps C"));
        assert!(error(0, 520, 512, memory).contains("B overlaps C"));
        assert!(error(0, 257, 512, memory).contains("not aligned"));
        assert!(Shape::new(4, 2, 1, 3).unwrap_err().to_string().contains("ldc = 3 is less than m = 4"));
        assert!(Shape::new(-1, 2, 1, 3).unwrap_err().to_string().contains("m = -1 is negative"));
    }
}
