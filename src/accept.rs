//! What every listener of the daemon (FTP control, control API, metrics) does when `accept`
//! fails.

use std::future::Future;
use std::time::Duration;

/// How long to wait after a failed accept.
const BACK_OFF: Duration = Duration::from_millis(100);

/// The next accepted connection. A failed accept is logged and retried after `BACK_OFF` (100 ms):
/// running out of file descriptors is transient, and retrying at once would spin.
pub async fn next<T, F>(listener: &str, mut accept: impl FnMut() -> F) -> T
where
    F: Future<Output = std::io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(connection) => return connection,
            Err(e) => {
                tracing::warn!(error = %e, "{listener}: accept failed");
                tokio::time::sleep(BACK_OFF).await;
            }
        }
    }
}
