//! Payloads at the store boundary: serializing events, reading rows back through upcasters.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::time::{Duration, SystemTime};

use super::StoredEvent;
use crate::envelope::{AnyEnvelope, Headers, Metadata};
use crate::event::{DynEvent, Event};

/// Serializes `event` as JSON, as a store keeps it; an error if it is larger than `limit` bytes,
/// or if the bytes do not deserialize back into `E`.
///
/// The round trip is what makes a committed event readable by every group: a payload a group
/// reading the log (catch-up, replay, restart) could not turn back into the event must never be
/// committed. serde_json writes a non-finite float (`NaN`, `±inf`) as `null`, which does not
/// read back as an `f64`; a hand-written `Serialize` that disagrees with its `Deserialize`
/// is caught the same way. Deserializing is enough (nothing is compared, `Event` has no
/// `PartialEq`): the reader deserializes exactly so (typetag hands the payload to `E`'s own
/// `Deserialize`). Only the durable path pays for it; a bus without a store serializes
/// nothing.
pub(crate) fn encode<E: Event>(event: &E, limit: usize) -> Result<Vec<u8>, EncodeError> {
    let payload = serde_json::to_vec(event).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if payload.len() > limit {
        return Err(EncodeError::TooLarge {
            size: payload.len(),
        });
    }
    if let Err(e) = serde_json::from_slice::<E>(&payload) {
        return Err(EncodeError::Serialize(format!(
            "{} serializes to JSON that does not deserialize back ({e}), so no group could read it from the store; JSON has no NaN or infinity (serde_json writes them as null): keep float fields finite",
            E::NAME
        )));
    }
    Ok(payload)
}

pub(crate) enum EncodeError {
    TooLarge { size: usize },
    Serialize(String),
}

/// `headers` as one JSON text: an array of `[name, value]` pairs, in order (what the SQL stores
/// keep in their `headers` column). [`headers_from_json`] reads it back.
///
/// ```
/// use tidings::store::driver::{headers_from_json, headers_to_json};
/// use tidings::Headers;
///
/// let headers = Headers::new().with("tenant", "acme");
/// let json = headers_to_json(&headers);
/// assert_eq!(json, r#"[["tenant","acme"]]"#);
/// assert_eq!(headers_from_json(&json).unwrap(), headers);
/// ```
pub fn headers_to_json(headers: &Headers) -> String {
    let pairs: Vec<(&str, &str)> = headers.iter().collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
}

/// Headers written by [`headers_to_json`], read back.
///
/// # Errors
///
/// Why the text is not such JSON. A backend reading a row keeps the text instead, under the
/// [`UNREADABLE_HEADERS`] header: the bus then dead-letters the row.
pub fn headers_from_json(json: &str) -> Result<Headers, String> {
    let pairs: Vec<(String, String)> =
        serde_json::from_str(json).map_err(|e| format!("headers: {e}"))?;
    let mut headers = Headers::new();
    for (n, v) in pairs {
        headers.insert(n, v);
    }
    Ok(headers)
}

/// A `&'static str` equal to `name`, allocated once per distinct name (topic names of rows read
/// back: [`Metadata::topic`] is static).
pub(crate) fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<parking_lot::Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock();
    match names.get(name) {
        Some(s) => s,
        None => {
            let s: &'static str = Box::leak(name.to_owned().into_boxed_str());
            names.insert(s);
            s
        }
    }
}

/// Why an [`Upcaster`] could not convert a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UpcastError(pub String);

impl UpcastError {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        UpcastError(message.to_string())
    }
}

type UpcastFn = dyn Fn(Value) -> Result<Value, UpcastError> + Send + Sync;

/// Turns a stored payload of one version of an event type into the next version, when a row is
/// read back from a store. Register them with
/// [`BusBuilder::upcaster`](crate::BusBuilder::upcaster): a row of version 1 read by a bus whose
/// type is at version 3 goes through the upcasters from 1 and from 2.
///
/// The articles' example: `OrderCreated` v2 added a currency, and every order before it was in
/// euros.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tidings::store::Upcaster;
/// use tidings::{Bus, Event};
///
/// #[derive(Serialize, Deserialize, Event)]
/// #[event(topic = "orders", key = order_id, version = 2)]
/// struct OrderCreated { order_id: u64, total_cents: u64, currency: String }
///
/// // Version 1 as it was written.
/// #[derive(Deserialize)]
/// struct OrderCreatedV1 { order_id: u64, total_cents: u64 }
///
/// let v1_to_v2 = Upcaster::typed("OrderCreated", 1, |old: OrderCreatedV1| OrderCreated {
///     order_id: old.order_id,
///     total_cents: old.total_cents,
///     currency: "EUR".into(),
/// });
/// // The same on the JSON value:
/// let same = Upcaster::new("OrderCreated", 1, |mut v| {
///     v["currency"] = "EUR".into();
///     Ok(v)
/// });
/// # let _ = (same, Bus::builder().upcaster(v1_to_v2));
/// ```
#[derive(Clone)]
pub struct Upcaster {
    pub(crate) name: String,
    pub(crate) from_version: u32,
    pub(crate) f: Arc<UpcastFn>,
}

impl Upcaster {
    /// Converts the JSON payload of version `from_version` of the event type `name` into version
    /// `from_version + 1`.
    pub fn new(
        name: impl Into<String>,
        from_version: u32,
        f: impl Fn(Value) -> Result<Value, UpcastError> + Send + Sync + 'static,
    ) -> Self {
        Upcaster {
            name: name.into(),
            from_version,
            f: Arc::new(f),
        }
    }

    /// Converts version `from_version` of `name`, deserialized as `Old`, into version
    /// `from_version + 1` (`New`, serialized again).
    pub fn typed<Old, New>(
        name: impl Into<String>,
        from_version: u32,
        f: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> Self
    where
        Old: DeserializeOwned,
        New: Serialize,
    {
        Self::new(name, from_version, move |v| {
            let old: Old = serde_json::from_value(v).map_err(UpcastError::new)?;
            serde_json::to_value(f(old)).map_err(UpcastError::new)
        })
    }
}

impl fmt::Debug for Upcaster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcaster")
            .field("name", &self.name)
            .field("from_version", &self.from_version)
            .finish_non_exhaustive()
    }
}

/// A row that could not be turned back into an event: what a consumer group's dead-letter queue
/// holds in its place, with the error as the entry's error.
///
/// ```no_run
/// # async fn f(bus: tidings::Bus) -> Result<(), tidings::dead_letter::DeadLetterError> {
/// for entry in bus.dead_letters("billing")?.list() {
///     if let Some(raw) = entry.envelope.downcast_ref::<tidings::store::Undecodable>() {
///         eprintln!("{} v{} could not be read: {}", raw.name, raw.version, entry.error);
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undecodable {
    /// The stored type name.
    pub name: String,
    /// The stored version.
    pub version: u32,
    /// The stored payload, as text (lossy if it is not UTF-8).
    pub payload: String,
}

impl Event for Undecodable {
    const TOPIC: &'static str = "tidings.undecodable";
    const NAME: &'static str = "tidings.Undecodable";
    const VERSION: u32 = 1;
    fn key(&self) -> Option<crate::Key<'_>> {
        None
    }
}
crate::register_event!(Undecodable);

/// What reading a row back gave.
pub(crate) enum Decoded {
    Event(AnyEnvelope),
    /// The row in an [`Undecodable`] envelope, and why.
    Failed(AnyEnvelope, String),
}

/// Reads rows back: upcasters by (type name, version), then typetag.
#[derive(Default)]
pub(crate) struct Decoder {
    upcasters: HashMap<(String, u32), Arc<UpcastFn>>,
}

impl Decoder {
    pub(crate) fn new(upcasters: Vec<Upcaster>) -> Result<Self, String> {
        let mut map = HashMap::new();
        for u in upcasters {
            let key = (u.name.clone(), u.from_version);
            if map.insert(key, u.f).is_some() {
                return Err(format!(
                    "two upcasters for {} from version {}",
                    u.name, u.from_version
                ));
            }
        }
        Ok(Decoder { upcasters: map })
    }

    pub(crate) fn decode(&self, row: &StoredEvent) -> Decoded {
        let headers = row.headers.clone();
        let meta = Metadata {
            id: row.id,
            topic: intern(&row.topic),
            partition: row.partition,
            offset: row.offset,
            timestamp: row.timestamp,
            correlation_id: row.correlation_id,
            causation_id: row.causation_id,
            headers,
        };
        match self.decode_event(row) {
            Ok(event) => Decoded::Event(event.__into_envelope(meta)),
            Err(error) => {
                let raw = Undecodable {
                    name: row.name.clone(),
                    version: row.version,
                    payload: String::from_utf8_lossy(&row.payload).into_owned(),
                };
                let boxed: Box<dyn DynEvent> = Box::new(raw);
                Decoded::Failed(boxed.__into_envelope(meta), error)
            }
        }
    }

    fn decode_event(&self, row: &StoredEvent) -> Result<Box<dyn DynEvent>, String> {
        if let Some(errors) = row.headers.get(UNREADABLE_ROW) {
            return Err(format!("the stored row cannot be read: {errors}"));
        }
        if let Some(raw) = row.headers.get(UNREADABLE_HEADERS) {
            return Err(format!("the stored headers are not valid JSON: {raw:?}"));
        }
        let (name, mut version) = (row.name.as_str(), row.version);
        if name == Undecodable::NAME {
            // The bus's own placeholder for a row it could not read: never an event to handle.
            return Err(format!(
                "{name:?} is the name of the bus's placeholder for unreadable rows, not of an event type"
            ));
        }
        let mut upcast: Option<Value> = None;
        while let Some(f) = (!self.upcasters.is_empty())
            .then(|| self.upcasters.get(&(name.to_owned(), version)))
            .flatten()
        {
            let value = match upcast.take() {
                Some(v) => v,
                None => serde_json::from_slice(&row.payload)
                    .map_err(|e| format!("{name} v{version}: the payload is not JSON: {e}"))?,
            };
            upcast =
                Some(f(value).map_err(|e| {
                    format!("{name}: the upcaster from version {version} failed: {e}")
                })?);
            version += 1;
        }
        // typetag's externally tagged form: {"<name>": <payload>}.
        let tagged = match &upcast {
            Some(v) => {
                let mut map = serde_json::Map::new();
                map.insert(name.to_owned(), v.clone());
                serde_json::to_vec(&map).map_err(|e| format!("{name}: {e}"))?
            }
            None => {
                let key = serde_json::to_string(name).map_err(|e| format!("{name}: {e}"))?;
                let mut buf = Vec::with_capacity(key.len() + row.payload.len() + 3);
                buf.push(b'{');
                buf.extend_from_slice(key.as_bytes());
                buf.push(b':');
                buf.extend_from_slice(&row.payload);
                buf.push(b'}');
                buf
            }
        };
        let event: Box<dyn DynEvent> = serde_json::from_slice(&tagged).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("unknown variant") {
                format!("unknown event type {name:?} (v{version}): no such type is registered")
            } else {
                format!("{name} v{version}: the payload does not deserialize: {msg}")
            }
        })?;
        let info = event.event_info();
        if info.topic != row.topic {
            // A registered type, but of another topic: no group of this topic consumes it.
            return Err(format!(
                "{name} is an event type of topic {:?}, not of topic {:?} whose log holds it",
                info.topic, row.topic
            ));
        }
        let current = info.version;
        if current != version {
            return Err(format!(
                "{name}: the stored version {} reads as version {version}, but the type is at version {current} and no upcaster goes from version {version}",
                row.version
            ));
        }
        Ok(event)
    }
}

/// The row of an event already in an envelope (a dead letter to save): its payload serialized
/// again; an [`Undecodable`] one keeps the row it came from.
pub(crate) fn stored_event_of(env: &AnyEnvelope) -> Result<StoredEvent, String> {
    let meta = env.metadata();
    let (name, version, payload) = match env.downcast_ref::<Undecodable>() {
        Some(raw) => (
            raw.name.clone(),
            raw.version,
            raw.payload.clone().into_bytes(),
        ),
        None => {
            let info = env.event().event_info();
            (info.name.to_owned(), info.version, env.event().__to_json()?)
        }
    };
    Ok(StoredEvent {
        topic: meta.topic.to_owned(),
        partition: meta.partition,
        offset: meta.offset,
        id: meta.id,
        name,
        version,
        timestamp: meta.timestamp,
        correlation_id: meta.correlation_id,
        causation_id: meta.causation_id,
        headers: meta.headers.clone(),
        payload,
    })
}

/// The header a row gets when its stored headers are not valid JSON (with them as its value):
/// like [`UNREADABLE_ROW`], the decoder refuses it, so each group reading it dead-letters it as
/// an [`Undecodable`] and goes on.
pub const UNREADABLE_HEADERS: &str = "tidings.unreadable-headers";

/// The header a row gets when some of its columns cannot be read (a value of the wrong type or
/// out of range, which SQLite's loose typing lets in), with why as its value: like
/// [`UNREADABLE_HEADERS`], the decoder refuses it, so each group reading it dead-letters it as
/// an [`Undecodable`] and goes on.
pub const UNREADABLE_ROW: &str = "tidings.unreadable-row";

/// The place of a row in the log, read from its columns: without it the row cannot even be
/// dead-lettered (or skipped), so a value that cannot be read is corruption.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn position(
    topic: Result<String, sqlx::Error>,
    partition: Result<i64, sqlx::Error>,
    offset: Result<i64, sqlx::Error>,
) -> Result<(String, u32, u64), super::StoreError> {
    let corrupt = |what: String| super::StoreError::Corrupt(what);
    let topic =
        topic.map_err(|e| corrupt(format!("a row's topic cannot be read: {}", cause(&e))))?;
    let partition = partition
        .map_err(|e| cause(&e))
        .and_then(|p| u32::try_from(p).map_err(|_| format!("{p} is not a partition number")))
        .map_err(|e| {
            corrupt(format!(
                "a row of {topic:?} has an unreadable partition: {e}"
            ))
        })?;
    let offset = offset
        .map_err(|e| cause(&e))
        .and_then(|o| u64::try_from(o).map_err(|_| format!("{o} is not an offset")))
        .map_err(|e| {
            corrupt(format!(
                "a row of {topic:?} partition {partition} has an unreadable offset: {e}"
            ))
        })?;
    Ok((topic, partition, offset))
}

/// A number that gives a place in the log (a head, a committed offset, a partition count), as a
/// query read it: a value that does not decode or does not fit in `T` (a negative offset, say)
/// is [`StoreError::Corrupt`](super::StoreError::Corrupt) data, naming `what`; any other error is
/// the store's ([`StoreError::Backend`](super::StoreError::Backend)).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn place<T: TryFrom<i64>>(
    value: Result<Option<i64>, sqlx::Error>,
    what: impl FnOnce() -> String,
) -> Result<Option<T>, super::StoreError> {
    let corrupt = |why: String| super::StoreError::Corrupt(format!("{}: {why}", what()));
    match value {
        Ok(None) => Ok(None),
        Ok(Some(v)) => T::try_from(v)
            .map(Some)
            .map_err(|_| corrupt(format!("{v} is out of range"))),
        Err(e @ (sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_))) => {
            Err(corrupt(cause(&e)))
        }
        Err(e) => Err(super::StoreError::backend(e)),
    }
}

/// Why a column could not be read (sqlx's own message without its "error occurred while
/// decoding column" preamble: the column is named already).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn cause(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::ColumnDecode { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Reads the other columns of a row one by one: a column that cannot be read (or holds an
/// integer out of its range) is remembered and a placeholder takes its place, so that one broken
/// row becomes a dead letter instead of failing the whole read.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[derive(Default)]
pub(crate) struct Columns {
    errors: Vec<String>,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl Columns {
    /// The column's value, or its type's default if it cannot be read.
    pub(crate) fn get<T: Default>(&mut self, column: &str, value: Result<T, sqlx::Error>) -> T {
        value.unwrap_or_else(|e| {
            self.errors.push(format!("column {column}: {}", cause(&e)));
            T::default()
        })
    }

    /// An integer column whose values must fit in `T` (a version, a count): 0 in its place if
    /// it does not.
    pub(crate) fn int<T>(&mut self, column: &str, value: Result<i64, sqlx::Error>) -> T
    where
        T: TryFrom<i64> + Default,
    {
        let value = self.get(column, value.map(Some)).map(|v| {
            T::try_from(v).map_err(|_| {
                format!(
                    "column {column}: {v} is out of range for {}",
                    std::any::type_name::<T>()
                )
            })
        });
        match value {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                self.errors.push(e);
                T::default()
            }
            None => T::default(),
        }
    }

    /// A time column in microseconds since the Unix epoch (the epoch in its place if it cannot
    /// be read or is out of range).
    pub(crate) fn time(&mut self, column: &str, value: Result<i64, sqlx::Error>) -> SystemTime {
        match self.get(column, value.map(Some)) {
            Some(us) => checked_from_micros(us).unwrap_or_else(|| {
                self.errors.push(format!(
                    "column {column}: {us} µs is out of range for a time"
                ));
                SystemTime::UNIX_EPOCH
            }),
            None => SystemTime::UNIX_EPOCH,
        }
    }

    /// The headers column, stored as JSON. Headers that are text but not JSON are kept under
    /// [`UNREADABLE_HEADERS`].
    pub(crate) fn headers(&mut self, value: Result<&str, sqlx::Error>) -> Headers {
        match value {
            Ok(json) => headers_from_json(json)
                .unwrap_or_else(|_| Headers::new().with(UNREADABLE_HEADERS, json)),
            Err(e) => {
                self.errors.push(format!("column headers: {}", cause(&e)));
                Headers::new()
            }
        }
    }

    /// What could not be read, if anything.
    pub(crate) fn errors(&self) -> Option<String> {
        (!self.errors.is_empty()).then(|| self.errors.join("; "))
    }

    /// The row, marked [`UNREADABLE_ROW`] if a column could not be read.
    pub(crate) fn finish(&self, mut event: StoredEvent) -> StoredEvent {
        if let Some(errors) = self.errors() {
            event.headers.insert(UNREADABLE_ROW, errors);
        }
        event
    }
}

/// The dead letters of `group` whose place in the log could be read. One that cannot be placed
/// is left in the store, with an error logged: it must not keep every other dead letter of the
/// group from being restored (and the group from starting).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn placed_dead_letters(
    group: &str,
    records: impl Iterator<Item = Result<super::DeadLetterRecord, super::StoreError>>,
) -> Vec<super::DeadLetterRecord> {
    records
        .filter_map(|record| {
            record
                .map_err(|error| {
                    tracing::error!(group, %error, "tidings: a dead letter in the store cannot be placed in its topic's log; it is left in the store and not restored");
                })
                .ok()
        })
        .collect()
}

/// `t` in microseconds since the Unix epoch (negative before it), as the SQL stores keep times.
/// [`checked_from_micros`] turns it back.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tidings::store::driver::{checked_from_micros, micros};
///
/// let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
/// assert_eq!(micros(t), 1_700_000_000_123_456);
/// assert_eq!(checked_from_micros(micros(t)), Some(t));
/// ```
pub fn micros(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// `us` microseconds from the Unix epoch, if a [`SystemTime`] can hold it: the inverse of
/// [`micros`]. `None` for a value out of the platform's range (a backend reading a time column
/// should then mark the row [`UNREADABLE_ROW`]).
pub fn checked_from_micros(us: i64) -> Option<SystemTime> {
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(d)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(d)
    }
}
