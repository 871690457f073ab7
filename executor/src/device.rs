//! What the stream runner ([`crate::streams`]) asks of a device: streams
//! that run work in order, events that order one stream after another and
//! time them, and the handful of kernels the model needs (a GEMM, tanh, its
//! gradient, an in-place add, a copy).
//!
//! Two devices implement it: the CUDA one ([`crate::cuda`], feature
//! `cuda`) and [`HostDevice`], which runs every operation at once on the
//! host with the same arithmetic as [`crate::model`]. The host device is
//! how the stream runner's logic — which stream waits for which event,
//! who copies what, when a buffer may go — is tested on machines without
//! a GPU: its gradients must equal a sequential run's bit for bit.

use crate::model::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Why a device operation failed, in words.
pub type DeviceResult<T> = Result<T, String>;

/// A device with in-order streams and events. Matrices are row-major f32;
/// operations are enqueued on a stream and may finish later, so a buffer
/// made on one stream is read on another only after that stream waits for
/// an event recorded after the write.
pub trait Device: Sync {
    /// An in-order queue of work (with whatever per-queue handles the
    /// device needs, such as a cuBLAS handle).
    type Stream: Send + Sync;
    /// A buffer of f32 on the device.
    type Buffer: Send + Sync;
    /// A point in a stream's work.
    type Event: Send + Sync;

    /// A new stream; `gemm` says whether GEMMs will be enqueued on it.
    fn new_stream(&self, gemm: bool) -> DeviceResult<Self::Stream>;
    /// Copies host values to a new buffer.
    fn upload(&self, on: &Self::Stream, data: &[f32]) -> DeviceResult<Self::Buffer>;
    /// Copies a buffer back to the host, waiting for the stream.
    fn download(&self, on: &Self::Stream, buffer: &Self::Buffer) -> DeviceResult<Vec<f32>>;
    /// `op(a) · op(b)` for row-major `a` (`a_shape` = rows, columns) and
    /// `b`, where `op` transposes when asked.
    fn gemm(
        &self,
        on: &Self::Stream,
        a: (&Self::Buffer, (usize, usize), bool),
        b: (&Self::Buffer, (usize, usize), bool),
    ) -> DeviceResult<Self::Buffer>;
    /// `tanh` of `n` values.
    fn tanh(&self, on: &Self::Stream, x: &Self::Buffer, n: usize) -> DeviceResult<Self::Buffer>;
    /// `g ⊙ (1 − z²)` over `n` values: the gradient through a tanh whose output was `z`.
    fn tanh_grad(&self, on: &Self::Stream, g: &Self::Buffer, z: &Self::Buffer, n: usize) -> DeviceResult<Self::Buffer>;
    /// `n` zeros.
    fn zeros(&self, on: &Self::Stream, n: usize) -> DeviceResult<Self::Buffer>;
    /// `acc += x` over `n` values.
    fn add_into(&self, on: &Self::Stream, acc: &mut Self::Buffer, x: &Self::Buffer, n: usize) -> DeviceResult<()>;
    /// A copy of `n` values into a new buffer (device to device).
    fn copy(&self, on: &Self::Stream, src: &Self::Buffer, n: usize) -> DeviceResult<Self::Buffer>;
    /// An event after the work enqueued so far; `timed` events can be measured.
    fn record(&self, on: &Self::Stream, timed: bool) -> DeviceResult<Self::Event>;
    /// Makes later work on `on` wait for `event`.
    fn wait(&self, on: &Self::Stream, event: &Self::Event) -> DeviceResult<()>;
    /// Whether the work before `event` has finished (without waiting).
    fn is_complete(&self, event: &Self::Event) -> DeviceResult<bool>;
    /// Waits until the stream's work has finished.
    fn synchronize(&self, on: &Self::Stream) -> DeviceResult<()>;
    /// Seconds from `start` to `end` (both timed, both finished).
    fn seconds_between(&self, start: &Self::Event, end: &Self::Event) -> DeviceResult<f64>;
}

/// A row-major GEMM `C = op(A)·op(B)` said as the column-major call BLAS
/// libraries take (`sgemm(transa, transb, m, n, k, A', lda, B', ldb, C, ldc)`
/// with `A'` = the buffer of B and `B'` = the buffer of A): a row-major
/// buffer read column-major is its transpose, so `Cᵀ = op(B)ᵀ·op(A)ᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnMajorGemm {
    /// Whether BLAS transposes its first operand (the buffer of B).
    pub transa: bool,
    /// Whether BLAS transposes its second operand (the buffer of A).
    pub transb: bool,
    /// Rows of BLAS's result: the columns of C.
    pub m: usize,
    /// Columns of BLAS's result: the rows of C.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// Leading dimension of the buffer of B (its row length).
    pub lda: usize,
    /// Leading dimension of the buffer of A (its row length).
    pub ldb: usize,
    /// Leading dimension of C (its row length).
    pub ldc: usize,
}

impl ColumnMajorGemm {
    /// The call for row-major `op(a)·op(b)`, with `a` of `a_shape` (rows,
    /// columns) transposed when `ta`, likewise `b`; an error when the inner
    /// dimensions differ.
    pub fn for_row_major(a_shape: (usize, usize), ta: bool, b_shape: (usize, usize), tb: bool) -> DeviceResult<Self> {
        let ((ar, ac), (br, bc)) = (a_shape, b_shape);
        let (rows, k) = if ta { (ac, ar) } else { (ar, ac) };
        let (k2, cols) = if tb { (bc, br) } else { (br, bc) };
        if k != k2 {
            return Err(format!("GEMM of {rows}×{k} by {k2}×{cols}"));
        }
        Ok(ColumnMajorGemm { transa: tb, transb: ta, m: cols, n: rows, k, lda: bc, ldb: ac, ldc: cols })
    }
}

/// The host as a device: every operation runs when it is enqueued, with
/// [`crate::model`]'s arithmetic, so results are bit for bit the CPU
/// backend's. It also checks what a GPU would not: every read of a buffer
/// must be ordered after its write — on the same stream, or after a wait
/// for an event recorded after the write (vector clocks per stream) — so
/// a missing wait in the stream runner is an error here rather than a
/// rare wrong number on a GPU.
#[derive(Debug, Default)]
pub struct HostDevice {
    streams: AtomicUsize,
}

/// A stream of the host device: its number and what it has seen of every
/// stream (a vector clock).
#[derive(Debug)]
pub struct HostStream {
    id: usize,
    clock: Mutex<HashMap<usize, u64>>,
}

/// A buffer of the host device and the operation that last wrote it.
#[derive(Debug, Clone)]
pub struct HostBuffer {
    data: Vec<f32>,
    stream: usize,
    op: u64,
}

/// An event of the host device: when it was recorded, and its stream's clock then.
#[derive(Debug, Clone)]
pub struct HostEvent {
    at: Instant,
    clock: HashMap<usize, u64>,
}

impl HostDevice {
    /// A host device with no streams yet.
    pub fn new() -> HostDevice {
        HostDevice::default()
    }

    /// The next operation of `on`.
    fn tick(on: &HostStream) -> DeviceResult<u64> {
        let mut clock = on.clock.lock().map_err(|_| "a stream's clock is poisoned".to_string())?;
        let op = clock.entry(on.id).or_insert(0);
        *op += 1;
        Ok(*op)
    }

    /// Fails unless `on` has seen the write of `b`.
    fn check_read(on: &HostStream, b: &HostBuffer) -> DeviceResult<()> {
        if b.stream == on.id {
            return Ok(());
        }
        let clock = on.clock.lock().map_err(|_| "a stream's clock is poisoned".to_string())?;
        let seen = clock.get(&b.stream).copied().unwrap_or(0);
        if seen < b.op {
            return Err(format!(
                "stream {} reads a buffer that stream {} writes in its operation {} without waiting for it \
                 (it has waited up to operation {seen})",
                on.id, b.stream, b.op
            ));
        }
        Ok(())
    }

    fn write(on: &HostStream, data: Vec<f32>) -> DeviceResult<HostBuffer> {
        Ok(HostBuffer { data, stream: on.id, op: HostDevice::tick(on)? })
    }
}

fn tensor(data: &[f32], (rows, cols): (usize, usize)) -> Tensor {
    Tensor { rows, cols, data: data.to_vec() }
}

impl Device for HostDevice {
    type Stream = HostStream;
    type Buffer = HostBuffer;
    type Event = HostEvent;

    fn new_stream(&self, _gemm: bool) -> DeviceResult<HostStream> {
        let id = self.streams.fetch_add(1, Ordering::SeqCst);
        Ok(HostStream { id, clock: Mutex::new(HashMap::new()) })
    }

    fn upload(&self, on: &HostStream, data: &[f32]) -> DeviceResult<HostBuffer> {
        HostDevice::write(on, data.to_vec())
    }

    fn download(&self, on: &HostStream, buffer: &HostBuffer) -> DeviceResult<Vec<f32>> {
        HostDevice::check_read(on, buffer)?;
        Ok(buffer.data.clone())
    }

    fn gemm(
        &self,
        on: &HostStream,
        (a, a_shape, ta): (&HostBuffer, (usize, usize), bool),
        (b, b_shape, tb): (&HostBuffer, (usize, usize), bool),
    ) -> DeviceResult<HostBuffer> {
        HostDevice::check_read(on, a)?;
        HostDevice::check_read(on, b)?;
        let (a, b) = (tensor(&a.data, a_shape), tensor(&b.data, b_shape));
        let a = if ta { a.t() } else { a };
        let b = if tb { b.t() } else { b };
        if a.cols != b.rows {
            return Err(format!("GEMM of {}×{} by {}×{}", a.rows, a.cols, b.rows, b.cols));
        }
        HostDevice::write(on, a.matmul(&b).data)
    }

    fn tanh(&self, on: &HostStream, x: &HostBuffer, n: usize) -> DeviceResult<HostBuffer> {
        HostDevice::check_read(on, x)?;
        HostDevice::write(on, x.data[..n].iter().map(|v| v.tanh()).collect())
    }

    fn tanh_grad(&self, on: &HostStream, g: &HostBuffer, z: &HostBuffer, n: usize) -> DeviceResult<HostBuffer> {
        HostDevice::check_read(on, g)?;
        HostDevice::check_read(on, z)?;
        HostDevice::write(on, g.data[..n].iter().zip(&z.data[..n]).map(|(g, v)| g * (1.0 - v * v)).collect())
    }

    fn zeros(&self, on: &HostStream, n: usize) -> DeviceResult<HostBuffer> {
        HostDevice::write(on, vec![0.0; n])
    }

    fn add_into(&self, on: &HostStream, acc: &mut HostBuffer, x: &HostBuffer, n: usize) -> DeviceResult<()> {
        HostDevice::check_read(on, acc)?;
        HostDevice::check_read(on, x)?;
        for (a, b) in acc.data[..n].iter_mut().zip(&x.data[..n]) {
            *a += *b;
        }
        acc.stream = on.id;
        acc.op = HostDevice::tick(on)?;
        Ok(())
    }

    fn copy(&self, on: &HostStream, src: &HostBuffer, n: usize) -> DeviceResult<HostBuffer> {
        HostDevice::check_read(on, src)?;
        HostDevice::write(on, src.data[..n].to_vec())
    }

    fn record(&self, on: &HostStream, _timed: bool) -> DeviceResult<HostEvent> {
        let clock = on.clock.lock().map_err(|_| "a stream's clock is poisoned".to_string())?.clone();
        Ok(HostEvent { at: Instant::now(), clock })
    }

    fn wait(&self, on: &HostStream, event: &HostEvent) -> DeviceResult<()> {
        let mut clock = on.clock.lock().map_err(|_| "a stream's clock is poisoned".to_string())?;
        for (stream, op) in &event.clock {
            let seen = clock.entry(*stream).or_insert(0);
            *seen = (*seen).max(*op);
        }
        Ok(())
    }

    fn is_complete(&self, _event: &HostEvent) -> DeviceResult<bool> {
        Ok(true)
    }

    fn synchronize(&self, _on: &HostStream) -> DeviceResult<()> {
        Ok(())
    }

    fn seconds_between(&self, start: &HostEvent, end: &HostEvent) -> DeviceResult<f64> {
        Ok(end.at.saturating_duration_since(start.at).as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::ColumnMajorGemm;
    use crate::model::Tensor;

    /// BLAS's sgemm as its reference defines it: column-major, `C = op(A)·op(B)`.
    fn sgemm(g: &ColumnMajorGemm, a: &[f32], b: &[f32]) -> Vec<f32> {
        let at = |i: usize, l: usize| if g.transa { a[l + i * g.lda] } else { a[i + l * g.lda] };
        let bt = |l: usize, j: usize| if g.transb { b[j + l * g.ldb] } else { b[l + j * g.ldb] };
        let mut c = vec![0.0; g.ldc * g.n];
        for j in 0..g.n {
            for i in 0..g.m {
                c[i + j * g.ldc] = (0..g.k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        c
    }

    fn matrix(rows: usize, cols: usize, seed: f32) -> Tensor {
        Tensor { rows, cols, data: (0..rows * cols).map(|i| (i as f32 * 0.37 + seed).sin()).collect() }
    }

    /// The four transpose cases the model uses, on rectangular shapes, give
    /// the row-major product.
    #[test]
    fn the_column_major_call_computes_the_row_major_product() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (m, k, n) = (3, 5, 4);
            let a = if ta { matrix(k, m, 0.1) } else { matrix(m, k, 0.1) };
            let b = if tb { matrix(n, k, 0.2) } else { matrix(k, n, 0.2) };
            let g = ColumnMajorGemm::for_row_major((a.rows, a.cols), ta, (b.rows, b.cols), tb).expect("shapes fit");
            let expected = (if ta { a.t() } else { a.clone() }).matmul(&if tb { b.t() } else { b.clone() });
            let got = sgemm(&g, &b.data, &a.data);
            for (x, y) in got.iter().zip(&expected.data) {
                assert!((x - y).abs() < 1e-5, "ta={ta} tb={tb}: {got:?} vs {:?}", expected.data);
            }
        }
        assert!(ColumnMajorGemm::for_row_major((3, 5), false, (4, 2), false).is_err());
    }
}
