//! SentencePiece-style tokenization (llama.cpp's `llm_tokenizer_spm_session`): the
//! text (spaces already turned into `▁`) is split into characters, and the adjacent
//! pair whose concatenation is the vocabulary token with the highest score is merged
//! until no pair forms a token. Characters left without a token fall back to
//! `<0xNN>` byte tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge: highest score first, then the leftmost.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        match self.score.partial_cmp(&other.score) {
            Some(Ordering::Equal) | None => other.left.cmp(&self.left),
            Some(o) => o,
        }
    }
}

/// Tokenizes `text` (already escaped: `▁` for spaces) into `out`.
pub(crate) fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    if text.is_empty() {
        return;
    }
    let n_chars = text.chars().count();
    let mut symbols: Vec<Symbol> = text
        .char_indices()
        .enumerate()
        .map(|(i, (start, ch))| Symbol {
            start,
            len: ch.len_utf8(),
            prev: i.checked_sub(1),
            next: (i + 1 < n_chars).then_some(i + 1),
        })
        .collect();

    let mut queue = BinaryHeap::new();
    let try_pair =
        |symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else {
                return;
            };
            let size = symbols[l].len + symbols[r].len;
            let start = symbols[l].start;
            if let Some(id) = vocab.token_id(&text[start..start + size]) {
                queue.push(Bigram {
                    score: vocab.scores[id as usize],
                    left: l,
                    right: r,
                    size,
                });
            }
        };
    for i in 1..symbols.len() {
        try_pair(&symbols, &mut queue, Some(i - 1), Some(i));
    }

    while let Some(b) = queue.pop() {
        let (ls, rs) = (symbols[b.left], symbols[b.right]);
        if ls.len == 0 || rs.len == 0 || ls.len + rs.len != b.size {
            continue;
        }
        symbols[b.left].len += rs.len;
        symbols[b.right].len = 0;
        symbols[b.left].next = rs.next;
        if let Some(nn) = rs.next {
            symbols[nn].prev = Some(b.left);
        }
        let (prev, next) = (symbols[b.left].prev, symbols[b.left].next);
        try_pair(&symbols, &mut queue, prev, Some(b.left));
        try_pair(&symbols, &mut queue, Some(b.left), next);
    }

    // Every merged symbol is a token by construction, so llama.cpp's re-segmentation
    // through its reverse-merge map only ever reaches single characters, and those
    // become byte tokens.
    let mut cur = Some(0usize);
    while let Some(i) = cur {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.token_id(piece) {
            Some(id) => out.push(id),
            None => {
                for &b in piece.as_bytes() {
                    if let Some(id) = byte_token(vocab, b) {
                        out.push(id);
                    }
                }
            }
        }
        cur = s.next;
    }
}

/// The token for a raw byte: `<0xNN>`, else the byte itself as text.
pub(crate) fn byte_token(vocab: &Vocab, b: u8) -> Option<u32> {
    let hex = format!("<0x{b:02X}>");
    if let Some(id) = vocab.token_id(&hex) {
        return Some(id);
    }
    if b.is_ascii() {
        if let Some(id) = vocab.token_id(&char::from(b).to_string()) {
            return Some(id);
        }
    }
    // llama.cpp throws here; the unknown token is the least surprising stand-in.
    tracing::warn!("no token for byte 0x{b:02X}; using the unknown token");
    vocab.unk
}
