//! Bounded polling for asynchronous state (linkerd2-proxy's `assert_eventually!` idea):
//! tests wait for a condition with a deadline instead of sleeping a guessed amount.
//! Used by provider/edge helpers and by tests directly; it never asserts on how long
//! something took, only that it happened before a generous deadline.
use std::time::Duration;

/// Poll interval: short enough that a 100 ms teardown is observed promptly, long
/// enough not to busy-loop a 2-core machine.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `f` every 10 ms until it returns true (→ `true`) or `timeout` passes (→ `false`,
/// after one last check).
pub async fn eventually<F: Fn() -> bool>(timeout: Duration, f: F) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return f();
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Like [`eventually`] but panics naming `what` when the deadline passes.
pub async fn assert_eventually<F: Fn() -> bool>(timeout: Duration, what: &str, f: F) {
    assert!(
        eventually(timeout, f).await,
        "condition not reached within {timeout:?}: {what}"
    );
}
