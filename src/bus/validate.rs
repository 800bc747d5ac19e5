//! Build-time checks of a [`BusBuilder`]'s settings: invalid configuration is a
//! [`BuildError`], never a surprise at run time.

use std::collections::HashSet;

use super::BusBuilder;
use crate::error::BuildError;
use crate::event::validate_topic_name;
use crate::store::Retention;
use crate::topic::Overflow;

impl BusBuilder {
    /// Settings that need a store, and settings a store rules out.
    pub(super) fn validate_store(&self) -> Result<(), BuildError> {
        let durable = self.store.is_some();
        // `start_from` / `reset_to` without a store are allowed: the same module code runs on
        // the in-memory bus, where a group has every event since the bus was built.
        if durable {
            for sub in &self.subs {
                let pinned = self
                    .topics
                    .iter()
                    .any(|c| c.name == sub.topic && c.partitions.is_some());
                if !pinned {
                    return Err(BuildError::InvalidSetting(format!(
                        "topic {:?}: with a store, give it a partition count (BusBuilder::topic(TopicConfig::new({:?}).partitions(n))): the default follows the machine's cores, and a durable topic's partitions must not change between runs",
                        sub.topic, sub.topic
                    )));
                }
            }
        }
        for config in &self.topics {
            if !durable && config.retention != Retention::KeepAll {
                return Err(BuildError::InvalidSetting(format!(
                    "topic {:?}: retention needs a store (BusBuilder::store)",
                    config.name
                )));
            }
            if durable && config.overflow == Overflow::DropOldest {
                return Err(BuildError::InvalidSetting(format!(
                    "topic {:?}: Overflow::DropOldest has no use with a store: a group whose queue is full reads what it missed from the log, nothing is dropped",
                    config.name
                )));
            }
        }
        if durable {
            if self.max_payload == 0 {
                return Err(BuildError::InvalidSetting(
                    "max_payload must be at least 1 byte".into(),
                ));
            }
            if self.commit_interval.is_zero() || self.retention_interval.is_zero() {
                return Err(BuildError::InvalidSetting(
                    "commit_interval and retention_interval must be above zero".into(),
                ));
            }
            if self.poll_interval.is_zero() {
                return Err(BuildError::InvalidSetting(
                    "poll_interval must be above zero".into(),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), BuildError> {
        let mut seen = HashSet::new();
        for config in &self.topics {
            validate_topic_name(&config.name)
                .map_err(|reason| BuildError::InvalidTopicName { reason })?;
            if config.partitions == Some(0) {
                return Err(BuildError::ZeroPartitions {
                    topic: config.name.clone(),
                });
            }
            if config.capacity == 0 {
                return Err(BuildError::ZeroCapacity {
                    topic: config.name.clone(),
                });
            }
            match config.retention {
                Retention::MaxAge(age) if age.is_zero() => {
                    return Err(BuildError::InvalidSetting(format!(
                        "topic {:?}: Retention::MaxAge must be above zero (zero deletes every event as soon as it is written)",
                        config.name
                    )))
                }
                Retention::MaxEvents(0) => {
                    return Err(BuildError::InvalidSetting(format!(
                        "topic {:?}: Retention::MaxEvents must be at least 1 (zero deletes every event as soon as it is written)",
                        config.name
                    )))
                }
                _ => {}
            }
            if !seen.insert(config.name.as_str()) {
                return Err(BuildError::DuplicateTopic {
                    topic: config.name.clone(),
                });
            }
        }
        // A group name belongs to one registration (a set spanning topics is one spec per topic).
        let mut groups = std::collections::HashMap::new();
        for sub in &self.subs {
            let group = &sub.options.group;
            if validate_topic_name(group).is_err() {
                return Err(BuildError::InvalidSubscriptionName {
                    group: group.clone(),
                });
            }
            validate_topic_name(&sub.topic)
                .map_err(|reason| BuildError::InvalidTopicName { reason })?;
            if *groups.entry(group.as_str()).or_insert(sub.registration) != sub.registration {
                return Err(BuildError::DuplicateSubscription {
                    group: group.clone(),
                });
            }
            let members = sub.accepts.as_deref().unwrap_or_default();
            for (i, member) in members.iter().enumerate() {
                if members[..i].iter().any(|m| m.type_id == member.type_id) {
                    return Err(BuildError::InvalidSetting(format!(
                        "subscription {group:?}: event type {} is named twice in its set",
                        member.name
                    )));
                }
            }
        }
        let mut modules = HashSet::new();
        for module in &self.modules {
            if validate_topic_name(module).is_err() {
                return Err(BuildError::InvalidSetting(format!(
                    "invalid module name {module:?}: use 1 to 249 ASCII letters, digits, '.', '_' or '-'"
                )));
            }
            if !modules.insert(module.as_str()) {
                return Err(BuildError::DuplicateModule {
                    module: module.clone(),
                });
            }
        }
        let mut commands = HashSet::new();
        for cmd in &self.commands {
            if !commands.insert(cmd.type_id) {
                return Err(BuildError::DuplicateCommandHandler { command: cmd.name });
            }
            if cmd.instances == 0 {
                return Err(BuildError::InvalidSetting(format!(
                    "command handler of {}: instances must be at least 1",
                    cmd.name
                )));
            }
        }
        if self.request_timeout.is_zero() {
            return Err(BuildError::InvalidSetting(
                "request_timeout must be above zero (every request would time out)".into(),
            ));
        }
        if self.command_capacity == 0 {
            return Err(BuildError::InvalidSetting(
                "command_capacity must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
