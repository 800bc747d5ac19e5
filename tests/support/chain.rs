//! A chain of handlers A → B → C (correlation and tracing tests).
#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use tidings::prelude::*;

/// Starts a chain.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "chain.a", key = id)]
pub struct A {
    /// Which chain.
    pub id: u64,
}

/// Follows A.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "chain.b", key = id)]
pub struct B {
    /// Which chain.
    pub id: u64,
}

/// Follows B.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "chain.c", key = id)]
pub struct C {
    /// Which chain.
    pub id: u64,
}

/// Reacts to A with B.
pub struct AtoB;
impl Handler<A> for AtoB {
    async fn handle(&mut self, e: &Envelope<A>, ctx: &Context) -> Result<(), HandlerError> {
        ctx.publish(B { id: e.event().id }).await?;
        Ok(())
    }
}

/// Reacts to B with C (with try_publish).
pub struct BtoC;
impl Handler<B> for BtoC {
    async fn handle(&mut self, e: &Envelope<B>, ctx: &Context) -> Result<(), HandlerError> {
        // try_publish carries correlation too.
        ctx.try_publish(C { id: e.event().id })
            .map_err(HandlerError::msg)?;
        Ok(())
    }
}

/// Takes C.
pub struct SinkC;
impl Handler<C> for SinkC {
    async fn handle(&mut self, _: &Envelope<C>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A recording bus wired A → B → C.
pub fn chain_bus() -> Bus {
    Bus::builder()
        .record(true)
        .subscribe::<A, _>("a-to-b", || AtoB)
        .subscribe::<B, _>("b-to-c", || BtoC)
        .subscribe::<C, _>("sink", || SinkC)
        .build()
        .unwrap()
}
