//! Fan-out of domain events (a residency ended, a credential was revoked) to
//! every interested process.
//!
//! Embedded, the bus is a tokio broadcast channel. Distributed, events are
//! published to Redis channels `estate:<topic>` and every process forwards what
//! it hears into its local broadcast, so subscribers look the same either way.
//! The bus is fast but lossy under disconnection; durable effects (R5 deletion,
//! R11 audit) also travel through the outbox, and consumers sweep it.

use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tracing::Instrument;

/// A client span for one Redis command, script or pipeline (`op`), in the
/// span of the call that issued it.
pub fn redis_span(op: &'static str) -> tracing::Span {
    tracing::info_span!("redis", otel.name = op, otel.kind = "client", db.system = "redis", db.operation = op)
}

/// Capacity of the local broadcast; slow subscribers lose the oldest events
/// and are told how many (they then re-read from the source of truth).
const LOCAL_CAPACITY: usize = 4096;
const CHANNEL_PREFIX: &str = "estate:";

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Redis could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A Redis connection that fails fast when Redis is down (one retry, 500 ms
/// connect and response timeouts) instead of retrying for seconds: callers on
/// a gate's hot path fall back to the database, and a publish after a commit
/// must not hold the caller's answer. It reconnects by itself once Redis is back.
pub async fn redis_connection(client: &redis::Client) -> Result<redis::aio::ConnectionManager, BusError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    Ok(client.get_connection_manager_with_config(config).await?)
}

/// One event on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEvent {
    /// Dotted topic, e.g. "identity.residency.ended".
    pub topic: String,
    /// Encoded protobuf message.
    pub payload: Vec<u8>,
}

#[derive(Debug)]
enum Transport {
    Local,
    Redis(redis::aio::ConnectionManager),
}

/// A handle to the bus; cheap to clone.
#[derive(Debug, Clone)]
pub struct EventBus {
    local: broadcast::Sender<BusEvent>,
    transport: Arc<Transport>,
}

impl EventBus {
    /// An in-process bus (embedded default).
    pub fn local() -> Self {
        let (local, _) = broadcast::channel(LOCAL_CAPACITY);
        Self { local, transport: Arc::new(Transport::Local) }
    }

    /// A bus over Redis pub/sub. Subscribes before returning, so events
    /// published afterwards by any process reach this one.
    pub async fn redis(url: &str) -> Result<Self, BusError> {
        let client = redis::Client::open(url)?;
        let conn = redis_connection(&client).await?;
        let (local, _) = broadcast::channel(LOCAL_CAPACITY);
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(format!("{CHANNEL_PREFIX}*")).await?;
        tokio::spawn(forward(client, pubsub, local.clone()));
        Ok(Self { local, transport: Arc::new(Transport::Redis(conn)) })
    }

    /// Publishes an event to every subscriber of every process.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), BusError> {
        match &*self.transport {
            Transport::Local => {
                // No subscriber is not an error.
                let _ = self.local.send(BusEvent { topic: topic.to_owned(), payload });
                Ok(())
            }
            Transport::Redis(conn) => {
                let mut conn = conn.clone();
                let _receivers: i64 = redis::cmd("PUBLISH")
                    .arg(format!("{CHANNEL_PREFIX}{topic}"))
                    .arg(payload)
                    .query_async(&mut conn)
                    .instrument(redis_span("PUBLISH"))
                    .await?;
                Ok(())
            }
        }
    }

    /// Receives every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BusEvent> {
        self.local.subscribe()
    }
}

/// Waits until `interval` has passed or an event on `topic` arrives, whichever
/// is first: how a sweep that reads a durable source (the outbox) sleeps
/// between passes yet reacts at once to the bus. A lagging receiver wakes too
/// (the sweep re-reads the source); a closed bus leaves only the interval.
pub async fn wake_on(events: &mut broadcast::Receiver<BusEvent>, topic: &str, interval: Duration) {
    wake_on_any(events, &[topic], interval).await;
}

/// Like [`wake_on`], for any of several topics.
pub async fn wake_on_any(events: &mut broadcast::Receiver<BusEvent>, topics: &[&str], interval: Duration) {
    let heard = async {
        loop {
            match events.recv().await {
                Ok(ev) if topics.contains(&ev.topic.as_str()) => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        () = tokio::time::sleep(interval) => {},
        () = heard => {},
    }
}

/// Forwards Redis messages into the local broadcast for the life of the
/// process; resubscribes with backoff after a lost connection.
async fn forward(client: redis::Client, pubsub: redis::aio::PubSub, local: broadcast::Sender<BusEvent>) {
    let mut stream = pubsub.into_on_message();
    loop {
        while let Some(msg) = stream.next().await {
            let Some(topic) = msg.get_channel_name().strip_prefix(CHANNEL_PREFIX) else { continue };
            let _ = local.send(BusEvent { topic: topic.to_owned(), payload: msg.get_payload_bytes().to_vec() });
        }
        tracing::warn!("redis pub/sub connection lost; resubscribing");
        let mut delay = Duration::from_millis(100);
        stream = loop {
            tokio::time::sleep(delay).await;
            match client.get_async_pubsub().await {
                Ok(mut ps) => match ps.psubscribe(format!("{CHANNEL_PREFIX}*")).await {
                    Ok(()) => break ps.into_on_message(),
                    Err(e) => tracing::warn!(error = %e, "redis resubscribe failed"),
                },
                Err(e) => tracing::warn!(error = %e, "redis reconnect failed"),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_bus_delivers_to_subscribers() -> Result<(), Box<dyn std::error::Error>> {
        let bus = EventBus::local();
        let mut rx = bus.subscribe();
        bus.publish("t.x", vec![1, 2]).await?;
        let ev = rx.recv().await?;
        assert_eq!(ev, BusEvent { topic: "t.x".into(), payload: vec![1, 2] });
        Ok(())
    }
}
