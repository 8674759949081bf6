//! A task's signature as the build read it from the source (parameters, type hints, defaults,
//! docstring), recorded in the manifest: what agent tools (the MCP server) describe as the
//! task's input schema and check calls against before running them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// A Python type hint, as far as JSON can carry it; anything else is `Any`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeHint {
    Any,
    Null,
    Bool,
    Int,
    Float,
    Str,
    /// `list[T]`, `Sequence[T]`, `set[T]`, `tuple[T, ...]`.
    List(Box<TypeHint>),
    /// `dict[str, T]` (JSON keys are strings).
    Dict(Box<TypeHint>),
    /// `tuple[A, B]`.
    Tuple(Vec<TypeHint>),
    /// `A | B`, `Optional[A]`.
    Union(Vec<TypeHint>),
    /// `Literal["a", 1]`.
    Literal(Vec<Scalar>),
}

/// A constant as Python source writes it (a default, a `Literal` member).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Scalar {
    fn to_json(&self) -> Value {
        match self {
            Self::Bool(b) => json!(b),
            Self::Int(i) => json!(i),
            Self::Float(f) => json!(f),
            Self::Str(s) => json!(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameter {
    pub name: String,
    #[serde(rename = "type")]
    pub hint: TypeHint,
    /// It has no default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    /// Its default, when it is a constant JSON can carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Scalar>,
    /// Before `/`: it is passed by position only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub positional_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<Parameter>,
    /// `**kwargs`: keyword arguments beyond the named ones are accepted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more_keywords: bool,
    /// The function's docstring, cleaned as `inspect.cleandoc` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
}

impl TypeHint {
    /// The JSON Schema of the values this hint admits.
    pub fn schema(&self) -> Value {
        match self {
            Self::Any => json!({}),
            Self::Null => json!({"type": "null"}),
            Self::Bool => json!({"type": "boolean"}),
            Self::Int => json!({"type": "integer"}),
            Self::Float => json!({"type": "number"}),
            Self::Str => json!({"type": "string"}),
            Self::List(item) => json!({"type": "array", "items": item.schema()}),
            Self::Dict(value) => json!({"type": "object", "additionalProperties": value.schema()}),
            Self::Tuple(items) => json!({
                "type": "array",
                "prefixItems": items.iter().map(Self::schema).collect::<Vec<_>>(),
                "minItems": items.len(),
                "maxItems": items.len(),
            }),
            Self::Union(members) => json!({"anyOf": members.iter().map(Self::schema).collect::<Vec<_>>()}),
            Self::Literal(values) => json!({"enum": values.iter().map(Scalar::to_json).collect::<Vec<_>>()}),
        }
    }

    /// Whether `value` fits; else what was expected, for the error.
    fn check(&self, value: &Value, at: &str) -> Result<(), String> {
        let expected = |what: &str| Err(format!("`{at}` must be {what}, not {}", describe(value)));
        match (self, value) {
            (Self::Any, _)
            | (Self::Null, Value::Null)
            | (Self::Bool, Value::Bool(_))
            | (Self::Str, Value::String(_))
            | (Self::Float, Value::Number(_)) => Ok(()),
            (Self::Int, Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(()),
            (Self::List(item), Value::Array(values)) => {
                values.iter().enumerate().try_for_each(|(i, v)| item.check(v, &format!("{at}[{i}]")))
            }
            (Self::Dict(item), Value::Object(values)) => {
                values.iter().try_for_each(|(k, v)| item.check(v, &format!("{at}.{k}")))
            }
            (Self::Tuple(items), Value::Array(values)) if items.len() == values.len() => {
                items.iter().zip(values).enumerate().try_for_each(|(i, (t, v))| t.check(v, &format!("{at}[{i}]")))
            }
            (Self::Union(members), _) if members.iter().any(|m| m.check(value, at).is_ok()) => Ok(()),
            (Self::Literal(values), _) if values.iter().any(|v| v.to_json() == *value) => Ok(()),
            _ => expected(&self.name()),
        }
    }

    /// How an error names it.
    fn name(&self) -> String {
        match self {
            Self::Any => "any value".into(),
            Self::Null => "null".into(),
            Self::Bool => "a boolean".into(),
            Self::Int => "an integer".into(),
            Self::Float => "a number".into(),
            Self::Str => "a string".into(),
            Self::List(item) => format!("an array of {}", item.plural()),
            Self::Dict(item) => format!("an object of {}", item.plural()),
            Self::Tuple(items) => format!("an array of {} items", items.len()),
            Self::Union(members) => members.iter().map(Self::name).collect::<Vec<_>>().join(" or "),
            Self::Literal(values) => {
                let values: Vec<String> = values.iter().map(|v| v.to_json().to_string()).collect();
                format!("one of {}", values.join(", "))
            }
        }
    }

    fn plural(&self) -> String {
        match self {
            Self::Any => "values".into(),
            Self::Int => "integers".into(),
            Self::Float => "numbers".into(),
            Self::Str => "strings".into(),
            Self::Bool => "booleans".into(),
            other => format!("({})", other.name()),
        }
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => "a string".into(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl Signature {
    /// The JSON Schema of the object of named arguments a call gives.
    pub fn input_schema(&self) -> Map<String, Value> {
        let mut properties = Map::new();
        for parameter in &self.parameters {
            let mut schema = parameter.hint.schema();
            if let (Some(default), Value::Object(fields)) = (&parameter.default, &mut schema) {
                fields.insert("default".into(), default.to_json());
            }
            properties.insert(parameter.name.clone(), schema);
        }
        let required: Vec<&str> = self.parameters.iter().filter(|p| p.required).map(|p| p.name.as_str()).collect();
        let mut schema = Map::new();
        schema.insert("type".into(), json!("object"));
        schema.insert("properties".into(), Value::Object(properties));
        if !required.is_empty() {
            schema.insert("required".into(), json!(required));
        }
        schema.insert("additionalProperties".into(), json!(self.more_keywords));
        schema
    }

    /// Checks named arguments against the signature and splits them into the call's positional
    /// arguments (those before `/`) and keyword arguments.
    pub fn bind(&self, mut arguments: Map<String, Value>) -> Result<(Vec<Value>, Map<String, Value>), String> {
        let known = |name: &str| self.parameters.iter().any(|p| p.name == name);
        if !self.more_keywords
            && let Some(unknown) = arguments.keys().find(|name| !known(name))
        {
            let names: Vec<&str> = self.parameters.iter().map(|p| p.name.as_str()).collect();
            return Err(match names.as_slice() {
                [] => format!("unknown argument `{unknown}`: it takes none"),
                names => format!("unknown argument `{unknown}`; it takes {}", names.join(", ")),
            });
        }
        let mut positional = Vec::new();
        for parameter in &self.parameters {
            match arguments.get(&parameter.name) {
                Some(value) => parameter.hint.check(value, &parameter.name)?,
                None if parameter.required => return Err(format!("missing argument `{}`", parameter.name)),
                None => continue,
            }
            if parameter.positional_only {
                positional.push(arguments.remove(&parameter.name).expect("checked above"));
            }
        }
        Ok((positional, arguments))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature() -> Signature {
        Signature {
            parameters: vec![
                Parameter {
                    name: "text".into(),
                    hint: TypeHint::Str,
                    required: true,
                    default: None,
                    positional_only: true,
                },
                Parameter {
                    name: "counts".into(),
                    hint: TypeHint::Union(vec![TypeHint::List(Box::new(TypeHint::Int)), TypeHint::Null]),
                    required: false,
                    default: None,
                    positional_only: false,
                },
                Parameter {
                    name: "mode".into(),
                    hint: TypeHint::Literal(vec![Scalar::Str("fast".into()), Scalar::Str("slow".into())]),
                    required: false,
                    default: Some(Scalar::Str("fast".into())),
                    positional_only: false,
                },
            ],
            more_keywords: false,
            doc: Some("Counts things.".into()),
        }
    }

    fn arguments(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn the_input_schema_names_types_defaults_and_what_is_required() {
        insta::assert_snapshot!(serde_json::to_string_pretty(&signature().input_schema()).unwrap());
    }

    #[test]
    fn binding_checks_the_arguments_and_passes_positional_only_ones_by_position() {
        let (args, kwargs) = signature().bind(arguments(json!({"text": "a", "counts": [1, 2]}))).unwrap();
        assert_eq!((args, kwargs), (vec![json!("a")], arguments(json!({"counts": [1, 2]}))));
        let error = |value| signature().bind(arguments(value)).unwrap_err();
        assert_eq!(error(json!({"counts": []})), "missing argument `text`");
        assert_eq!(error(json!({"text": 3})), "`text` must be a string, not the number 3");
        assert_eq!(
            error(json!({"text": "a", "counts": [1, 2.5]})),
            "`counts` must be an array of integers or null, not an array"
        );
        assert_eq!(
            error(json!({"text": "a", "mode": "medium"})),
            "`mode` must be one of \"fast\", \"slow\", not the string \"medium\""
        );
        assert_eq!(error(json!({"text": "a", "colour": 1})), "unknown argument `colour`; it takes text, counts, mode");
    }

    #[test]
    fn signatures_round_trip_through_toml() {
        let text = toml::to_string(&signature()).unwrap();
        assert_eq!(toml::from_str::<Signature>(&text).unwrap(), signature());
    }
}
