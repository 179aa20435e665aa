//! The routed-expert computation: Σ wₑ·FFNₑ(x) over a batch of tokens, for the
//! experts one node holds.
//!
//! This is the one place expert math lives: the expert-node daemon, the
//! in-process node of single-process mode and the tests all call
//! [`compute_experts`], so a network transport only moves its inputs and its
//! outputs. The inputs are the activation rows already quantized the way the
//! gate/up kernels consume them (done once, by the coordinator); the output is
//! one f32 partial-sum vector per token.
//!
//! Tokens are grouped per expert, so each expert's weights are streamed once per
//! call whatever the number of tokens routed to it.

use std::collections::BTreeMap;

use rayon::prelude::*;
use thiserror::Error;

use crate::quant::dispatch::Kernels;
use crate::quant::matmul::{
    matmul_segments, matmul_unrepacked_segments, matmul_vec_dot_segments, Activations, Segments,
    WeightMatrix,
};
use crate::quant::GgmlType;

/// One 3-D expert tensor (`ffn_{gate,up,down}_exps`): `n_expert` matrices of
/// `n_rows` rows of `n_cols` elements, expert-major, as ggml stores them.
#[derive(Clone, Copy, Debug)]
pub struct ExpertTensor<'a> {
    pub ty: GgmlType,
    pub n_cols: usize,
    pub n_rows: usize,
    pub n_expert: usize,
    /// Rows of each expert used here (a slice of the intermediate dimension for
    /// gate/up, or the gate or up half of a merged `ffn_gate_up_exps`).
    pub row_offset: usize,
    pub n_rows_used: usize,
    pub data: &'a [u8],
}

impl<'a> ExpertTensor<'a> {
    /// A whole 3-D tensor; `data` must hold exactly `n_expert` matrices.
    pub fn new(
        ty: GgmlType,
        n_cols: usize,
        n_rows: usize,
        n_expert: usize,
        data: &'a [u8],
    ) -> Result<Self, MoeError> {
        let row_bytes = ty.row_bytes(n_cols).ok_or(MoeError::Shape(format!(
            "{n_cols} columns are not whole {ty} blocks"
        )))?;
        let expected = row_bytes
            .checked_mul(n_rows)
            .and_then(|b| b.checked_mul(n_expert));
        if expected != Some(data.len()) {
            return Err(MoeError::Shape(format!(
                "{} bytes for {n_expert} experts of {n_rows}x{n_cols} {ty}",
                data.len()
            )));
        }
        Ok(ExpertTensor {
            ty,
            n_cols,
            n_rows,
            n_expert,
            row_offset: 0,
            n_rows_used: n_rows,
            data,
        })
    }

    /// The same tensor restricted to rows `offset..offset + len` of every expert.
    pub fn rows(self, offset: usize, len: usize) -> Result<Self, MoeError> {
        if offset.checked_add(len).is_none_or(|end| end > self.n_rows) {
            return Err(MoeError::Shape(format!(
                "rows {offset}..{} of {}",
                offset.saturating_add(len),
                self.n_rows
            )));
        }
        let group = crate::quant::rows8::GROUP_ROWS;
        if self.ty == GgmlType::Q4_K_R8
            && !(offset.is_multiple_of(group) && len.is_multiple_of(group))
        {
            return Err(MoeError::Shape(format!(
                "rows {offset}..{} of a Q4_K_R8 tensor are not whole groups of 8 (use a plan \
                 whose slices are multiples of 8 rows, or the unconverted file)",
                offset + len
            )));
        }
        Ok(ExpertTensor {
            row_offset: self.row_offset + offset,
            n_rows_used: len,
            ..self
        })
    }

    fn row_bytes(&self) -> usize {
        // Checked in `new`.
        self.ty.row_bytes(self.n_cols).unwrap_or(0)
    }

    /// The used rows of expert `e` as a weight matrix (a view, no copy).
    pub fn expert(&self, e: usize) -> WeightMatrix<'a> {
        let rb = self.row_bytes();
        let start = (e * self.n_rows + self.row_offset) * rb;
        WeightMatrix {
            ty: self.ty,
            n_rows: self.n_rows_used,
            n_cols: self.n_cols,
            data: &self.data[start..start + self.n_rows_used * rb],
        }
    }
}

/// The routed experts of one MoE layer held by a node.
#[derive(Clone, Copy, Debug)]
pub struct ExpertLayer<'a> {
    pub gate: ExpertTensor<'a>,
    pub up: ExpertTensor<'a>,
    pub down: ExpertTensor<'a>,
}

impl ExpertLayer<'_> {
    /// Hidden size (input of gate/up, output of down).
    pub fn n_embd(&self) -> usize {
        self.down.n_rows_used
    }

    /// Intermediate size of one expert (or of the slice held here).
    pub fn n_ff(&self) -> usize {
        self.gate.n_rows_used
    }

    /// Checks that the three tensors fit together.
    pub fn validate(&self) -> Result<(), MoeError> {
        let (g, u, d) = (&self.gate, &self.up, &self.down);
        if g.n_cols != u.n_cols || g.n_rows_used != u.n_rows_used {
            return Err(MoeError::Shape(format!(
                "gate {}x{} and up {}x{} differ",
                g.n_rows_used, g.n_cols, u.n_rows_used, u.n_cols
            )));
        }
        if d.n_cols != g.n_rows_used || d.n_rows_used != g.n_cols {
            return Err(MoeError::Shape(format!(
                "down {}x{} does not match gate {}x{}",
                d.n_rows_used, d.n_cols, g.n_rows_used, g.n_cols
            )));
        }
        if g.n_expert != u.n_expert || g.n_expert != d.n_expert {
            return Err(MoeError::Shape("expert counts differ".to_owned()));
        }
        Ok(())
    }

    /// The activation types gate and up consume (one type when they agree).
    pub fn input_types(&self) -> Vec<GgmlType> {
        let g = self.gate.ty.vec_dot_type();
        let u = self.up.ty.vec_dot_type();
        if g == u {
            vec![g]
        } else {
            vec![g, u]
        }
    }
}

/// One routing decision: token `token` uses expert `expert` with weight `weight`.
///
/// Invariant: a token's assignments appear in routing rank order (best first);
/// the partial sum adds them in that order, as llama.cpp does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// One expert's FFN (or a dense part), or a slice of its intermediate dimension: `gate` and
/// `up` are `ff × n_embd` (the slice's rows), `down` is whole rows of down, `rows × n_ff`
/// (all `n_embd` rows for a whole FFN; a slice's share, `placement::slice_down_rows`).
#[derive(Clone, Copy, Debug)]
pub struct FfnMatrices<'a> {
    pub gate: WeightMatrix<'a>,
    pub up: WeightMatrix<'a>,
    pub down: WeightMatrix<'a>,
}

impl FfnMatrices<'_> {
    /// Intermediate size (of the slice).
    pub fn n_ff(&self) -> usize {
        self.gate.n_rows
    }

    /// Checks that the three matrices fit together and take `n_embd` inputs.
    pub fn validate(&self, n_embd: usize) -> Result<(), MoeError> {
        self.validate_gate_up(n_embd)?;
        let (g, d) = (&self.gate, &self.down);
        if d.n_cols != g.n_rows || d.n_rows != n_embd {
            return Err(MoeError::Shape(format!(
                "down {}x{} does not match gate {}x{}",
                d.n_rows, d.n_cols, g.n_rows, g.n_cols
            )));
        }
        Ok(())
    }

    /// Whether this is the whole FFN (every row of gate, up and down), which one round
    /// computes; a slice takes two ([`routed_hidden_segments`], [`routed_down_segments`]).
    pub fn is_whole(&self, n_embd: usize) -> bool {
        self.down.n_cols == self.gate.n_rows && self.down.n_rows == n_embd
    }

    /// Checks a slice (the exact two-round split): gate and up `ff × n_embd`, down whole
    /// rows of the FFN (`rows × n_ff`, `ff ≤ n_ff`, `rows ≤ n_embd`).
    pub fn validate_slice(&self, n_embd: usize) -> Result<(), MoeError> {
        self.validate_gate_up(n_embd)?;
        let (g, d) = (&self.gate, &self.down);
        if d.n_cols < g.n_rows || d.n_rows > n_embd {
            return Err(MoeError::Shape(format!(
                "down rows {}x{} do not fit gate {}x{}",
                d.n_rows, d.n_cols, g.n_rows, g.n_cols
            )));
        }
        Ok(())
    }

    /// Each matrix's bytes fit its shape; gate and up are alike and take `n_embd` inputs.
    fn validate_gate_up(&self, n_embd: usize) -> Result<(), MoeError> {
        let (g, u, d) = (&self.gate, &self.up, &self.down);
        for (what, m) in [("gate", g), ("up", u), ("down", d)] {
            WeightMatrix::new(m.ty, m.n_rows, m.n_cols, m.data)
                .map_err(|e| MoeError::Shape(format!("{what}: {e}")))?;
        }
        if g.n_cols != n_embd || u.n_cols != n_embd || g.n_rows != u.n_rows {
            return Err(MoeError::Shape(format!(
                "gate {}x{} and up {}x{} for n_embd {n_embd}",
                g.n_rows, g.n_cols, u.n_rows, u.n_cols
            )));
        }
        Ok(())
    }
}

/// The routed experts of one layer as a node holds them.
pub trait ExpertSource: Sync {
    /// Hidden size (input of gate/up, output of down).
    fn n_embd(&self) -> usize;
    /// Number of routed experts of the layer (ids run below it).
    fn n_expert(&self) -> usize;
    /// The slices of `expert` held here, in intermediate-dimension order; empty when none.
    fn expert(&self, expert: u32) -> Vec<FfnMatrices<'_>>;
}

impl ExpertSource for ExpertLayer<'_> {
    fn n_embd(&self) -> usize {
        ExpertLayer::n_embd(self)
    }

    fn n_expert(&self) -> usize {
        self.gate.n_expert
    }

    fn expert(&self, expert: u32) -> Vec<FfnMatrices<'_>> {
        let e = expert as usize;
        vec![FfnMatrices {
            gate: self.gate.expert(e),
            up: self.up.expert(e),
            down: self.down.expert(e),
        }]
    }
}

/// Computes Σ weight·down(silu(gate·x) ⊙ up·x) per token into `out`
/// (`n_tokens × n_embd`, overwritten; tokens with no assignment get zeros).
///
/// `inputs` holds the tokens' activation rows quantized to each type of
/// [`ExpertLayer::input_types`]; every one has `n_tokens` rows of `n_embd`.
pub fn compute_experts(
    kernels: &Kernels,
    layer: &ExpertLayer<'_>,
    inputs: &[Activations],
    assignments: &[Assignment],
    out: &mut [f32],
) -> Result<(), MoeError> {
    layer.validate()?;
    compute_routed(kernels, layer, inputs, assignments, out)
}

fn find_input(inputs: &[Activations], ty: GgmlType) -> Result<&Activations, MoeError> {
    inputs
        .iter()
        .find(|a| a.ty() == ty)
        .ok_or(MoeError::MissingInput(ty))
}

/// Checks that every input has the same number of rows, of `n_embd`; returns it.
fn check_inputs(inputs: &[Activations], n_embd: usize) -> Result<usize, MoeError> {
    let n_tokens = inputs.first().map_or(0, Activations::n_tokens);
    for x in inputs {
        if x.n_cols() != n_embd || x.n_tokens() != n_tokens {
            return Err(MoeError::Shape(format!(
                "input of {} tokens x {} for {n_tokens} tokens x {n_embd}",
                x.n_tokens(),
                x.n_cols()
            )));
        }
    }
    Ok(n_tokens)
}

/// Checks that every input has `n_tokens` rows of `n_embd` and `out` room for the result;
/// returns `n_tokens`.
fn check_io(inputs: &[Activations], n_embd: usize, out: &[f32]) -> Result<usize, MoeError> {
    let n_tokens = check_inputs(inputs, n_embd)?;
    if out.len() != n_tokens * n_embd {
        return Err(MoeError::Shape(format!(
            "output of {} values for {n_tokens} tokens x {n_embd}",
            out.len()
        )));
    }
    Ok(n_tokens)
}

/// [`compute_experts`] over any [`ExpertSource`] holding whole experts (one expert's tokens
/// computed together): exactly what the single-process engine computes. An expert held as
/// slices is refused ([`MoeError::Sliced`]): slices take the two rounds of
/// [`routed_hidden_segments`] and [`routed_down_segments`].
pub fn compute_routed(
    kernels: &Kernels,
    source: &dyn ExpertSource,
    inputs: &[Activations],
    assignments: &[Assignment],
    out: &mut [f32],
) -> Result<(), MoeError> {
    compute_routed_segments(kernels, source, inputs, assignments, None, out)
}

/// The sequence of each token, from [`Segments`] (runs of consecutive tokens).
fn sequence_of_tokens(n_tokens: usize, segments: Segments<'_>) -> Result<Vec<u32>, MoeError> {
    let Some(lengths) = segments else {
        return Ok(vec![0; n_tokens]);
    };
    if lengths.contains(&0) || lengths.iter().sum::<usize>() != n_tokens {
        return Err(MoeError::Shape(format!(
            "segments {lengths:?} for {n_tokens} tokens"
        )));
    }
    Ok(lengths
        .iter()
        .enumerate()
        .flat_map(|(s, &len)| std::iter::repeat_n(s as u32, len))
        .collect())
}

/// Runs of equal values in `seq` (the segments of an expert's tokens).
fn runs(seq: impl Iterator<Item = u32>) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let mut last = None;
    for s in seq {
        match out.last_mut() {
            Some(n) if last == Some(s) => *n += 1,
            _ => out.push(1),
        }
        last = Some(s);
    }
    out
}

/// [`compute_routed`] for a batch of several sequences' tokens (runs given by `segments`):
/// each sequence's tokens get exactly the result they get alone, while each expert's
/// weights are streamed once for the whole batch.
pub fn compute_routed_segments(
    kernels: &Kernels,
    source: &dyn ExpertSource,
    inputs: &[Activations],
    assignments: &[Assignment],
    segments: Segments<'_>,
    out: &mut [f32],
) -> Result<(), MoeError> {
    let n_embd = source.n_embd();
    let n_tokens = check_io(inputs, n_embd, out)?;
    let seq_of = sequence_of_tokens(n_tokens, segments)?;

    if assignments.iter().any(|a| !a.weight.is_finite()) {
        return Err(MoeError::NonFinite("expert weight"));
    }
    // Experts in ascending order, tokens in slot order.
    let by_expert = slots_by_expert(assignments, n_tokens, source.n_expert())?;

    // Per expert: its assignment slots and their output rows.
    type SlotRows = (Vec<usize>, Vec<f32>);
    let one_expert = |(expert, slots): (u32, Vec<usize>)| -> Result<SlotRows, MoeError> {
        let tokens: Vec<usize> = slots
            .iter()
            .map(|&s| assignments[s].token as usize)
            .collect();
        let expert_segments = runs(tokens.iter().map(|&t| seq_of[t]));
        let slices = source.expert(expert);
        let m = match slices.as_slice() {
            [] => return Err(MoeError::NotHeld { expert }),
            [m] if m.is_whole(n_embd) => m,
            _ => return Err(MoeError::Sliced { expert }),
        };
        m.validate(n_embd)?;
        let x_gate = find_input(inputs, m.gate.ty.vec_dot_type())?;
        let x_up = find_input(inputs, m.up.ty.vec_dot_type())?;
        let hidden = expert_hidden(kernels, m, x_gate, x_up, &tokens, &expert_segments);
        let hidden =
            crate::profile::work(|| Activations::quantize(kernels, m.down.ty, &hidden, m.n_ff()));
        Ok((slots, expert_down(kernels, m, &hidden, &expert_segments)))
    };
    // A node with one compute thread computes on the thread that got the dispatch.
    let done = per_expert(by_expert, one_expert)?;
    let mut slot_rows: Vec<&[f32]> = vec![&[]; assignments.len()];
    for (slots, rows) in &done {
        for (i, &slot) in slots.iter().enumerate() {
            slot_rows[slot] = &rows[i * n_embd..(i + 1) * n_embd];
        }
    }
    crate::profile::work(|| add_weighted(out, n_embd, assignments, |slot| slot_rows[slot]));
    Ok(())
}

/// Σ weight·output per token into `out` (`n_tokens × n_embd`, overwritten), adding the
/// slots in assignment order (routing rank order within a token), as ggml adds a token's
/// experts; `output(slot)` is that slot's expert output row. The one place this sum is made,
/// on a node and on the coordinator (which adds sliced experts' outputs after their second
/// round), so every plan adds the same floats in the same order.
pub fn add_weighted<'r>(
    out: &mut [f32],
    n_embd: usize,
    assignments: &[Assignment],
    output: impl Fn(usize) -> &'r [f32],
) {
    out.fill(0.0);
    for (slot, a) in assignments.iter().enumerate() {
        let t = a.token as usize;
        let dst = &mut out[t * n_embd..(t + 1) * n_embd];
        for (o, &d) in dst.iter_mut().zip(output(slot)) {
            *o += d * a.weight;
        }
    }
}

/// The first round of a dense FFN (a dense layer's, or a shared expert) split over nodes:
/// for every token, silu(gate·x) ⊙ up·x of the gate and up rows `slices` hold, the slices
/// side by side in their order, into `out` (`n_tokens × Σ slice rows`, overwritten).
///
/// A dense slice's `down` is whole rows of down (`rows × n_ff`, see [`dense_down_segments`]);
/// its `n_cols` is the whole FFN's `n_ff`, which decides, as for the whole matrix on the
/// coordinator, whether ggml would have repacked gate and up (Q4_K with a multiple of 8
/// rows): every row then comes out exactly as the single-process engine computes it.
pub fn dense_hidden_segments(
    kernels: &Kernels,
    slices: &[FfnMatrices<'_>],
    inputs: &[Activations],
    segments: Segments<'_>,
    out: &mut [f32],
) -> Result<(), MoeError> {
    let first = slices.first().ok_or(MoeError::NotHeld { expert: 0 })?;
    let n_embd = first.gate.n_cols;
    let width: usize = slices.iter().map(FfnMatrices::n_ff).sum();
    let n_tokens = check_inputs(inputs, n_embd)?;
    if out.len() != n_tokens * width {
        return Err(MoeError::Shape(format!(
            "output of {} values for {n_tokens} tokens x {width}",
            out.len()
        )));
    }
    sequence_of_tokens(n_tokens, segments)?;
    let mut col = 0;
    for m in slices {
        m.validate_slice(n_embd)?;
        let x_gate = find_input(inputs, m.gate.ty.vec_dot_type())?;
        let x_up = find_input(inputs, m.up.ty.vec_dot_type())?;
        let n_ff = m.n_ff();
        let repack = m.down.n_cols.is_multiple_of(8);
        let mut gate = vec![0.0f32; n_tokens * n_ff];
        matmul_dense(kernels, &m.gate, x_gate, segments, repack, &mut gate);
        let mut up = vec![0.0f32; n_tokens * n_ff];
        matmul_dense(kernels, &m.up, x_up, segments, repack, &mut up);
        crate::profile::work(|| {
            crate::ggml_math::swiglu_in_place(&mut gate, &up);
            for (t, row) in gate.chunks_exact(n_ff).enumerate() {
                out[t * width + col..t * width + col + n_ff].copy_from_slice(row);
            }
        });
        col += n_ff;
    }
    Ok(())
}

/// The second round of a dense FFN split over nodes: the rows of down `slices` hold, from
/// every token's whole hidden row `hidden` (`n_tokens × n_ff`, quantized for down), side by
/// side in slice order into `out` (`n_tokens × Σ down rows`, overwritten). Each value is one
/// whole dot product over `n_ff`, so the rows of all nodes together are exactly the
/// single-process result. `n_embd` (the model's hidden size, down's full row count) decides
/// whether ggml would have repacked down.
pub fn dense_down_segments(
    kernels: &Kernels,
    slices: &[FfnMatrices<'_>],
    hidden: &Activations,
    n_embd: usize,
    segments: Segments<'_>,
    out: &mut [f32],
) -> Result<(), MoeError> {
    let n_tokens = hidden.n_tokens();
    let width: usize = slices.iter().map(|m| m.down.n_rows).sum();
    if out.len() != n_tokens * width {
        return Err(MoeError::Shape(format!(
            "output of {} values for {n_tokens} tokens x {width}",
            out.len()
        )));
    }
    sequence_of_tokens(n_tokens, segments)?;
    let repack = n_embd.is_multiple_of(8);
    let mut col = 0;
    for m in slices {
        m.validate_slice(m.gate.n_cols)?;
        let d = &m.down;
        if hidden.n_cols() != d.n_cols || hidden.ty() != d.ty.vec_dot_type() {
            return Err(MoeError::Shape(format!(
                "hidden rows of {} {} for down rows of {} {}",
                hidden.n_cols(),
                hidden.ty(),
                d.n_cols,
                d.ty
            )));
        }
        let mut rows = vec![0.0f32; n_tokens * d.n_rows];
        matmul_dense(kernels, d, hidden, segments, repack, &mut rows);
        crate::profile::work(|| {
            for (t, row) in rows.chunks_exact(d.n_rows.max(1)).enumerate() {
                out[t * width + col..t * width + col + d.n_rows].copy_from_slice(row);
            }
        });
        col += d.n_rows;
    }
    Ok(())
}

/// A 2-D `MUL_MAT` of a slice of a dense matrix, repacked or not as the whole matrix would be.
fn matmul_dense(
    kernels: &Kernels,
    w: &WeightMatrix<'_>,
    x: &Activations,
    segments: Segments<'_>,
    repack: bool,
    out: &mut [f32],
) {
    if repack {
        matmul_segments(kernels, w, x, segments, out);
    } else {
        matmul_unrepacked_segments(kernels, w, x, segments, out);
    }
}

/// silu(gate·x) ⊙ up·x of one expert (or slice) for the given tokens (rows in token order,
/// `tokens.len() × ff`).
///
/// The float order is ggml's `MUL_MAT_ID` for this expert, which depends on how many tokens
/// are routed to it (the tiled matmul's from 8 for K-quants, see `matmul_vec_dot`): an
/// expert's tokens of one batch must be computed together to stay exact. Rows are
/// independent: a slice's rows are the whole expert's.
fn expert_hidden(
    kernels: &Kernels,
    m: &FfnMatrices<'_>,
    x_gate: &Activations,
    x_up: &Activations,
    tokens: &[usize],
    segments: &[usize],
) -> Vec<f32> {
    let n = tokens.len();
    let n_ff = m.n_ff();
    let seg = Some(segments);
    let xg = crate::profile::work(|| x_gate.gather(tokens));
    let mut gate = vec![0.0f32; n * n_ff];
    matmul_vec_dot_segments(kernels, &m.gate, &xg, seg, &mut gate);
    let mut up = vec![0.0f32; n * n_ff];
    if std::ptr::eq(x_gate, x_up) {
        matmul_vec_dot_segments(kernels, &m.up, &xg, seg, &mut up);
    } else {
        matmul_vec_dot_segments(kernels, &m.up, &x_up.gather(tokens), seg, &mut up);
    }
    crate::profile::work(|| crate::ggml_math::swiglu_in_place(&mut gate, &up));
    gate
}

/// The rows of down `m` holds, from the hidden rows of an expert's tokens (quantized for
/// down, whole `n_ff` wide): `hidden.n_tokens() × down rows`, in the same float order as
/// the whole expert's rows.
fn expert_down(
    kernels: &Kernels,
    m: &FfnMatrices<'_>,
    hidden: &Activations,
    segments: &[usize],
) -> Vec<f32> {
    let mut down = vec![0.0f32; hidden.n_tokens() * m.down.n_rows];
    matmul_vec_dot_segments(kernels, &m.down, hidden, Some(segments), &mut down);
    down
}

/// Groups assignment slots by expert (ascending; slots in order), checking each against
/// `n_rows` (the rows its `token` may name) and `n_expert`.
fn slots_by_expert(
    assignments: &[Assignment],
    n_rows: usize,
    n_expert: usize,
) -> Result<BTreeMap<u32, Vec<usize>>, MoeError> {
    let mut by_expert: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (slot, a) in assignments.iter().enumerate() {
        if a.token as usize >= n_rows {
            return Err(MoeError::BadToken {
                token: a.token,
                n_tokens: n_rows,
            });
        }
        if a.expert as usize >= n_expert {
            return Err(MoeError::BadExpert {
                expert: a.expert,
                n_expert,
            });
        }
        by_expert.entry(a.expert).or_default().push(slot);
    }
    Ok(by_expert)
}

/// Runs `f` per expert, in parallel unless the node computes serially; returns the
/// results in expert order.
fn per_expert<T: Send>(
    by_expert: BTreeMap<u32, Vec<usize>>,
    f: impl Fn((u32, Vec<usize>)) -> Result<T, MoeError> + Sync + Send,
) -> Result<Vec<T>, MoeError> {
    if crate::parallel::is_serial() {
        by_expert.into_iter().map(f).collect()
    } else {
        by_expert.into_par_iter().map(f).collect()
    }
}

/// Writes each slot's pieces (`rows[i]` for the i-th slot of `slots`, `width`-wide slices
/// side by side, in slice order) into its row of `out` (`width` per slot, zero padded).
fn place_rows(out: &mut [f32], width: usize, slots: &[usize], pieces: &[(usize, Vec<f32>)]) {
    let mut col = 0;
    for (piece_width, rows) in pieces {
        for (i, &slot) in slots.iter().enumerate() {
            let src = &rows[i * piece_width..(i + 1) * piece_width];
            out[slot * width + col..slot * width + col + piece_width].copy_from_slice(src);
        }
        col += piece_width;
    }
}

/// The width of a slice round's answer rows for the experts `assignments` name: the most,
/// over those experts, of the rows (`hidden`: of gate/up; otherwise: of down) the slices
/// held here give. Both ends compute it the same way from the same placement.
pub fn slice_answer_width(
    source: &dyn ExpertSource,
    assignments: &[Assignment],
    hidden: bool,
) -> usize {
    let mut experts: Vec<u32> = assignments.iter().map(|a| a.expert).collect();
    experts.sort_unstable();
    experts.dedup();
    (experts.into_iter())
        .map(|e| {
            (source.expert(e).iter())
                .map(|m| if hidden { m.n_ff() } else { m.down.n_rows })
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0)
}

/// The assignments of a routed slices' second round, whose input has one row per
/// assignment: each assignment with `token` set to its own index (its row).
pub fn per_slot_rows(assignments: &[Assignment]) -> Vec<Assignment> {
    (assignments.iter().enumerate())
        .map(|(i, a)| Assignment {
            token: i as u32,
            ..*a
        })
        .collect()
}

/// One round of routed slices: per expert (its slots' input rows `a.token`, their sequence
/// runs) each slice held here gives `piece` → (its width, its rows per slot); the pieces go
/// side by side in slice order into each slot's row of `out` (`width` per slot, zero padded).
fn slice_round<F>(
    source: &dyn ExpertSource,
    assignments: &[Assignment],
    n_rows: usize,
    segments: Segments<'_>,
    width: usize,
    out: &mut [f32],
    piece: F,
) -> Result<(), MoeError>
where
    F: Fn(u32, &FfnMatrices<'_>, &[usize], &[usize]) -> Result<(usize, Vec<f32>), MoeError>
        + Sync
        + Send,
{
    if out.len() != assignments.len() * width {
        return Err(MoeError::Shape(format!(
            "output of {} values for {} slots x {width}",
            out.len(),
            assignments.len()
        )));
    }
    let seq_of = sequence_of_tokens(n_rows, segments)?;
    let by_expert = slots_by_expert(assignments, n_rows, source.n_expert())?;
    let n_embd = source.n_embd();
    type Pieces = (Vec<usize>, Vec<(usize, Vec<f32>)>);
    let done = per_expert(by_expert, |(expert, slots)| -> Result<Pieces, MoeError> {
        let rows: Vec<usize> = (slots.iter())
            .map(|&s| assignments[s].token as usize)
            .collect();
        let expert_segments = runs(rows.iter().map(|&r| seq_of[r]));
        let slices = source.expert(expert);
        if slices.is_empty() {
            return Err(MoeError::NotHeld { expert });
        }
        let mut pieces = Vec::with_capacity(slices.len());
        for m in &slices {
            m.validate_slice(n_embd)?;
            pieces.push(piece(expert, m, &rows, &expert_segments)?);
        }
        if pieces.iter().map(|p| p.0).sum::<usize>() > width {
            return Err(MoeError::Shape(format!(
                "expert {expert}'s slices give rows wider than the answer's {width}"
            )));
        }
        Ok((slots, pieces))
    })?;
    out.fill(0.0);
    crate::profile::work(|| {
        for (slots, pieces) in &done {
            place_rows(out, width, slots, pieces);
        }
    });
    Ok(())
}

/// The first round of routed experts held as slices (the exact split, as for a dense part):
/// for every assignment slot, silu(gate·x) ⊙ up·x of the rows of gate and up the slices of
/// its expert held here give, side by side in ff order, zero padded to `width`, into `out`
/// (`assignments.len() × width`, overwritten). Weights are not used: the coordinator joins
/// each slot's hidden row, quantizes it once and asks for the second round.
pub fn routed_hidden_segments(
    kernels: &Kernels,
    source: &dyn ExpertSource,
    inputs: &[Activations],
    assignments: &[Assignment],
    segments: Segments<'_>,
    width: usize,
    out: &mut [f32],
) -> Result<(), MoeError> {
    let n_tokens = check_inputs(inputs, source.n_embd())?;
    slice_round(
        source,
        assignments,
        n_tokens,
        segments,
        width,
        out,
        |_, m, tokens, seg| {
            let x_gate = find_input(inputs, m.gate.ty.vec_dot_type())?;
            let x_up = find_input(inputs, m.up.ty.vec_dot_type())?;
            Ok((
                m.n_ff(),
                expert_hidden(kernels, m, x_gate, x_up, tokens, seg),
            ))
        },
    )
}

/// The second round of routed experts held as slices: for every assignment slot, the rows
/// of down the slices of its expert held here give, from the slot's whole hidden row
/// (`hidden`, row `token` of the assignment: one row per slot, quantized for down), side
/// by side in ff order, zero padded to `width`, into `out` (`assignments.len() × width`,
/// overwritten). Each value is one whole dot product over the expert's `n_ff`, so the rows
/// of all nodes together are exactly the single-process expert output; the coordinator
/// adds the slots' weighted outputs in routing order. `segments` are over `hidden`'s rows.
pub fn routed_down_segments(
    kernels: &Kernels,
    source: &dyn ExpertSource,
    hidden: &Activations,
    assignments: &[Assignment],
    segments: Segments<'_>,
    width: usize,
    out: &mut [f32],
) -> Result<(), MoeError> {
    slice_round(
        source,
        assignments,
        hidden.n_tokens(),
        segments,
        width,
        out,
        |expert, m, rows, seg| {
            let d = &m.down;
            if hidden.n_cols() != d.n_cols || hidden.ty() != d.ty.vec_dot_type() {
                return Err(MoeError::Shape(format!(
                    "hidden rows of {} {} for expert {expert}'s down rows of {} {}",
                    hidden.n_cols(),
                    hidden.ty(),
                    d.n_cols,
                    d.ty
                )));
            }
            let x = crate::profile::work(|| hidden.gather(rows));
            Ok((d.n_rows, expert_down(kernels, m, &x, seg)))
        },
    )
}

/// Why an expert computation was refused.
#[derive(Clone, Debug, Error)]
pub enum MoeError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("no activations quantized to {0} were given")]
    MissingInput(GgmlType),
    #[error("token {token} out of range (batch of {n_tokens})")]
    BadToken { token: u32, n_tokens: usize },
    #[error("expert {expert} out of range ({n_expert} experts)")]
    BadExpert { expert: u32, n_expert: usize },
    #[error("non-finite {0}")]
    NonFinite(&'static str),
    #[error("expert {expert} is not held here")]
    NotHeld { expert: u32 },
    #[error(
        "expert {expert} is held here as slices: a sliced expert is computed in two rounds \
         (routed slice stages), not in one"
    )]
    Sliced { expert: u32 },
}
