//! RegistryActor: which connections and subscriptions exist, the rejoin after an orchestrator
//! restart, stats gathering and fault injection by actor name.

use super::messages::{
    ConnectionClosed, ConnectionLinks, DisconnectStale, DisconnectStaleAll, GetConnectionStats,
    GetGroupStats, GetStats, GetSyncStats, InjectFaultByName, ListGroupStats, ListGroups,
    OrchestratorLinks, OrchestratorStarted, RegisterConnection, RegistryLinks, Rejoin, SetPeers,
    StoreLinks, SubscriptionOpened,
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
        self.events.emit(
            sluice_protocol::BrokerEvent::now(sluice_protocol::event_kind::ACTOR_RESTARTED)
                .actor("registry")
                .count(u64::from(self.counters.restarts)),
        );
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

// ---- groups and stale consumers across every shard ----

/// How long the registry waits for one actor's answer when gathering.
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);

/// Every group (of `topic`, of `group`): those loaded in an orchestrator as it reports them
/// (`loaded: true`), then those only stored, from their durable records (`loaded: false`),
/// sorted by (topic, group). `strict`: an orchestrator or the store that does not answer is an
/// error (`UNAVAILABLE` / the store's error) instead of being left out (stats are best effort;
/// `group.list` must not pass off a loaded group as unloaded).
async fn gather_groups(
    store: Option<StoreLinks>,
    orchs: Vec<OrchestratorLinks>,
    topic: Option<String>,
    group: Option<String>,
    strict: bool,
) -> Result<Vec<GroupStats>, WireError> {
    let wanted = |t: &str, g: &str| {
        topic.as_deref().is_none_or(|x| x == t) && group.as_deref().is_none_or(|x| x == g)
    };
    // One topic lives on one shard: ask only that one.
    let shards: Vec<&OrchestratorLinks> = match &topic {
        Some(t) if !orchs.is_empty() => vec![&orchs[super::shard_for(t, orchs.len())]],
        _ => orchs.iter().collect(),
    };
    let mut live: HashMap<(String, String), GroupStats> = HashMap::new();
    for (i, o) in shards.into_iter().enumerate() {
        match o
            .group_stats
            .send(GetGroupStats)
            .timeout(GATHER_TIMEOUT)
            .await
        {
            Ok(gs) => {
                for g in gs.into_iter().filter(|g| wanted(&g.topic, &g.group)) {
                    live.insert((g.topic.clone(), g.group.clone()), g);
                }
            }
            Err(e) if strict => {
                return Err(WireError::new(
                    ErrorCode::Unavailable,
                    format!("an orchestrator did not answer ({e}); retry"),
                ))
            }
            Err(e) => tracing::debug!(shard = i, error = %e, "no group stats from an orchestrator"),
        }
    }
    let stored = match &store {
        Some(s) => match s.list_groups.send(ListGroups).timeout(GATHER_TIMEOUT).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) if strict => return Err(WireError::from(e)),
            Err(e) if strict => {
                return Err(WireError::new(
                    ErrorCode::Unavailable,
                    format!("the store did not answer ({e}); retry"),
                ))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no stored groups from the store");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!(error = %e, "no stored groups from the store");
                Vec::new()
            }
        },
        None if strict => {
            return Err(WireError::new(
                ErrorCode::Unavailable,
                "the broker is starting; retry",
            ))
        }
        None => Vec::new(),
    };
    for (t, g, rec, head) in stored {
        if !wanted(&t, &g) {
            continue;
        }
        let key = (t, g);
        if live.contains_key(&key) {
            continue;
        }
        let mut stats = crate::delivery::GroupState::from_record(rec).stats(&key.0, &key.1, head);
        stats.loaded = false;
        live.insert(key, stats);
    }
    let mut groups: Vec<GroupStats> = live.into_values().collect();
    groups.sort_by(|a, b| (&a.topic, &a.group).cmp(&(&b.topic, &b.group)));
    Ok(groups)
}

impl Handler<ListGroupStats> for RegistryActor {
    type Result = ResponseFuture<Result<Vec<GroupStats>, WireError>>;
    fn handle(&mut self, msg: ListGroupStats, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let (store, orchs) = (self.store.clone(), self.orchestrators.clone());
        Box::pin(gather_groups(store, orchs, msg.topic, msg.group, true))
    }
}

impl Handler<DisconnectStaleAll> for RegistryActor {
    type Result = ResponseFuture<Vec<sluice_protocol::StaleConsumer>>;
    fn handle(&mut self, msg: DisconnectStaleAll, _: &mut Context<Self>) -> Self::Result {
        self.counters.handled += 1;
        let orchs = self.orchestrators.clone();
        Box::pin(async move {
            let asks = orchs.iter().map(|o| {
                o.disconnect_stale
                    .send(DisconnectStale {
                        older_than: msg.older_than,
                    })
                    .timeout(GATHER_TIMEOUT)
            });
            let mut all = Vec::new();
            for (shard, answer) in futures::future::join_all(asks)
                .await
                .into_iter()
                .enumerate()
            {
                match answer {
                    Ok(found) => all.extend(found),
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "an orchestrator did not answer disconnect_stale")
                    }
                }
            }
            all.sort_by(|a, b| {
                (&a.topic, &a.group, &a.consumer).cmp(&(&b.topic, &b.group, &b.consumer))
            });
            all
        })
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
            if let Some(s) = &store {
                if let Ok(a) = s.actor_stats.send(GetActorStats).timeout(t).await {
                    stats.actors.push(a);
                }
                if let Ok(syncs) = s.sync_stats.send(GetSyncStats).timeout(t).await {
                    stats.syncs = Some(syncs);
                }
            }
            for o in &orchs {
                if let Ok(a) = o.actor_stats.send(GetActorStats).timeout(t).await {
                    stats.actors.push(a);
                }
            }
            stats.groups = gather_groups(store, orchs, None, None, false)
                .await
                .unwrap_or_default();
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
