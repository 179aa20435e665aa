//! A node that stops answering: frozen (SIGSTOP), behind a link that stops forwarding, cut
//! by a reset, or killed. Shorter than the dispatch deadline: the generation waits and the
//! output is the undisturbed run's. Longer: the node is marked down and, holding the only
//! replica of its experts here, the step fails with an error naming it within the deadline
//! (plus a scheduling margin), never a hang.
//!
//! After such an error (the coordinator's failover, `coordinator::distributed`): while the
//! node is down, later requests fail at once, naming the node as the only holder of experts
//! they need ("no live replica"); the coordinator probes it every `PROBE_INTERVAL`,
//! reconnects, re-verifies it and uses it again, so the same coordinator gets the
//! undisturbed output once the node or its link is back. With a replica of everything on
//! another node, a killed node changes nothing in the output.

use std::time::{Duration, Instant};

use coordinator::distributed::connect::DistributedEngine;
use coordinator::distributed::PROBE_INTERVAL;
use tests::{Faults, LinkProxy, NodeProcess, Transport};

use crate::common::{
    assert_identical, dispatches, greedy, model, node_spec, note, run, Output, TwoNodes,
    DEADLINE_MARGIN, N_TOKENS,
};

/// The dispatch deadline of the runs that must fail.
const SHORT_DEADLINE: Duration = Duration::from_millis(1500);

/// The error of a step that lost node1, and how long after the fault it came.
fn expect_node1_error(test: &str, result: Result<Vec<u32>, String>, since: Instant) -> String {
    let took = since.elapsed();
    let err = match result {
        Ok(tokens) => panic!("{test}: generation succeeded ({tokens:?}) without node1"),
        Err(e) => e,
    };
    note(test, format_args!("error after {took:.2?}: {err}"));
    assert!(
        err.contains("node node1"),
        "{test}: the error names the node: {err}"
    );
    assert!(
        took <= SHORT_DEADLINE + DEADLINE_MARGIN,
        "{test}: the error came {took:?} after the fault (deadline {SHORT_DEADLINE:?})"
    );
    err
}

/// While node1 is down, a request fails at once (no dispatch, no deadline), naming node1 as
/// the only holder of an expert it needs.
fn expect_down_at_once(test: &str, d: &DistributedEngine) {
    let t0 = Instant::now();
    let err = run(&d.engine)
        .map(|_| ())
        .expect_err("generated without node1");
    let took = t0.elapsed();
    note(
        test,
        format_args!("while node1 is down: failed after {took:.2?}: {err}"),
    );
    assert!(
        err.contains("no live replica") && err.contains("node1"),
        "{test}: {err}"
    );
    assert!(
        took < SHORT_DEADLINE,
        "{test}: {took:?}: a down node must not be waited for"
    );
}

/// Runs until node1 has rejoined (the coordinator's prober); the output must be the
/// undisturbed run's. Returns how long the rejoin took.
fn expect_rejoin(test: &str, d: &DistributedEngine, want: &Output) -> Duration {
    // A probe every PROBE_INTERVAL; its reconnect and its handshake have the deadline each.
    let within = 2 * PROBE_INTERVAL + 2 * SHORT_DEADLINE + DEADLINE_MARGIN;
    let t0 = Instant::now();
    loop {
        match run(&d.engine) {
            Ok((got, _)) => {
                let took = t0.elapsed();
                note(
                    test,
                    format_args!("node1 rejoined the same coordinator after {took:.2?}"),
                );
                assert_identical(&got, want, &format!("{test}, after the rejoin"));
                return took;
            }
            Err(e) if t0.elapsed() < within => {
                assert!(e.contains("node1"), "{test}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{test}: node1 did not rejoin within {within:?}: {e}"),
        }
    }
}

/// SIGSTOP of node1 after the first generated token, SIGCONT 1 s later (deadline 5 s): the
/// generation waits for it and gives the undisturbed output.
fn sigstop_shorter_than_the_deadline(transport: Transport) {
    let test = format!("sigstop 1s {transport}");
    let nodes = TwoNodes::start(transport);
    let d = nodes.open([None, None], Duration::from_secs(5));
    let (want, base_took) = run(&d.engine).unwrap();

    let stall = Duration::from_secs(1);
    let node1 = &nodes.nodes[1];
    let before = dispatches(&d, 1);
    let mut resumer = None;
    let t0 = Instant::now();
    let tokens = greedy(&d.engine, |i| {
        if i == 0 {
            node1.pause();
            resumer = Some(node1.resume_after(stall));
        }
    })
    .unwrap();
    let took = t0.elapsed();
    resumer.unwrap().join().unwrap();
    let node1_dispatches = dispatches(&d, 1) - before;
    assert_eq!(tokens, want.tokens, "{test}: greedy tokens");
    note(
        &test,
        format_args!(
            "{N_TOKENS} tokens in {took:.2?} with node1 frozen for {stall:?} after the first \
             (undisturbed prompt eval + generation: {base_took:.2?}); node1 answered \
             {node1_dispatches} dispatches"
        ),
    );
    // The prefill sends node1 one dispatch per layer (2); any beyond were sent while it was
    // frozen, so the generation must have waited for the SIGCONT.
    if node1_dispatches > 2 {
        assert!(took >= stall, "{test}: {took:?} < the stall {stall:?}");
    }
    // The same coordinator, afterwards: bit-identical logits and tokens.
    let (after, _) = run(&d.engine).unwrap();
    assert_identical(&after, &want, &test);
}

#[test]
fn grpc_node_frozen_shorter_than_the_deadline_same_output() {
    sigstop_shorter_than_the_deadline(Transport::Grpc);
}

#[test]
fn quic_node_frozen_shorter_than_the_deadline_same_output() {
    sigstop_shorter_than_the_deadline(Transport::Quic);
}

/// SIGSTOP of node1 after the first token, held past the deadline: an error naming node1
/// within the deadline; requests fail at once while it is frozen; after SIGCONT it rejoins.
fn sigstop_past_the_deadline(transport: Transport) {
    let test = format!("sigstop past deadline {transport}");
    let nodes = TwoNodes::start(transport);
    let d = nodes.open([None, None], SHORT_DEADLINE);
    let (want, _) = run(&d.engine).unwrap();

    let node1 = &nodes.nodes[1];
    let mut frozen_at = None;
    let result = greedy(&d.engine, |i| {
        if i == 0 {
            node1.pause();
            frozen_at = Some(Instant::now());
        }
    });
    let err = expect_node1_error(&test, result, frozen_at.unwrap());
    assert!(err.contains("no answer within"), "{test}: {err}");
    expect_down_at_once(&test, &d);
    node1.resume();
    expect_rejoin(&test, &d, &want);
}

#[test]
fn grpc_node_frozen_past_the_deadline_is_named_then_rejoins() {
    sigstop_past_the_deadline(Transport::Grpc);
}

#[test]
fn quic_node_frozen_past_the_deadline_is_named_then_rejoins() {
    sigstop_past_the_deadline(Transport::Quic);
}

/// The proxy in front of node1 stops forwarding after the first token, for longer than the
/// deadline: the same error as a frozen node. Then forwarding resumes and node1 rejoins
/// (the prober reconnects through the proxy).
fn proxy_stall_past_the_deadline(transport: Transport) {
    let test = format!("proxy stall {transport}");
    let nodes = TwoNodes::start(transport);
    let proxy = LinkProxy::start(transport, nodes.nodes[1].addr, Faults::default()).unwrap();
    let d = nodes.open([None, Some(proxy.addr())], SHORT_DEADLINE);
    let (want, _) = run(&d.engine).unwrap();

    let mut stalled_at = None;
    let result = greedy(&d.engine, |i| {
        if i == 0 {
            proxy.stall();
            stalled_at = Some(Instant::now());
        }
    });
    let err = expect_node1_error(&test, result, stalled_at.unwrap());
    assert!(err.contains("no answer within"), "{test}: {err}");
    expect_down_at_once(&test, &d);
    proxy.resume();
    expect_rejoin(&test, &d, &want);
}

#[test]
fn grpc_link_stalled_past_the_deadline_is_named_then_rejoins() {
    proxy_stall_past_the_deadline(Transport::Grpc);
}

#[test]
fn quic_link_stalled_past_the_deadline_is_named_then_rejoins() {
    proxy_stall_past_the_deadline(Transport::Quic);
}

/// The proxy resets node1's gRPC connection (RST both ways) after the first token: the
/// step fails at once, well before the deadline, naming node1; node1 is marked down, and
/// the prober's new connection through the same proxy brings it back.
#[test]
fn grpc_link_reset_fails_fast_then_rejoins() {
    let test = "grpc reset";
    let nodes = TwoNodes::start(Transport::Grpc);
    let proxy = LinkProxy::start(Transport::Grpc, nodes.nodes[1].addr, Faults::default()).unwrap();
    let LinkProxy::Tcp(tcp) = &proxy else {
        unreachable!("a gRPC link has a TCP proxy")
    };
    let d = nodes.open([None, Some(proxy.addr())], SHORT_DEADLINE);
    let (want, _) = run(&d.engine).unwrap();

    let mut reset_at = None;
    let result = greedy(&d.engine, |i| {
        if i == 0 {
            tcp.reset_all();
            reset_at = Some(Instant::now());
        }
    });
    let since = reset_at.unwrap();
    let err = expect_node1_error(test, result, since);
    assert!(
        since.elapsed() < SHORT_DEADLINE,
        "{test}: a reset must not wait for the deadline: {err}"
    );
    assert!(tcp.stats().resets >= 1, "{test}: {:?}", tcp.stats());
    expect_rejoin(test, &d, &want);
    assert!(
        tcp.stats().sessions >= 2,
        "{test}: no new connection: {:?}",
        tcp.stats()
    );
}

/// kill -9 of node1 after the first token, with no replica of its experts: an error naming
/// node1 within the deadline, no hang; later requests fail at once; the node started again
/// at the same address (same certificate) rejoins the same coordinator.
fn killed_without_a_replica(transport: Transport) {
    let test = format!("kill -9 {transport}");
    let mut nodes = TwoNodes::start(transport);
    let d = nodes.open([None, None], SHORT_DEADLINE);
    let (want, _) = run(&d.engine).unwrap();

    let mut killed_at = None;
    let node1 = &mut nodes.nodes[1];
    let result = greedy(&d.engine, |i| {
        if i == 0 {
            node1.kill();
            killed_at = Some(Instant::now());
        }
    });
    expect_node1_error(&test, result, killed_at.unwrap());
    expect_down_at_once(&test, &d);

    let mut spec = node_spec("node1", transport, nodes.dir.path(), &nodes.plan);
    spec.listen = nodes.nodes[1].addr;
    nodes.nodes[1] = NodeProcess::spawn(&spec).unwrap_or_else(|e| panic!("{test}: restart: {e}"));
    expect_rejoin(&test, &d, &want);
}

#[test]
fn grpc_node_killed_without_a_replica_is_named_then_rejoins() {
    killed_without_a_replica(Transport::Grpc);
}

#[test]
fn quic_node_killed_without_a_replica_is_named_then_rejoins() {
    killed_without_a_replica(Transport::Quic);
}

/// Every routed expert on both nodes: replicas take turns by layer, so each layer's work
/// goes to one node and no sum regroups whichever node computes it.
fn replicated_plan() -> String {
    let file = shared::gguf::GgufFile::open(model()).unwrap();
    let identity: String = shared::gguf::model_identity(&file)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "version = 1\nmodel_identity = \"{identity}\"\nnodes = [\"node0\", \"node1\"]\n\
         [[place]]\npart = \"routed\"\nlayers = \"0-1\"\nexperts = \"0-7\"\n\
         nodes = [\"node0\", \"node1\"]\n"
    )
}

/// kill -9 of node1 mid-generation while node0 holds a replica of everything: the step is
/// re-sent to node0 and the output is the undisturbed run's, bit for bit; later requests go
/// to node0 alone.
fn killed_with_a_replica(transport: Transport) {
    let test = format!("kill -9 with replica {transport}");
    let mut nodes = TwoNodes::start_with(transport, Some(&replicated_plan()));
    let d = nodes.open([None, None], SHORT_DEADLINE);
    let (want, _) = run(&d.engine).unwrap();
    let node1 = &mut nodes.nodes[1];
    let t0 = Instant::now();
    let tokens = greedy(&d.engine, |i| {
        if i == 2 {
            node1.kill();
        }
    })
    .unwrap_or_else(|e| panic!("{test}: {e}"));
    let took = t0.elapsed();
    assert_eq!(tokens, want.tokens, "{test}: greedy tokens");
    let (after, after_took) = run(&d.engine).unwrap();
    assert_identical(&after, &want, &test);
    note(
        &test,
        format_args!(
            "{N_TOKENS} tokens in {took:.2?} with node1 killed after the third; then prompt \
             eval + generation on node0 alone in {after_took:.2?}"
        ),
    );
    // A killed QUIC node is noticed at the deadline, a gRPC one at once (the kernel resets
    // the connection); either way one deadline at most.
    assert!(took <= SHORT_DEADLINE + DEADLINE_MARGIN, "{test}: {took:?}");
}

#[test]
fn grpc_node_killed_with_a_replica_same_output() {
    killed_with_a_replica(Transport::Grpc);
}

#[test]
fn quic_node_killed_with_a_replica_same_output() {
    killed_with_a_replica(Transport::Quic);
}
