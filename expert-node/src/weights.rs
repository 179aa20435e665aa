//! The weights a node serves: the byte ranges of its slices, mapped from the model file
//! (or from a `split` file holding only this node's share), never the whole file.
//!
//! The file is opened once to read its header (that mapping is dropped again); then each
//! needed region (an expert's gate, up and down rows, coalesced where adjacent) gets a
//! mapping of its own, so the process maps only its share. Every slice is rows of its
//! matrices (of down: its share of whole rows, `slice_down_rows`), contiguous in a model
//! file as in a split file: nothing is copied.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};
use shared::gguf::{model_identity, GgufFile, TensorInfo};
use shared::models::HParams;
use shared::moe::FfnMatrices;
use shared::placement::split::{read_split_info, split_tensor_name};
use shared::placement::{slice_down_rows, FfnTensors, Part, RowSource, SliceSpec};
use shared::quant::matmul::WeightMatrix;
use shared::quant::GgmlType;
use tracing::info;

use crate::error::NodeError;

#[derive(Clone, Copy, Debug)]
struct MatLoc {
    /// Index into `maps`.
    map: usize,
    offset: usize,
    ty: GgmlType,
    n_rows: usize,
    n_cols: usize,
}

#[derive(Clone, Copy, Debug)]
struct SliceMats {
    gate: MatLoc,
    up: MatLoc,
    down: MatLoc,
}

/// A byte range of a model part file that must be mapped; `loc` is filled in once mapped.
struct Region {
    part: usize,
    start: u64,
    len: u64,
}

/// The model facts a node checks dispatches against.
#[derive(Clone, Copy, Debug)]
pub struct ModelFacts {
    pub n_layer: usize,
    pub n_expert: usize,
    pub n_embd: usize,
    pub n_expert_used: usize,
}

/// The weights of the slices one node serves.
pub struct NodeWeights {
    identity: [u8; 32],
    facts: ModelFacts,
    slices: Vec<SliceSpec>,
    maps: Vec<Mmap>,
    /// (layer, part) → expert → its slices in ff order.
    layers: HashMap<(u32, Part), BTreeMap<u32, Vec<SliceMats>>>,
    mapped_bytes: u64,
    path: PathBuf,
    from_split_file: bool,
}

impl std::fmt::Debug for NodeWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWeights")
            .field("path", &self.path)
            .field("slices", &self.slices.len())
            .field("mapped_bytes", &self.mapped_bytes)
            .finish_non_exhaustive()
    }
}

impl NodeWeights {
    /// Opens `path` (a model file, or a `split` file) and maps the bytes of `wanted`
    /// (`None`: everything a split file holds; an ordinary model file needs a list).
    pub fn open(path: &Path, wanted: Option<&[SliceSpec]>) -> Result<NodeWeights, NodeError> {
        let file = GgufFile::open(path)?;
        let hp = HParams::from_gguf(&file)?;
        let facts = ModelFacts {
            n_layer: hp.n_layer_all,
            n_expert: hp.n_expert,
            n_embd: hp.n_embd,
            n_expert_used: hp.n_expert_used,
        };
        let split = read_split_info(&file)?;
        let from_split_file = split.is_some();
        let (identity, slices) = match split {
            Some(info) => {
                let slices = match wanted {
                    None => info.slices.clone(),
                    Some(w) => {
                        for s in w {
                            if !info.slices.contains(s) {
                                return Err(NodeError::NotInFile {
                                    path: path.to_owned(),
                                    slice: *s,
                                });
                            }
                        }
                        w.to_vec()
                    }
                };
                (info.model_identity, slices)
            }
            None => {
                let slices = wanted.ok_or_else(|| NodeError::NothingToServe {
                    path: path.to_owned(),
                })?;
                (model_identity(&file), slices.to_vec())
            }
        };
        if slices.is_empty() {
            return Err(NodeError::NothingToServe {
                path: path.to_owned(),
            });
        }
        let mut slices = slices;
        slices.sort_unstable();

        let mut loader = Loader {
            file: &file,
            regions: Vec::new(),
        };
        let mut pending: Vec<(SliceSpec, [PendingMat; 3])> = Vec::with_capacity(slices.len());
        for s in &slices {
            check_slice(s, &facts, &hp)?;
            let mats = if from_split_file {
                loader.split_slice(s)?
            } else {
                loader.model_slice(s, &hp)?
            };
            pending.push((*s, mats));
        }
        let Loader { regions, .. } = loader;
        let part_paths: Vec<PathBuf> = (0..file.n_parts())
            .map(|p| file.part_path(p).to_owned())
            .collect();
        drop(file);

        let (maps, region_loc, mapped_bytes) = map_regions(&part_paths, &regions)?;
        let mut layers: HashMap<(u32, Part), BTreeMap<u32, Vec<SliceMats>>> = HashMap::new();
        for (s, mats) in pending {
            let resolve = |m: PendingMat| {
                let (map, offset) = region_loc[m.region];
                MatLoc {
                    map,
                    offset,
                    ty: m.ty,
                    n_rows: m.n_rows,
                    n_cols: m.n_cols,
                }
            };
            let [g, u, d] = mats;
            layers
                .entry((s.layer, s.part))
                .or_default()
                .entry(s.expert)
                .or_default()
                .push(SliceMats {
                    gate: resolve(g),
                    up: resolve(u),
                    down: resolve(d),
                });
        }
        info!(
            path = %path.display(),
            slices = slices.len(),
            mapped_bytes,
            mappings = maps.len(),
            split_file = from_split_file,
            "weights mapped"
        );
        let me = NodeWeights {
            identity,
            facts,
            slices,
            maps,
            layers,
            mapped_bytes,
            path: path.to_owned(),
            from_split_file,
        };
        // Check every view once so that serving never meets a bad shape.
        for ((_, part), experts) in &me.layers {
            for slices in experts.values() {
                for s in slices {
                    match part {
                        Part::Routed | Part::Dense => {
                            me.matrices(s).validate_slice(facts.n_embd)?
                        }
                    }
                }
            }
        }
        Ok(me)
    }

    /// The model identity of the full model these weights belong to.
    pub fn identity(&self) -> &[u8; 32] {
        &self.identity
    }

    pub fn facts(&self) -> ModelFacts {
        self.facts
    }

    /// The slices served, sorted.
    pub fn slices(&self) -> &[SliceSpec] {
        &self.slices
    }

    /// Bytes of the model file(s) mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_bytes
    }

    /// Bytes of weights served.
    pub fn weight_bytes(&self) -> u64 {
        let mut total = 0u64;
        for experts in self.layers.values() {
            for slices in experts.values() {
                for s in slices {
                    for m in [s.gate, s.up, s.down] {
                        total += (m.ty.row_bytes(m.n_cols).unwrap_or(0) * m.n_rows) as u64;
                    }
                }
            }
        }
        total
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn from_split_file(&self) -> bool {
        self.from_split_file
    }

    fn bytes(&self, m: &MatLoc) -> &[u8] {
        let len = m.ty.row_bytes(m.n_cols).unwrap_or(0) * m.n_rows;
        let all: &[u8] = &self.maps[m.map];
        // In range by construction (regions were mapped whole; checked again by validate()).
        all.get(m.offset..m.offset + len).unwrap_or(&[])
    }

    fn matrix(&self, m: &MatLoc) -> WeightMatrix<'_> {
        WeightMatrix {
            ty: m.ty,
            n_rows: m.n_rows,
            n_cols: m.n_cols,
            data: self.bytes(m),
        }
    }

    fn matrices(&self, s: &SliceMats) -> FfnMatrices<'_> {
        FfnMatrices {
            gate: self.matrix(&s.gate),
            up: self.matrix(&s.up),
            down: self.matrix(&s.down),
        }
    }

    /// The slices of (layer, part, expert) held, in ff order; empty when none.
    pub fn expert(&self, layer: u32, part: Part, expert: u32) -> Vec<FfnMatrices<'_>> {
        self.layers
            .get(&(layer, part))
            .and_then(|m| m.get(&expert))
            .map(|v| v.iter().map(|s| self.matrices(s)).collect())
            .unwrap_or_default()
    }

    /// The mapped byte ranges, one per mapping (page-aligned starts): what `--numa-node`
    /// binds to its node's memory.
    pub fn mapped_slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.maps.iter().map(|m| &m[..])
    }

    /// Reads every mapped page once, so the first dispatches do not pay for page faults.
    pub fn prefault(&self) -> u64 {
        let mut sum = 0u64;
        for m in &self.maps {
            for page in m.chunks(4096) {
                sum = sum.wrapping_add(page[0] as u64);
            }
        }
        sum
    }
}

fn check_slice(s: &SliceSpec, facts: &ModelFacts, hp: &HParams) -> Result<(), NodeError> {
    let bad = |detail: String| NodeError::BadSlice { slice: *s, detail };
    if s.layer as usize >= facts.n_layer {
        return Err(bad(format!("the model has {} layers", facts.n_layer)));
    }
    match s.part {
        Part::Routed => {
            if !hp.is_moe_layer(s.layer as usize) {
                return Err(bad("the layer has no routed experts".into()));
            }
            if s.expert as usize >= facts.n_expert {
                return Err(bad(format!("the model has {} experts", facts.n_expert)));
            }
        }
        Part::Dense => {
            if s.expert != 0 {
                return Err(bad("a dense part is expert 0".into()));
            }
        }
    }
    if s.ff_len == 0 {
        return Err(bad("an empty range".into()));
    }
    Ok(())
}

struct PendingMat {
    /// Index into the loader's regions.
    region: usize,
    ty: GgmlType,
    n_rows: usize,
    n_cols: usize,
}

struct Loader<'f> {
    file: &'f GgufFile,
    regions: Vec<Region>,
}

impl Loader<'_> {
    fn tensor(&self, name: &str) -> Result<&TensorInfo, NodeError> {
        self.file
            .tensor(name)
            .ok_or_else(|| NodeError::MissingTensor(name.to_owned()))
    }

    fn region(&mut self, info: &TensorInfo, start: u64, len: u64) -> usize {
        let base = self.file.part_data_offset(info.part) + info.offset;
        self.regions.push(Region {
            part: info.part,
            start: base + start,
            len,
        });
        self.regions.len() - 1
    }

    /// A slice stored on its own in a split file: three whole 2-D tensors.
    fn split_slice(&mut self, s: &SliceSpec) -> Result<[PendingMat; 3], NodeError> {
        let mut out = Vec::with_capacity(3);
        for matrix in ["ffn_gate", "ffn_up", "ffn_down"] {
            let name = split_tensor_name(s.layer, s.part, s.expert, matrix);
            let info = self.tensor(&name)?.clone();
            let (n_cols, n_rows) = (info.ne[0] as usize, info.n_rows() as usize);
            let region = self.region(&info, 0, info.byte_len);
            out.push(PendingMat {
                region,
                ty: info.ty,
                n_rows,
                n_cols,
            });
        }
        let [g, u, d]: [PendingMat; 3] = out
            .try_into()
            .map_err(|_| NodeError::MissingTensor("split slice".into()))?;
        Ok([g, u, d])
    }

    /// A slice of an ordinary model file: rows of gate and up and its share of down's rows
    /// ([`slice_down_rows`]), all contiguous.
    fn model_slice(&mut self, s: &SliceSpec, hp: &HParams) -> Result<[PendingMat; 3], NodeError> {
        let file = self.file;
        let t = FfnTensors::find(file, hp, s.layer as usize, s.part)?.ok_or_else(|| {
            NodeError::BadSlice {
                slice: *s,
                detail: "the layer has no such FFN tensors".into(),
            }
        })?;
        let (n_embd, n_ff) = (t.n_embd, t.n_ff);
        let expert = match s.part {
            Part::Routed => s.expert as usize,
            Part::Dense => 0,
        };
        let (ff_start, ff_len) = (s.ff_start as usize, s.ff_len as usize);
        if ff_start + ff_len > n_ff {
            return Err(NodeError::BadSlice {
                slice: *s,
                detail: format!("rows past the intermediate size {n_ff}"),
            });
        }

        // gate and up: rows [ff_start, ff_start + ff_len) of the expert's matrix.
        let mut rows_of = |src: &RowSource<'_>| {
            let rb = src.info.row_bytes();
            let start = ((expert * src.rows_per_expert + src.first_row + ff_start) as u64) * rb;
            let region = self.region(src.info, start, ff_len as u64 * rb);
            PendingMat {
                region,
                ty: src.info.ty,
                n_rows: ff_len,
                n_cols: n_embd,
            }
        };
        let gate = rows_of(&t.gate);
        let up = rows_of(&t.up);

        // A slice is computed exactly, in two rounds: it computes whole rows of down (its
        // share of them, from the tokens' whole hidden rows), contiguous in the file.
        let down = t.down;
        let rb = down.row_bytes();
        let rows = slice_down_rows(ff_start, ff_len, n_ff, n_embd);
        let first = (expert * n_embd + rows.start) as u64;
        let region = self.region(down, first * rb, rows.len() as u64 * rb);
        let down_mat = PendingMat {
            region,
            ty: down.ty,
            n_rows: rows.len(),
            n_cols: n_ff,
        };
        Ok([gate, up, down_mat])
    }
}

/// Maps `regions` (coalescing neighbours within a page of each other, per part file);
/// returns the mappings, each region's (mapping, offset in it), and the bytes mapped.
#[allow(clippy::type_complexity)]
fn map_regions(
    part_paths: &[PathBuf],
    regions: &[Region],
) -> Result<(Vec<Mmap>, Vec<(usize, usize)>, u64), NodeError> {
    const PAGE: u64 = 4096;
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| (regions[i].part, regions[i].start));
    let mut maps = Vec::new();
    let mut loc = vec![(0usize, 0usize); regions.len()];
    let mut mapped = 0u64;
    let mut i = 0;
    while i < order.len() {
        let first = &regions[order[i]];
        let part = first.part;
        let map_start = first.start / PAGE * PAGE;
        let mut map_end = first.start + first.len;
        let mut j = i + 1;
        while j < order.len() {
            let r = &regions[order[j]];
            if r.part != part || r.start > map_end.div_ceil(PAGE) * PAGE {
                break;
            }
            map_end = map_end.max(r.start + r.len);
            j += 1;
        }
        let path = &part_paths[part];
        let f = File::open(path).map_err(|e| NodeError::Io {
            path: path.clone(),
            source: e,
        })?;
        let len = (map_end - map_start) as usize;
        // SAFETY: the file is opened read-only and mapped read-only; as for every mapping of a
        // model file, moeshard requires that it is not modified while it is served.
        let map =
            unsafe { MmapOptions::new().offset(map_start).len(len).map(&f) }.map_err(|e| {
                NodeError::Io {
                    path: path.clone(),
                    source: e,
                }
            })?;
        // The kernel maps whole pages: count what /proc/PID/smaps shows.
        mapped += (len as u64).div_ceil(PAGE) * PAGE;
        for &k in &order[i..j] {
            loc[k] = (maps.len(), (regions[k].start - map_start) as usize);
        }
        maps.push(map);
        i = j;
    }
    Ok((maps, loc, mapped))
}
