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

/// The most bytes of a dead letter's payload kept in a dead-letter table or topic: a frame cut to
/// `max_frame_bytes` (1 MiB by default) and its headers would be over librdkafka's default
/// `message.max.bytes` (1,000,000), refused by the client, and missing from `sluice.dlq`. The
/// original length goes with the dead letter (the `sluice.length` header, the `length` column).
pub const DEAD_LETTER_MAX_BYTES: usize = 512 << 10;

/// The most bytes of a reason kept: a plugin's reason is cut to this, saying so and how long it
/// was (see [`cap_reason`]), so one reject cannot fill a message or a Kafka transaction.
pub const REASON_MAX_BYTES: usize = 4 << 10;

impl<'a> DeadLetter<'a> {
    /// The payload as kept: its first [`DEAD_LETTER_MAX_BYTES`] (`bytes.len()` is the original
    /// length).
    pub fn kept_bytes(&self) -> &'a [u8] {
        &self.bytes[..self.bytes.len().min(DEAD_LETTER_MAX_BYTES)]
    }

    /// The reason as kept: at most [`REASON_MAX_BYTES`], cut at a character boundary (plugin reasons
    /// are cut where they enter, with a note of their length, so this only ever bounds the rest).
    pub fn kept_reason(&self) -> &'a str {
        cut_at_char(self.reason, REASON_MAX_BYTES)
    }

    /// Bytes the dead letter takes in a table: the kept payload and reason, and its names.
    pub fn kept_size(&self) -> usize {
        self.kept_bytes().len() + self.kept_reason().len() + self.source.len() + self.plugin.len()
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cut_at_char(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A reason cut to at most [`REASON_MAX_BYTES`], ending with how long it was when it had to be cut.
pub fn cap_reason(mut reason: String) -> String {
    if reason.len() <= REASON_MAX_BYTES {
        return reason;
    }
    let note = format!(" [reason cut: {} bytes]", reason.len());
    let keep = cut_at_char(&reason, REASON_MAX_BYTES - note.len()).len();
    reason.truncate(keep);
    reason.push_str(&note);
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_to_the_cap_at_a_character_boundary_and_says_how_long_it_was() {
        let long = "é".repeat(REASON_MAX_BYTES);
        let cut = cap_reason(long.clone());
        assert!(cut.len() <= REASON_MAX_BYTES, "{}", cut.len());
        assert!(cut.ends_with(&format!(" [reason cut: {} bytes]", long.len())), "{cut}");
        assert!(cut.starts_with("éé"));
        assert_eq!(cap_reason("short".into()), "short");
    }

    #[test]
    fn a_dead_letter_keeps_at_most_the_cap_of_its_payload_and_reason() {
        let bytes = vec![7u8; 1 << 20];
        let reason = "x".repeat(1 << 20);
        let d =
            DeadLetter { stage: Stage::Decode, source_id: 1, source: "s", plugin: "p", reason: &reason, bytes: &bytes };
        assert_eq!(d.kept_bytes().len(), DEAD_LETTER_MAX_BYTES);
        assert_eq!(d.kept_reason().len(), REASON_MAX_BYTES);
        assert_eq!(d.kept_size(), DEAD_LETTER_MAX_BYTES + REASON_MAX_BYTES + 2);
    }
}
