//! Unit tests of the server's pure parts: stop strings, step planning, request checks and
//! the metrics text.

use super::api::{GenParams, PromptInput, Request};
use super::scheduler::{plan_step, SeqState, Work};
use super::stop::StopMatcher;

fn stops(list: &[&str]) -> StopMatcher {
    StopMatcher::new(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

/// Feeds `pieces` through a matcher: (released text, whether a stop string was found).
fn check_stop(list: &[&str], pieces: &[&str]) -> (String, bool) {
    let mut m = stops(list);
    let mut out = String::new();
    for p in pieces {
        let (text, hit) = m.push(p);
        out.push_str(&text);
        if hit {
            return (out, true);
        }
    }
    out.push_str(&m.finish());
    (out, false)
}

#[test]
fn stop_strings_never_reach_the_output() {
    let cases: &[(&[&str], &[&str], &str, bool)] = &[
        (&[], &["a", "b"], "ab", false),
        (&["END"], &["hello ", "EN", "D more"], "hello ", true),
        (&["END"], &["hello E", "N", "x"], "hello ENx", false),
        (&["END"], &["hello EN"], "hello EN", false),
        (&["\n\n"], &["one\n", "\ntwo"], "one", true),
        // The earliest occurrence wins, whichever stop string it is.
        (&["bb", "ab"], &["xab", "b"], "x", true),
        (&["", "z"], &["abc"], "abc", false),
        // Multi-byte characters: held back and released on character boundaries.
        (&["é!"], &["caf", "é", "?"], "café?", false),
        (&["é!"], &["café", "!"], "caf", true),
        // A stop string inside one piece.
        (&["stop"], &["no stop here"], "no ", true),
    ];
    for (list, pieces, want, want_hit) in cases {
        assert_eq!(
            check_stop(list, pieces),
            (want.to_string(), *want_hit),
            "stops {list:?} pieces {pieces:?}"
        );
    }
}

#[test]
fn stop_matcher_holds_back_only_possible_prefixes() {
    let mut m = stops(&["abc"]);
    assert_eq!(m.push("xxa"), ("xx".to_string(), false));
    assert_eq!(m.push("b"), (String::new(), false));
    assert_eq!(m.push("d"), ("abd".to_string(), false));
    assert_eq!(m.finish(), "");
}

#[test]
fn steps_give_prefill_chunks_and_single_decode_tokens() {
    let s = |n_prompt, n_prefilled| {
        Some(SeqState {
            n_prompt,
            n_prefilled,
        })
    };
    let plan = plan_step(&[s(1000, 0), None, s(10, 10), s(300, 256)], 256);
    assert_eq!(
        plan,
        vec![
            (0, Work::Prefill(0..256)),
            (2, Work::Decode),
            (3, Work::Prefill(256..300)),
        ]
    );
    assert!(plan_step(&[None, None], 256).is_empty());
}

fn parse(body: &str) -> Request {
    serde_json::from_str(body).unwrap()
}

#[test]
fn request_fields_become_generation_params() {
    let p = parse(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0,"stop":"x","seed":7,"stream":true,"stream_options":{"include_usage":true}}"#)
        .params(1)
        .unwrap();
    assert_eq!(p.max_tokens, Some(5));
    assert_eq!(p.sampling.temperature, 0.0);
    assert_eq!(p.sampling.seed, 7);
    assert_eq!(p.stop, vec!["x".to_string()]);
    assert!(p.stream && p.include_usage);
    let p: GenParams = parse(r#"{"prompt":"a","max_completion_tokens":3,"stop":["a","b"]}"#)
        .params(99)
        .unwrap();
    assert_eq!((p.max_tokens, p.sampling.seed), (Some(3), 99));
    assert_eq!(p.stop.len(), 2);
}

#[test]
fn bad_params_name_the_field() {
    let cases = [
        (r#"{"n":2}"#, "n"),
        (r#"{"max_tokens":0}"#, "max_tokens"),
        (r#"{"temperature":3}"#, "temperature"),
        (r#"{"top_p":0}"#, "top_p"),
        (r#"{"logprobs":true}"#, "logprobs"),
        (
            r#"{"stream_options":{"include_usage":true}}"#,
            "stream_options",
        ),
    ];
    for (body, param) in cases {
        let err = parse(body).params(0).unwrap_err();
        assert_eq!(err.param, Some(param), "{body}: {err:?}");
    }
}

#[test]
fn chat_messages_are_checked_and_text_parts_joined() {
    let msgs = parse(
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
    )
    .template_messages()
    .unwrap();
    assert_eq!(msgs[0]["content"], "ab");
    for body in [
        r#"{}"#,
        r#"{"messages":[]}"#,
        r#"{"messages":[1]}"#,
        r#"{"messages":[{"content":"x"}]}"#,
        r#"{"messages":[{"role":"user","content":5}]}"#,
        r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
        r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
    ] {
        let err = parse(body).template_messages().unwrap_err();
        assert!(err.param.is_some(), "{body}");
    }
}

#[test]
fn completion_prompts() {
    let cases = [
        (r#"{"prompt":"hi"}"#, Ok(PromptInput::Text("hi".into()))),
        (r#"{"prompt":["hi"]}"#, Ok(PromptInput::Text("hi".into()))),
        (r#"{"prompt":[1,2]}"#, Ok(PromptInput::Tokens(vec![1, 2]))),
        (r#"{"prompt":[[3]]}"#, Ok(PromptInput::Tokens(vec![3]))),
        (r#"{"prompt":["a","b"]}"#, Err("prompt")),
        (r#"{}"#, Err("prompt")),
        (r#"{"prompt":"a","echo":true}"#, Err("echo")),
    ];
    for (body, want) in cases {
        let got = parse(body).prompt_input().map_err(|e| e.param.unwrap());
        assert_eq!(got, want, "{body}");
    }
}

#[test]
fn metrics_text_has_every_family_once() {
    let m = super::metrics::Metrics::new(4);
    let now = std::time::Instant::now();
    m.record_step(now, std::time::Duration::from_millis(30), 2, 100, 2);
    m.set_load(1, 2);
    let nodes = vec![
        (
            "node0".to_string(),
            Ok(proto::wire::Stats {
                dispatches: 5,
                ..Default::default()
            }),
        ),
        ("node1".to_string(), Err("down".to_string())),
    ];
    let routing = shared::placement::routing_stats::RoutingStats {
        version: shared::placement::routing_stats::ROUTING_STATS_VERSION,
        model_identity: None,
        n_expert: 2,
        n_expert_used: 1,
        layers: vec![shared::placement::routing_stats::LayerRouting {
            layer: 3,
            n_tokens: 10,
            counts: vec![7, 3],
        }],
    };
    let latency = crate::histogram::Histogram::new(crate::histogram::DISPATCH_BUCKETS);
    latency.observe(std::time::Duration::from_micros(300));
    let engine = super::metrics::EngineTimes {
        layers: vec![(0.5, 10), (0.25, 10)],
        dispatch: Some(crate::models::DispatchMetrics {
            latency: vec![("node0".to_string(), latency.snapshot())],
            decode_deadline: vec![("node0".to_string(), std::time::Duration::from_secs(2))],
            degraded_mode: true,
            dropped_assignments: 7,
        }),
    };
    let text = m.render(now, &nodes, Some(&routing), &engine);
    for line in [
        "moeshard_prompt_tokens_total 100",
        "moeshard_generated_tokens_total 2",
        "moeshard_step_sequences_total 2",
        "moeshard_queue_depth 1",
        "moeshard_running_sequences 2",
        "moeshard_step_seconds_bucket{le=\"0.025\"} 0",
        "moeshard_step_seconds_bucket{le=\"0.05\"} 1",
        "moeshard_step_seconds_bucket{le=\"+Inf\"} 1",
        "moeshard_step_seconds_count 1",
        "moeshard_node_up{node=\"node0\"} 1",
        "moeshard_node_up{node=\"node1\"} 0",
        "moeshard_node_dispatches_total{node=\"node0\"} 5",
        "moeshard_layer_routed_tokens_total{layer=\"3\"} 10",
        "moeshard_expert_routed_tokens_total{layer=\"3\",expert=\"1\"} 3",
        "moeshard_layer_seconds_sum{layer=\"1\"} 0.25",
        "moeshard_layer_seconds_count{layer=\"1\"} 10",
        "moeshard_node_dispatch_seconds_bucket{node=\"node0\",le=\"0.00025\"} 0",
        "moeshard_node_dispatch_seconds_bucket{node=\"node0\",le=\"0.0005\"} 1",
        "moeshard_node_dispatch_seconds_bucket{node=\"node0\",le=\"+Inf\"} 1",
        "moeshard_node_dispatch_seconds_count{node=\"node0\"} 1",
        "moeshard_node_dispatch_deadline_seconds{node=\"node0\"} 2",
        "moeshard_degraded_mode 1",
        "moeshard_degraded_dropped_assignments_total 7",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let mut families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    let n = families.len();
    families.sort();
    families.dedup();
    assert_eq!(families.len(), n, "a family is listed twice");
}
