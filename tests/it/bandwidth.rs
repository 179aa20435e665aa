//! A node behind a bandwidth-limited link: node1 runs in a network namespace reached over
//! a veth pair shaped with `tc qdisc ... tbf rate 50mbit burst 32kbit latency 50ms` on both
//! ends; the coordinator (this process) reaches it at its veth address. The output is the
//! undisturbed run's (same plan, both nodes on loopback). Skipped, with a note, where
//! network namespaces cannot be created (not root, no iproute2).

use std::net::SocketAddr;
use std::time::Duration;

use tests::{NetnsLink, NodeProcess, Transport};

use crate::common::{assert_identical, node_spec, note, open_cluster, run, TwoNodes};

const DEADLINE: Duration = Duration::from_secs(10);

fn bandwidth_capped_link(transport: Transport) {
    let test = format!("tbf 50mbit {transport}");
    // Declared before the nodes, so that they are killed before it is removed.
    let link = match NetnsLink::create() {
        Ok(link) => link,
        Err(skip) => {
            note(&test, format_args!("SKIPPED: {skip}"));
            return;
        }
    };
    if std::process::Command::new("tc").arg("-V").output().is_err() {
        note(&test, "SKIPPED: `tc` (iproute2) is not installed");
        return;
    }
    link.shape_tbf("50mbit", "32kbit", "50ms")
        .unwrap_or_else(|e| panic!("{test}: {e}"));

    // The undisturbed run: the same plan, both nodes on loopback.
    let nodes = TwoNodes::start(transport);
    let direct = nodes.open([None, None], DEADLINE);
    let (want, base_took) = run(&direct.engine).unwrap();
    let mut spec = node_spec(
        "node1",
        transport,
        &nodes.dir.path().join("netns"),
        &nodes.plan,
    );
    std::fs::create_dir_all(&spec.dir).unwrap();
    spec.listen = SocketAddr::new(link.ns_addr.into(), 0);
    spec.wrapper = link.exec_prefix();
    let shaped = NodeProcess::spawn(&spec).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(shaped.addr.ip(), link.ns_addr);

    let cluster = nodes
        .dir
        .path()
        .join(format!("cluster-netns-{transport}.toml"));
    std::fs::write(
        &cluster,
        [
            nodes.nodes[0].cluster_entry(None),
            shaped.cluster_entry(None),
        ]
        .join("\n"),
    )
    .unwrap();
    let d = open_cluster(&cluster, &nodes.plan, DEADLINE);
    let (got, took) = run(&d.engine).unwrap();
    assert_identical(&got, &want, &test);

    let (host_sent, ns_sent) = link.qdisc_sent_bytes().unwrap();
    note(
        &test,
        format_args!(
            "node1 in namespace {} at {}: {took:.2?} (loopback {base_took:.2?}); tbf sent \
             {host_sent} B towards node1, {ns_sent} B back",
            link.name(),
            shaped.addr
        ),
    );
    assert!(
        host_sent > 0 && ns_sent > 0,
        "{test}: nothing went through the shaped veth pair"
    );
}

#[test]
fn grpc_node_behind_a_50mbit_veth_same_output() {
    bandwidth_capped_link(Transport::Grpc);
}

#[test]
fn quic_node_behind_a_50mbit_veth_same_output() {
    bandwidth_capped_link(Transport::Quic);
}
