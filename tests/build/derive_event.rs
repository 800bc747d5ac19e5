//! `#[derive(Event)]`: generated constants and keys, typetag registration, compile errors.

use serde::{Deserialize, Serialize};
use tidings::{DynEvent, Event, Key};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "orders", key = order_id, version = 2)]
struct OrderCreated {
    order_id: u64,
    total_cents: u64,
    currency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "customers.v1", key = customer)]
struct CustomerRenamed {
    customer: String,
    new_name: String,
}

fn shipment_key(e: &ShipmentDispatched) -> Key<'_> {
    Key::Owned(format!("{}/{}", e.warehouse, e.parcel))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "shipments", key_fn = shipment_key)]
struct ShipmentDispatched {
    warehouse: String,
    parcel: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "audit_log-1")]
struct Heartbeat {
    at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "payments", name = "payments.PaymentCaptured", version = 3)]
struct PaymentCaptured {
    amount: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "accounts", key = 0)]
struct AccountClosed(i32, String);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(topic = "lights")]
enum LightSwitched {
    On,
    Off { dimmed: bool },
}

#[test]
fn struct_with_integer_key_and_version() {
    assert_eq!(OrderCreated::TOPIC, "orders");
    assert_eq!(OrderCreated::NAME, "OrderCreated");
    assert_eq!(OrderCreated::VERSION, 2);
    let e = OrderCreated {
        order_id: 7,
        total_cents: 100,
        currency: "EUR".into(),
    };
    assert_eq!(e.key(), Some(Key::U64(7)));
    let info = (&e as &dyn DynEvent).event_info();
    assert_eq!(info.topic, "orders");
    assert_eq!(info.name, "OrderCreated");
    assert_eq!(info.version, 2);
    assert_eq!(info.key, Some(Key::U64(7)));
}

#[test]
fn string_key_borrows_the_field() {
    assert_eq!(CustomerRenamed::TOPIC, "customers.v1");
    assert_eq!(CustomerRenamed::VERSION, 1);
    let e = CustomerRenamed {
        customer: "c-42".into(),
        new_name: "Ada".into(),
    };
    assert_eq!(e.key(), Some(Key::Str("c-42")));
}

#[test]
fn key_fn_computes_the_key() {
    let e = ShipmentDispatched {
        warehouse: "ams".into(),
        parcel: 9,
    };
    assert_eq!(e.key(), Some(Key::Owned("ams/9".into())));
    assert_eq!(
        e.key().unwrap().stable_hash(),
        Key::Str("ams/9").stable_hash()
    );
}

#[test]
fn no_key_means_none() {
    assert_eq!(Heartbeat::TOPIC, "audit_log-1");
    assert_eq!(Heartbeat::NAME, "Heartbeat");
    assert_eq!(Heartbeat::VERSION, 1);
    assert_eq!(Heartbeat { at_ms: 1 }.key(), None);
}

#[test]
fn custom_name() {
    assert_eq!(PaymentCaptured::NAME, "payments.PaymentCaptured");
    assert_eq!(PaymentCaptured::VERSION, 3);
    let b: Box<dyn DynEvent> = Box::new(PaymentCaptured { amount: -5 });
    let json = serde_json::to_string(&b).unwrap();
    assert_eq!(json, r#"{"payments.PaymentCaptured":{"amount":-5}}"#);
}

#[test]
fn tuple_struct_key_by_index() {
    assert_eq!(AccountClosed::TOPIC, "accounts");
    assert_eq!(AccountClosed(-3, "x".into()).key(), Some(Key::I64(-3)));
}

#[test]
fn enum_without_key() {
    assert_eq!(LightSwitched::TOPIC, "lights");
    assert_eq!(LightSwitched::NAME, "LightSwitched");
    assert_eq!(LightSwitched::On.key(), None);
    assert_eq!(LightSwitched::Off { dimmed: true }.key(), None);
}

#[test]
fn typetag_round_trip() -> Result<(), serde_json::Error> {
    let ev = OrderCreated {
        order_id: 7,
        total_cents: 1999,
        currency: "EUR".into(),
    };
    let b: Box<dyn DynEvent> = Box::new(ev.clone());
    let json = serde_json::to_string(&b)?;
    assert_eq!(
        json,
        r#"{"OrderCreated":{"order_id":7,"total_cents":1999,"currency":"EUR"}}"#
    );
    let back: Box<dyn DynEvent> = serde_json::from_str(&json)?;
    assert!(back.is::<OrderCreated>());
    assert!(!back.is::<Heartbeat>());
    assert_eq!(back.downcast_ref::<OrderCreated>(), Some(&ev));

    let light: Box<dyn DynEvent> = Box::new(LightSwitched::Off { dimmed: false });
    let back: Box<dyn DynEvent> = serde_json::from_str(&serde_json::to_string(&light)?)?;
    assert_eq!(
        back.downcast_ref::<LightSwitched>(),
        Some(&LightSwitched::Off { dimmed: false })
    );
    Ok(())
}

#[test]
fn compile_errors() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
