//! The first step of [`BusBuilder::build`](crate::BusBuilder::build): which topics the bus has,
//! how many partitions each, and which group takes which slot of which topic.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::Arc;

use super::BusBuilder;
use crate::core::queue::Topic;
use crate::error::BuildError;
use crate::topic::{default_partitions, Overflow, TopicConfig};

/// Topics and group slots, planned from the builder's settings.
pub(super) struct Plan {
    /// Configured topics first, then those only subscribed to, in declaration order.
    pub(super) configs: Vec<TopicConfig>,
    pub(super) topics: Vec<Arc<Topic>>,
    pub(super) topic_index: HashMap<String, usize>,
    /// Per topic index: typed slots by event type, and the slots of `subscribe_all` groups.
    pub(super) typed_slots: HashMap<(usize, TypeId), Vec<usize>>,
    pub(super) any_slots: Vec<Vec<usize>>,
    /// (subscription index, topic index, slot) of every subscription.
    pub(super) placements: Vec<(usize, usize, usize)>,
}

impl BusBuilder {
    pub(super) fn plan(&self) -> Result<Plan, BuildError> {
        let mut configs: Vec<TopicConfig> = self.topics.clone();
        for sub in &self.subs {
            if !configs.iter().any(|c| c.name == sub.topic) {
                configs.push(TopicConfig::new(sub.topic.clone()));
            }
        }
        let mut topics = Vec::with_capacity(configs.len());
        let mut topic_index = HashMap::new();
        let mut typed_slots: HashMap<(usize, TypeId), Vec<usize>> = HashMap::new();
        let mut any_slots = Vec::with_capacity(configs.len());
        let mut placements = Vec::with_capacity(self.subs.len());
        for (index, config) in configs.iter().enumerate() {
            let mut groups = Vec::new();
            let mut anys = Vec::new();
            for (sub_index, sub) in self.subs.iter().enumerate() {
                if sub.topic != config.name {
                    continue;
                }
                if sub.options.redelivery.is_some() && config.overflow == Overflow::DropOldest {
                    return Err(BuildError::InvalidSetting(format!(
                        "subscription {:?}: redelivery on topic {:?}, whose Overflow::DropOldest could drop a redelivered event",
                        sub.options.group, config.name
                    )));
                }
                let slot = groups.len();
                groups.push(sub.options.group.clone());
                match &sub.accepts {
                    Some(members) => {
                        for member in members {
                            typed_slots
                                .entry((index, member.type_id))
                                .or_default()
                                .push(slot);
                        }
                    }
                    None => anys.push(slot),
                }
                placements.push((sub_index, index, slot));
            }
            let partitions = config.partitions.unwrap_or_else(|| {
                if self.store.is_some() {
                    1
                } else {
                    default_partitions()
                }
            });
            if let Some(stored) = self
                .store
                .as_ref()
                .and_then(|s| s.known_partitions(&config.name))
            {
                if stored > partitions {
                    return Err(BuildError::FewerPartitionsThanStored {
                        topic: config.name.clone(),
                        configured: partitions,
                        stored,
                    });
                }
            }
            topics.push(Arc::new(Topic::new(config, partitions, groups)));
            topic_index.insert(config.name.clone(), index);
            any_slots.push(anys);
        }

        Ok(Plan {
            configs,
            topics,
            topic_index,
            typed_slots,
            any_slots,
            placements,
        })
    }
}
