//! The test harness (`tidings::testing`): handlers called directly with a `TestContext`, whole
//! buses settled deterministically on tokio's paused clock.

mod harness;
