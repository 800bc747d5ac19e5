//! Events: the [`Event`] trait, its object-safe twin [`DynEvent`], and partition [`Key`]s.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A fact that happened, published on a topic and handled by consumer groups.
///
/// Events are plain serde types. Implement this trait with `#[derive(Event)]`, which also registers
/// the type with [`typetag`] so that a heterogeneous stream of events can be stored and read back
/// as `Box<dyn DynEvent>`.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidings::Event;
///
/// #[derive(Debug, Clone, Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id, version = 2)]
/// struct OrderCreated {
///     order_id: u64,
///     total_cents: u64,
///     currency: String,
/// }
///
/// assert_eq!(OrderCreated::TOPIC, "orders");
/// assert_eq!(OrderCreated::NAME, "OrderCreated");
/// assert_eq!(OrderCreated::VERSION, 2);
/// let e = OrderCreated { order_id: 7, total_cents: 100, currency: "EUR".into() };
/// assert_eq!(e.key(), Some(tidings::Key::U64(7)));
/// ```
///
/// # Derive attributes
///
/// | attribute | meaning | default |
/// |---|---|---|
/// | `topic = "orders"` | topic the event is published on; `[A-Za-z0-9._-]`, at most 249 bytes, no leading/trailing `.` | required |
/// | `key = field` | field whose value picks the partition (any [`AsKey`] type) | none: round-robin, no order promise |
/// | `key_fn = path` | a `fn(&Self) -> Key<'_>` computing the key instead | |
/// | `version = 2` | schema version of the payload | `1` |
/// | `name = "orders.OrderCreated"` | stable type name used when stored | the type's identifier |
///
/// Manual implementations must also register the type with typetag; use
/// [`register_event!`](crate::register_event) for that.
pub trait Event: DynEvent + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Name of the topic this event is published on.
    const TOPIC: &'static str;
    /// Stable name of this event type (what a store records as the type).
    const NAME: &'static str;
    /// Schema version of this event type.
    const VERSION: u32;

    /// The partition key. Events with equal keys land on the same partition and are handled in
    /// publish order within every consumer group. `None` spreads events round-robin.
    fn key(&self) -> Option<Key<'_>>;
}

/// The object-safe view of an [`Event`], registered with [`typetag`].
///
/// `Box<dyn DynEvent>` serializes with its type name (`{"OrderCreated": {...}}`) and deserializes
/// back into the right Rust type. Subscriptions to every type of a topic
/// ([`AnyHandler`](crate::AnyHandler)) receive an [`AnyEnvelope`](crate::AnyEnvelope), whose
/// `event()` is a `&dyn DynEvent`; use `downcast_ref` (on `dyn DynEvent` or on the envelope)
/// to get the concrete type back.
///
/// Implemented by `#[derive(Event)]`; do not implement it by hand.
#[typetag::serde]
pub trait DynEvent: Any + Send + Sync {
    /// Topic, type name, version and key of this event.
    fn event_info(&self) -> EventInfo<'_>;
    /// This event as `&dyn Any`, to downcast.
    fn as_any(&self) -> &dyn Any;
    /// This event in an envelope with `meta` (how a row read back from a store becomes an event
    /// of its own Rust type).
    #[doc(hidden)]
    fn __into_envelope(self: Box<Self>, meta: crate::Metadata) -> crate::AnyEnvelope;
    /// This event's payload as a store keeps it (JSON).
    #[doc(hidden)]
    fn __to_json(&self) -> Result<Vec<u8>, String>;
}

impl dyn DynEvent {
    /// The concrete event, if it is an `E`.
    pub fn downcast_ref<E: Event>(&self) -> Option<&E> {
        self.as_any().downcast_ref::<E>()
    }

    /// Whether this event is an `E`.
    pub fn is<E: Event>(&self) -> bool {
        self.as_any().is::<E>()
    }
}

impl fmt::Debug for dyn DynEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.event_info();
        f.debug_struct("DynEvent")
            .field("topic", &info.topic)
            .field("name", &info.name)
            .field("version", &info.version)
            .field("key", &info.key)
            .finish_non_exhaustive()
    }
}

/// What [`DynEvent::event_info`] returns: the static metadata of an event and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventInfo<'a> {
    /// Topic name.
    pub topic: &'static str,
    /// Event type name.
    pub name: &'static str,
    /// Schema version.
    pub version: u32,
    /// Partition key, if any.
    pub key: Option<Key<'a>>,
}

impl<'a> EventInfo<'a> {
    /// The info of a typed event.
    pub fn of<E: Event>(event: &'a E) -> Self {
        EventInfo {
            topic: E::TOPIC,
            name: E::NAME,
            version: E::VERSION,
            key: event.key(),
        }
    }
}

/// A partition key: what decides which partition an event lands on.
///
/// Keys hash with a stable function (XXH3, seed 0) over a canonical byte form, so the same key
/// always picks the same partition for a given partition count, across runs and machines.
/// Integers hash by their little-endian bytes, strings by their UTF-8 bytes; `Str` and `Owned`
/// with equal text (and `Bytes` and `OwnedBytes` with equal bytes) hash alike, so they pick the
/// same partition, though they do not compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key<'a> {
    /// A borrowed string key.
    Str(&'a str),
    /// An owned string key (from a `key_fn` that computes one).
    Owned(String),
    /// Raw bytes.
    Bytes(&'a [u8]),
    /// Owned raw bytes.
    OwnedBytes(Vec<u8>),
    /// An unsigned integer.
    U64(u64),
    /// A signed integer.
    I64(i64),
}

impl Key<'_> {
    /// The stable 64-bit hash of this key.
    ///
    /// ```
    /// use tidings::Key;
    /// assert_eq!(Key::Str("order-1").stable_hash(), Key::Owned("order-1".into()).stable_hash());
    /// ```
    pub fn stable_hash(&self) -> u64 {
        use xxhash_rust::xxh3::xxh3_64;
        // No allocation here: this runs on every publish.
        match self {
            Key::Str(s) => xxh3_64(s.as_bytes()),
            Key::Owned(s) => xxh3_64(s.as_bytes()),
            Key::Bytes(b) => xxh3_64(b),
            Key::OwnedBytes(b) => xxh3_64(b),
            Key::U64(n) => xxh3_64(&n.to_le_bytes()),
            Key::I64(n) => xxh3_64(&n.to_le_bytes()),
        }
    }

    /// The canonical bytes the hash is taken over.
    fn canonical(&self) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        match self {
            Key::Str(s) => Cow::Borrowed(s.as_bytes()),
            Key::Owned(s) => Cow::Borrowed(s.as_bytes()),
            Key::Bytes(b) => Cow::Borrowed(b),
            Key::OwnedBytes(b) => Cow::Borrowed(b),
            Key::U64(n) => Cow::Owned(n.to_le_bytes().to_vec()),
            Key::I64(n) => Cow::Owned(n.to_le_bytes().to_vec()),
        }
    }

    /// The canonical bytes, owned; keys that hash alike give equal bytes.
    pub(crate) fn canonical_bytes(&self) -> Vec<u8> {
        self.canonical().into_owned()
    }

    /// The partition this key maps to among `partitions` partitions.
    ///
    /// # Panics
    ///
    /// Panics if `partitions` is zero.
    pub fn partition(&self, partitions: u32) -> u32 {
        (self.stable_hash() % u64::from(partitions)) as u32
    }

    /// This key with its borrow turned into an owned value.
    pub fn into_owned(self) -> Key<'static> {
        match self {
            Key::Str(s) => Key::Owned(s.to_owned()),
            Key::Owned(s) => Key::Owned(s),
            Key::Bytes(b) => Key::OwnedBytes(b.to_vec()),
            Key::OwnedBytes(b) => Key::OwnedBytes(b),
            Key::U64(n) => Key::U64(n),
            Key::I64(n) => Key::I64(n),
        }
    }
}

impl fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Str(s) => f.write_str(s),
            Key::Owned(s) => f.write_str(s),
            Key::Bytes(b) => write!(f, "{}", String::from_utf8_lossy(b)),
            Key::OwnedBytes(b) => write!(f, "{}", String::from_utf8_lossy(b)),
            Key::U64(n) => write!(f, "{n}"),
            Key::I64(n) => write!(f, "{n}"),
        }
    }
}

/// A value usable as a partition key: what `#[event(key = field)]` requires of the field.
pub trait AsKey {
    /// This value as a [`Key`].
    fn as_key(&self) -> Key<'_>;
}

impl<T: AsKey + ?Sized> AsKey for &T {
    fn as_key(&self) -> Key<'_> {
        (**self).as_key()
    }
}

impl AsKey for str {
    fn as_key(&self) -> Key<'_> {
        Key::Str(self)
    }
}

impl AsKey for String {
    fn as_key(&self) -> Key<'_> {
        Key::Str(self)
    }
}

impl AsKey for Cow<'_, str> {
    fn as_key(&self) -> Key<'_> {
        Key::Str(self)
    }
}

impl AsKey for [u8] {
    fn as_key(&self) -> Key<'_> {
        Key::Bytes(self)
    }
}

impl AsKey for Vec<u8> {
    fn as_key(&self) -> Key<'_> {
        Key::Bytes(self)
    }
}

impl AsKey for uuid::Uuid {
    fn as_key(&self) -> Key<'_> {
        Key::Bytes(self.as_bytes())
    }
}

macro_rules! unsigned_keys {
    ($($t:ty),*) => {$(
        impl AsKey for $t {
            fn as_key(&self) -> Key<'_> {
                Key::U64(*self as u64)
            }
        }
    )*};
}
macro_rules! signed_keys {
    ($($t:ty),*) => {$(
        impl AsKey for $t {
            fn as_key(&self) -> Key<'_> {
                Key::I64(*self as i64)
            }
        }
    )*};
}
unsigned_keys!(u8, u16, u32, u64, usize);
signed_keys!(i8, i16, i32, i64, isize);

/// Checks a topic name: non-empty, at most 249 bytes, only `[A-Za-z0-9._-]`, no leading or
/// trailing `.` and no `..` (a NATS subject token may not be empty).
///
/// The derive checks this at compile time; the bus checks names given at runtime.
pub(crate) fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name.len() > 249 {
        return Err(format!(
            "topic name is {} bytes long; at most 249 are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(format!(
            "topic name {name:?} has an empty '.'-separated segment"
        ));
    }
    Ok(())
}

/// Registers a hand-written [`Event`] implementation with typetag (what `#[derive(Event)]` does
/// for you).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidings::{Event, Key};
///
/// #[derive(Serialize, Deserialize)]
/// struct Ping { n: u32 }
///
/// impl Event for Ping {
///     const TOPIC: &'static str = "pings";
///     const NAME: &'static str = "Ping";
///     const VERSION: u32 = 1;
///     fn key(&self) -> Option<Key<'_>> { None }
/// }
/// tidings::register_event!(Ping);
/// ```
#[macro_export]
macro_rules! register_event {
    ($ty:ty) => {
        const _: () = {
            use $crate::__private::typetag;
            #[typetag::serde(name = <$ty as $crate::Event>::NAME)]
            impl $crate::DynEvent for $ty {
                fn event_info(&self) -> $crate::EventInfo<'_> {
                    $crate::EventInfo::of(self)
                }
                fn as_any(&self) -> &dyn ::std::any::Any {
                    self
                }
                fn __into_envelope(
                    self: ::std::boxed::Box<Self>,
                    meta: $crate::Metadata,
                ) -> $crate::AnyEnvelope {
                    $crate::__private::into_envelope(*self, meta)
                }
                fn __to_json(
                    &self,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    $crate::__private::to_json(self)
                }
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_validated() {
        assert!(validate_topic_name("orders").is_ok());
        assert!(validate_topic_name("orders.v2_x-y").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("a b").is_err());
        assert!(validate_topic_name("a*").is_err());
        assert!(validate_topic_name(".a").is_err());
        assert!(validate_topic_name("a..b").is_err());
        assert!(validate_topic_name(&"x".repeat(250)).is_err());
    }

    #[test]
    fn keys_hash_by_canonical_bytes() {
        // The golden partition values are pinned in tests/pubsub/ordering.rs.
        assert_eq!(
            Key::Str("order-1").stable_hash(),
            xxhash_rust::xxh3::xxh3_64(b"order-1")
        );
        assert_eq!(
            Key::Str("a").stable_hash(),
            Key::Owned("a".into()).stable_hash()
        );
        assert_eq!(7u8.as_key(), 7u64.as_key());
        assert_eq!((-7i32).as_key(), Key::I64(-7));
        assert_eq!(String::from("k").as_key(), Key::Str("k"));
        let id = uuid::Uuid::now_v7();
        let owned = id.as_key().into_owned();
        assert_eq!(
            owned.stable_hash(),
            id.as_key().stable_hash(),
            "owning keeps the key"
        );
    }
}
