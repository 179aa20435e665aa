//! A slow or lossy link to one node: generation completes with exactly the output of the
//! undisturbed run (same plan, same nodes, no proxy), only slower.

use std::time::Duration;

use tests::{Faults, LinkProxy, Transport};

use crate::common::{
    assert_identical, dispatches, note, run, single_process_tokens, TwoNodes, N_TOKENS,
};

/// Deadline for these runs: generous, they must not fail.
const DEADLINE: Duration = Duration::from_secs(10);

/// +20 ms each way on node1's link (a TCP proxy for gRPC, a UDP proxy for QUIC).
fn latency_on_one_link(transport: Transport) {
    let test = format!("latency {transport}");
    let nodes = TwoNodes::start(transport);
    let direct = nodes.open([None, None], DEADLINE);
    let (want, base_took) = run(&direct.engine).unwrap();
    assert_eq!(
        want.tokens,
        single_process_tokens(),
        "{test}: undisturbed run"
    );

    let latency = Duration::from_millis(20);
    let proxy = LinkProxy::start(transport, nodes.nodes[1].addr, Faults::latency(latency)).unwrap();
    let slow = nodes.open([None, Some(proxy.addr())], DEADLINE);
    let before = dispatches(&slow, 1);
    let (got, took) = run(&slow.engine).unwrap();
    let node1_dispatches = dispatches(&slow, 1) - before;
    assert_identical(&got, &want, &test);

    // Layers run one after the other, so each dispatch to node1 waits out the added round
    // trip: a lower bound that holds however loaded the machine is.
    let floor = 2 * latency * node1_dispatches as u32;
    note(
        &test,
        format_args!(
            "prompt eval + {N_TOKENS} tokens: {base_took:.2?} direct, {took:.2?} with +{latency:?} \
             each way on node1 ({node1_dispatches} dispatches to node1, floor {floor:.2?}); \
             proxy {:?}",
            proxy.stats()
        ),
    );
    assert!(node1_dispatches > 0, "{test}: node1 got no work");
    assert!(
        took >= floor,
        "{test}: took {took:?}, below the floor {floor:?}"
    );
    assert!(
        took > base_took,
        "{test}: {took:?} is not slower than {base_took:?}"
    );
}

#[test]
fn latency_on_one_grpc_link_same_output_slower() {
    latency_on_one_link(Transport::Grpc);
}

#[test]
fn latency_on_one_quic_link_same_output_slower() {
    latency_on_one_link(Transport::Quic);
}

/// 5% of datagrams dropped both ways on node1's QUIC link, from the handshake on: QUIC
/// retransmits, the output is the undisturbed run's.
#[test]
fn udp_loss_on_a_quic_link_same_output() {
    let test = "quic 5% loss";
    let nodes = TwoNodes::start(Transport::Quic);
    let direct = nodes.open([None, None], DEADLINE);
    let (want, base_took) = run(&direct.engine).unwrap();

    let proxy = LinkProxy::start(Transport::Quic, nodes.nodes[1].addr, Faults::loss(0.05)).unwrap();
    let lossy = nodes.open([None, Some(proxy.addr())], DEADLINE);
    let (got, took) = run(&lossy.engine).unwrap();
    assert_identical(&got, &want, test);
    // Twice: a second run on the same connection (after losses) must not differ either.
    let (again, took_again) = run(&lossy.engine).unwrap();
    assert_identical(&again, &want, test);

    let stats = proxy.stats();
    note(
        test,
        format_args!(
            "{base_took:.2?} direct, {took:.2?} and {took_again:.2?} with loss; datagrams to \
             node1 {} delivered / {} dropped, from node1 {} / {}",
            stats.to_upstream.delivered,
            stats.to_upstream.dropped,
            stats.to_client.delivered,
            stats.to_client.dropped
        ),
    );
    assert!(
        stats.to_upstream.dropped > 0 && stats.to_client.dropped > 0,
        "{test}: the proxy dropped nothing in some direction: {stats:?}"
    );
}
