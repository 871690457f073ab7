//! The model the CPU backend trains, in Megatron's tensor-parallel form.
//!
//! Every stage is two sublayers — "attention" and "MLP" — each a
//! column-parallel GEMM, a tanh, and a row-parallel GEMM whose partial
//! results the tensor-parallel shards all-reduce:
//!
//! ```text
//! z1_k = tanh(x · A1_k)   h = Σ_k z1_k · B1_k
//! z2_k = tanh(h · A2_k)   y = Σ_k z2_k · B2_k
//! ```
//!
//! and the loss after the last stage is `0.5 · |y|²`. Shard k holds the
//! k-th column block of `A1`, `A2` and the k-th row block of `B1`, `B2`.
//! Sums over shards run in shard order on every path, so a run with any
//! schedule (and the sequential run) produce the same floats. The pieces
//! below are the units of the IR: `attn`, `mlp`, `mlp-dgrad`,
//! `attn-dgrad`, `mlp-wgrad`, `attn-wgrad`.

/// A row-major matrix of f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows × cols` values, row by row.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A zero matrix.
    pub fn zeros(rows: usize, cols: usize) -> Tensor {
        Tensor { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Tensor) -> Tensor {
        let mut out = Tensor::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.data[i * self.cols + k];
                for j in 0..other.cols {
                    out.data[i * other.cols + j] += a * other.data[k * other.cols + j];
                }
            }
        }
        out
    }

    /// The transpose.
    pub fn t(&self) -> Tensor {
        let mut out = Tensor::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        out
    }

    /// Element-wise map.
    pub fn map(&self, f: impl Fn(f32) -> f32) -> Tensor {
        Tensor { rows: self.rows, cols: self.cols, data: self.data.iter().map(|v| f(*v)).collect() }
    }

    /// `self += other`.
    pub fn add_assign(&mut self, other: &Tensor) {
        if self.data.is_empty() {
            *self = Tensor::zeros(other.rows, other.cols);
        }
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += *b;
        }
    }
}

/// The sum of per-shard partial results, in shard order: the all-reduce.
pub fn sum_in_shard_order(partials: &[Tensor]) -> Tensor {
    let mut total = Tensor::zeros(partials[0].rows, partials[0].cols);
    for p in partials {
        total.add_assign(p);
    }
    total
}

/// Deterministic pseudo-random values in [-0.5, 0.5) (xorshift64*).
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn value(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        bits as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn tensor(&mut self, rows: usize, cols: usize) -> Tensor {
        Tensor { rows, cols, data: (0..rows * cols).map(|_| self.value()).collect() }
    }

    /// A weight matrix whose outputs sum `fan_in` products, scaled to
    /// variance `1 / fan_in` (LeCun's initialisation). Unscaled, a stack of
    /// tanh layers is chaotic: rounding noise grows with depth until a
    /// GPU's gradients (cuBLAS sums in another order) differ from the CPU's
    /// by tens of percent 8 stages deep, and no tolerance can tell a wrong
    /// gradient from a right one.
    fn weights(&mut self, rows: usize, cols: usize, fan_in: usize) -> Tensor {
        // The values are uniform on [-0.5, 0.5): variance 1/12.
        let scale = (12.0 / fan_in.max(1) as f64).sqrt() as f32;
        Tensor { rows, cols, data: (0..rows * cols).map(|_| self.value() * scale).collect() }
    }
}

/// One tensor-parallel shard's weights of one stage.
#[derive(Debug, Clone)]
pub struct ShardWeights {
    /// Attention input projection, `hidden × ffn/tp` (a column block).
    pub a1: Tensor,
    /// Attention output projection, `ffn/tp × hidden` (a row block).
    pub b1: Tensor,
    /// MLP input projection.
    pub a2: Tensor,
    /// MLP output projection.
    pub b2: Tensor,
}

/// The model and data of one training step.
#[derive(Debug, Clone)]
pub struct Model {
    /// Hidden size.
    pub hidden: usize,
    /// Rows (tokens) per microbatch.
    pub rows: usize,
    /// Tensor-parallel shards.
    pub tp: usize,
    /// `stages[s][k]`: shard k's weights of stage s.
    pub stages: Vec<Vec<ShardWeights>>,
    /// Per microbatch, its input.
    pub inputs: Vec<Tensor>,
}

impl Model {
    /// A model of `stages` stages split over `tp` shards (each sublayer's
    /// inner width is `2 · hidden`, `tp` columns per shard at least), and
    /// `microbatches` inputs, all from `seed`.
    pub fn new(stages: usize, microbatches: usize, hidden: usize, rows: usize, tp: usize, seed: u64) -> Model {
        Model::with_inner(stages, microbatches, hidden, 2 * hidden, rows, tp, seed)
    }

    /// [`Model::new`] with each sublayer's inner width `inner` (a model's
    /// MLP width), split in column blocks of `inner / tp` (rounded up).
    pub fn with_inner(
        stages: usize,
        microbatches: usize,
        hidden: usize,
        inner: usize,
        rows: usize,
        tp: usize,
        seed: u64,
    ) -> Model {
        let tp = tp.max(1);
        let block = inner.div_ceil(tp).max(1);
        let mut rng = Rng::new(seed);
        let stages = (0..stages)
            .map(|_| {
                (0..tp)
                    .map(|_| ShardWeights {
                        a1: rng.weights(hidden, block, hidden),
                        b1: rng.weights(block, hidden, inner),
                        a2: rng.weights(hidden, block, hidden),
                        b2: rng.weights(block, hidden, inner),
                    })
                    .collect()
            })
            .collect();
        let inputs = (0..microbatches).map(|_| rng.tensor(rows, hidden)).collect();
        Model { hidden, rows, tp, stages, inputs }
    }

    /// Zero gradients in the layout of [`ShardGrads::flatten`]: per stage,
    /// `4 · tp` tensors.
    pub fn zero_gradients(&self) -> Vec<Vec<Tensor>> {
        self.stages.iter().map(|shards| vec![Tensor::zeros(0, 0); 4 * shards.len()]).collect()
    }
}

/// `attn`: shard k's activation and its partial output (all-reduced into `h`).
pub fn attn(w: &ShardWeights, x: &Tensor) -> (Tensor, Tensor) {
    let z1 = x.matmul(&w.a1).map(f32::tanh);
    let partial = z1.matmul(&w.b1);
    (z1, partial)
}

/// `mlp`: shard k's activation and its partial output (all-reduced into `y`).
pub fn mlp(w: &ShardWeights, h: &Tensor) -> (Tensor, Tensor) {
    let z2 = h.matmul(&w.a2).map(f32::tanh);
    let partial = z2.matmul(&w.b2);
    (z2, partial)
}

/// `dz = (d_out · Bᵀ) ⊙ (1 - z²)`: the gradient at a sublayer's tanh.
fn tanh_grad(b: &Tensor, z: &Tensor, d_out: &Tensor) -> Tensor {
    let mut dz = d_out.matmul(&b.t());
    for (g, v) in dz.data.iter_mut().zip(&z.data) {
        *g *= 1.0 - v * v;
    }
    dz
}

/// `mlp-dgrad`: `dz2` and shard k's partial of `dh` (all-reduced).
pub fn mlp_dgrad(w: &ShardWeights, z2: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
    let dz2 = tanh_grad(&w.b2, z2, dy);
    let partial = dz2.matmul(&w.a2.t());
    (dz2, partial)
}

/// `attn-dgrad`: `dz1` and shard k's partial of `dx` (all-reduced).
pub fn attn_dgrad(w: &ShardWeights, z1: &Tensor, dh: &Tensor) -> (Tensor, Tensor) {
    let dz1 = tanh_grad(&w.b1, z1, dh);
    let partial = dz1.matmul(&w.a1.t());
    (dz1, partial)
}

/// `mlp-wgrad`: shard k's `(dA2, dB2)`.
pub fn mlp_wgrad(h: &Tensor, z2: &Tensor, dz2: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
    (h.t().matmul(dz2), z2.t().matmul(dy))
}

/// `attn-wgrad`: shard k's `(dA1, dB1)`.
pub fn attn_wgrad(x: &Tensor, z1: &Tensor, dz1: &Tensor, dh: &Tensor) -> (Tensor, Tensor) {
    (x.t().matmul(dz1), z1.t().matmul(dh))
}

/// The gradient of the loss `0.5 · |y|²` with respect to the last output.
pub fn loss_grad(y: &Tensor) -> Tensor {
    y.clone()
}

/// One shard's weight gradients of one stage for one microbatch.
#[derive(Debug, Clone, Default)]
pub struct ShardGrads {
    /// dA1, dB1, dA2, dB2.
    pub a1: Option<Tensor>,
    /// dB1.
    pub b1: Option<Tensor>,
    /// dA2.
    pub a2: Option<Tensor>,
    /// dB2.
    pub b2: Option<Tensor>,
}

impl ShardGrads {
    /// The four gradients end to end in one row (dA1, dB1, dA2, dB2; a
    /// missing one as nothing): how a gradient reduction sends them.
    pub fn flatten(&self) -> Tensor {
        let data: Vec<f32> =
            [&self.a1, &self.b1, &self.a2, &self.b2].into_iter().flatten().flat_map(|t| t.data.clone()).collect();
        Tensor { rows: 1, cols: data.len(), data }
    }

    /// The gradients [`ShardGrads::flatten`] wrote, for weights of the
    /// shapes `w` has; `None` when the lengths do not add up.
    pub fn unflatten(flat: &Tensor, w: &ShardWeights) -> Option<ShardGrads> {
        let mut rest = flat.data.as_slice();
        let mut take = |like: &Tensor| {
            let n = like.rows * like.cols;
            (rest.len() >= n).then(|| {
                let (head, tail) = rest.split_at(n);
                rest = tail;
                Tensor { rows: like.rows, cols: like.cols, data: head.to_vec() }
            })
        };
        let g = ShardGrads { a1: take(&w.a1), b1: take(&w.b1), a2: take(&w.a2), b2: take(&w.b2) };
        (g.a1.is_some() && g.b2.is_some() && rest.is_empty()).then_some(g)
    }
}

/// Adds shard `k`'s gradients into a stage's `4 · tp` accumulators
/// (`[dA1 per shard, dB1 per shard, dA2 per shard, dB2 per shard]`).
pub fn accumulate(total: &mut [Tensor], tp: usize, k: usize, g: &ShardGrads) {
    for (slot, part) in [&g.a1, &g.b1, &g.a2, &g.b2].into_iter().enumerate() {
        if let Some(t) = part {
            total[slot * tp + k].add_assign(t);
        }
    }
}

/// Weight gradients summed over microbatches in microbatch order, computed
/// one microbatch at a time through every stage and shard on one thread:
/// what every schedule must reproduce bit for bit.
pub fn sequential_gradients(model: &Model) -> Vec<Vec<Tensor>> {
    let mut totals = model.zero_gradients();
    for x0 in &model.inputs {
        // Forward, keeping every shard's activations.
        let mut saved = Vec::new();
        let mut x = x0.clone();
        for shards in &model.stages {
            let (z1, p1): (Vec<Tensor>, Vec<Tensor>) = shards.iter().map(|w| attn(w, &x)).unzip();
            let h = sum_in_shard_order(&p1);
            let (z2, p2): (Vec<Tensor>, Vec<Tensor>) = shards.iter().map(|w| mlp(w, &h)).unzip();
            let y = sum_in_shard_order(&p2);
            saved.push((x, z1, h.clone(), z2));
            x = y;
        }
        let mut dy = loss_grad(&x);
        for (s, shards) in model.stages.iter().enumerate().rev() {
            let (x, z1, h, z2) = &saved[s];
            let (dz2, pdh): (Vec<Tensor>, Vec<Tensor>) =
                shards.iter().zip(z2).map(|(w, z2)| mlp_dgrad(w, z2, &dy)).unzip();
            let dh = sum_in_shard_order(&pdh);
            let (dz1, pdx): (Vec<Tensor>, Vec<Tensor>) =
                shards.iter().zip(z1).map(|(w, z1)| attn_dgrad(w, z1, &dh)).unzip();
            for k in 0..shards.len() {
                let (a2, b2) = mlp_wgrad(h, &z2[k], &dz2[k], &dy);
                let (a1, b1) = attn_wgrad(x, &z1[k], &dz1[k], &dh);
                let g = ShardGrads { a1: Some(a1), b1: Some(b1), a2: Some(a2), b2: Some(b2) };
                accumulate(&mut totals[s], shards.len(), k, &g);
            }
            dy = sum_in_shard_order(&pdx);
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::{sequential_gradients, Model, Tensor};

    /// The largest difference over all gradient tensors, relative to each tensor's largest value.
    fn worst_relative(a: &[Vec<Tensor>], b: &[Vec<Tensor>]) -> f32 {
        let mut worst = 0.0f32;
        for (sa, sb) in a.iter().zip(b) {
            for (ta, tb) in sa.iter().zip(sb) {
                let scale = tb.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = ta.data.iter().zip(&tb.data).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                worst = worst.max(diff / scale);
            }
        }
        worst
    }

    /// A GPU computes the same step with other rounding (cuBLAS sums in
    /// another order), so its gradients can only be compared with the CPU's
    /// within a tolerance — which means nothing if the model amplifies
    /// rounding. The model must not be chaotic: one ulp of noise on every
    /// input moves no gradient by more than 1e-4 of its largest value, even
    /// 8 stages deep at the widths gpu-check uses.
    #[test]
    fn rounding_noise_stays_small_through_eight_stages() {
        for (hidden, rows) in [(64, 32), (256, 64)] {
            let model = Model::new(8, 2, hidden, rows, 1, 42);
            let mut nudged = model.clone();
            for (i, v) in nudged.inputs.iter_mut().flat_map(|x| x.data.iter_mut()).enumerate() {
                let ulp = f32::from_bits(v.to_bits() + 1) - *v;
                *v += if i % 3 == 0 { ulp } else { 0.0 };
            }
            let worst = worst_relative(&sequential_gradients(&nudged), &sequential_gradients(&model));
            assert!(worst < 1e-4, "hidden {hidden}: one ulp of input noise moves a gradient by {worst:.2e}");
        }
    }
}
