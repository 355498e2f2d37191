//! The runtime the RocketMQ clients run on.

use std::fmt;
use std::sync::Arc;

use rocketmq_client_rust::{
    ClientError, ClientResult, ClientRuntime, ClientRuntimeConfig, TelemetryHandle,
};
use rocketmq_runtime::RuntimeOwner;

use crate::ConsumerOptions;

/// Owns the runtime that RocketMQ clients run on (the client never uses the caller's tokio
/// runtime: it needs one of its own, with bounded blocking lanes), sized by
/// [`ConsumerOptions::runtime_config`] so that waiting listeners fit.
///
/// Build the consumers and producers with [`client_runtime`](ClientHost::client_runtime);
/// shut them down before the host.
pub struct ClientHost {
    client: Arc<ClientRuntime>,
    owner: Option<RuntimeOwner>,
}

impl ClientHost {
    /// Starts a client runtime for consumers configured with `options`; its threads are
    /// named `stream-dedup-rocketmq`. Telemetry is off (a no-op handle): the client records
    /// no metrics and installs no global subscriber.
    ///
    /// # Errors
    ///
    /// If the runtime cannot be built (no threads, an unreadable memory limit).
    pub fn start(options: &ConsumerOptions) -> ClientResult<ClientHost> {
        let config = options.runtime_config("stream-dedup-rocketmq");
        let owner = RuntimeOwner::plan(config)
            .map_err(|e| ClientError::internal("plan the RocketMQ client runtime", e))?
            .build()
            .map_err(|e| ClientError::internal("build the RocketMQ client runtime", e))?;
        let client = ClientRuntime::try_new(
            owner.root_context().component("client"),
            ClientRuntimeConfig::default(),
            TelemetryHandle::noop(),
        )?;
        Ok(ClientHost {
            client,
            owner: Some(owner),
        })
    }

    /// The client runtime, for `DefaultMQPushConsumer::builder` and
    /// `DefaultMQProducer::builder`.
    pub fn client_runtime(&self) -> Arc<ClientRuntime> {
        self.client.clone()
    }

    /// Stops the clients still pooled on this runtime and the runtime's tasks (within 30 s
    /// each), then the runtime itself in the background.
    pub async fn shutdown(mut self) {
        let _ = self.client.shutdown().await;
        if let Some(owner) = self.owner.take() {
            let _ = owner.shutdown_tasks().await;
            let _ = owner.shutdown_background();
        }
    }
}

impl fmt::Debug for ClientHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHost")
            .field("shut_down", &self.client.is_shutdown())
            .finish_non_exhaustive()
    }
}
