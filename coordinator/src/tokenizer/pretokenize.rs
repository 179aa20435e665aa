//! Pre-tokenization: splitting text into words before BPE, exactly as llama.cpp's
//! `unicode_regex_split` does it.
//!
//! A preset is a list of regexes applied in turn: each one splits every piece left
//! by the previous ones into its matches and the gaps between them (so each regex
//! sees one piece at a time; look-aheads and `$` stop at the piece's end). The common
//! regexes have hand-written splitters in llama.cpp, and those splitters, not the
//! regexes, define its behaviour (Kimi-K2's, for one, ignores letter case where the
//! regex does not), so they are reproduced here step by step. Every other regex goes
//! through `std::regex` there, on text where each non-ASCII code point has been
//! replaced by one byte standing for its category; the same trick is done here with
//! `fancy-regex`, with `\s`, `\d` and `\p{..}` rewritten to the classes that
//! `std::regex` gives them on that text.

use fancy_regex::Regex;

use super::unicode::{ascii_lower, is_han, Class};
use super::TokenizerError;

/// Stand-ins for non-ASCII code points in the category-collapsed text.
const COLLAPSED_OTHER: char = '\u{E0D0}';
const COLLAPSED_NUMBER: char = '\u{E0D1}';
const COLLAPSED_LETTER: char = '\u{E0D2}';
const COLLAPSED_PUNCT: char = '\u{E0D3}';
const COLLAPSED_MARK: char = '\u{E0D4}';
const COLLAPSED_SYMBOL: char = '\u{E0D5}';
/// `std::regex` has no notion of non-ASCII white space: llama.cpp replaces those
/// code points by a vertical tab so that `\s` still matches them.
const WHITESPACE_STANDIN: char = '\u{0B}';

/// What `\s` matches in `std::regex` (C locale `isspace`).
const WS_MEMBERS: &str = r"\t\n\x0B\x0C\r\x20";

/// The categories llama.cpp collapses, with the class members they become.
const CATEGORY_MEMBERS: &[(&str, &str)] = &[
    (r"\p{N}", r"\x{E0D1}0-9"),
    (r"\p{L}", r"\x{E0D2}A-Za-z"),
    (
        r"\p{P}",
        r"\x{E0D3}\x21-\x23\x25-\x2A\x2C-\x2F\x3A-\x3B\x3F-\x40\x5B-\x5D\x5F\x7B\x7D",
    ),
    (r"\p{M}", r"\x{E0D4}"),
    (r"\p{S}", r"\x{E0D5}\x24\x2B\x3C-\x3E\x5E\x60\x7C\x7E"),
    (r"\p{Lu}", r"\x{E0D2}A-Za-z"),
    (r"\p{Ll}", r"\x{E0D2}A-Za-z"),
    (r"\p{Lt}", r"\x{E0D2}A-Za-z"),
    (r"\p{Lm}", r"\x{E0D2}A-Za-z"),
    (r"\p{Lo}", r"\x{E0D2}A-Za-z"),
];

// The regexes that llama.cpp recognises by their text and splits by hand.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3_ORIG: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_KIMI_K2: &str = r"\p{Han}+";
const RE_AFMOE_DIGITS: &str = r"\p{AFMoE_digits}";
const RE_NEWLINES: &str = r"[^\n]+|[\n]+";
const RE_TINY_AYA_DIGITS: &str = r"\d{1,3}(?=(?:\d{3})*\b)";

// Pieces of the preset regex lists that several presets share.
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_DEEPSEEK3_MAIN: &str = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+";
const RE_DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";
const RE_WORDS_STARCODER: &str = RE_GPT2;
const RE_PORO: &str = " ?[^(\\s|.,!?\u{2026}\u{3002}\u{FF0C}\u{3001}\u{964}\u{6D4}\u{60C})]+";

/// How a `tokenizer.ggml.pre` value configures the BPE tokenizer.
#[derive(Debug, Clone)]
pub(crate) struct PresetInfo {
    /// The canonical preset name (llama.cpp's pre-type).
    pub(crate) kind: &'static str,
    /// The regexes, applied in order.
    pub(crate) regexes: Vec<&'static str>,
    /// `clean_up_tokenization_spaces` when detokenizing.
    pub(crate) clean_spaces: bool,
    /// A whole word that is itself a token skips the merges.
    pub(crate) ignore_merges: bool,
    /// The preset's own BOS default (before `tokenizer.ggml.add_bos_token`).
    pub(crate) add_bos: bool,
    /// The preset has no BOS token by default (ChatGLM / GLM-4).
    pub(crate) no_default_bos: bool,
}

/// The preset llama.cpp picks for a `tokenizer.ggml.pre` value (`None`: unknown, which
/// llama.cpp refuses to load).
pub(crate) fn preset(pre: &str) -> Option<PresetInfo> {
    let info = |kind: &'static str, regexes: Vec<&'static str>, clean_spaces: bool| PresetInfo {
        kind,
        regexes,
        clean_spaces,
        ignore_merges: false,
        add_bos: false,
        no_default_bos: false,
    };
    let default_regexes = vec![
        r"[\p{P}\$\+<=>\^~\|]+",
        RE_GPT2,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ];
    let p = match pre {
        "default" => info("default", default_regexes, true),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PresetInfo {
            ignore_merges: true,
            add_bos: true,
            ..info("llama3", vec![RE_LLAMA3], true)
        },
        "dbrx" => info("dbrx", vec![RE_LLAMA3], true),
        "smaug-bpe" => info("smaug", vec![RE_LLAMA3], true),
        "deepseek-llm" => info(
            "deepseek-llm",
            vec![
                "[\r\n]",
                RE_DEEPSEEK_LLM_LETTERS,
                "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
                "\\s+$",
                "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
                "\\p{N}+",
            ],
            false,
        ),
        "deepseek-coder" => info(
            "deepseek-coder",
            vec!["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+", "\\p{N}"],
            false,
        ),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => info(
            "deepseek-v3",
            vec!["\\p{N}{1,3}", "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+", RE_DEEPSEEK3_MAIN],
            false,
        ),
        "falcon" => info(
            "falcon",
            vec![r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"],
            true,
        ),
        "mpt" | "olmo" | "jais" => info("gpt2", vec![RE_GPT2], true),
        "trillion" | "granite-docling" => info("gpt2", vec![RE_GPT2], false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" => info("gpt2", vec![RE_GPT2], true),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            info("starcoder", vec![r"\p{N}", RE_WORDS_STARCODER], true)
        }
        "command-r" | "smollm" => info("starcoder", vec![r"\p{N}", RE_WORDS_STARCODER], false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" | "grok-2" => {
            info("qwen2", vec![RE_QWEN2], false)
        }
        "megrez" | "stablelm2" => info("qwen2", vec![RE_QWEN2], true),
        "qwen35" => info("qwen35", vec![RE_QWEN35], false),
        "poro-chat" => info("poro", vec![RE_PORO], false),
        "bloom" | "gpt3-finnish" => info("poro", vec![RE_PORO], true),
        "viking" => info("viking", vec![RE_PORO, r"\p{N}"], false),
        "chatglm-bpe" => PresetInfo {
            no_default_bos: true,
            ..info("chatglm4", vec![RE_LLAMA3], true)
        },
        "glm4" | "glm5" => PresetInfo {
            no_default_bos: true,
            ignore_merges: true,
            ..info("chatglm4", vec![RE_LLAMA3], true)
        },
        "tekken" => PresetInfo {
            ignore_merges: true,
            add_bos: true,
            ..info(
                "tekken",
                vec![r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
                false,
            )
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => {
            info("gpt4o", vec![RE_GPT4O], false)
        }
        "tiny_aya" | "cohere2moe" => info(
            "tiny_aya",
            vec![
                RE_TINY_AYA_DIGITS,
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            ],
            false,
        ),
        "kimi-k2" => info("kimi-k2", vec![RE_KIMI_K2], false),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => info(
            "bailingmoe",
            vec![r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
            false,
        ),
        "seed-coder" => info(
            "seed-coder",
            vec![r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"],
            false,
        ),
        "afmoe" => info(
            "afmoe",
            vec![
                RE_AFMOE_DIGITS,
                "[\u{4E00}-\u{9FFF}\u{3400}-\u{4DBF}\u{8C48}-\u{FAFF}\u{3040}-\u{309F}\u{30A0}-\u{30FF}\u{FF65}-\u{FF9F}\u{2F00}-\u{2FDF}\u{E40}-\u{E7F}\u{E80}-\u{EFF}\u{1780}-\u{17FF}\u{1000}-\u{109F}\u{AA60}-\u{AA7F}\u{A9E0}-\u{A9FF}\u{AC00}-\u{D7AF}\u{1100}-\u{11FF}]+",
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
            ],
            false,
        ),
        "ufakzeka" => info(
            "ufakzeka",
            vec![r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
            false,
        ),
        "laguna" => info("laguna", vec![RE_NEWLINES, RE_QWEN2], false),
        "minicpm5" => PresetInfo {
            ignore_merges: true,
            ..info(
                "minicpm5",
                vec![
                    r"\p{N}{1,3}",
                    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                ],
                true,
            )
        },
        "chameleon" => PresetInfo {
            add_bos: true,
            ..info(
                "chameleon",
                vec![
                    r"<sentinel:[0-9]+>",
                    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
                    r"([\t\n]|    |  )",
                    r"\p{N}",
                    r"[\p{P}!-/:-@\[-`{-~]",
                    RE_GPT2,
                ],
                false,
            )
        },
        "jais-2" => info(
            "jais2",
            vec![r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"],
            true,
        ),
        "exaone-moe" => info(
            "exaone-moe",
            vec![r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"],
            true,
        ),
        "spark2_5" => info(
            "spark2_5",
            vec![
                r"\p{N}{1,3}",
                "[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
                "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
                r"\p{N}",
            ],
            false,
        ),
        "youtu" => PresetInfo {
            ignore_merges: true,
            ..info(
                "youtu",
                vec![
                    "[\u{AC00}-\u{D7A3}\u{3131}-\u{318E}]+|[\u{FF01}\u{2026}\u{201C}\u{201D}\u{2018}\u{2019}\u{2014}\u{FF1A}\u{FF1B}\u{FF0C}\u{3001}-\u{303F}\u{FE30}-\u{FE4F}]+|[\u{3105}-\u{312F}]+|[\u{4E00}-\u{9FA5}\u{3040}-\u{309F}\u{30A0}-\u{30FF}]+",
                    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                ],
                false,
            )
        },
        "granite-embed-multi-97m" => PresetInfo {
            ignore_merges: true,
            ..info(
                "granite-embed-multi",
                vec![r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
                false,
            )
        },
        _ => return None,
    };
    Some(p)
}

/// A hand-written splitter of llama.cpp's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Custom {
    Gpt2,
    /// Llama-3, Qwen2 and Qwen3.5: contractions, letters, digit groups of at most
    /// `max_digits`, punctuation, white space; `marks` puts \p{M} with letters.
    Llama3 {
        max_digits: usize,
        marks: bool,
    },
    KimiK2,
    /// Digit runs split from the left so the last groups have three digits.
    DigitGroups,
    Newlines,
}

impl Custom {
    fn for_regex(re: &str) -> Option<Custom> {
        Some(match re {
            RE_GPT2 => Custom::Gpt2,
            RE_LLAMA3 | RE_LLAMA3_ORIG => Custom::Llama3 {
                max_digits: 3,
                marks: false,
            },
            RE_QWEN2 => Custom::Llama3 {
                max_digits: 1,
                marks: false,
            },
            RE_QWEN35 => Custom::Llama3 {
                max_digits: 1,
                marks: true,
            },
            RE_KIMI_K2 => Custom::KimiK2,
            RE_AFMOE_DIGITS | RE_TINY_AYA_DIGITS => Custom::DigitGroups,
            RE_NEWLINES => Custom::Newlines,
            _ => return None,
        })
    }
}

#[derive(Debug)]
enum Stage {
    Custom(Custom),
    /// A general regex run on the category-collapsed text (`collapsed`) or on the
    /// text itself with non-ASCII white space replaced.
    Regex {
        re: Regex,
        collapsed: bool,
    },
}

/// A compiled list of pre-tokenizer regexes.
#[derive(Debug)]
pub(crate) struct PreTokenizer {
    stages: Vec<Stage>,
}

impl PreTokenizer {
    pub(crate) fn new(regexes: &[&str]) -> Result<PreTokenizer, TokenizerError> {
        let stages = regexes
            .iter()
            .map(|re| match Custom::for_regex(re) {
                Some(c) => Ok(Stage::Custom(c)),
                None => compile_stl_regex(re),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreTokenizer { stages })
    }

    /// Splits `text` into words (consecutive, covering all of it; none empty).
    pub(crate) fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        if text.is_empty() {
            return Vec::new();
        }
        let text_ref = TextRef::new(text);
        // Lengths of the pieces, in code points.
        let mut pieces = vec![text_ref.cps.len()];
        let mut collapsed: Option<Haystack> = None;
        let mut wide: Option<Haystack> = None;
        for stage in &self.stages {
            let mut out = Vec::with_capacity(pieces.len() * 2);
            match stage {
                Stage::Custom(c) => split_custom(*c, &text_ref, &pieces, &mut out),
                Stage::Regex {
                    re,
                    collapsed: true,
                } => {
                    let hay = collapsed.get_or_insert_with(|| Haystack::collapsed(&text_ref));
                    split_regex(re, hay, &pieces, &mut out);
                }
                Stage::Regex {
                    re,
                    collapsed: false,
                } => {
                    let hay = wide.get_or_insert_with(|| Haystack::wide(&text_ref));
                    split_regex(re, hay, &pieces, &mut out);
                }
            }
            pieces = out;
        }
        let mut words = Vec::with_capacity(pieces.len());
        let mut start = 0usize;
        for len in pieces {
            let b0 = text_ref.byte_at[start];
            let b1 = text_ref.byte_at[start + len];
            words.push(&text[b0..b1]);
            start += len;
        }
        words
    }
}

/// Translates one of llama.cpp's `std::regex` patterns into a `fancy-regex` one that
/// behaves the same on the haystacks built by [`Haystack`].
fn compile_stl_regex(pattern: &str) -> Result<Stage, TokenizerError> {
    let collapsed = CATEGORY_MEMBERS
        .iter()
        .any(|(cat, _)| pattern.contains(cat));
    if collapsed && !pattern.is_ascii() {
        // llama.cpp refuses these too.
        return Err(TokenizerError::Regex {
            pattern: pattern.to_string(),
            reason: "mixes unicode categories and non-ASCII characters".into(),
        });
    }
    let translated =
        translate_pattern(pattern, collapsed).map_err(|reason| TokenizerError::Regex {
            pattern: pattern.to_string(),
            reason,
        })?;
    let re = fancy_regex::RegexBuilder::new(&translated)
        .backtrack_limit(10_000_000)
        .build()
        .map_err(|e| TokenizerError::Regex {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })?;
    Ok(Stage::Regex { re, collapsed })
}

/// Rewrites the escapes whose meaning differs between ECMAScript `std::regex` on the
/// prepared haystack and Rust regex syntax. Literal characters inside classes that
/// Rust treats as class operators (`[`, `&`, `~`, `-` runs) are hex-escaped.
fn translate_pattern(pattern: &str, collapsed: bool) -> Result<String, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut inside = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            let Some(&next) = chars.get(i + 1) else {
                return Err("pattern ends with a backslash".into());
            };
            match next {
                'p' => {
                    let close = chars[i..]
                        .iter()
                        .position(|&x| x == '}')
                        .map(|p| p + i)
                        .ok_or_else(|| "unterminated \\p{".to_string())?;
                    let name: String = chars[i..=close].iter().collect();
                    let members = CATEGORY_MEMBERS
                        .iter()
                        .find(|(cat, _)| *cat == name)
                        .map(|(_, m)| *m)
                        .ok_or_else(|| format!("unsupported property {name}"))?;
                    if !collapsed {
                        return Err("category outside a collapsed pattern".into());
                    }
                    push_class(&mut out, members, inside, false);
                    i = close + 1;
                    continue;
                }
                's' => push_class(&mut out, WS_MEMBERS, inside, false),
                'S' => {
                    if inside {
                        return Err("\\S inside a class".into());
                    }
                    push_class(&mut out, WS_MEMBERS, false, true);
                }
                'd' => push_class(&mut out, "0-9", inside, false),
                'D' | 'w' | 'W' | 'b' | 'B' => {
                    // Not used by any preset; refuse rather than guess.
                    return Err(format!("unsupported escape \\{next}"));
                }
                _ => {
                    out.push('\\');
                    out.push(next);
                }
            }
            i += 2;
            continue;
        }
        if inside {
            match c {
                ']' => {
                    inside = false;
                    out.push(']');
                }
                '[' | '&' | '~' => push_hex(&mut out, c),
                _ => out.push(c),
            }
        } else {
            out.push(c);
            if c == '[' {
                inside = true;
                if chars.get(i + 1) == Some(&'^') {
                    out.push('^');
                    i += 1;
                }
            }
        }
        i += 1;
    }
    Ok(out)
}

fn push_class(out: &mut String, members: &str, inside: bool, negate: bool) {
    if inside {
        out.push_str(members);
    } else {
        out.push('[');
        if negate {
            out.push('^');
        }
        out.push_str(members);
        out.push(']');
    }
}

fn push_hex(out: &mut String, c: char) {
    out.push_str(&format!("\\x{{{:X}}}", c as u32));
}

/// The code points of the text being split, with their classes and byte offsets.
struct TextRef {
    cps: Vec<u32>,
    classes: Vec<Class>,
    /// Byte offset of each code point, plus the text length at the end.
    byte_at: Vec<usize>,
}

impl TextRef {
    fn new(text: &str) -> TextRef {
        let n = text.chars().count();
        let mut cps = Vec::with_capacity(n);
        let mut classes = Vec::with_capacity(n);
        let mut byte_at = Vec::with_capacity(n + 1);
        for (b, ch) in text.char_indices() {
            let cp = ch as u32;
            cps.push(cp);
            classes.push(Class::of(cp));
            byte_at.push(b);
        }
        byte_at.push(text.len());
        TextRef {
            cps,
            classes,
            byte_at,
        }
    }
}

/// A text rewritten for a `std::regex`-style match, one char per code point.
struct Haystack {
    text: String,
    /// Byte offset in `text` of each code point, plus the end.
    byte_at: Vec<usize>,
}

impl Haystack {
    fn build(t: &TextRef, map: impl Fn(u32, Class) -> char) -> Haystack {
        let mut text = String::with_capacity(t.cps.len() * 2);
        let mut byte_at = Vec::with_capacity(t.cps.len() + 1);
        for (&cp, &class) in t.cps.iter().zip(&t.classes) {
            byte_at.push(text.len());
            text.push(map(cp, class));
        }
        byte_at.push(text.len());
        Haystack { text, byte_at }
    }

    /// Every non-ASCII code point becomes the stand-in of its category.
    fn collapsed(t: &TextRef) -> Haystack {
        Haystack::build(t, |cp, class| {
            if cp < 128 {
                return char::from_u32(cp).unwrap_or(COLLAPSED_OTHER);
            }
            if class.is_whitespace() {
                return WHITESPACE_STANDIN;
            }
            match class.category() {
                Class::NUMBER => COLLAPSED_NUMBER,
                Class::LETTER => COLLAPSED_LETTER,
                Class::PUNCTUATION => COLLAPSED_PUNCT,
                Class::MARK => COLLAPSED_MARK,
                Class::SYMBOL => COLLAPSED_SYMBOL,
                _ => COLLAPSED_OTHER,
            }
        })
    }

    /// The text as is, but non-ASCII white space becomes a vertical tab.
    fn wide(t: &TextRef) -> Haystack {
        Haystack::build(t, |cp, class| {
            if cp > 0x7F && class.is_whitespace() {
                WHITESPACE_STANDIN
            } else {
                char::from_u32(cp).unwrap_or(COLLAPSED_OTHER)
            }
        })
    }

    fn cp_index(&self, byte: usize) -> usize {
        // `byte` is always a char boundary of `text`, hence present in `byte_at`.
        self.byte_at.partition_point(|&b| b < byte)
    }
}

fn split_regex(re: &Regex, hay: &Haystack, pieces: &[usize], out: &mut Vec<usize>) {
    let mut start = 0usize;
    for &len in pieces {
        let b0 = hay.byte_at[start];
        let b1 = hay.byte_at[start + len];
        let sub = &hay.text[b0..b1];
        let mut prev = start;
        for m in re.find_iter(sub) {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    // std::regex would throw here; keep the rest of the piece whole.
                    tracing::warn!("pre-tokenizer regex gave up on a piece: {e}");
                    break;
                }
            };
            let m0 = hay.cp_index(b0 + m.start());
            let m1 = hay.cp_index(b0 + m.end());
            if m0 > prev {
                out.push(m0 - prev);
            }
            if m1 > m0 {
                out.push(m1 - m0);
            }
            prev = m1;
        }
        if start + len > prev {
            out.push(start + len - prev);
        }
        start += len;
    }
}

/// One piece of text seen by a hand-written splitter; positions are absolute code
/// point indices, and anything outside `[ini, end)` reads as absent.
struct Chunk<'a> {
    t: &'a TextRef,
    ini: usize,
    end: usize,
    prev_end: usize,
    out: &'a mut Vec<usize>,
}

const OUT_OF_RANGE: u32 = u32::MAX;

impl Chunk<'_> {
    fn cpt(&self, pos: usize) -> u32 {
        if pos >= self.ini && pos < self.end {
            self.t.cps[pos]
        } else {
            OUT_OF_RANGE
        }
    }

    fn class(&self, pos: usize) -> Class {
        if pos >= self.ini && pos < self.end {
            self.t.classes[pos]
        } else {
            Class::NONE
        }
    }

    /// Ends the current word at `end`; returns its length.
    fn add(&mut self, end: usize) -> usize {
        debug_assert!(self.prev_end <= end && end <= self.end);
        let len = end - self.prev_end;
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d` at `pos` (case-folded when `fold`): the match length.
    fn contraction(&self, pos: usize, fold: bool) -> Option<usize> {
        if self.cpt(pos) != u32::from(b'\'') || pos + 1 >= self.end {
            return None;
        }
        let f = |c: u32| if fold { ascii_lower(c) } else { c };
        let is = |c: u32, b: u8| c == u32::from(b);
        let n1 = f(self.cpt(pos + 1));
        if is(n1, b's') || is(n1, b't') || is(n1, b'm') || is(n1, b'd') {
            return Some(2);
        }
        if pos + 2 < self.end {
            let n2 = f(self.cpt(pos + 2));
            if (is(n1, b'r') && is(n2, b'e'))
                || (is(n1, b'v') && is(n2, b'e'))
                || (is(n1, b'l') && is(n2, b'l'))
            {
                return Some(3);
            }
        }
        None
    }

    /// The shared white-space tail of the Llama-3 style splitters:
    /// `\s*[\r\n]+|\s+(?!\S)|\s+`, or a single code point when nothing matches.
    fn whitespace_tail(&mut self, pos: usize, with_newlines: bool) -> usize {
        let mut n_ws = 0usize;
        let mut last_nl_end = 0usize;
        while self.class(pos + n_ws).is_whitespace() {
            let c = self.cpt(pos + n_ws);
            if with_newlines && is_cr_or_lf(c) {
                last_nl_end = pos + n_ws + 1;
            }
            n_ws += 1;
        }
        let end = if last_nl_end > 0 {
            last_nl_end
        } else if n_ws > 1 && self.cpt(pos + n_ws) != OUT_OF_RANGE {
            pos + n_ws - 1
        } else if n_ws > 0 {
            pos + n_ws
        } else {
            pos + 1
        };
        self.add(end);
        end
    }
}

fn is_cr_or_lf(c: u32) -> bool {
    c == u32::from(b'\r') || c == u32::from(b'\n')
}

fn split_custom(kind: Custom, t: &TextRef, pieces: &[usize], out: &mut Vec<usize>) {
    let mut start = 0usize;
    for &len in pieces {
        let mut chunk = Chunk {
            t,
            ini: start,
            end: start + len,
            prev_end: start,
            out: &mut *out,
        };
        match kind {
            Custom::Gpt2 => split_gpt2(&mut chunk),
            Custom::Llama3 { max_digits, marks } => split_llama3(&mut chunk, max_digits, marks),
            Custom::KimiK2 => split_kimi_k2(&mut chunk),
            Custom::DigitGroups => split_digit_groups(&mut chunk),
            Custom::Newlines => split_newlines(&mut chunk),
        }
        start += len;
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
fn split_gpt2(c: &mut Chunk<'_>) {
    let mut pos = c.ini;
    while pos < c.end {
        if let Some(n) = c.contraction(pos, false) {
            pos += c.add(pos + n);
            continue;
        }
        let cpt = c.cpt(pos);
        let space = cpt == u32::from(b' ');
        let lead = if space {
            c.class(pos + 1)
        } else {
            c.class(pos)
        };
        let skip = usize::from(space);
        if lead.is_letter() {
            pos += skip;
            while c.class(pos).is_letter() {
                pos += 1;
            }
            c.add(pos);
            continue;
        }
        if lead.is_number() {
            pos += skip;
            while c.class(pos).is_number() {
                pos += 1;
            }
            c.add(pos);
            continue;
        }
        let other = |k: Class| !(k.is_whitespace() || k.is_letter() || k.is_number()) && k.any();
        if other(lead) {
            pos += skip;
            while other(c.class(pos)) {
                pos += 1;
            }
            c.add(pos);
            continue;
        }
        pos = c.whitespace_tail(pos, false);
    }
}

/// Llama-3 / Qwen2 / Qwen3.5:
/// `(?i:'s|..)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,k}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn split_llama3(c: &mut Chunk<'_>, max_digits: usize, marks: bool) {
    let wordy = |k: Class| k.is_letter() || (marks && k.is_mark());
    let mut pos = c.ini;
    while pos < c.end {
        if let Some(n) = c.contraction(pos, true) {
            pos += c.add(pos + n);
            continue;
        }
        let cpt = c.cpt(pos);
        let class = c.class(pos);
        if !(is_cr_or_lf(cpt) || class.is_number()) && (wordy(class) || wordy(c.class(pos + 1))) {
            pos += 1;
            while wordy(c.class(pos)) {
                pos += 1;
            }
            c.add(pos);
            continue;
        }
        if class.is_number() {
            let mut ini = pos;
            while c.class(pos).is_number() {
                pos += 1;
                if pos - ini >= max_digits {
                    c.add(pos);
                    ini = pos;
                }
            }
            c.add(pos);
            continue;
        }
        let space = cpt == u32::from(b' ');
        let other = |k: Class| !(k.is_whitespace() || wordy(k) || k.is_number());
        let lead = if space { c.class(pos + 1) } else { class };
        // llama.cpp tests the first code point's own class for "in range" here.
        if other(lead) && class.any() {
            pos += usize::from(space);
            while other(c.class(pos)) && c.class(pos).any() {
                pos += 1;
            }
            while is_cr_or_lf(c.cpt(pos)) {
                pos += 1;
            }
            c.add(pos);
            continue;
        }
        pos = c.whitespace_tail(pos, true);
    }
}

/// Kimi-K2's splitter (llama.cpp's version of its regex: Han runs, letter words with
/// an optional contraction, digit groups of three, punctuation, white space).
fn split_kimi_k2(c: &mut Chunk<'_>) {
    let non_han_letter = |c: &Chunk<'_>, p: usize| c.class(p).is_letter() && !is_han(c.cpt(p));
    let mut pos = c.ini;
    while pos < c.end {
        let cpt = c.cpt(pos);
        let class = c.class(pos);
        if is_han(cpt) {
            while is_han(c.cpt(pos)) {
                pos += 1;
            }
            c.add(pos);
            continue;
        }
        let can_lead = !(is_cr_or_lf(cpt) || class.is_letter() || class.is_number());
        let letter_pattern =
            (class.is_letter() && !is_han(cpt)) || (can_lead && non_han_letter(c, pos + 1));
        if letter_pattern {
            let mut has_leading = false;
            if can_lead {
                has_leading = true;
                pos += 1;
            }
            let mut has_letters = false;
            while non_han_letter(c, pos) {
                has_letters = true;
                pos += 1;
            }
            if has_letters || (!has_leading && non_han_letter(c, pos)) {
                if !has_letters {
                    pos += 1;
                }
                while non_han_letter(c, pos) {
                    pos += 1;
                }
                if let Some(n) = c.contraction(pos, true) {
                    pos += n;
                }
                c.add(pos);
                continue;
            } else if has_leading {
                pos -= 1;
            }
        }
        if class.is_number() {
            let mut ini = pos;
            while c.class(pos).is_number() {
                pos += 1;
                if pos - ini >= 3 {
                    c.add(pos);
                    ini = pos;
                }
            }
            c.add(pos);
            continue;
        }
        let space = cpt == u32::from(b' ');
        let other = |k: Class| !(k.is_whitespace() || k.is_letter() || k.is_number()) && k.any();
        let lead = if space { c.class(pos + 1) } else { class };
        if other(lead) {
            pos += usize::from(space);
            while other(c.class(pos)) {
                pos += 1;
            }
            while is_cr_or_lf(c.cpt(pos)) {
                pos += 1;
            }
            c.add(pos);
            continue;
        }
        pos = c.whitespace_tail(pos, true);
    }
}

/// Digit runs split so that every group but the first has three digits; everything
/// between digit runs stays whole (AFMoE, and llama.cpp's stand-in for Tiny Aya's
/// `\d{1,3}(?=(?:\d{3})*\b)`).
fn split_digit_groups(c: &mut Chunk<'_>) {
    let mut pos = c.ini;
    while pos < c.end {
        if c.class(pos).is_number() {
            let start = pos;
            while pos < c.end && c.class(pos).is_number() {
                pos += 1;
            }
            let count = pos - start;
            let mut cur = start;
            let rem = count % 3;
            if rem > 0 {
                c.add(cur + rem);
                cur += rem;
            }
            while cur < start + count {
                c.add(cur + 3);
                cur += 3;
            }
            continue;
        }
        pos += 1;
    }
    if c.prev_end < c.end {
        let end = c.end;
        c.add(end);
    }
}

/// `[^\n]+|[\n]+`
fn split_newlines(c: &mut Chunk<'_>) {
    let mut pos = c.ini;
    while pos < c.end {
        let nl = c.cpt(pos) == u32::from(b'\n');
        while pos < c.end && (c.cpt(pos) == u32::from(b'\n')) == nl {
            pos += 1;
        }
        c.add(pos);
    }
}
