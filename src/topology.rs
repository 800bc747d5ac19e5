//! What a running bus is made of and what flows through it: [`Topology`], from
//! [`Bus::topology`](crate::Bus::topology).
//!
//! The parts come from the builder: topics, consumer groups (with the event types each handles)
//! and command handlers. The flows come from the running system: which event types each group,
//! command handler or the application outside any handler has published, and which commands
//! each has sent. A flow appears once it happened at least once since the bus was built, so a
//! topology taken after a test run or after some time in production shows the paths that
//! events really took, not the ones the code could take.
//!
//! Render it as a [Mermaid](https://mermaid.js.org) flowchart with
//! [`to_mermaid`](Topology::to_mermaid), or serve it as JSON (it is [`Serialize`]).
//! Everything in it is sorted, so equal systems give equal output.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The parts of a bus and the flows seen between them. See [the module](self).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Topology {
    /// Every topic: configured, subscribed to, or published to. Sorted by name.
    pub topics: Vec<TopicInfo>,
    /// Every consumer group. Sorted by name.
    pub groups: Vec<GroupInfo>,
    /// Every command handler. Sorted by command name.
    pub commands: Vec<CommandInfo>,
    /// What the application published and requested from outside any handler
    /// ([`Bus::publish`](crate::Bus::publish), [`Bus::request`](crate::Bus::request), …).
    pub external: Flows,
}

/// A topic of the bus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TopicInfo {
    /// The topic's name.
    pub name: String,
    /// Its number of partitions.
    pub partitions: u32,
    /// Whether its events are kept in a [store](crate::BusBuilder::store).
    pub durable: bool,
    /// The event types known on it: those a group subscribes to by type, and those seen
    /// published. Sorted.
    pub events: Vec<String>,
}

/// A consumer group: one subscription and its handler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// The module the group belongs to, if it was declared in one.
    pub module: Option<String>,
    /// The topics it consumes: one, or several for an [event set](crate::EventSet) spanning
    /// topics (in order per topic only). Sorted.
    pub topics: Vec<String>,
    /// The handler's Rust type name.
    pub handler: String,
    /// The event types it handles, by [`Event::NAME`](crate::Event::NAME). Empty when it
    /// handles [`every_type`](GroupInfo::every_type). Sorted.
    pub events: Vec<String>,
    /// Whether it handles every event type of its topic
    /// ([`subscribe_all`](crate::BusBuilder::subscribe_all)).
    pub every_type: bool,
    /// What its handler published and requested ([`Context::publish`](crate::Context::publish),
    /// [`Context::request`](crate::Context::request), …).
    pub flows: Flows,
}

/// A command type and its one handler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CommandInfo {
    /// The command's Rust type name.
    pub name: String,
    /// The handler's Rust type name.
    pub handler: String,
    /// The module the handler belongs to, if it was declared in one.
    pub module: Option<String>,
    /// Who sent this command. Sorted.
    pub requested_by: Vec<Source>,
    /// What the handler published and requested.
    pub flows: Flows,
}

/// What one source (a group's handler, a command handler, or the application) was seen doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Flows {
    /// The event types it published. Sorted.
    pub publishes: Vec<EventType>,
    /// The command types it sent, by Rust type name. Sorted.
    pub requests: Vec<String>,
}

impl Flows {
    /// Whether nothing was seen.
    pub fn is_empty(&self) -> bool {
        self.publishes.is_empty() && self.requests.is_empty()
    }
}

/// An event type, and the topic it is published on.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventType {
    /// The topic, [`Event::TOPIC`](crate::Event::TOPIC).
    pub topic: String,
    /// The type's name, [`Event::NAME`](crate::Event::NAME).
    pub name: String,
}

/// Who published an event or sent a command.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The application, outside any handler.
    External,
    /// The handler of a consumer group, by the group's name.
    Group(String),
    /// The handler of a command, by the command's Rust type name.
    Command(String),
}

impl Topology {
    /// The topology as a Mermaid flowchart (`flowchart LR`): topics, groups (inside a
    /// subgraph per module), command handlers and the application; an edge from a topic to each
    /// group that consumes it, labelled with the event types the group handles, an edge from
    /// each source to the topics it published to, and to the command handlers it sent
    /// requests to. Rust type names are shortened to their last path segment.
    ///
    /// Node ids are generated (`t0`, `g0`, `c0`, `m0`, `app`), and names are quoted and
    /// escaped, so any topic, group or type name gives a valid diagram.
    ///
    /// ```
    /// use tidings::topology::Topology;
    ///
    /// let empty = Topology::default();
    /// assert_eq!(empty.to_mermaid(), "flowchart LR\n");
    /// ```
    pub fn to_mermaid(&self) -> String {
        Mermaid::new(self).render()
    }
}

/// Node ids of one rendering.
struct Mermaid<'a> {
    topology: &'a Topology,
    topics: BTreeMap<&'a str, String>,
    commands: BTreeMap<&'a str, String>,
    out: String,
}

impl<'a> Mermaid<'a> {
    fn new(topology: &'a Topology) -> Self {
        let mut topics = BTreeMap::new();
        let mut names: Vec<&str> = topology.topics.iter().map(|t| t.name.as_str()).collect();
        // Topics named only by flows (not expected: the bus lists every topic it knows).
        let flows = std::iter::once(&topology.external)
            .chain(topology.groups.iter().map(|g| &g.flows))
            .chain(topology.commands.iter().map(|c| &c.flows));
        for flow in flows {
            names.extend(flow.publishes.iter().map(|e| e.topic.as_str()));
        }
        names.extend(
            topology
                .groups
                .iter()
                .flat_map(|g| g.topics.iter().map(String::as_str)),
        );
        for name in names {
            let next = format!("t{}", topics.len());
            topics.entry(name).or_insert(next);
        }
        let mut commands = BTreeMap::new();
        for (i, command) in topology.commands.iter().enumerate() {
            commands.insert(command.name.as_str(), format!("c{i}"));
        }
        Mermaid {
            topology,
            topics,
            commands,
            out: String::from("flowchart LR\n"),
        }
    }

    fn render(mut self) -> String {
        let t = self.topology;
        if !t.external.is_empty() {
            self.line(format_args!("app([\"application\"])"));
        }
        for (name, id) in &self.topics {
            let mut text = escape(name);
            if let Some(info) = t.topics.iter().find(|i| i.name == *name) {
                let unit = if info.partitions == 1 {
                    "partition"
                } else {
                    "partitions"
                };
                let _ = write!(text, "<br/>{} {unit}", info.partitions);
                if info.durable {
                    text.push_str(", durable");
                }
            }
            let _ = writeln!(self.out, "    {id}[(\"{text}\")]");
        }
        // Groups and command handlers, by module (`None` first, outside any subgraph).
        let mut modules: BTreeMap<Option<&str>, Vec<String>> = BTreeMap::new();
        for (i, group) in t.groups.iter().enumerate() {
            let node = format!(
                "g{i}[\"{}<br/>{}\"]",
                escape(&group.name),
                escape(&short(&group.handler))
            );
            modules
                .entry(group.module.as_deref())
                .or_default()
                .push(node);
        }
        for (i, command) in t.commands.iter().enumerate() {
            let node = format!(
                "c{i}[[\"{}<br/>{}\"]]",
                escape(&short(&command.name)),
                escape(&short(&command.handler))
            );
            modules
                .entry(command.module.as_deref())
                .or_default()
                .push(node);
        }
        let mut subgraphs = 0;
        for (module, nodes) in &modules {
            match module {
                None => {
                    for node in nodes {
                        self.line(format_args!("{node}"));
                    }
                }
                Some(name) => {
                    self.line(format_args!("subgraph m{subgraphs}[\"{}\"]", escape(name)));
                    subgraphs += 1;
                    for node in nodes {
                        self.line(format_args!("    {node}"));
                    }
                    self.line(format_args!("end"));
                }
            }
        }
        for (i, group) in t.groups.iter().enumerate() {
            for name in &group.topics {
                let label = if group.every_type {
                    String::from("every type")
                } else {
                    // Of a group over several topics, the types of this one (a type belongs to
                    // one topic, and the topic lists the types subscribed to on it).
                    let on_topic = t
                        .topics
                        .iter()
                        .find(|info| info.name == *name)
                        .filter(|_| group.topics.len() > 1);
                    let events: Vec<&str> = group
                        .events
                        .iter()
                        .filter(|e| on_topic.is_none_or(|info| info.events.contains(e)))
                        .map(String::as_str)
                        .collect();
                    events.join(", ")
                };
                let topic = &self.topics[name.as_str()];
                let _ = writeln!(self.out, "    {topic} -->|\"{}\"| g{i}", escape(&label));
            }
        }
        self.flows("app", &t.external);
        for (i, group) in t.groups.iter().enumerate() {
            self.flows(&format!("g{i}"), &group.flows);
        }
        for (i, command) in t.commands.iter().enumerate() {
            self.flows(&format!("c{i}"), &command.flows);
        }
        self.out
    }

    /// The edges of what `from` published and requested.
    fn flows(&mut self, from: &str, flows: &Flows) {
        for event in &flows.publishes {
            let topic = &self.topics[event.topic.as_str()];
            let _ = writeln!(
                self.out,
                "    {from} -->|\"publishes {}\"| {topic}",
                escape(&event.name)
            );
        }
        for command in &flows.requests {
            // A command with no handler has no node: it is not drawn.
            if let Some(to) = self.commands.get(command.as_str()) {
                let _ = writeln!(
                    self.out,
                    "    {from} -->|\"requests {}\"| {to}",
                    escape(&short(command))
                );
            }
        }
    }

    fn line(&mut self, line: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.out, "    {line}");
    }
}

/// `text` for inside a quoted Mermaid label: the characters that would end the label or be
/// read as markup are written as Mermaid entity codes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '#' => out.push_str("#35;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '&' => out.push_str("#amp;"),
            '|' => out.push_str("#124;"),
            '`' => out.push_str("#96;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A Rust type name without its module paths: `app::orders::Handler<app::Order>` gives
/// `Handler<Order>`.
fn short(type_name: &str) -> String {
    let mut out = String::with_capacity(type_name.len());
    // Where the path being written began in `out`.
    let mut start = 0;
    let mut chars = type_name.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            out.truncate(start);
        } else {
            out.push(c);
            if !(c.is_alphanumeric() || c == '_') {
                start = out.len();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_lose_their_paths() {
        assert_eq!(short("app::orders::Handler"), "Handler");
        assert_eq!(short("Handler"), "Handler");
        assert_eq!(
            short("app::Handler<app::x::Order, alloc::vec::Vec<u8>>"),
            "Handler<Order, Vec<u8>>"
        );
        assert_eq!(short("&'static str"), "&'static str");
        assert_eq!(short("(a::B, c::D)"), "(B, D)");
    }

    #[test]
    fn labels_cannot_break_out_of_their_quotes() {
        let text = escape("a\"b<c>|#&`\n");
        assert_eq!(text, "a#quot;b#lt;c#gt;#124;#35;#amp;#96; ");
        for c in ['"', '<', '>', '|', '`', '\n'] {
            assert!(!text.contains(c), "{c:?} left in {text}");
        }
    }
}
