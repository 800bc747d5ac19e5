//! The test harness (`tidings::testing`): handlers called directly with a `TestContext`, whole
//! buses settled deterministically on tokio's paused clock; command handlers called directly,
//! the requests of handlers under test stubbed and recorded.

mod commands;
mod harness;
