//! The store's side of topics as an operator manages them: `topic.*` routes, the lookup of a
//! seq by time for `group.seek`, group deletion, and the listeners told about retention.

use super::StoreActor;
use crate::actors::messages::{
    CreateTopic, DeleteGroupRecord, DeleteTopic, GetTopicInfo, GetTopicSettings, SeqAtTime,
    SetTopicListeners,
};
use crate::store::StoreError;
use actix::prelude::*;
use sluice_protocol::WireError;

fn not_yet(what: &str) -> WireError {
    WireError::new(
        sluice_protocol::ErrorCode::Unavailable,
        format!("{what} is not implemented yet"),
    )
}

impl Handler<CreateTopic> for StoreActor {
    type Result = Result<sluice_protocol::TopicInfo, WireError>;
    fn handle(&mut self, _: CreateTopic, _: &mut Context<Self>) -> Self::Result {
        Err(not_yet("topic.create"))
    }
}

impl Handler<GetTopicInfo> for StoreActor {
    type Result = Result<Vec<sluice_protocol::TopicInfo>, WireError>;
    fn handle(&mut self, _: GetTopicInfo, _: &mut Context<Self>) -> Self::Result {
        Err(not_yet("topic.info"))
    }
}

impl Handler<DeleteTopic> for StoreActor {
    type Result = Result<sluice_protocol::TopicDeleted, WireError>;
    fn handle(&mut self, _: DeleteTopic, _: &mut Context<Self>) -> Self::Result {
        Err(not_yet("topic.delete"))
    }
}

impl Handler<SeqAtTime> for StoreActor {
    type Result = Result<u64, StoreError>;
    fn handle(&mut self, _: SeqAtTime, _: &mut Context<Self>) -> Self::Result {
        Err(StoreError::Unavailable)
    }
}

impl Handler<DeleteGroupRecord> for StoreActor {
    type Result = Result<bool, StoreError>;
    fn handle(&mut self, _: DeleteGroupRecord, _: &mut Context<Self>) -> Self::Result {
        Err(StoreError::Unavailable)
    }
}

impl Handler<SetTopicListeners> for StoreActor {
    type Result = ();
    fn handle(&mut self, _: SetTopicListeners, _: &mut Context<Self>) {}
}

impl Handler<GetTopicSettings> for StoreActor {
    type Result = Result<sluice_protocol::TopicSettings, StoreError>;
    fn handle(&mut self, _: GetTopicSettings, _: &mut Context<Self>) -> Self::Result {
        // No per-topic overrides yet: the broker's defaults.
        Ok(self.config.default_topic_settings())
    }
}
