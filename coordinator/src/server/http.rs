//! The axum app: routes, the API-key check, OpenAI-style errors, and the JSON / SSE
//! responses built from the scheduler's events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{Invalid, PromptInput, Request};
use super::metrics::{EngineTimes, NodeStats};
use super::scheduler::{Event, Finish, GenRequest};
use super::{ModelInfo, Shared};

/// How long `/health` and `/metrics` wait for the nodes' stats.
const NODE_STATS_TIMEOUT: Duration = Duration::from_secs(5);

type AppState = Arc<Shared>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let max_body = shared.config.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

/// An error as OpenAI's API writes it:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    fn param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
    }

    fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> ApiError {
        let err = ApiError::invalid(e.message);
        match e.param {
            Some(p) => err.param(p),
            None => err,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

async fn not_found(req: HttpRequest) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no such route: {} {}", req.method(), req.uri().path()),
    )
    .code("not_found")
}

async fn method_not_allowed(req: HttpRequest) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .code("method_not_allowed")
}

/// `Authorization: Bearer KEY` on `/v1/*` when the server has a key.
async fn require_key(State(shared): State<AppState>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &shared.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !ok {
            let message = if given.is_some() {
                "incorrect API key provided"
            } else {
                "missing API key: send it as `Authorization: Bearer KEY`"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
                .code("invalid_api_key")
                .into_response();
        }
    }
    next.run(req).await
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The loaded model, or 503 while loading (or after a failed load).
fn ready_model(shared: &Shared) -> Result<Arc<ModelInfo>, ApiError> {
    match shared.model.get() {
        Some(m) if shared.scheduler_alive.load(Ordering::SeqCst) => Ok(m.clone()),
        Some(_) => Err(ApiError::unavailable("the scheduler has stopped")),
        None => match shared.load_error.get() {
            Some(e) => Err(ApiError::unavailable(format!(
                "the model failed to load: {e}"
            ))),
            None => Err(ApiError::unavailable("the model is loading").code("model_loading")),
        },
    }
}

async fn models(State(shared): State<AppState>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": shared.config.model_name,
            "object": "model",
            "created": unix_time(),
            "owned_by": "moeshard",
        }]
    }))
    .into_response()
}

async fn health(State(shared): State<AppState>) -> Response {
    let model = match ready_model(&shared) {
        Ok(m) => m,
        Err(e) => {
            let status = if shared.load_error.get().is_some() {
                "error"
            } else if shared.model.get().is_none() {
                "loading"
            } else {
                "unavailable"
            };
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": status, "message": e.message})),
            )
                .into_response();
        }
    };
    if !model.distributed {
        return Json(json!({"status": "ok"})).into_response();
    }
    let (nodes, ready) = node_stats(&model).await;
    let down: Vec<Value> = nodes
        .iter()
        .filter_map(|(name, s)| s.as_ref().err().map(|e| json!({"node": name, "error": e})))
        .collect();
    let degraded_mode = model
        .engine
        .experts()
        .dispatch_metrics()
        .is_some_and(|d| d.degraded_mode);
    if down.is_empty() && ready.is_ok() {
        Json(json!({"status": "ok", "nodes": nodes.len()})).into_response()
    } else if degraded_mode {
        // --degraded serves without the missing experts: ready, but not whole.
        Json(json!({
            "status": "degraded",
            "reason": ready.err(),
            "nodes_down": down,
        }))
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "reason": ready.err(),
                "nodes_down": down,
            })),
        )
            .into_response()
    }
}

/// Each node's counters (an error for a node that does not answer, or that the executor
/// has marked down after a failed dispatch), and whether every expert has a live node;
/// asked off the async workers (the executor's calls block).
async fn node_stats(model: &Arc<ModelInfo>) -> (NodeStats, Result<(), String>) {
    let engine = model.engine.clone();
    let ask = tokio::task::spawn_blocking(move || {
        let experts = engine.experts();
        let up = experts.node_health();
        let stats = experts
            .node_stats()
            .into_iter()
            .map(|(name, s)| {
                let marked_down = up.iter().any(|(n, up)| *n == name && !up);
                let s = match s {
                    Ok(_) if marked_down => {
                        Err("marked down after a failed dispatch (probed until it returns)".into())
                    }
                    s => s.map_err(|e| e.to_string()),
                };
                (name, s)
            })
            .collect::<NodeStats>();
        (stats, experts.ready())
    });
    match tokio::time::timeout(NODE_STATS_TIMEOUT, ask).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            let why = format!("asking the nodes failed: {e}");
            (vec![("?".into(), Err(why.clone()))], Err(why))
        }
        Err(_) => {
            let why = format!("the nodes did not answer within {NODE_STATS_TIMEOUT:?}");
            (vec![("?".into(), Err(why.clone()))], Err(why))
        }
    }
}

async fn metrics(State(shared): State<AppState>) -> Response {
    let nodes = match shared.model.get() {
        Some(m) if m.distributed => node_stats(m).await.0,
        _ => Vec::new(),
    };
    let routing = shared
        .model
        .get()
        .map(|m| m.engine.model().routing_counts().snapshot(None));
    let engine = shared
        .model
        .get()
        .map(|m| EngineTimes {
            layers: m.engine.model().layer_times().snapshot(),
            dispatch: m.engine.experts().dispatch_metrics(),
        })
        .unwrap_or_default();
    let text = shared
        .metrics
        .render(Instant::now(), &nodes, routing.as_ref(), &engine);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A request body as JSON; the error names the field at fault.
fn parse_request(body: Result<Bytes, BytesRejection>) -> Result<Request, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let err = ApiError::new(status, "invalid_request_error", rejection.body_text());
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            err.code("request_too_large")
        } else {
            err
        }
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    let request: Request = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let err = if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid(format!("the body does not fit the request: {inner}"))
        } else {
            ApiError::invalid(format!("{path}: {inner}")).param(path)
        };
        err
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    Ok(request)
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

async fn chat_completions(
    State(shared): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(shared, body, Endpoint::Chat).await
}

async fn completions(
    State(shared): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(shared, body, Endpoint::Completions).await
}

/// A request ready for the scheduler.
struct Prepared {
    prompt: Vec<u32>,
    max_tokens: usize,
}

/// Renders and tokenizes the prompt and checks it against the context.
fn prepare(
    model: &ModelInfo,
    request: &Request,
    endpoint: Endpoint,
    max_tokens: Option<usize>,
) -> Result<Prepared, ApiError> {
    let prompt = match endpoint {
        Endpoint::Chat => {
            let messages = request.template_messages()?;
            let template = model.template.as_ref().ok_or_else(|| {
                ApiError::invalid("this model has no chat template: use /v1/completions")
            })?;
            let text = template
                .render(&messages, true, &model.template_vars)
                .map_err(|e| {
                    ApiError::invalid(format!("the chat template refused the messages: {e}"))
                        .param("messages")
                })?;
            model.tokenizer.encode(&text, false, true)
        }
        Endpoint::Completions => match request.prompt_input()? {
            PromptInput::Text(text) => model.tokenizer.encode(&text, true, true),
            PromptInput::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= model.n_vocab) {
                    return Err(ApiError::invalid(format!(
                        "token {bad} is out of range (the vocabulary has {} tokens)",
                        model.n_vocab
                    ))
                    .param("prompt"));
                }
                ids
            }
        },
    };
    let param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty").param(param));
    }
    let n_ctx = model.n_ctx;
    if prompt.len() >= n_ctx {
        return Err(ApiError::invalid(format!(
            "the prompt has {} tokens; this server's context is {n_ctx} tokens",
            prompt.len()
        ))
        .param(param)
        .code("context_length_exceeded"));
    }
    let room = n_ctx - prompt.len();
    let max_tokens = match (max_tokens, endpoint) {
        (Some(n), _) if n > room => {
            return Err(ApiError::invalid(format!(
                "the prompt ({} tokens) and max_tokens ({n}) exceed this server's context of \
                 {n_ctx} tokens",
                prompt.len()
            ))
            .param("max_tokens")
            .code("context_length_exceeded"))
        }
        (Some(n), _) => n,
        // OpenAI's default for completions; chat goes on to the end of the context.
        (None, Endpoint::Completions) => 16.min(room),
        (None, Endpoint::Chat) => room,
    };
    Ok(Prepared { prompt, max_tokens })
}

async fn generate(
    shared: AppState,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let request = parse_request(body)?;
    let model = ready_model(&shared)?;
    let params = request.params(next_seed())?;
    // Rendering and tokenizing a long prompt takes a while: off the async workers.
    let max_tokens = params.max_tokens;
    let prepared =
        tokio::task::spawn_blocking(move || prepare(&model, &request, endpoint, max_tokens))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    e.to_string(),
                )
            })??;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let submitted = shared
        .submit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| {
            s.send(GenRequest {
                prompt: prepared.prompt,
                max_tokens: prepared.max_tokens,
                sampling: params.sampling.clone(),
                stop: params.stop.clone(),
                events: tx,
            })
            .is_ok()
        });
    if submitted != Some(true) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let meta = ResponseMeta {
        id: response_id(endpoint),
        created: unix_time(),
        // The one model this server has, whatever the request named.
        model: shared.config.model_name.clone(),
        endpoint,
        include_usage: params.include_usage,
    };
    if params.stream {
        // Comment lines while nothing else is sent (a long prompt) keep proxies from timing
        // out, and show a client's disconnection early.
        Ok(Sse::new(event_stream(meta, rx))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
            .into_response())
    } else {
        collect(meta, rx).await
    }
}

/// What every response and chunk of one request repeats.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
}

fn usage(f: &Finish) -> Value {
    json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}

/// A failed generation as an error response (the step failed, e.g. a node is down).
fn generation_failed(message: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        format!("generation failed: {message}"),
    )
    .code("generation_failed")
}

/// The non-streaming answer: waits for the whole text.
async fn collect(
    meta: ResponseMeta,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let finish = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(f)) => break f,
            Some(Event::Error(e)) => return Err(generation_failed(e)),
            None => return Err(generation_failed("the scheduler stopped".into())),
        }
    };
    let reason = finish.reason.as_str();
    let body = match meta.endpoint {
        Endpoint::Chat => json!({
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason,
            }],
            "usage": usage(&finish),
        }),
        Endpoint::Completions => json!({
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": reason,
            }],
            "usage": usage(&finish),
        }),
    };
    Ok(Json(body).into_response())
}

impl ResponseMeta {
    /// A streamed chunk with one choice: a chat `delta` or completion `text`.
    fn chunk(&self, delta: Value, text: &str, finish_reason: Option<&str>) -> Value {
        let mut chunk = match self.endpoint {
            Endpoint::Chat => json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                }],
            }),
            Endpoint::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                }],
            }),
        };
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The last chunk when usage was asked for: no choices, the counts.
    fn usage_chunk(&self, finish: &Finish) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(finish),
        })
    }
}

/// Where a stream is.
enum StreamStep {
    /// The chat role chunk is not sent yet.
    Start,
    Running,
    /// `data: [DONE]` is next.
    Closing,
    Ended,
}

/// The Server-Sent Events of a streamed answer: `data: {chunk}` per piece of text, the
/// finish reason, the usage if asked, then `data: [DONE]`. Dropping the stream (the client
/// went away) drops the receiver, which frees the slot at the next step.
fn event_stream(
    meta: ResponseMeta,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: &Value| SseEvent::default().data(v.to_string());
    futures::stream::unfold(
        (meta, rx, StreamStep::Start, Vec::<SseEvent>::new()),
        move |(meta, mut rx, mut step, mut pending)| async move {
            loop {
                if let Some(e) = pending.pop() {
                    return Some((Ok(e), (meta, rx, step, pending)));
                }
                match step {
                    StreamStep::Start => {
                        step = StreamStep::Running;
                        if meta.endpoint == Endpoint::Chat {
                            let first =
                                meta.chunk(json!({"role": "assistant", "content": ""}), "", None);
                            pending.push(data(&first));
                        }
                    }
                    StreamStep::Running => match rx.recv().await {
                        Some(Event::Text(t)) => {
                            pending.push(data(&meta.chunk(json!({"content": t}), &t, None)));
                        }
                        Some(Event::Done(f)) => {
                            let last = meta.chunk(json!({}), "", Some(f.reason.as_str()));
                            // `pending` is a stack: the last event to send goes in first.
                            if meta.include_usage {
                                pending.push(data(&meta.usage_chunk(&f)));
                            }
                            pending.push(data(&last));
                            step = StreamStep::Closing;
                        }
                        Some(Event::Error(e)) => {
                            pending.push(data(&generation_failed(e).body()));
                            step = StreamStep::Ended;
                        }
                        None => {
                            pending.push(data(
                                &generation_failed("the scheduler stopped".into()).body(),
                            ));
                            step = StreamStep::Ended;
                        }
                    },
                    StreamStep::Closing => {
                        step = StreamStep::Ended;
                        pending.push(SseEvent::default().data("[DONE]"));
                    }
                    StreamStep::Ended => return None,
                }
            }
        },
    )
}

/// `chatcmpl-…` / `cmpl-…` with 24 hex digits.
fn response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!("{prefix}-{:016x}{:08x}", next_seed(), next_seed() as u32)
}

/// A seed for requests that give none (and response ids): different every call.
fn next_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    shared::rng::mix64(t ^ n.rotate_left(32) ^ u64::from(std::process::id()))
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
