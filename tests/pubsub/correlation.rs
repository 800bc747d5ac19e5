//! Correlation and causation flow through handler chains.

use tidings::prelude::*;

use crate::support::chain::{chain_bus, A, B, C};

#[tokio::test]
async fn follow_up_events_carry_the_correlation_id_and_name_their_cause() {
    let bus = chain_bus();
    let a1 = bus.publish(A { id: 1 }).await.unwrap();
    let a2 = bus.publish(A { id: 2 }).await.unwrap();
    bus.settled().await;
    let published = bus.published();
    assert_eq!(published.len(), 6);
    for (root, id) in [(a1, 1u64), (a2, 2u64)] {
        let a = published.iter().find(|e| e.id() == root.id).unwrap();
        assert_eq!(
            a.correlation_id(),
            root.id,
            "a root event starts its own chain"
        );
        assert_eq!(a.causation_id(), None);
        let b = published
            .iter()
            .find(|e| e.downcast_ref::<B>().is_some_and(|b| b.id == id))
            .unwrap();
        assert_eq!(b.correlation_id(), root.id);
        assert_eq!(b.causation_id(), Some(root.id));
        let c = published
            .iter()
            .find(|e| e.downcast_ref::<C>().is_some_and(|c| c.id == id))
            .unwrap();
        assert_eq!(c.correlation_id(), root.id);
        assert_eq!(c.causation_id(), Some(b.id()));
    }
    bus.shutdown().await;
}

struct Stamp;
impl Handler<A> for Stamp {
    async fn handle(&mut self, e: &Envelope<A>, ctx: &Context) -> Result<(), HandlerError> {
        let tenant = e.headers().get("tenant").unwrap_or("none").to_owned();
        ctx.publish_with(
            B { id: e.event().id },
            tidings::Headers::new().with("tenant", tenant),
        )
        .await?;
        Ok(())
    }
}

#[tokio::test]
async fn headers_travel_with_the_event_and_handlers_can_set_them() {
    let bus = Bus::builder()
        .record(true)
        .subscribe::<A, _>("stamp", || Stamp)
        .build()
        .unwrap();
    let headers = tidings::Headers::new()
        .with("tenant", "acme")
        .with("source", "test");
    bus.publish_with(A { id: 1 }, headers).await.unwrap();
    bus.settled().await;
    let published = bus.published();
    let a = &published[0];
    assert_eq!(a.metadata().headers.get("tenant"), Some("acme"));
    assert_eq!(a.metadata().headers.get("source"), Some("test"));
    let b = tidings::testing::events_of::<B>(&published);
    assert_eq!(b[0].headers().get("tenant"), Some("acme"));
    assert_eq!(b[0].correlation_id(), a.id());
    bus.shutdown().await;

    // The same through a TestContext.
    let mut ctx = tidings::testing::TestContext::new();
    let env = Envelope::new(A { id: 2 });
    ctx.call(&mut Stamp, &env).await.unwrap();
    assert_eq!(
        ctx.published_of::<B>()[0].headers().get("tenant"),
        Some("none")
    );
}
