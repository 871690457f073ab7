//! Pass times from model and hardware dimensions, with the FLOP and byte
//! counts of a Megatron-style transformer layer (the book's "Cost model"
//! chapter writes the formulas out).
//!
//! Per layer and microbatch (b sequences of s tokens, hidden h, MLP width
//! f, SwiGLU): the weight GEMMs hold `P = 4h² + 3hf` parameters, so
//!
//! - forward: `2bsP + 4bs²h` FLOPs (GEMMs, then attention scores and values);
//! - input gradient `B`: `2bsP + 8bs²h` (the GEMMs' input side, and the
//!   attention backward, which has no weights);
//! - weight gradient `W`: `2bsP`;
//!
//! each divided among `tp` tensor-parallel ranks and run at `peak_flops ×
//! efficiency`. Tensor parallelism all-reduces (or, with sequence
//! parallelism, all-gathers and reduce-scatters: the same volume) the
//! `2bsh`-byte activation twice per layer in `F` and twice in `B`; a ring
//! moves `2(tp-1)/tp` of it over NVLink. A pipeline transfer moves `2bsh`
//! bytes, over NVLink while the pipeline stays within a node, else over the
//! inter-node network.
//!
//! Stages are not all alike. Layers are whole: `L` layers over `S` stages
//! give every stage `⌊L/S⌋` and the remainder, one each, to the middle
//! stages first (stage 1, 2, …), then the last, then the first, since those
//! two also hold the embedding and the LM head. With a vocabulary `V`, the
//! last stage adds the LM head's GEMM (`2bshV` FLOPs in each of `F`, `B` and
//! `W`, divided among `tp` ranks as Megatron's vocabulary-parallel head
//! is); the first stage's embedding lookup is a gather, no GEMM, and its
//! gradient a scatter-add: neither is counted, but with `tp > 1` its forward
//! all-reduces one `2bsh`-byte activation, which is.

use serde::{Deserialize, Serialize};
use stp_ir::simulate::{CostModel, StageTimes};

/// The shape of a transformer (bf16 activations).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Hidden size h.
    pub hidden: f64,
    /// MLP intermediate size f (SwiGLU: three h×f matrices).
    pub ffn: f64,
    /// Transformer layers in the whole model.
    pub layers: f64,
    /// Tokens per sequence s.
    pub seq_len: f64,
    /// Sequences per microbatch b.
    pub micro_batch: f64,
    /// Vocabulary size V: the last stage's LM head (none when absent).
    #[serde(default)]
    pub vocab: Option<f64>,
}

/// The machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// Peak dense bf16 FLOP/s of one GPU.
    pub peak_flops: f64,
    /// Fraction of peak the GEMMs achieve.
    pub efficiency: f64,
    /// NVLink bandwidth per GPU, bytes/s (TP collectives, pipeline within a node).
    pub nvlink_bandwidth: f64,
    /// Inter-node bandwidth per GPU, bytes/s.
    pub network_bandwidth: f64,
    /// GPUs per node.
    pub gpus_per_node: f64,
}

impl Hardware {
    /// A800-like numbers: 312 TFLOP/s bf16, NVLink 400 GB/s, 200 Gb/s
    /// between nodes, 8 GPUs per node; GEMMs at half of peak.
    pub fn a800() -> Hardware {
        Hardware {
            peak_flops: 312e12,
            efficiency: 0.5,
            nvlink_bandwidth: 400e9,
            network_bandwidth: 200e9 / 8.0,
            gpus_per_node: 8.0,
        }
    }
}

/// How the model is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parallelism {
    /// Tensor-parallel group size.
    pub tp: u32,
    /// Pipeline ranks.
    pub pp: u32,
    /// Chunks (stages) per pipeline rank.
    pub chunks: u32,
}

/// The times, in seconds, of one pass of each stage (whole layers, the LM
/// head on the last) for one microbatch. The uniform fields hold the
/// average stage (`layers / (pp × chunks)` layers, no head); `stages` is
/// filled when stages differ.
pub fn cost_model(model: &ModelShape, hw: &Hardware, par: &Parallelism) -> CostModel {
    let (b, s, h, f) = (model.micro_batch, model.seq_len, model.hidden, model.ffn);
    let tp = f64::from(par.tp.max(1));
    let num_stages = (par.pp.max(1) * par.chunks.max(1)) as usize;
    let gemm_params = 4.0 * h * h + 3.0 * h * f;
    let rate = hw.peak_flops * hw.efficiency * tp;
    let activation_bytes = 2.0 * b * s * h;
    let ring = if par.tp > 1 { 2.0 * (tp - 1.0) / tp } else { 0.0 };
    let all_reduce = ring * activation_bytes / hw.nvlink_bandwidth;
    let within_node = f64::from(par.tp * par.pp) <= hw.gpus_per_node;
    let p2p_bandwidth = if within_node { hw.nvlink_bandwidth } else { hw.network_bandwidth };
    // One stage of `layers` layers, plus `head` FLOPs in each pass and
    // `extra` all-reduces.
    let stage = |layers: f64, head: f64, extra: f64| StageTimes {
        forward: (layers * (2.0 * b * s * gemm_params + 4.0 * b * s * s * h) + head) / rate,
        backward_input: (layers * (2.0 * b * s * gemm_params + 8.0 * b * s * s * h) + head) / rate,
        backward_weight: (layers * 2.0 * b * s * gemm_params + head) / rate,
        tp_collective: (2.0 * layers + extra) * all_reduce,
    };
    let average = stage(model.layers / num_stages as f64, 0.0, 0.0);
    let head = model.vocab.map_or(0.0, |v| 2.0 * b * s * h * v);
    let embedding_all_reduce = if model.vocab.is_some() && par.tp > 1 { 1.0 } else { 0.0 };
    let layers = whole_layers(model.layers, num_stages);
    let stages: Vec<StageTimes> = (0..num_stages)
        .map(|st| {
            let head = if st + 1 == num_stages { head } else { 0.0 };
            let extra = if st == 0 { embedding_all_reduce } else { 0.0 };
            stage(layers[st], head, extra)
        })
        .collect();
    let uniform = stages.iter().all(|t| *t == stages[0]);
    CostModel {
        forward: average.forward,
        backward_input: average.backward_input,
        backward_weight: average.backward_weight,
        tp_collective: average.tp_collective,
        p2p: activation_bytes / p2p_bandwidth,
        stages: if uniform { Vec::new() } else { stages },
        recompute: 1.0,
        reduce: 0.0,
    }
}

/// Whole layers per stage: `⌊L/S⌋` each, the remainder one each to the
/// middle stages first, then the last, then the first (they hold the
/// embedding and the LM head). A fractional `L` is rounded.
pub fn whole_layers(layers: f64, stages: usize) -> Vec<f64> {
    let total = layers.round().max(0.0) as u64;
    let n = stages.max(1) as u64;
    let mut out = vec![(total / n) as f64; stages.max(1)];
    let order = (1..stages.saturating_sub(1)).chain([stages.saturating_sub(1), 0]);
    for st in order.take((total % n) as usize) {
        out[st] += 1.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1e-12)
    }

    /// Hand-computed: h = 1024, f = 4096, 8 layers, s = 2048, b = 1,
    /// 1e15 FLOP/s at efficiency 0.5, no TP, pipeline of 2 with one chunk:
    /// 4 layers per stage.
    #[test]
    fn pass_times_follow_the_flop_counts() {
        let model =
            ModelShape { hidden: 1024.0, ffn: 4096.0, layers: 8.0, seq_len: 2048.0, micro_batch: 1.0, vocab: None };
        let hw = Hardware {
            peak_flops: 1e15,
            efficiency: 0.5,
            nvlink_bandwidth: 1e11,
            network_bandwidth: 1e10,
            gpus_per_node: 8.0,
        };
        let c = cost_model(&model, &hw, &Parallelism { tp: 1, pp: 2, chunks: 1 });
        let params = 4.0 * 1024.0 * 1024.0 + 3.0 * 1024.0 * 4096.0; // 16,777,216
        let gemm = 2.0 * 2048.0 * params; // per layer
        let attention = 4.0 * 2048.0 * 2048.0 * 1024.0;
        assert!(close(c.forward, 4.0 * (gemm + attention) / 5e14));
        assert!(close(c.backward_input, 4.0 * (gemm + 2.0 * attention) / 5e14));
        assert!(close(c.backward_weight, 4.0 * gemm / 5e14));
        assert_eq!(c.tp_collective, 0.0);
        assert!(close(c.p2p, 2.0 * 2048.0 * 1024.0 / 1e11));
    }

    #[test]
    fn tensor_parallelism_divides_compute_and_adds_collectives() {
        let model =
            ModelShape { hidden: 4096.0, ffn: 22016.0, layers: 32.0, seq_len: 4096.0, micro_batch: 1.0, vocab: None };
        let hw = Hardware::a800();
        let one = cost_model(&model, &hw, &Parallelism { tp: 1, pp: 4, chunks: 2 });
        let four = cost_model(&model, &hw, &Parallelism { tp: 4, pp: 4, chunks: 2 });
        assert!(close(four.forward * 4.0, one.forward));
        // 2 collectives of 2bsh bytes per layer, ring factor 2·3/4, 4 layers per chunk.
        let bytes = 2.0 * 4096.0 * 4096.0;
        assert!(close(four.tp_collective, 2.0 * 1.5 * bytes * 4.0 / 400e9));
        // TP 4 × PP 4 = 16 GPUs spans two nodes: pipeline transfers use the network.
        assert!(close(four.p2p, bytes / 25e9));
    }

    #[test]
    fn layers_are_whole_and_the_remainder_goes_to_the_middle_first() {
        assert_eq!(whole_layers(34.0, 8), [4.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0]);
        assert_eq!(whole_layers(13.0, 4), [3.0, 4.0, 3.0, 3.0]);
        assert_eq!(whole_layers(7.0, 4), [1.0, 2.0, 2.0, 2.0]);
        assert_eq!(whole_layers(6.0, 4), [1.0, 2.0, 2.0, 1.0]);
        assert_eq!(whole_layers(3.0, 1), [3.0]);
    }

    /// Llama-3-8B-like: h = 4096, f = 14336, 32 layers, V = 128256, s =
    /// 4096, over 4 stages: the last stage adds the head's 2bshV FLOPs to
    /// each pass; the first stage is a middle one (embedding not counted).
    #[test]
    fn the_lm_head_weighs_on_the_last_stage() {
        let model = ModelShape {
            hidden: 4096.0,
            ffn: 14336.0,
            layers: 32.0,
            seq_len: 4096.0,
            micro_batch: 1.0,
            vocab: Some(128256.0),
        };
        let hw = Hardware::a800();
        let c = cost_model(&model, &hw, &Parallelism { tp: 1, pp: 4, chunks: 1 });
        assert_eq!(c.stages.len(), 4);
        let head = 2.0 * 4096.0 * 4096.0 * 128256.0 / (hw.peak_flops * hw.efficiency);
        let middle = c.stages[1];
        assert_eq!(c.stages[0], middle);
        assert!(close(c.stages[3].forward, middle.forward + head));
        assert!(close(c.stages[3].backward_weight, middle.backward_weight + head));
        // 8 layers per stage: the head adds about two layers' forward.
        let ratio = c.stages[3].forward / middle.forward;
        assert!(ratio > 1.1 && ratio < 1.3, "{ratio}");
    }
}
