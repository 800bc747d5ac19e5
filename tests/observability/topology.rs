//! `Bus::topology`: the parts of a running bus (topics, groups and the types they handle,
//! command handlers) and the flows seen at run time (who published which event type, who sent
//! which command), as data, as JSON and as a Mermaid diagram.
//!
//! Each test installs a thread-local tracing subscriber first and runs its bus on a
//! current-thread runtime, on the thread of that subscriber (see `main.rs` for why this binary
//! asks that of its tests).

use std::future::Future;
use std::marker::PhantomData;

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::store::MemoryStore;
use tidings::topology::{EventType, Source, Topology};

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "shop.orders", key = id, name = "topology.OrderPlaced")]
struct OrderPlaced {
    id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "shop.payments", key = id, name = "topology.PaymentTaken")]
struct PaymentTaken {
    id: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "shop.stock", key = id, name = "topology.StockReserved")]
struct StockReserved {
    id: u64,
}

/// Published by the application only, on the topic "ledger" reads whole.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "shop.payments", key = id, name = "topology.Refund")]
struct Refund {
    id: u64,
}

struct ReserveStock {
    id: u64,
}
impl Command for ReserveStock {
    type Reply = bool;
}

/// Never sent.
struct Audit;
impl Command for Audit {
    type Reply = ();
}

/// Takes an order: reserves its stock with a request, then takes the payment.
struct Billing;
impl Handler<OrderPlaced> for Billing {
    async fn handle(&mut self, e: &Envelope<OrderPlaced>, ctx: &Context) -> HandlerResult {
        let id = e.event().id;
        if ctx
            .request(ReserveStock { id })
            .await
            .map_err(HandlerError::msg)?
        {
            ctx.publish(PaymentTaken { id }).await?;
        }
        Ok(())
    }
}

/// Answers `ReserveStock`, and says so with an event.
struct Warehouse;
impl CommandHandler<ReserveStock> for Warehouse {
    async fn handle(&mut self, cmd: ReserveStock, ctx: &Context) -> Result<bool, HandlerError> {
        ctx.publish(StockReserved { id: cmd.id }).await?;
        Ok(true)
    }
}

/// Handles `Audit` (never sent).
struct Auditor;
impl CommandHandler<Audit> for Auditor {
    async fn handle(&mut self, _: Audit, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Reads every type of a topic. Generic, so that its type name has `<` and `>` to escape.
struct Ledger<T>(PhantomData<T>);
impl<T: Send + 'static> AnyHandler for Ledger<T> {
    async fn handle(&mut self, _: &AnyEnvelope, _: &Context) -> HandlerResult {
        Ok(())
    }
}

/// The shop: "billing" takes orders (requesting stock, publishing payments), "ledger" reads
/// every payment-topic event, the warehouse answers stock requests.
fn shop(builder: BusBuilder) -> Bus {
    builder
        .topic(TopicConfig::new("shop.orders").partitions(2))
        .topic(TopicConfig::new("shop.payments").partitions(1))
        .topic(TopicConfig::new("shop.stock").partitions(1))
        .subscribe::<OrderPlaced, _>("billing", || Billing)
        .subscribe_all("shop.payments", "ledger", || Ledger::<u8>(PhantomData))
        .command_handler::<ReserveStock, _>(|| Warehouse)
        .command_handler::<Audit, _>(|| Auditor)
        .build()
        .unwrap()
}

/// Runs `test` on a current-thread runtime, under a thread-local subscriber.
fn run<F: Future>(test: impl FnOnce() -> F) -> F::Output {
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(test())
}

fn event(topic: &str, name: &str) -> EventType {
    EventType {
        topic: topic.into(),
        name: name.into(),
    }
}

fn reserve_stock() -> String {
    std::any::type_name::<ReserveStock>().to_owned()
}

#[test]
fn the_topology_lists_what_each_group_handles_and_what_it_was_seen_publishing_and_requesting() {
    let topology = run(|| async {
        let bus = shop(Bus::builder());
        let before = bus.topology();
        bus.publish(OrderPlaced { id: 1 }).await.unwrap();
        bus.publish(OrderPlaced { id: 2 }).await.unwrap();
        bus.settled().await;
        let after = bus.topology();
        bus.shutdown().await;
        (before, after)
    });
    let (before, after) = topology;

    // Before anything ran: the parts, no flows.
    assert!(before.external.is_empty());
    assert!(before.groups.iter().all(|g| g.flows.is_empty()));
    assert!(before.commands.iter().all(|c| c.requested_by.is_empty()));

    let names: Vec<&str> = after.topics.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["shop.orders", "shop.payments", "shop.stock"]);
    assert_eq!(
        before.topics.len(),
        3,
        "configured topics are there from the start"
    );
    assert!(
        before.topics[2].events.is_empty(),
        "nobody subscribes to shop.stock's types, and nothing was published there yet"
    );
    assert_eq!(after.topics[2].events, ["topology.StockReserved"]);
    assert_eq!(after.topics[0].partitions, 2);
    assert!(!after.topics[0].durable);
    assert_eq!(after.topics[1].events, ["topology.PaymentTaken"]);

    let billing = &after.groups[0];
    assert_eq!(billing.name, "billing");
    assert_eq!(billing.topics, ["shop.orders"]);
    assert_eq!(billing.handler, std::any::type_name::<Billing>());
    assert_eq!(billing.events, ["topology.OrderPlaced"]);
    assert!(!billing.every_type);
    assert_eq!(
        billing.flows.publishes,
        [event("shop.payments", "topology.PaymentTaken")],
        "seen once, however often it happened"
    );
    assert_eq!(billing.flows.requests, [reserve_stock()]);

    let ledger = &after.groups[1];
    assert_eq!(ledger.name, "ledger");
    assert!(ledger.every_type && ledger.events.is_empty());
    assert!(ledger.flows.is_empty(), "it publishes nothing");

    let audit = &after.commands[0];
    assert_eq!(audit.name, std::any::type_name::<Audit>());
    assert!(audit.requested_by.is_empty() && audit.flows.is_empty());
    let warehouse = &after.commands[1];
    assert_eq!(warehouse.name, reserve_stock());
    assert_eq!(warehouse.handler, std::any::type_name::<Warehouse>());
    assert_eq!(warehouse.requested_by, [Source::Group("billing".into())]);
    assert_eq!(
        warehouse.flows.publishes,
        [event("shop.stock", "topology.StockReserved")],
        "a command handler's publishes are its own"
    );

    assert_eq!(
        after.external.publishes,
        [event("shop.orders", "topology.OrderPlaced")]
    );
    assert!(after.external.requests.is_empty());
}

#[test]
fn publishes_and_requests_from_outside_any_handler_belong_to_the_application() {
    let topology = run(|| async {
        let bus = shop(Bus::builder());
        bus.try_publish(Refund { id: 1 }).unwrap();
        assert!(bus.request(ReserveStock { id: 1 }).await.unwrap());
        bus.settled().await;
        let topology = bus.topology();
        bus.shutdown().await;
        topology
    });
    assert_eq!(
        topology.external.publishes,
        [event("shop.payments", "topology.Refund")]
    );
    assert_eq!(topology.external.requests, [reserve_stock()]);
    let warehouse = &topology.commands[1];
    assert_eq!(warehouse.requested_by, [Source::External]);
    assert!(
        topology.groups.iter().all(|g| g.flows.is_empty()),
        "no handler published: {:?}",
        topology.groups
    );
    let payments = &topology.topics[1];
    assert_eq!(
        payments.events,
        ["topology.Refund"],
        "a type seen published on the topic"
    );
}

#[test]
fn a_bus_with_a_store_shows_durable_topics_and_batched_publishes() {
    let topology = run(|| async {
        let bus = shop(Bus::builder().store(MemoryStore::new()));
        assert!(bus.ready().await);
        bus.publish_all([OrderPlaced { id: 1 }, OrderPlaced { id: 2 }])
            .await
            .unwrap();
        bus.settled().await;
        let topology = bus.topology();
        bus.shutdown().await;
        topology
    });
    assert!(topology.topics.iter().all(|t| t.durable));
    assert_eq!(
        topology.external.publishes,
        [event("shop.orders", "topology.OrderPlaced")]
    );
    assert_eq!(
        topology.groups[0].flows.publishes,
        [event("shop.payments", "topology.PaymentTaken")]
    );
}

#[test]
fn the_topology_serializes_to_json_for_an_operator_endpoint() {
    let topology = run(|| async {
        let bus = shop(Bus::builder());
        bus.publish(OrderPlaced { id: 1 }).await.unwrap();
        bus.settled().await;
        let topology = bus.topology();
        bus.shutdown().await;
        topology
    });
    let json = serde_json::to_value(&topology).unwrap();
    assert_eq!(json["groups"][0]["name"], "billing");
    assert_eq!(json["groups"][0]["events"][0], "topology.OrderPlaced");
    assert_eq!(
        json["groups"][0]["flows"]["publishes"][0],
        serde_json::json!({"topic": "shop.payments", "name": "topology.PaymentTaken"})
    );
    assert_eq!(
        json["commands"][1]["requested_by"][0],
        serde_json::json!({"group": "billing"})
    );
    let back: Topology = serde_json::from_value(json).unwrap();
    assert_eq!(back, topology, "what a client reads back");
}

#[test]
fn the_mermaid_diagram_draws_topics_groups_commands_and_the_flows_seen() {
    let mermaid = run(|| async {
        let bus = shop(Bus::builder());
        bus.publish(OrderPlaced { id: 1 }).await.unwrap();
        bus.settled().await;
        let mermaid = bus.topology().to_mermaid();
        bus.shutdown().await;
        mermaid
    });
    let expected = r#"flowchart LR
    app(["application"])
    t0[("shop.orders<br/>2 partitions")]
    t1[("shop.payments<br/>1 partition")]
    t2[("shop.stock<br/>1 partition")]
    g0["billing<br/>Billing"]
    g1["ledger<br/>Ledger#lt;u8#gt;"]
    c0[["Audit<br/>Auditor"]]
    c1[["ReserveStock<br/>Warehouse"]]
    t0 -->|"topology.OrderPlaced"| g0
    t1 -->|"every type"| g1
    app -->|"publishes topology.OrderPlaced"| t0
    g0 -->|"publishes topology.PaymentTaken"| t1
    g0 -->|"requests ReserveStock"| c1
    c1 -->|"publishes topology.StockReserved"| t2
"#;
    assert_eq!(mermaid, expected, "whole diagram:\n{mermaid}");
    for line in mermaid.lines().skip(1) {
        let id: String = line
            .trim_start()
            .chars()
            .take_while(|c| *c != '[' && *c != '(' && *c != ' ')
            .collect();
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric()),
            "node ids are alphanumeric: {line}"
        );
    }
}

#[test]
fn modules_become_subgraphs_and_names_are_escaped() {
    use tidings::topology::{CommandInfo, GroupInfo, TopicInfo};

    let mut topology = Topology::default();
    let mut topic = TopicInfo::default();
    topic.name = "a.b".into();
    topic.partitions = 1;
    topic.durable = true;
    topology.topics.push(topic);
    let mut group = GroupInfo::default();
    group.name = "billing".into();
    group.module = Some("orders \"core\"".into());
    group.topics = vec!["a.b".into()];
    group.handler = "app::H<app::X>".into();
    group.events = vec!["E|1".into()];
    topology.groups.push(group);
    let mut command = CommandInfo::default();
    command.name = "app::Cmd".into();
    command.handler = "app::CmdHandler".into();
    command.module = Some("orders \"core\"".into());
    topology.commands.push(command);
    topology.groups[0].flows.requests.push("app::Cmd".into());
    topology.groups[0]
        .flows
        .requests
        .push("app::Unhandled".into());

    assert_eq!(
        topology.to_mermaid(),
        r#"flowchart LR
    t0[("a.b<br/>1 partition, durable")]
    subgraph m0["orders #quot;core#quot;"]
        g0["billing<br/>H#lt;X#gt;"]
        c0[["Cmd<br/>CmdHandler"]]
    end
    t0 -->|"E#124;1"| g0
    g0 -->|"requests Cmd"| c0
"#,
        "a request to a command without a handler has no node to go to"
    );
}
