//! The examples, run as tests through the public API.

mod order_flow;
