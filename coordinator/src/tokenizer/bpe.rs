//! Byte-level BPE (llama.cpp's `llm_tokenizer_bpe_session`): each pre-tokenized word
//! is byte-encoded (GPT-2's byte-to-character map), split into characters, and the
//! adjacent pair with the best merge rank is merged until none is left. A priority
//! queue over a linked list of symbols keeps this O(n log n) per word.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::pretokenize::PreTokenizer;
use super::unicode::byte_map;
use super::vocab::Vocab;

/// One symbol of a word being merged: a byte range of the encoded word.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    /// Length in bytes; 0 once merged into its left neighbour.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Tokenizes one raw-text fragment (no special tokens inside) into `out`.
pub(crate) fn tokenize(vocab: &Vocab, pre: &PreTokenizer, text: &str, out: &mut Vec<u32>) {
    let map = byte_map();
    let mut encoded = String::new();
    let mut symbols: Vec<Symbol> = Vec::new();
    let mut key = String::new();
    // (rank, left, right, merged length), smallest rank then leftmost first.
    let mut queue: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();

    for word in pre.split(text) {
        encoded.clear();
        for &b in word.as_bytes() {
            encoded.push_str(&map.to_str[b as usize]);
        }
        if vocab.ignore_merges {
            if let Some(id) = vocab.token_id(&encoded) {
                out.push(id);
                continue;
            }
        }

        symbols.clear();
        let n_chars = encoded.chars().count();
        for (i, (start, ch)) in encoded.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < n_chars).then_some(i + 1),
            });
        }

        queue.clear();
        let try_pair = |symbols: &[Symbol],
                        key: &mut String,
                        queue: &mut BinaryHeap<Reverse<(u32, usize, usize, usize)>>,
                        left: Option<usize>,
                        right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let (ls, rs) = (symbols[l], symbols[r]);
            key.clear();
            key.push_str(&encoded[ls.start..ls.start + ls.len]);
            key.push(' ');
            key.push_str(&encoded[rs.start..rs.start + rs.len]);
            if let Some(rank) = vocab.merge_rank(key) {
                queue.push(Reverse((rank, l, r, ls.len + rs.len)));
            }
        };
        for i in 1..symbols.len() {
            try_pair(&symbols, &mut key, &mut queue, Some(i - 1), Some(i));
        }

        while let Some(Reverse((_, l, r, size))) = queue.pop() {
            let (ls, rs) = (symbols[l], symbols[r]);
            // A pair is stale once either side has changed; both sides keep their
            // start, so an unchanged total length means an unchanged text.
            if ls.len == 0 || rs.len == 0 || ls.len + rs.len != size {
                continue;
            }
            symbols[l].len += rs.len;
            symbols[r].len = 0;
            symbols[l].next = rs.next;
            if let Some(nn) = rs.next {
                symbols[nn].prev = Some(l);
            }
            let (prev, next) = (symbols[l].prev, symbols[l].next);
            try_pair(&symbols, &mut key, &mut queue, prev, Some(l));
            try_pair(&symbols, &mut key, &mut queue, Some(l), next);
        }

        for s in symbols.iter().filter(|s| s.len > 0) {
            let piece = &encoded[s.start..s.start + s.len];
            match vocab.token_id(piece) {
                Some(id) => out.push(id),
                None => {
                    // llama.cpp then looks up each byte of the encoded piece as a
                    // one-byte string: only ASCII bytes can be tokens that way.
                    for &b in piece.as_bytes() {
                        if b.is_ascii() {
                            let one = [b];
                            if let Some(id) = std::str::from_utf8(&one)
                                .ok()
                                .and_then(|s| vocab.token_id(s))
                            {
                                out.push(id);
                            }
                        }
                    }
                }
            }
        }
    }
}
