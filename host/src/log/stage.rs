//! Which stage refused what a dead letter holds.

/// The stage that refused a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The decode plugin refused a frame (or the frame was too large).
    Decode,
    /// A transform refused a record.
    Transform,
}

impl Stage {
    /// The label value and the `sluice.stage` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Transform => "transform",
        }
    }
}

/// A refused input on its way to the dead letters: the stage and the plugin (`name@version`, or
/// empty) that refused it, the source it came from, why, and its bytes as they were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetter<'a> {
    /// The stage that refused it.
    pub stage: Stage,
    /// The source's id (the Kafka key of a decode dead letter).
    pub source_id: u32,
    /// The source's name.
    pub source: &'a str,
    /// The plugin that refused it (empty when no plugin is bound).
    pub plugin: &'a str,
    /// Why.
    pub reason: &'a str,
    /// The frame or record as it was read.
    pub bytes: &'a [u8],
}
