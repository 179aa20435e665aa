//! `moeshard serve`: an OpenAI-compatible HTTP API over the engine.
//!
//! - `http`: the axum app — `POST /v1/chat/completions`, `POST /v1/completions`
//!   (JSON, or Server-Sent Events when `stream` is true), `GET /v1/models`, `GET /health`,
//!   `GET /metrics` — with OpenAI-style error bodies and the optional API key.
//! - `api`: request bodies and their checks.
//! - `scheduler`: continuous batching on the one OS thread that owns the [`Engine`].
//! - `stop`: stop strings over streamed text. `metrics`: counters and the Prometheus text.
//!
//! [`serve`] takes an already-bound listener, a function that loads the engine (run on the
//! scheduler thread while the server already answers `/health` with 503) and a shutdown
//! future, so tests bind `127.0.0.1:0` and stop the server without sleeps.

mod api;
mod http;
mod metrics;
mod scheduler;
mod stop;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{error, info};

use crate::chat_template::ChatTemplate;
use crate::distributed::launcher::LocalNodes;
use crate::engine::{Engine, UBATCH};
use crate::tokenizer::Tokenizer;

/// The context of each slot when `--ctx-size` is not given (or the model's training
/// context, when that is smaller).
pub const DEFAULT_CTX_SIZE: usize = 4096;

/// The server's settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The model's name in `/v1/models` and in responses.
    pub model_name: String,
    /// When set, `/v1/*` requires `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Sequences generated at once (slots, each with its own KV cache).
    pub n_parallel: usize,
    /// Positions per slot; `None`: [`DEFAULT_CTX_SIZE`] or the model's training context if
    /// smaller.
    pub n_ctx: Option<usize>,
    /// The most prompt tokens one sequence evaluates per step (at most [`UBATCH`]).
    pub prefill_chunk: usize,
    /// The largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model_name: "model".into(),
            api_key: None,
            n_parallel: 4,
            n_ctx: None,
            // Small enough that a long prompt delays the decoding sequences by a bounded
            // amount per step, large enough for efficient prompt batches.
            prefill_chunk: 256,
            max_body_bytes: 16 << 20,
        }
    }
}

impl ServeConfig {
    /// Checks the settings before anything starts.
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::Config(m));
        if self.n_parallel == 0 {
            return bad("--parallel must be at least 1".into());
        }
        if self.n_ctx == Some(0) {
            return bad("--ctx-size must be at least 1".into());
        }
        if self.prefill_chunk == 0 || self.prefill_chunk > UBATCH {
            return bad(format!(
                "--prefill-chunk must be between 1 and {UBATCH} (got {})",
                self.prefill_chunk
            ));
        }
        if self.api_key.as_deref() == Some("") {
            return bad("--api-key must not be empty".into());
        }
        Ok(())
    }
}

/// An engine and, in loopback mode, the node processes it uses (kept running as long as
/// the server is).
pub struct LoadedModel {
    pub engine: Engine,
    pub nodes: Option<LocalNodes>,
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("loading the model: {0}")]
    Load(String),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// What the HTTP side needs of the loaded model.
pub(crate) struct ModelInfo {
    pub(crate) engine: Arc<Engine>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: Option<ChatTemplate>,
    /// `bos_token`, `eos_token` for the template.
    pub(crate) template_vars: BTreeMap<String, serde_json::Value>,
    pub(crate) n_ctx: usize,
    pub(crate) n_vocab: usize,
    /// Whether experts run on nodes (`/health` then asks them).
    pub(crate) distributed: bool,
}

impl ModelInfo {
    fn new(engine: Arc<Engine>, config: &ServeConfig) -> Result<ModelInfo, String> {
        let file = engine.model().file().clone();
        let tokenizer = Tokenizer::from_gguf(&file)
            .map_err(|e| format!("the model's tokenizer cannot be used: {e}"))?;
        let template = match file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(source) => Some(
                ChatTemplate::new(source)
                    .map_err(|e| format!("parsing the model's chat template: {e}"))?,
            ),
            None => None,
        };
        let template_vars = ChatTemplate::special_token_vars(&tokenizer);
        let hp = engine.model().hparams();
        let n_ctx = config
            .n_ctx
            .unwrap_or_else(|| DEFAULT_CTX_SIZE.min(hp.n_ctx_train.max(1)));
        let distributed = !engine.experts().node_stats().is_empty();
        Ok(ModelInfo {
            n_vocab: hp.n_vocab,
            engine,
            tokenizer,
            template,
            template_vars,
            n_ctx,
            distributed,
        })
    }
}

/// State shared by the HTTP handlers and the scheduler thread.
pub(crate) struct Shared {
    pub(crate) config: ServeConfig,
    /// Set once the model is loaded.
    pub(crate) model: OnceLock<Arc<ModelInfo>>,
    pub(crate) load_error: OnceLock<String>,
    /// Requests to the scheduler; taken (closed) at shutdown.
    pub(crate) submit: Mutex<Option<std::sync::mpsc::Sender<scheduler::GenRequest>>>,
    pub(crate) metrics: metrics::Metrics,
    /// False once the scheduler thread has ended (or panicked).
    pub(crate) scheduler_alive: AtomicBool,
}

/// Marks the scheduler as gone when its thread ends, even by a panic.
struct AliveGuard<'a>(&'a AtomicBool);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Serves the API on `listener` until `shutdown` completes (then in-flight requests are
/// finished) or loading fails. `load` runs on the scheduler thread; `on_ready` is called
/// with the bound address once the model is loaded.
pub async fn serve<L, R, S>(
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    load: L,
    on_ready: R,
    shutdown: S,
) -> Result<(), ServeError>
where
    L: FnOnce() -> Result<LoadedModel, String> + Send + 'static,
    R: FnOnce(SocketAddr) + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    config.validate()?;
    let addr = listener.local_addr()?;
    let (submit_tx, submit_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        metrics: metrics::Metrics::new(config.n_parallel),
        config,
        model: OnceLock::new(),
        load_error: OnceLock::new(),
        submit: Mutex::new(Some(submit_tx)),
        scheduler_alive: AtomicBool::new(true),
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<bool>();
    let thread = std::thread::Builder::new()
        .name("moeshard-scheduler".into())
        .spawn({
            let shared = shared.clone();
            move || scheduler_thread(&shared, load, submit_rx, ready_tx)
        })?;

    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if ready_rx.await == Ok(true) {
            on_ready(addr);
        } else {
            let _ = failed_tx.send(());
        }
    });
    let app = http::router(shared.clone());
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let failed = async {
                // A dropped sender means the model loaded: wait for `shutdown` alone.
                if failed_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = shutdown => {}
                _ = failed => {}
            }
        })
        .await;

    // No more requests: the scheduler finishes what it holds and stops.
    shared
        .submit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        error!("the scheduler thread panicked");
    }
    let load_error = shared.load_error.get().cloned();
    // The engine may own a runtime (its nodes' links), which must not be dropped on an
    // async worker.
    let _ = tokio::task::spawn_blocking(move || drop(shared)).await;
    if let Some(e) = load_error {
        return Err(ServeError::Load(e));
    }
    served?;
    Ok(())
}

/// The scheduler thread: loads the model, publishes it, then batches requests until the
/// request channel closes.
fn scheduler_thread<L>(
    shared: &Shared,
    load: L,
    requests: std::sync::mpsc::Receiver<scheduler::GenRequest>,
    ready: tokio::sync::oneshot::Sender<bool>,
) where
    L: FnOnce() -> Result<LoadedModel, String>,
{
    let _alive = AliveGuard(&shared.scheduler_alive);
    let loaded = load().and_then(|LoadedModel { engine, nodes }| {
        let engine = Arc::new(engine);
        ModelInfo::new(engine, &shared.config).map(|info| (Arc::new(info), nodes))
    });
    let (info, _nodes) = match loaded {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "loading the model failed");
            let _ = shared.load_error.set(e);
            let _ = ready.send(false);
            return;
        }
    };
    info!(
        slots = shared.config.n_parallel,
        n_ctx = info.n_ctx,
        prefill_chunk = shared.config.prefill_chunk,
        "model ready"
    );
    let _ = shared.model.set(info.clone());
    let _ = ready.send(true);
    scheduler::Scheduler::new(
        &info.engine,
        &info.tokenizer,
        &shared.metrics,
        shared.config.n_parallel,
        info.n_ctx,
        shared.config.prefill_chunk,
    )
    .run(requests);
}
