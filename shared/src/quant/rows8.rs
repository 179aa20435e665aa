//! Q4_K with eight rows interleaved (`Q4_K_R8`), the layout `moeshard convert --repack`
//! writes once to a file so that the one-token kernel reads it zero-copy from the mapping.
//!
//! A Q4_K matrix's rows are taken eight at a time (a *group*); a group's super-block `i` of
//! all eight rows is one 1152-byte block (the bytes of eight Q4_K super-blocks, rearranged):
//!
//! | bytes      | what                                                                  |
//! |------------|-----------------------------------------------------------------------|
//! | 0..16      | `d` of rows 0..8 (f16)                                                |
//! | 16..32     | `dmin` of rows 0..8 (f16)                                             |
//! | 32..128    | the 12 packed 6-bit scale/min bytes as three u32 words `a0, a1, a2`, each word of rows 0..8 (`a0` of every row, then `a1`, then `a2`) |
//! | 128..1152  | quants: for quarter `c` (64 elements) and step `j` (0..8), 32 bytes = bytes `32c + 4j .. +4` of rows 0..8 |
//!
//! So one 32-byte load holds four quant bytes of each of the eight rows (a row per 32-bit
//! lane), and the kernel's sums land in the lanes of their rows: no horizontal reduction and
//! no per-row scale unpacking, where the plain layout needs both for every row. A group is
//! `8 × row_bytes` contiguous bytes, so a tensor keeps Q4_K's size and any range of whole
//! groups is contiguous. The float operations are CPU_REPACK's GEMV order, the order moeshard
//! already uses for Q4_K matrices of a multiple of 8 rows, so a converted file gives the
//! same bits as the original.

/// Rows per group.
pub const GROUP_ROWS: usize = 8;
/// Bytes of one Q4_K super-block (one row's share of a group block).
pub const SUPER_BLOCK_BYTES: usize = 144;
/// Bytes of one group block: super-block `i` of the group's eight rows.
pub const GROUP_BLOCK_BYTES: usize = GROUP_ROWS * SUPER_BLOCK_BYTES;
/// Offsets of the fields of a group block.
pub const D_AT: usize = 0;
pub const DMIN_AT: usize = 16;
pub const SCALES_AT: usize = 32;
pub const QS_AT: usize = 128;

/// Interleaves eight plain Q4_K rows (`rows`, back to back) into one group (`out`, as long).
///
/// Panics if `rows` is not eight rows of whole super-blocks or `out` is not as long.
pub fn interleave(rows: &[u8], out: &mut [u8]) {
    let blocks = check_group("interleave", rows.len(), out.len());
    let rb = blocks * SUPER_BLOCK_BYTES;
    for (i, g) in out.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
        for r in 0..GROUP_ROWS {
            let b = &rows[r * rb + i * SUPER_BLOCK_BYTES..r * rb + (i + 1) * SUPER_BLOCK_BYTES];
            for (at, (from, len)) in field_map(r) {
                g[at..at + len].copy_from_slice(&b[from..from + len]);
            }
        }
    }
}

/// The inverse of [`interleave`]: a group back to its eight plain Q4_K rows.
///
/// Panics if `group` is not a group of whole blocks or `out` is not as long.
pub fn deinterleave(group: &[u8], out: &mut [u8]) {
    let blocks = check_group("deinterleave", group.len(), out.len());
    let rb = blocks * SUPER_BLOCK_BYTES;
    // The hot path of batches on a converted file (every chunk of rows is de-interleaved
    // before the Q4_K tiles kernels): fixed-size moves, no per-field `memcpy` calls.
    for (i, g) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
        let g: &[u8; GROUP_BLOCK_BYTES] = g.try_into().expect("chunks_exact");
        for r in 0..GROUP_ROWS {
            let b = &mut out[r * rb + i * SUPER_BLOCK_BYTES..r * rb + (i + 1) * SUPER_BLOCK_BYTES];
            let b: &mut [u8; SUPER_BLOCK_BYTES] = b.try_into().expect("one super-block");
            b[0..2].copy_from_slice(&g[D_AT + 2 * r..D_AT + 2 * r + 2]);
            b[2..4].copy_from_slice(&g[DMIN_AT + 2 * r..DMIN_AT + 2 * r + 2]);
            for w in 0..3 {
                let at = SCALES_AT + 32 * w + 4 * r;
                b[4 + 4 * w..8 + 4 * w].copy_from_slice(&g[at..at + 4]);
            }
            for k in 0..32 {
                let at = QS_AT + 32 * k + 4 * r;
                b[16 + 4 * k..20 + 4 * k].copy_from_slice(&g[at..at + 4]);
            }
        }
    }
}

/// Interleaves every group of a matrix of plain Q4_K rows (`data`: a multiple of eight rows
/// of `row_bytes`), in place.
///
/// Panics if `data` is not whole groups of `row_bytes` rows of whole super-blocks.
pub fn interleave_matrix(data: &mut [u8], row_bytes: usize) {
    let group = GROUP_ROWS * row_bytes;
    assert!(
        row_bytes.is_multiple_of(SUPER_BLOCK_BYTES)
            && group > 0
            && data.len().is_multiple_of(group),
        "interleave_matrix: {} bytes are not whole groups of 8 rows of {row_bytes}",
        data.len()
    );
    let mut tmp = vec![0u8; group];
    for g in data.chunks_exact_mut(group) {
        interleave(g, &mut tmp);
        g.copy_from_slice(&tmp);
    }
}

/// Where row `r`'s fields go in a group block: (offset in the group block, (offset in the
/// row's super-block, length)).
fn field_map(r: usize) -> impl Iterator<Item = (usize, (usize, usize))> {
    let fixed = [
        (D_AT + 2 * r, (0, 2)),
        (DMIN_AT + 2 * r, (2, 2)),
        (SCALES_AT + 4 * r, (4, 4)),
        (SCALES_AT + 32 + 4 * r, (8, 4)),
        (SCALES_AT + 64 + 4 * r, (12, 4)),
    ];
    let quants = (0..32).map(move |k| (QS_AT + 32 * k + 4 * r, (16 + 4 * k, 4)));
    fixed.into_iter().chain(quants)
}

/// The number of super-blocks per row of a group of `len` bytes, checked against `out_len`.
fn check_group(what: &str, len: usize, out_len: usize) -> usize {
    assert!(
        len == out_len && len.is_multiple_of(GROUP_BLOCK_BYTES),
        "{what}: {len} bytes into {out_len} are not a group of whole Q4_K super-blocks"
    );
    len / GROUP_BLOCK_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_round_trips_and_places_fields() {
        let blocks = 3;
        let rows: Vec<u8> = (0..GROUP_ROWS * blocks * SUPER_BLOCK_BYTES)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let mut group = vec![0u8; rows.len()];
        interleave(&rows, &mut group);
        let mut back = vec![0u8; rows.len()];
        deinterleave(&group, &mut back);
        assert_eq!(back, rows);
        // Row 5's super-block 2: its d, its a2 word, and its quant bytes 36..40 (quarter 1,
        // step 1).
        let rb = blocks * SUPER_BLOCK_BYTES;
        let b = &rows[5 * rb + 2 * SUPER_BLOCK_BYTES..];
        let g = &group[2 * GROUP_BLOCK_BYTES..];
        assert_eq!(&g[10..12], &b[0..2]);
        assert_eq!(&g[SCALES_AT + 64 + 20..SCALES_AT + 64 + 24], &b[12..16]);
        assert_eq!(
            &g[QS_AT + 9 * 32 + 20..QS_AT + 9 * 32 + 24],
            &b[16 + 36..16 + 40]
        );
        let mut m = rows.clone();
        interleave_matrix(&mut m, rb);
        assert_eq!(m, group);
    }

    #[test]
    #[should_panic(expected = "not a group")]
    fn interleave_rejects_partial_groups() {
        let rows = vec![0u8; 7 * SUPER_BLOCK_BYTES];
        interleave(&rows, &mut vec![0u8; rows.len()]);
    }
}
