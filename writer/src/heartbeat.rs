//! Keeps a batch's messages from being redelivered while the batch is being written.

use std::time::Duration;

use tracing::debug;

/// `+WPI` for a batch's messages every third of the ack wait, until each is [`done`] or the
/// heartbeat is dropped (which stops it at once, on every path, a panic included).
///
/// [`done`]: Heartbeat::done
pub(crate) struct Heartbeat {
    replies: std::sync::Arc<std::sync::Mutex<Vec<async_nats::Subject>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub(crate) fn start(
        client: async_nats::Client,
        replies: Vec<async_nats::Subject>,
        ack_wait: Duration,
    ) -> Self {
        let replies = std::sync::Arc::new(std::sync::Mutex::new(replies));
        let every = (ack_wait / 3).max(Duration::from_millis(500));
        let task = tokio::spawn({
            let replies = replies.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    let now: Vec<async_nats::Subject> = replies
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone();
                    for reply in now {
                        if let Err(e) = client.publish(reply, "+WPI".into()).await {
                            debug!(error = %e, "in-progress heartbeat failed");
                        }
                    }
                }
            }
        });
        Self { replies, task }
    }

    /// No more heartbeats for this message (it is about to be acked or handed back).
    pub(crate) fn done(&self, reply: Option<&async_nats::Subject>) {
        if let Some(reply) = reply {
            self.replies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|r| r != reply);
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
