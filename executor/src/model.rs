//! The model the CPU backend trains: one dense layer with a tanh per
//! stage, `y = tanh(x · A_s)`, and the loss `0.5 · |y|²` after the last
//! stage. Small, but every pass does real arithmetic: `F` computes `y`;
//! `B` computes the input gradient `dx = (dy ⊙ (1 - y²)) · A_sᵀ`; `W`
//! computes the weight gradient `dA_s = xᵀ · (dy ⊙ (1 - y²))`.

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
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += *b;
        }
    }
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
}

/// The model and data of one training step.
#[derive(Debug, Clone)]
pub struct Model {
    /// Hidden size.
    pub hidden: usize,
    /// Rows (tokens) per microbatch.
    pub rows: usize,
    /// Per stage, its weight matrix A_s.
    pub weights: Vec<Tensor>,
    /// Per microbatch, its input.
    pub inputs: Vec<Tensor>,
}

impl Model {
    /// A model of `stages` stages and `microbatches` inputs, initialised from `seed`.
    pub fn new(stages: usize, microbatches: usize, hidden: usize, rows: usize, seed: u64) -> Model {
        let mut rng = Rng::new(seed);
        let weights = (0..stages).map(|_| rng.tensor(hidden, hidden)).collect();
        let inputs = (0..microbatches).map(|_| rng.tensor(rows, hidden)).collect();
        Model { hidden, rows, weights, inputs }
    }
}

/// `F`: the stage's output.
pub fn forward(weights: &Tensor, x: &Tensor) -> Tensor {
    x.matmul(weights).map(f32::tanh)
}

/// The gradient at the pre-activation: `dy ⊙ (1 - y²)`.
pub fn pre_activation_grad(y: &Tensor, dy: &Tensor) -> Tensor {
    let mut out = dy.clone();
    for (o, v) in out.data.iter_mut().zip(&y.data) {
        *o *= 1.0 - v * v;
    }
    out
}

/// `B`: the input gradient.
pub fn input_grad(weights: &Tensor, y: &Tensor, dy: &Tensor) -> Tensor {
    pre_activation_grad(y, dy).matmul(&weights.t())
}

/// `W`: the weight gradient.
pub fn weight_grad(x: &Tensor, y: &Tensor, dy: &Tensor) -> Tensor {
    x.t().matmul(&pre_activation_grad(y, dy))
}

/// The gradient of the loss `0.5 · |y|²` with respect to the last output.
pub fn loss_grad(y: &Tensor) -> Tensor {
    y.clone()
}

/// Weight gradients summed over microbatches in microbatch order, computed
/// one microbatch at a time through every stage on one thread: what every
/// schedule must reproduce bit for bit.
pub fn sequential_gradients(model: &Model) -> Vec<Tensor> {
    let stages = model.weights.len();
    let mut per_mb: Vec<Vec<Tensor>> = Vec::new();
    for x0 in &model.inputs {
        let mut xs = vec![x0.clone()];
        let mut ys = Vec::new();
        for w in &model.weights {
            let y = forward(w, xs.last().unwrap_or(x0));
            xs.push(y.clone());
            ys.push(y);
        }
        let mut dy = loss_grad(&ys[stages - 1]);
        let mut grads = vec![Tensor::zeros(0, 0); stages];
        for s in (0..stages).rev() {
            grads[s] = weight_grad(&xs[s], &ys[s], &dy);
            dy = input_grad(&model.weights[s], &ys[s], &dy);
        }
        per_mb.push(grads);
    }
    sum_in_order(&per_mb, stages, model.hidden)
}

/// Per stage, the sum of `per_mb[i][s]` over i in increasing order.
pub fn sum_in_order(per_mb: &[Vec<Tensor>], stages: usize, hidden: usize) -> Vec<Tensor> {
    (0..stages)
        .map(|s| {
            let mut total = Tensor::zeros(hidden, hidden);
            for grads in per_mb {
                total.add_assign(&grads[s]);
            }
            total
        })
        .collect()
}
