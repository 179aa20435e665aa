//! The vocabulary core: tokens, their attributes, merges, special ids and flags,
//! built from plain vectors (no GGUF here) with the defaults and fix-ups that
//! llama.cpp's `llama_vocab::impl::load` applies.

use std::collections::{BTreeSet, HashMap};

use super::pretokenize::{preset, PresetInfo};
use super::TokenizerError;

/// Token attribute bits (llama.cpp's `llama_token_attr`).
pub mod attr {
    /// The token's type is unknown (GGUF type 0 or out of range).
    pub const UNDEFINED: u32 = 0;
    /// GGUF type 2.
    pub const UNKNOWN: u32 = 1 << 0;
    /// GGUF type 5, or a control token whose text contains "unused".
    pub const UNUSED: u32 = 1 << 1;
    /// GGUF type 1.
    pub const NORMAL: u32 = 1 << 2;
    /// GGUF type 3.
    pub const CONTROL: u32 = 1 << 3;
    /// GGUF type 4.
    pub const USER_DEFINED: u32 = 1 << 4;
    /// GGUF type 6 (`<0xNN>`).
    pub const BYTE: u32 = 1 << 5;
    /// White space to the left of this special token is dropped when it is parsed.
    pub const LSTRIP: u32 = 1 << 7;
    /// White space to the right of this special token is dropped when it is parsed.
    pub const RSTRIP: u32 = 1 << 8;
}

/// Which tokenizer algorithm the vocabulary uses (`tokenizer.ggml.model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// `llama`: SentencePiece with score-ordered merges and byte fallback.
    Spm,
    /// `gpt2`: byte-level BPE with ranked merges and a regex pre-tokenizer.
    Bpe,
}

/// Special token ids as found in the metadata (`None`: key absent).
#[derive(Clone, Debug, Default)]
pub struct SpecialIds {
    /// `tokenizer.ggml.bos_token_id`
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`
    pub eom: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`
    pub unk: Option<u32>,
    /// `tokenizer.ggml.seperator_token_id` (sic)
    pub sep: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`
    pub pad: Option<u32>,
    /// `tokenizer.ggml.mask_token_id`
    pub mask: Option<u32>,
    /// `tokenizer.ggml.fim_pre_token_id` (or the older `prefix_token_id`)
    pub fim_pre: Option<u32>,
    /// `tokenizer.ggml.fim_suf_token_id` (or `suffix_token_id`)
    pub fim_suf: Option<u32>,
    /// `tokenizer.ggml.fim_mid_token_id` (or `middle_token_id`)
    pub fim_mid: Option<u32>,
    /// `tokenizer.ggml.fim_pad_token_id`
    pub fim_pad: Option<u32>,
    /// `tokenizer.ggml.fim_rep_token_id`
    pub fim_rep: Option<u32>,
    /// `tokenizer.ggml.fim_sep_token_id`
    pub fim_sep: Option<u32>,
}

/// Everything a vocabulary is built from, as plain data.
#[derive(Clone, Debug, Default)]
pub struct VocabSpec {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    /// `tokenizer.ggml.pre` (BPE only; absent means "default").
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SPM merge priorities).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges` ("left right", best first).
    pub merges: Option<Vec<String>>,
    /// Special token ids from the metadata.
    pub special: SpecialIds,
    /// `tokenizer.ggml.add_bos_token`
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_sep_token`
    pub add_sep: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`
    pub add_space_prefix: Option<bool>,
    /// `general.name` (a few per-model token attributes depend on it).
    pub model_name: Option<String>,
    /// `general.architecture`
    pub architecture: Option<String>,
}

/// A vocabulary with llama.cpp's derived state: attributes after its fix-ups, the
/// resolved special ids, the end-of-generation set and the tokenizer flags.
#[derive(Debug)]
pub struct Vocab {
    pub(crate) kind: VocabKind,
    pub(crate) preset: Option<PresetInfo>,
    pub(crate) tokens: Vec<String>,
    pub(crate) scores: Vec<f32>,
    pub(crate) attrs: Vec<u32>,
    pub(crate) token_to_id: HashMap<String, u32>,
    /// "left right" → rank (the first occurrence of a merge wins).
    pub(crate) merge_ranks: HashMap<String, u32>,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    pub(crate) eot: Option<u32>,
    pub(crate) eom: Option<u32>,
    pub(crate) unk: Option<u32>,
    pub(crate) sep: Option<u32>,
    pub(crate) pad: Option<u32>,
    pub(crate) mask: Option<u32>,
    pub(crate) fim: [Option<u32>; 6],
    pub(crate) add_bos: bool,
    pub(crate) add_eos: bool,
    pub(crate) add_sep: bool,
    pub(crate) add_space_prefix: bool,
    pub(crate) clean_spaces: bool,
    pub(crate) ignore_merges: bool,
    pub(crate) eog: BTreeSet<u32>,
    /// Control, user-defined and unknown tokens, longest text first: the order in
    /// which they are searched for in raw text.
    pub(crate) special_by_len: Vec<u32>,
}

// Indices into `Vocab::fim`.
const FIM_PRE: usize = 0;
const FIM_SUF: usize = 1;
const FIM_MID: usize = 2;
const FIM_PAD: usize = 3;
const FIM_REP: usize = 4;
const FIM_SEP: usize = 5;

impl Vocab {
    /// Builds the vocabulary the way llama.cpp loads one.
    pub fn new(spec: VocabSpec) -> Result<Vocab, TokenizerError> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Invalid(
                "the vocabulary has no tokens".into(),
            ));
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::Invalid(format!(
                "{n} tokens do not fit u32 ids"
            )));
        }
        let kind = match spec.model.as_str() {
            "llama" => VocabKind::Spm,
            "gpt2" => VocabKind::Bpe,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        // Per-type defaults, then the pre-tokenizer preset (BPE).
        let (mut bos, mut eos, mut unk) = match kind {
            VocabKind::Spm => (Some(1), Some(2), Some(0)),
            VocabKind::Bpe => (Some(11), Some(11), None),
        };
        let mut add_bos;
        let mut add_space_prefix = false;
        let mut clean_spaces = false;
        let mut ignore_merges = false;
        let mut preset_info = None;
        match kind {
            VocabKind::Bpe => {
                let pre = spec.pre.as_deref().unwrap_or("default");
                if spec.pre.is_none() {
                    tracing::warn!("no tokenizer.ggml.pre: using the 'default' pre-tokenizer");
                }
                let info =
                    preset(pre).ok_or_else(|| TokenizerError::UnknownPre(pre.to_string()))?;
                clean_spaces = info.clean_spaces;
                ignore_merges = info.ignore_merges;
                add_bos = info.add_bos;
                if info.no_default_bos {
                    bos = None;
                }
                preset_info = Some(info);
            }
            VocabKind::Spm => {
                add_space_prefix = true;
                add_bos = true;
            }
        }
        if let Some(v) = spec.add_space_prefix {
            add_space_prefix = v;
        }

        let merge_ranks = match kind {
            VocabKind::Bpe => {
                let is_kimi = spec.pre.as_deref() == Some("kimi-k2");
                let merges = match (&spec.merges, is_kimi) {
                    (Some(m), _) => m.as_slice(),
                    (None, true) => &[],
                    (None, false) => {
                        return Err(TokenizerError::Invalid(
                            "a BPE vocabulary needs tokenizer.ggml.merges".into(),
                        ))
                    }
                };
                let mut ranks = HashMap::with_capacity(merges.len());
                for (rank, m) in merges.iter().enumerate() {
                    // llama.cpp splits at the first space after the first byte; a
                    // merge without one can never match a pair, so it is dropped.
                    if !m.as_bytes().iter().skip(1).any(|&b| b == b' ') {
                        continue;
                    }
                    let rank = u32::try_from(rank).unwrap_or(u32::MAX);
                    ranks.entry(m.clone()).or_insert(rank);
                }
                ranks
            }
            VocabKind::Spm => HashMap::new(),
        };

        let scores = match &spec.scores {
            Some(s) if s.len() < n => {
                return Err(TokenizerError::Invalid(format!(
                    "{} scores for {n} tokens",
                    s.len()
                )))
            }
            Some(s) => s[..n].to_vec(),
            None => vec![0.0; n],
        };
        let mut attrs = match &spec.token_types {
            Some(t) if t.len() < n => {
                return Err(TokenizerError::Invalid(format!(
                    "{} token types for {n} tokens",
                    t.len()
                )))
            }
            Some(t) => t[..n].iter().map(|&ty| attr_of_type(ty)).collect(),
            None => vec![attr::NORMAL; n],
        };

        let mut tokens = Vec::with_capacity(n);
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, text) in spec.tokens.into_iter().enumerate() {
            let text = if text.is_empty() {
                tracing::warn!("empty token at index {i}");
                format!("[EMPTY_{i}]")
            } else {
                text
            };
            let id = i as u32; // fits: checked above
            token_to_id.insert(text.clone(), id);
            tokens.push(text);
        }
        if token_to_id.len() != n {
            // llama.cpp asserts on duplicate token texts.
            return Err(TokenizerError::Invalid(format!(
                "{} of {n} token texts are duplicates",
                n - token_to_id.len()
            )));
        }

        // Special ids: defaults out of range are dropped, then the metadata wins
        // when it names a token that exists.
        let n32 = n as u32;
        let pick = |default: Option<u32>, meta: Option<u32>, key: &str| -> Option<u32> {
            let default = default.filter(|&d| d < n32);
            match meta {
                Some(m) if m < n32 => Some(m),
                Some(m) => {
                    tracing::warn!("bad special token {key} = {m}, using the default");
                    default
                }
                None => default,
            }
        };
        let sp = &spec.special;
        bos = pick(bos, sp.bos, "bos");
        eos = pick(eos, sp.eos, "eos");
        let mut eot = pick(None, sp.eot, "eot");
        let mut eom = pick(None, sp.eom, "eom");
        unk = pick(unk, sp.unk, "unk");
        let sep = pick(None, sp.sep, "sep");
        let pad = pick(None, sp.pad, "pad");
        let mask = pick(None, sp.mask, "mask");
        let mut fim = [
            pick(None, sp.fim_pre, "fim_pre"),
            pick(None, sp.fim_suf, "fim_suf"),
            pick(None, sp.fim_mid, "fim_mid"),
            pick(None, sp.fim_pad, "fim_pad"),
            pick(None, sp.fim_rep, "fim_rep"),
            pick(None, sp.fim_sep, "fim_sep"),
        ];

        if let Some(v) = spec.add_bos {
            add_bos = v;
        }
        let add_eos = spec.add_eos.unwrap_or(false);
        let add_sep = spec.add_sep.unwrap_or(false);

        // Special tokens found by their text. llama.cpp walks a hash map here, so
        // when a vocabulary has several candidates its pick depends on hash order;
        // this takes the first text of each list that exists (so `<|eot_id|>` over
        // `<|end_of_text|>`, `<|im_end|>` over `<|endoftext|>`). The EOG set does not
        // depend on the pick: every end-of-turn candidate is an EOG text too.
        let make_control = |attrs: &mut [u32], id: u32| {
            let a = &mut attrs[id as usize];
            if *a & attr::CONTROL == 0 {
                tracing::warn!("control-looking token {id} was not control-type; overriding");
                *a |= attr::CONTROL;
            }
        };
        let find_first = |cands: &[&str]| -> Option<u32> {
            cands.iter().find_map(|c| token_to_id.get(*c).copied())
        };
        let detect = |slot: &mut Option<u32>, cands: &[&str], attrs: &mut [u32]| {
            if slot.is_none() {
                if let Some(id) = find_first(cands) {
                    *slot = Some(id);
                    make_control(attrs, id);
                }
            }
        };
        detect(&mut eot, EOT_TEXTS, &mut attrs);
        detect(&mut eom, &["<|eom_id|>"], &mut attrs);
        detect(&mut fim[FIM_PRE], FIM_PRE_TEXTS, &mut attrs);
        detect(&mut fim[FIM_SUF], FIM_SUF_TEXTS, &mut attrs);
        detect(&mut fim[FIM_MID], FIM_MID_TEXTS, &mut attrs);
        detect(&mut fim[FIM_PAD], FIM_PAD_TEXTS, &mut attrs);
        detect(&mut fim[FIM_REP], FIM_REP_TEXTS, &mut attrs);
        detect(&mut fim[FIM_SEP], &["<|file_sep|>"], &mut attrs);

        // Control tokens named "unused" are unused.
        for (text, a) in tokens.iter().zip(attrs.iter_mut()) {
            if *a & attr::CONTROL != 0 && text.contains("unused") {
                *a |= attr::UNUSED;
            }
        }

        // The end-of-generation set.
        let mut eog = BTreeSet::new();
        for id in [fim[FIM_PAD], fim[FIM_REP], fim[FIM_SEP]]
            .into_iter()
            .flatten()
        {
            eog.insert(id);
        }
        for (i, text) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&text.as_str()) {
                eog.insert(i as u32);
                make_control(&mut attrs, i as u32);
            }
        }
        // gpt-oss: these must always be rendered.
        for (text, a) in tokens.iter().zip(attrs.iter_mut()) {
            if matches!(
                text.as_str(),
                "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
            ) {
                *a = attr::USER_DEFINED;
            }
        }
        for id in [eos, eot, eom].into_iter().flatten() {
            if eog.insert(id) {
                tracing::warn!("special token {id} was not in the EOG set; added");
            }
        }
        // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        {
            let has = |t: &str| eog.iter().any(|&id| tokens[id as usize] == t);
            let end_id = eog
                .iter()
                .copied()
                .find(|&id| tokens[id as usize] == "<|end|>");
            let has_call = has("<|call|>") || has("<|calls|>");
            if let Some(end_id) = end_id {
                if has_call && (has("<|return|>") || has("<|flush|>")) {
                    eog.remove(&end_id);
                    attrs[end_id as usize] = attr::USER_DEFINED;
                }
            }
        }
        // Gemma 4 / PLaMo: "</s>" is an ordinary token there.
        {
            let has_marker = eog.iter().any(|&id| {
                matches!(
                    tokens[id as usize].as_str(),
                    "<|tool_response>" | "<|plamo:eos|>"
                )
            });
            let s_id = eog
                .iter()
                .copied()
                .find(|&id| tokens[id as usize] == "</s>");
            if let (true, Some(s_id)) = (has_marker, s_id) {
                eog.remove(&s_id);
                attrs[s_id as usize] = attr::NORMAL;
            }
        }

        let mut special_by_len: Vec<u32> = (0..n32)
            .filter(|&id| {
                attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        // llama.cpp's sort is unstable; equal lengths keep id order here.
        special_by_len.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));

        // Per-model attributes llama.cpp sets by name.
        let pre = spec.pre.as_deref().unwrap_or("");
        let arch = spec.architecture.as_deref().unwrap_or("");
        let name = spec.model_name.as_deref().unwrap_or("").to_lowercase();
        let set_attr = |attrs: &mut [u32], text: &str, bit: u32, on: bool| {
            if let Some(&id) = token_to_id.get(text) {
                let a = &mut attrs[id as usize];
                *a = if on { *a | bit } else { *a & !bit };
            }
        };
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|p| pre.contains(p))
            || ["nomic-bert-moe", "jina-bert-v3"]
                .iter()
                .any(|a| arch.contains(a))
        {
            set_attr(&mut attrs, "<mask>", attr::LSTRIP, true);
        } else if name.contains("phi-3") || name.contains("phi3") {
            for &id in &special_by_len {
                attrs[id as usize] |= attr::RSTRIP;
            }
            set_attr(&mut attrs, "</s>", attr::RSTRIP, true);
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                set_attr(&mut attrs, t, attr::RSTRIP, false);
            }
        } else if name.contains("modern-bert") {
            set_attr(&mut attrs, "[MASK]", attr::LSTRIP, true);
        }

        Ok(Vocab {
            kind,
            preset: preset_info,
            tokens,
            scores,
            attrs,
            token_to_id,
            merge_ranks,
            bos,
            eos,
            eot,
            eom,
            unk,
            sep,
            pad,
            mask,
            fim,
            add_bos,
            add_eos,
            add_sep,
            add_space_prefix,
            clean_spaces,
            ignore_merges,
            eog,
            special_by_len,
        })
    }

    /// Number of tokens.
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The algorithm.
    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// The id of a token text, if it is in the vocabulary.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The stored text of a token (byte-level encoded for BPE, `▁` for SPM spaces).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The token's attribute bits (see [`attr`]); 0 for an unknown id.
    pub fn token_attr(&self, id: u32) -> u32 {
        self.attrs
            .get(id as usize)
            .copied()
            .unwrap_or(attr::UNDEFINED)
    }

    /// The pre-tokenizer preset in use (llama.cpp's pre-type name; BPE only).
    pub fn preset_name(&self) -> Option<&'static str> {
        self.preset.as_ref().map(|p| p.kind)
    }

    /// Fill-in-the-middle tokens: prefix, suffix, middle, pad, repo, file separator.
    pub fn fim_ids(&self) -> [Option<u32>; 6] {
        self.fim
    }

    /// The merge rank of a pair of BPE pieces.
    pub(crate) fn merge_rank(&self, key: &str) -> Option<u32> {
        self.merge_ranks.get(key).copied()
    }
}

/// Token type (GGUF `token_type`) to attribute bits.
fn attr_of_type(ty: i32) -> u32 {
    match ty {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => attr::UNDEFINED,
    }
}

/// Texts taken as the end-of-turn token when the metadata names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
/// Texts that end generation.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
