//! [`InprocLink`]: a node in the coordinator's own process. A call hands the message to the
//! service on a blocking thread and returns its answer: no encoding, no sockets. A caller
//! that would only wait for the answer can compute it itself (`call_here`).

use std::sync::Arc;

use tracing::debug;

use super::{
    check_size, coordinator_message_kind, handle_blocking, handle_here, CallFuture, NodeLink,
    NodeService, TransportError,
};
use crate::wire;

/// A link to a [`NodeService`] in this process (single-process mode and tests).
pub struct InprocLink {
    peer: String,
    service: Arc<dyn NodeService>,
}

impl InprocLink {
    /// A link named `inproc://{name}` to `service`.
    pub fn new(name: &str, service: Arc<dyn NodeService>) -> InprocLink {
        InprocLink {
            peer: format!("inproc://{name}"),
            service,
        }
    }
}

impl NodeLink for InprocLink {
    fn call(&self, msg: wire::CoordinatorMessage) -> CallFuture<'_> {
        Box::pin(async move {
            // Nothing is encoded, but the same messages are refused as on the network.
            check_size(&self.peer, &msg)?;
            debug!(peer = %self.peer, kind = coordinator_message_kind(&msg), "call");
            handle_blocking(&self.service, msg)
                .await
                .map_err(|detail| TransportError::Service {
                    peer: self.peer.clone(),
                    detail,
                })
        })
    }

    fn peer(&self) -> &str {
        &self.peer
    }

    fn is_here(&self) -> bool {
        true
    }

    fn call_here(
        &self,
        msg: wire::CoordinatorMessage,
    ) -> Result<wire::NodeMessage, TransportError> {
        check_size(&self.peer, &msg)?;
        debug!(peer = %self.peer, kind = coordinator_message_kind(&msg), "call here");
        handle_here(&self.service, msg).map_err(|detail| TransportError::Service {
            peer: self.peer.clone(),
            detail,
        })
    }
}
