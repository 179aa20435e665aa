//! The bodies of the cargo-fuzz targets in `proto/fuzz`: a node's handling of untrusted
//! bytes (`node_message`) and the coordinator's handling of a node's replies
//! (`coordinator_reply`).

use prost::Message;

use crate::convert::{
    partials_from_reply, DispatchContext, DispatchRequest, ExpertSlice, FfnPart, Hello, HelloReply,
    Inventory,
};
use crate::wire;

/// Decodes `data` as a coordinator message and checks it as a node serving experts 0..4
/// of layers 0..2 and the dense part of layer 1 of a 256-wide, 8-expert, top-2 model
/// would. Must never panic.
pub fn check_coordinator_message(data: &[u8]) {
    let Ok(msg) = wire::CoordinatorMessage::decode(data) else {
        return;
    };
    let slices = (0..2)
        .flat_map(|layer| {
            (0..4).map(move |expert| ExpertSlice {
                layer,
                part: FfnPart::Routed,
                expert,
                ff_start: 0,
                ff_len: 64,
            })
        })
        .chain([ExpertSlice {
            layer: 1,
            part: FfnPart::Dense,
            expert: 0,
            ff_start: 0,
            ff_len: 64,
        }])
        .collect();
    let Ok(inventory) = Inventory::new("fuzz".into(), None, 0, 0, slices) else {
        unreachable!("the fuzz inventory is valid");
    };
    let ctx = DispatchContext {
        n_layer: 2,
        n_expert: 8,
        n_embd: 256,
        max_experts_per_token: Some(2),
        inventory: Some(&inventory),
    };
    match msg.body {
        Some(wire::coordinator_message::Body::Hello(h)) => {
            let _ = Hello::try_from(h);
        }
        Some(wire::coordinator_message::Body::Dispatch(d)) => {
            if let Ok(req) = DispatchRequest::from_wire(d, &ctx) {
                // What passed must survive the way back unchanged.
                let again = DispatchRequest::from_wire(req.clone().into(), &ctx);
                assert_eq!(
                    again.as_ref(),
                    Ok(&req),
                    "a checked dispatch did not round-trip"
                );
            }
        }
        _ => {}
    }
}

/// Decodes `data` as a node's reply and checks it as the coordinator does: a handshake
/// answer, or the answer to dispatch (step 7, layer 1) of 3 rows of 256. Must never panic,
/// and accepted partial sums have exactly the asked shape and finite values.
pub fn check_node_reply(data: &[u8]) {
    let Ok(msg) = wire::NodeMessage::decode(data) else {
        return;
    };
    if let Some(wire::node_message::Body::Hello(h)) = msg.body {
        let _ = HelloReply::try_from(h);
        return;
    }
    if let Ok(p) = partials_from_reply(msg, 7, 1, 3, 256) {
        assert_eq!((p.n_tokens(), p.n_embd(), p.data().len()), (3, 256, 768));
        assert!(p.data().iter().all(|v| v.is_finite()));
    }
}
