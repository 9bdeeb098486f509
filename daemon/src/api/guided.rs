//! The request fields that shape output beyond sampling: `response_format` (`json_object`,
//! `json_schema`), vLLM's `guided_choice`, `guided_regex`, `guided_grammar` and `guided_json`,
//! and, for chat, `tools`, `tool_choice` and `parallel_tool_calls`. Parsed field by field so each
//! error names its path; grammars themselves are compiled (and their errors reported) by the
//! engine in `prepare`.
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::engine::constraint::{check_schema, Constraint, ConstraintKind};
use crate::engine::tools::{ToolChoice, Tools};
use crate::engine::Guided;
use crate::model::chat::type_name;

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        param,
        format!("`{param}` must be {expected}, got {}", type_name(got)),
    )
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn string<'a>(v: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    v.as_str().ok_or_else(|| wrong_type(param, "a string", v))
}

/// The output constraint of a chat or completion request: at most one of `response_format`
/// (other than `text`) and the `guided_*` fields.
pub fn parse_constraint(obj: &Map<String, Value>) -> Result<Option<Constraint>, ApiError> {
    let mut found: Option<Constraint> = None;
    let mut set = |c: Constraint| -> Result<(), ApiError> {
        if let Some(first) = &found {
            return Err(ApiError::invalid(
                c.param.clone(),
                format!(
                    "`{}` cannot be combined with `{}`: give one output constraint",
                    c.param, first.param
                ),
            ));
        }
        found = Some(c);
        Ok(())
    };
    if let Some(rf) = field(obj, "response_format") {
        if let Some(c) = response_format(rf)? {
            set(c)?;
        }
    }
    if let Some(v) = field(obj, "guided_json") {
        let schema = match v {
            Value::String(s) => serde_json::from_str(s).map_err(|e| {
                ApiError::invalid("guided_json", format!("`guided_json` is not JSON: {e}"))
            })?,
            other => other.clone(),
        };
        set(Constraint {
            kind: ConstraintKind::JsonSchema(schema),
            param: "guided_json".into(),
        })?;
    }
    if let Some(v) = field(obj, "guided_choice") {
        let Value::Array(items) = v else {
            return Err(wrong_type("guided_choice", "an array of strings", v));
        };
        if items.is_empty() {
            return Err(ApiError::invalid(
                "guided_choice",
                "`guided_choice` must list at least one choice",
            ));
        }
        let choices = items
            .iter()
            .enumerate()
            .map(|(i, c)| string(c, &format!("guided_choice[{i}]")).map(str::to_string))
            .collect::<Result<Vec<_>, _>>()?;
        set(Constraint {
            kind: ConstraintKind::Choice(choices),
            param: "guided_choice".into(),
        })?;
    }
    for (key, kind) in [
        (
            "guided_regex",
            ConstraintKind::Regex as fn(String) -> ConstraintKind,
        ),
        ("guided_grammar", ConstraintKind::Lark),
    ] {
        if let Some(v) = field(obj, key) {
            let s = string(v, key)?;
            if s.trim().is_empty() {
                return Err(ApiError::invalid(key, format!("`{key}` is empty")));
            }
            set(Constraint {
                kind: kind(s.to_string()),
                param: key.into(),
            })?;
        }
    }
    Ok(found)
}

fn response_format(rf: &Value) -> Result<Option<Constraint>, ApiError> {
    let Value::Object(o) = rf else {
        return Err(wrong_type("response_format", "an object", rf));
    };
    let ty = match field(o, "type") {
        None => {
            return Err(ApiError::invalid(
                "response_format.type",
                "`response_format.type` is missing",
            ))
        }
        Some(t) => string(t, "response_format.type")?,
    };
    match ty {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint {
            kind: ConstraintKind::JsonObject,
            param: "response_format".into(),
        })),
        "json_schema" => {
            let js = match field(o, "json_schema") {
                Some(Value::Object(js)) => js,
                Some(v) => return Err(wrong_type("response_format.json_schema", "an object", v)),
                None => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema",
                        "`response_format.json_schema` is missing",
                    ))
                }
            };
            let name = match field(js, "name") {
                Some(n) => string(n, "response_format.json_schema.name")?,
                None => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        "`response_format.json_schema.name` is missing",
                    ))
                }
            };
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ApiError::invalid(
                    "response_format.json_schema.name",
                    "`response_format.json_schema.name` must be 1 to 64 letters, digits, `_` or `-`",
                ));
            }
            if let Some(s) = field(js, "strict") {
                if !s.is_boolean() {
                    return Err(wrong_type("response_format.json_schema.strict", "a boolean", s));
                }
            }
            if let Some(d) = field(js, "description") {
                string(d, "response_format.json_schema.description")?;
            }
            // OpenAI reads a missing schema as "any JSON".
            let schema = field(js, "schema")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new()));
            let param = "response_format.json_schema.schema";
            check_schema(&schema, param)?;
            Ok(Some(Constraint {
                kind: ConstraintKind::JsonSchema(schema),
                param: param.into(),
            }))
        }
        other => Err(ApiError::invalid(
            "response_format.type",
            format!(
                "`response_format.type` must be one of text, json_object, json_schema, got `{other}`"
            ),
        )),
    }
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of a chat request.
pub fn parse_tools(obj: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let choice = field(obj, "tool_choice");
    let parallel = match field(obj, "parallel_tool_calls") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(wrong_type("parallel_tool_calls", "a boolean", v)),
    };
    let defs = match field(obj, "tools") {
        None => {
            return match choice {
                None => Ok(None),
                Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
                Some(Value::String(s)) if s != "required" => Err(bad_choice(s)),
                Some(_) => Err(ApiError::invalid(
                    "tool_choice",
                    "`tool_choice` is only allowed when `tools` are specified",
                )),
            };
        }
        Some(Value::Array(defs)) if defs.is_empty() => {
            return Err(ApiError::invalid(
                "tools",
                "`tools` must list at least one tool",
            ))
        }
        Some(Value::Array(defs)) => defs,
        Some(v) => return Err(wrong_type("tools", "an array", v)),
    };
    let mut names: Vec<&str> = Vec::with_capacity(defs.len());
    for (i, d) in defs.iter().enumerate() {
        let at = format!("tools[{i}]");
        let Value::Object(o) = d else {
            return Err(wrong_type(&at, "an object", d));
        };
        match field(o, "type").map(|t| string(t, &format!("{at}.type"))) {
            Some(Ok("function")) => {}
            Some(Ok(other)) => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("`{at}.type` must be `function`, got `{other}`"),
                ))
            }
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("`{at}.type` is missing"),
                ))
            }
        }
        let f = match field(o, "function") {
            Some(Value::Object(f)) => f,
            Some(v) => return Err(wrong_type(&format!("{at}.function"), "an object", v)),
            None => {
                return Err(ApiError::invalid(
                    format!("{at}.function"),
                    format!("`{at}.function` is missing"),
                ))
            }
        };
        let name_at = format!("{at}.function.name");
        let name = match field(f, "name") {
            Some(n) => string(n, &name_at)?,
            None => {
                return Err(ApiError::invalid(
                    &name_at,
                    format!("`{name_at}` is missing"),
                ))
            }
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ApiError::invalid(
                &name_at,
                format!("`{name_at}` must be 1 to 64 letters, digits, `_` or `-`"),
            ));
        }
        if names.contains(&name) {
            return Err(ApiError::invalid(
                &name_at,
                format!("two tools are named `{name}`"),
            ));
        }
        names.push(name);
        if let Some(d) = field(f, "description") {
            string(d, &format!("{at}.function.description"))?;
        }
        if let Some(p) = field(f, "parameters") {
            check_schema(p, &format!("{at}.function.parameters"))?;
        }
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(bad_choice(other)),
        },
        Some(Value::Object(o)) => {
            match field(o, "type").and_then(Value::as_str) {
                Some("function") => {}
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice.type",
                        "`tool_choice.type` must be `function`",
                    ))
                }
            }
            let name = field(o, "function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice.function.name",
                        "`tool_choice.function.name` must be a string",
                    )
                })?;
            if !names.contains(&name) {
                return Err(ApiError::invalid(
                    "tool_choice.function.name",
                    format!("`tool_choice.function.name` is `{name}`, which is not one of `tools`"),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
        Some(v) => return Err(wrong_type("tool_choice", "a string or an object", v)),
    };
    Ok(Some(Tools {
        defs: defs.clone(),
        choice,
        parallel,
    }))
}

fn bad_choice(s: &str) -> ApiError {
    ApiError::invalid(
        "tool_choice",
        format!("`tool_choice` must be none, auto, required or a function object, got `{s}`"),
    )
}

/// Everything above, for a chat request (`chat`) or a completion request.
pub fn parse(obj: &Map<String, Value>, chat: bool) -> Result<Guided, ApiError> {
    Ok(Guided {
        constraint: parse_constraint(obj)?,
        tools: if chat { parse_tools(obj)? } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(body: Value, chat: bool) -> String {
        let obj = body.as_object().expect("object").clone();
        parse(&obj, chat)
            .expect_err("should fail")
            .param
            .unwrap_or_default()
    }

    fn ok(body: Value) -> Guided {
        parse(body.as_object().expect("object"), true).expect("valid")
    }

    #[test]
    fn constraints_parse() {
        assert_eq!(ok(json!({})), Guided::default());
        assert_eq!(
            ok(json!({"response_format": {"type": "text"}})),
            Guided::default()
        );
        let g = ok(
            json!({"response_format": {"type": "json_schema", "json_schema": {
            "name": "person", "strict": true, "schema": {"type": "object"}}}}),
        );
        assert_eq!(
            g.constraint,
            Some(Constraint {
                kind: ConstraintKind::JsonSchema(json!({"type": "object"})),
                param: "response_format.json_schema.schema".into()
            })
        );
        let g = ok(json!({"guided_choice": ["a", "b"]}));
        assert_eq!(
            g.constraint.map(|c| c.kind),
            Some(ConstraintKind::Choice(vec!["a".into(), "b".into()]))
        );
        let g = ok(json!({"guided_regex": "[a-z]+"}));
        assert_eq!(
            g.constraint.map(|c| c.kind),
            Some(ConstraintKind::Regex("[a-z]+".into()))
        );
    }

    #[test]
    fn constraint_errors_name_the_field() {
        for (body, param) in [
            (json!({"response_format": "json"}), "response_format"),
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                    "schema": {"type": "object", "required": "name"}}}}),
                "response_format.json_schema.schema.required",
            ),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_choice": ["a", 1]}), "guided_choice[1]"),
            (json!({"guided_regex": 3}), "guided_regex"),
            (
                json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
                "guided_regex",
            ),
        ] {
            assert_eq!(err(body.clone(), true), param, "{body}");
        }
    }

    #[test]
    fn tools_parse_and_errors_name_the_field() {
        let tool = json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
        let g = ok(json!({"tools": [tool], "tool_choice": {"type": "function",
            "function": {"name": "get_weather"}}, "parallel_tool_calls": false}));
        let t = g.tools.expect("tools");
        assert_eq!(t.choice, ToolChoice::Function("get_weather".into()));
        assert!(!t.parallel);
        assert_eq!(
            ok(json!({"tools": [tool]})).tools.expect("tools").choice,
            ToolChoice::Auto
        );
        assert_eq!(ok(json!({"tool_choice": "none"})).tools, None);
        // completions have no tools
        assert_eq!(
            parse(json!({"tools": 1}).as_object().expect("object"), false)
                .expect("ignored")
                .tools,
            None
        );
        for (body, param) in [
            (json!({"tools": {}}), "tools"),
            (json!({"tools": []}), "tools"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (json!({"tools": [tool, tool]}), "tools[1].function.name"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f",
                    "parameters": {"type": 5}}}]}),
                "tools[0].function.parameters.type",
            ),
            (
                json!({"tools": [tool], "tool_choice": "always"}),
                "tool_choice",
            ),
            (
                json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice.function.name",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [tool], "parallel_tool_calls": "yes"}),
                "parallel_tool_calls",
            ),
        ] {
            assert_eq!(err(body.clone(), true), param, "{body}");
        }
    }
}
