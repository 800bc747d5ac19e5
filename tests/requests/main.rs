//! Request/reply: commands with one stateful handler each, typed replies, timeouts and
//! deadlines, refusals after shutdown, correlation through commands.

mod request_reply;
