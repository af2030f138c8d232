//! Refusals of a REST body in our words. serde's messages name Rust types
//! (`struct SendMessage`, `u32`), backtick values and add a line and
//! column; a caller should read which field is wrong and what it must be.

/// The message for a body whose JSON is well formed but whose data does
/// not fit: `path` is where (serde_path_to_error's `a.b[2]`, `.` for the
/// whole body), `raw` serde's message.
pub(crate) fn data_error(path: &str, raw: &str) -> String {
    let raw = raw.rsplit_once(" at line ").map_or(raw, |(m, _)| m);
    let field = if path.is_empty() || path == "." {
        "the body".to_owned()
    } else {
        path.to_owned()
    };
    if let Some(rest) = raw.strip_prefix("missing field ") {
        return format!("missing field {}", unquote(rest));
    }
    if let Some(rest) = raw.strip_prefix("unknown field ") {
        let name = rest.split_once(", expected").map_or(rest, |(n, _)| n);
        return format!("unknown field {}", unquote(name));
    }
    if raw.starts_with("unknown variant ") {
        let names = backticked(raw);
        if let Some((given, allowed)) = names.split_first() {
            return format!("{field} must be {}, not {given}", one_of(allowed));
        }
    }
    if let Some(rest) = raw
        .strip_prefix("invalid type: ")
        .or_else(|| raw.strip_prefix("invalid value: "))
    {
        let expected = rest.split_once(", expected ").map_or("", |(_, e)| e);
        return format!("{field} must be {}", plain_type(expected));
    }
    if raw.starts_with("invalid length ") {
        return format!("{field} has the wrong number of items");
    }
    if raw.starts_with("data did not match any variant of untagged enum Recipients") {
        return "to must be a user id or a list of user ids".to_owned();
    }
    if raw.starts_with("data did not match any variant") {
        return format!("{field} is not valid");
    }
    // The rest are our own deserializers' messages, already in our words.
    if field == "the body" {
        raw.to_owned()
    } else {
        format!("{field}: {raw}")
    }
}

/// `a JSON object` for serde's `struct X` or `a map`, `a non-negative
/// integer` for `u32`, and so on.
fn plain_type(expected: &str) -> String {
    let e = expected.trim();
    let plain = match e {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "a sequence" => "a list",
        "a map" | "map" => "a JSON object",
        "" => "of another type",
        _ if e.starts_with("struct ") || e.starts_with("a map") => "a JSON object",
        _ if e.starts_with("enum ") || e.starts_with("variant ") => "one of the allowed values",
        _ if e.starts_with("tuple") => "a list",
        _ => return unquote(e),
    };
    plain.to_owned()
}

/// The names between backticks, in order.
fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

fn unquote(s: &str) -> String {
    s.trim().trim_matches('`').to_owned()
}

fn one_of(names: &[String]) -> String {
    match names {
        [] => "another value".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::data_error;

    /// What serde_json and serde_path_to_error say about `body` read as `T`.
    fn refusal<T: serde::de::DeserializeOwned + std::fmt::Debug>(body: &str) -> String {
        let mut de = serde_json::Deserializer::from_str(body);
        let err = serde_path_to_error::deserialize::<_, T>(&mut de).expect_err("refused");
        data_error(&err.path().to_string(), &err.inner().to_string())
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        content: String,
        count: Option<u32>,
        feature: Option<Feature>,
        members: Option<Vec<String>>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    enum Feature {
        #[serde(rename = "RELIABLE")]
        Reliable,
        #[serde(rename = "FAST")]
        Fast,
    }

    #[test]
    fn each_refusal_names_the_field_and_what_it_must_be_without_rust_types() {
        let cases = [
            (r#"{"content": 5}"#, "content must be a string"),
            (r#"{}"#, "missing field content"),
            (r#"{"content": "x", "colour": 1}"#, "unknown field colour"),
            (
                r#"{"content": "x", "feature": "SLOW"}"#,
                "feature must be RELIABLE or FAST, not SLOW",
            ),
            (
                r#"{"content": "x", "count": -1}"#,
                "count must be a non-negative integer",
            ),
            (
                r#"{"content": "x", "members": ["a", 2]}"#,
                "members[1] must be a string",
            ),
            (r#"{"content": {}}"#, "content must be a string"),
        ];
        for (body, says) in cases {
            let message = refusal::<Body>(body);
            assert_eq!(message, says, "{body}");
            for leak in ["struct", "u32", "line ", "`", "Body"] {
                assert!(!message.contains(leak), "{body}: {message:?} says {leak:?}");
            }
        }
    }
}
