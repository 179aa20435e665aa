//! The OpenAI API's request bodies as this server reads them, and the checks that turn a
//! request into generation parameters. Fields this server does not know are ignored, as
//! OpenAI's clients send many; fields it knows must have the right type.

use serde::Deserialize;

use crate::sampler::SamplerConfig;

/// The body of `POST /v1/chat/completions` and `POST /v1/completions` (each endpoint checks
/// that its own required field, `messages` or `prompt`, is there).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Request {
    /// Must be a string if given; otherwise ignored (the server has one model).
    #[serde(default)]
    #[allow(dead_code)]
    pub(crate) model: Option<String>,
    /// Chat.
    #[serde(default)]
    pub(crate) messages: Option<Vec<serde_json::Value>>,
    /// Completions.
    #[serde(default)]
    pub(crate) prompt: Option<Prompt>,
    #[serde(default)]
    pub(crate) max_tokens: Option<u64>,
    /// Chat's newer name of `max_tokens`.
    #[serde(default)]
    pub(crate) max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) temperature: Option<f32>,
    #[serde(default)]
    pub(crate) top_p: Option<f32>,
    /// llama.cpp's extension, as llama-server accepts it.
    #[serde(default)]
    pub(crate) top_k: Option<u32>,
    /// llama.cpp's extension, as llama-server accepts it.
    #[serde(default)]
    pub(crate) min_p: Option<f32>,
    #[serde(default)]
    pub(crate) stop: Option<Stop>,
    #[serde(default)]
    pub(crate) seed: Option<i64>,
    #[serde(default)]
    pub(crate) n: Option<u32>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    pub(crate) stream_options: Option<StreamOptions>,
    /// A bool for chat, a count for completions: refused unless false or absent.
    #[serde(default)]
    pub(crate) logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub(crate) echo: Option<bool>,
    #[serde(default)]
    pub(crate) suffix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: Option<bool>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, token ids, or a list holding one of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// The most stop strings a request may give (OpenAI allows 4).
pub(crate) const MAX_STOP: usize = 16;

/// A request that cannot be served as asked: the message and the parameter at fault.
#[derive(Debug, PartialEq)]
pub(crate) struct Invalid {
    pub(crate) message: String,
    pub(crate) param: Option<&'static str>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param),
    }
}

/// What the scheduler needs besides the prompt.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct GenParams {
    /// `None`: up to the end of the context.
    pub(crate) max_tokens: Option<usize>,
    pub(crate) sampling: SamplerConfig,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
}

impl Request {
    /// Checks the fields both endpoints share; `default_seed` is used when the request gives
    /// none.
    pub(crate) fn params(&self, default_seed: u64) -> Result<GenParams, Invalid> {
        if self
            .logprobs
            .as_ref()
            .is_some_and(|l| !matches!(l, serde_json::Value::Null | serde_json::Value::Bool(false)))
        {
            return Err(invalid("logprobs", "logprobs are not supported"));
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(invalid("n", "only n = 1 is supported"));
            }
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => return Err(invalid("max_tokens", "max_tokens must be at least 1")),
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(invalid(
                "temperature",
                format!("temperature must be between 0 and 2 (got {temperature})"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid(
                "top_p",
                format!("top_p must be above 0 and at most 1 (got {top_p})"),
            ));
        }
        let min_p = self.min_p.unwrap_or(0.05);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(invalid(
                "min_p",
                format!("min_p must be between 0 and 1 (got {min_p})"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(invalid(
                "stop",
                format!("at most {MAX_STOP} stop strings (got {})", stop.len()),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        Ok(GenParams {
            max_tokens,
            sampling: SamplerConfig {
                temperature,
                top_p,
                top_k: self.top_k.map_or(40, |k| k as usize),
                min_p,
                repeat_penalty: 1.0,
                repeat_last_n: 64,
                seed: self.seed.map_or(default_seed, |s| s as u64),
            },
            stop,
            stream,
            include_usage,
        })
    }
}

impl Request {
    /// Chat: the messages with each `content` a string (a list of text parts is joined), as chat
    /// templates expect them.
    pub(crate) fn template_messages(&self) -> Result<serde_json::Value, Invalid> {
        let Some(messages) = &self.messages else {
            return Err(invalid("messages", "missing field `messages`"));
        };
        if messages.is_empty() {
            return Err(invalid("messages", "messages must not be empty"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(invalid("tools", "tools are not supported"));
        }
        let mut out = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let Some(obj) = m.as_object() else {
                return Err(invalid(
                    "messages",
                    format!("messages[{i}] must be an object"),
                ));
            };
            if !obj.get("role").is_some_and(|r| r.is_string()) {
                return Err(invalid(
                    "messages",
                    format!("messages[{i}].role must be a string"),
                ));
            }
            let mut obj = obj.clone();
            match obj.get("content") {
                None | Some(serde_json::Value::Null) | Some(serde_json::Value::String(_)) => {}
                Some(serde_json::Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (
                            part.get("type").and_then(|t| t.as_str()),
                            part.get("text").and_then(|t| t.as_str()),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(invalid(
                                    "messages",
                                    format!(
                                        "messages[{i}].content[{j}]: only text parts \
                                         ({{\"type\": \"text\", \"text\": ...}}) are supported"
                                    ),
                                ))
                            }
                        }
                    }
                    obj.insert("content".into(), serde_json::Value::String(text));
                }
                Some(_) => {
                    return Err(invalid(
                        "messages",
                        format!("messages[{i}].content must be a string or a list of parts"),
                    ))
                }
            }
            out.push(serde_json::Value::Object(obj));
        }
        Ok(serde_json::Value::Array(out))
    }
}

/// A completion prompt after the checks: text to tokenize, or token ids as given.
#[derive(Debug, PartialEq)]
pub(crate) enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl Request {
    /// Completions: the prompt.
    pub(crate) fn prompt_input(&self) -> Result<PromptInput, Invalid> {
        let Some(prompt) = &self.prompt else {
            return Err(invalid("prompt", "missing field `prompt`"));
        };
        if self.echo == Some(true) {
            return Err(invalid("echo", "echo is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(invalid("suffix", "suffix is not supported"));
        }
        let one = |n: usize| {
            if n == 1 {
                Ok(())
            } else {
                Err(invalid(
                    "prompt",
                    format!("exactly one prompt is supported (got {n})"),
                ))
            }
        };
        match prompt {
            Prompt::Text(t) => Ok(PromptInput::Text(t.clone())),
            Prompt::Tokens(ids) => Ok(PromptInput::Tokens(ids.clone())),
            Prompt::Texts(list) => {
                one(list.len())?;
                Ok(PromptInput::Text(list[0].clone()))
            }
            Prompt::TokenLists(list) => {
                one(list.len())?;
                Ok(PromptInput::Tokens(list[0].clone()))
            }
        }
    }
}
