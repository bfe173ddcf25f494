//! Topic patterns: the key taken from a message's topic, and the topic an
//! output is published to.

use crate::Record;

/// `sensors/{key}/telemetry`: levels match literally, `+` matches any one
/// level, `#` the rest, and `{key}` any one level, which becomes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    levels: Vec<String>,
}

impl KeyPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let levels: Vec<String> = pattern.split('/').map(str::to_string).collect();
        let keys = levels.iter().filter(|l| *l == "{key}").count();
        if keys != 1 {
            return Err(format!(
                "key pattern `{pattern}` must hold `{{key}}` exactly once, as a whole level"
            ));
        }
        if let Some(i) = levels.iter().position(|l| l == "#") {
            if i != levels.len() - 1 {
                return Err(format!(
                    "key pattern `{pattern}`: `#` must be the last level"
                ));
            }
        }
        Ok(KeyPattern { levels })
    }

    /// The key in `topic`, or `None` when the topic does not fit the pattern.
    pub fn key_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut key = None;
        let mut parts = topic.split('/');
        for level in &self.levels {
            if level == "#" {
                return key;
            }
            let part = parts.next()?;
            match level.as_str() {
                "{key}" => key = Some(part),
                "+" => {}
                literal if literal == part => {}
                _ => return None,
            }
        }
        if parts.next().is_some() {
            return None;
        }
        key
    }
}

impl KeyPattern {
    /// Whether some topic `filter` takes (a subscription's filter, without
    /// a `$share/GROUP/` prefix) fits the pattern.
    pub fn could_fit(&self, filter: &str) -> bool {
        fn meet(pattern: &[String], filter: &[&str]) -> bool {
            match (pattern.split_first(), filter.split_first()) {
                (None, None) => true,
                (Some((p, _)), _) if p == "#" => true,
                (_, Some((&"#", _))) => true,
                (Some((p, pattern)), Some((f, filter))) => {
                    (p == "+" || p == "{key}" || *f == "+" || p == f) && meet(pattern, filter)
                }
                _ => false,
            }
        }
        let levels: Vec<&str> = filter.split('/').collect();
        meet(&self.levels, &levels)
    }
}

/// Checks a subscription's topic filter as a broker would: `+` and `#` only
/// as whole levels, `#` only last, and for `$share/GROUP/filter` a group
/// name without wildcards. Catching it here names the pipeline file's line;
/// a broker would only drop the connection.
pub fn check_filter(filter: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("topic filter `{filter}`: {why}"));
    if filter.is_empty() {
        return bad("it is empty");
    }
    if filter.len() > usize::from(u16::MAX) {
        return bad("it is longer than MQTT's 65,535 bytes");
    }
    if filter.contains('\0') {
        return bad("it holds a NUL character");
    }
    let inner = match filter.strip_prefix("$share/") {
        Some(rest) => {
            let Some((group, inner)) = rest.split_once('/') else {
                return bad("a shared subscription is `$share/GROUP/FILTER`");
            };
            if group.is_empty() || group.contains(['+', '#']) {
                return bad("the share group must be a name, without `+` or `#`");
            }
            if inner.is_empty() {
                return bad("a shared subscription needs a filter after its group");
            }
            inner
        }
        None => filter,
    };
    let levels: Vec<&str> = inner.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "#" if i + 1 < levels.len() => return bad("`#` must be the last level"),
            "+" | "#" => {}
            l if l.contains(['+', '#']) => {
                return bad("`+` and `#` must stand alone as a whole level, as in `a/+/c` or `a/#`")
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a message on `topic` is one `filter` subscribes to. Wildcards at
/// the first level do not match topics that start with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, inner)| inner),
        None => filter,
    };
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut parts = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        let Some(part) = parts.next() else {
            return false;
        };
        if level != "+" && level != part {
            return false;
        }
    }
    parts.next().is_none()
}

/// The longest topic MQTT can carry: its length is a 16-bit field, and a
/// longer one would be sent with its length wrapped, as a different topic.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// The first character of `text` that brokers refuse in a topic or a user
/// property: MQTT forbids U+0000 and tells clients not to send the other
/// control characters or non-characters, and mosquitto closes the
/// connection on any of them, so such a message would be sent forever.
pub fn refused_char(text: &str) -> Option<char> {
    text.chars().find(|&c| is_refused(c))
}

fn is_refused(c: char) -> bool {
    let code = c as u32;
    c.is_control() || (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE
}

/// Why a broker would refuse this topic or property text, if it would. The
/// text itself is not in it: a header's value may be a credential.
pub fn refused_text(what: &str, text: &str) -> Option<String> {
    refused_char(text).map(|c| {
        format!(
            "{what} holds U+{:04X}, a character MQTT tells clients not to send \
             (mosquitto closes the connection on it)",
            c as u32
        )
    })
}

/// `alerts/{key}` or `gw-7/{topic}`: the topic an output is published to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
}

impl TopicTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        if template.is_empty() {
            return Err("topic template is empty".into());
        }
        if template.contains(['+', '#']) {
            return Err(format!(
                "topic template `{template}` holds a wildcard; a message is published to one topic"
            ));
        }
        if let Some(reason) = refused_text(&format!("topic template {template:?}"), template) {
            return Err(reason);
        }
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("topic template `{template}`: `{{` without `}}`"))?;
            let name = &rest[open + 1..open + close];
            if !matches!(name, "key" | "topic") {
                return Err(format!(
                    "topic template `{template}`: unknown placeholder `{{{name}}}` (use {{key}} or {{topic}})"
                ));
            }
            rest = &rest[open + close + 1..];
        }
        Ok(TopicTemplate {
            text: template.to_string(),
        })
    }

    /// The topic for `record`, or why there is none (the record lacks what
    /// the template names).
    pub fn render(&self, record: &Record) -> Result<String, String> {
        self.render_filling(record, None)
    }

    /// [`Self::render`], with `fill` standing in for a key or topic the
    /// record lacks, when given, and for each wildcard or NUL in one it has:
    /// a dead letter must have somewhere to go.
    pub fn render_filling(&self, record: &Record, fill: Option<&str>) -> Result<String, String> {
        let mut topic = self.text.clone();
        let unfit = |c: char| matches!(c, '+' | '#') || is_refused(c);
        let place = |value: &str| match fill {
            Some(fill) if value.contains(unfit) => value.replace(unfit, fill),
            _ => value.to_string(),
        };
        if topic.contains("{key}") {
            topic = topic.replace("{key}", &place(self.field(&record.key, fill, "key")?));
        }
        if topic.contains("{topic}") {
            topic = topic.replace("{topic}", &place(self.field(&record.topic, fill, "topic")?));
        }
        if topic.contains(['+', '#', '\0']) {
            return Err(format!("`{topic}` is not a topic one can publish to"));
        }
        if let Some(reason) = refused_text(&format!("the topic {topic:?}"), &topic) {
            return Err(reason);
        }
        if topic.len() > MAX_TOPIC_BYTES {
            if fill.is_none() {
                return Err(format!(
                    "the topic would be {} bytes, over MQTT's limit of {MAX_TOPIC_BYTES}: `{}…`",
                    topic.len(),
                    crate::cut_at_char(&topic, 60)
                ));
            }
            let cut = crate::cut_at_char(&topic, MAX_TOPIC_BYTES).len();
            topic.truncate(cut);
        }
        Ok(topic)
    }

    /// A record's key or topic for the template, else `fill`, else why not.
    fn field<'a>(
        &self,
        value: &'a Option<String>,
        fill: Option<&'a str>,
        name: &str,
    ) -> Result<&'a str, String> {
        value
            .as_deref()
            .filter(|v| !v.is_empty())
            .or(fill)
            .ok_or_else(|| {
                let lacks = match value {
                    Some(_) => format!("the record's {name} is empty"),
                    None => format!("the record has no {name}"),
                };
                if self.text == "{topic}" {
                    // The sink's default: the user wrote no template.
                    format!(
                        "{lacks}, and the sink publishes to the record's own topic (give it \
                         one with topic = \"...\")"
                    )
                } else {
                    format!("{lacks} for topic `{}`", self.text)
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_fits_a_filter_when_some_topic_fits_both() {
        let p = KeyPattern::parse("sensors/{key}/telemetry").expect("pattern");
        assert!(p.could_fit("sensors/#"));
        assert!(p.could_fit("+/+/telemetry"));
        assert!(p.could_fit("sensors/dev-1/telemetry"));
        assert!(p.could_fit("#"));
        assert!(!p.could_fit("other/+/telemetry"));
        assert!(!p.could_fit("sensors/+"));
        assert!(!p.could_fit("sensors/+/telemetry/raw"));
        let p = KeyPattern::parse("site/{key}/#").expect("pattern");
        assert!(p.could_fit("site/+"));
        assert!(!p.could_fit("plant/+"));
    }

    #[test]
    fn a_topic_over_mqtts_limit_is_refused_or_cut_for_a_dead_letter() {
        let template = TopicTemplate::parse("out/{topic}").expect("template");
        let record = Record {
            topic: Some(format!("in/{}", "é".repeat(40_000))),
            ..Record::default()
        };
        let err = template.render(&record).expect_err("too long");
        assert!(
            err.contains("80007 bytes, over MQTT's limit of 65535"),
            "{err}"
        );
        let cut = template
            .render_filling(&record, Some("_"))
            .expect("a dead letter still has a topic");
        assert!(cut.len() <= MAX_TOPIC_BYTES && cut.len() >= MAX_TOPIC_BYTES - 1);
        assert!(cut.starts_with("out/in/é"));
    }

    #[test]
    fn key_comes_from_its_level() {
        let p = KeyPattern::parse("sensors/{key}/telemetry").expect("pattern");
        assert_eq!(p.key_of("sensors/dev-1/telemetry"), Some("dev-1"));
        assert_eq!(p.key_of("sensors/dev-1/status"), None);
        assert_eq!(p.key_of("sensors/dev-1"), None);
        assert_eq!(p.key_of("sensors/dev-1/telemetry/x"), None);
        let p = KeyPattern::parse("+/{key}/#").expect("pattern");
        assert_eq!(p.key_of("site-a/dev-9/a/b"), Some("dev-9"));
    }

    #[test]
    fn bad_key_patterns_say_why() {
        assert!(KeyPattern::parse("sensors/+/telemetry").is_err());
        assert!(KeyPattern::parse("{key}/{key}").is_err());
        assert!(KeyPattern::parse("a/#/{key}").is_err());
    }

    #[test]
    fn topic_filters_are_checked_as_a_broker_would() {
        for good in [
            "sensors/+/telemetry",
            "#",
            "a/#",
            "+",
            "$share/gateways/site/#",
            "$SYS/broker/load",
        ] {
            assert_eq!(check_filter(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("frames/#/raw", "`#` must be the last level"),
            ("a/b#", "must stand alone"),
            ("a/+b/c", "must stand alone"),
            ("", "empty"),
            ("$share/g", "`$share/GROUP/FILTER`"),
            ("$share/g+/a", "share group"),
            ("$share/g/", "needs a filter"),
        ] {
            let err = check_filter(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn filters_match_topics_level_by_level() {
        assert!(filter_matches(
            "sensors/+/telemetry",
            "sensors/dev-1/telemetry"
        ));
        assert!(!filter_matches(
            "sensors/+/telemetry",
            "sensors/dev-1/status"
        ));
        assert!(!filter_matches(
            "sensors/+/telemetry",
            "sensors/dev-1/telemetry/x"
        ));
        assert!(filter_matches("sensors/#", "sensors"));
        assert!(filter_matches("sensors/#", "sensors/a/b"));
        assert!(filter_matches("$share/g/sensors/+", "sensors/a"));
        assert!(!filter_matches("#", "$SYS/broker/load"));
        assert!(filter_matches("$SYS/#", "$SYS/broker/load"));
        assert!(!filter_matches("a/b", "a"));
    }

    #[test]
    fn templates_fill_key_and_topic() {
        let mut r = Record::new("x");
        r.key = Some("dev-1".into());
        r.topic = Some("sensors/dev-1/telemetry".into());
        let t = TopicTemplate::parse("alerts/{key}").expect("template");
        assert_eq!(t.render(&r).expect("topic"), "alerts/dev-1");
        let t = TopicTemplate::parse("gw/{topic}").expect("template");
        assert_eq!(t.render(&r).expect("topic"), "gw/sensors/dev-1/telemetry");
        r.key = None;
        let t = TopicTemplate::parse("alerts/{key}").expect("template");
        assert_eq!(
            t.render(&r),
            Err("the record has no key for topic `alerts/{key}`".to_string())
        );
        assert_eq!(t.render_filling(&r, Some("_")).expect("topic"), "alerts/_");
        let wild = Record::new("x").with_key("a+b#c");
        assert!(t.render(&wild).is_err());
        assert_eq!(
            t.render_filling(&wild, Some("_")).expect("topic"),
            "alerts/a_b_c"
        );
        let own = TopicTemplate::parse("{topic}").expect("the default");
        r.topic = Some(String::new());
        assert_eq!(
            own.render(&r),
            Err("the record's topic is empty, and the sink publishes to the record's own topic (give it one with topic = \"...\")".to_string())
        );
        assert!(TopicTemplate::parse("alerts/+").is_err());
        assert!(TopicTemplate::parse("alerts/{device}").is_err());
        assert!(TopicTemplate::parse("alerts/\u{1}/{key}").is_err());
    }

    #[test]
    fn characters_brokers_refuse_are_caught_before_publishing() {
        let t = TopicTemplate::parse("alerts/{key}").expect("template");
        for key in [
            "d\u{7}",
            "line\nbreak",
            "del\u{7f}",
            "c1\u{85}",
            "nc\u{fffe}",
            "nc\u{fdd0}",
        ] {
            let record = Record::new("x").with_key(key);
            let err = t.render(&record).expect_err(key);
            assert!(
                err.contains("a character MQTT tells clients not to send"),
                "{err}"
            );
            // A dead letter's topic gets the stand-in instead.
            let filled = t.render_filling(&record, Some("_")).expect("filled");
            assert_eq!(refused_char(&filled), None, "{filled:?}");
        }
        for fine in ["dev-1", "café", "温度", "emoji-😀", "tab-free"] {
            assert_eq!(refused_char(fine), None, "{fine}");
        }
    }
}
