//! Code point classes, GPT-2's byte-to-character table and UTF-8 helpers, with the
//! exact tables llama.cpp's tokenizer uses (`src/unicode.cpp`): general categories
//! from Unicode 15.1 and a fixed list of White_Space code points.

use std::sync::OnceLock;

use super::unicode_table::CLASS_RUNS;

/// General-category class bits of one code point, as llama.cpp groups them.
///
/// `0` is reserved for "outside the current chunk" in the hand-written splitters
/// (llama.cpp's empty `unicode_cpt_flags{}`), so every real code point has a non-zero
/// class (unassigned ones are [`Class::UNDEFINED`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Class {
    bits: u8,
    whitespace: bool,
}

impl Class {
    // The bits of `unicode_table.rs`; separators (0x08) and control/format/
    // private-use/surrogate code points (0x80) are only ever "other" here.
    pub(crate) const UNDEFINED: u8 = 0x01;
    pub(crate) const NUMBER: u8 = 0x02;
    pub(crate) const LETTER: u8 = 0x04;
    pub(crate) const MARK: u8 = 0x10;
    pub(crate) const PUNCTUATION: u8 = 0x20;
    pub(crate) const SYMBOL: u8 = 0x40;

    /// The class of a position past either end of a chunk.
    pub(crate) const NONE: Class = Class {
        bits: 0,
        whitespace: false,
    };

    pub(crate) fn of(cp: u32) -> Class {
        Class {
            bits: category_bits(cp),
            whitespace: is_whitespace(cp),
        }
    }

    /// The general-category bits alone (one bit set for a real code point).
    pub(crate) fn category(self) -> u8 {
        self.bits
    }

    /// True for a real code point, false for [`Class::NONE`].
    pub(crate) fn any(self) -> bool {
        self.bits != 0 || self.whitespace
    }

    pub(crate) fn is_letter(self) -> bool {
        self.bits & Self::LETTER != 0
    }

    pub(crate) fn is_number(self) -> bool {
        self.bits & Self::NUMBER != 0
    }

    pub(crate) fn is_mark(self) -> bool {
        self.bits & Self::MARK != 0
    }

    pub(crate) fn is_whitespace(self) -> bool {
        self.whitespace
    }
}

/// The category bits of `cp` from the generated Unicode 15.1 table.
fn category_bits(cp: u32) -> u8 {
    if cp >= 0x11_0000 {
        return Class::UNDEFINED;
    }
    // CLASS_RUNS starts at 0, so the partition point is at least 1.
    let idx = CLASS_RUNS.partition_point(|&(start, _)| start <= cp);
    CLASS_RUNS[idx - 1].1
}

/// Unicode's White_Space property: the fixed list llama.cpp uses.
pub(crate) fn is_whitespace(cp: u32) -> bool {
    matches!(
        cp,
        0x09..=0x0D
            | 0x20
            | 0x85
            | 0xA0
            | 0x1680
            | 0x2000..=0x200A
            | 0x2028
            | 0x2029
            | 0x202F
            | 0x205F
            | 0x3000
    )
}

/// Han ideographs as llama.cpp's `unicode_cpt_is_han` defines them (Kimi-K2's splitter).
pub(crate) fn is_han(cp: u32) -> bool {
    matches!(
        cp,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0x2CEB0..=0x2EBEF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// Simple lowercase for the contraction checks (`'S`, `'RE`, ...).
///
/// Only ASCII matters here: the two non-ASCII code points whose simple lowercase is
/// ASCII (U+0130 → `i`, U+212A → `k`) are not letters of any contraction.
pub(crate) fn ascii_lower(cp: u32) -> u32 {
    if (u32::from(b'A')..=u32::from(b'Z')).contains(&cp) {
        cp + 32
    } else {
        cp
    }
}

/// GPT-2's reversible map from bytes to printable characters (`bytes_to_unicode`).
pub(crate) struct ByteMap {
    /// The character each byte stands for, as UTF-8 ready to append.
    pub(crate) to_str: [String; 256],
}

impl ByteMap {
    fn build() -> ByteMap {
        let mut to_char = ['\0'; 256];
        let mut assigned = [false; 256];
        let printable = (0x21u32..=0x7E).chain(0xA1..=0xAC).chain(0xAE..=0xFF);
        for b in printable {
            to_char[b as usize] = char::from_u32(b).unwrap_or('\0');
            assigned[b as usize] = true;
        }
        let mut next = 256u32;
        for b in 0..256usize {
            if !assigned[b] {
                to_char[b] = char::from_u32(next).unwrap_or('\0');
                next += 1;
            }
        }
        let to_str = std::array::from_fn(|b| to_char[b].to_string());
        ByteMap { to_str }
    }

    /// The byte a character stands for, if it is one of the 256 mapped characters.
    pub(crate) fn byte_of(&self, c: char) -> Option<u8> {
        let cp = c as u32;
        match cp {
            0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => u8::try_from(cp).ok(),
            256..=511 => {
                // The unprintable bytes were numbered from 256 in byte order.
                let rank = cp - 256;
                UNPRINTABLE.get(rank as usize).copied()
            }
            _ => None,
        }
    }
}

/// The bytes that GPT-2 maps to U+0100.., in order.
static UNPRINTABLE: [u8; 68] = {
    let mut out = [0u8; 68];
    let mut n = 0;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        if !printable {
            out[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    out
};

pub(crate) fn byte_map() -> &'static ByteMap {
    static MAP: OnceLock<ByteMap> = OnceLock::new();
    MAP.get_or_init(ByteMap::build)
}

/// The length of the longest prefix of `bytes` that is complete UTF-8, and whether
/// the rest is only an unfinished sequence (true) or contains invalid bytes (false).
pub(crate) fn utf8_complete_prefix(bytes: &[u8]) -> (usize, bool) {
    match std::str::from_utf8(bytes) {
        Ok(_) => (bytes.len(), true),
        Err(e) => (e.valid_up_to(), e.error_len().is_none()),
    }
}
