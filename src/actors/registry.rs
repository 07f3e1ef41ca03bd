//! RegistryActor: which connections and subscriptions exist, the rejoin after an orchestrator
//! restart, stats gathering and fault injection by actor name.

use super::messages::{
    ConnectionClosed, ConnectionLinks, DisconnectStaleAll, GetConnectionStats, GetGroupStats,
    GetStats, GetSyncStats, InjectFaultByName, ListGroupStats, ListGroups, OrchestratorLinks,
    OrchestratorStarted, RegisterConnection, RegistryLinks, Rejoin, SetPeers, StoreLinks,
    SubscriptionOpened,
};
use super::{ActorCounters, FaultKind, GetActorStats, InjectFault};
use actix::prelude::*;
use sluice_protocol::{BrokerStats, ErrorCode, GroupStats, WireError};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

struct ConnEntry {
    links: ConnectionLinks,
    shards: Vec<usize>,
}

/// The registry actor.
pub struct RegistryActor {
    store: Option<StoreLinks>,
    orchestrators: Vec<OrchestratorLinks>,
    connections: BTreeMap<u64, ConnEntry>,
    counters: ActorCounters,
    broker_started: Instant,
    fsync: String,
    /// Lifecycle events.
    events: crate::events::EventBus,
}

impl RegistryActor {
    /// A registry; `fsync` is the policy shown in stats.
    pub fn new(fsync: String) -> Self {
        RegistryActor {
            store: None,
            orchestrators: Vec::new(),
            connections: BTreeMap::new(),
            counters: ActorCounters::default(),
            broker_started: Instant::now(),
            fsync,
            events: crate::events::EventBus::default(),
        }
    }

    /// With the broker's event bus.
    pub fn with_events(mut self, events: crate::events::EventBus) -> Self {
        self.events = events;
        self
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        self.counters.started_at = Instant::now();
    }
}

impl Supervised for RegistryActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.counters.restarts += 1;
        tracing::warn!(restarts = self.counters.restarts, "registry restarting");
    }
}

impl RegistryLinks {
    /// The recipients of the registry actor.
    pub fn of(addr: &Addr<RegistryActor>) -> RegistryLinks {
        RegistryLinks {
            register: addr.clone().recipient(),
            closed: addr.clone().recipient(),
            subscription_opened: addr.clone().recipient(),
            stats: addr.clone().recipient(),
            fault_by_name: addr.clone().recipient(),
            list_groups: addr.clone().recipient(),
            disconnect_stale: addr.clone().recipient(),
        }
    }
}

// ---- issue 11 (not implemented yet) ----

impl Handler<ListGroupStats> for RegistryActor {
    type Result = ResponseFuture<Result<Vec<GroupStats>, WireError>>;
    fn handle(&mut self, _: ListGroupStats, _: &mut Context<Self>) -> Self::Result {
        Box::pin(async {
            Err(WireError::new(
                ErrorCode::Unavailable,
                "group.list is not implemented yet",
            ))
        })
    }
}

impl Handler<DisconnectStaleAll> for RegistryActor {
    type Result = ResponseFuture<Vec<sluice_protocol::StaleConsumer>>;
    fn handle(&mut self, _: DisconnectStaleAll, _: &mut Context<Self>) -> Self::Result {
        Box::pin(async { Vec::new() })
    }
}

impl Handler<SetPeers> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: SetPeers, _: &mut Context<Self>) {
        self.store = Some(msg.store);
        self.orchestrators = msg.orchestrators;
    }
}

impl Handler<RegisterConnection> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: RegisterConnection, _: &mut Context<Self>) {
        self.counters.handled += 1;
        self.connections.insert(
            msg.conn_id,
            ConnEntry {
                links: msg.links,
                shards: Vec::new(),
            },
        );
    }
}

impl Handler<ConnectionClosed> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: ConnectionClosed, _: &mut Context<Self>) {
        self.counters.handled += 1;
        self.connections.remove(&msg.conn_id);
    }
}

impl Handler<SubscriptionOpened> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: SubscriptionOpened, _: &mut Context<Self>) {
        self.counters.handled += 1;
        if let Some(c) = self.connections.get_mut(&msg.conn_id) {
            if !c.shards.contains(&msg.shard) {
                c.shards.push(msg.shard);
            }
        }
    }
}

impl Handler<OrchestratorStarted> for RegistryActor {
    type Result = ();
    fn handle(&mut self, msg: OrchestratorStarted, _: &mut Context<Self>) {
        self.counters.handled += 1;
        let mut n = 0;
        for c in self.connections.values() {
            if c.shards.contains(&msg.shard) {
                c.links.rejoin.do_send(Rejoin { shard: msg.shard });
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(
                shard = msg.shard,
                connections = n,
                "orchestrator started: subscriptions rejoin"
            );
        }
    }
}

impl Handler<GetStats> for RegistryActor {
    type Result = ResponseFuture<Result<BrokerStats, WireError>>;
    fn handle(&mut self, _: GetStats, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let own = self.counters.stats("registry", "registry", None);
        let store = self.store.clone();
        let orchs = self.orchestrators.clone();
        let conns: Vec<Recipient<GetConnectionStats>> = self
            .connections
            .values()
            .map(|c| c.links.stats.clone())
            .collect();
        let version = env!("CARGO_PKG_VERSION").to_string();
        let uptime_ms = self.broker_started.elapsed().as_millis() as u64;
        let fsync = self.fsync.clone();
        let _ = ctx;
        Box::pin(async move {
            let t = Duration::from_secs(5);
            let mut stats = BrokerStats {
                version,
                uptime_ms,
                fsync,
                ..Default::default()
            };
            stats.actors.push(own);
            let mut stored: Vec<(String, String, crate::store::GroupRecord, u64)> = Vec::new();
            if let Some(s) = &store {
                if let Ok(a) = s.actor_stats.send(GetActorStats).timeout(t).await {
                    stats.actors.push(a);
                }
                if let Ok(Ok(list)) = s.list_groups.send(ListGroups).timeout(t).await {
                    stored = list;
                }
                if let Ok(syncs) = s.sync_stats.send(GetSyncStats).timeout(t).await {
                    stats.syncs = Some(syncs);
                }
            }
            let mut live: HashMap<(String, String), GroupStats> = HashMap::new();
            for o in &orchs {
                if let Ok(a) = o.actor_stats.send(GetActorStats).timeout(t).await {
                    stats.actors.push(a);
                }
                if let Ok(gs) = o.group_stats.send(GetGroupStats).timeout(t).await {
                    for g in gs {
                        live.insert((g.topic.clone(), g.group.clone()), g);
                    }
                }
            }
            for (topic, group, rec, head) in stored {
                let key = (topic.clone(), group.clone());
                if live.contains_key(&key) {
                    continue;
                }
                let g = crate::delivery::GroupState::from_record(rec);
                live.insert(key, g.stats(&topic, &group, head));
            }
            let mut groups: Vec<GroupStats> = live.into_values().collect();
            groups.sort_by(|a, b| (&a.topic, &a.group).cmp(&(&b.topic, &b.group)));
            stats.groups = groups;
            for c in conns {
                if let Ok((a, cs)) = c.send(GetConnectionStats).timeout(t).await {
                    stats.actors.push(a);
                    stats.connections.push(cs);
                }
            }
            Ok(stats)
        })
    }
}

impl Handler<InjectFaultByName> for RegistryActor {
    type Result = Result<String, WireError>;
    fn handle(&mut self, msg: InjectFaultByName, ctx: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let name = msg.actor.as_str();
        if name != "store" && matches!(msg.kind, FaultKind::StallSyncs(_)) {
            return Err(WireError::new(
                ErrorCode::InvalidRequest,
                "stall-syncs applies to the store only",
            ));
        }
        if name == "registry" {
            if msg.kind == FaultKind::Panic {
                super::injected_panic("registry");
            }
            ctx.stop();
            return Ok(msg.actor);
        }
        if name == "store" {
            if let Some(s) = &self.store {
                s.fault.do_send(InjectFault { kind: msg.kind });
                return Ok(msg.actor);
            }
        }
        let shard = if name == "orchestrator" {
            Some(0)
        } else {
            name.strip_prefix("orchestrator-")
                .and_then(|n| n.parse::<usize>().ok())
        };
        if let Some(o) = shard.and_then(|i| self.orchestrators.get(i)) {
            o.fault.do_send(InjectFault { kind: msg.kind });
            return Ok(msg.actor);
        }
        if let Some(c) = name
            .strip_prefix("connection-")
            .and_then(|n| n.parse::<u64>().ok())
            .and_then(|id| self.connections.get(&id))
        {
            c.links.fault.do_send(InjectFault { kind: msg.kind });
            return Ok(msg.actor);
        }
        Err(WireError::new(
            ErrorCode::UnknownActor,
            format!("no actor named '{name}'"),
        ))
    }
}
