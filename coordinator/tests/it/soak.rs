//! Soak: clients keep streaming completions from an MoE fixture served over 3 loopback gRPC
//! nodes with every expert on two of them (`--replicas 2`), while one node is killed
//! (SIGKILL) and restarted on its address periodically. Records tokens/s, errors and the
//! anonymous resident memory (RssAnon: heap and stacks, not the file-backed weight pages)
//! of every process over time, and checks the failover contract: no request fails, every
//! answer equals the answer alone, and no long-lived process (the coordinator, the nodes
//! never killed) grows its RssAnon more than 5% beyond its warm-up peak.
//!
//! Length: `MOESHARD_SOAK_SECS` (default 120 when `MOESHARD_SLOW_TESTS` is set, as
//! `scripts/test` does, else 20). Ignored by a plain `cargo test`: the coordinator is this
//! test process, whose memory the other tests running beside it would add to, so
//! `scripts/test` runs it in a process of its own. The 30-minute run by hand:
//! `MOESHARD_SOAK_SECS=1800 MOESHARD_SOAK_OUT=soak.json cargo test --release -p coordinator
//! --test it soak -- --ignored --nocapture`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::distributed::PROBE_INTERVAL;
use coordinator::server::ServeConfig;
use serde_json::{json, Value};

use crate::server::{config, http, moe_server_on_nodes, sse_data, wait_health, MOE_PROMPTS};

const CLIENTS: usize = 4;
const MAX_TOKENS: usize = 32;
/// The node killed and restarted; the others live through the whole run.
const VICTIM: usize = 2;
/// How long the victim stays dead before it is restarted.
const DOWN_FOR: Duration = Duration::from_secs(3);

const PROMPTS: [&str; 8] = MOE_PROMPTS;

fn soak_duration() -> Duration {
    let default = if std::env::var_os("MOESHARD_SLOW_TESTS").is_some() {
        120
    } else {
        20
    };
    let secs = std::env::var("MOESHARD_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(secs)
}

/// Bytes this process's allocator has handed out and not had back (glibc's `mallinfo2`:
/// arena chunks in use plus mmapped chunks): tells a leak (it grows) from allocator
/// fragmentation (RssAnon grows, this does not).
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

/// RssAnon of a process, in bytes (`None` once it is gone).
fn rss_anon(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    failed: AtomicU64,
    mismatched: AtomicU64,
}

/// The text of a streamed completion, or why it is not a whole one.
fn streamed_text(status: u16, body: &str) -> Result<String, String> {
    if status != 200 {
        return Err(format!("status {status}: {body}"));
    }
    let events = sse_data(body);
    if events.last().map(String::as_str) != Some("[DONE]") {
        return Err(format!("no [DONE]: {body}"));
    }
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).map_err(|err| format!("{err}: {e}"))?;
        if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
        if v.get("error").is_some() {
            return Err(format!("error event: {e}"));
        }
    }
    Ok(text)
}

fn request(i: usize) -> String {
    json!({
        "prompt": PROMPTS[i % PROMPTS.len()],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": true,
    })
    .to_string()
}

/// One sample of the record.
struct Sample {
    at: f64,
    tokens_per_s: f64,
    requests: u64,
    failed: u64,
    /// The coordinator's heap in use ([`heap_in_use`]).
    heap: u64,
    /// (process, RssAnon bytes) — "coordinator", "node0", ...
    rss: Vec<(String, Option<u64>)>,
}

#[test]
#[ignore = "run alone (its RSS check measures the whole test process): scripts/test runs it \
            in its own process, `cargo test -p coordinator --test it soak -- --ignored`"]
fn soak_with_periodic_node_kills() {
    let duration = soak_duration();
    let (server, mut nodes) = moe_server_on_nodes(
        3,
        2,
        ServeConfig {
            n_parallel: CLIENTS,
            prefill_chunk: 8,
            ..config("qwen3moe")
        },
    );
    let expected: Arc<Vec<String>> = Arc::new(
        (0..PROMPTS.len())
            .map(|i| {
                let (status, body) = server.post_raw("/v1/completions", &request(i), &[]);
                streamed_text(status, &body).unwrap()
            })
            .collect(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (stop, counts, expected) = (stop.clone(), counts.clone(), expected.clone());
            server.runtime.spawn(async move {
                let mut k = c;
                while !stop.load(Ordering::Relaxed) {
                    let i = k % PROMPTS.len();
                    k += CLIENTS;
                    let call =
                        tokio::spawn(http(addr, "POST", "/v1/completions", &[], Some(request(i))))
                            .await;
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    let outcome = match call {
                        Ok((status, body, _)) => streamed_text(status, &body),
                        Err(e) => Err(format!("client task failed: {e}")),
                    };
                    match outcome {
                        Ok(text) if text == expected[i] => {}
                        Ok(text) => {
                            counts.mismatched.fetch_add(1, Ordering::Relaxed);
                            eprintln!("prompt {i}: {text:?}, alone {:?}", expected[i]);
                        }
                        Err(e) => {
                            counts.failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("prompt {i} failed: {e}");
                        }
                    }
                }
            })
        })
        .collect();

    let coordinator_pid = std::process::id();
    let period = (duration / 8).max(Duration::from_secs(10));
    let sample_every = (duration / 24).clamp(Duration::from_secs(2), Duration::from_secs(30));
    // Long enough for the allocator's arenas, thread stacks and buffers to reach the sizes
    // the load and the failovers need (a few MiB per process here).
    let warm_up = (duration / 4).max(Duration::from_secs(60).min(duration / 2));
    let start = Instant::now();
    let mut next_kill = start + period / 2;
    let mut restart_at: Option<Instant> = None;
    let mut next_sample = start + sample_every;
    let (mut kills, mut restarts) = (0, 0);
    let mut last_tokens = server.metric("moeshard_generated_tokens_total");
    let mut last_at = start;
    let mut record: Vec<Sample> = Vec::new();
    while start.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        if restart_at.is_none() && now >= next_kill && now + DOWN_FOR < start + duration {
            nodes.kill(VICTIM);
            kills += 1;
            restart_at = Some(now + DOWN_FOR);
            next_kill += period;
        }
        if restart_at.is_some_and(|t| now >= t) {
            nodes.restart(VICTIM).unwrap();
            restarts += 1;
            restart_at = None;
        }
        if now >= next_sample {
            let tokens = server.metric("moeshard_generated_tokens_total");
            let pids = nodes.pids();
            let mut rss = vec![("coordinator".to_owned(), rss_anon(coordinator_pid))];
            rss.extend(
                pids.iter()
                    .enumerate()
                    .map(|(i, &pid)| (format!("node{i}"), rss_anon(pid))),
            );
            record.push(Sample {
                at: now.duration_since(start).as_secs_f64(),
                tokens_per_s: (tokens - last_tokens) / now.duration_since(last_at).as_secs_f64(),
                requests: counts.requests.load(Ordering::Relaxed),
                failed: counts.failed.load(Ordering::Relaxed),
                heap: heap_in_use(),
                rss,
            });
            last_tokens = tokens;
            last_at = now;
            next_sample += sample_every;
        }
    }
    if restart_at.is_some() {
        nodes.restart(VICTIM).unwrap();
        restarts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    server.runtime.block_on(async {
        for c in clients {
            c.await.unwrap();
        }
    });

    eprintln!(
        "soak {:?}: {} requests, {} failed, {} differed; node{VICTIM} killed {kills}×, restarted {restarts}×",
        duration,
        counts.requests.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.mismatched.load(Ordering::Relaxed),
    );
    eprintln!(
        "   t(s)  tok/s  requests failed  heap MiB  RssAnon MiB (coordinator node0 node1 node2)"
    );
    for s in &record {
        let rss: Vec<String> = s
            .rss
            .iter()
            .map(|(_, b)| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0)))
            .collect();
        eprintln!(
            "{:7.1} {:6.1} {:9} {:6}  {:8.2}  {}",
            s.at,
            s.tokens_per_s,
            s.requests,
            s.failed,
            s.heap as f64 / 1048576.0,
            rss.join(" ")
        );
    }
    if let Ok(out) = std::env::var("MOESHARD_SOAK_OUT") {
        let json = json!({
            "duration_s": duration.as_secs_f64(),
            "clients": CLIENTS,
            "kills": kills,
            "restarts": restarts,
            "requests": counts.requests.load(Ordering::Relaxed),
            "failed": counts.failed.load(Ordering::Relaxed),
            "mismatched": counts.mismatched.load(Ordering::Relaxed),
            "samples": record.iter().map(|s| json!({
                "t_s": s.at,
                "tokens_per_s": s.tokens_per_s,
                "requests": s.requests,
                "failed": s.failed,
                "coordinator_heap_bytes": s.heap,
                "rss_anon_bytes": s.rss.iter().map(|(p, b)| (p.clone(), json!(b))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }

    assert!(kills >= 1, "the soak was too short to kill a node");
    assert_eq!(counts.failed.load(Ordering::Relaxed), 0, "requests failed");
    assert_eq!(
        counts.mismatched.load(Ordering::Relaxed),
        0,
        "answers changed"
    );
    assert!(counts.requests.load(Ordering::Relaxed) > (2 * CLIENTS) as u64);
    // The victim is back and serving.
    wait_health(&server, 200, PROBE_INTERVAL * 5);
    // Memory: in every long-lived process, RssAnon over the last quarter of the run (the
    // median of its samples: one sample can catch a burst of buffers in flight) stays within
    // 5% of the peak of the warm-up. These processes hold 3-6 MiB of anonymous memory, and
    // one more thread (its stack, its malloc arena) adds 100-200 KiB, 5% of that: runs of
    // a few minutes (CI's) stop before the thread pools and arenas settle (~2.5 min here), so
    // they are held to a bound that still catches a leak of a few hundred bytes per request
    // (thousands of them): 1 MiB. The 5% is checked on runs of 10 minutes and more.
    let long_run = duration >= Duration::from_secs(600);
    let warm = warm_up.as_secs_f64();
    let last_quarter = duration.as_secs_f64() * 0.75;
    for (p, name) in ["coordinator", "node0", "node1"].iter().enumerate() {
        let rss_where = |keep: &dyn Fn(f64) -> bool| -> Vec<u64> {
            record
                .iter()
                .filter(|s| keep(s.at))
                .filter_map(|s| s.rss[p].1)
                .collect()
        };
        let Some(peak) = rss_where(&|t| t <= warm).into_iter().max() else {
            continue;
        };
        let mut late = rss_where(&|t| t > warm && t >= last_quarter);
        if late.is_empty() {
            continue;
        }
        late.sort_unstable();
        let median = late[late.len() / 2];
        eprintln!(
            "{name}: RssAnon warm-up peak {:.2} MiB, last-quarter median {:.2} MiB ({:+.1}%)",
            peak as f64 / 1048576.0,
            median as f64 / 1048576.0,
            (median as f64 / peak as f64 - 1.0) * 100.0
        );
        let bound = if long_run {
            peak as f64 * 1.05
        } else {
            peak as f64 + 1048576.0
        };
        assert!(
            median as f64 <= bound,
            "{name}: RssAnon grew from {peak} (warm-up peak) to {median} bytes (last-quarter median)"
        );
    }
}
