//! [`Bus::topology`]: the builder's groups and command handlers, and the flows the core saw.

use std::collections::{BTreeMap, BTreeSet};

use super::{Bus, BusBuilder};
use crate::core::seen::{Sighting, Sightings, SourceName};
use crate::topology::{CommandInfo, EventType, Flows, GroupInfo, Source, TopicInfo, Topology};

/// What the topology knows from the builder: every group and command handler, without flows.
pub(crate) struct Layout {
    groups: Vec<GroupInfo>,
    commands: Vec<CommandInfo>,
    /// Per subscription: its topic and the event types it takes there.
    handled: Vec<(String, Vec<String>)>,
}

impl BusBuilder {
    /// The groups and command handlers as the topology shows them, and the sources the core
    /// tells apart. The one place that reads the subscriptions' and command handlers' specs
    /// for it.
    pub(super) fn layout(&self) -> (Layout, Sightings) {
        // A group whose event set spans topics is one spec per topic: one entry here.
        let mut groups: Vec<GroupInfo> = Vec::new();
        for sub in &self.subs {
            let events = sub.accepts.iter().flatten().map(|m| m.name.to_owned());
            if let Some(group) = groups.iter_mut().find(|g| g.name == sub.options.group) {
                group.topics = sorted(group.topics.drain(..).chain([sub.topic.clone()]));
                group.events = sorted(group.events.drain(..).chain(events));
                continue;
            }
            groups.push(GroupInfo {
                name: sub.options.group.clone(),
                module: sub.module.clone(),
                topics: vec![sub.topic.clone()],
                handler: sub.handler_name.to_owned(),
                events: sorted(events),
                every_type: sub.accepts.is_none(),
                flows: Flows::default(),
            });
        }
        let commands: Vec<CommandInfo> = self
            .commands
            .iter()
            .map(|cmd| CommandInfo {
                name: cmd.name.to_owned(),
                handler: cmd.handler_name.to_owned(),
                module: cmd.module.clone(),
                requested_by: Vec::new(),
                flows: Flows::default(),
            })
            .collect();
        let sources = self
            .subs
            .iter()
            .map(|sub| SourceName::Group(sub.options.group.clone()))
            .chain(self.commands.iter().map(|c| SourceName::Command(c.name)));
        let sightings = Sightings::new(sources, self.commands.iter().map(|c| c.type_id));
        let handled = self
            .subs
            .iter()
            .map(|sub| {
                let names = sub.accepts.iter().flatten().map(|m| m.name.to_owned());
                (sub.topic.clone(), names.collect())
            })
            .collect();
        (
            Layout {
                groups,
                commands,
                handled,
            },
            sightings,
        )
    }
}

impl Bus {
    /// The parts of this bus and the flows seen between them: its topics, its consumer groups
    /// with the event types each handles, its command handlers, and which event types each
    /// group, command handler and the application (outside any handler) has published, and
    /// which commands each has sent, since the bus was built. See
    /// [`topology`](crate::topology) for how to render it.
    ///
    /// Flows are seen as they happen: a handler that has not run yet has published nothing.
    /// Taken after a test has [settled](Bus::settled), it shows what the test exercised.
    ///
    /// # Examples
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use tidings::{Bus, Context, Envelope, Event, Handler, HandlerError};
    ///
    /// #[derive(Serialize, Deserialize, Event)]
    /// #[event(topic = "orders", key = order_id)]
    /// struct OrderPlaced { order_id: u64 }
    ///
    /// #[derive(Serialize, Deserialize, Event)]
    /// #[event(topic = "payments", key = order_id)]
    /// struct PaymentTaken { order_id: u64 }
    ///
    /// struct Billing;
    /// impl Handler<OrderPlaced> for Billing {
    ///     async fn handle(&mut self, e: &Envelope<OrderPlaced>, ctx: &Context) -> Result<(), HandlerError> {
    ///         ctx.publish(PaymentTaken { order_id: e.event().order_id }).await?;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let bus = Bus::builder()
    ///     .subscribe::<OrderPlaced, _>("billing", || Billing)
    ///     .build()
    ///     .unwrap();
    /// bus.publish(OrderPlaced { order_id: 1 }).await.unwrap();
    /// bus.settled().await;
    ///
    /// let topology = bus.topology();
    /// let billing = &topology.groups[0];
    /// assert_eq!(billing.events, ["OrderPlaced"]);
    /// assert_eq!(billing.flows.publishes[0].name, "PaymentTaken");
    /// assert_eq!(topology.external.publishes[0].name, "OrderPlaced");
    /// // A diagram to paste into Markdown (```mermaid), or JSON for an operator endpoint:
    /// assert!(topology.to_mermaid().contains(r#"-->|"publishes PaymentTaken"|"#));
    /// let json = serde_json::to_string(&topology).unwrap();
    /// # assert!(json.contains("PaymentTaken"));
    /// # bus.shutdown().await; }
    /// ```
    pub fn topology(&self) -> Topology {
        let inner = &*self.inner;
        let mut groups = inner.layout.groups.clone();
        let mut commands = inner.layout.commands.clone();
        let mut external = Flows::default();
        let mut topic_events: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for sub in &inner.layout.handled {
            let events = topic_events.entry(sub.0.clone()).or_default();
            events.extend(sub.1.iter().cloned());
        }
        let mut requested = Vec::new();
        for (source, sighting) in inner.sightings.snapshot() {
            let (flows, from) = match &source {
                SourceName::External => (Some(&mut external), Source::External),
                SourceName::Group(name) => (
                    groups
                        .iter_mut()
                        .find(|g| g.name == *name)
                        .map(|g| &mut g.flows),
                    Source::Group(name.clone()),
                ),
                SourceName::Command(name) => (
                    commands
                        .iter_mut()
                        .find(|c| c.name == *name)
                        .map(|c| &mut c.flows),
                    Source::Command((*name).to_owned()),
                ),
            };
            let Some(flows) = flows else { continue };
            match sighting {
                Sighting::Published { topic, event } => {
                    topic_events
                        .entry(topic.to_owned())
                        .or_default()
                        .insert(event.to_owned());
                    flows.publishes.push(EventType {
                        topic: topic.to_owned(),
                        name: event.to_owned(),
                    });
                }
                Sighting::Requested { command } => {
                    flows.requests.push(command.to_owned());
                    requested.push((command, from));
                }
            }
        }
        for (command, from) in requested {
            if let Some(c) = commands.iter_mut().find(|c| c.name == command) {
                c.requested_by.push(from);
            }
        }
        let durable = inner.append.is_some();
        let topics = inner
            .all_topics()
            .iter()
            .map(|t| TopicInfo {
                name: t.name.clone(),
                partitions: t.partitions.len() as u32,
                durable,
                events: topic_events
                    .remove(&t.name)
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            })
            .collect();
        let mut topology = Topology {
            topics,
            groups,
            commands,
            external,
        };
        tidy(&mut topology);
        topology
    }
}

/// Everything sorted, each flow once: equal systems give equal topologies.
fn tidy(t: &mut Topology) {
    fn flows(f: &mut Flows) {
        f.publishes.sort();
        f.publishes.dedup();
        f.requests.sort();
        f.requests.dedup();
    }
    t.topics.sort_by(|a, b| a.name.cmp(&b.name));
    t.groups.sort_by(|a, b| a.name.cmp(&b.name));
    t.commands.sort_by(|a, b| a.name.cmp(&b.name));
    flows(&mut t.external);
    for group in &mut t.groups {
        flows(&mut group.flows);
    }
    for command in &mut t.commands {
        flows(&mut command.flows);
        command.requested_by.sort();
        command.requested_by.dedup();
    }
}

fn sorted(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut items: Vec<String> = items.into_iter().collect();
    items.sort();
    items.dedup();
    items
}
