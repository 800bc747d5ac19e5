//! Request/reply: commands with one stateful handler each, typed replies, timeouts and
//! deadlines, refusals after shutdown, correlation through commands; handlers as several
//! instances (keyed, pooled).

mod instances;
mod request_reply;
