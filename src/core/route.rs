//! Where a publish goes: the topic, the partition of its key, and the group slots of its type.

use std::any::TypeId;
use std::sync::Arc;
use std::time::SystemTime;

use super::queue::{Partition, Topic};
use super::seen::{SourceId, SourceSet};
use super::Core;
use crate::envelope::new_id;
use crate::event::Event;
use crate::topic::{default_partitions, TopicConfig};

/// One group's queue of one partition of one topic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct QueueId {
    /// The topic's address, only compared.
    pub(crate) topic: usize,
    pub(crate) slot: usize,
    pub(crate) partition: u32,
}

impl QueueId {
    pub(crate) fn of(topic: &Arc<Topic>, slot: usize, partition: u32) -> Self {
        QueueId {
            topic: Arc::as_ptr(topic) as usize,
            slot,
            partition,
        }
    }
}

pub(crate) struct Route {
    pub(crate) topic: Arc<Topic>,
    pub(crate) slots: Box<[usize]>,
    /// The sources seen publishing this type (see `core::seen`).
    pub(crate) seen: SourceSet,
}

pub(crate) enum RouteRef<'a> {
    Static(&'a Route),
    Dynamic(Arc<Route>),
}

impl std::ops::Deref for RouteRef<'_> {
    type Target = Route;
    fn deref(&self) -> &Route {
        match self {
            RouteRef::Static(r) => r,
            RouteRef::Dynamic(r) => r,
        }
    }
}

/// The route, partition, id and time of an event about to be published.
pub(crate) struct Placement<'a> {
    pub(crate) route: RouteRef<'a>,
    pub(crate) partition: u32,
    pub(crate) id: uuid::Uuid,
    pub(crate) timestamp: SystemTime,
}

impl Placement<'_> {
    #[inline]
    pub(crate) fn partition(&self) -> &Partition {
        &self.route.topic.partitions[self.partition as usize]
    }

    pub(crate) fn restamp(&mut self) {
        self.timestamp = SystemTime::now();
        self.id = new_id(self.timestamp);
    }
}

impl Core {
    #[inline]
    pub(crate) fn route<E: Event>(&self) -> RouteRef<'_> {
        let type_id = TypeId::of::<E>();
        if let Some(route) = self.routes.get(&type_id) {
            return RouteRef::Static(route);
        }
        if let Some(route) = self.dynamic_routes.get(&type_id) {
            return RouteRef::Dynamic(Arc::clone(&route));
        }
        self.new_route::<E>(type_id)
    }

    /// The route of a type first published since the bus was built: computed and kept once per
    /// type (under the map's entry lock, so two first publishers agree). A type no group takes
    /// is logged here, so once per type per bus, whatever the number of its events.
    #[cold]
    fn new_route<E: Event>(&self, type_id: TypeId) -> RouteRef<'_> {
        let entry = self.dynamic_routes.entry(type_id).or_insert_with(|| {
                let route = self.compute_route(E::TOPIC, type_id);
                if route.slots.is_empty() {
                    let kept = if self.append.is_some() {
                        "appended to the store's log, but no group of this bus handles them"
                    } else {
                        "accepted and numbered, but no group handles them: they are dropped"
                    };
                    tracing::warn!(
                        topic = E::TOPIC,
                        event_type = E::NAME,
                        "tidings: {} is published on topic {:?}, where no consumer group subscribes to it: its events are {kept} (counted in TopicStats::unrouted; a typo in a topic name?). Logged once per type.",
                        E::NAME,
                        E::TOPIC,
                    );
                }
                Arc::new(route)
            });
        RouteRef::Dynamic(Arc::clone(entry.value()))
    }

    pub(crate) fn compute_route(&self, topic: &str, type_id: TypeId) -> Route {
        match self.topic_index.get(topic) {
            Some(&index) => {
                let mut slots: Vec<usize> = self
                    .typed_slots
                    .get(&(index, type_id))
                    .cloned()
                    .unwrap_or_default();
                slots.extend(&self.any_slots[index]);
                slots.sort_unstable();
                Route {
                    topic: Arc::clone(&self.topics[index]),
                    slots: slots.into_boxed_slice(),
                    seen: SourceSet::new(self.sightings.len()),
                }
            }
            None => {
                let topic = self
                    .unsubscribed_topics
                    .entry(topic.to_owned())
                    .or_insert_with(|| {
                        let config = TopicConfig::new(topic);
                        // With a store, a fixed count: it must not change between runs.
                        let partitions = if self.append.is_some() {
                            1
                        } else {
                            default_partitions()
                        };
                        Arc::new(Topic::new(&config, partitions, Vec::new()))
                    })
                    .clone();
                Route {
                    topic,
                    slots: Box::new([]),
                    seen: SourceSet::new(self.sightings.len()),
                }
            }
        }
    }

    /// Where an event goes and what it is called: computed before the partition lock.
    /// `source` is who publishes it (see `core::seen`).
    #[inline]
    pub(crate) fn place<E: Event>(&self, event: &E, source: SourceId) -> Placement<'_> {
        let route = self.route::<E>();
        self.saw_publish::<E>(&route, source);
        let partition = route.topic.partition_for(event.key());
        let timestamp = SystemTime::now();
        Placement {
            route,
            partition,
            id: new_id(timestamp),
            timestamp,
        }
    }
}
