//! Tokenizer tests: llama.cpp's own test vectors, SmolLM2's llama.cpp tokenizations,
//! the fixture models' vocabularies, the pre-tokenizer presets against llama.cpp's
//! splitter output, special-token parsing, detokenization and streaming.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use shared::gguf::GgufFile;

use super::pretokenize::{preset, PreTokenizer};
use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn load(path: &Path) -> Tokenizer {
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("tokenizer of {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The `.inp` / `.out` pair as llama.cpp's `test-tokenizer-0` reads it.
fn read_inp_out(gguf: &Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read(gguf.with_extension("gguf.inp")).expect("inp");
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).expect("out");
    let inp = String::from_utf8(inp).expect("utf-8 inp");
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let texts = &texts[..texts.len() - 1]; // the file ends with the separator
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(texts.len(), lines.len(), "{}", gguf.display());
    texts
        .iter()
        .zip(lines)
        .map(|(t, l)| {
            let ids = l
                .split_whitespace()
                .map(|x| x.parse::<u32>().expect("id"))
                .collect();
            (t.to_string(), ids)
        })
        .collect()
}

/// Runs every vector of one vocabulary; returns (passed, total) and prints failures.
fn run_vectors(tok: &Tokenizer, cases: &[(String, Vec<u32>)], name: &str) -> (usize, usize) {
    let mut pass = 0;
    for (text, want) in cases {
        let got = tok.encode(text, false, false);
        if &got == want {
            pass += 1;
        } else {
            eprintln!("{name}: {text:?}\n  want {want:?}\n  got  {got:?}");
        }
    }
    (pass, cases.len())
}

#[test]
fn llama_cpp_vectors() {
    let dir = fixtures().join("tokenizers");
    let conventions = read_json(&dir.join("conventions.json"));
    let conventions = conventions.as_object().expect("object");
    assert!(conventions.len() >= 5);
    let mut failed = Vec::new();
    for (name, conv) in conventions {
        let gguf = dir.join(conv["gguf"].as_str().expect("gguf"));
        let tok = load(&gguf);
        let cases: Vec<(String, Vec<u32>)> =
            read_json(&dir.join(conv["cases"].as_str().expect("cases")))
                .as_array()
                .expect("cases")
                .iter()
                .map(|c| {
                    (
                        c["text"].as_str().expect("text").to_string(),
                        ids(&c["tokens"]),
                    )
                })
                .collect();
        assert_eq!(
            cases.len() as u64,
            conv["n_cases"].as_u64().expect("n_cases")
        );
        // The JSON is the same data as the original .inp/.out files.
        assert_eq!(cases, read_inp_out(&gguf), "{name}: json vs inp/out");

        let (pass, total) = run_vectors(&tok, &cases, name);
        eprintln!("{name}: {pass}/{total} vectors");
        if pass != total {
            failed.push(name.clone());
        }

        // The conventions llama.cpp applies to this vocabulary.
        assert_eq!(
            tok.n_vocab() as u64,
            conv["n_tokens"].as_u64().expect("n"),
            "{name}"
        );
        assert_eq!(
            tok.bos().map(u64::from),
            conv["bos_token_id"].as_u64(),
            "{name} bos"
        );
        assert_eq!(
            tok.eos().map(u64::from),
            conv["eos_token_id"].as_u64(),
            "{name} eos"
        );
        let add_bos = conv["llamacpp_effective_add_bos"]
            .as_bool()
            .expect("add_bos");
        let add_eos = conv["llamacpp_effective_add_eos"]
            .as_bool()
            .expect("add_eos");
        assert_eq!(tok.add_bos(), add_bos, "{name} add_bos");
        assert_eq!(tok.add_eos(), add_eos, "{name} add_eos");
        let plain = tok.encode("Hello world", false, false);
        let with = tok.encode("Hello world", true, false);
        let mut expect = Vec::new();
        if add_bos {
            expect.push(tok.bos().expect("bos"));
        }
        expect.extend_from_slice(&plain);
        if add_eos {
            expect.push(tok.eos().expect("eos"));
        }
        assert_eq!(with, expect, "{name}: add_special");
    }
    assert!(failed.is_empty(), "vectors failed for {failed:?}");
}

/// llama.cpp ships more vocab-only GGUFs with `.inp`/`.out` vectors than the
/// fixtures hold (`models/` in its source tree). Point `MOESHARD_EXTRA_VOCABS` at
/// such a folder to run all of them; vocabularies of tokenizer types not
/// implemented here (WordPiece, Unigram, Gemma 4) are reported and skipped.
#[test]
fn extra_llama_cpp_vectors() {
    let Some(dir) = std::env::var_os("MOESHARD_EXTRA_VOCABS") else {
        eprintln!("MOESHARD_EXTRA_VOCABS not set: skipping the extra llama.cpp vectors");
        return;
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("MOESHARD_EXTRA_VOCABS")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .filter(|p| p.with_extension("gguf.inp").exists())
        .collect();
    entries.sort();
    let mut failed = Vec::new();
    for gguf in entries {
        let name = gguf
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let file = GgufFile::open(&gguf).expect("open");
        let tok = match Tokenizer::from_gguf(&file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{name}: skipped ({e})");
                continue;
            }
        };
        let cases = read_inp_out(&gguf);
        let (pass, total) = run_vectors(&tok, &cases, &name);
        eprintln!("{name}: {pass}/{total} vectors");
        if pass != total {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "vectors failed for {failed:?}");
}

/// Every preset's splitting against llama.cpp's own `unicode_regex_split` (see
/// testdata/README.md): the 46 vector texts, SmolLM2's texts and edge cases.
#[test]
fn presets_split_like_llama_cpp() {
    let data = read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/tokenizer/testdata/presplit.json"),
    );
    let texts: Vec<&str> = data["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| t.as_str().expect("text"))
        .collect();
    let splits = data["splits"].as_object().expect("splits");
    for must in [
        "deepseek-v3",
        "kimi-k2",
        "glm4",
        "smollm",
        "llama-bpe",
        "qwen2",
        "gpt-2",
        "default",
    ] {
        assert!(splits.contains_key(must), "no expected splits for {must}");
    }
    let mut failed = BTreeMap::new();
    for (name, per_text) in splits {
        let info = preset(name).unwrap_or_else(|| panic!("unknown preset {name}"));
        let pre = PreTokenizer::new(&info.regexes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let per_text = per_text.as_array().expect("list");
        assert_eq!(per_text.len(), texts.len());
        let mut bad = 0;
        for (text, want) in texts.iter().zip(per_text) {
            let want: Vec<&str> = want
                .as_array()
                .expect("words")
                .iter()
                .map(|w| w.as_str().expect("word"))
                .collect();
            let got = pre.split(text);
            if got != want {
                bad += 1;
                eprintln!("{name}: {text:?}\n  want {want:?}\n  got  {got:?}");
            }
        }
        eprintln!(
            "{name}: {}/{} texts split as llama.cpp does",
            texts.len() - bad,
            texts.len()
        );
        if bad > 0 {
            failed.insert(name.clone(), bad);
        }
    }
    assert!(failed.is_empty(), "splits differ: {failed:?}");
}

fn vector_vocab(name: &str) -> Tokenizer {
    load(&fixtures().join(format!("tokenizers/ggml-vocab-{name}.gguf")))
}

fn vector_texts(name: &str) -> Vec<String> {
    read_json(&fixtures().join(format!("tokenizers/{name}.json")))
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["text"].as_str().expect("text").to_string())
        .collect()
}

/// Detokenizing what was tokenized gives the text back, up to the model's
/// `clean_up_tokenization_spaces` (byte-level BPE pieces concatenate to the input).
#[test]
fn decode_round_trips() {
    for name in ["qwen2", "llama-bpe", "gpt-2", "llama-spm", "deepseek-llm"] {
        let tok = vector_vocab(name);
        for text in vector_texts(name) {
            let ids = tok.encode(&text, false, false);
            let back = tok.detokenize(&ids, false, false);
            let want = if tok.vocab().clean_spaces {
                clean_up_spaces(text.as_bytes())
            } else {
                text.as_bytes().to_vec()
            };
            assert_eq!(
                String::from_utf8_lossy(&back),
                String::from_utf8_lossy(&want),
                "{name}: {text:?}"
            );
            // With BOS added and removed again. llama.cpp then keeps the space that
            // SentencePiece put in front of the text.
            let with = tok.encode(&text, true, false);
            let mut want = back.clone();
            if tok.vocab().add_space_prefix && !text.is_empty() {
                want.insert(0, b' ');
            }
            assert_eq!(
                tok.detokenize(&with, true, false),
                want,
                "{name}: {text:?} (+BOS)"
            );
        }
    }
    // gpt-2 cleans up spaces before punctuation and around apostrophes.
    let tok = vector_vocab("gpt-2");
    let ids = tok.encode("Hello , world ! I 'm sure they 're fine ' ok", false, false);
    assert_eq!(tok.decode(&ids), "Hello, world! I'm sure they're fine'ok");
}

#[test]
fn clean_up_passes() {
    let c = |s: &str| String::from_utf8(clean_up_spaces(s.as_bytes())).expect("utf-8");
    assert_eq!(c(""), "");
    assert_eq!(c(" ,"), ",");
    assert_eq!(c("a ? b ! c . d , e"), "a? b! c. d, e");
    // " ' " loses both spaces (llama.cpp keeps the apostrophe).
    assert_eq!(c("x ' y"), "x'y");
    assert_eq!(c("I 'm he 's we 're you 've"), "I'm he's we're you've");
    // " 't", " 'd" and " 'll" keep their space in llama.cpp.
    assert_eq!(c("don 't I 'd we 'll"), "don 't I 'd we 'll");
}

#[test]
fn spm_space_prefix_and_special_tokens() {
    let tok = vector_vocab("llama-spm");
    assert_eq!(tok.encode("Hello world", false, false), [15043, 3186]);
    assert_eq!(tok.encode("Hello world", true, false), [1, 15043, 3186]);
    // After a parsed special token the text gets a space prefix again.
    assert_eq!(tok.encode("Hello<s>world", false, true), [15043, 1, 3186]);
    // Not parsed: "<s>" is text.
    let as_text = tok.encode("<s>", false, false);
    assert!(!as_text.contains(&1), "{as_text:?}");
    // Byte fallback and its detokenization.
    let ids = tok.encode("\u{1F999}", false, false);
    assert!(
        ids.iter()
            .skip(1)
            .all(|&id| tok.vocab().token_attr(id) & attr::BYTE != 0),
        "{ids:?}"
    );
    assert_eq!(tok.decode(&ids), "\u{1F999}");
    // The leading space of the first piece is dropped unless a BOS is removed.
    assert_eq!(tok.decode(&[15043, 3186]), "Hello world");
    assert_eq!(
        tok.detokenize(&[1, 15043, 3186], true, false),
        b" Hello world"
    );
    assert_eq!(
        tok.detokenize(&[1, 15043, 3186], false, false),
        b" Hello world"
    );
    assert_eq!(
        tok.detokenize(&[1, 15043, 3186], false, true),
        b"<s> Hello world"
    );
    assert_eq!(tok.token_to_piece(1), b"<s>");
    assert_eq!(tok.token_to_piece_with(1, false), b"");
    assert_eq!(tok.token_to_piece(15043), b" Hello");
    assert_eq!(tok.token_to_piece(13), b"\n");
}

#[test]
fn end_of_generation_sets() {
    // llama.cpp's EOG sets for these vocabularies. This qwen2 vocabulary has no FIM
    // tokens, and its ordinary token "</s>" (128247) is taken as EOG by its text.
    let eog = |name: &str| vector_vocab(name).eog_ids().collect::<Vec<_>>();
    assert_eq!(eog("qwen2"), [128247, 151643, 151645]);
    // Llama 3 (not 3.1): no <|eom_id|> yet.
    assert_eq!(eog("llama-bpe"), [128001, 128009]);
    assert_eq!(eog("gpt-2"), [50256]);
    assert_eq!(eog("llama-spm"), [2]);
    assert_eq!(eog("deepseek-llm"), [100001]);
    let qwen = vector_vocab("qwen2");
    assert!(qwen.is_eog(151645) && !qwen.is_eog(151644));
    assert!(qwen.is_control(128247));
    assert_eq!(qwen.token_id("<|im_end|>"), Some(151645));
    let llama = vector_vocab("llama-bpe");
    assert_eq!(llama.eot(), Some(128009));
    assert_eq!(llama.eom(), None);
}

/// SmolLM2-135M-Instruct (the real model, if present): llama.cpp's tokenizations with
/// special tokens parsed and no BOS, and the text of its greedy generations.
#[test]
fn smollm2_reference() {
    let path = std::env::var_os("MOESHARD_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        eprintln!("SmolLM2 model not found at {}: skipping", path.display());
        return;
    }
    let tok = load(&path);
    let reference = read_json(&fixtures().join("smollm2/reference.json"));
    let mut n = 0;
    for case in reference["tokenize"].as_array().expect("tokenize") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text, false, true),
            ids(&case["tokens"]),
            "{text:?}"
        );
        n += 1;
    }
    for case in reference["generate"].as_array().expect("generate") {
        let prompt = case["prompt"].as_str().expect("prompt");
        assert_eq!(
            tok.encode(prompt, false, true),
            ids(&case["prompt_tokens"]),
            "{prompt:?}"
        );
        let greedy = ids(&case["greedy_tokens"]);
        let text = case["greedy_text"].as_str().expect("greedy_text");
        assert_eq!(
            String::from_utf8_lossy(&tok.detokenize(&greedy, false, false)),
            text
        );
        let mut stream = StreamDecoder::new(false);
        let mut streamed: String = greedy.iter().map(|&id| stream.push(&tok, id)).collect();
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, text);
        n += 1;
    }
    eprintln!("smollm2: {n}/{n} reference cases");
    assert_eq!(n, 15);
    // SmolLM2 adds no BOS (add_bos_token = false) and ends turns with <|im_end|>.
    assert!(!tok.add_bos());
    assert_eq!(
        tok.encode("Hi", true, false),
        tok.encode("Hi", false, false)
    );
    assert!(tok.is_eog(2) && tok.is_eog(0));
    // Special tokens are text unless parsed.
    let plain = tok.encode("<|im_start|>", false, false);
    assert!(!plain.contains(&1) && plain.len() > 1, "{plain:?}");
    assert_eq!(tok.encode("<|im_start|>", false, true), [1]);
}

/// The fixture models' vocabularies (GGUF) tokenize like their Hugging Face
/// `tokenizer.json` (testdata/fixture_models.json).
#[test]
fn fixture_model_vocabs_match_hf() {
    let data = read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src/tokenizer/testdata/fixture_models.json"),
    );
    let texts: Vec<&str> = data["texts"]
        .as_array()
        .expect("texts")
        .iter()
        .map(|t| t.as_str().expect("text"))
        .collect();
    for (arch, m) in data["models"].as_object().expect("models") {
        let tok = load(&fixtures().join(arch).join("model-q8_0.gguf"));
        assert_eq!(tok.n_vocab(), 512, "{arch}");
        let hf = read_json(&fixtures().join(arch).join("hf/tokenizer.json"));
        for (text, want) in texts.iter().zip(m["plain"].as_array().expect("plain")) {
            assert_eq!(tok.encode(text, false, true), ids(want), "{arch}: {text:?}");
        }
        // Same token texts as the HF vocabulary and added tokens.
        for (text, id) in hf["model"]["vocab"].as_object().expect("vocab") {
            assert_eq!(
                tok.token_id(text),
                Some(id.as_u64().expect("id") as u32),
                "{arch}: {text}"
            );
        }
        for added in hf["added_tokens"].as_array().expect("added") {
            let id = added["id"].as_u64().expect("id") as u32;
            assert_eq!(
                tok.token_id(added["content"].as_str().expect("content")),
                Some(id)
            );
            assert!(tok.is_control(id), "{arch}: added token {id} is control");
        }
        assert_eq!(tok.bos(), Some(503));
        assert_eq!(tok.eos(), Some(503));
        assert!(
            tok.is_eog(503) && tok.is_eog(505),
            "{arch}: <|endoftext|>, <|im_end|>"
        );
    }
}

/// A small byte-level BPE vocabulary: the 256 byte characters, a few merges, and the
/// given extra tokens (text, GGUF token type).
fn tiny_bpe(extra: &[(&str, i32)], pre: &str, name: Option<&str>) -> Tokenizer {
    let map = unicode::byte_map();
    let mut tokens: Vec<String> = map.to_str.to_vec();
    let mut types = vec![1; tokens.len()];
    let merges = ["h e", "l l", "he ll", "hell o", "\u{120} w"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    for (t, ty) in extra {
        tokens.push((*t).to_string());
        types.push(*ty);
    }
    Tokenizer::from_spec(VocabSpec {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        token_types: Some(types),
        merges: Some(merges.iter().map(|m| (*m).to_string()).collect()),
        model_name: name.map(str::to_string),
        ..VocabSpec::default()
    })
    .expect("tiny vocab")
}

fn texts_of(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| String::from_utf8_lossy(tok.token_to_piece(id)).into_owned())
        .collect()
}

#[test]
fn special_tokens_in_text() {
    let tok = tiny_bpe(&[("<|ctl|>", 3), ("<u>", 4), ("<u><v>", 4)], "gpt-2", None);
    let ctl = tok.token_id("<|ctl|>").expect("ctl");
    let u = tok.token_id("<u>").expect("u");
    let uv = tok.token_id("<u><v>").expect("uv");
    // Control tokens only when asked; user-defined ones always; longest first.
    let parsed = tok.encode("hello<|ctl|> <u><v><u>", false, true);
    assert_eq!(
        texts_of(&tok, &parsed),
        ["hello", "<|ctl|>", " ", "<u><v>", "<u>"]
    );
    assert_eq!(parsed[1], ctl);
    assert_eq!(&parsed[3..], [uv, u]);
    let unparsed = tok.encode("hello<|ctl|> <u>", false, false);
    assert!(!unparsed.contains(&ctl));
    assert_eq!(*unparsed.last().expect("last"), u);
    assert_eq!(tok.decode(&unparsed), "hello<|ctl|> <u>");
    // Control tokens are hidden unless rendered.
    assert_eq!(tok.detokenize(&parsed, false, false), b"hello <u><v><u>");
    assert_eq!(tok.decode(&parsed), "hello<|ctl|> <u><v><u>");
}

#[test]
fn special_token_strip_attributes() {
    // Phi-3 models: special tokens eat the white space after them.
    let text = "hello  <|ctl|>  hello";
    let plain = tiny_bpe(&[("<|ctl|>", 3)], "gpt-2", Some("some-model"));
    let phi3 = tiny_bpe(&[("<|ctl|>", 3)], "gpt-2", Some("Phi-3-mini-4k-instruct"));
    assert_eq!(
        texts_of(&plain, &plain.encode(text, false, true)),
        ["hello", " ", " ", "<|ctl|>", " ", " ", "hello"]
    );
    assert_eq!(
        texts_of(&phi3, &phi3.encode(text, false, true)),
        ["hello", " ", " ", "<|ctl|>", "hello"]
    );
    // jina-v2 vocabularies: <mask> eats the white space before it.
    let jina = tiny_bpe(&[("<mask>", 4)], "jina-v2-de", None);
    assert_eq!(
        texts_of(&jina, &jina.encode("hello \t<mask> hello", false, false)),
        ["hello", "<mask>", " ", "hello"]
    );
}

#[test]
fn stream_decoder_holds_back_partial_utf8() {
    let tok = vector_vocab("gpt-2");
    let text = "h\u{e9}llo \u{1F999}\u{1F999} w\u{f6}rld \u{65e5}\u{672c}";
    let ids = tok.encode(text, false, false);
    let mut dec = StreamDecoder::new(true);
    let mut out = String::new();
    let mut held = 0;
    for &id in &ids {
        let part = dec.push(&tok, id);
        if part.is_empty() {
            held += 1;
        }
        out.push_str(&part);
    }
    out.push_str(&dec.finish());
    assert_eq!(out, text);
    assert!(
        held > 0,
        "the emoji should span several byte tokens: {ids:?}"
    );
    // An unfinished sequence at the end is flushed as U+FFFD.
    let llama = tok.encode("\u{1F999}", false, false);
    assert!(llama.len() > 1);
    let mut dec = StreamDecoder::new(false);
    assert_eq!(dec.push(&tok, llama[0]), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    // Invalid bytes do not block what follows.
    let bad = tok
        .token_id("\u{a2}")
        .expect("byte 0xA2 as a continuation byte");
    let h = tok.token_id("h").expect("h");
    let mut dec = StreamDecoder::new(false);
    assert_eq!(dec.push(&tok, bad), "\u{FFFD}");
    assert_eq!(dec.push(&tok, h), "h");
}

#[test]
fn bad_vocabularies_are_errors() {
    let base = || VocabSpec {
        model: "gpt2".into(),
        pre: Some("gpt-2".into()),
        tokens: vec!["a".into(), "b".into(), "ab".into()],
        merges: Some(vec!["a b".into()]),
        ..VocabSpec::default()
    };
    assert!(Tokenizer::from_spec(base()).is_ok());
    let err = |spec: VocabSpec| {
        Tokenizer::from_spec(spec)
            .expect_err("must fail")
            .to_string()
    };
    assert!(err(VocabSpec {
        model: "bert".into(),
        ..base()
    })
    .contains("bert"));
    assert!(err(VocabSpec {
        pre: Some("nonsense".into()),
        ..base()
    })
    .contains("nonsense"));
    assert!(err(VocabSpec {
        merges: None,
        ..base()
    })
    .contains("merges"));
    assert!(err(VocabSpec {
        tokens: vec![],
        ..base()
    })
    .contains("no tokens"));
    assert!(err(VocabSpec {
        token_types: Some(vec![1]),
        ..base()
    })
    .contains("token types"));
    assert!(err(VocabSpec {
        tokens: vec!["a".into(), "a".into()],
        ..base()
    })
    .contains("duplicate"));
    // Kimi-K2 GGUFs may come without merges.
    assert!(Tokenizer::from_spec(VocabSpec {
        pre: Some("kimi-k2".into()),
        merges: None,
        ..base()
    })
    .is_ok());

    // Metadata problems name the key.
    let mut meta: BTreeMap<String, shared::gguf::MetaValue> = BTreeMap::new();
    let get = |m: &BTreeMap<String, shared::gguf::MetaValue>| {
        spec_from_gguf(|k| m.get(k))
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(get(&meta)
        .expect_err("no model")
        .contains("tokenizer.ggml.model"));
    meta.insert("tokenizer.ggml.model".into(), "gpt2".into());
    assert!(get(&meta)
        .expect_err("no tokens")
        .contains("tokenizer.ggml.tokens"));
    meta.insert(
        "tokenizer.ggml.tokens".into(),
        shared::gguf::MetaValue::U32(3),
    );
    assert!(get(&meta).expect_err("not an array").contains("wrong type"));
}

/// Encoding is near-linear: 10 KB of mixed text, and a single 20 000-letter word.
#[test]
fn encoding_is_fast() {
    let base = vector_texts("llama-bpe").concat();
    let mut text = String::new();
    while text.len() < 10_000 {
        text.push_str(&base);
    }
    let long_word = "ab".repeat(10_000);
    for name in ["llama-bpe", "qwen2", "deepseek-llm", "llama-spm"] {
        let tok = vector_vocab(name);
        for (what, t) in [("10 KB text", &text), ("20k-letter word", &long_word)] {
            let start = std::time::Instant::now();
            let ids = tok.encode(t, true, true);
            let took = start.elapsed();
            eprintln!("{name}: {what}: {} tokens in {took:?}", ids.len());
            assert!(tok.detokenize(&ids, true, false).len() >= t.len() / 2);
            // Generous for unoptimized builds; quadratic behaviour takes far longer.
            assert!(took.as_secs_f64() < 3.0, "{name}: {what} took {took:?}");
        }
    }
}
