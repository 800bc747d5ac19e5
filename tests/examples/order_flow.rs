//! The order flow example (`examples/order_flow.rs`) end to end, through the public API: final
//! order states, notifications, and the correlation and causation ids of every order's chain.

#[allow(dead_code)] // `main` and the helpers only the example's `main` uses.
#[path = "../../examples/order_flow.rs"]
mod example;

use example::orders::OrderStatus;
use example::{run, sample_orders, Summary};
use tidings::{AnyEnvelope, Bus, Key};

/// The event types of each sample order's chain, in causal order.
fn expected_chain(order_id: u64) -> &'static [&'static str] {
    const CONFIRMED: &[&str] = &[
        "OrderCreated",
        "PaymentProcessed",
        "InventoryReserved",
        "OrderConfirmed",
    ];
    const DECLINED: &[&str] = &["OrderCreated", "PaymentFailed", "OrderCancelled"];
    const REFUNDED: &[&str] = &[
        "OrderCreated",
        "PaymentProcessed",
        "InventoryUnavailable",
        "PaymentRefunded",
        "OrderCancelled",
    ];
    match order_id {
        3 | 6 => DECLINED,
        4 => REFUNDED,
        _ => CONFIRMED,
    }
}

fn cancelled_because(reason: &str) -> OrderStatus {
    OrderStatus::Cancelled(reason.to_owned())
}

/// The events whose partition key is `order_id`, in publish order.
fn events_of_order(published: &[AnyEnvelope], order_id: u64) -> Vec<&AnyEnvelope> {
    published
        .iter()
        .filter(|e| e.event().event_info().key == Some(Key::U64(order_id)))
        .collect()
}

fn check(summary: &Summary) {
    // Final states: the declined and the out-of-stock orders are cancelled (compensation).
    let expected = [
        (1, OrderStatus::Confirmed),
        (2, OrderStatus::Confirmed),
        (3, cancelled_because("payment failed: card declined")),
        (4, cancelled_because("refunded: monitor out of stock")),
        (5, OrderStatus::Confirmed),
        (
            6,
            cancelled_because("payment failed: 1780.00 over the limit"),
        ),
    ];
    assert_eq!(summary.orders, expected.into_iter().collect());

    // One notification per order, whatever the order in which they were sent.
    let mut sent = summary.notifications.clone();
    sent.sort();
    assert_eq!(
        sent,
        [
            "order 1 confirmed",
            "order 2 confirmed",
            "order 3 cancelled (payment failed: card declined)",
            "order 4 cancelled (refunded: monitor out of stock)",
            "order 5 confirmed",
            "order 6 cancelled (payment failed: 1780.00 over the limit)",
        ]
    );

    let mut chained = 0;
    for (&order_id, &correlation) in &summary.correlations {
        let events = events_of_order(&summary.published, order_id);
        chained += events.len();

        // The root: the OrderCreated the orders module published, cause of nothing.
        let root = events[0];
        assert_eq!(root.name(), "OrderCreated", "order {order_id}");
        assert_eq!(root.id(), correlation, "order {order_id}");
        assert_eq!(root.causation_id(), None, "order {order_id}");

        // Every event of the chain shares the root's correlation id.
        for e in &events {
            assert_eq!(
                e.correlation_id(),
                root.id(),
                "order {order_id}: {} left its chain",
                e.name()
            );
        }

        // Causation: walk from the root, each follow-up names the previous event as its cause.
        let mut walk = vec![root];
        while let Some(next) = events
            .iter()
            .find(|e| e.causation_id() == Some(walk[walk.len() - 1].id()))
        {
            walk.push(next);
        }
        let names: Vec<&str> = walk.iter().map(|e| e.name()).collect();
        assert_eq!(names, expected_chain(order_id), "order {order_id}");
        assert_eq!(
            walk.len(),
            events.len(),
            "order {order_id}: a chain with a branch"
        );
    }
    // No event outside the six chains.
    assert_eq!(chained, summary.published.len());

    // Deliveries: 2 per OrderCreated (payments, notifications) and per PaymentProcessed
    // (orders, inventory), 1 for each other event.
    assert_eq!(summary.report.handled, 6 * 2 + 4 * 2 + 13);
    assert_eq!(summary.report.failed, 0);
    assert_eq!(summary.report.panics, 0);
}

#[tokio::test(start_paused = true)]
async fn order_flow_on_one_thread() {
    let summary = run(Bus::builder().record(true), sample_orders())
        .await
        .unwrap();
    check(&summary);
}

/// On several threads the topics race each other (an `InventoryReserved` may be handled before
/// its `PaymentProcessed`); the outcome must not depend on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_flow_on_many_threads() {
    for _ in 0..20 {
        let summary = run(Bus::builder().record(true), sample_orders())
            .await
            .unwrap();
        check(&summary);
    }
}

/// Without recording, the flow is the same; there is just nothing to inspect.
#[tokio::test]
async fn order_flow_without_recording() {
    let summary = run(Bus::builder(), sample_orders()).await.unwrap();
    assert!(summary.published.is_empty());
    assert_eq!(
        summary.orders[&4],
        cancelled_because("refunded: monitor out of stock")
    );
    assert_eq!(summary.notifications.len(), 6);
}
