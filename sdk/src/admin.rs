//! Broker administration: stats and fault injection.

use sluice_protocol::{route, BrokerStats, FaultReply, FaultRequest, StatsRequest};

use crate::client::{Client, ClientConfig};
use crate::error::Result;

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
}
