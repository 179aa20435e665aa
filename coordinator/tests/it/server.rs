//! The OpenAI-compatible server (`coordinator::server`, `moeshard serve`) over HTTP on
//! 127.0.0.1: greedy answers equal `Engine::generate`'s for the same prompt tokens
//! (completions and chat, JSON and Server-Sent Events, single-process and with the experts
//! on 2 gRPC nodes), stop strings, usage, batch invariance under concurrent requests,
//! cancellation, bad requests, the API key, `/health` and `/metrics`; and the official
//! `openai` Python client against the `moeshard serve` binary.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::chat_template::ChatTemplate;
use coordinator::distributed::connect::{open_distributed, DistOptions};
use coordinator::distributed::launcher::{LaunchOptions, LocalNodes};
use coordinator::distributed::PROBE_INTERVAL;
use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};
use coordinator::server::{serve, LoadedModel, ServeConfig, ServeError};
use coordinator::tokenizer::{StreamDecoder, Tokenizer};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use proto::transport::TransportKind;
use serde_json::{json, Value};

use crate::support::{fixtures, smollm2_model};

// ---------------------------------------------------------------------------------------
// A server in this process, and a small HTTP client.

pub(crate) struct TestServer {
    pub(crate) addr: SocketAddr,
    pub(crate) runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl TestServer {
    /// Serves `engine` with `config`; returns once the model is ready.
    pub(crate) fn start(engine: Engine, config: ServeConfig) -> TestServer {
        let server = TestServer::start_with(config, move || {
            Ok(LoadedModel {
                engine,
                nodes: None,
            })
        });
        server.wait_ready();
        server
    }

    /// Serves what `load` gives; returns at once (the model may still be loading).
    fn start_with(
        config: ServeConfig,
        load: impl FnOnce() -> Result<LoadedModel, String> + Send + 'static,
    ) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = runtime.spawn(serve(listener, config, load, |_| {}, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            runtime,
            stop: Some(stop),
            done: Some(done),
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, _) = self.get("/health");
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "server not ready: {status}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .runtime
            .block_on(http(self.addr, "GET", path, &[], None));
        (r.0, r.1)
    }

    /// POSTs a JSON body: (status, body).
    fn post(&self, path: &str, body: &Value) -> (u16, String) {
        self.post_raw(path, &body.to_string(), &[])
    }

    pub(crate) fn post_raw(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let r = self.runtime.block_on(http(
            self.addr,
            "POST",
            path,
            headers,
            Some(body.to_owned()),
        ));
        (r.0, r.1)
    }

    /// POSTs and parses a 200 JSON answer.
    fn post_ok(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.post(path, body);
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// POSTs a streaming request: the `data:` payloads of the events, in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, text) = self.post(path, body);
        assert_eq!(status, 200, "{path}: {text}");
        sse_data(&text)
    }

    /// A metric's value from `/metrics` (the first sample whose name and labels match).
    pub(crate) fn metric(&self, sample: &str) -> f64 {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {sample} in /metrics:\n{text}"))
            .parse()
            .unwrap()
    }

    /// Stops the server and returns what `serve` returned.
    fn shutdown(mut self) -> Result<(), ServeError> {
        self.stop.take().map(|s| s.send(()));
        let done = self.done.take().unwrap();
        self.runtime.block_on(done).unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let (Some(stop), Some(done)) = (self.stop.take(), self.done.take()) {
            let _ = stop.send(());
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(60), done).await });
        }
    }
}

/// One HTTP/1.1 request on a new connection: (status, body, content type).
pub(crate) async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (u16, String, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    conn.abort();
    (
        status,
        String::from_utf8(bytes.to_vec()).unwrap(),
        content_type,
    )
}

/// Starts a streaming request, reads until the first event with content, then drops the
/// connection (a client that goes away).
async fn stream_then_disconnect(addr: SocketAddr, path: &str, body: &Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
            if seen.contains("\"content\":\"") && !seen.contains("\"content\":\"\"}") {
                break;
            }
            if seen.contains("\"text\":\"") {
                break;
            }
        }
    }
    drop(resp);
    drop(sender);
    conn.abort();
}

/// The `data:` payloads of a Server-Sent Events body (events without data, such as
/// keep-alive comments, are skipped).
pub(crate) fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| {
            let data: Vec<&str> = e
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// What a streamed answer says: its text, finish reason, usage chunk (if any) and whether
/// the first chat chunk carried the role. Checks the framing on the way.
#[derive(Debug)]
struct Streamed {
    text: String,
    finish_reason: String,
    usage: Option<Value>,
}

fn parse_stream(events: &[String], chat: bool) -> Streamed {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let mut text = String::new();
    let mut finish_reason = None;
    let mut usage = None;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["object"], object, "{c}");
        let choices = c["choices"].as_array().unwrap();
        if choices.is_empty() {
            assert_eq!(i, chunks.len() - 1, "the usage chunk comes last");
            usage = Some(c["usage"].clone());
            continue;
        }
        assert!(finish_reason.is_none(), "a chunk after the finish reason");
        let choice = &choices[0];
        if chat {
            if i == 0 {
                assert_eq!(choice["delta"]["role"], "assistant", "{c}");
            }
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
        } else {
            text.push_str(choice["text"].as_str().unwrap());
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            finish_reason = Some(r.to_owned());
        }
    }
    Streamed {
        text,
        finish_reason: finish_reason.expect("no finish reason"),
        usage,
    }
}

// ---------------------------------------------------------------------------------------
// References from the engine.

/// A greedy continuation as `moeshard generate` gives it: tokens until an
/// end-of-generation token (not included in the text) or `n` tokens.
#[derive(Clone, Debug)]
struct Expected {
    prompt_tokens: usize,
    completion_tokens: usize,
    text: String,
    finish_reason: &'static str,
}

fn expected(engine: &Engine, tok: &Tokenizer, prompt: &[u32], n: usize) -> Expected {
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let (tokens, _) = engine
        .generate(prompt, n, prompt.len() + n, &mut sampler, |t| {
            !tok.is_eog(t)
        })
        .unwrap();
    let mut decoder = StreamDecoder::new(false);
    let mut text = String::new();
    let ended = tokens.last().is_some_and(|&t| tok.is_eog(t));
    for &t in &tokens[..tokens.len() - usize::from(ended)] {
        text.push_str(&decoder.push(tok, t));
    }
    text.push_str(&decoder.finish());
    Expected {
        prompt_tokens: prompt.len(),
        completion_tokens: tokens.len(),
        text,
        finish_reason: if ended { "stop" } else { "length" },
    }
}

fn chat_prompt(engine: &Engine, tok: &Tokenizer, messages: &Value) -> Vec<u32> {
    let file = engine.model().file();
    let source = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .unwrap();
    let text = ChatTemplate::new(source)
        .unwrap()
        .render(messages, true, &ChatTemplate::special_token_vars(tok))
        .unwrap();
    tok.encode(&text, false, true)
}

fn tokenizer(engine: &Engine) -> Tokenizer {
    Tokenizer::from_gguf(engine.model().file()).unwrap()
}

const COMPLETION_PROMPT: &str = "The capital of France is";
const N_COMPLETION: usize = 16;
const N_CHAT: usize = 24;

/// With a system message SmolLM2 answers and ends its turn within [`N_CHAT`] tokens (the
/// end-of-generation path); the completion prompt runs to `max_tokens` (the length path).
fn chat_messages() -> Value {
    json!([
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
    ])
}

/// The greedy completion and chat answers the server must give.
struct References {
    completion: Expected,
    chat: Expected,
}

fn references(engine: &Engine) -> References {
    let tok = tokenizer(engine);
    let prompt = tok.encode(COMPLETION_PROMPT, true, true);
    let chat = chat_prompt(engine, &tok, &chat_messages());
    References {
        completion: expected(engine, &tok, &prompt, N_COMPLETION),
        chat: expected(engine, &tok, &chat, N_CHAT),
    }
}

fn check_usage(usage: &Value, want: &Expected) {
    assert_eq!(usage["prompt_tokens"], want.prompt_tokens, "{usage}");
    assert_eq!(
        usage["completion_tokens"], want.completion_tokens,
        "{usage}"
    );
    assert_eq!(
        usage["total_tokens"],
        want.prompt_tokens + want.completion_tokens,
        "{usage}"
    );
}

/// Completions and chat, JSON and streamed, against the references.
fn check_answers(server: &TestServer, refs: &References, model_name: &str) {
    let completion = json!({
        "model": model_name,
        "prompt": COMPLETION_PROMPT,
        "max_tokens": N_COMPLETION,
        "temperature": 0,
    });
    let r = server.post_ok("/v1/completions", &completion);
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["model"], model_name);
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["choices"][0]["text"], refs.completion.text.as_str());
    assert_eq!(
        r["choices"][0]["finish_reason"],
        refs.completion.finish_reason
    );
    check_usage(&r["usage"], &refs.completion);

    let mut streamed = completion.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let s = parse_stream(&server.stream("/v1/completions", &streamed), false);
    assert_eq!(s.text, refs.completion.text);
    assert_eq!(s.finish_reason, refs.completion.finish_reason);
    check_usage(s.usage.as_ref().expect("usage chunk"), &refs.completion);

    let chat = json!({
        "model": model_name,
        "messages": chat_messages(),
        "max_tokens": N_CHAT,
        "temperature": 0,
    });
    let r = server.post_ok("/v1/chat/completions", &chat);
    assert_eq!(r["object"], "chat.completion");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        r["choices"][0]["message"]["content"],
        refs.chat.text.as_str()
    );
    assert_eq!(r["choices"][0]["finish_reason"], refs.chat.finish_reason);
    check_usage(&r["usage"], &refs.chat);

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &streamed);
    let s = parse_stream(&events, true);
    assert_eq!(s.text, refs.chat.text);
    assert_eq!(s.finish_reason, refs.chat.finish_reason);
    assert!(s.usage.is_none(), "usage only when asked");
    assert!(
        !events[0].contains("\"usage\""),
        "no usage field unless asked: {}",
        events[0]
    );
}

fn smollm2_engine() -> Option<(PathBuf, Engine)> {
    let path = smollm2_model()?;
    let engine = Engine::open(&path).unwrap();
    Some((path, engine))
}

/// The qwen3moe Q8_0 fixture served with its experts on `nodes` loopback gRPC nodes (each
/// expert on `replicas` of them), and the node processes.
pub(crate) fn moe_server_on_nodes(
    nodes: usize,
    replicas: usize,
    config: ServeConfig,
) -> (TestServer, LocalNodes) {
    let path = fixtures().join("qwen3moe/model-q8_0.gguf");
    let opts = DistOptions {
        nodes: Some(nodes),
        replicas,
        transport: TransportKind::Grpc,
        launch: Some(launch_options()),
        ..DistOptions::default()
    };
    let dist = open_distributed(&path, &opts).unwrap();
    let local = dist.local_nodes.unwrap();
    (TestServer::start(dist.engine, config), local)
}

/// Eight short prompts for the MoE fixtures' concurrent-client tests.
pub(crate) const MOE_PROMPTS: [&str; 8] = [
    "hello world",
    "the cat sat on the mat",
    "one two three four five six seven",
    "a",
    "MoE models route tokens to experts",
    "lorem ipsum dolor sit amet",
    "0 1 2 3",
    "why is the sky blue?",
];

pub(crate) fn config(name: &str) -> ServeConfig {
    ServeConfig {
        model_name: name.into(),
        ..ServeConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn server_answers_equal_the_engine() {
    let Some((_, engine)) = smollm2_engine() else {
        return;
    };
    let refs = references(&engine);
    eprintln!("completion: {:?}\nchat: {:?}", refs.completion, refs.chat);
    assert_eq!(refs.chat.finish_reason, "stop", "{:?}", refs.chat);
    let server = TestServer::start(engine, config("smollm2"));
    check_answers(&server, &refs, "smollm2");

    let models: Value = serde_json::from_str(&server.get("/v1/models").1).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2");
    assert_eq!(models["data"][0]["object"], "model");
    let (status, body) = server.get("/health");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    let generated = server.metric("moeshard_generated_tokens_total");
    let want = 2 * (refs.completion.completion_tokens + refs.chat.completion_tokens);
    assert_eq!(generated as usize, want);
    assert_eq!(server.metric("moeshard_running_sequences"), 0.0);
    assert_eq!(server.metric("moeshard_queue_depth"), 0.0);
    assert_eq!(
        server.metric("moeshard_requests_total{outcome=\"error\"}"),
        0.0
    );
    check_prometheus_text(&server.get("/metrics").1);
    server.shutdown().unwrap();
}

#[test]
fn server_stop_strings_end_the_answer_before_them() {
    let Some((_, engine)) = smollm2_engine() else {
        return;
    };
    let refs = references(&engine);
    let server = TestServer::start(engine, config("smollm2"));
    let full = &refs.completion.text;
    // A stop string from the middle of the answer, spanning a word boundary.
    let words: Vec<(usize, &str)> = full.match_indices(' ').collect();
    assert!(words.len() >= 3, "answer too short for the test: {full:?}");
    let at = words[1].0;
    let stop: String = full[at..].chars().take(4).collect();
    let want = &full[..full.find(stop.as_str()).unwrap()];
    for stops in [json!(stop), json!(["never appears 12345", stop])] {
        let body = json!({
            "prompt": COMPLETION_PROMPT,
            "max_tokens": N_COMPLETION,
            "temperature": 0,
            "stop": stops,
        });
        let r = server.post_ok("/v1/completions", &body);
        assert_eq!(r["choices"][0]["text"], want, "stop {stops}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert!(r["usage"]["completion_tokens"].as_u64().unwrap() < N_COMPLETION as u64);
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let s = parse_stream(&server.stream("/v1/completions", &streamed), false);
        assert_eq!(s.text, *want, "streamed, stop {stops}");
        assert_eq!(s.finish_reason, "stop");
    }
    // A stop string that never comes changes nothing.
    let body = json!({
        "prompt": COMPLETION_PROMPT,
        "max_tokens": N_COMPLETION,
        "temperature": 0,
        "stop": ["never appears 12345"],
        "stream": true,
    });
    let s = parse_stream(&server.stream("/v1/completions", &body), false);
    assert_eq!(s.text, *full);
    assert_eq!(s.finish_reason, refs.completion.finish_reason);
}

#[test]
fn server_concurrent_answers_equal_answers_alone() {
    let Some((_, engine)) = smollm2_engine() else {
        return;
    };
    // Small prefill chunks so that prompts are spread over several steps, next to
    // sequences that decode; more requests than slots so that some wait.
    let server = TestServer::start(
        engine,
        ServeConfig {
            n_parallel: 4,
            prefill_chunk: 8,
            ..config("smollm2")
        },
    );
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a land far away, there lived a dragon who loved to",
        "List three colors:",
        "def fibonacci(n):",
        "The quick brown fox",
        "Water boils at",
    ];
    let body = |i: usize| {
        json!({
            "prompt": prompts[i],
            "max_tokens": 12 + 3 * i,
            "temperature": 0,
            "stream": i.is_multiple_of(2),
        })
    };
    let answer = |(status, text): (u16, String), streamed: bool| -> String {
        assert_eq!(status, 200, "{text}");
        if streamed {
            parse_stream(&sse_data(&text), false).text
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_owned()
        }
    };
    let alone: Vec<String> = (0..prompts.len())
        .map(|i| {
            answer(
                server.post("/v1/completions", &body(i)),
                i.is_multiple_of(2),
            )
        })
        .collect();
    assert!(alone.iter().all(|a| !a.is_empty()), "{alone:?}");
    let steps_before = server.metric("moeshard_step_seconds_count");
    let seqs_before = server.metric("moeshard_step_sequences_total");
    let addr = server.addr;
    let together: Vec<String> = server.runtime.block_on(async {
        let calls: Vec<_> = (0..prompts.len())
            .map(|i| {
                let b = body(i).to_string();
                tokio::spawn(
                    async move { http(addr, "POST", "/v1/completions", &[], Some(b)).await },
                )
            })
            .collect();
        let mut out = Vec::new();
        for (i, c) in calls.into_iter().enumerate() {
            let (status, text, _) = c.await.unwrap();
            out.push(answer((status, text), i.is_multiple_of(2)));
        }
        out
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "prompt {i} ({:?}) alone vs together", prompts[i]);
    }
    let steps = server.metric("moeshard_step_seconds_count") - steps_before;
    let seqs = server.metric("moeshard_step_sequences_total") - seqs_before;
    eprintln!("together: {seqs} sequences in {steps} steps");
    assert!(
        seqs / steps > 2.0,
        "the requests did not share steps: {seqs} sequences in {steps} steps"
    );
    // A seeded sampled answer is the same alone and together too.
    let sampled = json!({
        "prompt": prompts[0], "max_tokens": 16, "temperature": 0.9, "seed": 42,
    });
    let a = server.post_ok("/v1/completions", &sampled);
    let b = server.post_ok("/v1/completions", &sampled);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[test]
fn server_frees_the_slot_of_a_client_that_went_away() {
    let Some((_, engine)) = smollm2_engine() else {
        return;
    };
    let server = TestServer::start(
        engine,
        ServeConfig {
            n_parallel: 1,
            ..config("smollm2")
        },
    );
    let long = json!({
        "prompt": "Write a long story about a dragon.",
        "max_tokens": 400,
        "temperature": 0.8,
        "seed": 1,
        "stream": true,
    });
    server.runtime.block_on(stream_then_disconnect(
        server.addr,
        "/v1/completions",
        &long,
    ));
    wait_for(
        &server,
        "moeshard_requests_total{outcome=\"cancelled\"}",
        1.0,
    );
    assert_eq!(server.metric("moeshard_running_sequences"), 0.0);

    // A non-streaming request whose client gives up.
    let mut plain = long.clone();
    plain["stream"] = json!(false);
    let addr = server.addr;
    server.runtime.block_on(async {
        let call = tokio::spawn(async move {
            http(
                addr,
                "POST",
                "/v1/completions",
                &[],
                Some(plain.to_string()),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        call.abort();
    });
    wait_for(
        &server,
        "moeshard_requests_total{outcome=\"cancelled\"}",
        2.0,
    );
    let generated = server.metric("moeshard_generated_tokens_total");
    assert!(
        generated < 400.0,
        "the cancelled requests ran on: {generated} tokens"
    );

    // The one slot is free again.
    let r = server.post_ok(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(r["usage"]["completion_tokens"], 3);
}

fn wait_for(server: &TestServer, sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric(sample) != value {
        assert!(Instant::now() < deadline, "{sample} never reached {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// (method, path, body, status, the error's param, the error's code)
type BadRequest<'a> = (
    &'a str,
    &'a str,
    String,
    u16,
    Option<&'a str>,
    Option<&'a str>,
);

#[test]
fn server_bad_requests_get_openai_errors() {
    let Some((_, engine)) = smollm2_engine() else {
        return;
    };
    let server = TestServer::start(
        engine,
        ServeConfig {
            n_ctx: Some(128),
            max_body_bytes: 64 << 10,
            ..config("smollm2")
        },
    );
    let long_prompt = "word ".repeat(200);
    let big_body = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(100 << 10));
    let msgs = r#"[{"role":"user","content":"hi"}]"#;
    let cases: Vec<BadRequest> = vec![
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages":"#.into(),
            400,
            None,
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            "not json".into(),
            400,
            None,
            None,
        ),
        ("POST", "/v1/chat/completions", "".into(), 400, None, None),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages":[]}"#.into(),
            400,
            Some("messages"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model":"x"}"#.into(),
            400,
            Some("messages"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            format!(r#"{{"messages":{msgs},"temperature":"hot"}}"#),
            400,
            Some("temperature"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            format!(r#"{{"messages":{msgs},"max_tokens":-1}}"#),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            format!(r#"{{"messages":{msgs},"stop":5}}"#),
            400,
            Some("stop"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":7}]}"#.into(),
            400,
            Some("messages"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            format!(r#"{{"messages":{msgs},"n":3}}"#),
            400,
            Some("n"),
            None,
        ),
        (
            "POST",
            "/v1/chat/completions",
            format!(r#"{{"messages":{msgs},"max_tokens":1000}}"#),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "POST",
            "/v1/completions",
            format!(r#"{{"prompt":"{long_prompt}"}}"#),
            400,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt":""}"#.into(),
            400,
            Some("prompt"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt":[]}"#.into(),
            400,
            Some("prompt"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt":[1, 99999999]}"#.into(),
            400,
            Some("prompt"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt":{"a":1}}"#.into(),
            400,
            Some("prompt"),
            None,
        ),
        (
            "POST",
            "/v1/completions",
            big_body,
            413,
            None,
            Some("request_too_large"),
        ),
        (
            "GET",
            "/v1/completions",
            String::new(),
            405,
            None,
            Some("method_not_allowed"),
        ),
        (
            "GET",
            "/v1/nothing",
            String::new(),
            404,
            None,
            Some("not_found"),
        ),
    ];
    for (method, path, body, status, param, code) in cases {
        let shown: String = body.chars().take(80).collect();
        let (got, text, content_type) = server.runtime.block_on(http(
            server.addr,
            method,
            path,
            &[],
            (method == "POST").then_some(body),
        ));
        assert_eq!(got, status, "{method} {path} {shown}: {text}");
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} {shown}: {e}: {text}"));
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(err["type"].is_string(), "{v}");
        assert!(
            err.get("param").is_some() && err.get("code").is_some(),
            "{v}"
        );
        if let Some(p) = param {
            assert_eq!(err["param"], p, "{method} {path} {shown}: {v}");
        }
        if let Some(c) = code {
            assert_eq!(err["code"], c, "{method} {path} {shown}: {v}");
        }
    }
    // Still serving.
    let r = server.post_ok(
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(r["usage"]["completion_tokens"], 2);
}

#[test]
fn server_api_key_guards_v1() {
    let Some((_, engine)) = smollm2_engine() else {
        return;
    };
    let server = TestServer::start(
        engine,
        ServeConfig {
            api_key: Some("sekret".into()),
            ..config("smollm2")
        },
    );
    let body = r#"{"prompt":"Hi","max_tokens":2,"temperature":0}"#;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "sekret")],
    ] {
        let (status, text) = server.post_raw("/v1/completions", body, &headers);
        assert_eq!(status, 401, "{headers:?}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let (status, text) = server.post_raw(
        "/v1/completions",
        body,
        &[("authorization", "Bearer sekret")],
    );
    assert_eq!(status, 200, "{text}");
    let r = server.runtime.block_on(http(
        server.addr,
        "GET",
        "/v1/models",
        &[("authorization", "Bearer sekret")],
        None,
    ));
    assert_eq!(r.0, 200);
    assert_eq!(server.get("/v1/models").0, 401);
    // Probes need no key.
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/metrics").0, 200);
}

#[test]
fn server_health_is_unready_while_loading_and_after_a_failed_load() {
    let Some(path) = smollm2_model() else {
        return;
    };
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let server = TestServer::start_with(config("smollm2"), move || {
        let _ = wait.recv();
        Ok(LoadedModel {
            engine: Engine::open(&path).map_err(|e| e.to_string())?,
            nodes: None,
        })
    });
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "loading"
    );
    let (status, body) = server.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1}));
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["code"],
        "model_loading"
    );
    go.send(()).unwrap();
    server.wait_ready();
    server.shutdown().unwrap();

    let server = TestServer::start_with(config("broken"), || Err("no such file".into()));
    match server.shutdown() {
        Err(ServeError::Load(m)) => assert!(m.contains("no such file"), "{m}"),
        other => panic!("a failed load returned {other:?}"),
    }
}

pub(crate) fn launch_options() -> LaunchOptions {
    LaunchOptions {
        program: PathBuf::from(env!("CARGO_BIN_EXE_moeshard")),
        program_args: vec!["expert-node".into()],
        threads_per_node: 1,
        start_timeout: Duration::from_secs(120),
        ..LaunchOptions::this_executable().unwrap()
    }
}

/// SmolLM2 with its FFNs on 2 loopback nodes over gRPC: the same answers as the engine
/// gives over the same nodes, node counters in /metrics, and /health unready (and
/// requests failing, not hanging) once a node dies.
#[test]
fn server_with_experts_on_two_grpc_nodes() {
    let Some(path) = smollm2_model() else {
        return;
    };
    let opts = DistOptions {
        nodes: Some(2),
        transport: TransportKind::Grpc,
        launch: Some(launch_options()),
        ..DistOptions::default()
    };
    let dist = open_distributed(&path, &opts).unwrap();
    let refs = references(&dist.engine);
    let mut nodes: LocalNodes = dist.local_nodes.unwrap();
    let server = TestServer::start(dist.engine, config("smollm2"));
    check_answers(&server, &refs, "smollm2");
    let (status, body) = server.get("/health");
    assert_eq!(status, 200, "{body}");
    for node in ["node0", "node1"] {
        let n = server.metric(&format!(
            "moeshard_node_dispatches_total{{node=\"{node}\"}}"
        ));
        assert!(n > 0.0, "{node} answered no dispatch");
        assert_eq!(
            server.metric(&format!("moeshard_node_up{{node=\"{node}\"}}")),
            1.0
        );
    }
    check_prometheus_text(&server.get("/metrics").1);

    nodes.kill(1);
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "unavailable");
    assert_eq!(v["nodes_down"][0]["node"], "node1", "{v}");
    assert_eq!(server.metric("moeshard_node_up{node=\"node1\"}"), 0.0);
    let started = Instant::now();
    let (status, body) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "generation_failed");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("node1"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // The failed dispatch marked the node down: the executor says which experts have no
    // live node.
    let (status, body) = server.get("/health");
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no live node")),
        "{v}"
    );
    drop(server);
    drop(nodes);
}

/// An MoE fixture with its experts on 2 gRPC nodes (sliced, the default: two rounds per MoE
/// layer) and 8 concurrent streaming clients: every answer equals the answer alone, and a
/// node gets at most one dispatch per round of an MoE layer per step (the whole batch's
/// tokens at once, not a dispatch per request).
#[test]
fn server_moe_on_two_nodes_dispatches_once_per_layer_per_step() {
    let path = fixtures().join("qwen3moe/model-q8_0.gguf");
    let opts = DistOptions {
        nodes: Some(2),
        transport: TransportKind::Grpc,
        launch: Some(launch_options()),
        ..DistOptions::default()
    };
    let dist = open_distributed(&path, &opts).unwrap();
    let hp = dist.engine.model().hparams();
    let n_moe_layers = (0..hp.n_layer).filter(|&il| hp.is_moe_layer(il)).count();
    assert!(n_moe_layers > 0);
    let _nodes = dist.local_nodes;
    let server = TestServer::start(
        dist.engine,
        ServeConfig {
            n_parallel: 8,
            prefill_chunk: 2,
            ..config("qwen3moe")
        },
    );
    let prompts = MOE_PROMPTS;
    let body = |i: usize| {
        json!({
            "prompt": prompts[i],
            "max_tokens": 40 + i,
            "temperature": 0,
            "stream": true,
        })
        .to_string()
    };
    let text_of = |(status, text): (u16, String)| {
        assert_eq!(status, 200, "{text}");
        parse_stream(&sse_data(&text), false)
    };
    let alone: Vec<Streamed> = (0..prompts.len())
        .map(|i| text_of(server.post_raw("/v1/completions", &body(i), &[])))
        .collect();
    let dispatches = |node: &str| {
        server.metric(&format!(
            "moeshard_node_dispatches_total{{node=\"{node}\"}}"
        ))
    };
    let steps_before = server.metric("moeshard_step_seconds_count");
    let seqs_before = server.metric("moeshard_step_sequences_total");
    let before = [dispatches("node0"), dispatches("node1")];
    let addr = server.addr;
    let together: Vec<Streamed> = server.runtime.block_on(async {
        let calls: Vec<_> = (0..prompts.len())
            .map(|i| {
                let b = body(i);
                tokio::spawn(
                    async move { http(addr, "POST", "/v1/completions", &[], Some(b)).await },
                )
            })
            .collect();
        let mut out = Vec::new();
        for c in calls {
            let (status, text, _) = c.await.unwrap();
            out.push(text_of((status, text)));
        }
        out
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            (&a.text, &a.finish_reason),
            (&t.text, &t.finish_reason),
            "prompt {i} alone vs together"
        );
    }
    let steps = server.metric("moeshard_step_seconds_count") - steps_before;
    let seqs = server.metric("moeshard_step_sequences_total") - seqs_before;
    // The requests arrive within milliseconds of each other and live for dozens of steps:
    // most steps carry several of them.
    assert!(seqs / steps > 1.5, "{seqs} sequences in {steps} steps");
    for (i, node) in ["node0", "node1"].iter().enumerate() {
        let d = dispatches(node) - before[i];
        eprintln!("{node}: {d} dispatches for {steps} steps of {seqs} sequences");
        assert!(d > 0.0, "{node} got no dispatch");
        assert!(
            d <= 2.0 * (n_moe_layers as f64) * steps,
            "{node}: {d} dispatches in {steps} steps of {n_moe_layers} MoE layers: not one \
             per round (two) per layer per step"
        );
    }
    // The router's counts: every MoE layer routed tokens.
    let metrics = server.get("/metrics").1;
    let routed: Vec<f64> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("moeshard_layer_routed_tokens_total{"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert_eq!(routed.len(), n_moe_layers, "{metrics}");
    assert!(routed.iter().all(|&n| n > 0.0), "{routed:?}");
    check_prometheus_text(&metrics);
}

/// Polls `/health` until it answers `want`; panics after `within`.
pub(crate) fn wait_health(server: &TestServer, want: u16, within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let (status, body) = server.get("/health");
        if status == want {
            return body;
        }
        assert!(
            t0.elapsed() < within,
            "/health still {status} after {within:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An MoE fixture over 2 gRPC nodes: `/health` turns unready when a node stops and ready
/// again when it returns on its address (the prober re-verifies it), and the answers after
/// its return are the answers before.
#[test]
fn server_health_follows_a_node_that_stops_and_returns() {
    let (server, mut nodes) = moe_server_on_nodes(2, 1, config("qwen3moe"));
    let request = json!({"prompt": "the cat sat", "max_tokens": 12, "temperature": 0});
    let before = server.post_ok("/v1/completions", &request);
    nodes.kill(1);
    let body = wait_health(&server, 503, Duration::from_secs(10));
    assert!(body.contains("node1"), "{body}");
    nodes.restart(1).unwrap();
    wait_health(&server, 200, PROBE_INTERVAL * 5);
    let after = server.post_ok("/v1/completions", &request);
    assert_eq!(
        before["choices"][0]["text"], after["choices"][0]["text"],
        "the same answer once node1 is back"
    );
    assert_eq!(server.metric("moeshard_node_up{node=\"node1\"}"), 1.0);
}

/// The reliability contract at the server: an MoE fixture over 3 gRPC nodes with every
/// expert on two of them (`--replicas 2`), 8 concurrent streaming clients, node1 killed
/// (SIGKILL) mid-stream: no request fails and every answer equals the answer alone;
/// `/health` is unready while node1 is down and ready again once it is restarted on its
/// address, which then gets dispatches again.
#[test]
fn server_loses_no_request_when_one_of_three_nodes_dies() {
    let (server, mut nodes) = moe_server_on_nodes(
        3,
        2,
        ServeConfig {
            n_parallel: 8,
            prefill_chunk: 4,
            ..config("qwen3moe")
        },
    );
    let prompts = MOE_PROMPTS;
    let body = |i: usize| {
        json!({"prompt": prompts[i], "max_tokens": 48, "temperature": 0, "stream": true})
            .to_string()
    };
    let text_of = |(status, text): (u16, String)| {
        assert_eq!(status, 200, "{text}");
        parse_stream(&sse_data(&text), false)
    };
    let alone: Vec<Streamed> = (0..prompts.len())
        .map(|i| text_of(server.post_raw("/v1/completions", &body(i), &[])))
        .collect();
    let errors_before = server.metric("moeshard_requests_total{outcome=\"error\"}");
    let generated_before = server.metric("moeshard_generated_tokens_total");
    let addr = server.addr;
    let calls: Vec<_> = (0..prompts.len())
        .map(|i| {
            let b = body(i);
            server
                .runtime
                .spawn(async move { http(addr, "POST", "/v1/completions", &[], Some(b)).await })
        })
        .collect();
    // Mid-stream: some tokens out, most still to come.
    let t0 = Instant::now();
    while server.metric("moeshard_generated_tokens_total") < generated_before + 24.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no tokens generated"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    nodes.kill(1);
    let killed_at = server.metric("moeshard_generated_tokens_total") - generated_before;
    let together: Vec<Streamed> = server.runtime.block_on(async {
        let mut out = Vec::new();
        for c in calls {
            let (status, text, _) = c.await.unwrap();
            out.push(text_of((status, text)));
        }
        out
    });
    let total = server.metric("moeshard_generated_tokens_total") - generated_before;
    eprintln!("node1 killed after {killed_at} of {total} tokens");
    assert!(
        killed_at < total,
        "the kill came after the last token ({killed_at} of {total})"
    );
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            (&a.text, &a.finish_reason),
            (&t.text, &t.finish_reason),
            "prompt {i}: alone vs with node1 killed mid-stream"
        );
    }
    assert_eq!(
        server.metric("moeshard_requests_total{outcome=\"error\"}"),
        errors_before,
        "a request failed"
    );
    let health = wait_health(&server, 503, Duration::from_secs(10));
    assert!(health.contains("node1"), "{health}");
    nodes.restart(1).unwrap();
    wait_health(&server, 200, PROBE_INTERVAL * 5);
    let again = text_of(server.post_raw("/v1/completions", &body(0), &[]));
    assert_eq!(again.text, alone[0].text);
    assert!(
        server.metric("moeshard_node_dispatches_total{node=\"node1\"}") > 0.0,
        "the restarted node1 gets work again"
    );
    check_prometheus_text(&server.get("/metrics").1);
}

/// Checks the Prometheus text format line by line: `# HELP`/`# TYPE` before each family's
/// samples, names and label sets well formed, values numbers, histogram buckets rising.
fn check_prometheus_text(text: &str) {
    let mut typed = std::collections::HashMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let mut last_bucket = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(name_ok(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(name_ok(k), "{line}");
                    assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                }
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s).filter(|f| {
                    typed
                        .get(*f)
                        .is_some_and(|k| k == "histogram" || (k == "summary" && *s != "_bucket"))
                })
            })
            .unwrap_or(name);
        assert!(
            typed.contains_key(family),
            "sample before its # TYPE: {line}"
        );
        if name.ends_with("_bucket") {
            let v: f64 = value.parse().unwrap();
            if let Some(prev) = last_bucket {
                assert!(v >= prev, "buckets must rise: {line}");
            }
            last_bucket = Some(v);
        } else {
            last_bucket = None;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The official `openai` Python client against the `moeshard serve` binary.

/// `moeshard serve` as a process; stopped with SIGTERM when dropped.
struct ServeProcess {
    child: Child,
    url: String,
}

impl ServeProcess {
    fn start(model: &Path, extra: &[&str]) -> ServeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moeshard"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--port", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("moeshard serve listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("moeshard serve did not print its address");
        ServeProcess { child, url }
    }
}

impl ServeProcess {
    /// SIGTERM, then the exit status (`None` if it had to be killed after 30 s).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn python_has_openai() -> bool {
    Command::new("python3")
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn server_openai_python_client_with_two_nodes() {
    let Some(path) = smollm2_model() else {
        return;
    };
    if !python_has_openai() {
        eprintln!(
            "note: the `openai` Python package is not installed (pip install openai); skipping"
        );
        return;
    }
    let mut server = ServeProcess::start(
        &path,
        &[
            "--nodes",
            "2",
            "--transport",
            "grpc",
            "--api-key",
            "test-key",
        ],
    );
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_client/test_openai.py");
    let out = Command::new("python3")
        .arg(&script)
        .env("MOESHARD_URL", &server.url)
        .env("MOESHARD_API_KEY", "test-key")
        .env("MOESHARD_MODEL", "SmolLM2-135M-Instruct.Q4_1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "test_openai.py failed");
    assert!(
        stdout.contains("all openai client checks passed"),
        "{stdout}"
    );
    let status = server
        .stop()
        .expect("moeshard serve did not stop on SIGTERM");
    assert!(status.success(), "moeshard serve exited with {status}");
}
