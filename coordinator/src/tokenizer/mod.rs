//! Text ↔ token ids, matching llama.cpp (`src/llama-vocab.cpp`, `src/unicode.cpp`)
//! token for token: byte-level BPE with llama.cpp's pre-tokenizer presets and
//! SentencePiece with byte fallback, special tokens found in raw text, BOS/EOS
//! conventions, the end-of-generation set, and detokenization.
//!
//! [`Vocab`] is the GGUF-independent core (built from a [`VocabSpec`] of plain
//! vectors); [`Tokenizer`] adds the pre-tokenizer and piece cache and is what the
//! engine uses, normally through [`Tokenizer::from_gguf`].

mod bpe;
mod pretokenize;
mod spm;
mod unicode;
mod unicode_table;
mod vocab;

#[cfg(test)]
mod tests;

use shared::gguf::{GgufFile, MetaValue};

use self::pretokenize::PreTokenizer;
use self::unicode::{byte_map, utf8_complete_prefix};
pub use self::vocab::{attr, SpecialIds, Vocab, VocabKind, VocabSpec};

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required metadata key is absent.
    #[error("missing tokenizer metadata key {0}")]
    MissingKey(&'static str),
    /// A metadata key has the wrong type.
    #[error("tokenizer metadata key {key} has the wrong type (expected {expected})")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
    /// `tokenizer.ggml.model` names an algorithm this tokenizer does not implement.
    #[error("unsupported tokenizer model '{0}' (supported: gpt2, llama)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a preset llama.cpp does not know either.
    #[error("unknown pre-tokenizer '{0}'")]
    UnknownPre(String),
    /// A pre-tokenizer regex could not be compiled.
    #[error("pre-tokenizer regex {pattern:?}: {reason}")]
    Regex {
        /// The regex as llama.cpp writes it.
        pattern: String,
        /// What went wrong.
        reason: String,
    },
    /// The vocabulary data is inconsistent.
    #[error("invalid vocabulary: {0}")]
    Invalid(String),
}

/// A piece of input text: raw text (a byte range) or a special token found in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// A tokenizer with llama.cpp's behaviour. Cheap to share (`&self` everywhere).
#[derive(Debug)]
pub struct Tokenizer {
    vocab: Vocab,
    pre: Option<PreTokenizer>,
    /// Each token's text as output bytes, special tokens rendered (llama.cpp's
    /// `cache_token_to_piece`).
    pieces: Vec<Vec<u8>>,
}

impl Tokenizer {
    /// Builds a tokenizer from a vocabulary.
    pub fn new(vocab: Vocab) -> Result<Tokenizer, TokenizerError> {
        let pre = match &vocab.preset {
            Some(p) => Some(PreTokenizer::new(&p.regexes)?),
            None => None,
        };
        let pieces = (0..vocab.n_tokens() as u32)
            .map(|id| render_piece(&vocab, id))
            .collect();
        Ok(Tokenizer { vocab, pre, pieces })
    }

    /// Builds a tokenizer from a vocabulary spec.
    pub fn from_spec(spec: VocabSpec) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::new(Vocab::new(spec)?)
    }

    /// Reads `tokenizer.ggml.*` (and `general.name` / `general.architecture`) from a
    /// GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_spec(spec_from_gguf(|k| file.get(k))?)
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Number of tokens (the model's vocabulary size).
    pub fn n_vocab(&self) -> usize {
        self.vocab.n_tokens()
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.vocab.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.vocab.eos
    }

    /// End-of-turn token (metadata, else found by its text).
    pub fn eot(&self) -> Option<u32> {
        self.vocab.eot
    }

    /// End-of-message token (`<|eom_id|>`).
    pub fn eom(&self) -> Option<u32> {
        self.vocab.eom
    }

    /// Unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.vocab.unk
    }

    /// Padding token.
    pub fn pad(&self) -> Option<u32> {
        self.vocab.pad
    }

    /// Separator token.
    pub fn sep(&self) -> Option<u32> {
        self.vocab.sep
    }

    /// Mask token.
    pub fn mask(&self) -> Option<u32> {
        self.vocab.mask
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.vocab.add_eos
    }

    /// Whether the model wants a separator appended (BERT-style; not done by
    /// [`Tokenizer::encode`], as in llama.cpp's BPE/SPM paths).
    pub fn add_sep(&self) -> bool {
        self.vocab.add_sep
    }

    /// Whether generating `id` ends the generation (llama.cpp's EOG set).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.eog.contains(&id)
    }

    /// The end-of-generation set, in id order.
    pub fn eog_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.vocab.eog.iter().copied()
    }

    /// Whether `id` is a control token (rendered only when asked for).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.token_attr(id) & attr::CONTROL != 0
    }

    /// The id of an exact token text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.token_id(text)
    }

    /// The bytes a token stands for, special tokens rendered as their text
    /// (llama.cpp's `token_to_piece(.., special = true)`); empty for an unknown id.
    pub fn token_to_piece(&self, id: u32) -> &[u8] {
        self.pieces
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Like [`Tokenizer::token_to_piece`], but control and unknown tokens give
    /// nothing unless `special` (llama.cpp's `special` flag).
    pub fn token_to_piece_with(&self, id: u32, special: bool) -> &[u8] {
        let hidden = attr::CONTROL | attr::UNKNOWN;
        if !special && self.vocab.token_attr(id) & hidden != 0 {
            return &[];
        }
        self.token_to_piece(id)
    }

    /// Text → token ids, as `llama_tokenize(vocab, text, add_special, parse_special)`.
    ///
    /// `add_special` adds BOS/EOS where the model wants them; `parse_special` lets
    /// control tokens written in the text (e.g. `<|im_start|>`) become their ids.
    /// User-defined tokens are always matched whole, as in llama.cpp.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let v = &self.vocab;
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let push_special = |out: &mut Vec<u32>, id: Option<u32>, what: &str| match id {
            Some(id) => out.push(id),
            None => tracing::warn!("the model wants a {what} token but defines none"),
        };
        match v.kind {
            VocabKind::Spm => {
                // A space is put before the text at the start and after each
                // special token.
                let mut prev_special = true;
                if add_special && v.add_bos {
                    push_special(&mut out, v.bos, "BOS");
                }
                let mut buf = String::new();
                for f in fragments {
                    match f {
                        Fragment::Text(a, b) => {
                            buf.clear();
                            if v.add_space_prefix && prev_special {
                                buf.push(' ');
                            }
                            buf.push_str(&text[a..b]);
                            let escaped = buf.replace(' ', "\u{2581}");
                            spm::tokenize(v, &escaped, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
                if add_special && v.add_bos && out.len() >= 2 && Some(out[1]) == v.bos {
                    tracing::warn!("the prompt starts with two BOS tokens");
                }
                if add_special && v.add_eos {
                    push_special(&mut out, v.eos, "EOS");
                }
            }
            VocabKind::Bpe => {
                if add_special && v.add_bos {
                    push_special(&mut out, v.bos, "BOS");
                }
                for f in fragments {
                    match f {
                        Fragment::Text(a, b) => {
                            if let Some(pre) = &self.pre {
                                bpe::tokenize(v, pre, &text[a..b], &mut out);
                            }
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
                if add_special && v.add_eos {
                    push_special(&mut out, v.eos, "EOS");
                }
                if add_special && v.add_bos && out.len() >= 2 && Some(out[1]) == v.bos {
                    tracing::warn!("the prompt starts with two BOS tokens");
                }
            }
        }
        out
    }

    /// Splits `text` at the special tokens written in it (llama.cpp's
    /// `tokenizer_st_partition`): longest token texts first, leftmost occurrences,
    /// with their `lstrip`/`rstrip` attributes eating adjacent white space.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let v = &self.vocab;
        let mut frags = Vec::new();
        if text.is_empty() {
            return frags;
        }
        frags.push(Fragment::Text(0, text.len()));
        let bytes = text.as_bytes();
        for &id in &v.special_by_len {
            let a = v.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let tok = v.tokens[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(s, e) if text[*s..*e].contains(tok)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(s, e) = f else {
                    next.push(f);
                    continue;
                };
                let (mut base, mut len) = (s, e - s);
                loop {
                    let Some(rel) = text[base..base + len].find(tok) else {
                        if len > 0 {
                            next.push(Fragment::Text(base, base + len));
                        }
                        break;
                    };
                    let m = base + rel;
                    if m > base {
                        let mut left = m - base;
                        if a & attr::LSTRIP != 0 {
                            while left > 0 && is_c_space(bytes[base + left - 1]) {
                                left -= 1;
                            }
                        }
                        if left > 0 {
                            next.push(Fragment::Text(base, base + left));
                        }
                    }
                    next.push(Fragment::Token(id));
                    let tok_end = m + tok.len();
                    if tok_end < base + len {
                        let mut r_off = tok_end;
                        let mut r_len = base + len - tok_end;
                        if a & attr::RSTRIP != 0 {
                            while r_len > 0 && is_c_space(bytes[r_off]) {
                                r_off += 1;
                                r_len -= 1;
                            }
                        }
                        base = r_off;
                        len = r_len;
                    } else {
                        break;
                    }
                }
            }
            frags = next;
        }
        frags
    }

    /// Token ids → bytes, as `llama_detokenize(.., remove_special, unparse_special)`:
    /// `remove_special` drops a leading BOS / trailing EOS the model adds itself;
    /// `unparse_special` renders control tokens as their text. Applies the model's
    /// leading-space removal (SentencePiece) and `clean_up_tokenization_spaces`.
    pub fn detokenize(&self, ids: &[u32], remove_special: bool, unparse_special: bool) -> Vec<u8> {
        let v = &self.vocab;
        let mut ids = ids;
        let mut remove_space = v.add_space_prefix;
        if remove_special && v.add_bos && !ids.is_empty() && Some(ids[0]) == v.bos {
            remove_space = false;
            ids = &ids[1..];
        }
        if remove_special && v.add_eos && !ids.is_empty() && Some(ids[ids.len() - 1]) == v.eos {
            ids = &ids[..ids.len() - 1];
        }
        let mut text = Vec::new();
        for &id in ids {
            let mut piece = self.token_to_piece_with(id, unparse_special);
            if remove_space && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            remove_space = false;
            text.extend_from_slice(piece);
        }
        if v.clean_spaces {
            text = clean_up_spaces(&text);
        }
        text
    }

    /// Token ids → text with special tokens rendered (llama.cpp's
    /// `common_detokenize(.., special = true)`); invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.detokenize(ids, false, true)).into_owned()
    }

    /// Token ids → the text a user sees, control tokens (such as an end-of-turn
    /// token) not rendered: llama.cpp's `common_detokenize(.., special = false)`,
    /// what `generate` prints.
    pub fn decode_text(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.detokenize(ids, false, false)).into_owned()
    }
}

/// C `isspace` in the C locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t'..=b'\r')
}

/// The bytes of one token with special tokens rendered (`token_to_piece(special)`).
fn render_piece(v: &Vocab, id: u32) -> Vec<u8> {
    let a = v.attrs[id as usize];
    let text = &v.tokens[id as usize];
    if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
        return text.as_bytes().to_vec();
    }
    if a & attr::NORMAL != 0 {
        return match v.kind {
            VocabKind::Spm => text.replace('\u{2581}', " ").into_bytes(),
            VocabKind::Bpe => decode_byte_level(text),
        };
    }
    if a & attr::BYTE != 0 {
        return vec![byte_token_value(text)];
    }
    Vec::new()
}

/// GPT-2 byte-level text back to bytes; characters outside the map are written the
/// way llama.cpp's `llama_decode_text` writes them.
fn decode_byte_level(text: &str) -> Vec<u8> {
    let map = byte_map();
    let mut out = Vec::with_capacity(text.len());
    for ch in text.chars() {
        match map.byte_of(ch) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in ch.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// The byte of a `<0xNN>` token (`strtol` on the two hex digits; 0 if malformed).
fn byte_token_value(text: &str) -> u8 {
    let digits = text.get(3..5).unwrap_or("");
    let valid: String = digits.chars().take_while(char::is_ascii_hexdigit).collect();
    u8::from_str_radix(&valid, 16).unwrap_or(0)
}

/// llama.cpp's three `clean_spaces` passes: " ?", " !", " .", " ," lose the space;
/// " ' " loses both spaces; " 's", " 'm", " 're", " 've" lose the space.
fn clean_up_spaces(text: &[u8]) -> Vec<u8> {
    if text.is_empty() {
        return Vec::new();
    }
    let mut t = text.to_vec();

    let n1 = t.len();
    let mut total = 1;
    for i in 1..n1 {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);

    let n2 = t.len();
    let mut total = 1;
    let mut i = 1;
    while i < n2 {
        let x = t[i];
        if x == b'\'' && i + 1 < n2 && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }
    t.truncate(total);

    let n3 = t.len();
    let mut total = 1;
    for i in 1..n3 {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < n3 {
            let x1 = t[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if i + 2 < n3 {
                let x2 = t[i + 2];
                if matches!(x1, b'r' | b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
    t
}

/// Turns generated token ids into text as they come, holding back an unfinished
/// UTF-8 sequence until the token that completes it arrives.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    special: bool,
}

impl StreamDecoder {
    /// A decoder; `special` renders control tokens as their text.
    pub fn new(special: bool) -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            special,
        }
    }

    /// Adds one token; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending
            .extend_from_slice(tok.token_to_piece_with(id, self.special));
        self.drain(false)
    }

    /// Returns whatever is held back (an unfinished sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    fn drain(&mut self, all: bool) -> String {
        let mut out = String::new();
        loop {
            let (valid, only_unfinished) = utf8_complete_prefix(&self.pending);
            let take = if valid == self.pending.len() || (only_unfinished && !all) {
                valid
            } else if only_unfinished {
                // Flushing: the unfinished tail becomes one replacement character.
                self.pending.len()
            } else {
                // An invalid sequence: emit it as U+FFFD and go on after it.
                let bad = std::str::from_utf8(&self.pending[valid..])
                    .err()
                    .and_then(|e| e.error_len())
                    .unwrap_or(1);
                valid + bad
            };
            let chunk: Vec<u8> = self.pending.drain(..take).collect();
            out.push_str(&String::from_utf8_lossy(&chunk));
            if self.pending.is_empty() || (only_unfinished && !all) {
                break;
            }
        }
        out
    }
}

/// Reads the tokenizer metadata through `get` (a GGUF key lookup).
fn spec_from_gguf<'a>(
    get: impl Fn(&str) -> Option<&'a MetaValue>,
) -> Result<VocabSpec, TokenizerError> {
    const MODEL: &str = "tokenizer.ggml.model";
    const PRE: &str = "tokenizer.ggml.pre";
    const TOKENS: &str = "tokenizer.ggml.tokens";
    const SCORES: &str = "tokenizer.ggml.scores";
    const TYPES: &str = "tokenizer.ggml.token_type";
    const MERGES: &str = "tokenizer.ggml.merges";

    let string = |key: &'static str| -> Result<Option<String>, TokenizerError> {
        match get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or(TokenizerError::WrongType {
                    key,
                    expected: "string",
                }),
        }
    };
    let boolean = |key: &'static str| -> Result<Option<bool>, TokenizerError> {
        match get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or(TokenizerError::WrongType {
                key,
                expected: "bool",
            }),
        }
    };
    let id = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
        match get(key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                // A negative id means "none" in some converters.
                Some(i) if i < 0 => Ok(None),
                Some(i) => Ok(Some(u32::try_from(i).unwrap_or(u32::MAX))),
                None => Err(TokenizerError::WrongType {
                    key,
                    expected: "integer",
                }),
            },
        }
    };
    let array = |key: &'static str| {
        get(key).map(|v| {
            v.as_array().ok_or(TokenizerError::WrongType {
                key,
                expected: "array",
            })
        })
    };

    let model = string(MODEL)?.ok_or(TokenizerError::MissingKey(MODEL))?;
    let tokens = array(TOKENS)
        .ok_or(TokenizerError::MissingKey(TOKENS))??
        .as_str_vec()
        .ok_or(TokenizerError::WrongType {
            key: TOKENS,
            expected: "array of strings",
        })?
        .into_iter()
        .map(str::to_string)
        .collect();
    let scores = match array(SCORES).transpose()? {
        None => None,
        Some(a) => Some(a.as_f32_vec().ok_or(TokenizerError::WrongType {
            key: SCORES,
            expected: "array of numbers",
        })?),
    };
    let token_types = match array(TYPES).transpose()? {
        None => None,
        Some(a) => Some(a.as_i32_vec().ok_or(TokenizerError::WrongType {
            key: TYPES,
            expected: "array of i32",
        })?),
    };
    let merges = match array(MERGES).transpose()? {
        None => None,
        Some(a) => Some(
            a.as_str_vec()
                .ok_or(TokenizerError::WrongType {
                    key: MERGES,
                    expected: "array of strings",
                })?
                .into_iter()
                .map(str::to_string)
                .collect(),
        ),
    };
    let special = SpecialIds {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        eot: id("tokenizer.ggml.eot_token_id")?,
        eom: id("tokenizer.ggml.eom_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        sep: id("tokenizer.ggml.seperator_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        mask: id("tokenizer.ggml.mask_token_id")?,
        fim_pre: id("tokenizer.ggml.prefix_token_id")?.or(id("tokenizer.ggml.fim_pre_token_id")?),
        fim_suf: id("tokenizer.ggml.suffix_token_id")?.or(id("tokenizer.ggml.fim_suf_token_id")?),
        fim_mid: id("tokenizer.ggml.middle_token_id")?.or(id("tokenizer.ggml.fim_mid_token_id")?),
        fim_pad: id("tokenizer.ggml.fim_pad_token_id")?,
        fim_rep: id("tokenizer.ggml.fim_rep_token_id")?,
        fim_sep: id("tokenizer.ggml.fim_sep_token_id")?,
    };
    Ok(VocabSpec {
        model,
        pre: string(PRE)?,
        tokens,
        scores,
        token_types,
        merges,
        special,
        add_bos: boolean("tokenizer.ggml.add_bos_token")?,
        add_eos: boolean("tokenizer.ggml.add_eos_token")?,
        add_sep: boolean("tokenizer.ggml.add_sep_token")?,
        add_space_prefix: boolean("tokenizer.ggml.add_space_prefix")?,
        model_name: string("general.name")?,
        architecture: string("general.architecture")?,
    })
}
