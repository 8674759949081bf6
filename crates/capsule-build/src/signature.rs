//! A `@task` function's signature read from its source: the parameters with their type hints
//! and defaults, and the docstring (see `manifest_schema::Signature` for what it is for).

use manifest_schema::{Parameter, Scalar, Signature, TypeHint};
use ruff_python_ast::{self as ast, Expr, Number, Operator, Stmt};

pub fn read(arguments: &ast::Parameters, body: &[Stmt]) -> Signature {
    let parameter = |argument: &ast::ParameterWithDefault, positional_only: bool| Parameter {
        name: argument.parameter.name.to_string(),
        hint: argument.parameter.annotation.as_deref().map_or(TypeHint::Any, hint),
        required: argument.default.is_none(),
        default: argument.default.as_deref().and_then(scalar),
        positional_only,
    };
    let parameters = (arguments.posonlyargs.iter().map(|a| parameter(a, true)))
        .chain(arguments.args.iter().map(|a| parameter(a, false)))
        .chain(arguments.kwonlyargs.iter().map(|a| parameter(a, false)))
        .collect();
    Signature { parameters, more_keywords: arguments.kwarg.is_some(), doc: docstring(body) }
}

/// The name a hint is written with, without its module (`typing.List` is `List`).
fn name(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Name(name) => Some(name.id.as_str()),
        Expr::Attribute(attribute) => Some(attribute.attr.as_str()),
        _ => None,
    }
}

fn hint(expr: &Expr) -> TypeHint {
    match expr {
        Expr::NoneLiteral(_) => TypeHint::Null,
        Expr::BinOp(union) if union.op == Operator::BitOr => flat_union([hint(&union.left), hint(&union.right)]),
        Expr::Subscript(subscript) => {
            let arguments: Vec<&Expr> = match &*subscript.slice {
                Expr::Tuple(tuple) => tuple.elts.iter().collect(),
                single => vec![single],
            };
            generic(name(&subscript.value).unwrap_or_default(), &arguments)
        }
        other => match name(other).unwrap_or_default() {
            "int" => TypeHint::Int,
            "float" => TypeHint::Float,
            "str" => TypeHint::Str,
            "bool" => TypeHint::Bool,
            "list" | "List" | "Sequence" | "set" | "Set" | "frozenset" | "tuple" | "Tuple" => {
                TypeHint::List(Box::new(TypeHint::Any))
            }
            "dict" | "Dict" | "Mapping" => TypeHint::Dict(Box::new(TypeHint::Any)),
            _ => TypeHint::Any,
        },
    }
}

fn generic(name: &str, arguments: &[&Expr]) -> TypeHint {
    let each = || arguments.iter().map(|a| hint(a));
    match (name, arguments) {
        ("list" | "List" | "Sequence" | "Iterable" | "set" | "Set" | "frozenset", [item]) => {
            TypeHint::List(Box::new(hint(item)))
        }
        ("tuple" | "Tuple", [item, Expr::EllipsisLiteral(_)]) => TypeHint::List(Box::new(hint(item))),
        ("tuple" | "Tuple", _) => TypeHint::Tuple(each().collect()),
        ("dict" | "Dict" | "Mapping", [_, value]) => TypeHint::Dict(Box::new(hint(value))),
        ("Optional", [item]) => flat_union([hint(item), TypeHint::Null]),
        ("Union", _) => flat_union(each()),
        ("Annotated", [item, ..]) => hint(item),
        ("Literal", _) => {
            let mut values = Vec::new();
            let mut none = false;
            for argument in arguments {
                match argument {
                    Expr::NoneLiteral(_) => none = true,
                    other => match scalar(other) {
                        Some(value) => values.push(value),
                        None => return TypeHint::Any,
                    },
                }
            }
            match none {
                true => flat_union([TypeHint::Literal(values), TypeHint::Null]),
                false => TypeHint::Literal(values),
            }
        }
        _ => TypeHint::Any,
    }
}

/// `A | (B | C)` as one union of `A, B, C`; with `Any` among them, `Any`.
fn flat_union(members: impl IntoIterator<Item = TypeHint>) -> TypeHint {
    let mut flat = Vec::new();
    for member in members {
        match member {
            TypeHint::Any => return TypeHint::Any,
            TypeHint::Union(inner) => flat.extend(inner),
            other if !flat.contains(&other) => flat.push(other),
            _ => {}
        }
    }
    TypeHint::Union(flat)
}

fn scalar(expr: &Expr) -> Option<Scalar> {
    match expr {
        Expr::BooleanLiteral(b) => Some(Scalar::Bool(b.value)),
        Expr::NumberLiteral(number) => match &number.value {
            Number::Int(i) => i.as_i64().map(Scalar::Int),
            Number::Float(f) => Some(Scalar::Float(*f)),
            Number::Complex { .. } => None,
        },
        Expr::StringLiteral(text) => Some(Scalar::Str(text.value.to_str().to_string())),
        Expr::UnaryOp(negative) if negative.op == ast::UnaryOp::USub => match scalar(&negative.operand)? {
            Scalar::Int(i) => Some(Scalar::Int(-i)),
            Scalar::Float(f) => Some(Scalar::Float(-f)),
            _ => None,
        },
        _ => None,
    }
}

/// The docstring, its indentation removed as `inspect.cleandoc` does.
fn docstring(body: &[Stmt]) -> Option<String> {
    let Some(Stmt::Expr(first)) = body.first() else { return None };
    let Expr::StringLiteral(text) = &*first.value else { return None };
    let text = text.value.to_str();
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default().trim();
    let rest: Vec<&str> = lines.collect();
    let indent = rest.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
    let mut cleaned = vec![head.to_string()];
    cleaned.extend(rest.iter().map(|l| l.get(indent.unwrap_or(0)..).unwrap_or_default().trim_end().to_string()));
    let doc = cleaned.join("\n").trim().to_string();
    (!doc.is_empty()).then_some(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signature(source: &str) -> Signature {
        let module = ruff_python_parser::parse_module(source).unwrap().into_syntax();
        let Stmt::FunctionDef(def) = &module.body[0] else { panic!("a function") };
        read(&def.parameters, &def.body)
    }

    #[test]
    fn hints_defaults_and_docstrings_become_the_input_schema() {
        let read = signature(
            r#"
def summarise(text: str, /, words: int = 50, *, tags: list[str] | None = None, mode: Literal["short", "long"] = "short",
              weights: dict[str, float] = {}, pair: tuple[int, str] = (1, "a"), anything=None, offset: float = -1.5,
              when: datetime.date = None, many: Optional[Union[int, str]] = None, **extra):
    """Summarise `text`.

        Indented example.
    Last line.
    """
"#,
        );
        insta::assert_snapshot!(toml::to_string(&read).unwrap());
        insta::assert_snapshot!(serde_json::to_string_pretty(&read.input_schema()).unwrap());
    }

    #[test]
    fn a_function_without_hints_takes_anything() {
        let read = signature("def main(name='world', count=3):\n    return name * count\n");
        assert_eq!(read.parameters.iter().map(|p| &p.hint).collect::<Vec<_>>(), [&TypeHint::Any, &TypeHint::Any]);
        assert_eq!(read.parameters[1].default, Some(Scalar::Int(3)));
        assert_eq!(read.doc, None);
    }
}
