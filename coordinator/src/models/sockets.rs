//! The coordinator's own weights spread over the sockets (`--numa auto` on a box with
//! several NUMA nodes): every 2-D matrix the coordinator multiplies by — attention
//! projections (their rows are the heads), the router, dense FFNs and shared experts
//! (gate and up by intermediate rows, down by output rows), the output head (by vocabulary
//! rows) — is cut by rows into one share per socket, in proportion to its processing units;
//! each share is copied into DRAM bound to that socket's memory (before it is touched, so
//! its pages land there: a model file on PMem stays out of the hot path) and multiplied by
//! a thread pool pinned to that socket. The shares run at once; each socket reads only its
//! local memory.
//!
//! Exact: every output row is one whole dot product, computed by the same kernel in the
//! same order as unsplit. Cuts fall on multiples of 16 rows, so a Q4_K matrix that ggml
//! repacks in groups of 8 rows is repacked the same way in every share (a matrix whose row
//! count is not a multiple of 8, which ggml does not repack, is not repacked in any share).

use std::collections::HashMap;
use std::ops::Range;

use shared::gguf::{GgufFile, TensorInfo};
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::{
    matmul_segments, matmul_unrepacked_segments, Activations, Segments, WeightMatrix,
};
use shared::topology::{Binder, CoordinatorPart};
use tracing::{info, warn};

use super::EngineError;

/// Rows are cut at multiples of this.
const ROW_ALIGN: usize = 16;
const PAGE: usize = 4096;

/// One socket's share of the coordinator's work.
struct Socket {
    numa_node: u32,
    pool: rayon::ThreadPool,
}

/// A matrix's rows copied for one socket, page-aligned.
struct RowsCopy {
    socket: usize,
    rows: Range<usize>,
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

/// The coordinator's matrices cut over the sockets.
pub struct SocketSplit {
    sockets: Vec<Socket>,
    /// Tensor name → its shares (in socket order; a socket may have none of a small one).
    matrices: HashMap<String, Vec<RowsCopy>>,
    bytes: u64,
}

impl std::fmt::Debug for SocketSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketSplit")
            .field("sockets", &self.sockets.len())
            .field("matrices", &self.matrices.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// The row cuts of `n_rows` over shares weighted `weights`: multiples of [`ROW_ALIGN`]
/// except the last; empty shares where a matrix is too small.
pub fn row_shares(n_rows: usize, weights: &[usize]) -> Vec<Range<usize>> {
    let total: usize = weights.iter().sum::<usize>().max(1);
    let mut cuts = Vec::with_capacity(weights.len() + 1);
    cuts.push(0);
    let mut acc = 0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        let cut = if i + 1 == weights.len() {
            n_rows
        } else {
            (n_rows * acc / total) / ROW_ALIGN * ROW_ALIGN
        };
        cuts.push(cut.max(*cuts.last().unwrap_or(&0)));
    }
    cuts.windows(2).map(|c| c[0]..c[1]).collect()
}

impl SocketSplit {
    /// Copies the rows of each of `tensors` (2-D) of `file` for the `parts` of the
    /// topology's plan and starts one pool per part, pinned to its units where this machine
    /// has them (otherwise unpinned, with a warning: a synthetic topology in tests).
    pub fn new(
        file: &GgufFile,
        tensors: &[&TensorInfo],
        parts: &[CoordinatorPart],
    ) -> Result<SocketSplit, EngineError> {
        let binder = Binder::this_machine().ok();
        let mut sockets = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let pus = part.pus.clone();
            let numa_node = part.numa_node;
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(part.pus.len().max(1))
                .thread_name(move |t| format!("socket{i}-{t}"))
                .start_handler(move |t| {
                    let Ok(b) = Binder::this_machine() else {
                        return;
                    };
                    if let Err(e) = b.bind_thread_cpus(&pus) {
                        if t == 0 {
                            warn!(numa_node, error = %e, "coordinator threads run unpinned");
                        }
                    }
                })
                .build()
                .map_err(|e| EngineError::Node(format!("starting socket {i}'s threads: {e}")))?;
            sockets.push(Socket {
                numa_node: part.numa_node,
                pool,
            });
        }
        let weights: Vec<usize> = parts.iter().map(|p| p.pus.len().max(1)).collect();
        let mut matrices = HashMap::new();
        let mut bytes = 0u64;
        let mut bind_failed = false;
        for info in tensors {
            let data = file.tensor_data(info);
            let n_rows = info.ne.get(1).copied().unwrap_or(1) as usize;
            let row_bytes = info.row_bytes() as usize;
            let mut shares = Vec::new();
            for (socket, rows) in row_shares(n_rows, &weights).into_iter().enumerate() {
                if rows.is_empty() {
                    continue;
                }
                let len = rows.len() * row_bytes;
                // Zeroed pages are mapped lazily: bound first, they land on the socket.
                let mut buf = vec![0u8; len + PAGE];
                let start = buf.as_ptr().align_offset(PAGE).min(PAGE);
                if let Some(b) = &binder {
                    let node = parts[socket].memory_node;
                    if let Err(e) = b.bind_area(&buf[start..start + len], node) {
                        if !bind_failed {
                            warn!(error = %e, "coordinator weight copies are not bound to their sockets");
                            bind_failed = true;
                        }
                    }
                }
                let src = data
                    .get(rows.start * row_bytes..rows.end * row_bytes)
                    .ok_or_else(|| {
                        EngineError::Node(format!("tensor {} is shorter than its rows", info.name))
                    })?;
                buf[start..start + len].copy_from_slice(src);
                bytes += len as u64;
                shares.push(RowsCopy {
                    socket,
                    rows,
                    buf,
                    start,
                    len,
                });
            }
            matrices.insert(info.name.clone(), shares);
        }
        info!(
            sockets = sockets.len(),
            matrices = matrices.len(),
            bytes,
            nodes = ?sockets.iter().map(|s| s.numa_node).collect::<Vec<_>>(),
            "the coordinator's weights are spread over the sockets"
        );
        Ok(SocketSplit {
            sockets,
            matrices,
            bytes,
        })
    }

    /// Sockets.
    pub fn n_sockets(&self) -> usize {
        self.sockets.len()
    }

    /// The row ranges of `name` per socket (tests, logs): (socket's NUMA node, rows).
    pub fn shares(&self, name: &str) -> Option<Vec<(u32, Range<usize>)>> {
        self.matrices.get(name).map(|v| {
            v.iter()
                .map(|c| (self.sockets[c.socket].numa_node, c.rows.clone()))
                .collect()
        })
    }

    /// `w · x` into `out` (`n_tokens × w.n_rows`) for a matrix this split holds: each
    /// socket's rows on its own threads, all at once. False, with nothing done, for any
    /// other matrix (every 2-D one of the model is held: that is only a safety net).
    pub fn matmul(
        &self,
        kernels: &Kernels,
        w: &WeightMatrix<'_>,
        name: &str,
        act: &Activations,
        seg: Segments<'_>,
        out: &mut [f32],
    ) -> bool {
        let Some(shares) = self.matrices.get(name) else {
            return false;
        };
        let n_tokens = act.n_tokens();
        // The whole matrix decides repacking, as ggml's would.
        let repack = w.n_rows.is_multiple_of(8);
        let mut parts: Vec<Vec<f32>> = shares
            .iter()
            .map(|c| vec![0.0f32; n_tokens * c.rows.len()])
            .collect();
        rayon::scope(|s| {
            for (c, part) in shares.iter().zip(parts.iter_mut()) {
                let pool = &self.sockets[c.socket].pool;
                s.spawn(move |_| {
                    let m = WeightMatrix {
                        ty: w.ty,
                        n_rows: c.rows.len(),
                        n_cols: w.n_cols,
                        data: &c.buf[c.start..c.start + c.len],
                    };
                    pool.install(|| {
                        if repack {
                            matmul_segments(kernels, &m, act, seg, part);
                        } else {
                            matmul_unrepacked_segments(kernels, &m, act, seg, part);
                        }
                    });
                });
            }
        });
        for (c, part) in shares.iter().zip(&parts) {
            let r = c.rows.len();
            for (t, row) in part.chunks_exact(r).enumerate() {
                out[t * w.n_rows + c.rows.start..t * w.n_rows + c.rows.end].copy_from_slice(row);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::row_shares;

    #[test]
    fn row_shares_tile_the_rows_at_multiples_of_16() {
        assert_eq!(row_shares(1000, &[4, 4]), vec![0..496, 496..1000]);
        assert_eq!(row_shares(1000, &[1, 3]), vec![0..240, 240..1000]);
        assert_eq!(row_shares(20, &[1, 1, 1]), vec![0..0, 0..0, 0..20]);
        assert_eq!(row_shares(7, &[2]), vec![0..7]);
        for n in [1usize, 15, 16, 17, 576, 49152] {
            for w in [vec![1, 1], vec![2, 3, 5], vec![1, 1, 1, 1]] {
                let s = row_shares(n, &w);
                assert_eq!(s.first().unwrap().start, 0);
                assert_eq!(s.last().unwrap().end, n);
                for p in s.windows(2) {
                    assert_eq!(p[0].end, p[1].start);
                    assert_eq!(p[0].end % 16, 0);
                }
            }
        }
    }
}
