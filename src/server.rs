//! Starting the broker: open the store, start the supervised actors on their arbiters, and run
//! the accept loop (one [`ConnectionActor`] per accepted socket). Must run inside an actix
//! `System`.

use crate::actors::connection::{
    BrokerLinks, ConnectionActor, ConnectionCounters, ConnectionLimits,
};
use crate::actors::messages::{
    OrchestratorLinks, RegistryLinks, SetAppendListeners, SetPeers, SetTopicListeners, StoreLinks,
    TopicAdminLinks, TopicListener,
};
use crate::actors::orchestrator::{DeliveryConfig, OrchestratorActor};
use crate::actors::registry::RegistryActor;
use crate::actors::store::StoreActor;
use crate::config::Config;
use crate::store::{Storage, StoreError};
use actix::prelude::*;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running broker.
pub struct BrokerHandle {
    /// The address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
    /// Links to the actors.
    pub links: BrokerLinks,
    _arbiters: Vec<Arbiter>,
}

/// Exit code of a broker ended by a panic (EX_SOFTWARE).
pub const PANIC_EXIT_CODE: i32 = 70;

/// Makes a panic on any thread end the broker with a clear log line and exit code
/// [`PANIC_EXIT_CODE`]. actix does not supervise panics: a panic in a handler kills its arbiter
/// thread, and the broker would go on accepting connections while every request to the dead
/// store or orchestrator failed (`3002 UNAVAILABLE`). Ending the process instead lets the
/// service manager restart it, and a restart rebuilds every actor's state from disk; nothing
/// acknowledged depends on memory (acks and publishes are replied only once durable).
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            let what = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            let thread = std::thread::current();
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            tracing::error!(
                thread = thread.name().unwrap_or("unnamed"),
                at,
                code = PANIC_EXIT_CODE,
                "fatal: panic ({what}); exiting so that the service manager restarts the broker"
            );
            std::process::exit(PANIC_EXIT_CODE);
        }));
    });
}

/// Starts the broker: binds `config.listen`, opens the store, starts every actor. Installs
/// [`install_panic_hook`].
pub async fn start(config: Config) -> Result<BrokerHandle, StartError> {
    config.validate()?;
    install_panic_hook();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let started = std::time::Instant::now();
    let storage = Storage::open(&config.data_dir, config.cache_capacity)?;
    let topics = storage.topics().count();
    let batch_id_base = storage.batch_id_base()?;
    tracing::info!(data_dir = %config.data_dir.display(), topics, elapsed = ?started.elapsed(), "store opened");

    let config = Arc::new(config);
    // Lifecycle events (`admin.events`): every actor gets a clone.
    let events = crate::events::EventBus::default();
    let mut arbiters = Vec::new();
    let store_arbiter = Arbiter::new();
    let fsync = config.fsync;
    // Built here, before any request is taken: under `fsync = "always"` it makes a spare
    // segment (~64 MiB written and synced), which would otherwise hold up the first requests.
    let mut storage = storage;
    storage.set_preallocate(config.preallocate_segment);
    // Before the store actor makes its spares, which take the segment size.
    storage.set_segment_bytes(config.segment_bytes);
    let store_actor = StoreActor::new(storage, fsync).with_config(config.clone(), events.clone());
    let store = Supervisor::start_in_arbiter(&store_arbiter.handle(), move |_| store_actor);
    arbiters.push(store_arbiter);

    let registry = Supervisor::start({
        let f = config.fsync.to_string();
        let ev = events.clone();
        move |_| RegistryActor::new(f).with_events(ev)
    });
    let dcfg = DeliveryConfig::from(&*config);
    let batch_ids = Arc::new(AtomicU64::new(batch_id_base));
    let mut orchestrators = Vec::new();
    for shard in 0..config.orchestrators as usize {
        // Shard 0 shares the store's thread: the store's announcements and the orchestrator's
        // cursor commits then pass without a cross-thread wake-up (each costs tens of µs of
        // CPU on a VM). Further shards get threads of their own.
        let handle = if shard == 0 {
            arbiters[0].handle()
        } else {
            let arb = Arbiter::new();
            let h = arb.handle();
            arbiters.push(arb);
            h
        };
        let (d, s, ids) = (dcfg.clone(), StoreLinks::of(&store), batch_ids.clone());
        let r = registry.clone().recipient();
        let ev = events.clone();
        let addr = Supervisor::start_in_arbiter(&handle, move |_| {
            OrchestratorActor::new(shard, d, s, Some(r), ids).with_events(ev)
        });
        orchestrators.push(addr);
    }
    // The registry and the store were built before the orchestrators and need to reach them:
    // handed over here, before any connection is accepted.
    registry.do_send(SetPeers {
        store: StoreLinks::of(&store),
        orchestrators: orchestrators.iter().map(OrchestratorLinks::of).collect(),
    });
    store.do_send(SetAppendListeners(
        orchestrators
            .iter()
            .map(|o| o.clone().recipient())
            .collect(),
    ));
    store.do_send(SetTopicListeners(
        orchestrators.iter().map(TopicListener::of).collect(),
    ));

    let links = BrokerLinks {
        config: config.clone(),
        limits: ConnectionLimits {
            max_queued_bytes: config.max_queued_bytes,
        },
        counters: Arc::new(ConnectionCounters::default()),
        topics: TopicAdminLinks::of(&store),
        store: store.recipient(),
        orchestrators: Arc::new(orchestrators.iter().map(OrchestratorLinks::of).collect()),
        registry: RegistryLinks::of(&registry),
        events: events.clone(),
    };
    let accept_links = links.clone();
    actix_rt::spawn(async move {
        let mut next_id: u64 = 1;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    ConnectionActor::start_for(next_id, stream, peer, accept_links.clone());
                    next_id += 1;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tracing::info!(%local_addr, fsync = %config.fsync, "sluice broker listening");
    Ok(BrokerHandle {
        local_addr,
        links,
        _arbiters: arbiters,
    })
}
