//! Round trips of every message, every refusal of a malformed one, framing, and a
//! property test that random bytes never make decoding or checking panic.

use std::path::PathBuf;

use proptest::prelude::*;
use prost::Message;
use shared::moe::Assignment;
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::{Activations, MatmulError};
use shared::quant::GgmlType;

use crate::framing::{self, FrameError};
use crate::limits::{MAX_DISPATCH_TOKENS, MAX_MESSAGE_BYTES, MAX_N_EMBD};
use crate::wire;
use crate::*;

const N_EMBD: usize = 256;

fn slice(layer: u32, part: FfnPart, expert: u32, ff_start: u32, ff_len: u32) -> ExpertSlice {
    ExpertSlice {
        layer,
        part,
        expert,
        ff_start,
        ff_len,
    }
}

/// Experts 3 and 0 (rows 256..512) of layer 1, expert 5 of layer 0, and rows 0..512 of
/// layer 2's dense part.
fn inventory() -> Inventory {
    let slices = vec![
        slice(2, FfnPart::Dense, 0, 0, 512),
        slice(1, FfnPart::Routed, 3, 0, 512),
        slice(1, FfnPart::Routed, 0, 256, 256),
        slice(0, FfnPart::Routed, 5, 0, 512),
    ];
    Inventory::new("node-a".into(), Some(1), 1 << 30, 1 << 34, slices).unwrap()
}

fn ctx(inv: Option<&Inventory>) -> DispatchContext<'_> {
    DispatchContext {
        n_layer: 4,
        n_expert: 8,
        n_embd: N_EMBD,
        max_experts_per_token: Some(2),
        inventory: inv,
    }
}

fn rows(n_tokens: usize) -> Vec<f32> {
    (0..n_tokens * N_EMBD)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
        .collect()
}

/// A valid dispatch for layer 1 of 3 tokens, inputs Q8_K and F16.
fn good_dispatch() -> wire::Dispatch {
    let k = Kernels::get();
    let x = rows(3);
    let req = DispatchRequest {
        step_id: 42,
        layer: 1,
        part: FfnPart::Routed,
        stage: Stage::OneRound,
        inputs: vec![
            Activations::quantize(k, GgmlType::Q4_K, &x, N_EMBD),
            Activations::quantize(k, GgmlType::F16, &x, N_EMBD),
        ],
        assignments: vec![
            Assignment {
                token: 0,
                expert: 3,
                weight: 0.75,
            },
            Assignment {
                token: 0,
                expert: 0,
                weight: 0.25,
            },
            Assignment {
                token: 2,
                expert: 0,
                weight: 1.0,
            },
        ],
        segments: vec![2, 1],
    };
    req.into()
}

#[test]
fn dispatch_round_trips_through_bytes() {
    let inv = inventory();
    let wire_msg = good_dispatch();
    let bytes = wire_msg.encode_to_vec();
    let decoded = wire::Dispatch::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded, wire_msg);
    let req = DispatchRequest::from_wire(decoded, &ctx(Some(&inv))).unwrap();
    assert_eq!(req.n_tokens(), 3);
    assert_eq!(req.inputs[0].ty(), GgmlType::Q8_K);
    assert_eq!(req.inputs[1].ty(), GgmlType::F16);
    assert_eq!(req.assignments[1].expert, 0);
    let back: wire::Dispatch = req.into();
    assert_eq!(back, wire_msg);
    // The activations travel as raw bytes: a Q8_K row of 256 values is one 292-byte block.
    assert_eq!(back.inputs[0].data.len(), 3 * 292);
}

/// Applies `edit` to a good dispatch and expects `from_wire` to refuse it with `want`.
fn check_dispatch(edit: impl FnOnce(&mut wire::Dispatch), want: ProtoError) {
    let inv = inventory();
    let mut m = good_dispatch();
    edit(&mut m);
    assert_eq!(DispatchRequest::from_wire(m, &ctx(Some(&inv))), Err(want));
}

#[test]
fn dispatch_shape_errors() {
    check_dispatch(
        |m| m.n_tokens = 0,
        ProtoError::Zero {
            field: "dispatch.n_tokens",
            got: 0,
        },
    );
    check_dispatch(
        |m| m.n_tokens = MAX_DISPATCH_TOKENS as u32 + 1,
        ProtoError::OverLimit {
            field: "dispatch.n_tokens",
            got: MAX_DISPATCH_TOKENS + 1,
            max: MAX_DISPATCH_TOKENS,
        },
    );
    check_dispatch(
        |m| m.n_embd = MAX_N_EMBD as u32 * 2,
        ProtoError::OverLimit {
            field: "dispatch.n_embd",
            got: MAX_N_EMBD * 2,
            max: MAX_N_EMBD,
        },
    );
    check_dispatch(
        |m| {
            m.n_tokens = MAX_DISPATCH_TOKENS as u32;
            m.n_embd = MAX_N_EMBD as u32;
        },
        ProtoError::OverLimit {
            field: "dispatch.n_tokens * n_embd",
            got: MAX_DISPATCH_TOKENS * MAX_N_EMBD,
            max: limits::MAX_DISPATCH_VALUES,
        },
    );
    check_dispatch(
        |m| m.n_embd = 512,
        ProtoError::NEmbdMismatch {
            got: 512,
            want: N_EMBD,
        },
    );
    check_dispatch(
        |m| m.layer = 4,
        ProtoError::LayerOutOfRange {
            layer: 4,
            n_layer: 4,
        },
    );
}

#[test]
fn dispatch_input_errors() {
    check_dispatch(
        |m| m.inputs.clear(),
        ProtoError::Zero {
            field: "dispatch.inputs",
            got: 0,
        },
    );
    check_dispatch(
        |m| {
            let extra = m.inputs[0].clone();
            m.inputs.push(extra);
        },
        ProtoError::OverLimit {
            field: "dispatch.inputs",
            got: 3,
            max: 2,
        },
    );
    check_dispatch(
        |m| m.inputs[1].ggml_type = 99,
        ProtoError::UnknownType { index: 1, id: 99 },
    );
    check_dispatch(
        |m| m.inputs[1] = m.inputs[0].clone(),
        ProtoError::DuplicateInput {
            index: 1,
            ty: "Q8_K".into(),
        },
    );
    check_dispatch(
        |m| m.inputs[1].ggml_type = GgmlType::Q4_K.id(),
        ProtoError::BadActivations {
            index: 1,
            ty: "Q4_K".into(),
            source: MatmulError::NotActivationType(GgmlType::Q4_K),
        },
    );
    // One token's row too few for n_tokens = 3.
    check_dispatch(
        |m| m.inputs[0].data.truncate(2 * 292),
        ProtoError::BadActivations {
            index: 0,
            ty: "Q8_K".into(),
            source: MatmulError::Length {
                what: "activation rows",
                got: 2 * 292,
                want: 3 * 292,
            },
        },
    );
    // An f16 NaN (0x7e00) in token 1's row.
    check_dispatch(
        |m| m.inputs[1].data[2 * N_EMBD + 6..2 * N_EMBD + 8].copy_from_slice(&[0x00, 0x7e]),
        ProtoError::BadActivations {
            index: 1,
            ty: "F16".into(),
            source: MatmulError::NonFinite { token: 1, index: 3 },
        },
    );
    // A Q8_K block sum that does not match its quants.
    check_dispatch(
        |m| {
            let bsums = 4 + 256;
            m.inputs[0].data[bsums] ^= 1;
        },
        {
            let mut m = good_dispatch();
            m.inputs[0].data[260] ^= 1;
            let err = Activations::from_bytes(GgmlType::Q8_K, N_EMBD, 3, m.inputs[0].data.clone())
                .unwrap_err();
            assert!(
                matches!(err, MatmulError::BadBlockSum { token: 0, .. }),
                "{err}"
            );
            ProtoError::BadActivations {
                index: 0,
                ty: "Q8_K".into(),
                source: err,
            }
        },
    );
}

#[test]
fn dispatch_assignment_errors() {
    let set = |i: usize, token: u32, expert: u32, weight: f32| {
        move |m: &mut wire::Dispatch| {
            m.assignments[i] = wire::TokenAssignment {
                token,
                expert,
                weight,
            }
        }
    };
    check_dispatch(
        set(2, 3, 0, 1.0),
        ProtoError::TokenOutOfRange {
            index: 2,
            token: 3,
            n_tokens: 3,
        },
    );
    check_dispatch(
        set(2, 2, 8, 1.0),
        ProtoError::ExpertOutOfRange {
            index: 2,
            expert: 8,
            n_expert: 8,
        },
    );
    for w in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut m = good_dispatch();
        set(1, 0, 0, w)(&mut m);
        let err = DispatchRequest::from_wire(m, &ctx(None)).unwrap_err();
        assert!(
            matches!(err, ProtoError::NonFiniteWeight { index: 1, token: 0, expert: 0, weight } if weight.to_bits() == w.to_bits()),
            "{err}"
        );
    }
    check_dispatch(
        set(1, 0, 3, 0.5),
        ProtoError::DuplicateAssignment {
            index: 1,
            token: 0,
            expert: 3,
        },
    );
    check_dispatch(
        set(2, 0, 5, 0.5),
        ProtoError::TooManyExperts {
            index: 2,
            token: 0,
            k: 2,
        },
    );
    // Expert 5 exists in the model but this node holds it only for layer 0.
    check_dispatch(
        set(2, 2, 5, 0.5),
        ProtoError::NotServed {
            index: 2,
            layer: 1,
            expert: 5,
        },
    );
    // Without an inventory (the coordinator's own check), the same assignment passes.
    let mut m = good_dispatch();
    set(2, 2, 5, 0.5)(&mut m);
    assert!(DispatchRequest::from_wire(m, &ctx(None)).is_ok());
}

#[test]
fn routed_dispatch_needs_assignments_and_a_known_part() {
    check_dispatch(
        |m| m.assignments.clear(),
        ProtoError::Zero {
            field: "dispatch.assignments",
            got: 0,
        },
    );
    check_dispatch(
        |m| m.part = 2,
        ProtoError::UnknownEnum {
            field: "dispatch.part",
            value: 2,
        },
    );
}

/// `good_dispatch` turned into a dispatch of `layer`'s dense part.
fn dense_dispatch(layer: u32) -> wire::Dispatch {
    let mut m = good_dispatch();
    m.layer = layer;
    m.part = wire::FfnPart::Dense as i32;
    m.stage = wire::Stage::Hidden as i32;
    m.assignments.clear();
    m
}

#[test]
fn dense_dispatch_round_trips_and_errors() {
    let inv = inventory();
    let m = dense_dispatch(2);
    let req = DispatchRequest::from_wire(m.clone(), &ctx(Some(&inv))).unwrap();
    assert_eq!(req.part, FfnPart::Dense);
    assert_eq!((req.layer, req.n_tokens()), (2, 3));
    assert!(req.assignments.is_empty());
    let back: wire::Dispatch = req.into();
    assert_eq!(back, m);
    assert_eq!(
        wire::Dispatch::decode(m.encode_to_vec().as_slice()).unwrap(),
        m
    );

    // Assignments are refused: the node computes every token.
    let mut with_assignments = dense_dispatch(2);
    with_assignments.assignments = good_dispatch().assignments;
    assert_eq!(
        DispatchRequest::from_wire(with_assignments, &ctx(None)),
        Err(ProtoError::DenseAssignments { layer: 2, got: 3 })
    );
    // Layer 1's dense part is not served by this node (it serves routed experts of
    // layer 1); without an inventory the same dispatch passes.
    let err = DispatchRequest::from_wire(dense_dispatch(1), &ctx(Some(&inv))).unwrap_err();
    assert_eq!(err, ProtoError::DenseNotServed { layer: 1 });
    assert_eq!(err.code(), wire::ErrorCode::NotServed);
    assert!(DispatchRequest::from_wire(dense_dispatch(1), &ctx(None)).is_ok());
    // The shape checks apply as for routed dispatches.
    assert_eq!(
        DispatchRequest::from_wire(dense_dispatch(4), &ctx(None)),
        Err(ProtoError::LayerOutOfRange {
            layer: 4,
            n_layer: 4
        })
    );
    // A routed dispatch of layer 2 is refused: the node serves only its dense part.
    let mut routed = good_dispatch();
    routed.layer = 2;
    assert_eq!(
        DispatchRequest::from_wire(routed, &ctx(Some(&inv))),
        Err(ProtoError::NotServed {
            index: 0,
            layer: 2,
            expert: 3
        })
    );
}

#[test]
fn hello_round_trip_and_errors() {
    let hello = Hello {
        model_identity: [7; 32],
        coordinator_name: "coord".into(),
    };
    let w: wire::Hello = hello.clone().into();
    let decoded = wire::Hello::decode(w.encode_to_vec().as_slice()).unwrap();
    assert_eq!(Hello::try_from(decoded).unwrap(), hello);
    assert_eq!(hello.check_model(&[7; 32]), Ok(()));
    let err = hello.check_model(&[8; 32]).unwrap_err();
    assert_eq!(err.code(), wire::ErrorCode::ModelMismatch);
    assert_eq!(
        err.to_string(),
        format!(
            "model identity {}, this side serves {}",
            "07".repeat(32),
            "08".repeat(32)
        )
    );

    let mut bad = w.clone();
    bad.protocol_version = PROTOCOL_VERSION + 1;
    assert_eq!(
        Hello::try_from(bad),
        Err(ProtoError::VersionMismatch {
            got: PROTOCOL_VERSION + 1,
            want: PROTOCOL_VERSION
        })
    );
    let mut bad = w.clone();
    bad.model_identity.pop();
    assert_eq!(
        Hello::try_from(bad),
        Err(ProtoError::BadLength {
            field: "hello.model_identity",
            got: 31,
            want: 32
        })
    );
    let mut bad = w;
    bad.coordinator_name = "x".repeat(300);
    assert!(matches!(
        Hello::try_from(bad),
        Err(ProtoError::OverLimit { got: 300, .. })
    ));
}

#[test]
fn hello_reply_and_inventory_round_trip() {
    let reply = HelloReply {
        model_identity: [1; 32],
        inventory: inventory(),
        error: Some(RemoteError {
            code: wire::ErrorCode::VersionMismatch,
            message: "protocol version 2, this side speaks 1".into(),
        }),
    };
    let w: wire::HelloReply = reply.clone().into();
    let decoded = wire::HelloReply::decode(w.encode_to_vec().as_slice()).unwrap();
    assert_eq!(HelloReply::try_from(decoded).unwrap(), reply);
    // Sorted, and looked up by (layer, expert).
    let inv = inventory();
    assert_eq!(inv.slices()[0].layer, 0);
    let routed = |layer, expert| inv.serves(FfnPart::Routed, layer, expert);
    assert!(routed(1, 3) && routed(1, 0) && routed(0, 5));
    assert!(!routed(0, 3) && !routed(1, 5) && !routed(2, 0));
    assert!(inv.serves(FfnPart::Dense, 2, 0));
    assert!(!inv.serves(FfnPart::Dense, 1, 0) && !inv.serves(FfnPart::Dense, 2, 1));
    // Sorted by layer, then part: layer 2's dense slice last.
    assert_eq!(
        inv.slices().iter().map(|s| s.layer).collect::<Vec<_>>(),
        [0, 1, 1, 2]
    );
    assert_eq!(inv.slices()[3].part, FfnPart::Dense);

    let mut no_inv = w;
    no_inv.inventory = None;
    assert_eq!(
        HelloReply::try_from(no_inv),
        Err(ProtoError::Missing {
            field: "hello_reply.inventory"
        })
    );
}

/// `(layer, part, expert, ff_start, ff_len)` per slice, `part` as on the wire.
fn check_inventory(slices: &[(u32, i32, u32, u32, u32)], want: Result<(), ProtoError>) {
    let w = wire::NodeInventory {
        node_name: "n".into(),
        numa_node: None,
        weight_bytes: 0,
        memory_bytes: 0,
        slices: slices
            .iter()
            .map(
                |&(layer, part, expert, ff_start, ff_len)| wire::ExpertSlice {
                    layer,
                    expert,
                    ff_start,
                    ff_len,
                    part,
                },
            )
            .collect(),
    };
    assert_eq!(Inventory::try_from(w).map(|_| ()), want);
}

#[test]
fn inventory_errors() {
    const R: i32 = wire::FfnPart::Routed as i32;
    const D: i32 = wire::FfnPart::Dense as i32;
    check_inventory(
        &[(0, R, 0, 0, 256), (0, R, 0, 256, 256), (0, R, 1, 0, 256)],
        Ok(()),
    );
    // A dense slice and expert 0's slice of the same rows do not overlap.
    check_inventory(&[(0, R, 0, 0, 256), (0, D, 0, 0, 256)], Ok(()));
    check_inventory(
        &[(0, D, 0, 0, 256), (0, D, 0, 128, 256)],
        Err(ProtoError::BadSlice {
            index: 1,
            layer: 0,
            expert: 0,
            detail: "rows 128..384 overlap rows 0..256".into(),
        }),
    );
    check_inventory(
        &[(3, D, 1, 0, 256)],
        Err(ProtoError::BadSlice {
            index: 0,
            layer: 3,
            expert: 1,
            detail: "a dense slice must have expert 0".into(),
        }),
    );
    check_inventory(
        &[(0, R, 0, 0, 256), (0, 2, 0, 0, 256)],
        Err(ProtoError::UnknownEnum {
            field: "inventory.slices.part",
            value: 2,
        }),
    );
    check_inventory(
        &[(0, R, 0, 0, 0)],
        Err(ProtoError::BadSlice {
            index: 0,
            layer: 0,
            expert: 0,
            detail: "ff_len is 0".into(),
        }),
    );
    check_inventory(
        &[(0, R, 0, 0, 256), (0, R, 0, 128, 256)],
        Err(ProtoError::BadSlice {
            index: 1,
            layer: 0,
            expert: 0,
            detail: "rows 128..384 overlap rows 0..256".into(),
        }),
    );
    check_inventory(
        &[(0, R, 0, u32::MAX, 2)],
        Err(ProtoError::BadSlice {
            index: 0,
            layer: 0,
            expert: 0,
            detail: format!("ff_start {} + ff_len 2 overflows", u32::MAX),
        }),
    );
    assert!(matches!(
        Inventory::try_from(wire::NodeInventory {
            node_name: "n".into(),
            slices: vec![wire::ExpertSlice {
                layer: 5000,
                ff_len: 1,
                ..Default::default()
            }],
            ..Default::default()
        }),
        Err(ProtoError::BadSlice { layer: 5000, .. })
    ));
    assert_eq!(
        Inventory::try_from(wire::NodeInventory::default()),
        Err(ProtoError::Zero {
            field: "inventory.node_name bytes",
            got: 0
        })
    );
}

#[test]
fn dispatch_result_round_trip_and_errors() {
    let values: Vec<f32> = (0..2 * N_EMBD).map(|i| i as f32 * 0.5 - 3.0).collect();
    let ok = DispatchResponse {
        step_id: 9,
        layer: 3,
        outcome: Ok(Partials::new(2, N_EMBD, values.clone()).unwrap()),
    };
    let w: wire::DispatchResult = ok.clone().into();
    let decoded = wire::DispatchResult::decode(w.encode_to_vec().as_slice()).unwrap();
    let back = DispatchResponse::try_from(decoded).unwrap();
    assert_eq!(back, ok);
    assert_eq!(back.check_answers(9, 3, 2, N_EMBD), Ok(()));
    assert_eq!(
        back.check_answers(10, 3, 2, N_EMBD),
        Err(ProtoError::WrongStep {
            got_step: 9,
            got_layer: 3,
            want_step: 10,
            want_layer: 3
        })
    );
    assert_eq!(
        back.check_answers(9, 3, 3, N_EMBD),
        Err(ProtoError::Mismatch {
            field: "partials.n_tokens",
            got: 2,
            want: 3
        })
    );
    // Raw little-endian f32, token-major.
    let wire::dispatch_result::Outcome::Partials(p) = w.outcome.clone().unwrap() else {
        panic!("partials expected");
    };
    assert_eq!(p.data[4..8], values[1].to_le_bytes());

    let err = DispatchResponse {
        step_id: 9,
        layer: 3,
        outcome: Err(RemoteError {
            code: wire::ErrorCode::Unavailable,
            message: "draining".into(),
        }),
    };
    let back = DispatchResponse::try_from(wire::DispatchResult::from(err.clone())).unwrap();
    assert_eq!(back, err);
    assert!(back.outcome.unwrap_err().is_transient());

    let mut bad = w.clone();
    if let Some(wire::dispatch_result::Outcome::Partials(p)) = &mut bad.outcome {
        p.data.pop();
    }
    assert_eq!(
        DispatchResponse::try_from(bad),
        Err(ProtoError::BadLength {
            field: "partials.data",
            got: 2 * N_EMBD * 4 - 1,
            want: 2 * N_EMBD * 4
        })
    );
    let mut bad = w.clone();
    if let Some(wire::dispatch_result::Outcome::Partials(p)) = &mut bad.outcome {
        p.data[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    assert_eq!(
        DispatchResponse::try_from(bad),
        Err(ProtoError::NonFinite {
            field: "partials.data",
            index: 2
        })
    );
    let mut bad = w;
    bad.outcome = None;
    assert_eq!(
        DispatchResponse::try_from(bad),
        Err(ProtoError::Missing {
            field: "dispatch_result.outcome"
        })
    );
    let bad = wire::DispatchResult {
        outcome: Some(wire::dispatch_result::Outcome::Error(wire::Error {
            code: 77,
            message: String::new(),
        })),
        ..Default::default()
    };
    assert_eq!(
        DispatchResponse::try_from(bad),
        Err(ProtoError::UnknownEnum {
            field: "error.code",
            value: 77
        })
    );
}

#[test]
fn error_messages_are_capped_on_the_way_out() {
    let long = RemoteError {
        code: wire::ErrorCode::Internal,
        message: "é".repeat(5000),
    };
    let w = wire::Error::from(long);
    assert!(w.message.len() <= limits::MAX_ERROR_MESSAGE_BYTES);
    assert!(RemoteError::try_from(w).is_ok());
    let e = ProtoError::NotServed {
        index: 0,
        layer: 1,
        expert: 2,
    };
    assert_eq!(
        RemoteError::from_proto_error(&e).code,
        wire::ErrorCode::NotServed
    );
}

#[test]
fn health_and_stats_round_trip_in_envelopes() {
    let msgs = [
        wire::NodeMessage {
            body: Some(wire::node_message::Body::Health(wire::Health {
                state: wire::NodeState::Serving as i32,
                uptime_ms: 1234,
            })),
        },
        wire::NodeMessage {
            body: Some(wire::node_message::Body::Stats(wire::Stats {
                dispatches: 1,
                tokens: 2,
                assignments: 3,
                errors: 4,
                bytes_in: 5,
                bytes_out: 6,
                compute_ns: 7,
                mapped_bytes: 8,
                weight_bytes_read: 9,
                dram_cache_budget_bytes: 10,
                dram_cache_bytes: 11,
                dram_cache_experts: 12,
                dram_hit_bytes: 13,
                dram_miss_bytes: 14,
                dram_promoted_bytes: 15,
                dram_evicted_bytes: 16,
            })),
        },
        wire::NodeMessage {
            body: Some(wire::node_message::Body::DispatchResult(
                DispatchResponse {
                    step_id: 1,
                    layer: 0,
                    outcome: Ok(Partials::new(1, 4, vec![1.0, 2.0, 3.0, 4.0]).unwrap()),
                }
                .into(),
            )),
        },
    ];
    let mut stream = Vec::new();
    for m in &msgs {
        framing::encode_frame(m, MAX_MESSAGE_BYTES, &mut stream).unwrap();
    }
    let mut reader = stream.as_slice();
    for m in &msgs {
        let got: wire::NodeMessage = framing::read_frame(&mut reader, MAX_MESSAGE_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(&got, m);
    }
    assert!(
        framing::read_frame::<wire::NodeMessage, _>(&mut reader, MAX_MESSAGE_BYTES)
            .unwrap()
            .is_none()
    );

    let coord = wire::CoordinatorMessage {
        body: Some(wire::coordinator_message::Body::Dispatch(good_dispatch())),
    };
    let mut buf = Vec::new();
    framing::write_frame(&mut buf, &coord, MAX_MESSAGE_BYTES).unwrap();
    let (got, used) = framing::decode_frame::<wire::CoordinatorMessage>(&buf, MAX_MESSAGE_BYTES)
        .unwrap()
        .unwrap();
    assert_eq!((got, used), (coord, buf.len()));
}

#[test]
fn framing_refuses_oversized_and_truncated() {
    let m = wire::Hello {
        protocol_version: 1,
        model_identity: vec![0; 32],
        coordinator_name: "c".into(),
    };
    let mut buf = Vec::new();
    framing::encode_frame(&m, 1000, &mut buf).unwrap();
    let len = buf.len() - framing::HEADER_BYTES;

    // Writing over the limit.
    assert!(matches!(
        framing::encode_frame(&m, len - 1, &mut Vec::new()),
        Err(FrameError::Oversized { len: l, max }) if l == len && max == len - 1
    ));
    // Reading: the header alone decides, before any body byte is read or allocated.
    let huge = u32::MAX.to_le_bytes();
    assert!(matches!(
        framing::read_frame::<wire::Hello, _>(&mut &huge[..], MAX_MESSAGE_BYTES),
        Err(FrameError::Oversized { len, max }) if len == u32::MAX as usize && max == MAX_MESSAGE_BYTES
    ));
    assert!(matches!(
        framing::decode_frame::<wire::Hello>(&buf, len - 1),
        Err(FrameError::Oversized { .. })
    ));

    // Truncated header, truncated body.
    assert!(matches!(
        framing::read_frame::<wire::Hello, _>(&mut &buf[..2], 1000),
        Err(FrameError::Truncated {
            part: "header",
            got: 2,
            want: 4
        })
    ));
    assert!(matches!(
        framing::read_frame::<wire::Hello, _>(&mut &buf[..buf.len() - 1], 1000),
        Err(FrameError::Truncated { part: "body", got, want }) if got == len - 1 && want == len
    ));
    for cut in 0..buf.len() {
        assert!(framing::decode_frame::<wire::Hello>(&buf[..cut], 1000)
            .unwrap()
            .is_none());
    }
    // A body that is not a message.
    let garbage = [3, 0, 0, 0, 0xff, 0xff, 0xff];
    assert!(matches!(
        framing::read_frame::<wire::Hello, _>(&mut &garbage[..], 1000),
        Err(FrameError::Decode(_))
    ));
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

#[test]
fn model_identity_tells_models_apart() {
    use shared::gguf::{model_identity, GgufFile};
    let a = GgufFile::open(fixture("qwen3moe/model-q8_0.gguf")).unwrap();
    let a2 = GgufFile::open(fixture("qwen3moe/model-q8_0.gguf")).unwrap();
    let b = GgufFile::open(fixture("qwen3moe/model-q2_k.gguf")).unwrap();
    let c = GgufFile::open(fixture("mixtral/model-q8_0.gguf")).unwrap();
    let id = model_identity(&a);
    assert_eq!(id, model_identity(&a2));
    assert_ne!(
        id,
        model_identity(&b),
        "another quantization is another model"
    );
    assert_ne!(id, model_identity(&c));
    assert_ne!(id, [0; 32]);
}

/// Writes `tensors` of `src` (with their data) and `metadata` to `path`.
fn write_gguf(
    path: &std::path::Path,
    src: &shared::gguf::GgufFile,
    metadata: Vec<(String, shared::gguf::MetaValue)>,
    tensors: &[shared::gguf::TensorInfo],
) {
    use shared::gguf::{GgufWriter, TensorDesc};
    let descs = tensors
        .iter()
        .map(|t| TensorDesc::new(t.name.clone(), t.ty, t.ne.clone()))
        .collect();
    let mut w = GgufWriter::create(path, metadata, descs).unwrap();
    for t in tensors {
        w.write_tensor_data(src.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn model_identity_ignores_how_the_model_is_stored() {
    use shared::gguf::{model_identity, GgufFile, MetaValue};
    let src = GgufFile::open(fixture("qwen3moe/model-q8_0.gguf")).unwrap();
    let id = model_identity(&src);
    let dir = tempfile::tempdir().unwrap();
    let tensors = src.tensors();
    let half = tensors.len() / 2;
    let split_keys = |no: u16| {
        vec![
            ("split.no".to_string(), MetaValue::U16(no)),
            ("split.count".to_string(), MetaValue::U16(2)),
            (
                "split.tensors.count".to_string(),
                MetaValue::I32(tensors.len() as i32),
            ),
        ]
    };
    // As gguf-split lays it out: the metadata in the first part, tensors in both.
    let mut meta0 = src.metadata().to_vec();
    meta0.extend(split_keys(0));
    let first = dir.path().join("m-00001-of-00002.gguf");
    write_gguf(&first, &src, meta0, &tensors[..half]);
    write_gguf(
        &dir.path().join("m-00002-of-00002.gguf"),
        &src,
        split_keys(1),
        &tensors[half..],
    );
    let split = GgufFile::open(&first).unwrap();
    assert_eq!(split.n_parts(), 2);
    assert_eq!(model_identity(&split), id);

    // One metadata value changed is another model.
    let mut meta = src.metadata().to_vec();
    let (_, v) = meta.iter_mut().find(|(k, _)| k == "general.name").unwrap();
    assert_ne!(v.as_str(), Some("renamed"));
    *v = MetaValue::String("renamed".into());
    let other = dir.path().join("renamed.gguf");
    write_gguf(&other, &src, meta, tensors);
    assert_ne!(model_identity(&GgufFile::open(&other).unwrap()), id);

    // One tensor fewer (a shard holding part of the experts) is too: shards carry the
    // identity of their model in their metadata instead (the `split` command's job).
    let fewer = dir.path().join("fewer.gguf");
    write_gguf(&fewer, &src, src.metadata().to_vec(), &tensors[1..]);
    assert_ne!(model_identity(&GgufFile::open(&fewer).unwrap()), id);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        crate::fuzz::check_coordinator_message(&data);
        if let Ok(m) = wire::NodeMessage::decode(data.as_slice()) {
            match m.body {
                Some(wire::node_message::Body::DispatchResult(r)) => {
                    let _ = DispatchResponse::try_from(r);
                }
                Some(wire::node_message::Body::Hello(h)) => {
                    let _ = HelloReply::try_from(h);
                }
                _ => {}
            }
        }
        let _ = framing::decode_frame::<wire::CoordinatorMessage>(&data, MAX_MESSAGE_BYTES);
    }

    /// Mutations of a valid dispatch (not just random bytes, which rarely decode into
    /// one) are refused or accepted, never a panic.
    #[test]
    fn mutated_dispatches_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
    ) {
        let mut bytes = wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Dispatch(good_dispatch())),
        }
        .encode_to_vec();
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        crate::fuzz::check_coordinator_message(&bytes);
    }
}

#[test]
fn dispatch_segments_must_cover_the_rows() {
    let inv = inventory();
    let ok = DispatchRequest::from_wire(good_dispatch(), &ctx(Some(&inv))).unwrap();
    assert_eq!(ok.segments, vec![2, 1]);
    for (segments, what) in [
        (vec![2, 2], "segments sum"),
        (vec![3, 0], "segments length"),
        (vec![1], "segments sum"),
    ] {
        let mut m = good_dispatch();
        m.segments = segments.clone();
        let err = DispatchRequest::from_wire(m, &ctx(Some(&inv))).unwrap_err();
        assert!(err.to_string().contains(what), "{segments:?}: {err}");
    }
    let mut m = good_dispatch();
    m.segments.clear();
    assert!(DispatchRequest::from_wire(m, &ctx(Some(&inv)))
        .unwrap()
        .segments
        .is_empty());
}

#[test]
fn replies_are_checked_as_the_coordinator_uses_them() {
    let values: Vec<f32> = (0..2 * N_EMBD).map(|i| i as f32 * 0.25).collect();
    let reply = |outcome| wire::NodeMessage {
        body: Some(wire::node_message::Body::DispatchResult(
            DispatchResponse {
                step_id: 5,
                layer: 1,
                outcome,
            }
            .into(),
        )),
    };
    let ok = reply(Ok(Partials::new(2, N_EMBD, values.clone()).unwrap()));
    let p = crate::partials_from_reply(ok.clone(), 5, 1, 2, N_EMBD).unwrap();
    assert_eq!(p.data(), values.as_slice());
    for (step, rows, what) in [(6, 2, "step"), (5, 3, "n_tokens")] {
        let err = crate::partials_from_reply(ok.clone(), step, 1, rows, N_EMBD).unwrap_err();
        assert!(err.contains(what), "{what}: {err}");
    }
    let refused = reply(Err(RemoteError {
        code: wire::ErrorCode::NotServed,
        message: "expert 9 is not held here".into(),
    }));
    let err = crate::partials_from_reply(refused, 5, 1, 2, N_EMBD).unwrap_err();
    assert!(
        err.contains("NotServed") && err.contains("expert 9"),
        "{err}"
    );
    let stats = wire::NodeMessage {
        body: Some(wire::node_message::Body::Stats(wire::Stats::default())),
    };
    let err = crate::partials_from_reply(stats, 5, 1, 2, N_EMBD).unwrap_err();
    assert!(err.contains("stats"), "{err}");
    let empty = wire::NodeMessage { body: None };
    assert!(crate::partials_from_reply(empty, 5, 1, 2, N_EMBD).is_err());
    // The fuzz body on a few inputs, including the good reply's bytes.
    for data in [ok.encode_to_vec(), vec![], vec![0xff; 64]] {
        crate::fuzz::check_node_reply(&data);
    }
}
