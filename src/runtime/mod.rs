//! The runtime: what runs handlers. A consumer group's settings ([`subscription`]), how an event
//! reaches a handler ([`dispatch`]), the handler under supervision ([`supervise`]), the
//! partition worker and its `Source` / `Ack` seams ([`worker`]), and command handlers' tasks
//! ([`commands`]) and instances ([`command_options`]).

pub(crate) mod command_options;
pub(crate) mod commands;
pub(crate) mod dispatch;
pub(crate) mod subscription;
pub(crate) mod supervise;
pub(crate) mod worker;
