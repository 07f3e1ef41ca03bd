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
        };
        self.client.request(route::ADMIN_FAULT, &req).await
    }
}
