//! `Module`: a module's groups, command handlers and topics registered together, every factory
//! given the module's state by reference; module names checked at build.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tidings::prelude::*;
use tidings::BuildError;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(topic = "modules.stock", key = sku, name = "modules.Restocked")]
struct Restocked {
    sku: u32,
    units: u32,
}

struct Units(u32);
impl Command for Units {
    type Reply = u32;
}

/// The inventory module's shared state.
#[derive(Clone, Default)]
struct Inventory {
    units: Arc<Mutex<std::collections::HashMap<u32, u32>>>,
    factories: Arc<AtomicU32>,
}

struct Restocker {
    inventory: Inventory,
}

impl Restocker {
    fn new(inventory: &Inventory) -> Self {
        inventory.factories.fetch_add(1, Ordering::Relaxed);
        Restocker {
            inventory: inventory.clone(),
        }
    }
}

impl Handler<Restocked> for Restocker {
    async fn handle(&mut self, e: &Envelope<Restocked>, _: &Context) -> HandlerResult {
        if e.event().units == 0 {
            panic!("zero units");
        }
        *self
            .inventory
            .units
            .lock()
            .unwrap()
            .entry(e.event().sku)
            .or_default() += e.event().units;
        Ok(())
    }
}

struct Audit {
    seen: Inventory,
}

impl AnyHandler for Audit {
    async fn handle(&mut self, _: &AnyEnvelope, _: &Context) -> HandlerResult {
        self.seen.factories.fetch_add(1000, Ordering::Relaxed);
        Ok(())
    }
}

struct Query {
    inventory: Inventory,
}

impl CommandHandler<Units> for Query {
    async fn handle(&mut self, sku: Units, _: &Context) -> Result<u32, HandlerError> {
        Ok(self
            .inventory
            .units
            .lock()
            .unwrap()
            .get(&sku.0)
            .copied()
            .unwrap_or(0))
    }
}

fn inventory(state: Inventory) -> Module<Inventory> {
    Module::with_state("inventory", state)
        .topic(TopicConfig::new("modules.stock").partitions(2))
        .subscribe::<Restocked, _>(
            Subscription::new("inventory.units")
                .max_deliveries(1)
                .restart_backoff(RestartBackoff::new(
                    std::time::Duration::from_millis(1),
                    std::time::Duration::from_millis(1),
                )),
            Restocker::new,
        )
        .subscribe_all("modules.stock", "inventory.audit", |s: &Inventory| Audit {
            seen: s.clone(),
        })
        .command_handler::<Units, _>(|s: &Inventory| Query {
            inventory: s.clone(),
        })
}

#[tokio::test]
async fn every_factory_of_a_module_gets_its_state_also_when_a_handler_restarts() {
    let state = Inventory::default();
    let module = inventory(state.clone());
    assert_eq!(module.name(), "inventory");
    let bus = Bus::builder().module(module).build().unwrap();
    // Two partitions: two handlers of each group made at build.
    assert_eq!(state.factories.load(Ordering::Relaxed), 2);
    bus.publish(Restocked { sku: 1, units: 5 }).await.unwrap();
    bus.publish(Restocked { sku: 1, units: 0 }).await.unwrap(); // panics, handler restarted
    bus.publish(Restocked { sku: 1, units: 2 }).await.unwrap();
    bus.settled().await;
    assert_eq!(bus.request(Units(1)).await.unwrap(), 7);
    let made = state.factories.load(Ordering::Relaxed);
    assert_eq!(
        made % 1000,
        3,
        "the restarted handler came from the factory, with the state"
    );
    assert_eq!(made / 1000, 3, "the subscribe_all group got the state too");
    bus.shutdown().await;
}

#[tokio::test]
async fn two_modules_of_one_name_or_a_bad_module_name_are_build_errors() {
    let err = Bus::builder()
        .module(Module::new("billing"))
        .module(Module::new("billing"))
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        BuildError::DuplicateModule {
            module: "billing".into()
        }
    );
    let err = Bus::builder()
        .module(Module::new("bad name"))
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, BuildError::InvalidSetting(m) if m.contains("module name")),
        "{err}"
    );
}

#[tokio::test]
async fn groups_of_two_modules_share_the_bus_namespace() {
    let err = Bus::builder()
        .module(
            Module::with_state("a", Inventory::default())
                .subscribe::<Restocked, _>("same", Restocker::new),
        )
        .module(
            Module::with_state("b", Inventory::default())
                .subscribe::<Restocked, _>("same", Restocker::new),
        )
        .build()
        .unwrap_err();
    assert_eq!(
        err,
        BuildError::DuplicateSubscription {
            group: "same".into()
        }
    );
}
