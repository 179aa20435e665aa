//! Chat template tests: the transformers renders in tests/fixtures/chat-templates,
//! tool calls through `tojson`, `raise_exception`, `strftime_now`, variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use super::*;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat-templates")
}

fn template(file: &str) -> ChatTemplate {
    let src = std::fs::read_to_string(fixture_dir().join(file)).expect("template file");
    ChatTemplate::new(&src).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn vars(pairs: &[(&str, Json)]) -> BTreeMap<String, Json> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

#[test]
fn transformers_renders_reproduced() {
    let renders: Json = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("renders.json")).expect("renders"),
    )
    .expect("json");
    let renders = renders.as_array().expect("list");
    assert_eq!(renders.len(), 20);
    let mut pass = 0;
    for r in renders {
        let name = format!(
            "{} / {}",
            r["template"].as_str().expect("t"),
            r["case"].as_str().expect("c")
        );
        let tmpl = template(r["template"].as_str().expect("template"));
        let extra: BTreeMap<String, Json> = r["variables"]
            .as_object()
            .expect("variables")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let add = r["add_generation_prompt"].as_bool().expect("agp");
        let got = tmpl
            .render(&r["messages"], add, &extra)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = r["rendered"].as_str().expect("rendered");
        if got == want {
            pass += 1;
        } else {
            eprintln!(
                "{name} (add_generation_prompt={add}):\n--- want\n{want}\n--- got\n{got}\n---"
            );
        }
    }
    eprintln!("chat templates: {pass}/{} renders identical", renders.len());
    assert_eq!(pass, renders.len());
}

fn tool_conversation() -> Json {
    json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris", "unit": "°C", "days": 2, "tags": ["<now>", "a&b"]}}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21.5}"},
        {"role": "user", "content": "Thanks"}
    ])
}

fn tools() -> Json {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather <forecast> & 'now'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1.5e-7}}}
    }}])
}

#[test]
fn tool_calls_render_with_python_json() {
    // Qwen3: tool schemas through `tojson`, arguments as a mapping.
    let out = template("Qwen-Qwen3-0.6B.jinja")
        .render(&tool_conversation(), true, &vars(&[("tools", tools())]))
        .expect("render");
    assert!(out.contains(
        r#"{"type": "function", "function": {"name": "get_weather", "description": "Weather <forecast> & 'now'", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1.5e-07}}}}}"#
    ), "{out}");
    assert!(out.contains(
        r#"<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C", "days": 2, "tags": ["<now>", "a&b"]}}
</tool_call>"#
    ), "{out}");
    assert!(out.contains(
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21.5}\n</tool_response><|im_end|>"
    ));
    assert!(out.ends_with("<|im_start|>assistant\n"));

    // Kimi-K2: the literal backslash-n after "## Return of".
    let out = template("moonshotai-Kimi-K2.jinja")
        .render(&tool_conversation(), true, &vars(&[("tools", tools())]))
        .expect("render");
    assert!(
        out.contains("## Return of call_1\\n{\"temp\": 21.5}"),
        "{out}"
    );
    assert!(out.contains("<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\""));

    // GLM-4.6: arguments as key/value pairs; non-strings through tojson.
    let out = template("GLM-4.6.jinja")
        .render(&tool_conversation(), true, &vars(&[("tools", tools())]))
        .expect("render");
    assert!(
        out.contains("<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>"),
        "{out}"
    );
    assert!(
        out.contains("<arg_key>days</arg_key>\n<arg_value>2</arg_value>"),
        "{out}"
    );
    assert!(
        out.contains("<arg_value>[\"<now>\", \"a&b\"]</arg_value>"),
        "{out}"
    );
}

#[test]
fn raise_exception_is_an_error() {
    // GLM-4.6 refuses tool-call arguments given as a JSON string.
    let mut conv = tool_conversation();
    conv[1]["tool_calls"][0]["function"]["arguments"] = json!("{\"city\": \"Paris\"}");
    let err = template("GLM-4.6.jinja")
        .render(&conv, true, &BTreeMap::new())
        .expect_err("must raise");
    match err {
        ChatTemplateError::Raised(msg) => {
            assert!(
                msg.starts_with("Invalid tool call arguments passed: "),
                "{msg}"
            )
        }
        other => panic!("expected Raised, got {other}"),
    }
    let t =
        ChatTemplate::new("{{ raise_exception('nope: ' + messages[0].role) }}").expect("compile");
    let err = t
        .render(&json!([{"role": "user"}]), false, &BTreeMap::new())
        .expect_err("raise");
    assert!(
        matches!(&err, ChatTemplateError::Raised(m) if m == "nope: user"),
        "{err}"
    );
}

#[test]
fn jinja2_environment_details() {
    let render = |src: &str, extra: &BTreeMap<String, Json>| {
        ChatTemplate::new(src)
            .expect("compile")
            .render(&json!([{"role": "user", "content": "hi"}]), true, extra)
            .expect("render")
    };
    let none = BTreeMap::new();
    // trim_blocks + lstrip_blocks, and one trailing newline dropped.
    assert_eq!(
        render("  {% if true %}\nA\n  {% endif %}\nB\n", &none),
        "A\nB"
    );
    // Lenient undefined: missing keys are falsy and empty.
    assert_eq!(
        render(
            "[{{ messages[0].nope }}]{% if messages[0].nope %}x{% endif %}",
            &none
        ),
        "[]"
    );
    // Booleans print the Python way.
    assert_eq!(
        render("{{ tools is none }} {{ documents is defined }}", &none),
        "True True"
    );
    // Python methods (pycompat), loop controls, namespace, slicing.
    assert_eq!(
        render(
            "{{ ' a,b '.strip().split(',') | tojson }} {{ 'x'.upper() }} {{ {'k': 1}.get('k') }}",
            &none
        ),
        "[\"a\", \"b\"] X 1"
    );
    assert_eq!(
        render("{% for i in [1,2,3,4] %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}", &none),
        "13"
    );
    assert_eq!(render("{% set ns = namespace(n=0) %}{% for m in [1,2] %}{% set ns.n = ns.n + m %}{% endfor %}{{ ns.n }}", &none), "3");
    assert_eq!(render("{{ [1,2,3][::-1] | tojson }}", &none), "[3, 2, 1]");
    // tojson: Python's json.dumps, no HTML escaping, options as keywords.
    assert_eq!(
        render(
            "{{ {'a': '<&\\'>', 'b': [1.0, 2, none, true]} | tojson }}",
            &none
        ),
        r#"{"a": "<&'>", "b": [1.0, 2, null, true]}"#
    );
    assert_eq!(
        render("{{ 'é\\n' | tojson(ensure_ascii=True) }}", &none),
        r#""\u00e9\n""#
    );
    assert_eq!(
        render("{{ {'a': [1]} | tojson(indent=2) }}", &none),
        "{\n  \"a\": [\n    1\n  ]\n}"
    );
    // Extra variables override and extend the context.
    assert_eq!(
        render(
            "{{ bos_token }}|{{ enable_thinking }}",
            &vars(&[
                ("bos_token", json!("<s>")),
                ("enable_thinking", json!(false))
            ])
        ),
        "<s>|False"
    );
    // `{% generation %}` blocks render their body.
    assert_eq!(render("{% generation %}X{% endgeneration %}", &none), "X");
}

#[test]
fn python_float_reprs() {
    for (f, want) in [
        (1.0, "1.0"),
        (21.5, "21.5"),
        (0.1, "0.1"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (1.5e-7, "1.5e-07"),
        (0.0001, "0.0001"),
        (-2.5e20, "-2.5e+20"),
        (123456.789, "123456.789"),
    ] {
        assert_eq!(python_float_repr(f), want);
    }
}

#[test]
fn strftime_formats() {
    // 2024-02-29 13:05:09 UTC was a Thursday.
    let t = 1_709_211_909;
    assert_eq!(strftime("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
    assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
    assert_eq!(
        strftime("%A, %B %-d, %y %I%p %j %%", t),
        "Thursday, February 29, 24 01PM 060 %"
    );
    assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
    let t = ChatTemplate::new("{{ strftime_now('%Y') }}").expect("compile");
    let year = t
        .render(&json!([]), false, &BTreeMap::new())
        .expect("render");
    assert!(year.len() == 4 && year.starts_with('2'), "{year}");
}

#[test]
fn variables_and_errors() {
    assert_eq!(
        parse_var("bos_token=<s>").expect("ok"),
        ("bos_token".into(), json!("<s>"))
    );
    assert_eq!(
        parse_var("enable_thinking=false").expect("ok"),
        ("enable_thinking".into(), json!(false))
    );
    assert_eq!(parse_var("n=3").expect("ok").1, json!(3));
    assert_eq!(parse_var("x={\"a\": 1}").expect("ok").1, json!({"a": 1}));
    assert_eq!(parse_var("s=").expect("ok").1, json!(""));
    assert!(parse_var("novalue").is_err());
    assert!(parse_var("=v").is_err());
    assert!(parse_var("bad-name=v").is_err());

    assert!(matches!(
        ChatTemplate::new("{% if %}"),
        Err(ChatTemplateError::Syntax(_))
    ));
    let t = ChatTemplate::new("{{ messages[0].content }}").expect("compile");
    assert!(matches!(
        t.render(&json!({}), false, &BTreeMap::new()),
        Err(ChatTemplateError::BadMessages(_))
    ));
    assert!(matches!(
        t.render(&json!([1]), false, &BTreeMap::new()),
        Err(ChatTemplateError::BadMessages(_))
    ));
    // Immutable sandbox: templates cannot mutate lists.
    let t = ChatTemplate::new("{% set l = [1] %}{{ l.append(2) }}").expect("compile");
    assert!(t.render(&json!([]), false, &BTreeMap::new()).is_err());
}

/// Tool declarations, tool calls, tool results and reasoning in all five templates,
/// against jinja2 renders (testdata/README.md).
#[test]
fn tool_conversations_match_jinja2() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/chat_template/testdata/tool_renders.json");
    let cases: Json =
        serde_json::from_str(&std::fs::read_to_string(path).expect("data")).expect("json");
    let cases = cases.as_array().expect("list");
    assert_eq!(cases.len(), 15);
    let mut pass = 0;
    for c in cases {
        let name = format!(
            "{} / {}",
            c["template"].as_str().expect("t"),
            c["case"].as_str().expect("c")
        );
        let extra: BTreeMap<String, Json> = c["variables"]
            .as_object()
            .expect("variables")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let got = template(c["template"].as_str().expect("template")).render(
            &c["messages"],
            c["add_generation_prompt"].as_bool().expect("agp"),
            &extra,
        );
        match (got, c["rendered"].as_str()) {
            (Ok(got), Some(want)) if got == want => pass += 1,
            (got, want) => eprintln!("{name}:\n--- want\n{want:?}\n--- got\n{got:?}"),
        }
    }
    eprintln!(
        "tool conversations: {pass}/{} renders identical",
        cases.len()
    );
    assert_eq!(pass, cases.len());
}

/// SmolLM2's GGUF template with its own BOS/EOS texts gives the prompt of the
/// SmolLM2 reference generations (which llama.cpp tokenized to the reference ids).
#[test]
fn gguf_template_and_token_vars() {
    let path = std::env::var_os("MOESHARD_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        eprintln!("SmolLM2 model not found at {}: skipping", path.display());
        return;
    }
    let file = shared::gguf::GgufFile::open(&path).expect("open");
    let tok = crate::tokenizer::Tokenizer::from_gguf(&file).expect("tokenizer");
    let tmpl = ChatTemplate::from_gguf(&file)
        .expect("compiles")
        .expect("has a template");
    let vars = ChatTemplate::special_token_vars(&tok);
    assert_eq!(vars.get("bos_token"), Some(&json!("<|im_start|>")));
    assert_eq!(vars.get("eos_token"), Some(&json!("<|im_end|>")));
    let messages = json!([{"role": "user", "content": "Write one sentence about the sea."}]);
    let prompt = tmpl.render(&messages, true, &vars).expect("render");
    assert!(
        prompt.ends_with("<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt:?}"
    );
    let reference: Json = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2/reference.json"),
        )
        .expect("reference"),
    )
    .expect("json");
    let want: Vec<u32> = reference["generate"][1]["prompt_tokens"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    // The template adds a default system turn before the user turn.
    let ids = tok.encode(&prompt, false, true);
    assert!(ids.ends_with(&want), "{ids:?}");
}
