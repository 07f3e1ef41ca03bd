//! Broker administration: stats, topics, groups, stale consumers and fault injection.
//! (`admin.events` is a stream: see [`Admin::events`].)

use std::pin::Pin;

use futures::{Stream, StreamExt};
use sluice_protocol::{
    route, BrokerEvent, BrokerStats, DisconnectStaleReply, DisconnectStaleRequest, EventsRequest,
    FaultReply, FaultRequest, GroupDeleted, GroupList, GroupName, GroupStats, ListRequest,
    SeekReply, SeekRequest, SeekTo, StatsRequest, TopicDeleted, TopicInfo, TopicList, TopicName,
    TopicRequest, TopicSettings,
};

use crate::client::{decode_data, Client, ClientConfig};
use crate::error::Result;

/// The broker's lifecycle events, as [`Admin::events`] returns them. Ends (after an error)
/// when its connection closes; dropping it closes its connection, which ends the subscription
/// on the broker.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<BrokerEvent>> + Send>>;

/// Administrative requests (`admin.*` routes). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    /// Admin requests over an existing connection.
    pub fn new(client: Client) -> Admin {
        Admin { client }
    }

    /// Connects to the broker for admin requests.
    pub async fn connect(config: ClientConfig) -> Result<Admin> {
        Ok(Admin::new(Client::connect(config).await?))
    }

    /// The connection used.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Actor, group and connection statistics (`admin.stats`).
    pub async fn stats(&self) -> Result<BrokerStats> {
        self.client
            .request(route::ADMIN_STATS, &StatsRequest {})
            .await
    }

    /// Stops the named actor so the supervisor restarts it (`admin.fault`; only on a broker
    /// started with `--enable-fault-injection`, else
    /// [`sluice_protocol::ErrorCode::FaultInjectionDisabled`]).
    pub async fn fault(&self, actor: impl Into<String>) -> Result<FaultReply> {
        let req = FaultRequest {
            actor: actor.into(),
            kind: None,
            duration: None,
        };
        self.client.request(route::ADMIN_FAULT, &req).await
    }

    /// Makes every disk sync of the broker wait `duration` first, as on a stalled disk
    /// (`admin.fault` kind `stall-syncs`; tests only).
    pub async fn stall_syncs(&self, duration: std::time::Duration) -> Result<FaultReply> {
        let req = FaultRequest {
            actor: "store".into(),
            kind: Some("stall-syncs".into()),
            duration: Some(format!("{}ms", duration.as_millis())),
        };
        self.client.request(route::ADMIN_FAULT, &req).await
    }

    /// Makes the named actor panic in a handler, as a bug would (`admin.fault` with kind
    /// `panic`; tests only): the broker logs it and exits non-zero, for its service manager to
    /// restart it. The reply may not arrive.
    pub async fn fault_panic(&self, actor: impl Into<String>) -> Result<FaultReply> {
        let req = FaultRequest {
            actor: actor.into(),
            kind: Some("panic".into()),
            duration: None,
        };
        self.client.request(route::ADMIN_FAULT, &req).await
    }

    /// Creates a topic with `settings` (absent fields: the broker's defaults); `TOPIC_EXISTS`
    /// if it exists.
    pub async fn create_topic(
        &self,
        topic: impl Into<String>,
        settings: TopicSettings,
    ) -> Result<TopicInfo> {
        let req = TopicRequest {
            topic: topic.into(),
            settings,
        };
        self.client.request(route::TOPIC_CREATE, &req).await
    }

    /// Changes the present fields of a topic's settings; `UNKNOWN_TOPIC` if it does not exist.
    pub async fn alter_topic(
        &self,
        topic: impl Into<String>,
        settings: TopicSettings,
    ) -> Result<TopicInfo> {
        let req = TopicRequest {
            topic: topic.into(),
            settings,
        };
        self.client.request(route::TOPIC_ALTER, &req).await
    }

    /// A topic's head, floor, size, segments, groups and settings.
    pub async fn topic_info(&self, topic: impl Into<String>) -> Result<TopicInfo> {
        let req = TopicName {
            topic: topic.into(),
        };
        self.client.request(route::TOPIC_INFO, &req).await
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let list: TopicList = self
            .client
            .request(route::TOPIC_LIST, &ListRequest::default())
            .await?;
        Ok(list.topics)
    }

    /// Deletes a topic: its messages, settings and groups.
    pub async fn delete_topic(&self, topic: impl Into<String>) -> Result<TopicDeleted> {
        let req = TopicName {
            topic: topic.into(),
        };
        self.client.request(route::TOPIC_DELETE, &req).await
    }

    /// Every group (of `topic`, if given).
    pub async fn list_groups(&self, topic: Option<String>) -> Result<Vec<GroupStats>> {
        let list: GroupList = self
            .client
            .request(route::GROUP_LIST, &ListRequest { topic })
            .await?;
        Ok(list.groups)
    }

    /// One group, with its consumers.
    pub async fn group_info(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> Result<GroupStats> {
        let req = GroupName {
            topic: topic.into(),
            group: group.into(),
        };
        self.client.request(route::GROUP_INFO, &req).await
    }

    /// Moves a group's cursor (Kafka's offset reset).
    pub async fn seek_group(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
        to: SeekTo,
    ) -> Result<SeekReply> {
        let req = SeekRequest {
            topic: topic.into(),
            group: group.into(),
            to,
        };
        self.client.request(route::GROUP_SEEK, &req).await
    }

    /// Deletes a group with no consumer (`GROUP_BUSY` otherwise).
    pub async fn delete_group(
        &self,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> Result<GroupDeleted> {
        let req = GroupName {
            topic: topic.into(),
            group: group.into(),
        };
        self.client.request(route::GROUP_DELETE, &req).await
    }

    /// Subscribes to the broker's lifecycle events (`admin.events`): every event of `kinds`
    /// (empty: every kind) that happens from now on, one [`BrokerEvent`] per item. A subscriber
    /// that does not keep up loses the oldest events it has not read and gets one
    /// `events_lost` event with their count. An unknown kind is refused
    /// (`INVALID_REQUEST`, as the stream's first item).
    ///
    /// The stream runs on a connection of its own (same configuration as this admin's), so
    /// that dropping it ends the subscription on the broker. It asks for unbounded credits:
    /// read it, or the broker disconnects a client that leaves its events unread.
    pub async fn events(&self, kinds: Vec<String>) -> Result<EventStream> {
        let client = Client::connect(self.client.config().clone()).await?;
        let raw = client.request_stream(route::ADMIN_EVENTS, &EventsRequest { kinds })?;
        let items = futures::stream::unfold(Some((raw, client)), |state| async move {
            let (mut raw, client) = state?;
            let item = tokio::select! {
                item = raw.next() => item,
                _ = client.closed() => Some(Err(client.closed_error())),
            };
            match item {
                Some(Ok(p)) => {
                    let event = decode_data::<BrokerEvent>(route::ADMIN_EVENTS, &p);
                    Some((event, Some((raw, client))))
                }
                // An error ends the stream (after it is returned).
                Some(Err(e)) => Some((Err(e), None)),
                None => None,
            }
        });
        Ok(Box::pin(items))
    }

    /// Disconnects every consumer with lag and no ack for `older_than`; their batches go to
    /// other consumers.
    pub async fn disconnect_stale(
        &self,
        older_than: std::time::Duration,
    ) -> Result<DisconnectStaleReply> {
        let req = DisconnectStaleRequest {
            older_than_ms: u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX),
        };
        self.client
            .request(route::ADMIN_DISCONNECT_STALE, &req)
            .await
    }
}
