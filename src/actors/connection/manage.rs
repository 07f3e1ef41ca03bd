//! The request-response routes of topics and groups as an operator manages them (`topic.*`,
//! `group.*`, `admin.disconnect_stale`): each decodes and checks its request here, then hands
//! it to the actor that owns the answer (the store for topics, the topic's orchestrator for a
//! group's cursor, the registry for what spans every shard) and replies with what comes back.

use super::{decode, ConnectionActor, RequestKind, StreamState};
use crate::actors::messages::{
    CreateTopic, DeleteGroup, DeleteTopic, DisconnectStaleAll, GetTopicInfo, ListGroupStats,
    SeekGroup,
};
use actix::prelude::*;
use sluice_protocol::subscribe::validate_name;
use sluice_protocol::{
    route, DisconnectStaleReply, DisconnectStaleRequest, ErrorCode, GroupList, GroupName,
    ListRequest, SeekRequest, TopicList, TopicName, TopicRequest, WireError,
};
use std::future::Future;

type Answer<T> = Result<Result<T, WireError>, MailboxError>;

impl ConnectionActor {
    /// Handles `route` if it is one of this module's; false otherwise.
    pub(super) fn manage_route(
        &mut self,
        route: &str,
        sid: u32,
        kind: RequestKind,
        data: &[u8],
        ctx: &mut Context<Self>,
    ) -> bool {
        if kind != RequestKind::Response {
            return false;
        }
        let res = match route {
            route::TOPIC_CREATE | route::TOPIC_ALTER => {
                decode::<TopicRequest>(data).and_then(|r| {
                    validate_name("topic", &r.topic)?;
                    r.settings.validate()?;
                    let msg = CreateTopic {
                        topic: r.topic,
                        settings: r.settings,
                        alter: route == route::TOPIC_ALTER,
                    };
                    self.forward(sid, self.links.topics.create.send(msg), ctx);
                    Ok(())
                })
            }
            route::TOPIC_INFO => decode::<TopicName>(data).and_then(|r| {
                validate_name("topic", &r.topic)?;
                let topic = r.topic.clone();
                let f = self.links.topics.info.send(GetTopicInfo {
                    topic: Some(r.topic),
                });
                let one = async move {
                    f.await.map(|r| {
                        r.and_then(|mut v| {
                            v.pop().ok_or_else(|| {
                                WireError::new(
                                    ErrorCode::UnknownTopic,
                                    format!("topic '{topic}' does not exist"),
                                )
                            })
                        })
                    })
                };
                self.forward(sid, one, ctx);
                Ok(())
            }),
            route::TOPIC_LIST => decode::<ListRequest>(data).map(|_| {
                let f = self.links.topics.info.send(GetTopicInfo { topic: None });
                let list = async move { f.await.map(|r| r.map(|topics| TopicList { topics })) };
                self.forward(sid, list, ctx)
            }),
            route::TOPIC_DELETE => decode::<TopicName>(data).and_then(|r| {
                validate_name("topic", &r.topic)?;
                let f = self
                    .links
                    .topics
                    .delete
                    .send(DeleteTopic { topic: r.topic });
                self.forward(sid, f, ctx);
                Ok(())
            }),
            route::GROUP_LIST => decode::<ListRequest>(data).and_then(|r| {
                if let Some(t) = &r.topic {
                    validate_name("topic", t)?;
                }
                let f = self.links.registry.list_groups.send(ListGroupStats {
                    topic: r.topic,
                    group: None,
                });
                let list = async move { f.await.map(|r| r.map(|groups| GroupList { groups })) };
                self.forward(sid, list, ctx);
                Ok(())
            }),
            route::GROUP_INFO => decode::<GroupName>(data).and_then(|r| {
                validate_name("topic", &r.topic)?;
                validate_name("group", &r.group)?;
                let (topic, group) = (r.topic.clone(), r.group.clone());
                let f = self.links.registry.list_groups.send(ListGroupStats {
                    topic: Some(r.topic),
                    group: Some(r.group),
                });
                let one = async move {
                    f.await.map(|r| {
                        r.and_then(|mut v| {
                            v.pop().ok_or_else(|| {
                                WireError::new(
                                    ErrorCode::UnknownGroup,
                                    format!("group '{group}' of topic '{topic}' does not exist"),
                                )
                            })
                        })
                    })
                };
                self.forward(sid, one, ctx);
                Ok(())
            }),
            route::GROUP_SEEK => decode::<SeekRequest>(data).and_then(|r| {
                validate_name("topic", &r.topic)?;
                validate_name("group", &r.group)?;
                let (_, orch) = self.links.orchestrator(&r.topic);
                let f = orch.seek.send(SeekGroup {
                    topic: r.topic,
                    group: r.group,
                    to: r.to,
                });
                self.forward(sid, f, ctx);
                Ok(())
            }),
            route::GROUP_DELETE => decode::<GroupName>(data).and_then(|r| {
                validate_name("topic", &r.topic)?;
                validate_name("group", &r.group)?;
                let (_, orch) = self.links.orchestrator(&r.topic);
                let f = orch.delete_group.send(DeleteGroup {
                    topic: r.topic,
                    group: r.group,
                });
                self.forward(sid, f, ctx);
                Ok(())
            }),
            route::ADMIN_DISCONNECT_STALE => decode::<DisconnectStaleRequest>(data).map(|r| {
                let f = self
                    .links
                    .registry
                    .disconnect_stale
                    .send(DisconnectStaleAll {
                        older_than: std::time::Duration::from_millis(r.older_than_ms),
                    });
                let reply = async move {
                    f.await
                        .map(|disconnected| Ok(DisconnectStaleReply { disconnected }))
                };
                self.forward(sid, reply, ctx)
            }),
            _ => return false,
        };
        if let Err(e) = res {
            self.request_error(sid, kind, e, ctx);
        }
        true
    }

    /// Replies on `sid` with what `f` answers (an actor gone: `UNAVAILABLE`).
    fn forward<T, F>(&mut self, sid: u32, f: F, ctx: &mut Context<Self>)
    where
        T: serde::Serialize + 'static,
        F: Future<Output = Answer<T>> + 'static,
    {
        self.streams.insert(sid, StreamState::Request);
        ctx.spawn(f.into_actor(self).map(move |r, act, ctx| {
            let r =
                r.unwrap_or_else(|e| Err(WireError::new(ErrorCode::Unavailable, e.to_string())));
            act.reply(sid, r, ctx)
        }));
    }
}
