//! Group operations of the orchestrator: seek, delete, stale consumers, and the store's
//! notices (retention moved a topic's floor, a topic was deleted).

use super::OrchestratorActor;
use crate::actors::messages::{DeleteGroup, DisconnectStale, FloorMoved, SeekGroup, TopicRemoved};
use actix::prelude::*;
use sluice_protocol::{ErrorCode, WireError};

fn not_yet(what: &str) -> WireError {
    WireError::new(
        ErrorCode::Unavailable,
        format!("{what} is not implemented yet"),
    )
}

impl Handler<SeekGroup> for OrchestratorActor {
    type Result = Result<sluice_protocol::SeekReply, WireError>;
    fn handle(&mut self, _: SeekGroup, _: &mut Context<Self>) -> Self::Result {
        Err(not_yet("group.seek"))
    }
}

impl Handler<DeleteGroup> for OrchestratorActor {
    type Result = Result<sluice_protocol::GroupDeleted, WireError>;
    fn handle(&mut self, _: DeleteGroup, _: &mut Context<Self>) -> Self::Result {
        Err(not_yet("group.delete"))
    }
}

impl Handler<DisconnectStale> for OrchestratorActor {
    type Result = MessageResult<DisconnectStale>;
    fn handle(&mut self, _: DisconnectStale, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Vec::new())
    }
}

impl Handler<FloorMoved> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, _: FloorMoved, _: &mut Context<Self>) {}
}

impl Handler<TopicRemoved> for OrchestratorActor {
    type Result = ();
    fn handle(&mut self, _: TopicRemoved, _: &mut Context<Self>) {}
}
